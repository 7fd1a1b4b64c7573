"""The frame every training loop shares: resume, then periods that each end with a report.

A job trains for ``total`` units (epochs, or steps) in periods of ``units_per_period`` (one
epoch; ``eval_every`` steps). Each period ends the same way in every loop: its metrics go to
the history, to MLflow (rank 0, through the metrics sink) and to a progress line, and the
state of every object named in ``stateful`` goes into a checkpoint with the history, so a
job killed at any point resumes from its last period as if uninterrupted. A loop supplies
what differs: how a period trains and what it measures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lowlabel.runner.job_config import JobConfig
from lowlabel.runner.worker import MetricsLogger, Progress, WorkerContext, load_state, print_main, report

PERIODS_KEY = "periods"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


class StateGroup(dict):
    """Several stateful objects checkpointed under one name, each by its own key (e.g. a
    method's running statistics)."""

    def state_dict(self) -> dict[str, Any]:
        return {key: value.state_dict() for key, value in self.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in self.items():
            value.load_state_dict(state[key])


class TrainingFrame:
    """Resume, per-period reports and checkpoints of one job (see the module docstring)."""

    def __init__(
        self,
        ctx: WorkerContext,
        job: JobConfig,
        *,
        total: int,
        unit: str,
        stateful: Mapping[str, Stateful],
        units_per_period: int = 1,
        extra_state: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.ctx, self.job, self.total, self.unit = ctx, job, total, unit
        self.units_per_period = units_per_period
        self.stateful = dict(stateful)
        # Written with each checkpoint, never read back (e.g. the bare encoder for the stage).
        self.extra_state = extra_state
        self.periods = -(-total // units_per_period)
        self.history: list[dict[str, Any]] = []
        self.logger = MetricsLogger(ctx, job)
        self.logger.record_placement(ctx)
        self.progress = Progress(job.label, total, unit=unit)

    def units_done(self, periods: int) -> int:
        return min(self.total, periods * self.units_per_period)

    def period_units(self, period: int) -> range:
        """The units (e.g. global step numbers) of period ``period``."""
        return range(self.units_done(period), self.units_done(period + 1))

    def resume(self) -> int:
        """Restore the stateful objects and the history from the checkpoint to continue from
        (this job's after a worker restart, else the previous run's); the periods done."""
        state = load_state(self.job)
        if state is None:
            return 0
        for name, obj in self.stateful.items():
            obj.load_state_dict(state[name])
        done, self.history = state[PERIODS_KEY], state["history"]
        units = self.units_done(done)
        self.progress = Progress(self.job.label, self.total, unit=self.unit, done_at_start=units)
        print_main(self.ctx, f"[{self.job.label}] resumed from the checkpoint of {self.unit} {units}")
        self.logger.log({f"resumed_at_{self.unit}": units}, step=units)  # the restart, on the record
        return done

    def record(self, units: int, metrics: Mapping[str, float]) -> None:
        """Metrics outside the periods (e.g. the initial encoder's): history and MLflow, no checkpoint."""
        self.history.append({self.unit: units, **metrics})
        self.logger.log(dict(metrics), step=units)

    def end_period(self, period: int, metrics: Mapping[str, float], images: int, seconds: float) -> None:
        """Every rank calls this once per period: metrics, progress line, checkpoint."""
        units = self.units_done(period + 1)
        self.record(units, metrics)
        print_main(self.ctx, self.progress.line(units, images, seconds, dict(metrics)))
        state = None
        if self.ctx.is_main:
            state = {name: obj.state_dict() for name, obj in self.stateful.items()}
            state |= dict(self.extra_state() if self.extra_state else {})
            state |= {PERIODS_KEY: period + 1, "history": self.history}
        report(self.ctx, {self.unit: units, **metrics}, state)
