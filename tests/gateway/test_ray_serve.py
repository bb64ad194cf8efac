"""`spa serve` on loopback: two Ray Serve replicas behind one WebSocket endpoint.

One local Ray cluster for the module (`ServeProcess`: stopped, and whatever of
the cluster is left killed, when the module ends, also on failure). 16
concurrent short sessions spread over both replicas and commit their solo
reference tokens (on prompts whose every choice has margin: rows batched
with other sessions' rows round differently, docs/DESIGN.md §2), split
evenly by the proxy's fewest-connections router; then one
replica's process is killed mid-generation and its devices resume on the
other one, which rebuilds their sessions: no token lost or repeated, and the
sessions already on the surviving replica never notice.
"""

import asyncio
import os
import signal
import time

import pytest

pytest.importorskip("ray.serve")

from benchmarks.load import QUESTIONS, chat_prompt  # noqa: E402
from cloud_gateway.process import ServeProcess, ray_temp_dir, replica_stats  # noqa: E402
from device_runtime.client import run_session  # noqa: E402
from spa.protocol import messages as m  # noqa: E402
from spa.model.pte_plugin import PtePlugin  # noqa: E402
from spa.model.reference import reference_generate  # noqa: E402

SESSIONS = 16
MAX_NEW = 8


@pytest.fixture(scope="module")
def pte(pte_path):
    return PtePlugin(pte_path)


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    secret = tmp_path_factory.mktemp("serve") / "resume.secret"
    secret.write_text(os.urandom(32).hex())
    sp = ServeProcess("--replicas", "2", "--replica-cpus", "0.5", "--max-sessions", "16", "--resume-grace", "90",
                      "--resume-secret-file", str(secret))
    try:
        yield sp
    finally:
        sp.stop()
        assert not _ray_processes(ray_temp_dir(sp.pid)), "Ray processes left behind"


def _ray_processes(temp_dir: str) -> list[int]:
    """Processes that name the cluster's directory or hold a file under it."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                named = temp_dir.encode() in f.read()
            fds = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        if named or any(path.startswith(temp_dir + "/") for path in fds):
            found.append(int(entry))
    return found


def _replica_processes(temp_dir: str) -> list[int]:
    """The pids of the deployment's replica processes in this cluster (Ray names them ray::ServeReplica:...)."""
    return [pid for pid in _ray_processes(temp_dir)
            if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::ServeReplica:spa:")]


def _with_margin(backbone, pte, prompts, max_new):
    """The solo reference of each prompt; None where some choice lacks margin (batching may flip it)."""
    refs = []
    for prompt in prompts:
        ref = reference_generate(backbone, pte, prompt, tau=pte.tau, max_new_tokens=max_new)
        margin = min(ref.logit_gap) > 1e-3 and min(abs(p - pte.tau) for p in ref.gate_p) > 1e-3
        refs.append((ref, margin))
    return refs


def test_sixteen_sessions_spread_over_two_replicas_commit_their_solo_tokens(serving, backbone, pte):
    prompts = [chat_prompt(QUESTIONS[i]) for i in range(SESSIONS)]
    refs = _with_margin(backbone, pte, prompts, MAX_NEW)

    async def main():
        return await asyncio.gather(*[run_session(serving.url, pte, p, m.Options(window=2, max_new_tokens=MAX_NEW))
                                      for p in prompts])

    results = asyncio.run(main())
    checked = 0
    for result, (ref, margin) in zip(results, refs):
        assert len(result.tokens) == len(ref.tokens) or not margin
        if margin:
            assert result.tokens == ref.tokens and result.sigmas == ref.sigmas
            checked += 1
    assert checked >= SESSIONS // 2, f"only {checked} prompts with margin"
    replicas = replica_stats(serving.url, 2, fresh_after=time.time())
    assert len(replicas) == 2, replicas
    # The proxy hands each connection to the replica with the fewest open ones (cloud_gateway/routing.py):
    # a burst splits evenly (Ray's default router sent it 12/4, and once 16/0).
    split = sorted((r["sessions"] for r in replicas.values()), reverse=True)
    assert sum(split) >= SESSIONS and split[0] - split[1] <= 2, split


def test_a_killed_replicas_devices_resume_on_the_other_with_no_token_lost(serving, backbone, pte):
    n, max_new = 6, 20
    prompts = [chat_prompt(QUESTIONS[SESSIONS + i]) for i in range(n)]
    refs = _with_margin(backbone, pte, prompts, max_new)
    before = replica_stats(serving.url, 2)
    pids = _replica_processes(ray_temp_dir(serving.pid))
    assert len(before) == 2 and sorted(before) == sorted(pids), (before, pids)
    assert not any(r["connections"] for r in before.values())

    async def main():
        started = [asyncio.Event() for _ in prompts]
        tasks = []
        for p, e in zip(prompts, started):  # staggered: each one under way before the next connects
            tasks.append(asyncio.create_task(run_session(
                serving.url, pte, p, m.Options(window=0, max_new_tokens=max_new),
                on_commit=lambda piece, sigma, e=e: e.set())))
            await e.wait()
        # /stats reports every replica: the victim is the one holding the most of these sessions.
        loop = asyncio.get_running_loop()
        now = await loop.run_in_executor(None, lambda: replica_stats(serving.url, 2, fresh_after=time.time()))
        victim = max(pids, key=lambda pid: now[pid]["connections"])
        on_victim = now[victim]["connections"]  # each device under way holds one connection
        assert on_victim > 0 and sum(r["connections"] for r in now.values()) == n, now
        os.kill(victim, signal.SIGKILL)  # mid-generation: its devices see their connections drop
        t0 = time.perf_counter()
        results = await asyncio.gather(*tasks)
        return results, victim, on_victim, time.perf_counter() - t0

    results, victim, on_victim, seconds = asyncio.run(main())
    resumed = [r for r in results if r.stats["resumes"] > 0]
    assert len(resumed) == on_victim  # its devices resumed; the others never noticed
    for result, (ref, margin) in zip(results, refs):
        if margin:  # 0 tokens lost or repeated: exactly the uninterrupted run
            assert result.tokens == ref.tokens and result.sigmas == ref.sigmas
        else:
            assert len(result.tokens) == len(ref.tokens)
    # The resumed ones were rebuilt on the surviving replica (or on the one Ray started in the victim's place).
    survivor = next(pid for pid in before if pid != victim)
    after = replica_stats(serving.url, 2, pid=survivor)
    assert sum(r["rebuilds"] for pid, r in after.items() if pid != victim) >= len(resumed)
    assert all(r.stats["gateway"]["rebuilt_tokens"] >= 1 for r in resumed)
