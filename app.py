"""runner-fleet's Lambda entry points. Routing only: each handler hands its input to one chalicelib service."""

from __future__ import annotations

from chalice.app import Chalice, ConvertToMiddleware, Response

from chalicelib import runtime
from chalicelib.observability import logger, metrics

app = Chalice(app_name="runner-fleet")
app.register_middleware(ConvertToMiddleware(logger.inject_lambda_context(clear_state=True)))
app.register_middleware(ConvertToMiddleware(metrics.log_metrics))


@app.route("/webhooks/gitlab", methods=["POST"], content_types=["*/*"])
def gitlab_webhook() -> Response:
    request = app.current_request
    assert request is not None  # Chalice sets it for every route invocation
    try:
        raw = request.raw_body or b""
        body = raw.encode() if isinstance(raw, str) else raw
        result = runtime.webhook_intake().handle(request.headers, body)
    except Exception:
        # The handler boundary: GitLab retries a 503, while a 500 (or a traceback) would teach it nothing.
        logger.exception("webhook failed")
        return Response(body={"error": "unavailable"}, status_code=503)
    return Response(body=result.body, status_code=result.status)
