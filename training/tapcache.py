"""Backbone states at the summary positions, computed once and cached on disk.

The backbone is frozen and the side network reads one position at a time, so
training never needs the backbone again once the states at the positions that
predict summary tokens are stored. For each (document, summary) pair we run
one forward over prompt + summary + EOS and keep, for every position t that
predicts a summary token, all L + 1 states (embedding and every layer; the last
is f_t) and the target x_{t+1}.

The states are computed in the backbone's dtype on its device (`spa train
--dtype bfloat16 --device cuda`) and stored as float32; a cache computed in
another dtype is another cache.
"""

import hashlib
import json
import sys
from pathlib import Path
from dataclasses import dataclass

import torch
from tqdm import tqdm

from spa.data.aclsum import Paper, load_split, paper_prompt
from spa.system.paths import cache_dir


@dataclass
class TokenSet:
    states: torch.Tensor  # [N, L + 1, H] float32, states[:, -1] is f_t
    targets: torch.Tensor  # [N] int64, the summary token each position predicts
    doc_index: torch.Tensor  # [N] int64, which paper the position belongs to

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, docs: int) -> "TokenSet":
        return self.where(self.doc_index < docs)

    def where(self, keep: torch.Tensor) -> "TokenSet":
        """The tokens where `keep` [N] is true (document indices unchanged)."""
        return TokenSet(self.states[keep], self.targets[keep], self.doc_index[keep])

    @property
    def documents(self) -> int:
        return int(self.doc_index.max()) + 1 if len(self) else 0


def _cache_key(backbone, papers, profile, template, instruction, max_doc_tokens) -> str:
    spec = [backbone.identity.fingerprint, [p.id for p in papers], profile, template, instruction, max_doc_tokens, 2]
    dtype = getattr(backbone, "dtype", torch.float32)
    if dtype != torch.float32:  # states computed in another dtype are other states (float32 keeps its old keys)
        spec.append(str(dtype))
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]


def _cache_path(backbone, papers, profile, template, instruction, max_doc_tokens) -> Path:
    key = _cache_key(backbone, papers, profile, template, instruction, max_doc_tokens)
    return cache_dir() / "taps" / f"{key}.safetensors"


def split_token_set(backbone, split: str, limit: int | None, profile: str, template: str, instruction: str,
                    max_doc_tokens: int) -> TokenSet:
    """The first `limit` papers of a split; cut from the whole split's cache when that exists."""
    papers = load_split(split)
    if limit is not None and limit < len(papers):
        if _cache_path(backbone, papers, profile, template, instruction, max_doc_tokens).exists():
            return build_token_set(backbone, papers, profile, template, instruction, max_doc_tokens, split).subset(limit)
        papers = papers[:limit]
    return build_token_set(backbone, papers, profile, template, instruction, max_doc_tokens, split)


def build_token_set(backbone, papers: list[Paper], profile: str, template: str, instruction: str,
                    max_doc_tokens: int, label: str = "taps") -> TokenSet:
    """States and targets for every summary token of `papers`, cached on disk."""
    path = _cache_path(backbone, papers, profile, template, instruction, max_doc_tokens)
    prompts = [paper_prompt(paper, template, instruction, max_doc_tokens) for paper in papers]
    return _cached_states(backbone, path, prompts, [paper.summaries[profile] for paper in papers], label)


def pairs_token_set(backbone, prompts: list[str], summaries: list[str], label: str = "taps") -> TokenSet:
    """States and targets for (prompt, summary) pairs of any origin (a person's examples), cached on
    disk under a hash of the backbone, the pairs and the dtype: the text itself names no file."""
    spec = [backbone.identity.fingerprint, prompts, summaries, "pairs", 1, str(getattr(backbone, "dtype", ""))]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:20]
    return _cached_states(backbone, cache_dir() / "taps" / f"pairs-{key}.safetensors", prompts, summaries, label)


def _cached_states(backbone, path: Path, prompts: list[str], summaries: list[str], label: str) -> TokenSet:
    from safetensors.torch import load_file, save_file

    if path.exists():
        data = load_file(path)
        print(f"{label}: {len(data['targets'])} summary tokens from cache {path}", file=sys.stderr, flush=True)
        return TokenSet(data["states"], data["targets"], data["doc_index"])
    eos = min(backbone.eos_token_ids)
    states, targets, doc_index = [], [], []
    for i, (text, target) in enumerate(tqdm(list(zip(prompts, summaries)), desc=f"{label}: caching backbone states",
                                            unit="doc")):
        prompt = backbone.encode(text)
        summary = backbone.encode(target) + [eos]
        ids = torch.tensor([prompt + summary])
        out = backbone.forward(ids, backbone.new_cache())[0]
        first = len(prompt) - 1  # this position predicts the first summary token
        states.append(out[first:first + len(summary)].clone())
        targets.append(torch.tensor(summary))
        doc_index.append(torch.full((len(summary),), i))
    data = {"states": torch.cat(states), "targets": torch.cat(targets), "doc_index": torch.cat(doc_index)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(data, tmp)
    tmp.rename(path)
    return TokenSet(**data)
