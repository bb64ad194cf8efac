"""Gate label recipes compared on validation generations (issue 16; exploration, not part of `spa eval`).

    python -m evaluation.gate_explore PROFILE PAPERS FOLDS VARIANTS USAGES [OFFSET]
    e.g. python -m evaluation.gate_explore approach 20 2 base,flip,flipgain 0.25,0.3,0.35,0.4

Trains the profile's default plugin once (saved under runs/i16/plugins/PROFILE-full, with the
cross-fitted helpers' gains and flips and the helper side networks beside it), then fits one
gate per label variant on the same side network and cross-fitted helpers:
  base      the default recipe's gate (gain > lambda);
  flip      the side changes the greedy token (`spa train --gate-labels flip`);
  flipgain  flip and the gain is positive;
  gain0, gain1, fliporgain  other thresholds;
  genflip, genonly  flips along the helpers' side-always-on generations of the train papers
            (labels from generated prefixes; ~30 s a paper on a shared 2-core CPU: not run to the end).
For each gate and each teacher-forced validation usage in USAGES it writes the first PAPERS
validation summaries (from OFFSET; greedy, <= 48 tokens, wire int8, eager gate and side) beside
side-always-on and the backbone, and records Rouge-L per paper, usage in generation, and the
teacher-forced validation loss and flip recall at that tau, in runs/i16/explore-*.json.
Test papers are never read.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.batched import ALWAYS, NEVER, EagerPlugin, Row, generate_rows
from evaluation.rouge import rouge_l, side_usage
from spa.model.backbone import load_backbone
from spa.data.aclsum import load_split, paper_prompt
from spa.data.prompts import GENERIC_INSTRUCTION, chat_template
from spa.model.plugin import combine, load_plugin
from training.tapcache import TokenSet, split_token_set
from training.train import TrainSettings, train_gate

OUT = Path("runs/i16")


def stats(backbone, plugin, data: TokenSet, batch=512):
    """per token: base CE, side CE, base argmax, side argmax."""
    out = {k: [] for k in ("base", "side", "am0", "am1")}
    with torch.no_grad():
        for i in range(0, len(data), batch):
            st, tg = data.states[i:i + batch], data.targets[i:i + batch]
            f = st[:, -1]
            l0 = backbone.train_logits(f)
            l1 = backbone.train_logits(combine(f, plugin.side(st[:, plugin.config.taps]), plugin.config.combination))
            out["base"].append(F.cross_entropy(l0, tg, reduction="none"))
            out["side"].append(F.cross_entropy(l1, tg, reduction="none"))
            out["am0"].append(l0.argmax(-1))
            out["am1"].append(l1.argmax(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def cross_fit(backbone, config, train, val, s, folds):
    path = OUT / f"{s.profile}-cf{folds}.pt"
    if path.exists():
        return torch.load(path)
    import dataclasses
    from training.train import cross_fitted
    g, fl = cross_fitted(backbone, config, train, val, dataclasses.replace(s, label_folds=folds))
    torch.save({"gain": g, "flip": fl}, path)
    return {"gain": g, "flip": fl}


def generated_flips(backbone, base_plugin, train, s, tmpl, max_new=48):
    """f_t and flip labels along each train paper's side-always-on generation, by the cross-fitted
    helper that never saw the paper (2 folds, states saved by the training hook)."""
    path = OUT / f"{s.profile}-genflips.pt"
    if path.exists():
        d = torch.load(path)
        return d["f"], d["flip"]
    from spa.model.generate import generate
    sides = torch.load(OUT / f"{s.profile}-sides.pt")
    helpers = []
    for st in sides[1:3]:
        h = load_plugin(plugin_dir)
        h.side.load_state_dict(st)
        helpers.append(h.eval())
    papers = load_split("train")
    fs, fl = [], []
    t0 = time.time()
    with torch.no_grad():
        for i, paper in enumerate(papers):
            helper = helpers[i % 2]  # fold i % 2 was held out from helper i % 2
            prompt = backbone.encode(paper_prompt(paper, tmpl, GENERIC_INSTRUCTION, s.max_doc_tokens))

            def choose(pos, states):
                f = states[0, -1]
                side = helper.side(states[0, helper.config.taps][None])[0]
                l0, l1 = backbone.train_logits(f[None])[0], backbone.train_logits((f + side)[None])[0]
                fs.append(f.clone())
                fl.append(bool(l0.argmax() != l1.argmax()))
                return [int(l1.argmax())]

            for _ in generate(backbone, prompt, choose, max_new):
                pass
            if i % 10 == 9:
                print(f"generated flips: paper {i + 1}/100 {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    d = {"f": torch.stack(fs), "flip": torch.tensor(fl)}
    torch.save(d, path)
    return d["f"], d["flip"]


def gate_from(plugin, f, labels, steps=300, seed=0):
    torch.manual_seed(seed)
    g = load_plugin(plugin_dir)
    g.gate.classifier.reset_parameters()
    train_gate(g, f, labels, steps)
    return g.eval()


def taus_for(g, val, usages):
    with torch.no_grad():
        p = g.gate(val.states[:, -1])[:, 0]
    return {u: float(torch.quantile(p, 1 - u)) for u in usages}


if __name__ == "__main__":
    profile, papers, folds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    variants = sys.argv[4].split(",")
    usages = [float(u) for u in sys.argv[5].split(",")]
    offset = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    plugin_dir = OUT / "plugins" / f"{profile}-full"
    backbone = load_backbone()
    s = TrainSettings(profile)
    if not (plugin_dir / "config.json").exists():
        import training.train as T
        from spa.model.plugin import save_plugin
        orig = T.cross_fitted
        orig_side = T.train_side
        sides = []

        def hooked_side(backbone, plugin, *a):
            h = orig_side(backbone, plugin, *a)
            sides.append({k: v.clone() for k, v in plugin.side.state_dict().items()})
            torch.save(sides, OUT / f"{s.profile}-sides.pt")  # [main, helper fold 0, helper fold 1]
            return h
        T.train_side = hooked_side

        def hooked(backbone, config, train, val, s):
            g, fl = orig(backbone, config, train, val, s)
            torch.save({"gain": g, "flip": fl}, OUT / f"{s.profile}-cf{s.label_folds}.pt")
            return g, fl
        T.cross_fitted = hooked
        t0 = time.time()
        plugin, metrics = T.train_plugin(backbone, s)
        save_plugin(plugin, plugin_dir)
        print(f"trained baseline in {time.time() - t0:.0f} s: {json.dumps(metrics)}", file=sys.stderr, flush=True)
    base_plugin = load_plugin(plugin_dir).eval()
    tmpl = chat_template(backbone.tokenizer)
    train = split_token_set(backbone, "train", None, profile, tmpl, GENERIC_INSTRUCTION, s.max_doc_tokens)
    val = split_token_set(backbone, "val", None, profile, tmpl, GENERIC_INSTRUCTION, s.max_doc_tokens)
    vs = stats(backbone, base_plugin, val)
    flip_val = (vs["am0"] != vs["am1"]).float()
    print(f"val teacher-forced: flip rate {flip_val.mean():.3f}, gain>0.3 {((vs['base'] - vs['side']) > 0.3).float().mean():.3f}",
          file=sys.stderr)
    cf = cross_fit(backbone, base_plugin.config, train, val, s, folds)
    gain, flip = cf["gain"], cf["flip"]
    if any(v.startswith("gen") for v in variants):
        gf, gl = generated_flips(backbone, base_plugin, train, s, tmpl)
        print(f"generated prefixes: {len(gl)} positions, flip rate {gl.float().mean():.3f}", file=sys.stderr, flush=True)
    labels = {"gain": gain > s.skip_cost, "flip": flip, "flipgain": flip & (gain > 0),
              "gain0": gain > 0.0, "gain1": gain > 1.0, "fliporgain": flip | (gain > s.skip_cost)}
    f = train.states[:, -1]
    gates = {}
    for v in variants:
        if v == "base":
            gates[v] = base_plugin
        elif v == "genflip":  # teacher-forced flips and flips along the side-always-on generations
            gates[v] = gate_from(base_plugin, torch.cat([f, gf]), torch.cat([flip, gl]))
        elif v == "genonly":
            gates[v] = gate_from(base_plugin, gf, gl)
        else:
            print(f"{v}: positive share {labels[v].float().mean():.3f}", file=sys.stderr, flush=True)
            gates[v] = gate_from(base_plugin, f, labels[v])
    # teacher-forced val loss of each gate at each usage
    rows = [Row("always", EagerPlugin(base_plugin), ALWAYS), Row("backbone", None, NEVER)]
    info = {}
    for v, g in gates.items():
        with torch.no_grad():
            p = g.gate(val.states[:, -1])[:, 0]
        for u, tau in taus_for(g, val, usages).items():
            op = p > tau
            loss = torch.where(op, vs["side"], vs["base"]).mean().item()
            flipcov = (op & (flip_val > 0)).float().sum().item() / max(flip_val.sum().item(), 1)
            info[f"{v}@{u}"] = {"tf_loss": loss, "tf_usage": op.float().mean().item(), "flip_recall": flipcov}
            rows.append(Row(f"{v}@{u}", EagerPlugin(g), tau))
    info["always"] = {"tf_loss": vs["side"].mean().item()}
    val_papers = load_split("val")[offset:offset + papers]
    scores = {r.name: [] for r in rows}
    sig = {r.name: [] for r in rows}
    t0 = time.time()
    for i, paper in enumerate(val_papers):
        ids = backbone.encode(paper_prompt(paper, tmpl, GENERIC_INSTRUCTION, s.max_doc_tokens))
        for r, g in zip(rows, generate_rows(backbone, ids, rows, 48)):
            scores[r.name].append(rouge_l(backbone.decode(g.tokens), paper.summaries[profile]))
            sig[r.name].append(g.sigmas)
        print(f"paper {i + 1}/{len(val_papers)} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    res = {}
    for r in rows:
        res[r.name] = {**info.get(r.name, {}), "rouge_l": float(np.mean(scores[r.name])),
                       "gen_usage": side_usage(sig[r.name]), "per_paper": scores[r.name]}
        print(f"{r.name:16s} R-L {res[r.name]['rouge_l']:.2f} gen usage {res[r.name]['gen_usage']:.0%} "
              f"{json.dumps({k: round(v, 3) for k, v in info.get(r.name, {}).items()})}")
    tag = f"{profile}-cf{folds}-{papers}p-o{offset}-{sys.argv[4].replace(',', '_')}"
    (OUT / f"explore-{tag}.json").write_text(json.dumps(res, indent=1))
