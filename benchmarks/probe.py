"""Measure what an emulated link achieves: application-level RTT and rate over TCP.

    python -m benchmarks.probe serve --host H --port 0 --ready-file F   (gateway side)
    python -m benchmarks.probe measure --host H --port P [--seconds 1]  (device side; prints JSON)

RTT: the median of 20 round trips of a 1-byte message (TCP_NODELAY), after
one warm-up. Rate: the server sends (or receives) about `seconds` worth of
bytes at the nominal rate in one go; rate = bytes / (elapsed - one RTT).
Measured over TCP, so it includes TCP's own behaviour (slow start,
acknowledgements), as the application sees it.
"""

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import time


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("probe peer closed")
        buf += chunk
    return bytes(buf)


def _handle(conn) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        try:
            head = _recv_exact(conn, 9)
        except ConnectionError:
            return
        kind, n = head[:1], struct.unpack("!Q", head[1:])[0]
        if kind == b"P":  # ping
            conn.sendall(b"p")
        elif kind == b"D":  # send n bytes down
            conn.sendall(bytes(n))
        elif kind == b"U":  # receive n bytes up, then acknowledge
            _recv_exact(conn, n)
            conn.sendall(b"u")
        else:
            return


def serve(host: str, port: int, ready_file: str | None) -> None:
    srv = socket.create_server((host, port))
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{srv.getsockname()[1]}\n")
    while True:
        conn, _ = srv.accept()
        with conn:
            _handle(conn)


def measure(host: str, port: int, down_bytes: int, up_bytes: int, pings: int = 20) -> dict:
    t0 = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=60)
    connect_s = time.perf_counter() - t0
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for i in range(pings + 1):
        t = time.perf_counter()
        sock.sendall(b"P" + struct.pack("!Q", 0))
        _recv_exact(sock, 1)
        if i:
            rtts.append(time.perf_counter() - t)
    rtt = statistics.median(rtts)
    out = {"rtt_ms": rtt * 1000, "rtt_min_ms": min(rtts) * 1000, "rtt_max_ms": max(rtts) * 1000,
           "connect_ms": connect_s * 1000}
    for kind, n in (("down", down_bytes), ("up", up_bytes)):
        t = time.perf_counter()
        sock.sendall((b"D" if kind == "down" else b"U") + struct.pack("!Q", n))
        if kind == "down":
            _recv_exact(sock, n)
        else:
            sock.sendall(bytes(n))
            _recv_exact(sock, 1)
        elapsed = time.perf_counter() - t
        out[f"{kind}_mbit"] = n * 8 / max(elapsed - rtt, 1e-6) / 1e6
        out[f"{kind}_bytes"] = n
    sock.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--ready-file")
    m = sub.add_parser("measure")
    m.add_argument("--host", required=True)
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--down-bytes", type=int, default=4 << 20)
    m.add_argument("--up-bytes", type=int, default=4 << 20)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args.host, args.port, args.ready_file)
    else:
        print(json.dumps(measure(args.host, args.port, args.down_bytes, args.up_bytes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
