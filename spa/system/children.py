"""Child processes that run this project's modules (`python -m ...`): one launcher for all of them.

The gateway launcher (`cloud_gateway.process.GatewayProcess`) and the
benchmarks' servers, workers, delay programs and `spa train/export` runs all
start here, so they share three rules:

* a child runs in the project root with the project on PYTHONPATH, so it
  imports this checkout whatever the caller's working directory is;
* every `Path` argument is made absolute before the child starts: a relative
  path means the caller's working directory, which is not the child's
  (`spa bench link` run outside the repository once trained its plugin in one
  directory and looked for it in another);
* a spawned child gets its own process group: a terminal's Ctrl-C reaches only
  the parent, which stops its children in order, and `stop` ends what a child
  runs under it too (`ip netns exec`, `taskset`).
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from spa.errors import SpaError

ROOT = Path(__file__).resolve().parents[2]  # the project root (spa/system/children.py is two folders down): children run here


def python_env(**extra: str) -> dict:
    """This process's environment with the project on PYTHONPATH, plus `extra`."""
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def argument(arg) -> str:
    """A command-line argument for a child: a `Path` made absolute (the child's working directory is ROOT)."""
    return str(arg.absolute()) if isinstance(arg, Path) else str(arg)


def python_command(module: str, *args) -> list[str]:
    """`python -m module args...` with this interpreter; `Path` arguments are made absolute."""
    return [sys.executable, "-m", module, *map(argument, args)]


def pinned(cpu) -> list[str]:
    """A command prefix that pins the child to one CPU (`taskset`), or none for `cpu=None`."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a child in ROOT to its end, its output captured as text."""
    return subprocess.run(cmd, cwd=ROOT, env=env or python_env(), capture_output=True, text=True, timeout=timeout)


def spawn(cmd: list[str], env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start a child in ROOT, in its own process group."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env or python_env(), start_new_session=True, **popen_kwargs)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a spawned child's process group; kill it if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()


class ServerProcess:
    """A server child that prints a banner naming its `ws://` or `wss://` URL; `url` is known once it has.

    Its output is kept in `output` for failure reports. Use as a context
    manager, or call `stop()`: the child is always stopped.
    """

    def __init__(self, cmd: list[str], what: str, env: dict | None = None, start_timeout: float = 300.0):
        self.what = what
        self.proc = spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.url = None
        timer = threading.Timer(start_timeout, self.stop)
        timer.start()
        try:
            for line in self.proc.stdout:  # the banner names the port it bound
                self.output.append(line)
                for scheme in ("ws", "wss"):
                    if f" on {scheme}://" in line:
                        self.url = f"{scheme}://" + line.split(f" on {scheme}://")[1].split()[0]
                if self.url:
                    break
        except BaseException:  # Ctrl-C while it starts: do not leave it behind
            self.stop()
            raise
        finally:
            timer.cancel()
        if self.url is None:
            self.stop()
            raise SpaError(f"{what} did not start:\n" + "".join(self.output[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> None:
        stop(self.proc, timeout=10.0)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
