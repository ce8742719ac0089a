"""A plain HTTP front-end over a :class:`~eenet.serving.ServingEngine` (standard library only).

    engine = ServingEngine(net, policy, ServingConfig(max_batch=64, max_wait_ms=2))
    with engine:
        server = serve_http(engine, port=8000)   # loopback, served from a background thread
        ...
        server.close()                           # stop accepting, let the calls in flight end

``run_http(engine, ...)`` does the same in the foreground until Ctrl-C / SIGTERM, then closes
the server and drains the engine (``eenet serve MODEL POLICY`` runs it).

Routes
------
``POST /v1/predict``
    ``{"inputs": [sample, ...]}`` (nested lists of numbers, float32; one sample without the
    batch dimension each, e.g. a (1, 28, 28) image) or, for text models, ``{"input_ids":
    [[...], ...], "attention_mask": [[...], ...]}`` (integers); optional ``"deadline_ms"``
    (the engine's deadline of every sample of the call). Every sample is submitted as a
    request of its own, so samples of concurrent calls merge into the engine's batches; the
    reply is sent when all samples of the call are answered::

        {"outputs": [{"exit": k, "label": argmax, "score": s, "forced": false,
                      "logits": [...], "latency_ms": t}, ...]}

    Errors are JSON ``{"error": message, "type": kind}`` (plus ``"index"``, the sample, when
    one sample's request failed): 400 bad input (with the reason), 404 / 405 unknown route or
    method, 408 the body stopped arriving before ``Content-Length`` bytes (the connection
    is closed), 411 no ``Content-Length``, 413 body too large, 429 the admission queue is full
    (the call's submitted samples are cancelled; ``Retry-After`` is set), 500 a stage failed
    (its error), 503 the engine is closed, 504 a deadline passed (or ``request_timeout_s``).
``GET /v1/stats``
    :meth:`ServingStats.to_dict` of ``engine.snapshot()``.
``GET /healthz``
    ``{"status": "ok"}`` (503 ``{"status": "closed"}`` once the engine is closed).
``GET /metrics``
    the Prometheus text format (:mod:`eenet.serving.prometheus`) when ``prometheus_client``
    is installed (the ``serve`` extra), else 404 with a message.

The server binds the IPv4 loopback interface by default (``host="::1"`` or another IPv6
address binds IPv6) and has no authentication: put an authenticating proxy in front of it
before binding another address. ``server.close()`` answers the calls in flight, then closes
every connection, the idle keep-alive ones too.

Inputs are checked before they reach the engine: the sample shape a registered architecture
records (``small_cnn``: (in_channels, image_size, image_size); ``hf_encoder_exits``: token
ids of any length up to the model's positions, each in its vocabulary) or the one passed as
``sample_shape``; for other networks, the first
sample of every new shape is run through the network once in the request's thread and a
shape it refuses is answered 400 (later samples of that shape are refused at once).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures as cf
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any

import torch

from ..runtime.engine import is_device_failure

__all__ = ["ROUTES", "BadRequest", "EngineHTTPServer", "InputSpec", "Predict", "answer_dict",
           "call_timeout", "collect_answers", "error_reply", "input_spec_of", "load_engine",
           "parse_predict", "run_http", "serve_http", "submit_call", "timed_out"]

FIELDS = ("inputs", "input_ids", "attention_mask", "deadline_ms")
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SAMPLES = 4096
DEFAULT_REQUEST_TIMEOUT_S = 60.0
JSON_TYPE = "application/json"
ROUTES: Mapping[str, frozenset[str]] = MappingProxyType({
    "/v1/predict": frozenset({"POST"}),
    "/v1/stats": frozenset({"GET"}),
    "/healthz": frozenset({"GET"}),
    "/metrics": frozenset({"GET"}),
})
"""The routes and the methods each takes."""
METRICS_MISSING = ("metrics need the Python package prometheus_client, which is not installed; "
                   'it comes with the serve extra: pip install "eenet-kernels[serve]"')


class BadRequest(ValueError):
    """A request the server refuses before the engine sees it; ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


# -- what the network takes ------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """The samples a network takes: the JSON field (``inputs``: floats, converted to
    ``dtype``; ``input_ids``: integers with an optional ``attention_mask`` of the same shape)
    and the sample shape (None: not known; a None entry: any size along that dimension);
    for token ids, ``vocab_size`` (ids must lie in [0, vocab_size)) and ``max_length`` (the
    most tokens a sample may have), None where not known."""

    field: str = "inputs"
    shape: tuple[int | None, ...] | None = None
    dtype: torch.dtype = torch.float32
    vocab_size: int | None = None
    max_length: int | None = None

    def check_ids(self, ids: torch.Tensor) -> None:
        """Refuse (n, L) int64 ``ids`` outside the vocabulary or longer than ``max_length``:
        the network would raise on them (or, on a GPU, hit a device-side assert)."""
        if self.max_length is not None and ids.shape[-1] > self.max_length:
            raise BadRequest(f"input_ids have {ids.shape[-1]} tokens per sample; this model "
                             f"takes at most {self.max_length}")
        if self.vocab_size is not None and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise BadRequest(f"input_ids must be token ids in [0, {self.vocab_size}) (this "
                                 f"model's vocabulary), got {bad}")

    def check(self, sample_shape: tuple[int, ...]) -> None:
        if self.shape is None:
            return
        if len(sample_shape) != len(self.shape) or any(
                want is not None and want != got for want, got in zip(self.shape, sample_shape,
                                                                      strict=True)):
            want = "(" + ", ".join("L" if d is None else str(d) for d in self.shape) + ")"
            if len(self.shape) == 1:
                want = want[:-1] + ",)"
            raise BadRequest(f"this model takes samples of shape {want}, got samples of shape "
                             f"{tuple(sample_shape)}")


def input_spec_of(net: torch.nn.Module) -> InputSpec:
    """The :class:`InputSpec` of a network built by a registered architecture (what its
    recorded config says), else float ``inputs`` of any shape; float inputs take the dtype
    of the first stage's parameters (the engine does not cast)."""
    from ..nn import architecture_of

    stages = getattr(net, "stages", None)
    first = next((p for p in stages[0].parameters() if p.is_floating_point()),
                 None) if stages else None
    dtype = first.dtype if first is not None else torch.float32
    spec = architecture_of(net) or {}
    config = spec.get("config") or {}
    arch = spec.get("arch")
    try:
        if arch == "small_cnn":
            size = int(config.get("image_size", 28))
            return InputSpec("inputs", (int(config.get("in_channels", 1)), size, size), dtype)
        if arch == "hf_encoder_exits":
            return InputSpec("input_ids", (None,), dtype, *_token_limits(stages[0]))
        if arch == "attach_exits":
            example = config.get("example_input") or {}
            shape = example.get("shape")
            kind = str(example.get("dtype", "float32"))
            if isinstance(shape, (list, tuple)) and len(shape) >= 2:
                if "int" in kind:  # token ids: any length
                    return InputSpec("input_ids", (None,) * (len(shape) - 1), dtype,
                                     *_token_limits(stages[0]))
                return InputSpec("inputs", tuple(int(d) for d in shape[1:]), dtype)
    except (TypeError, ValueError):
        pass
    return InputSpec(dtype=dtype)


def _token_limits(stage: torch.nn.Module) -> tuple[int | None, int | None]:
    """(vocabulary size, most tokens) of a first stage that embeds token ids: the table of the
    Hugging Face embeddings' ``word_embeddings`` (else of the stage's only ``nn.Embedding``;
    with several, which one the ids index is not known) and the rows of their
    ``position_embeddings`` (less the ``padding_idx + 1`` positions that RoBERTa-style
    embeddings skip); None where it is not known."""
    owner = next((m for m in stage.modules()
                  if isinstance(getattr(m, "word_embeddings", None), torch.nn.Embedding)), None)
    tables = [m for m in stage.modules() if isinstance(m, torch.nn.Embedding)]
    words = (owner.word_embeddings if owner is not None else
             tables[0] if len(tables) == 1 else None)
    vocab = None if words is None else int(words.num_embeddings)
    positions = getattr(owner, "position_embeddings", None)
    if not isinstance(positions, torch.nn.Embedding):
        return vocab, None
    most = int(positions.num_embeddings)
    skipped = getattr(owner, "padding_idx", None)
    if isinstance(skipped, int) and not isinstance(skipped, bool):
        most -= skipped + 1
    return vocab, most if most > 0 else None


# -- parsing a call --------------------------------------------------------------------------


@dataclass
class Predict:
    """One parsed ``/v1/predict`` call: its samples (x and row inputs, without the batch
    dimension) and the deadline of each, in seconds (None: none)."""

    x: torch.Tensor
    row_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    deadline_s: float | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def sample(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.x[i], {k: v[i] for k, v in self.row_inputs.items()}


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _tensor(value: Any, name: str, integer: bool, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{name} must be a non-empty list of samples (one entry per sample)")
    try:
        t = torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise BadRequest(f"{name} is not a rectangular array of numbers: "
                         f"{str(exc).splitlines()[0]}") from None
    if t.dtype == torch.bool:
        t = t.to(torch.int64)
    if t.numel() == 0:  # (an empty list parses as float32, whatever it stands for)
        raise BadRequest(f"{name} holds no values: every sample needs at least one")
    if integer:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise BadRequest(f"{name} must hold integers")
        return t.to(torch.int64)
    if t.dtype.is_complex:
        raise BadRequest(f"{name} must hold real numbers")
    t = t.to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise BadRequest(f"{name} holds a number that is not finite (as {dtype})")
    return t


def parse_predict(body: bytes | str, spec: InputSpec | None = None,
                  max_samples: int = DEFAULT_MAX_SAMPLES) -> Predict:
    """The call in a ``/v1/predict`` body; raises :class:`BadRequest` saying what is wrong."""
    spec = spec or InputSpec()
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("the body nests JSON too deeply") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the body must be a JSON object with {spec.field!r}, got a "
                         f"{type(doc).__name__}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown fields {unknown} (known: {list(FIELDS)})")
    given = [k for k in ("inputs", "input_ids") if k in doc]
    if len(given) != 1:
        raise BadRequest(f"give exactly one of 'inputs' (float samples) and 'input_ids' (token "
                         f"ids); this model takes {spec.field!r}")
    key = given[0]
    if key != spec.field and spec.shape is not None:
        raise BadRequest(f"this model takes {spec.field!r}, not {key!r}")
    x = _tensor(doc[key], key, integer=key == "input_ids", dtype=spec.dtype)
    if x.dim() < 2:
        raise BadRequest(f"{key} must be a list of samples, each a list (got a flat list: wrap "
                         f"one sample as [sample])")
    n = int(x.shape[0])
    if n > max_samples:
        raise BadRequest(f"{n} samples in one call; at most {max_samples}")
    if key == "input_ids" and x.dim() != 2:
        raise BadRequest(f"input_ids must be (n, L) token ids, got shape {tuple(x.shape)}")
    spec.check(tuple(x.shape[1:]))
    if key == "input_ids":
        spec.check_ids(x)
    rows: dict[str, torch.Tensor] = {}
    if "attention_mask" in doc:
        if key != "input_ids":
            raise BadRequest("attention_mask goes with input_ids (token ids), not with inputs")
        mask = _tensor(doc["attention_mask"], "attention_mask", integer=True)
        if mask.shape != x.shape:
            raise BadRequest(f"attention_mask has shape {tuple(mask.shape)}, {key} "
                             f"{tuple(x.shape)}: they must match")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise BadRequest("attention_mask must hold 0 (padding) and 1 (token) only")
        rows["attention_mask"] = mask
    deadline_s = None
    if doc.get("deadline_ms") is not None:
        ms = doc["deadline_ms"]
        try:  # a JSON integer too large for a float overflows
            value = float(ms) if isinstance(ms, (int, float)) and not isinstance(ms, bool) \
                else math.nan
        except OverflowError:
            value = math.inf
        deadline_s = value / 1000.0
        if not (math.isfinite(value) and deadline_s > 0):  # (5e-324 ms is 0 s)
            shown = repr(ms) if len(repr(ms)) <= 40 else repr(ms)[:37] + "..."
            raise BadRequest(f"deadline_ms must be a positive, finite number of milliseconds, "
                             f"got {shown}")
    return Predict(x, rows, deadline_s)


# -- replies ---------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def answer_dict(answer: Any) -> dict[str, Any]:
    """One output of ``/v1/predict`` from an :class:`~eenet.serving.Answer`."""
    logits = answer.logits.detach().to("cpu", torch.float32).reshape(-1)
    return {"exit": int(answer.exit_index), "label": int(logits.argmax()),
            "score": _finite(answer.score), "forced": bool(answer.forced),
            "logits": [_finite(v) for v in logits.tolist()],
            "latency_ms": float(answer.latency_s) * 1000.0}


def error_reply(exc: BaseException, index: int | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for an exception a request raised or its future holds."""
    from . import DeadlineExceeded, EngineClosed, QueueFull, RequestCancelled

    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, BadRequest):
        status = exc.status
    elif isinstance(exc, QueueFull):
        status = HTTPStatus.TOO_MANY_REQUESTS
    elif isinstance(exc, EngineClosed):
        status = HTTPStatus.SERVICE_UNAVAILABLE
    elif isinstance(exc, DeadlineExceeded):
        status = HTTPStatus.GATEWAY_TIMEOUT
    elif isinstance(exc, (cf.TimeoutError, TimeoutError)):
        status, message = HTTPStatus.GATEWAY_TIMEOUT, message if str(exc) else (
            "the samples were not answered in time")
    elif isinstance(exc, (RequestCancelled, cf.CancelledError)):
        status = HTTPStatus.SERVICE_UNAVAILABLE
        message = message if str(exc) else "the request was cancelled"
    else:  # StageFailed (the stage's error is in its message), or an internal error
        status = HTTPStatus.INTERNAL_SERVER_ERROR
    body: dict[str, Any] = {"error": message, "type": type(exc).__name__}
    if index is not None:
        body["index"] = index
    return int(status), body


def submit_call(engine: Any, call: Predict) -> list[cf.Future]:
    """Submit every sample of ``call`` as a request of its own (``engine.submit_many``: all
    admitted or none). An input the engine refuses at submit (``TypeError`` /
    ``ValueError``) raises :class:`BadRequest`; ``QueueFull``, ``EngineClosed`` propagate."""
    try:
        return list(engine.submit_many(call.x, deadline_s=call.deadline_s, **call.row_inputs))
    except (TypeError, ValueError) as exc:
        raise BadRequest(" ".join(str(exc).split()) or type(exc).__name__) from exc


def call_timeout(call: Predict, request_timeout_s: float) -> float:
    """How long a call waits for its answers: ``request_timeout_s``, or less with a
    deadline (the deadline plus as much again, at least a second, for the forced answers)."""
    if call.deadline_s is None:
        return request_timeout_s
    return min(request_timeout_s, call.deadline_s + max(1.0, call.deadline_s))


def timed_out(futs: Sequence[cf.Future], pending: Any, timeout: float
              ) -> tuple[int, dict[str, Any]]:
    """Cancel the unanswered futures of a call; its 504 reply."""
    for f in pending:
        f.cancel()
    return error_reply(cf.TimeoutError(f"{len(pending)} of {len(futs)} samples were not "
                                       f"answered within {timeout:.3g} s"))


def collect_answers(futs: Sequence[cf.Future]) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a call whose sample futures are all done: the outputs, or the
    first failed sample's error (the futures after it are cancelled)."""
    outputs = []
    for i, f in enumerate(futs):
        try:
            outputs.append(answer_dict(f.result(timeout=0)))
        except Exception as exc:  # the stage's error, DeadlineExceeded, CancelledError
            for g in futs[i + 1:]:
                g.cancel()
            return error_reply(exc, index=i)
    return int(HTTPStatus.OK), {"outputs": outputs}


def load_engine(model_path: str, policy_path: str, **config: Any) -> Any:
    """A :class:`~eenet.serving.ServingEngine` (not started) over a saved model and policy
    (:func:`eenet.saving.load_model`, :func:`~eenet.saving.load_policy`); ``config``: the
    :class:`~eenet.serving.ServingConfig` fields (the costs and budget come from the policy
    file unless given). Raises ``ValueError`` for a policy fitted for another number of exits
    or, by its recorded fingerprint or dataset, for another model."""
    from ..saving import load_model, load_policy, model_mismatch
    from . import ServingConfig, ServingEngine

    net, meta = load_model(model_path)
    policy, costs, info = load_policy(policy_path, num_exits=net.num_exits)
    why = model_mismatch(info.get("meta") or {}, net)
    if why is not None:
        raise ValueError(f"{policy_path} was calibrated for another model than {model_path} "
                         f"({why}): run eenet calibrate on this model")
    fitted_on = (info.get("meta") or {}).get("dataset")
    if fitted_on is not None and meta.get("dataset") not in (None, fitted_on):
        raise ValueError(f"{policy_path} was calibrated on {fitted_on!r}, {model_path} trained "
                         f"on {meta.get('dataset')!r}")
    config.setdefault("costs", costs)
    config.setdefault("budget", info.get("budget"))
    return ServingEngine(net, policy, ServingConfig(**config))


# -- the server ------------------------------------------------------------------------------


class _ShapeProbe:
    """Runs a sample of zeros (an attention mask of ones) of every new signature (shapes and
    dtypes) through the network once and remembers the verdict (a bounded cache): refused
    shapes get 400 without the engine. The values are never the client's, so an error that
    only some values cause is not taken for the shape's. A failure that says nothing about
    the shape (out of memory, a device or library error: what the engine's first stage
    passes through as it is) is not remembered, and the call goes on to the engine."""

    def __init__(self, net: torch.nn.Module, size: int = 1024) -> None:
        self.net = net
        self.size = size
        self.lock = threading.Lock()
        self.seen: OrderedDict[tuple, str | None] = OrderedDict()

    def check(self, call: Predict) -> None:
        x, rows = call.sample(0)
        key = (tuple(x.shape), x.dtype, *((k, tuple(v.shape)) for k, v in sorted(rows.items())))
        with self.lock:
            verdict = self.seen.get(key, ...)
            if verdict is not ...:
                self.seen.move_to_end(key)
        if verdict is ...:
            verdict = self._run(x, rows)
            if verdict is ...:  # the probe itself failed: no verdict on the shape
                return
            with self.lock:
                self.seen[key] = verdict
                while len(self.seen) > self.size:
                    self.seen.popitem(last=False)
        if verdict is not None:
            raise BadRequest(verdict)

    def _run(self, x: torch.Tensor, rows: dict[str, torch.Tensor]) -> Any:
        """None (the shape is taken), the reason it is refused, or ``...`` (no verdict)."""
        try:
            device = next(self.net.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        zeros = torch.zeros((1, *x.shape), dtype=x.dtype, device=device)
        inputs = {k: (torch.ones if k == "attention_mask" else torch.zeros)(
            (1, *v.shape), dtype=v.dtype, device=device) for k, v in rows.items()}
        try:
            with torch.inference_mode():
                self.net(zeros, **inputs)
        except Exception as exc:  # what the network raises on zeros of this shape
            if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                                and is_device_failure(exc)):
                return ...
            return (f"this model does not take samples of shape {tuple(x.shape)}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None


def _address_family(host: str, port: int) -> socket.AddressFamily:
    """The address family of the address ``host`` binds: IPv6 for "::1", "::" or a name
    that resolves to IPv6 only, else IPv4."""
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return socket.AF_INET  # bind() then names the host it cannot use
    families = [info[0] for info in found]
    return socket.AF_INET if socket.AF_INET in families or not families else families[0]


class _Handler(BaseHTTPRequestHandler):
    server: EngineHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "eenet-serve/1"

    # -- plumbing ----------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.ended(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.access_log:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str = JSON_TYPE,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.server.closing:  # a call answered while the server closes: its last one
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(_jsonable(doc), allow_nan=False, separators=(",", ":")).encode()
        self._send(status, body, headers=headers)

    def _error(self, exc: BaseException, index: int | None = None) -> None:
        status, doc = error_reply(exc, index)
        headers = {"Retry-After": "1"} if status == HTTPStatus.TOO_MANY_REQUESTS else None
        if status == HTTPStatus.METHOD_NOT_ALLOWED and isinstance(exc, BadRequest):
            headers = {"Allow": getattr(exc, "allow", "GET")}
        self._json(status, doc, headers)

    def _path(self) -> str:
        path = self.path.split("?", 1)[0]
        return path.rstrip("/") or "/"

    def _route(self, method: str) -> None:
        with self.server.tracking() as state:
            if state == "shut":
                self.close_connection = True
                return
            try:
                if state == "closing":  # a call on a kept-alive connection as the server closes
                    self._drain_body()  # (its reply says Connection: close, see _send)
                    self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                               {"error": "the server is shutting down", "type": "ServerClosing"})
                else:
                    self._dispatch(method)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as exc:  # the reply of last resort: never a hung connection
                try:
                    self._error(exc)
                except OSError:
                    self.close_connection = True

    def _dispatch(self, method: str) -> None:
        path = self._path()
        routes = self.server.routes
        if path not in routes:
            self._drain_body()
            self._error(BadRequest(f"no route {path} (routes: {', '.join(sorted(routes))})",
                                   HTTPStatus.NOT_FOUND))
            return
        allowed = routes[path]
        if method not in allowed:
            self._drain_body()
            exc = BadRequest(f"{path} takes {' or '.join(sorted(allowed))}, not {method}",
                             HTTPStatus.METHOD_NOT_ALLOWED)
            exc.allow = ", ".join(sorted(allowed))  # type: ignore[attr-defined]
            self._error(exc)
            return
        getattr(self, "_" + path.strip("/").replace("/", "_"))()

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None:
            return
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            return
        if 0 < n <= self.server.max_body_bytes:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise BadRequest("chunked bodies are not supported: send a Content-Length",
                             HTTPStatus.LENGTH_REQUIRED)
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise BadRequest("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {length!r}") from None
        if n < 0:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {length!r}")
        if n > self.server.max_body_bytes:
            self.close_connection = True
            raise BadRequest(f"the body has {n} bytes; at most {self.server.max_body_bytes}",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            body = self.rfile.read(n)
        except TimeoutError:  # the client sent less than its Content-Length, then stalled
            self.close_connection = True
            raise BadRequest(f"the body did not arrive in time ({n} bytes announced)",
                             HTTPStatus.REQUEST_TIMEOUT) from None
        if len(body) != n:
            self.close_connection = True
            raise BadRequest(f"the body ended after {len(body)} of {n} bytes")
        return body

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # -- routes ------------------------------------------------------------------------------

    def _healthz(self) -> None:
        if self.server.engine_closed():
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "closed"})
        else:
            self._json(HTTPStatus.OK, {"status": "ok"})

    def _v1_stats(self) -> None:
        self._json(HTTPStatus.OK, self.server.engine.snapshot().to_dict())

    def _metrics(self) -> None:
        text, content_type = self.server.metrics_text()
        if text is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": METRICS_MISSING,
                                              "type": "MissingExtraError"})
            return
        self._send(HTTPStatus.OK, text, content_type)

    def _v1_predict(self) -> None:
        try:
            call = self.server.parse(self._read_body())
        except BadRequest as exc:
            self._error(exc)
            return
        status, doc = self.server.predict(call)
        headers = {"Retry-After": "1"} if status == HTTPStatus.TOO_MANY_REQUESTS else None
        self._json(status, doc, headers)


class EngineHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` answering the routes of this module over ``engine`` (one
    thread per connection; HTTP/1.1 keep-alive). :func:`serve_http` makes and starts one;
    :meth:`close` stops it. The engine stays the caller's: closing the server does not
    close it."""

    daemon_threads = True
    allow_reuse_address = True
    routes = ROUTES

    def __init__(self, engine: Any, host: str = "127.0.0.1", port: int = 8000, *,
                 sample_shape: Sequence[int | None] | None = None,
                 input_field: str | None = None,
                 max_samples: int = DEFAULT_MAX_SAMPLES,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 idle_timeout_s: float = 30.0,
                 metrics: bool = True, access_log: bool = False) -> None:
        if max_samples < 1 or max_body_bytes < 1 or not request_timeout_s > 0:
            raise ValueError("max_samples, max_body_bytes and request_timeout_s must be "
                             "positive")
        self.engine = engine
        net = getattr(engine, "net", None)
        spec = input_spec_of(net) if isinstance(net, torch.nn.Module) else InputSpec()
        if sample_shape is not None or input_field is not None:
            shape = (tuple(None if d is None or d < 0 else int(d) for d in sample_shape)
                     if sample_shape is not None else spec.shape)
            chosen = input_field or spec.field
            stages = getattr(net, "stages", None)
            limits = (_token_limits(stages[0]) if chosen == "input_ids" and stages else
                      (None, None))
            spec = InputSpec(chosen, shape, spec.dtype, *limits)
        if spec.field not in ("inputs", "input_ids"):
            raise ValueError(f"input_field must be 'inputs' or 'input_ids', got {spec.field!r}")
        self.spec = spec
        self.probe = (_ShapeProbe(net) if spec.shape is None and isinstance(net, torch.nn.Module)
                      else None)
        self.max_samples = int(max_samples)
        self.max_body_bytes = int(max_body_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self.access_log = access_log
        self._idle_timeout_s = idle_timeout_s
        self._registry = None
        if metrics:
            try:
                from prometheus_client import CollectorRegistry
            except ModuleNotFoundError:
                pass
            else:
                from .prometheus import register_metrics

                self._registry = CollectorRegistry()
                register_metrics(engine, self._registry)
        self._active = 0
        self._idle = threading.Condition()
        self._connections: set[socket.socket] = set()  # open ones, under self._idle
        self._shut = False  # close() has shut the connections down, under self._idle
        self._thread: threading.Thread | None = None
        self._closed = False
        handler = type("Handler", (_Handler,), {"timeout": idle_timeout_s})
        self.address_family = _address_family(host, int(port))
        super().__init__((host, int(port)), handler)

    # -- addresses and lifetime --------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server_address[0])
        if ":" in host:  # IPv6, its zone ("%eth0") escaped as a URL needs
            host = "[" + host.replace("%", "%25") + "]"
        return f"http://{host}:{self.port}"

    def start(self) -> EngineHTTPServer:
        """Serve from a daemon thread (idempotent); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name="eenet-http",
                                            kwargs={"poll_interval": 0.1}, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting connections (the listening socket is closed first), wait up to
        ``timeout_s`` for the calls in flight to be answered (their replies say ``Connection:
        close``; a call that arrives meanwhile on an open keep-alive connection is answered
        503), then close every connection. Idempotent. The engine is left open."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout_s)
        self.socket.close()  # no connection queues up behind the calls in flight
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._active and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            self._shut = True  # a handler that registers from now on is shut at once
            open_now = list(self._connections)
        for conn in open_now:  # wakes the handler threads waiting for a next request
            _shut_down(conn)
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a reset, a broken pipe) is not an error worth a
        traceback on stderr; anything else is reported as ``socketserver`` does."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def opened(self, conn: socket.socket) -> None:
        with self._idle:
            self._connections.add(conn)
            shut = self._shut
        if shut:  # accepted just before close() took its list of connections
            _shut_down(conn)

    def ended(self, conn: socket.socket) -> None:
        with self._idle:
            self._connections.discard(conn)

    def __enter__(self) -> EngineHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tracking(self) -> _Tracking:
        return _Tracking(self)

    # -- what the routes do ------------------------------------------------------------------

    def engine_closed(self) -> bool:
        closed = getattr(self.engine, "closed", False)
        return bool(closed() if callable(closed) else closed)

    def parse(self, body: bytes) -> Predict:
        call = parse_predict(body, self.spec, self.max_samples)
        if self.probe is not None:
            self.probe.check(call)
        return call

    def predict(self, call: Predict) -> tuple[int, dict[str, Any]]:
        """Submit every sample of ``call``, wait for all their answers: (status, JSON body)."""
        try:
            futs = submit_call(self.engine, call)
        except Exception as exc:  # BadRequest, QueueFull, EngineClosed
            return error_reply(exc)
        timeout = call_timeout(call, self.request_timeout_s)
        _, pending = cf.wait(futs, timeout=timeout)
        if pending:
            return timed_out(futs, pending, timeout)
        return collect_answers(futs)

    def metrics_text(self) -> tuple[bytes | None, str]:
        if self._registry is None:
            return None, ""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self._registry), CONTENT_TYPE_LATEST


def _shut_down(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed by its client meanwhile
        conn.shutdown(socket.SHUT_RDWR)


class _Tracking:
    """Counts the calls being answered, so that :meth:`EngineHTTPServer.close` can wait.
    ``with`` gives the server's state as the call began, read under the lock ``close``
    sets it under: ``"open"``, ``"closing"`` (counted too: its 503 is sent before the
    connections are shut) or ``"shut"`` (not counted: the connection is being shut)."""

    def __init__(self, server: EngineHTTPServer) -> None:
        self.server = server
        self.counted = False

    def __enter__(self) -> str:
        server = self.server
        with server._idle:
            if server._shut:
                return "shut"
            self.counted = True
            server._active += 1
            return "closing" if server._closed else "open"

    def __exit__(self, *exc: object) -> None:
        if not self.counted:
            return
        with self.server._idle:
            self.server._active -= 1
            self.server._idle.notify_all()


def serve_http(engine: Any, host: str = "127.0.0.1", port: int = 8000,
               **options: Any) -> EngineHTTPServer:
    """Start an :class:`EngineHTTPServer` on ``host:port`` (port 0: a free one; read
    ``server.port`` / ``server.url``) in a background thread and return it. ``options``:
    ``sample_shape``, ``input_field``, ``max_samples``, ``max_body_bytes``,
    ``request_timeout_s``, ``idle_timeout_s``, ``metrics``, ``access_log``. The engine must
    be started (``with engine:``); call ``server.close()`` before closing it."""
    return EngineHTTPServer(engine, host, port, **options).start()


def run_http(engine: Any, host: str = "127.0.0.1", port: int = 8000, *,
             close_engine: bool = True, on_ready: Callable[[EngineHTTPServer], None] | None
             = None, **options: Any) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM, then close the server (the calls in
    flight are answered) and, with ``close_engine``, the engine (``close(drain=True)``). A
    second Ctrl-C or SIGTERM meanwhile, with ``close_engine``, stops without draining: the
    requests not answered yet fail (``close(drain=False)``; their calls get 503).
    ``on_ready(server)`` runs once it listens (default: a line on stderr with its URL, and
    one when it stops)."""
    signals: list[int] = []  # the handler only appends: it takes no lock the loop may hold
    previous: dict[int, Any] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)
        if len(signals) >= 2 and close_engine:  # never waits: the main thread's close() does
            engine.close(drain=False, timeout=0)

    if threading.current_thread() is threading.main_thread():
        # SIGINT too, explicitly: a process started in the background by a non-interactive
        # shell inherits SIGINT ignored, and Ctrl-C / kill -INT would do nothing
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    server = None
    try:
        server = serve_http(engine, host, port, **options)
        if on_ready is None:
            print(f"eenet serve: listening on {server.url} (POST /v1/predict, GET /v1/stats, "
                  "/healthz, /metrics); Ctrl-C stops", file=sys.stderr, flush=True)
        else:
            on_ready(server)
        while not signals:
            time.sleep(0.1)
        if on_ready is None:
            print("eenet serve: stopping, answering the requests admitted"
                  + (" (Ctrl-C again: fail them instead)" if close_engine else ""),
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.close()
        if close_engine:
            engine.close(drain=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
