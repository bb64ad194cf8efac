"""Run a gateway for the demo, tests and benchmarks: `spa gateway` as a child
process (`GatewayProcess`), or a `Gateway` in a background thread of this
process (`ThreadedGateway`, whose sessions and counters a test can inspect)."""

import asyncio
import threading

from spa.system.children import ServerProcess, python_command, python_env
from spa.errors import SpaError


class GatewayProcess(ServerProcess):
    """`spa gateway` as a real child process (`spa.system.children`); `url` is known once its banner is printed.

    `prefix` runs it under another command (`taskset`, `ip netns exec`); `env`
    adds variables to its environment. The one launcher of a gateway
    subprocess: the demo, the tests and the benchmarks all start it here.
    """

    def __init__(self, *extra_args: str, port: int = 0, prefix: list[str] = (), env: dict | None = None,
                 start_timeout: float = 300.0):
        cmd = [*prefix, *python_command("cli.main", "gateway", "--port", port, *extra_args)]
        super().__init__(cmd, "spa gateway", env=python_env(**(env or {})), start_timeout=start_timeout)


class ServeProcess(ServerProcess):
    """`spa serve` (Ray Serve, N gateway replicas) as a child process; `url` is known once every
    replica is up. `stop` ends it with SIGTERM (it deletes the application and stops the local Ray
    cluster it started), then kills whatever of that cluster is left: Ray's processes are found by
    the cluster's own temporary directory (`ray_temp_dir(pid)`), also after a failure."""

    def __init__(self, *extra_args: str, port: int = 0, env: dict | None = None, start_timeout: float = 600.0):
        cmd = python_command("cli.main", "serve", "--port", port or _free_port(), *extra_args)
        super().__init__(cmd, "spa serve", env=python_env(**(env or {})), start_timeout=start_timeout)

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        from spa.system.children import stop

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the driver shuts Serve and its Ray cluster down
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        stop(self.proc, timeout=10.0)
        kill_ray_cluster(ray_temp_dir(self.proc.pid))


def replica_stats(url: str, want: int, pid: int | None = None, fresh_after: float = 0.0,
                  timeout_s: float = 60.0) -> dict[int, dict]:
    """pid -> counters of each live `spa serve` replica, from one GET /stats (any replica answers for
    all of them). Asked again until `want` replicas (and the one with `pid`, if given) have posted
    counters after the unix time `fresh_after`, or `timeout_s` passed."""
    import json
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(url.replace("ws://", "http://") + "/stats", timeout=30) as r:
            answer = json.load(r)
        seen = {int(p): row for p, row in answer["replicas"].items() if row["posted"] >= fresh_after}
        if (len(seen) >= want and (pid is None or pid in seen)) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def ray_temp_dir(pid: int) -> str:
    """The temporary directory of the local Ray cluster that `spa serve` with this pid starts (short:
    Ray puts Unix sockets under it)."""
    return f"/tmp/spa-ray-{pid}"


def kill_ray_cluster(temp_dir: str, rounds: int = 20) -> list[int]:
    """SIGKILL every process whose command line names `temp_dir`, or that holds a file under it (a
    local Ray cluster's raylet, GCS, agents, workers, replicas); their pids. Scans again until a scan
    finds none (at most `rounds` times): a dying raylet may still have started a worker after the
    first scan, which happens on a loaded machine."""
    import os
    import shutil
    import signal
    import time
    from pathlib import Path

    killed = []
    for _ in range(rounds):
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if temp_dir.encode() in cmdline or _has_open_file_under(proc, temp_dir):  # agents rename themselves
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                    found.append(int(proc.name))
                except OSError:
                    pass
        if not found:
            break
        killed += [pid for pid in found if pid not in killed]
        time.sleep(0.2)  # let the killed ones go (a killed process keeps its /proc entry until reaped)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return killed


def _has_open_file_under(proc, temp_dir: str) -> bool:
    import os

    try:
        return any(os.readlink(fd).startswith(temp_dir + "/") for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedGateway:
    """A `cloud_gateway.server.Gateway` serving on 127.0.0.1 from its own event
    loop in a daemon thread. `gateway` is the live object (read its sessions
    and stats; they change under you); `call(fn)` runs fn on the gateway's loop."""

    def __init__(self, backbone, limits=None, ssl_context=None, **gateway_kwargs):
        from cloud_gateway.server import Gateway
        from spa.protocol.limits import Limits

        self.gateway = Gateway(backbone, limits or Limits(), **gateway_kwargs)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._error: BaseException | None = None
        self.port = None
        self._ssl = ssl_context
        self.thread = threading.Thread(target=self._main, daemon=True, name="spa-test-gateway")
        self.thread.start()
        self._ready.wait(60)
        if self._error is not None or self.port is None:
            raise SpaError(f"the in-process gateway did not start: {self._error}")
        self.url = f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by __init__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = self.loop.create_future()
        async with self.gateway.serve("127.0.0.1", 0, self._ssl) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def call(self, fn, timeout: float = 30.0):
        """fn() on the gateway's event loop (thread-safe access to its state)."""
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def wait_until(self, predicate, timeout: float = 30.0) -> bool:
        """Poll predicate(gateway) on the gateway's loop until true or timeout."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(lambda: predicate(self.gateway)):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
            self.thread.join(30)
        self.gateway.close()

    def __enter__(self) -> "ThreadedGateway":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
