"""Emulated mobile links between the "device" and the "gateway" for `spa bench link`.

The kernel here has no netem, so (docs: ../shared ENVIRONMENT, "Emulating mobile links"):

* **netns** (as root): two network namespaces joined by a veth pair,
  gateway side 10.199.<n>.1, device side 10.199.<n>.2. Rate: `tc qdisc tbf`
  on each veth's egress (gateway egress = downlink, device egress = uplink).
  Delay: half the RTT in each namespace, on ingress (mangle PREROUTING ->
  NFQUEUE), from `benchmarks.nfq_delay`, a userspace program that holds each
  packet until its release time (delay on egress collapses TCP throughput).
  Loss (optional): `iptables -m statistic` before the queue. Everything lives
  inside the two namespaces, so deleting them removes the veth pair, the
  qdiscs and the iptables rules at once; nothing is changed in the host's own
  namespace.
* **proxy** (no root, or no netfilterqueue): `benchmarks.delay_proxy`, a TCP
  proxy on loopback that serializes each direction at the profile's rate and
  delivers it half an RTT later.
* **none**: the `loopback` profile, plain 127.0.0.1.

Profiles (typical figures, one direction's delay is half the RTT):

| profile  | RTT    | down      | up        | source of the figures |
|----------|--------|-----------|-----------|------------------------|
| loopback | 0      | -         | -         | no emulation |
| 5g       | 20 ms  | 100 Mbit/s| 50 Mbit/s | 5G NSA medians reported by network-measurement firms (Ookla/Opensignal 2023-24: 20-30 ms, 100-200 Mbit/s down) |
| 4g       | 50 ms  | 20 Mbit/s | 20 Mbit/s | the issue's 4G profile (LTE medians: ~50 ms, 15-30 Mbit/s) |
| 3g       | 150 ms | 2 Mbit/s  | 1 Mbit/s  | HSPA: 100-200 ms, 1-4 Mbit/s (3GPP/Opensignal figures) |

Tear-down always runs (context managers; `spa bench link` also turns SIGINT
and SIGTERM into exceptions). Names carry the creating process id
(`spabench-<pid>-g`), and `cleanup_stale()` removes what a killed run left.
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spa.system.children import python_command, run, spawn, stop
from spa.errors import SpaError

NS_PREFIX = "spabench-"
VETH_PREFIX = "spb"


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rtt_ms: float
    down_mbit: float | None  # None: unlimited
    up_mbit: float | None
    loss_pct: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES = {
    "loopback": LinkProfile("loopback", 0.0, None, None),
    "5g": LinkProfile("5g", 20.0, 100.0, 50.0),
    "4g": LinkProfile("4g", 50.0, 20.0, 20.0),
    "3g": LinkProfile("3g", 150.0, 2.0, 1.0),
}


def run_command(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a system command (ip, tc, iptables) to its end; SpaError naming it if it fails and `check`."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SpaError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def our_namespaces() -> list[str]:
    """Namespaces made by `spa bench link` (any process), as `ip netns list` names them."""
    if shutil.which("ip") is None:
        return []
    out = run_command("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NS_PREFIX)]


def cleanup_stale() -> list[str]:
    """Delete namespaces whose creating process is gone (a run killed with SIGKILL); returns their names."""
    removed = []
    for name in our_namespaces():
        match = re.match(rf"{NS_PREFIX}(\d+)-", name)
        if match and not _alive(int(match.group(1))):
            _kill_ns_processes(name)
            run_command("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_ns_processes(ns: str) -> None:
    pids = run_command("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def netns_available() -> tuple[bool, str]:
    """(usable, why not): root, ip/tc/iptables, and the netfilterqueue module."""
    if os.geteuid() != 0:
        return False, "not root"
    missing = [t for t in ("ip", "tc", "iptables") if shutil.which(t) is None]
    if missing:
        return False, f"missing {', '.join(missing)} (Debian: iproute2, iptables)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        return False, "python module netfilterqueue missing (Debian libnetfilter-queue-dev, pip netfilterqueue)"
    return True, ""


class Link:
    """Where the gateway side and the device side run, and how to reach the gateway."""

    mode = "none"

    def __init__(self, profile: LinkProfile):
        self.profile = profile
        self.gateway_host = "127.0.0.1"  # where servers listen
        self._children: list[subprocess.Popen] = []

    # command prefixes for processes on each side (namespaces, if any)
    def gateway_prefix(self) -> list[str]:
        return []

    def device_prefix(self) -> list[str]:
        return []

    def device_url(self, host: str, port: int) -> str:
        """The URL the device uses to reach a server listening on (host, port) on the gateway side."""
        return f"ws://{host}:{port}"

    def device_host_port(self, port: int) -> tuple[str, int]:
        return self.gateway_host, port

    def counters(self) -> dict | None:
        """Bytes that crossed the device's interface so far (rx = down, tx = up), if measurable."""
        return None

    def describe(self) -> str:
        return "no emulation (loopback)"

    def child_pids(self) -> list[int]:
        """Helper processes (delay programs, proxies) this link started and still holds."""
        return [c.pid for c in self._children]

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        for child in self._children:
            stop(child)
        self._children.clear()

    def __enter__(self) -> "Link":
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


class NetnsLink(Link):
    mode = "netns"

    def __init__(self, profile: LinkProfile, index: int | None = None):
        super().__init__(profile)
        pid = os.getpid()
        self.ns_gw, self.ns_dev = f"{NS_PREFIX}{pid}-g", f"{NS_PREFIX}{pid}-d"
        tag = f"{pid % 100000}"
        self.veth_gw, self.veth_dev = f"{VETH_PREFIX}{tag}g", f"{VETH_PREFIX}{tag}d"
        subnet = 1 + (pid % 250) if index is None else index
        self.gateway_host, self.device_host = f"10.199.{subnet}.1", f"10.199.{subnet}.2"
        self._created: list[str] = []

    def gateway_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_gw]

    def device_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns_dev]

    def describe(self) -> str:
        p = self.profile
        rate = f"tbf {p.down_mbit:g} Mbit/s down / {p.up_mbit:g} Mbit/s up" if p.down_mbit else "no rate limit"
        loss = f", {p.loss_pct:g} % loss (iptables statistic)" if p.loss_pct else ""
        return (f"network namespaces {self.ns_gw} (gateway, {self.gateway_host}) <-veth-> {self.ns_dev} "
                f"(device, {self.device_host}); {rate}; {p.rtt_ms / 2:g} ms delay each way on ingress (NFQUEUE){loss}")

    def setup(self) -> None:
        cleanup_stale()
        p = self.profile
        for ns in (self.ns_gw, self.ns_dev):
            run_command("ip", "netns", "add", ns)
            self._created.append(ns)
        run_command("ip", "link", "add", self.veth_gw, "type", "veth", "peer", "name", self.veth_dev)
        run_command("ip", "link", "set", self.veth_gw, "netns", self.ns_gw)
        run_command("ip", "link", "set", self.veth_dev, "netns", self.ns_dev)
        sides = ((self.ns_gw, self.veth_gw, self.gateway_host, p.down_mbit),
                 (self.ns_dev, self.veth_dev, self.device_host, p.up_mbit))
        for ns, dev, addr, egress_mbit in sides:
            run_command("ip", "-n", ns, "link", "set", "lo", "up")
            run_command("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run_command("ip", "-n", ns, "link", "set", dev, "up")
            if egress_mbit:
                # burst: at least a few full-size frames; limit: about half a second of queue.
                burst = max(32 * 1024, int(egress_mbit * 1e6 / 8 / 250))
                limit = max(256 * 1024, int(egress_mbit * 1e6 / 8 * 0.5))
                run_command("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                            "rate", f"{egress_mbit}mbit", "burst", str(burst), "limit", str(limit))
            if p.loss_pct:
                run_command("ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", dev,
                            "-m", "statistic", "--mode", "random", "--probability", f"{p.loss_pct / 100:.6f}",
                            "-j", "DROP")
            if p.rtt_ms > 0:
                ready = Path(tempfile.gettempdir()) / f"spabench-nfq-{ns}.ready"
                ready.parent.mkdir(parents=True, exist_ok=True)
                ready.unlink(missing_ok=True)
                child = spawn(["ip", "netns", "exec", ns, *python_command(
                                   "benchmarks.nfq_delay", "--queue", "0", "--delay-ms", p.rtt_ms / 2,
                                   "--ready-file", ready)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                self._children.append(child)
                _wait_file(ready, child, "the NFQUEUE delay program")
                ready.unlink(missing_ok=True)
                # Without --queue-bypass: if the delay program dies, packets drop (a visible failure).
                run_command("ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", dev,
                            "-j", "NFQUEUE", "--queue-num", "0")

    def counters(self) -> dict | None:
        proc = run_command("ip", "-n", self.ns_dev, "-s", "-j", "link", "show", "dev", self.veth_dev, check=False)
        if proc.returncode != 0:
            return None
        import json

        stats = json.loads(proc.stdout)[0]["stats64"]
        return {"down": stats["rx"]["bytes"], "up": stats["tx"]["bytes"]}

    def teardown(self) -> None:
        super().teardown()
        for ns in reversed(self._created):
            _kill_ns_processes(ns)
            run_command("ip", "netns", "del", ns, check=False)
        self._created.clear()
        # The veth pair goes with its namespaces; if setup failed before moving it, delete it here.
        if run_command("ip", "link", "show", self.veth_gw, check=False).returncode == 0:
            run_command("ip", "link", "del", self.veth_gw, check=False)


class ProxyLink(Link):
    """The portable fallback: a delay-and-rate TCP proxy on loopback per server port."""

    mode = "proxy"

    def __init__(self, profile: LinkProfile):
        super().__init__(profile)
        self._ports: dict[int, int] = {}  # server port -> proxy port

    def describe(self) -> str:
        p = self.profile
        rate = f"{p.down_mbit:g} Mbit/s down / {p.up_mbit:g} Mbit/s up" if p.down_mbit else "no rate limit"
        return (f"userspace TCP delay proxy on loopback (benchmarks.delay_proxy): {p.rtt_ms / 2:g} ms each way, "
                f"{rate} (serialized per direction)")

    def device_host_port(self, port: int) -> tuple[str, int]:
        if port not in self._ports:
            self._ports[port] = self._start_proxy(port)
        return "127.0.0.1", self._ports[port]

    def device_url(self, host: str, port: int) -> str:
        h, p = self.device_host_port(port)
        return f"ws://{h}:{p}"

    def _start_proxy(self, port: int) -> int:
        p = self.profile
        ready = Path(tempfile.gettempdir()) / f"spabench-proxy-{os.getpid()}-{port}.ready"
        ready.parent.mkdir(parents=True, exist_ok=True)
        ready.unlink(missing_ok=True)
        cmd = python_command("benchmarks.delay_proxy", "--target", f"127.0.0.1:{port}",
                             "--delay-ms", p.rtt_ms / 2, "--ready-file", ready)
        if p.down_mbit:
            cmd += ["--down-mbit", str(p.down_mbit), "--up-mbit", str(p.up_mbit)]
        child = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._children.append(child)
        _wait_file(ready, child, "the delay proxy")
        listen = int(ready.read_text().strip())
        ready.unlink(missing_ok=True)
        return listen

    def teardown(self) -> None:
        super().teardown()
        self._ports.clear()


def _wait_file(path: Path, child: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if child.poll() is not None:
            err = child.stderr.read() if child.stderr else ""
            raise SpaError(f"{what} exited with {child.returncode}: {err.strip()[-2000:]}")
        if time.monotonic() > deadline:
            raise SpaError(f"{what} did not start within {timeout:g} s")
        time.sleep(0.05)


def make_link(profile: LinkProfile, mode: str = "auto") -> Link:
    """mode: auto (netns when possible, else proxy), netns, proxy; the loopback profile needs none."""
    if profile.name == "loopback" or (profile.rtt_ms == 0 and profile.down_mbit is None and mode == "auto"):
        return Link(profile)
    if mode == "auto":
        ok, _ = netns_available()
        mode = "netns" if ok else "proxy"
    if mode == "netns":
        ok, why = netns_available()
        if not ok:
            raise SpaError(f"cannot emulate the link with network namespaces: {why}; use --link proxy")
        return NetnsLink(profile)
    if mode == "proxy":
        return ProxyLink(profile)
    raise SpaError(f"unknown link mode {mode!r}")


def measure_link(link: Link, seconds: float = 1.0) -> dict:
    """Achieved RTT and rates over the link, measured from the device side (benchmarks.probe)."""
    import json

    p = link.profile
    down = int(min(8 << 20, max(256 << 10, (p.down_mbit or 400) * 1e6 / 8 * seconds)))
    up = int(min(8 << 20, max(256 << 10, (p.up_mbit or 400) * 1e6 / 8 * seconds)))
    ready = Path(tempfile.gettempdir()) / f"spabench-probe-{os.getpid()}.ready"
    ready.unlink(missing_ok=True)
    server = spawn([*link.gateway_prefix(), *python_command("benchmarks.probe", "serve",
                    "--host", link.gateway_host, "--port", "0", "--ready-file", ready)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_file(ready, server, "the link probe")
        host, port = link.device_host_port(int(ready.read_text().strip()))
        proc = run([*link.device_prefix(), *python_command("benchmarks.probe", "measure", "--host", host,
                                                            "--port", port, "--down-bytes", down, "--up-bytes", up)],
                   timeout=120)
        if proc.returncode != 0:
            raise SpaError(f"the link probe failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout)
    finally:
        stop(server)
        ready.unlink(missing_ok=True)
