"""A trace-driven model of the split: tokens/s of every SPA row for any link and gateway speed.

`spa bench link` measures this machine: a CPU gateway at ~40 ms per decode
step. A GPU gateway steps in 5-10 ms, which makes every round trip relatively
longer. To plan past this machine, this module replays a generation's
per-position trace (sigma, and whether the side output changed the token)
through the *real* protocol state machines (`GatewayProtocol`,
`DeviceProtocol`: they are sans-I/O, so a virtual clock can drive them) with
modelled costs:

* the link: a one-way delay of RTT / 2 plus serialization at the link's rate,
  each direction a FIFO (a message waits for the one before it);
* the gateway: one compute thread; a decode step costs `step_ms`, a head
  (lm_head of one row: the first draft, a verdict) `head_ms`; taps come from
  its cache at no cost; with branch drafting (`Row.branches`) the main line's
  step and its branch lines' run as one batched forward, each extra row
  costing `branch_row_cost` of a step (memory-bound GPU steps: a few percent;
  this CPU: more), and a changed verdict is a branch hit where the trace says
  so (`Trace.hit`: the side's token was among the backbone's runners-up);
* the device: one thread; a gate costs `gate_ms`, a side network `side_ms`, and
  with settlement (`Row.settle`, docs/PROTOCOL.md §6 "Settlement") the proof of a
  side token on its copy of the output head `device_head_ms`; a settled token
  costs no round trip and no gateway head, its exact `f_t` rides with the taps
  (`exact_bytes`), and branch lines are streamed to the device (`step_bytes`
  each), so a changed token whose line was drafted continues at once.

The model is trusted only where it matches measurements: `compare` prints
predicted vs measured rows of `spa bench link` results side by side.

What it leaves out: batching with other sessions, TCP slow start, CPU
contention between the two sides of one machine, and the gateway's event
loop latency.
"""

import heapq
import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from spa.protocol import messages as m
from spa.protocol.device import DeviceProtocol
from spa.protocol.gateway import Draft, GatewayProtocol, Head
from spa.protocol.loopback import DeviceHost, Drafted, GatewayHost

_H, _TAPS = 4, (0, 2)  # the toy activations the machines carry; their wire sizes are modelled below
_BACKBONE = m.BackboneInfo("model", "fp", num_layers=2, hidden_size=_H)
_DRAFT, _CHANGED, _MISSED = 1, 2, 3  # the draft token, the token a changing verdict picks, a runner-up it does not
_FIRST = 4  # the first step's position (a prompt of 5 tokens)


@dataclass(frozen=True)
class Costs:
    rtt_ms: float
    step_ms: float  # one decode step of the gateway
    head_ms: float | None = None  # lm_head of one row; default: a fifth of a step (the head is ~20 % of SmolLM2)
    gate_ms: float = 0.05
    side_ms: float = 0.05
    branch_row_cost: float = 0.05  # a branch line's row in a batched decode step, as a share of a step
    device_head_ms: float = 10.0  # the device's proof of one side token (a [V, H] matrix-vector product)
    down_mbit: float | None = None  # None: no serialization delay
    up_mbit: float | None = None
    # Wire sizes (bytes): a step (f_t int8 + draft), the taps of a position, a side output, anything else.
    step_bytes: int = 750
    taps_bytes: int = 17_000
    side_bytes: int = 750
    small_bytes: int = 40
    exact_bytes: int = 2_350  # f_t in float32 with a settling session's taps

    @property
    def head(self) -> float:
        return self.step_ms / 5 if self.head_ms is None else self.head_ms


@dataclass(frozen=True)
class Row:
    """A way to run SPA: window W, side outputs in flight, pushed taps."""

    name: str
    window: int
    in_flight: int = 1
    push: bool = False
    always_side: bool = False  # sigma = 1 on every token (the side_every_token row)
    branches: int = 0  # K alternatives drafted at a pending side position (spa gateway --branches K)
    settle: bool = False  # the device proves its side tokens (and gets the branch lines streamed)


ROWS = (
    Row("side_every_token", 0, always_side=True),
    Row("spa_lockstep", 0),
    Row("spa_draft", 8),
    Row("spa_draft_push", 8, push=True),
    Row("spa_inflight", 8, in_flight=4),
    Row("spa_inflight_push", 8, in_flight=4, push=True),
    Row("spa_branches", 8, in_flight=4, branches=2),
    Row("spa_settle", 8, in_flight=4, push=True, settle=True),
    Row("spa_settle_branches", 8, in_flight=4, push=True, branches=2, settle=True),
)


@dataclass
class Trace:
    """Per generated position: sigma, and whether the side output changed the draft (only where sigma = 1)."""

    sigma: list[bool]
    changed: list[bool] = field(default_factory=list)
    hit: list[bool] = field(default_factory=list)  # where changed: the new token was a branch line's

    @classmethod
    def synthetic(cls, tokens: int, side_usage: float, change_rate: float, hit_rate: float = 0.0) -> "Trace":
        """Evenly spread sigma = 1 positions, changes and branch hits with the given rates (deterministic)."""
        sigma = [int((i + 1) * side_usage) > int(i * side_usage) for i in range(tokens)]
        changes = _every([i for i, s in enumerate(sigma) if s], change_rate)
        hits = set(_every(changes, hit_rate))
        return cls(sigma, [i in changes for i in range(tokens)], [i in hits for i in range(tokens)])


def _every(items: list, rate: float) -> list:
    """A share `rate` of items, evenly spread (deterministic)."""
    return [x for k, x in enumerate(items) if int((k + 1) * rate) > int(k * rate)]


def rate(traces, row: "Row", costs: "Costs") -> float | None:
    """tokens/s over one trace or several (documents), as `spa bench link` counts it: the tokens
    after each document's first over the time from its first commit to its last."""
    tokens = span = 0.0
    for trace in [traces] if isinstance(traces, Trace) else traces:
        commits = simulate(trace, row, costs)["commit_ms"]
        tokens, span = tokens + max(len(commits) - 1, 0), span + (commits[-1] - commits[0] if commits else 0.0)
    return tokens / span * 1000 if span > 0 else None


class _Link:
    """One direction: FIFO, delay + serialization."""

    def __init__(self, delay_ms: float, mbit: float | None):
        self.delay, self.mbit, self.free_at = delay_ms, mbit, 0.0

    def arrival(self, now: float, size: int) -> float:
        start = max(now, self.free_at)
        serialize = 0.0 if not self.mbit else size * 8 / (self.mbit * 1000)  # ms
        self.free_at = start + serialize
        return self.free_at + self.delay


def _size(msg: dict, c: Costs) -> int:
    kind = msg["type"]
    exact = c.exact_bytes if "exact" in msg else 0
    if kind == "step":
        return c.step_bytes + (c.taps_bytes if "taps" in msg else 0) + exact
    return {"taps": c.taps_bytes + exact, "side": c.side_bytes}.get(kind, c.small_bytes)


class _TraceModel:
    """The gateway's compute for one trace (a GatewayModel of spa/protocol/loopback.py): the toy f_t
    opens the toy gate exactly where the trace has sigma = 1, and a verdict changes the token where
    the trace says so."""

    def __init__(self, sigma: list, changed: list, hit: list, branches: int):
        self.sigma, self.changed, self.hit, self.branches = sigma, changed, hit, branches
        self.proto: GatewayProtocol | None = None  # set by simulate: alternatives only on the main line

    def prefill(self) -> int:
        return _FIRST + 1

    def draft(self, line: int, pos: int, feed) -> Drafted:
        f = np.zeros((1, _H), np.float32)
        i = pos - _FIRST
        f[0, 0] = 50.0 if self.sigma[i] else -50.0
        alternatives = ()
        if self.branches and line == self.proto.main:  # the changed token where the trace has a branch hit
            alternatives = ((_CHANGED,) if 0 <= i < len(self.hit) and self.hit[i] else (_MISSED,)) + \
                tuple(_MISSED + 1 + k for k in range(self.branches - 1))  # other runners-up: never hit
        return Drafted(f, _DRAFT, b"x", alternatives)

    def taps(self, line, pos) -> np.ndarray:
        return np.zeros((len(_TAPS), _H), np.float32)

    def head(self, line, pos, s) -> tuple[int, bytes]:
        return (_CHANGED if self.changed[pos - _FIRST] else _DRAFT), b"y"

    def fork(self, line, parent, keep): pass  # noqa: E704  (line work costs nothing here)

    def cut(self, line, keep): pass  # noqa: E704

    def drop(self, line): pass  # noqa: E704

    def forget(self, line, upto): pass  # noqa: E704


def simulate(trace: Trace, row: Row, costs: Costs) -> dict:
    """Replay one generation through the protocol machines (spa/protocol/loopback.py's hosts) on a
    virtual clock; returns commit times (ms from the first step's computation) and tokens/s over the
    decode phase (first to last commit)."""
    n = len(trace.sigma)
    sigma = [True] * n if row.always_side else trace.sigma
    model = _TraceModel(sigma, trace.changed or [False] * n, trace.hit or [False] * n, row.branches)
    gate = None
    if row.push:  # a gate the gateway can evaluate: this toy f decides sigma exactly (see _TraceModel.draft)
        gate = m.GateUpload(np.array([[0, 0, 0, 0], [1, 0, 0, 0]], "<f4").tobytes(), np.zeros(2, "<f4").tobytes(), 0.5)
    hello = m.Hello("", m.Plugin(_BACKBONE.fingerprint, _TAPS, "h"), "p",
                    m.Options(window=row.window, codec="f32", max_new_tokens=n, settle=row.settle), gate=gate)
    proto = GatewayProtocol(_BACKBONE, eos_ids=[0], branches=row.branches, predict_gate=_toy_gate, settle=row.settle,
                            pieces=[b"t"] * 4)
    model.proto = proto
    gateway = GatewayHost(proto, model, defer_heads=True)
    device_busy = [0.0]  # the device's compute time of the current delivery

    def gate_of(pos, f, margin):
        device_busy[0] += costs.gate_ms
        return sigma[pos - _FIRST]

    def side_of(pos, taps, projected):
        device_busy[0] += costs.side_ms
        return np.zeros((1, _H), np.float32)

    def head_of(pos, f, s):  # the device's proof: the trace's token (the proof holds: float32 head)
        device_busy[0] += costs.device_head_ms
        return (_CHANGED if model.changed[pos - _FIRST] else _DRAFT), b"t"

    device = DeviceHost(DeviceProtocol(hello, row.in_flight), gate_of, side_of, head_of)
    down, up = _Link(costs.rtt_ms / 2, costs.down_mbit), _Link(costs.rtt_ms / 2, costs.up_mbit)
    events: list = []
    order = itertools.count()
    scheduled = [0]  # jobs at the front of gateway.jobs that have their completion event
    compute_free = [0.0]  # the gateway's compute thread
    device_free = 0.0
    commits: list[float] = []

    def at(t, kind, payload=None):
        heapq.heappush(events, (t, next(order), kind, payload))

    def gateway_moved(now):
        """Schedule the completion of the jobs the gateway just started (a round of drafts runs
        as one batched forward; a head after it), and send what it queued."""
        new = list(gateway.jobs)[scheduled[0]:]
        round_ = [j for j in new if isinstance(j, Draft)]
        if round_:
            steps = sum(d.feed is not None for d in round_)
            cost = costs.head if not steps else costs.step_ms * (1 + costs.branch_row_cost * (steps - 1))
            compute_free[0] = max(now, compute_free[0]) + cost
            for _ in round_:
                at(compute_free[0], "done")
        if any(isinstance(j, Head) for j in new):
            compute_free[0] = max(now, compute_free[0]) + costs.head
            at(compute_free[0], "done")
        scheduled[0] += len(new)
        for msg in gateway.send():
            at(down.arrival(now, _size(msg, costs)), "to_device", msg)

    gateway.receive(hello.to_dict())
    gateway_moved(0.0)
    while events and not device.proto.ended:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "done":
            scheduled[0] -= 1
            gateway.finish()
            gateway_moved(now)
        elif kind == "to_device":
            device_busy[0] = 0.0
            device.receive(payload)
            t = max(now, device_free) + device_busy[0]
            commits += [t] * (len(device.proto.committed) - len(commits))
            device_free = t
            if not any(k == "to_device" and tt <= t for tt, _, k, _ in events):  # nothing else waiting: send
                for msg in device.send():
                    at(up.arrival(t, _size(msg, costs)), "to_gateway", msg)
        elif kind == "to_gateway":
            gateway.receive(payload)
            gateway_moved(now)
    if not device.proto.ended:
        raise RuntimeError(f"the model stalled in row {row.name}")
    span = commits[-1] - commits[0] if len(commits) > 1 else 0.0
    return {"row": row.name, "tokens": len(commits), "commit_ms": commits,
            "tokens_per_s": (len(commits) - 1) / span * 1000 if span > 0 else None,
            "rollbacks": device.proto.stats.rollbacks, "max_in_flight": device.proto.stats.max_in_flight,
            "branch_hits": proto.stats.branch_hits, "branch_misses": proto.stats.branch_misses,
            "settled": proto.stats.settled, "heads": proto.stats.heads,
            "branch_adopted": device.proto.stats.branch_adopted}


def _toy_gate(f, weight, bias, margin) -> float:
    """p_t of the toy gate of a pushed-taps row: channel 0 of f decides (the host's gate_probability
    would too; this keeps the model free of torch)."""
    return 1.0 if float(f[0, 0]) > 0 else 0.0


def predict(traces, costs: Costs, rows=ROWS) -> dict:
    """tokens/s of every row and of cloud-only (one step per token), with ratios to cloud-only;
    `traces`: one Trace or one per document."""
    cloud = 1000.0 / costs.step_ms
    out = {"cloud_only": {"tokens_per_s": cloud, "vs_cloud_only": 1.0}}
    for row in rows:
        r = rate(traces, row, costs)
        out[row.name] = {"tokens_per_s": r, "vs_cloud_only": (r or 0) / cloud}
    return out


# --- against `spa bench link` results -------------------------------------------------------

# Every measured SPA row the model replays, with the modelled row that stands for it; `spa bench link`
# may pick any of them as the best row, so each must be here. PROJECTED rows had the cloud-side
# projection: their taps are r values per tap, not the hidden size.
MEASURED = {"side_every_token": "side_every_token", "spa_lockstep": "spa_lockstep", "spa_draft": "spa_draft",
            "spa_draft_proj": "spa_draft", "spa_draft_push": "spa_draft_push", "spa_inflight": "spa_inflight",
            "spa_inflight_push": "spa_inflight_push", "spa_branches": "spa_branches", "spa_settle": "spa_settle",
            "spa_settle_branches": "spa_settle_branches"}
PROJECTED = ("spa_draft_proj", "spa_draft_push", "spa_settle", "spa_settle_branches")
GPU_STEPS_MS = (10.0, 20.0, 40.0)  # a GPU-class gateway, and slower ones: how the result depends on it
# Branch drafting's inputs, from the issue-13 runs: the side's token was among the backbone's two
# runners-up for about one change in four (BRANCH_HIT_RATE), and a branch row in a batched decode
# step costs about a quarter of a step on this CPU (branches at 0.66x against in-flight's 0.77x on
# 4g); on a memory-bound GPU step a few percent.
BRANCH_HIT_RATE = 0.25
CPU_BRANCH_ROW_COST, GPU_BRANCH_ROW_COST = 0.25, 0.05


def costs_from_result(result: dict, step_ms: float | None = None, projected: bool = False,
                      branch_row_cost: float = CPU_BRANCH_ROW_COST) -> Costs:
    """The link and gateway of a `spa bench link` result (step time: 1 / cloud-only tokens/s)."""
    measured = result["link"].get("measured") or {}
    rows = result["rows"]
    step = step_ms or 1000.0 / rows["cloud_only"]["tokens_per_s"]
    taps_bytes = int(result["plugin_info"]["taps"] * (result["plugin_info"]["rank"] if projected else 576) * 1.05)
    return Costs(rtt_ms=measured.get("rtt_ms", 0.1), step_ms=step, down_mbit=measured.get("down_mbit"),
                 up_mbit=measured.get("up_mbit"), taps_bytes=taps_bytes, branch_row_cost=branch_row_cost)


def traced_row(result: dict) -> dict | None:
    """The SPA row whose traces the model replays (every SPA row commits the same tokens): the first
    that recorded traces, else the first with a side usage (older results); None without one."""
    spa = [r for name, r in result["rows"].items() if name.startswith("spa_") and "error" not in r]
    return next((r for r in spa if r.get("traces")), next((r for r in spa if "side_usage" in r), None))


def traces_from_result(result: dict, hit_rate: float = BRANCH_HIT_RATE) -> list[Trace]:
    """The run's per-token traces, one per document (sigma and changed of an SPA row, `traced_row`);
    a result saved before traces were recorded gives its measured side usage and change rate spread
    over one document of max_new_tokens. Branch hits are a share `hit_rate` of the changes, spread
    evenly over the run's changes."""
    draft = traced_row(result)
    if not draft.get("traces"):
        tokens = max(result["max_new_tokens"], 8)
        return [Trace.synthetic(tokens, draft["side_usage"], draft["change_rate"], hit_rate)]
    sigmas = [[c == "1" for c in t["sigma"]] for t in draft["traces"]]
    changes = [(d, i) for d, t in enumerate(draft["traces"]) for i, c in enumerate(t["changed"]) if c == "1"]
    hits = set(_every(changes, hit_rate))
    return [Trace(sigma, [(d, i) in changes for i in range(len(sigma))], [(d, i) in hits for i in range(len(sigma))])
            for d, sigma in enumerate(sigmas) if sigma]


# Where a row's speed goes. `explain` removes these causes one after the other, in this order,
# each on top of the ones before it, and charges each with the ratio it gave back.
LOSSES = (
    ("rollbacks", "changed verdicts: the drafts after them are void; the device waits for the verdict's "
                  "round trip and the redraft"),
    ("verdict heads", "the gateway's lm_head of f_t + s_t, one per side token, on its compute thread"),
    ("link bandwidth", "steps, taps and side outputs serialized at the link's rate"),
    ("round-trip stalls", "the window W and the side outputs in flight do not cover the round trip; the "
                          "pipeline fills and drains once per document"),
)


def explain(traces: list[Trace], row: Row, costs: Costs) -> dict:
    """The row's predicted share of cloud-only speed, and the share lost to each of LOSSES (they
    add up to 1 - predicted): the row is simulated again without changed verdicts, then also with
    free verdict heads, then also with an unlimited link; what is left below 1 is the round trip
    itself (with RTT 0 as well the row runs at cloud-only speed)."""
    cloud = 1000.0 / costs.step_ms

    def ratio(t: list[Trace], c: Costs) -> float:
        return (rate(t, row, c) or 0.0) / cloud

    steady = [Trace(t.sigma) for t in traces]  # the same side tokens, none changing its draft
    free_heads = replace(costs, head_ms=0.0)
    free_link = replace(free_heads, down_mbit=None, up_mbit=None)
    chain = [ratio(traces, costs), ratio(steady, costs), ratio(steady, free_heads), ratio(steady, free_link), 1.0]
    return {"row": row.name, "predicted": chain[0], "step_ms": costs.step_ms, "rtt_ms": costs.rtt_ms,
            "settle": row.settle,
            "side_tokens": sum(sum(t.sigma) for t in traces), "changes": sum(sum(t.changed) for t in traces),
            "tokens": sum(len(t.sigma) for t in traces), "documents": len(traces),
            "head_ms": costs.head, "lost": {name: chain[i + 1] - chain[i] for i, (name, _) in enumerate(LOSSES)}}


def model_row(result: dict, name: str) -> Row:
    """The modelled row for a `spa bench link` row (named as measured), with that run's window,
    in-flight limit and branches."""
    row = next(r for r in ROWS if r.name == MEASURED.get(name, name))
    in_flight = result.get("in_flight", row.in_flight) if row.in_flight > 1 else 1
    return Row(name, result["window"] if row.window else 0, in_flight, row.push, row.always_side,
               result.get("branches", row.branches) if row.branches else 0, row.settle)


def explain_result(result: dict, name: str, step_ms: float | None = None) -> dict:
    """`explain` for one row of a `spa bench link` result: on its measured link and gateway speed, or
    at `step_ms` per decode step (a GPU-class gateway, branch rows at GPU cost); with the measured
    ratio beside the prediction where the row ran at the measured speed."""
    cost = GPU_BRANCH_ROW_COST if step_ms else CPU_BRANCH_ROW_COST
    costs = costs_from_result(result, step_ms=step_ms, projected=name in PROJECTED, branch_row_cost=cost)
    out = explain(traces_from_result(result), model_row(result, name), costs)
    out["traced"] = bool(traced_row(result).get("traces"))  # else: its rates, spread evenly
    if step_ms is None:
        out["measured"] = result["rows"].get(name, {}).get("tokens_per_s_vs_cloud_only")
    return out


def format_why(why: dict) -> str:
    """One line: the prediction (and measurement), then what each cause costs, largest first."""
    head = f"{why['row']} predicted {why['predicted']:.2f}x"
    if "traced" in why:
        head += (f" (replaying the run's {why['documents']} documents)" if why["traced"]
                 else " (the run's side usage and change rate spread over one document: it saved no traces)")
    if why.get("measured") is not None:
        head += f", measured {why['measured']:.2f}x"
    rollback = (f"{why['changes']} changed tokens in {why['tokens']} tokens, settled on the device; each still "
                f"waits about an RTT of {why['rtt_ms']:.0f} ms: for the redraft where no streamed branch line has "
                f"the token, and on a branch hit for the taps of the adopted line's side positions (streamed "
                f"branch steps carry none)") if why.get("settle") else \
        (f"{why['changes']} changed verdicts in {why['tokens']} tokens, each about an RTT of "
         f"{why['rtt_ms']:.0f} ms and a redraft")
    detail = {"rollbacks": rollback,
              "verdict heads": f"{why['side_tokens']} side tokens, a {why['head_ms']:.1f} ms head each "
                               f"against a {why['step_ms']:.1f} ms step",
              "link bandwidth": "", "round-trip stalls": ""}
    parts = [f"{name} {max(lost, 0.0):.2f}" + (f" ({detail[name]})" if detail[name] and lost >= 0.005 else "")
             for name, lost in sorted(why["lost"].items(), key=lambda kv: -kv[1])]
    return f"{head}; lost to " + ", ".join(parts)


def compare(result: dict) -> dict:
    """Predicted vs measured tokens/s (as ratios to the measured cloud-only row) for one link profile."""
    traces = traces_from_result(result)
    out = {"profile": result["profile"]["name"], "rtt_ms": costs_from_result(result).rtt_ms, "rows": {}}
    cloud = result["rows"]["cloud_only"]["tokens_per_s"]
    for name in MEASURED:
        measured = result["rows"].get(name, {}).get("tokens_per_s")
        row = model_row(result, name)
        costs = costs_from_result(result, projected=name in PROJECTED)
        predicted = rate(traces, row, costs)
        out["rows"][name] = {"measured_vs_cloud": measured / cloud if measured else None,
                             "predicted_vs_cloud": predicted / cloud if predicted else None}
    return out


def gpu_predictions(result: dict, steps_ms=GPU_STEPS_MS) -> dict:
    """Every modelled row at faster (GPU-class) step times over this result's link."""
    traces, out = traces_from_result(result), {}
    for step in steps_ms:
        row = {}
        for r in ROWS:
            c = costs_from_result(result, step_ms=step, projected=r.name in PROJECTED,
                                  branch_row_cost=GPU_BRANCH_ROW_COST)
            row[r.name] = round((rate(traces, model_row(result, r.name), c) or 0.0) * step / 1000, 3)
        out[f"{step:g} ms/step"] = row
    return out


# The speed goals of issue 13: the best SPA row's share of cloud-only, measured by `spa bench link`
# on a link profile, and predicted for a GPU-class gateway.
MEASURED_GOALS = {"4g": 0.95, "3g": 0.85}
GPU_GOALS = (("4g", 10.0, 0.85), ("3g", 10.0, 0.60))  # profile, ms per decode step, share of cloud-only


def gpu_goals(results: list[dict]) -> list[dict]:
    """The predicted goals (GPU_GOALS): the best modelled SPA row at that step time on that link's
    result, with why it falls short of cloud-only; a goal without that link's result is left out."""
    out = []
    for profile, step, target in GPU_GOALS:
        result = next((r for r in results if r["profile"]["name"] == profile), None)
        if result is None:
            continue
        whys = [explain_result(result, r.name, step) for r in ROWS if r.name != "side_every_token"]
        best = max(whys, key=lambda w: w["predicted"])
        out.append({"goal": f"predicted for a {step:g} ms/step gateway on {profile}: best SPA row >= "
                            f"{target:g}x cloud-only", "value": best["predicted"], "target": target,
                    "met": best["predicted"] >= target, "missed_by": max(target - best["predicted"], 0.0),
                    "why": best})
    return out


def format_model(results: list[dict]) -> str:
    lines = ["Trace-driven model (benchmarks/tracemodel.py): the real protocol machines on a virtual clock.",
             "Predicted vs measured, tokens/s as a share of cloud-only (the model is trusted only where they agree):",
             f"{'profile':8} {'RTT ms':>7}  " + "  ".join(f"{n:>22}" for n in MEASURED)]
    for result in results:
        c = compare(result)
        cells = []
        for name in MEASURED:
            r = c["rows"][name]
            cells.append(f"{_pct(r['predicted_vs_cloud'])} pred / {_pct(r['measured_vs_cloud'])} meas".rjust(22))
        lines.append(f"{c['profile']:8} {c['rtt_ms']:7.1f}  " + "  ".join(cells))
    lines.append("")
    lines.append("Predicted for a GPU-class gateway (share of cloud-only at that step time):")
    names = ["spa_draft", "spa_draft_push", "spa_inflight", "spa_inflight_push", "spa_branches", "spa_settle",
             "spa_settle_branches"]
    lines.append(f"{'profile':8} {'step':>10}  " + "  ".join(f"{n:>19}" for n in names))
    for result in results:
        for step, row in gpu_predictions(result).items():
            lines.append(f"{result['profile']['name']:8} {step:>10}  " + "  ".join(f"{_pct(row[n]):>19}" for n in names))
    lines.append(f"spa_branches: K = 2 with a branch hit for {BRANCH_HIT_RATE:.0%} of the changes, a branch row "
                 f"costing {CPU_BRANCH_ROW_COST:.0%} of a step on this CPU, {GPU_BRANCH_ROW_COST:.0%} on a GPU. "
                 f"A hit saves the redraft, not the round trip: the device still waits for the verdict.")
    lines.append("spa_settle(_branches): the device proves every side token (as measured on float32 gateways) at "
                 "a device head cost each; a changed token continues at once where a streamed branch line has it "
                 "(the hits above), else it waits for the gateway's redraft.")
    lines += ["", "Goals, and why they are missed (each row's losses by sequential ablation in the model: "
                  + ", then ".join(name for name, _ in LOSSES) + "; they add up to 1 - predicted):"]
    for result in results:
        target = MEASURED_GOALS.get(result["profile"]["name"])
        best = max((n for n in MEASURED if n != "side_every_token"
                    and result["rows"].get(n, {}).get("tokens_per_s_vs_cloud_only") is not None),
                   key=lambda n: result["rows"][n]["tokens_per_s_vs_cloud_only"], default=None)
        if target is None or best is None:
            continue
        why = explain_result(result, best)
        state = "met" if why["measured"] >= target else f"MISSED by {target - why['measured']:.2f}"
        lines.append(f"  measured on {result['profile']['name']} (this CPU): best SPA row >= {target:g}x cloud-only: "
                     f"{why['measured']:.2f} -> {state}")
        lines.append(f"    why: {format_why(why)}")
    for goal in gpu_goals(results):
        state = "met" if goal["met"] else f"MISSED by {goal['missed_by']:.2f}"
        lines.append(f"  {goal['goal']}: {goal['value']:.2f} -> {state}")
        lines.append(f"    why: {format_why(goal['why'])}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "  -  " if x is None else f"{x:.2f}x"
