"""Prometheus metrics of a :class:`~eenet.serving.ServingEngine`, read at scrape time.

    from prometheus_client import start_http_server
    register_metrics(engine)          # into prometheus_client's default registry
    start_http_server(9100)           # or: the /metrics route of eenet.serving.http

:class:`EngineCollector` is a custom collector (it implements
``prometheus_client.registry.Collector``): every scrape takes one ``engine.snapshot()`` and
turns it into metric families, so the engine keeps no Prometheus state and pays nothing
between scrapes. Metric names (prefix ``eenet_serving`` by default):

- counters: ``_submitted_total``, ``_answered_total``, ``_failed_total``,
  ``_cancelled_total``, ``_rejected_total`` (QueueFull), ``_deadline_forced_total`` (answered
  at an earlier exit because of their deadline), ``_deadline_errors_total``,
  ``_exit_answers_total{exit}``, ``_stage_runs_total{stage}``, ``_stage_rows_total{stage}``;
- gauges: ``_queue_depth`` (admission queue), ``_stage_pending{stage}`` (rows waiting at a
  stage), ``_stage_mean_batch_size{stage}`` (rows per run so far; stages that ran),
  ``_exit_rate{exit}``, ``_latency_seconds{quantile}`` (0.5, 0.99 and 1 = the maximum, over
  the engine's recent answers; absent before the first), ``_cost_per_sample{unit}`` and
  ``_budget{unit}`` (with costs given to the engine), ``_uptime_seconds``.

``prometheus_client`` comes with the ``serve`` extra; it is imported when metrics are first
registered or collected, and its absence raises :class:`eenet.data.MissingExtraError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["SERVE_EXTRA", "EngineCollector", "register_metrics", "require_prometheus"]

SERVE_EXTRA = 'pip install "eenet-kernels[serve]"'


def require_prometheus() -> Any:
    """The ``prometheus_client`` module, or :class:`eenet.data.MissingExtraError` naming the
    ``serve`` extra."""
    from ..data import MissingExtraError

    try:
        return importlib.import_module("prometheus_client")
    except ModuleNotFoundError as exc:
        raise MissingExtraError("Prometheus metrics need the Python package "
                                "'prometheus_client', which is not installed; it comes with "
                                f"the serve extra: {SERVE_EXTRA}",
                                name="prometheus_client") from exc


_COUNTERS = (
    ("submitted", "Requests submitted to the engine (one per sample)."),
    ("answered", "Requests answered."),
    ("failed", "Requests that failed: StageFailed, DeadlineExceeded, EngineClosed or an "
               "internal error (deadline_errors_total counts the DeadlineExceeded ones)."),
    ("cancelled", "Requests cancelled before they were answered."),
    ("rejected", "Requests refused because the admission queue was full (QueueFull)."),
    ("deadline_forced", "Requests answered at an earlier exit because their deadline "
                        "passed."),
    ("deadline_errors", "Requests that failed with DeadlineExceeded."),
)
_QUANTILES = (("0.5", "latency_p50_s"), ("0.99", "latency_p99_s"), ("1", "latency_max_s"))


class EngineCollector:
    """Reads ``engine.snapshot()`` (a :class:`~eenet.serving.ServingStats`) at every
    collection. ``namespace``: the metric name prefix; ``labels``: constant labels added
    to every sample (e.g. ``{"model": "mnist"}`` to tell engines in one registry apart)."""

    def __init__(self, engine: Any, namespace: str = "eenet_serving",
                 labels: Mapping[str, str] | None = None) -> None:
        self.engine = engine
        self.namespace = namespace
        self.labels = {str(k): str(v) for k, v in (labels or {}).items()}

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (lets a registry refuse duplicate names)."""
        return iter(self._families(None))

    def collect(self) -> Iterator[Any]:
        return iter(self._families(self.engine.snapshot()))

    def _families(self, stats: Any) -> list[Any]:
        require_prometheus()
        core = importlib.import_module("prometheus_client.core")
        ns, const = self.namespace, self.labels
        keys = list(const)

        def family(kind: type, name: str, doc: str, label: str | None = None,
                   unit: str = "") -> Any:
            return kind(f"{ns}_{name}", doc, labels=[*keys, *([label] if label else [])],
                        unit=unit)

        def add(fam: Any, value: float | None, label_value: str | None = None) -> None:
            if stats is None or value is None:
                return
            values = [*const.values(), *([label_value] if label_value is not None else [])]
            fam.add_metric(values, float(value))

        out = []
        for name, doc in _COUNTERS:
            fam = family(core.CounterMetricFamily, name, doc)
            add(fam, getattr(stats, name, None) if stats is not None else None)
            out.append(fam)

        exits = family(core.CounterMetricFamily, "exit_answers", "Answers given at each exit.",
                       "exit")
        rates = family(core.GaugeMetricFamily, "exit_rate",
                       "Fraction of the answers given at each exit.", "exit")
        runs = family(core.CounterMetricFamily, "stage_runs", "Batches run at each stage.",
                      "stage")
        rows = family(core.CounterMetricFamily, "stage_rows", "Rows run at each stage.",
                      "stage")
        pending = family(core.GaugeMetricFamily, "stage_pending",
                         "Rows waiting to run at each stage.", "stage")
        mean = family(core.GaugeMetricFamily, "stage_mean_batch_size",
                      "Mean rows per run at each stage (stages that ran).", "stage")
        queue = family(core.GaugeMetricFamily, "queue_depth",
                       "Requests in the admission queue, not started yet.")
        latency = family(core.GaugeMetricFamily, "latency",
                         "Request latency quantiles over the recent answers (1: the "
                         "maximum).", "quantile", unit="seconds")
        cost = family(core.GaugeMetricFamily, "cost_per_sample",
                      "Mean cost per answered sample, in the costs' unit.", "unit")
        budget = family(core.GaugeMetricFamily, "budget",
                        "The budget: the cost per sample asked for, in the costs' unit.",
                        "unit")
        uptime = family(core.GaugeMetricFamily, "uptime", "Seconds since the engine started.",
                        unit="seconds")
        if stats is not None:
            for k, n in enumerate(stats.exits):
                add(exits, n, str(k))
            for k, r in enumerate(stats.exit_rates or ()):
                add(rates, r, str(k))
            for k, (n_runs, n_rows) in enumerate(zip(stats.stage_runs, stats.stage_rows,
                                                     strict=True)):
                add(runs, n_runs, str(k))
                add(rows, n_rows, str(k))
                if n_runs:
                    add(mean, n_rows / n_runs, str(k))
            for k, n in enumerate(stats.stage_pending):
                add(pending, n, str(k))
            add(queue, stats.queue_depth)
            for q, attr in _QUANTILES:
                add(latency, getattr(stats, attr, None), q)
            unit = str(getattr(stats, "cost_unit", None) or "")
            add(cost, getattr(stats, "cost_per_sample", None), unit)
            add(budget, getattr(stats, "budget", None), unit)
            add(uptime, getattr(stats, "uptime_s", None))
        out += [exits, rates, runs, rows, pending, mean, queue, latency, cost, budget, uptime]
        return out


def register_metrics(engine: Any, registry: Any = None, namespace: str = "eenet_serving",
                     labels: Mapping[str, str] | None = None) -> EngineCollector:
    """Register an :class:`EngineCollector` of ``engine`` in ``registry`` (default:
    ``prometheus_client.REGISTRY``) and return it (``registry.unregister(collector)``
    removes it). Registering a second engine under the same metric names raises
    ``ValueError``: give it another ``namespace`` or a registry of its own."""
    prometheus_client = require_prometheus()
    collector = EngineCollector(engine, namespace, labels)
    (prometheus_client.REGISTRY if registry is None else registry).register(collector)
    return collector
