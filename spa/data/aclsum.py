"""ACLSum papers and reader profiles, as documents for the prompt (spa/data/prompts.py).

A *reader profile* is one ACLSum aspect: a reader who wants the paper's
`challenge`, its `approach`, or its `outcome`. That aspect's human summary is
the personalized summary the reader's plugin learns to write.

The plugin's prompt uses the generic instruction of spa/data/prompts.py; the
prompted-backbone baseline (paper's one-shot row) names the aspect in its
instruction instead (`ASPECT_INSTRUCTIONS`).

Truncation: a whole paper is ~1100 tokens; a CPU budget wants less. We keep
the title, then whole sentences in priority order (abstract, conclusion,
introduction) while they fit in `max_doc_tokens`, and print the kept sentences
in the paper's own order (lengths estimated without a tokenizer,
`approx_tokens`).
"""

import json
from dataclasses import dataclass

from spa.data.prompts import approx_tokens, format_prompt
from spa.errors import DataError
from spa.system.paths import package_dir

PROFILES = ("challenge", "approach", "outcome")
SPLITS = ("train", "val", "test")
ASPECT_INSTRUCTIONS = {
    "challenge": "In one sentence, what challenge or problem does this paper address?",
    "approach": "In one sentence, what approach or method does this paper propose?",
    "outcome": "In one sentence, what are the outcomes or results of this paper?",
}
_SECTION_PRIORITY = ("abstract", "conclusion", "introduction")
_SECTION_ORDER = ("abstract", "introduction", "conclusion")


@dataclass(frozen=True)
class Paper:
    id: str
    title: str
    sections: dict  # section name -> list of sentences
    summaries: dict  # profile -> human summary


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise DataError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return profile


def load_split(split: str, limit: int | None = None) -> list[Paper]:
    """Read ACLSum's shipped `train`/`val`/`test` jsonl (100/50/100 papers)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = package_dir("aclsum") / "dataset" / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall aclsum==0.1.2")
    papers = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            papers.append(Paper(row["id"], row["title"], row["sentences"], row["summary"]))
            if limit is not None and len(papers) >= limit:
                break
    return papers



def document_text(paper: Paper, max_doc_tokens: int) -> str:
    """The paper as prompt text, truncated to about `max_doc_tokens` tokens."""
    keep = kept_sentences(paper, max_doc_tokens)
    parts = [paper.title]
    for section in _SECTION_ORDER:
        kept = [s for i, s in enumerate(paper.sections.get(section, [])) if (section, i) in keep]
        if kept:
            parts.append(f"{section.capitalize()}: " + " ".join(kept))
    return "\n".join(parts)


def sentence_count(paper: Paper) -> int:
    """Sentences a whole document of the paper has (those of the sections it prints)."""
    return sum(len(paper.sections.get(section, [])) for section in _SECTION_ORDER)


def kept_sentences(paper: Paper, max_doc_tokens: int) -> set[tuple[str, int]]:
    """(section, index) of the sentences that fit: by section priority, in order, while they fit."""
    budget = max_doc_tokens - approx_tokens(paper.title)
    keep = set()
    for section in _SECTION_PRIORITY:
        for i, sentence in enumerate(paper.sections.get(section, [])):
            cost = approx_tokens(" " + sentence)
            if cost > budget:
                break
            budget -= cost
            keep.add((section, i))
    return keep





def paper_prompt(paper: Paper, template: str, instruction: str, max_doc_tokens: int) -> str:
    return format_prompt(template, document_text(paper, max_doc_tokens), instruction)
