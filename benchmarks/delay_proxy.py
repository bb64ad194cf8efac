"""A TCP proxy that behaves like a slow link: the fallback when network namespaces are not available.

Each direction is serialized at its rate (a byte stream occupies the link for
len * 8 / rate seconds) and delivered one-way-delay later, in order:

    deliver(chunk) = max(arrival, link free) + len * 8 / rate + delay

Chunks are read in pieces of at most 16 KB so the rate is applied smoothly.
TCP_NODELAY on both sides; one asyncio task per direction per connection.

    python -m benchmarks.delay_proxy --target 127.0.0.1:8765 --delay-ms 25 \
        [--down-mbit 20 --up-mbit 20] [--listen-port 0] [--ready-file F]

"Down" is target -> client (gateway to device). The ready file receives the
listening port.
"""

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

CHUNK = 16 * 1024


class Direction:
    def __init__(self, delay: float, mbit: float | None):
        self.delay = delay
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None
        self.link_free = 0.0

    def deliver_at(self, arrival: float, size: int) -> float:
        if self.bytes_per_s is None:
            return arrival + self.delay
        start = max(arrival, self.link_free)
        self.link_free = start + size / self.bytes_per_s
        return self.link_free + self.delay


async def _pump(reader, writer, direction: Direction) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            while data := await reader.read(CHUNK):
                await queue.put((direction.deliver_at(time.monotonic(), len(data)), data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put((time.monotonic() + direction.delay, None))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        try:
            writer.close()
        except Exception:
            pass


def _nodelay(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(target_host: str, target_port: int, delay: float, down, up, port: int, ready_file) -> None:
    async def handle(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_writer.close()
            return
        _nodelay(client_writer)
        _nodelay(server_writer)
        await asyncio.gather(
            _pump(client_reader, server_writer, Direction(delay, up)),
            _pump(server_reader, client_writer, Direction(delay, down)),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    bound = server.sockets[0].getsockname()[1]
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{bound}\n")
    async with server:
        await stop


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    ap.add_argument("--down-mbit", type=float)
    ap.add_argument("--up-mbit", type=float)
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--ready-file")
    args = ap.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    asyncio.run(serve(host, int(port), args.delay_ms / 1000, args.down_mbit, args.up_mbit, args.listen_port,
                      args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
