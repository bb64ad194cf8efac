"""Hold every packet of an NFQUEUE for a fixed time, then accept it (the link's delay).

Runs inside one network namespace of an emulated link (benchmarks/link.py),
fed by `iptables -t mangle -A PREROUTING -i VETH -j NFQUEUE --queue-num N`.
Packets are released in arrival order at arrival + delay: one thread, a
select() on the queue's netlink socket with the next release time as timeout.

    python -m benchmarks.nfq_delay --queue 0 --delay-ms 25 [--ready-file F]
"""

import argparse
import collections
import os
import select
import signal
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--ready-file", help="written once the queue is bound")
    args = ap.parse_args(argv)

    from netfilterqueue import NetfilterQueue

    delay = args.delay_ms / 1000.0
    held: collections.deque = collections.deque()  # (release time, packet)

    def on_packet(pkt) -> None:
        held.append((time.monotonic() + delay, pkt))

    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    nfq = NetfilterQueue()
    nfq.bind(args.queue, on_packet, max_len=16384)
    fd = nfq.get_fd()
    os.set_blocking(fd, False)
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        while running[0]:
            timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.2
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].accept()
    finally:
        for _, pkt in held:  # let the rest through rather than drop it
            try:
                pkt.accept()
            except Exception:
                pass
        nfq.unbind()
    return 0


if __name__ == "__main__":
    sys.exit(main())
