"""`Daemon`: `streamd serve` — the model, one Scheduler, the websocket + HTTP endpoints.

Start-up: load and warm up the model, start the scheduler, listen, then tell systemd READY=1.
Shutdown (SIGTERM/SIGINT): stop accepting, finalize every live session (their finals reach
the clients and the journal), close them with `closed{reason:"shutdown"}`, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import signal
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from streamd.server.config import Config
from streamd.server.connection import Services, StreamConnection
from streamd.server.journal import Journal
from streamd.server.metrics import CONTENT_TYPE, Metrics
from streamd.server.notify import Notifier
from streamd.server.scheduler import Scheduler
from streamd.streaming.window import WindowRequest, WindowResult

log = logging.getLogger("streamd.server")

STREAM_PATH = "/v1/stream"
SHUTDOWN_TIMEOUT_S = 60.0  # finalizing live sessions; systemd's TimeoutStopSec is longer
STALL_S = 60.0  # the engine made no progress this long with work waiting: unhealthy
# websockets refuses (close 1009) frames beyond this; frames between max_frame_bytes and this get
# our clear `frame_too_large` error and the stream goes on
_HARD_FRAME_FACTOR = 4
WEB_DIR = Path(__file__).resolve().parents[2] / "clients" / "web"


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self._stop = asyncio.Event()
        self._server: Server | None = None
        self.services: Services | None = None
        self.web_dir = config.web_dir or WEB_DIR

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or `request_stop`); the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.notifier.status("loading model")
        decoder, model = await asyncio.to_thread(self._load)
        busy_buckets = decoder.check_buckets(
            self.config.busy_encoder_buckets_s, "busy_encoder_buckets_s"
        )

        def busy_decode(
            requests: list[WindowRequest], *, cancel: threading.Event | None = None
        ) -> list[WindowResult]:
            return decoder.decode(requests, busy_buckets, cancel)

        scheduler = Scheduler(
            decoder.decode,
            min(self.config.max_batch, decoder.max_batch),
            self.config.batch_wait_ms,
            on_batch=self.metrics.record_batch,
            busy_decode=busy_decode,
        )
        scheduler.start()
        mqtt_task, sink = self._start_mqtt()
        self.services = Services(
            config=self.config,
            model_name=model.name,
            multilingual=model.is_multilingual,
            encode_prompt=lambda lang, text: tuple(
                model.tokenizer(lang).encode(" " + (text or "").strip())
            ),
            scheduler=scheduler,
            journal=Journal(self.config.journal_dir),
            metrics=self.metrics,
            live={},
            connections=set(),
            on_final=sink.offer_final if sink else None,
            on_partial=sink.offer_partial if sink else None,
        )
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._http,
            max_size=self.config.max_frame_bytes * _HARD_FRAME_FACTOR,
            compression=None,  # PCM does not deflate; JSON is small
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        print(f"streamd: model {model.name} ready; listening on ws://{host}:{port}{STREAM_PATH}")
        print(f"streamd: captions page http://{host}:{port}/ , metrics /metrics", flush=True)
        self.notifier.ready(f"serving {model.name} on {host}:{port}")
        watchdog = asyncio.create_task(self.notifier.watchdog_loop(self._healthy))
        await self._stop.wait()
        self.notifier.stopping("finalizing live sessions")
        await self._shutdown()
        watchdog.cancel()
        if mqtt_task is not None and sink is not None:
            await sink.close(timeout_s=5.0)
            mqtt_task.cancel()
            await asyncio.gather(mqtt_task, return_exceptions=True)
        await scheduler.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # before asyncio.run closes the loop's wakeup pipe, or a late signal hits a dead fd
            loop.remove_signal_handler(sig)
        print("streamd: stopped", flush=True)
        return 0

    def _load(self) -> Any:
        from streamd.engine.precision import resolve_encoder_precision
        from streamd.errors import ConfigError
        from streamd.models.loader import load_model
        from streamd.streaming.window_decoder import WindowDecoder

        if self.config.engine != "torch":
            raise ConfigError(
                f"engine {self.config.engine!r} is not implemented yet (only torch); "
                "see docs/deploy-inf2.md"
            )
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        model = load_model(self.config.model, self.config.device)
        precision = resolve_encoder_precision(self.config.encoder_precision, self.config.device)
        log.info("encoder precision: %s (%s)", precision, self.config.encoder_precision)
        decoder = WindowDecoder(
            model,
            buckets_s=self.config.encoder_buckets_s,
            encoder_precision=precision,
            first_look_buckets_s=self.config.first_look_buckets_s,
        )
        # the first decode pays for lazy initialisation, which no client should wait for
        log.info("warm-up decode took %.2f s", decoder.warm_up())
        return decoder, model

    def _start_mqtt(self) -> tuple[asyncio.Task[None] | None, Any]:
        if self.config.mqtt.url is None:
            return None, None
        from streamd.server.mqtt import MqttSink

        sink = MqttSink(self.config.mqtt, self.config.journal_dir / "mqtt-spool.jsonl")
        self.metrics.mqtt_connected.set_function(lambda: float(sink.connected))
        self.metrics.mqtt_published.set_function(lambda: float(sink.published_finals))
        self.metrics.mqtt_spooled.set_function(lambda: float(sink.spooled_finals))
        return asyncio.create_task(sink.run(), name="mqtt"), sink

    def _healthy(self) -> bool:
        if self.services is None:
            return False
        scheduler = self.services.scheduler
        return scheduler.behind_s() < STALL_S

    async def _handle(self, ws: ServerConnection) -> None:
        assert self.services is not None
        if self._stop.is_set():
            await ws.close(1001, "shutting down")
            return
        await StreamConnection(self.services, ws).run()

    async def _shutdown(self) -> None:
        assert self._server is not None and self.services is not None
        self._server.server.close()  # stop accepting; live connections carry on
        live = list(self.services.connections)
        log.info("shutdown: finalizing %d live session(s)", len(live))
        for connection in live:
            connection.shutdown()
        waits = [asyncio.create_task(c.done.wait()) for c in live]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=SHUTDOWN_TIMEOUT_S)
            for task in pending:
                task.cancel()
        self._server.close()
        await self._server.wait_closed()

    # -- plain HTTP ------------------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == STREAM_PATH:
            return None  # the websocket handshake goes on
        if path == "/healthz":
            return self._healthz()
        if path == "/metrics":
            assert self.services is not None
            self.metrics.behind.set(self.services.scheduler.behind_s())
            return _response(HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE)
        return self._static(path)

    def _healthz(self) -> Response:
        healthy = self._healthy() and not self._stop.is_set()
        services = self.services
        body = {
            "status": "ok" if healthy else "unavailable",
            "sessions": len(services.connections) if services else 0,
            "max_sessions": self.config.max_sessions,
            "model": services.model_name if services else None,
        }
        status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return _response(status, json.dumps(body).encode(), "application/json")

    def _static(self, path: str) -> Response:
        name = "index.html" if path in ("", "/") else path.lstrip("/")
        root = self.web_dir.resolve()
        target = (root / name).resolve()
        if root not in target.parents or not target.is_file():
            if name == "index.html":
                body = f"captions page not found in {root} (set web_dir)\n".encode()
                return _response(HTTPStatus.NOT_FOUND, body, "text/plain; charset=utf-8")
            return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/javascript":
            kind += "; charset=utf-8"
        return _response(HTTPStatus.OK, target.read_bytes(), kind)


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)
