"""runner-fleet's Lambda entry points. Routing only: each handler hands its input to one chalicelib service.

Every function imports this module, so it imports little: the webhook needs only its environment settings,
while scale-up, the instance-event handlers and reconcile load and validate the stage file on their first
event. The jobs queue's name comes from the stage's environment, which Chalice also applies when it imports this
module to deploy, so the event source mapping names the same queue.
"""

from __future__ import annotations

from typing import Any

from chalice.app import Chalice, CloudWatchEvent, ConvertToMiddleware, Rate, Response, SQSEvent

from chalicelib import runtime
from chalicelib.intake.settings import jobs_queue_name
from chalicelib.observability import logger, metrics

app = Chalice(app_name="runner-fleet")
# log_event=False, not left to POWERTOOLS_LOGGER_LOG_EVENT: that variable would log every event whole, and the
# webhook's carries the X-Gitlab-Token header and the signed body.
app.register_middleware(ConvertToMiddleware(logger.inject_lambda_context(clear_state=True, log_event=False)))
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
        # The handler boundary: a 503 with no detail says "ours failed"; a 500 (or a traceback) would leak more.
        logger.exception("webhook failed")
        return Response(body={"error": "unavailable"}, status_code=503)
    return Response(body=result.body, status_code=result.status)


@app.on_sqs_message(queue=jobs_queue_name(), batch_size=50, maximum_batching_window_in_seconds=1)
def scale_up(event: SQSEvent) -> None:
    # Raising fails the whole batch back to SQS; every job-level failure is re-queued by scale_up itself.
    runtime.scale_up().handle_messages(record.body for record in event)


@app.on_cw_event({"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]})
def instance_state(event: CloudWatchEvent) -> None:
    from chalicelib.lifecycle.instances import parse_state_change

    runtime.instance_events().handle(parse_state_change(event.to_dict()))


@app.schedule(Rate(1, unit=Rate.MINUTES))
def reconcile(event: CloudWatchEvent) -> None:
    # Every minute: reap what went wrong, recover lost jobs, retire old runners, keep warm pools warm; within the
    # invocation's time, so that the run ends (and gives its lease back) before Lambda stops it.
    context: Any = event.context  # Lambda's context object (Chalice types it as a dict)
    runtime.reconciler().run(time_left=context.get_remaining_time_in_millis() / 1000)


@app.on_cw_event(
    {
        "source": ["aws.ec2"],
        "detail-type": ["EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"],
    }
)
def instance_interruption(event: CloudWatchEvent) -> None:
    from chalicelib.lifecycle.interruptions import parse_interruption

    runtime.interruptions().handle(parse_interruption(event.to_dict()))


@app.on_cw_event(
    {
        "source": ["aws.ecr", "aws.inspector2"],
        "detail-type": ["ECR Image Action", "ECR Image Scan", "Inspector2 Scan"],
    }
)
def images(event: CloudWatchEvent) -> None:
    # A push, delete or scan of a CI image: each pool running that repository and tag moves to the new digest, once
    # its scan passes when the pool has a scan gate (chalicelib/images).
    from chalicelib.images.handler import handle_image_event

    handle_image_event(event.to_dict(), runtime.image_rotation())
