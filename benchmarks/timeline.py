"""One changed side token's timeline, before and after settlement (the trace model's virtual clock).

    python -m benchmarks.timeline [--step-ms 40] [--rtt-ms 50] [--out benchmarks/results/changed-token-timeline.png]

A short generation in which one side token's side output changes the backbone's draft, replayed
through the real protocol machines (benchmarks/tracemodel.py) three ways: the verdict path
(pushed taps, in flight: the device sends s_t and waits for the verdict, then for the redraft),
settlement with no branch line of the new token (the device commits at once; the redraft still
crosses the link), and settlement with that line streamed (the device goes on at once). Each
row's commit times, as a step plot: the flat stretch after the changed token is what it costs.
"""

import argparse
import sys
from pathlib import Path

from benchmarks.tracemodel import ROWS, Costs, Trace, simulate

TOKENS, CHANGED_AT = 14, 4


def timelines(step_ms: float, rtt_ms: float) -> dict[str, list[float]]:
    sigma = [i == CHANGED_AT for i in range(TOKENS)]
    changed = list(sigma)
    costs = Costs(rtt_ms=rtt_ms, step_ms=step_ms, branch_row_cost=0.0)
    rows = {r.name: r for r in ROWS}
    out = {}
    for label, row, hit in (("verdict (in flight + pushed taps)", rows["spa_inflight_push"], False),
                            ("settled, no branch line of the new token", rows["spa_settle"], False),
                            ("settled, its branch line streamed", rows["spa_settle_branches"], True)):
        trace = Trace(sigma, changed, [hit and c for c in changed])
        out[label] = simulate(trace, row, costs)["commit_ms"]
    return out


def plot(lines: dict[str, list[float]], step_ms: float, rtt_ms: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, commits in lines.items():
        start = commits[0]
        ax.step([c - start for c in commits], range(1, len(commits) + 1), where="post", label=label)
    ax.axhline(CHANGED_AT + 1, color="grey", lw=0.6, ls=":")
    ax.text(1, CHANGED_AT + 1.2, "the changed side token", color="grey", fontsize=8)
    ax.set_xlabel("ms after the first token")
    ax.set_ylabel("tokens committed on the device")
    ax.set_title(f"One changed side token: {step_ms:g} ms/step gateway, {rtt_ms:g} ms round trip")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-ms", type=float, default=40.0)
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/changed-token-timeline.png"))
    args = ap.parse_args(argv)
    lines = timelines(args.step_ms, args.rtt_ms)
    for label, commits in lines.items():
        print(f"{label:42} last token at {commits[-1] - commits[0]:6.0f} ms")
    plot(lines, args.step_ms, args.rtt_ms, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
