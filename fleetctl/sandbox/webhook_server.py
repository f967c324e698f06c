"""Serves the Chalice app's HTTP routes on loopback, the way ``chalice local`` does, on a free port.

It uses Chalice's own local server (API Gateway event translation, threaded), so a request takes the same path
through Chalice as it would behind API Gateway.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Self

PROJECT_DIR = Path(__file__).resolve().parents[2]


class WebhookServer:
    def __init__(self, app: Any, stage: str = "dev", host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = app
        self._stage = stage
        self._host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> Self:
        from chalice.config import Config
        from chalice.local import ChaliceRequestHandler, CustomLocalChalice, LocalChalice, LocalDevServer

        class QuietHandler(ChaliceRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """The app logs each request itself, as structured JSON; no access log line too."""

        config = Config.create(chalice_stage=self._stage, app_name=self._app.app_name, project_dir=str(PROJECT_DIR))
        # What chalice.local.create_local_server does, with a quiet handler: per-thread current_request.
        if not isinstance(self._app, LocalChalice):
            CustomLocalChalice.__bases__ = (LocalChalice, self._app.__class__)
            self._app.__class__ = CustomLocalChalice
        self._server = LocalDevServer(self._app, config, self._host, self._port, handler_cls=QuietHandler)
        host, port = self._server.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.server.serve_forever, name="webhook-server", daemon=True)
        self._thread.start()
        return self

    @property
    def webhook_url(self) -> str:
        return f"{self.url}/webhooks/gitlab"

    def stop(self) -> None:
        if self._server is not None:
            self._server.server.shutdown()
            self._server.server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
