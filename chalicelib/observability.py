"""Structured logs and EMF metrics shared by every handler.

The logger's service name differs from the Chalice app name on purpose: with the same name Chalice's own
logger and Powertools' both emit every line. Nothing here ever logs a token or a request header.
"""

from __future__ import annotations

import warnings

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric

# Many invocations rightly record no metric (a duplicate delivery, an ignored event); Powertools warns on each.
warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)

SERVICE = "fleet"
NAMESPACE = "RunnerFleet"

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)


def count(name: str, value: int = 1) -> None:
    metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def seconds(name: str, value: float, pool: str) -> None:
    """A duration of one pool's runners (``QueueWaitSeconds``, ``BootSeconds``), with the pool as dimension.

    Emitted at once as its own EMF document: the invocation's other metrics carry no pool dimension.
    """
    with single_metric(
        name=name, unit=MetricUnit.Seconds, value=round(value, 3), namespace=NAMESPACE, default_dimensions={}
    ) as metric:
        metric.add_dimension(name="service", value=SERVICE)
        metric.add_dimension(name="pool", value=pool)
