"""Run `spa gateway` as a child process on loopback (demo, tests, benchmarks)."""

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
                if " on ws://" in line:
                    self.url = "ws://" + line.split(" on ws://")[1].split()[0]
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
