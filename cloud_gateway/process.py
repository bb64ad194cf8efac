"""Run a gateway on loopback for the demo, tests and benchmarks: `spa gateway` as a
child process (`GatewayProcess`), or a `Gateway` in a background thread of this
process (`ThreadedGateway`, whose sessions and counters a test can inspect)."""

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

from spa.errors import SpaError

_ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """A real gateway subprocess; `url` is known once its banner is printed.

    Its output is kept in `output` for failure reports. Use as a context
    manager, or call `stop()`: the child is always terminated.
    """

    def __init__(self, *extra_args: str, port: int = 0, start_timeout: float = 300.0, taskset: str | None = None):
        env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "spa.cli", "gateway", "--port", str(port), *extra_args]
        if taskset:
            cmd = ["taskset", "-c", taskset, *cmd]
        self.proc = subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.output: list[str] = []
        self.url = None
        timer = threading.Timer(start_timeout, self.proc.kill)
        timer.start()
        try:
            for line in self.proc.stdout:  # the banner names the port it bound
                self.output.append(line)
                for scheme in ("ws", "wss"):
                    if f" on {scheme}://" in line:
                        self.url = f"{scheme}://" + line.split(f" on {scheme}://")[1].split()[0]
                if self.url:
                    break
        finally:
            timer.cancel()
        if self.url is None:
            self.stop()
            raise SpaError("the gateway did not start:\n" + "".join(self.output[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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
