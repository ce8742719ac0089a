"""Serving a saved model and policy with Ray Serve.

    from eenet.serving.ray_app import deploy, start_ray
    start_ray()                                    # a local Ray on the loopback interface
    deploy("mnist_model.pt", "policy.json", port=8000, max_batch=64, max_wait_ms=2)
    # POST http://127.0.0.1:8000/v1/predict, GET /v1/stats, /healthz, /metrics
    # (the JSON of eenet.serving.http); serve.shutdown() / ray.shutdown() stop it

Each replica of the deployment loads the model and the policy at start-up
(:func:`eenet.serving.http.load_engine`) and owns a :class:`~eenet.serving.ServingEngine`.
An HTTP call is parsed and checked in the replica (400 for bad input) and handed to a
``@serve.batch`` method: Ray gathers up to ``ray_batch_size`` calls (waiting at most
``ray_batch_wait_s``), every sample of every call of that batch is submitted to the engine
as a request of its own, and the futures are awaited (``asyncio.wrap_future``), so the
engine re-batches samples across calls at every stage. Answers and errors are those of
:mod:`eenet.serving.http`.

Metrics: the deployment answers ``GET /metrics`` with the Prometheus text of its engine
(:mod:`eenet.serving.prometheus`) and, every ``metrics_interval_s``, copies the same values
into Ray's metric system (``ray.serve.metrics``; Ray exports them, with the deployment and
replica as labels, on each node's metrics export port).

Ray and ``prometheus_client`` come with the ``serve`` extra; they are imported only when a
function here needs them, and their absence raises :class:`eenet.data.MissingExtraError`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import threading
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from .http import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_SAMPLES,
    DEFAULT_REQUEST_TIMEOUT_S,
    JSON_TYPE,
    METRICS_MISSING,
    ROUTES,
    BadRequest,
    InputSpec,
    Predict,
    _jsonable,
    _ShapeProbe,
    call_timeout,
    collect_answers,
    error_reply,
    input_spec_of,
    load_engine,
    parse_predict,
    submit_call,
    timed_out,
)
from .prometheus import SERVE_EXTRA

__all__ = ["DEPLOYMENT_OPTIONS", "EENetReplica", "build_app", "deploy", "require_ray",
           "run_ray", "start_ray"]

APP_NAME = "eenet"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DEPLOYMENT_OPTIONS = ("num_replicas", "ray_actor_options", "max_ongoing_requests", "name")
"""Keyword arguments of :func:`build_app` that go to ``serve.deployment``."""


def require_ray() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or :class:`eenet.data.MissingExtraError` naming the ``serve``
    extra."""
    from ..data import MissingExtraError

    try:
        ray = importlib.import_module("ray")
        serve = importlib.import_module("ray.serve")
    except ModuleNotFoundError as exc:
        raise MissingExtraError("serving with Ray needs the Python package 'ray' (with its "
                                "serve component), which is not installed; it comes with the "
                                f"serve extra: {SERVE_EXTRA}", name="ray") from exc
    return ray, serve


def start_ray(num_cpus: int | None = None, **init_options: Any) -> Any:
    """Start a local Ray (no dashboard) unless one is running in this process; returns the
    ``ray`` module. A Ray started here keeps its processes and ports on the loopback
    interface: unless the caller set it, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is put in
    the environment before Ray is first imported, which makes Ray take 127.0.0.1 as the
    node's address (as it does on a laptop) instead of the address of the machine's network
    interface. ``init_options`` go to ``ray.init``."""
    if "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    ray, _ = require_ray()
    if not ray.is_initialized():
        init_options.setdefault("include_dashboard", False)
        if num_cpus is not None:
            init_options["num_cpus"] = num_cpus
        ray.init(**init_options)
    return ray


# -- the replica -----------------------------------------------------------------------------


class EENetReplica:
    """The body of the deployment (:func:`build_app` wraps it with ``serve.deployment`` and
    adds the ``@serve.batch`` method ``predict_batch``): loads the files, owns the engine,
    routes the HTTP calls."""

    def __init__(self, model_path: str, policy_path: str, engine_config: Mapping[str, Any],
                 threads: int | None = None, request_timeout_s: float
                 = DEFAULT_REQUEST_TIMEOUT_S, max_samples: int = DEFAULT_MAX_SAMPLES,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 metrics_interval_s: float = 5.0) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(int(threads))
        self.engine = load_engine(model_path, policy_path, **dict(engine_config))
        self.engine.__enter__()
        self.on_full = str(dict(engine_config).get("on_full", "reject"))
        net = self.engine.net if hasattr(self.engine, "net") else None
        self.spec = input_spec_of(net) if net is not None else InputSpec()
        self.probe = _ShapeProbe(net) if self.spec.shape is None and net is not None else None
        self.request_timeout_s = float(request_timeout_s)
        self.max_samples = int(max_samples)
        self.max_body_bytes = int(max_body_bytes)
        self.registry = None
        self._stop = threading.Event()
        try:
            from prometheus_client import CollectorRegistry
        except ModuleNotFoundError:
            self.collector = None
        else:
            from .prometheus import EngineCollector

            self.collector = EngineCollector(self.engine)
            self.registry = CollectorRegistry()
            self.registry.register(self.collector)
            if metrics_interval_s > 0:
                threading.Thread(target=self._export_to_ray, args=(metrics_interval_s,),
                                 name="eenet-ray-metrics", daemon=True).start()

    # -- HTTP --------------------------------------------------------------------------------

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        status, body, content_type, headers = await self._route(request)
        return Response(content=body, status_code=status, media_type=content_type,
                        headers=headers)

    async def _route(self, request: Any) -> tuple[int, bytes, str, dict[str, str]]:
        path = str(request.scope.get("path") or request.url.path)
        root = str(request.scope.get("root_path") or "")
        if root and path.startswith(root):
            path = path[len(root):]
        path = path.rstrip("/") or "/"
        method = "GET" if request.method == "HEAD" else request.method
        if path not in ROUTES:
            return self._error(BadRequest(f"no route {path} (routes: {', '.join(ROUTES)})",
                                          HTTPStatus.NOT_FOUND))
        if method not in ROUTES[path]:
            allowed = ", ".join(sorted(ROUTES[path]))
            status, doc, ctype, _ = self._error(BadRequest(
                f"{path} takes {allowed}, not {method}", HTTPStatus.METHOD_NOT_ALLOWED))
            return status, doc, ctype, {"Allow": allowed}
        if path == "/healthz":
            closed = getattr(self.engine, "closed", False)
            if closed() if callable(closed) else closed:
                return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "closed"})
            return self._json(HTTPStatus.OK, {"status": "ok"})
        if path == "/v1/stats":
            return self._json(HTTPStatus.OK, self.engine.snapshot().to_dict())
        if path == "/metrics":
            if self.registry is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": METRICS_MISSING,
                                                         "type": "MissingExtraError"})
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST, {}
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return self._error(BadRequest(f"the body has {len(body)} bytes; at most "
                                          f"{self.max_body_bytes}",
                                          HTTPStatus.REQUEST_ENTITY_TOO_LARGE))
        try:
            call = parse_predict(body, self.spec, self.max_samples)
            if self.probe is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.probe.check, call)
        except BadRequest as exc:
            return self._error(exc)
        status, doc = await self.predict_batch(call)
        headers = {"Retry-After": "1"} if status == HTTPStatus.TOO_MANY_REQUESTS else {}
        return (*self._json(status, doc)[:3], headers)

    @staticmethod
    def _json(status: int, doc: Any) -> tuple[int, bytes, str, dict[str, str]]:
        body = json.dumps(_jsonable(doc), allow_nan=False, separators=(",", ":")).encode()
        return int(status), body, JSON_TYPE, {}

    def _error(self, exc: BaseException) -> tuple[int, bytes, str, dict[str, str]]:
        return self._json(*error_reply(exc))

    # -- the Ray batch -----------------------------------------------------------------------

    async def predict_batch(self, calls: list[Predict]) -> list[tuple[int, dict[str, Any]]]:
        raise NotImplementedError  # replaced by build_app's @serve.batch method

    async def _run_batch(self, calls: list[Predict]) -> list[tuple[int, dict[str, Any]]]:
        """Submit every sample of every call of a Ray batch, then await them all."""

        def submit_all() -> list[Any]:
            out: list[Any] = []
            for call in calls:
                try:
                    out.append(submit_call(self.engine, call))
                except Exception as exc:
                    out.append(exc)
            return out

        if self.on_full == "block":  # submit may wait for room: not on the event loop
            submitted = await asyncio.get_running_loop().run_in_executor(None, submit_all)
        else:
            submitted = submit_all()
        return list(await asyncio.gather(*(self._await_call(call, futs) for call, futs
                                           in zip(calls, submitted, strict=True))))

    async def _await_call(self, call: Predict, futs: Any) -> tuple[int, dict[str, Any]]:
        if isinstance(futs, BaseException):
            return error_reply(futs)
        timeout = call_timeout(call, self.request_timeout_s)
        wrapped = [asyncio.wrap_future(f) for f in futs]
        done, pending = await asyncio.wait(wrapped, timeout=timeout)
        for w in done:  # the answers are read from futs: mark the wrappers' failures seen,
            if not w.cancelled():  # or asyncio logs each one when it is collected
                w.exception()
        if pending:
            for w in pending:
                w.cancel()
            return timed_out(futs, [f for f in futs if not f.done()] or pending, timeout)
        return collect_answers(futs)

    # -- Ray metrics and shutdown ------------------------------------------------------------

    def _export_to_ray(self, interval_s: float) -> None:
        try:
            from ray.serve import metrics as ray_metrics
        except ImportError:
            return
        made: dict[str, Any] = {}
        last: dict[tuple, float] = {}
        while not self._stop.wait(interval_s):
            try:
                for fam in self.collector.collect():  # type: ignore[union-attr]
                    counter = fam.type == "counter"
                    for s in fam.samples:
                        if counter and not s.name.endswith("_total"):
                            continue
                        name = s.name[: -len("_total")] if counter else s.name
                        metric = made.get(name)
                        if metric is None:
                            cls = ray_metrics.Counter if counter else ray_metrics.Gauge
                            metric = made[name] = cls(name, description=fam.documentation,
                                                      tag_keys=tuple(sorted(s.labels)))
                        tags = dict(s.labels) or None
                        if counter:
                            key = (name, tuple(sorted(s.labels.items())))
                            delta = s.value - last.get(key, 0.0)
                            last[key] = s.value
                            if delta > 0:
                                metric.inc(delta, tags=tags)
                        else:
                            metric.set(s.value, tags=tags)
            except Exception:  # metrics must never take the replica down
                continue

    def __del__(self) -> None:
        self._stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=True)


# -- the application -------------------------------------------------------------------------


def _deployment(ray_batch_size: int, ray_batch_wait_s: float, options: dict[str, Any]) -> Any:
    _, serve = require_ray()

    class EENetDeployment(EENetReplica):
        @serve.batch(max_batch_size=ray_batch_size, batch_wait_timeout_s=ray_batch_wait_s)
        async def predict_batch(self, calls: list[Predict]
                                ) -> list[tuple[int, dict[str, Any]]]:
            return await self._run_batch(calls)

    return serve.deployment(EENetDeployment, **options)


def build_app(model_path: str, policy_path: str, *, threads: int | None = None,
              ray_batch_size: int | None = None, ray_batch_wait_s: float | None = None,
              request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
              max_samples: int = DEFAULT_MAX_SAMPLES,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics_interval_s: float = 5.0,
              check: bool = True, **config: Any) -> Any:
    """The Ray Serve ``Application`` serving ``model_path`` with ``policy_path``.

    ``config``: :class:`~eenet.serving.ServingConfig` fields (``max_batch``, ``max_wait_ms``,
    ``queue_size``, ``on_full``, ...) for each replica's engine, and the
    ``serve.deployment`` options of :data:`DEPLOYMENT_OPTIONS` (``num_replicas``,
    ``ray_actor_options``, ``max_ongoing_requests``, ``name``). ``ray_batch_size`` /
    ``ray_batch_wait_s``: the ``@serve.batch`` of HTTP calls (default: ``max_batch`` calls,
    ``max_wait_ms``). ``threads``: torch intra-op threads of each replica. With ``check``,
    the files are loaded here once first, so that a bad pair fails in the caller (ValueError)
    instead of in a replica that Ray restarts.
    """
    require_ray()
    options = {k: config.pop(k) for k in DEPLOYMENT_OPTIONS if k in config}
    options.setdefault("name", "EENet")
    options.setdefault("num_replicas", 1)
    options.setdefault("max_ongoing_requests", 1024)
    model_path, policy_path = os.path.abspath(model_path), os.path.abspath(policy_path)
    for path in (model_path, policy_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
    if check:
        load_engine(model_path, policy_path, **config)  # not started: checks the pair
    batch_size = int(ray_batch_size or config.get("max_batch", 64))
    wait_s = (float(ray_batch_wait_s) if ray_batch_wait_s is not None
              else float(config.get("max_wait_ms", 2.0)) / 1000.0)
    deployment = _deployment(batch_size, wait_s, options)
    return deployment.bind(model_path, policy_path, dict(config), threads=threads,
                           request_timeout_s=request_timeout_s, max_samples=max_samples,
                           max_body_bytes=max_body_bytes,
                           metrics_interval_s=metrics_interval_s)


def deploy(model_path: str, policy_path: str, host: str = "127.0.0.1", port: int = 8000, *,
           name: str = APP_NAME, route_prefix: str = "/", blocking: bool = False,
           **config: Any) -> Any:
    """Start Serve's HTTP proxy on ``host:port`` (Ray must be running: :func:`start_ray`)
    and run :func:`build_app` ``(model_path, policy_path, **config)`` there as application
    ``name``; returns its ``DeploymentHandle`` (with ``blocking``: serves until Ctrl-C).
    ``serve.shutdown()`` stops it."""
    ray, serve = require_ray()
    if not ray.is_initialized():
        raise RuntimeError("Ray is not running: call eenet.serving.ray_app.start_ray() (or "
                           "ray.init) first")
    app = build_app(model_path, policy_path, **config)
    serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=blocking)


def run_ray(model_path: str, policy_path: str, host: str = "127.0.0.1", port: int = 8000, *,
            num_cpus: int | None = None, on_ready: Any = None, **config: Any) -> None:
    """Start a local Ray (:func:`start_ray`), :func:`deploy` the files on ``host:port`` and
    serve until Ctrl-C or SIGTERM; then shut Serve and Ray down. ``on_ready(url)`` runs
    once the application is up (default: a line on stderr)."""
    import signal

    ray = start_ray(num_cpus=num_cpus)
    _, serve = require_ray()
    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        deploy(model_path, policy_path, host, port, **config)
        url = f"http://{host}:{port}"
        if on_ready is None:
            print(f"eenet serve: Ray Serve application {APP_NAME!r} on {url} (POST "
                  "/v1/predict, GET /v1/stats, /healthz, /metrics); Ctrl-C stops",
                  file=sys.stderr, flush=True)
        else:
            on_ready(url)
        if threading.current_thread() is threading.main_thread():
            # SIGINT explicitly too: a background process of a non-interactive shell
            # inherits SIGINT ignored
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
