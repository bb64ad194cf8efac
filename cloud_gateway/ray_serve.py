"""`spa serve`: the gateway as a Ray Serve application (N replicas, one engine each).

The third thin adapter around the same protocol core: Ray Serve's HTTP proxy
takes the device's WebSocket and hands it, as a Starlette `WebSocket`, to one
replica of the `GatewayReplica` deployment (FastAPI ingress); the replica
serves it with the very `Gateway` that `spa gateway` runs
(`Gateway.handle_connection`, cloud_gateway/session.py), through
`StarletteTransport`. Each replica holds its own backbone, engine and
sessions; the limits, the auth token, the error codes and the resume rules
are those of `spa gateway`.

Ray routes each new connection to any replica (no session affinity), so a
device whose replica died — or whose reconnect lands elsewhere — resumes on
whichever replica it reaches: resume tokens are signed with one secret that
every replica of the deployment shares (docs/PROTOCOL.md §6), and a replica
that does not hold the session rebuilds it from the resume.

`GET /stats` on the same port reports every replica of the deployment, whichever
replica answers: each replica posts its pid and counters every half second to a
small board actor (`StatsBoard`) that `spa serve` starts beside the deployment,
and the answer lists the rows posted in the last few seconds (a replica that
died drops out) beside the answering replica's own.

Imports Ray: load it only for `spa serve` (cli/main.py imports it lazily).
"""

import asyncio
import logging
import os
import signal
import threading
import time

from fastapi import FastAPI, WebSocket
from ray import serve
from starlette.websockets import WebSocketDisconnect

from cloud_gateway.process import ray_temp_dir
from cloud_gateway.session import Connection, ConnectionLost
from spa.protocol.limits import Limits

log = logging.getLogger("spa.gateway")
APP_NAME = "spa"
DEPLOYMENT = "GatewayReplica"
BOARD = "spa-stats-board"  # the named actor every replica posts its counters to
BOARD_NAMESPACE = "spa"
POST_EVERY_S = 0.5
STALE_AFTER_S = 5.0  # a replica that has not posted for this long is gone
_ABNORMAL = 1006  # a disconnect without a close frame (reset, cut link): the session waits for a resume

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # a WebSocket endpoint and /stats, nothing else


class StarletteTransport:
    """A Starlette WebSocket (accepted) as a Connection's transport: the interface of
    cloud_gateway.session.WebsocketsTransport. Through Ray Serve's proxy there
    is no TCP reset to send: `abort` ends the reader at once and closes with
    1011, which the reference device takes as a lost connection (it resumes)."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._gone = asyncio.Event()  # aborted, or the device disconnected: nothing more to read
        self._closing = False  # our close is sent: the device's answer (or its absence) ends the reader
        self._peer_code: int | None = None

    async def frames(self):
        while not self._gone.is_set():
            recv = asyncio.ensure_future(self.ws.receive())
            gone = asyncio.ensure_future(self._gone.wait())
            try:
                await asyncio.wait({recv, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not recv.done():
                recv.cancel()
                return
            try:
                msg = recv.result()
            except (WebSocketDisconnect, RuntimeError, OSError):
                self._gone.set()
                return
            if msg["type"] == "websocket.disconnect":
                self._peer_code = int(msg.get("code") or 1005)
                self._gone.set()
                return
            data = msg.get("bytes")
            yield data if data is not None else (msg.get("text") or "")

    async def send(self, data: bytes) -> None:
        if self._gone.is_set() or self._closing:
            raise ConnectionLost()
        try:
            await self.ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._gone.set()
            raise ConnectionLost() from None

    async def close(self, code: int, reason: str = "") -> None:
        """Send the close frame and wait (a few seconds) for the device's answer, as the
        websockets library does: `peer_closed` then says whether the device answered."""
        if self._gone.is_set() or self._closing:
            return
        self._closing = True
        try:
            await self.ws.close(code, reason[:120])
            await asyncio.wait_for(self._gone.wait(), 5.0)
        except (WebSocketDisconnect, RuntimeError, OSError, asyncio.TimeoutError):
            pass
        finally:
            self._gone.set()

    def abort(self) -> None:
        self._gone.set()  # the reader ends now
        if not self._closing:
            self._closing = True
            asyncio.ensure_future(self._close_quietly(1011, "dropped"))

    async def _close_quietly(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, reason)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass

    @property
    def peer_closed(self) -> bool:
        """The device sent a close frame (any code but the abnormal 1006)."""
        return self._peer_code is not None and self._peer_code != _ABNORMAL


# (above the deployment: Ray serializes the class when it is decorated, with what it uses)
def _board():
    import ray

    return ray.get_actor(BOARD, namespace=BOARD_NAMESPACE)


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class StatsBoard:
        """Every replica's latest counters, by pid (GET /stats)."""

        def __init__(self):
            self._rows: dict[int, dict] = {}

        def post(self, row: dict) -> None:
            self._rows[row["pid"]] = row

        def rows(self) -> dict[int, dict]:
            return dict(self._rows)

    return StatsBoard


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class GatewayReplica:
    """One replica: a backbone, an engine and the sessions of `spa gateway`."""

    def __init__(self, config: dict):
        import torch

        from cloud_gateway.server import Gateway
        from spa.model.backbone import load_backbone
        from spa.system.quiet import quiet_libraries

        quiet_libraries()
        logging.basicConfig(level=logging.INFO if config.get("verbose") else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        torch.set_num_threads(int(config.get("torch_threads", 1)))
        backbone = load_backbone(config.get("backbone"), dtype=config.get("dtype", "float32"),
                                 device=config.get("device", "cpu"))
        self.gateway = Gateway(backbone, Limits(**config["limits"]), config.get("auth_token"),
                               max_batch=config.get("max_batch", 64), resume_secret=config["resume_secret"],
                               branches=config.get("branches", 0), settle=config.get("settle", True))
        self.board = _board()  # GET /stats of any replica reports every replica's counters
        threading.Thread(target=self._post_stats, daemon=True, name="spa-stats").start()

    @app.websocket("/")
    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await self.gateway.handle_connection(Connection(StarletteTransport(websocket), self.gateway.limits))

    def _row(self) -> dict:
        g = self.gateway
        return {"pid": os.getpid(), "sessions_held": len(g.sessions), "connections": g.connections,
                "posted": time.time(), **vars(g.stats)}

    def _post_stats(self) -> None:
        while True:
            try:
                self.board.post.remote(self._row())
            except Exception:  # noqa: BLE001 - the board is gone (the app is being deleted): stop posting
                return
            time.sleep(POST_EVERY_S)

    @app.get("/stats")
    async def stats(self) -> dict:
        """This replica's counters, and every live replica's (`replicas`, by pid)."""
        row = self._row()
        rows = await self.board.rows.remote()
        rows[row["pid"]] = row
        live = {pid: r for pid, r in rows.items() if row["posted"] - r["posted"] < STALE_AFTER_S}
        return {**row, "replicas": {str(pid): r for pid, r in sorted(live.items())}}


def deployment_options(replicas: int | None, min_replicas: int | None, max_replicas: int | None,
                       target_sessions: float, max_sessions: int, cpus: float, gpus: float,
                       torch_threads: int) -> dict:
    """Ray Serve options of the gateway deployment: a fixed replica count, or autoscaling on
    ongoing requests (each device connection is one ongoing request for as long as it lasts)."""
    opts = {
        # Connections beyond what the gateway itself admits get its `busy` answer, not Ray's queue.
        "max_ongoing_requests": 2 * max_sessions + 16,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus,
                              "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(torch_threads),
                                                           "MKL_NUM_THREADS": str(torch_threads),
                                                           **_import_path()}}},
        "health_check_period_s": 5,
        "graceful_shutdown_timeout_s": 5,
        # Each connection to the replica with the fewest open ones (cloud_gateway/routing.py).
        "request_router_config": {"request_router_class": "cloud_gateway.routing:FewestConnectionsRouter"},
    }
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": max(lo, max_replicas or lo),
                                      "target_ongoing_requests": target_sessions,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        opts["num_replicas"] = replicas or 1
    return opts


def _import_path() -> dict:
    """Replicas import this checkout: on a local cluster through PYTHONPATH; on a multi-node
    cluster every node must have the project installed too (README, "Scaling out")."""
    from spa.system.children import ROOT

    return {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_serve(config: dict, *, host: str, port: int, address: str | None, options: dict,
              certfile: str | None = None, keyfile: str | None = None, announce=print,
              ready_timeout: float = 600.0) -> None:
    """Start (or join) a Ray cluster, deploy the gateway replicas, serve until SIGINT/SIGTERM,
    then delete the application and stop what this process started."""
    import ray

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    local = {} if address else {"_temp_dir": ray_temp_dir(os.getpid())}  # a cluster of our own: findable
    ray.init(address=address, runtime_env={"env_vars": _import_path()}, logging_level=logging.WARNING,
             include_dashboard=False, log_to_driver=bool(config.get("verbose")), **local)
    try:
        http = {"host": host, "port": port}
        if certfile:
            http.update(ssl_certfile=certfile, ssl_keyfile=keyfile or certfile)
        serve.start(proxy_location="HeadOnly", http_options=http)
        # The board lives as long as this process (the driver): /stats of any replica reads it.
        board = _board_class().options(name=BOARD, namespace=BOARD_NAMESPACE, get_if_exists=True).remote()  # noqa: F841
        serve.run(GatewayReplica.options(**options).bind(config), name=APP_NAME, route_prefix="/",
                  blocking=False)
        scheme = "wss" if certfile else "ws"
        replicas = options.get("num_replicas") or "{min_replicas}-{max_replicas}".format(
            **options["autoscaling_config"])
        announce(f"spa serve: serving on {scheme}://{host}:{port} ({replicas} replicas, "
                 f"{options['ray_actor_options']['num_cpus']:g} CPU each, auth "
                 f"{'on' if config.get('auth_token') else 'off'}, max {config['limits']['max_sessions']} sessions "
                 f"per replica, resume grace {config['limits']['resume_grace_s']:g} s, pid {os.getpid()})")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.delete(APP_NAME)
            serve.shutdown()
        finally:
            ray.shutdown()
