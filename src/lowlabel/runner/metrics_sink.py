"""Worker metrics reach MLflow through Ray, not through the network to the tracking server.

Rank 0 of a job may run on any node; the tracking server (or sqlite file) lives with the
driver. A ``MetricsSink`` actor, pinned to the driver's node, holds the MLflow client: workers
send it metrics over Ray (fire and forget, so a slow tracker never slows a step), and the
tracking server can listen on loopback only. A tracker outage does not kill training: what
could not be delivered is kept and retried, and what is still undelivered when the job ends is
counted and reported by the driver.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

log = logging.getLogger(__name__)

# MLflow's log_batch takes at most 1000 metrics per call.
BATCH = 1000
# A stage's worth of per-epoch metrics is small; past this many undelivered, the oldest go.
MAX_PENDING = 100_000
# On a run whose metrics did not all reach the tracker: how many values are missing.
UNDELIVERED_TAG = "lowlabel.metrics_undelivered"


@ray.remote(num_cpus=0, max_restarts=0)
class MetricsSink:
    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from lowlabel.env import configure_quiet_env

        configure_quiet_env()
        # This actor retries on its own (what is pending goes with the next call), so each
        # attempt fails fast: MLflow's default 7 HTTP retries with backoff would hold it for
        # minutes per call during an outage. Its own process: the driver's client keeps them.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.pending: list[Any] = []
        self.pending_tags: dict[str, str] = {}
        self.delivered = 0
        self.dropped = 0
        self.last_error = ""

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if len(self.pending) > MAX_PENDING:
            self.dropped += len(self.pending) - MAX_PENDING
            self.pending = self.pending[-MAX_PENDING:]
        self.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.pending_tags |= tags
        self.flush()

    def flush(self) -> int:
        """Deliver what is pending; returns how many values (metrics and tags) are still undelivered."""
        from mlflow.entities import RunTag

        if self.pending_tags:
            try:
                self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in self.pending_tags.items()])
                self.pending_tags = {}
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                return len(self.pending) + len(self.pending_tags)
        while self.pending:
            batch = self.pending[:BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                return len(self.pending)
            self.delivered += len(batch)
            self.pending = self.pending[len(batch):]
        return 0

    def close(self, retries: int, wait_s: float) -> dict[str, Any]:
        for attempt in range(retries + 1):
            if self.flush() == 0:
                break
            if attempt < retries:
                time.sleep(wait_s)
        undelivered = len(self.pending) + len(self.pending_tags) + self.dropped
        return {"delivered": self.delivered, "undelivered": undelivered, "error": self.last_error}


class SinkClient:
    """What rank 0 holds: ``log(metrics, step)`` to the job's sink (no-op without one)."""

    def __init__(self, sink: Any | None) -> None:
        self.sink = sink

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink.log.remote(dict(metrics), step, int(time.time() * 1000))

    def tag(self, tags: dict[str, str]) -> None:
        if self.sink is not None:
            self.sink.set_tags.remote(dict(tags))


@contextmanager
def metrics_sink(tracking_uri: str | None, run_id: str | None, *, close_retries: int = 12, close_wait_s: float = 5.0) -> Iterator[Any]:
    """A sink for the run on this (the driver's) node, or None when nothing is tracked.

    On exit, pending metrics get a minute more of tries; any that still cannot be delivered are
    reported (a warning that says how many and why, and the run's tag ``lowlabel.metrics_undelivered``
    when the tracker is reachable again), never raised: the training result stands."""
    if not (tracking_uri and run_id):
        yield None
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    sink = MetricsSink.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(tracking_uri, run_id)
    try:
        yield sink
    finally:
        try:
            summary = ray.get(sink.close.remote(close_retries, close_wait_s), timeout=300)
        except Exception as error:
            summary = {"delivered": "?", "undelivered": "?", "error": f"metrics sink failed: {error}"}
        if summary["undelivered"]:
            message = f"MLflow run {run_id}: {summary['undelivered']} metric values could not be delivered ({summary['error']})"
            log.warning(message)
            print(f"warning: {message}", flush=True)
            try:
                from mlflow.tracking import MlflowClient

                MlflowClient(tracking_uri).set_tag(run_id, UNDELIVERED_TAG, str(summary["undelivered"]))
            except Exception as error:  # the warning above already says it; the run goes on
                log.warning("could not tag the run with the undelivered count: %s", error)
        ray.kill(sink)
