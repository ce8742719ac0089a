"""The HTTP front-end of the serving engine (eenet.serving.http), its Prometheus metrics and
the ``eenet serve`` command line: answers against the offline oracle, the error replies,
back-pressure, statistics, shutdown; loopback only."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from conftest import padded_ids, tiny_bert_exits
from torch import nn

from eenet import cli, models
from eenet.budget import Costs
from eenet.data import MissingExtraError
from eenet.nn import ExitHead, MultiExitNetwork
from eenet.policies import MaxProb
from eenet.runtime import simulate
from eenet.saving import fingerprint, save_model, save_policy
from eenet.serving import ServingConfig, ServingEngine
from eenet.serving.http import (
    BadRequest,
    InputSpec,
    input_spec_of,
    parse_predict,
    run_http,
    serve_http,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = (1, 8, 8)


def _tiny_cnn() -> tuple[MultiExitNetwork, MaxProb, torch.Tensor]:
    """A 3-exit small_cnn on 8x8 images, a MaxProb policy whose thresholds (the median
    score at each early exit) spread the samples over the exits, and 48 samples."""
    torch.manual_seed(0)
    net = models.small_cnn(in_channels=1, num_classes=10, image_size=8, widths=(8, 16, 16),
                           head_width=4).eval()
    x = torch.randn(48, *SAMPLE)
    with torch.no_grad():
        probs = [z.softmax(1).amax(1) for z in net(x)]
    thresholds = [float(p.median()) for p in probs[:-1]] + [0.0]
    return net, MaxProb(thresholds), x


class _Toy(nn.Module):
    """A stage that sleeps 0.3 s on a batch holding a 7 and raises on one holding a 13 (its
    engines use ``rebatch="always"``: "auto" would profile the stage on the first batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if bool((h == 13).any()):
            raise RuntimeError("the toy stage refuses 13")
        if bool((h == 7).any()):
            time.sleep(0.3)
        return self.linear(h)


TOY_CONFIG = ServingConfig(max_wait_ms=0.0, rebatch="always")


def _toy_net() -> MultiExitNetwork:
    torch.manual_seed(0)
    return MultiExitNetwork([_Toy(), _Toy()], [ExitHead.linear(4, 3), ExitHead.linear(4, 3)])


def _call(url: str, doc: Any = None, body: bytes | None = None, method: str | None = None,
          timeout: float = 30.0) -> tuple[int, Any, bytes]:
    """(status, headers (case-insensitive), body) of one HTTP call."""
    data = body if body is not None else (None if doc is None else json.dumps(doc).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _json(url: str, doc: Any = None, **kw: Any) -> tuple[int, Any]:
    status, headers, body = _call(url, doc, **kw)
    assert headers.get("Content-Type") == "application/json", headers
    return status, json.loads(body)


def _wait_for(cond: Any, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def _until_admitted(engine: ServingEngine, n: int, timeout: float = 30.0) -> None:
    """Wait until the engine has admitted ``n`` rows in all: a call sent from another thread
    is then in flight (an HTTP round trip has no fixed time on a loaded machine)."""
    end = time.monotonic() + timeout
    while engine.snapshot().submitted < n:
        assert time.monotonic() < end, "the call never reached the engine"
        time.sleep(0.001)


@pytest.fixture
def cnn_server():
    net, policy, x = _tiny_cnn()
    with ServingEngine(net, policy, ServingConfig(max_batch=16, max_wait_ms=2.0)) as engine:
        server = serve_http(engine, port=0)
        try:
            yield server, net, policy, x
        finally:
            server.close()


def _check_outputs(outputs: list[dict], ref: Any, rows: range | list[int]) -> None:
    assert len(outputs) == len(rows)
    for out, i in zip(outputs, rows, strict=True):
        assert out["exit"] == int(ref.exit_index[i]), f"sample {i}"
        logits = torch.tensor(out["logits"], dtype=torch.float32)
        torch.testing.assert_close(logits, ref.logits[i], rtol=0, atol=1e-5)
        assert out["label"] == int(ref.logits[i].argmax())
        assert abs(out["score"] - float(ref.score[i])) <= 1e-5
        assert out["forced"] is False
        assert out["latency_ms"] >= 0


# -- answers -----------------------------------------------------------------------------------


def test_concurrent_calls_match_the_oracle(cnn_server) -> None:
    server, net, policy, x = cnn_server
    ref = simulate(net, policy, x)
    assert len(set(ref.exit_index.tolist())) == 3  # every exit is taken
    # calls of 1 to 5 samples from 8 threads: 48 samples in 15 calls
    cuts = [0]
    while cuts[-1] < len(x):
        cuts.append(min(len(x), cuts[-1] + 1 + len(cuts) % 5))
    spans = list(itertools.pairwise(cuts))

    def post(span: tuple[int, int]) -> tuple[int, Any]:
        a, b = span
        return _json(server.url + "/v1/predict", {"inputs": x[a:b].tolist()})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, spans))
    for (a, b), (status, doc) in zip(spans, replies, strict=True):
        assert status == 200, doc
        _check_outputs(doc["outputs"], ref, range(a, b))

    status, stats = _json(server.url + "/v1/stats")
    assert status == 200
    assert stats["submitted"] == stats["answered"] == len(x)
    assert stats["failed"] == stats["rejected"] == stats["cancelled"] == 0
    assert stats["exits"] == torch.bincount(ref.exit_index, minlength=3).tolist()
    assert stats["stage_rows"][0] == len(x)
    assert stats["queue_depth"] == 0 and stats["latency_p50_s"] is not None


def test_deadline_is_passed_on(cnn_server) -> None:
    server, net, policy, x = cnn_server
    status, doc = _json(server.url + "/v1/predict", {"inputs": x[:3].tolist(),
                                                     "deadline_ms": 10_000})
    assert status == 200
    _check_outputs(doc["outputs"], simulate(net, policy, x[:3]), range(3))


def test_text_model_takes_ids_and_mask() -> None:
    net = tiny_bert_exits()
    ids, mask = padded_ids([8, 3, 5, 1, 8, 2], 8)
    policy = MaxProb([0.6, 0.0])
    ref = simulate(net, policy, ids, attention_mask=mask)
    with (ServingEngine(net, policy, ServingConfig(max_batch=8)) as engine,
          serve_http(engine, port=0) as server):
        assert server.spec.field == "input_ids"
        status, doc = _json(server.url + "/v1/predict", {"input_ids": ids.tolist(),
                                                         "attention_mask": mask.tolist()})
        assert status == 200, doc
        _check_outputs(doc["outputs"], ref, range(6))
        status, doc = _json(server.url + "/v1/predict", {"inputs": ids.tolist()})
        assert status == 400 and "takes 'input_ids'" in doc["error"]
        # ids the embeddings would raise on are refused before they reach a batch
        assert (server.spec.vocab_size, server.spec.max_length) == (50, 64)
        for bad, message in [([ids.tolist()[0], [50] * 8], "in [0, 50)"),
                             ([[-1] * 8], "got -1"), ([[3] * 65], "at most 64")]:
            status, doc = _json(server.url + "/v1/predict", {"input_ids": bad})
            assert status == 400 and message in doc["error"], doc
        status, doc = _json(server.url + "/v1/predict", {"input_ids": [[49] * 64]})
        assert status == 200, doc
        assert engine.snapshot().failed == 0


def test_token_limits_of_bert_and_roberta_embeddings() -> None:
    transformers = pytest.importorskip("transformers")
    from eenet.nn import hf_encoder_exits

    small = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 32, "vocab_size": 40, "max_position_embeddings": 20}
    bert = transformers.BertModel(transformers.BertConfig(**small), add_pooling_layer=False)
    spec = input_spec_of(hf_encoder_exits(bert, (1,), 2))
    assert (spec.field, spec.vocab_size, spec.max_length) == ("input_ids", 40, 20)
    # RoBERTa numbers positions from padding_idx + 1: pad id 1 leaves 20 - 2 positions
    roberta = transformers.RobertaModel(transformers.RobertaConfig(**small, pad_token_id=1),
                                        add_pooling_layer=False)
    spec = input_spec_of(hf_encoder_exits(roberta, (1,), 2))
    assert (spec.vocab_size, spec.max_length) == (40, 18)
    from eenet.serving.http import _token_limits

    two = nn.ModuleDict({"pos": nn.Embedding(16, 4), "tok": nn.Embedding(1000, 4)})
    assert _token_limits(two) == (None, None)  # which table the ids index is not known
    assert _token_limits(nn.Sequential(nn.Embedding(30, 4), nn.Linear(4, 4))) == (30, None)
    net = hf_encoder_exits(roberta, (1,), 2).eval()
    with torch.no_grad():
        net.stages[0](torch.full((1, 18), 5))  # the longest it takes
        with pytest.raises((IndexError, RuntimeError)):  # one position more
            net.stages[0](torch.full((1, 19), 5))


# -- refused input -------------------------------------------------------------------------


# one (1, 8, 8) sample of the tiny CNN, the JSON object left open for one more field
_ONE_SAMPLE = (b'{"inputs": [[[' + b",".join([b"[" + b",".join([b"0"] * 8) + b"]"] * 8)
               + b"]]], ")


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "exactly one of 'inputs'"),
    (b'{"inputs": [], "x": 1}', "unknown fields ['x']"),
    (b'{"inputs": []}', "non-empty list of samples"),
    (b'{"inputs": [1, 2, 3]}', "each a list"),
    (b'{"inputs": [[1, 2], [3]]}', "not a rectangular array"),
    (b'{"inputs": [["a", "b"]]}', "not a rectangular array"),
    (b'{"inputs": [[NaN, 1]]}', "not valid JSON"),
    (b'{"inputs": [[1e999, 1]]}', "not finite"),
    (b'{"inputs": [[[[0, 0], [0, 0]]]]}', "shape (1, 8, 8), got samples of shape (1, 2, 2)"),
    (b'{"input_ids": [[1, 2]]}', "takes 'inputs', not 'input_ids'"),
    (_ONE_SAMPLE + b'"deadline_ms": -5}', "deadline_ms must be a positive, finite number"),
    (_ONE_SAMPLE + b'"deadline_ms": 1' + b"0" * 400 + b"}",  # overflows a float
     "deadline_ms must be a positive, finite number"),
    (b"[" * 100_000, "nests JSON too deeply"),
    (_ONE_SAMPLE + b'"attention_mask": [[1]]}', "attention_mask goes with input_ids"),
])
def test_bad_input_is_400_with_the_reason(cnn_server, body: bytes, message: str) -> None:
    server = cnn_server[0]
    status, doc = _json(server.url + "/v1/predict", body=body)
    assert status == 400, doc
    assert doc["type"] == "BadRequest" and message in doc["error"], doc["error"]


def test_a_body_that_stalls_is_408_and_closes_the_connection() -> None:
    net, policy, _ = _tiny_cnn()
    with ServingEngine(net, policy) as engine, serve_http(engine, port=0,
                                                          idle_timeout_s=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 100\r\n\r\n{\"inputs\"")
            reply = b""
            while chunk := conn.recv(4096):  # the server answers, then closes
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"did not arrive in time (100 bytes announced)" in body
        assert _json(server.url + "/healthz")[0] == 200  # still serving


def test_routes_methods_and_body_limits(cnn_server) -> None:
    server = cnn_server[0]
    status, doc = _json(server.url + "/v2/predict", {"inputs": [[0]]})
    assert status == 404 and "no route /v2/predict" in doc["error"]
    status, headers, _ = _call(server.url + "/v1/predict")
    assert status == 405 and headers["Allow"] == "POST"
    status, doc = _json(server.url + "/v1/stats", {"inputs": [[0]]})
    assert status == 405
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/predict")
    conn.endheaders()  # no Content-Length
    reply = conn.getresponse()
    assert reply.status == 411 and "Content-Length" in json.loads(reply.read())["error"]
    conn.close()
    # keep-alive: several calls on one connection
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/healthz")
        reply = conn.getresponse()
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
    conn.close()


def test_body_and_sample_limits() -> None:
    net, policy, x = _tiny_cnn()
    with (ServingEngine(net, policy) as engine,
          serve_http(engine, port=0, max_body_bytes=2048, max_samples=2) as server):
        status, doc = _json(server.url + "/v1/predict", {"inputs": x[:3].tolist()})
        assert status == 413 and "at most 2048" in doc["error"]
        status, doc = _json(server.url + "/v1/predict", {"inputs": [[[0.0]]] * 3})
        assert status == 400 and "at most 2" in doc["error"]


def test_parse_predict_units() -> None:
    call = parse_predict(b'{"input_ids": [[1, 2, 0]], "attention_mask": [[1, 1, 0]]}',
                         InputSpec("input_ids", (None,)))
    assert call.x.dtype == torch.int64 and call.x.shape == (1, 3)
    assert call.row_inputs["attention_mask"].tolist() == [[1, 1, 0]]
    x, rows = call.sample(0)
    assert x.shape == (3,) and rows["attention_mask"].shape == (3,)
    for body, message in [
        (b'{"input_ids": [[1.5, 2]]}', "must hold integers"),
        (b'{"input_ids": [[1, 2]], "attention_mask": [[1]]}', "must match"),
        (b'{"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}', "0 (padding) and 1"),
        (b'{"input_ids": [[[1, 2]]]}', "(n, L) token ids"),
        (b'{"input_ids": [[]]}', "input_ids holds no values"),
        (b'{"input_ids": [[]], "attention_mask": [[]]}', "input_ids holds no values"),
        (b'{"input_ids": [[1]], "deadline_ms": 5e-324}', "deadline_ms must be a positive"),
    ]:
        with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_predict(body, InputSpec("input_ids", (None,)))
    assert parse_predict(b'{"inputs": [[1, 2]], "deadline_ms": 250}').deadline_s == 0.25
    limited = InputSpec("input_ids", (None,), vocab_size=10, max_length=3)
    assert parse_predict(b'{"input_ids": [[0, 9, 9]]}', limited).x.tolist() == [[0, 9, 9]]
    for body, message in [(b'{"input_ids": [[0, 10]]}', r"in \[0, 10\).*got 10"),
                          (b'{"input_ids": [[-3, 1]]}', "got -3"),
                          (b'{"input_ids": [[1, 1, 1, 1]]}', "4 tokens.*at most 3")]:
        with pytest.raises(BadRequest, match=message):
            parse_predict(body, limited)


def test_unknown_architecture_shapes_are_probed() -> None:
    """A network without a recorded architecture: a shape it refuses is a 400 (found by
    running one sample), the shapes it takes are served."""
    net = _toy_net()
    policy = MaxProb([1.0, 0.0])
    x = torch.randn(5, 4)
    ref = simulate(net, policy, x)
    with ServingEngine(net, policy, TOY_CONFIG) as engine, serve_http(engine, port=0) as server:
        assert server.spec.shape is None and server.probe is not None
        for _ in range(2):  # the second time from the probe's cache
            status, doc = _json(server.url + "/v1/predict", {"inputs": [[1.0, 2.0]] * 2})
            assert status == 400 and "does not take samples of shape (2,)" in doc["error"]
        status, doc = _json(server.url + "/v1/predict", {"inputs": x.tolist()})
        assert status == 200
        _check_outputs(doc["outputs"], ref, range(5))
        assert engine.snapshot().submitted == 5


class _OutOfMemoryOnce(nn.Module):
    """A stage whose next call, once ``armed``, runs out of memory (the server's probe makes
    it)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.armed = False
            raise torch.OutOfMemoryError("out of memory (injected)")
        return h


def test_a_probe_that_runs_out_of_memory_refuses_nothing() -> None:
    torch.manual_seed(0)
    net = MultiExitNetwork([_OutOfMemoryOnce(), _Toy()],
                           [ExitHead.linear(4, 3), ExitHead.linear(4, 3)])
    policy = MaxProb([1.0, 0.0])
    x = torch.randn(3, 4)
    ref = simulate(net, policy, x)
    net.stages[0].armed = True
    with ServingEngine(net, policy, TOY_CONFIG) as engine, serve_http(engine, port=0) as server:
        assert server.probe is not None
        for _ in range(2):  # the failed probe is not remembered as the shape's verdict
            status, doc = _json(server.url + "/v1/predict", {"inputs": x.tolist()})
            assert status == 200, doc
            _check_outputs(doc["outputs"], ref, range(3))
        assert not net.stages[0].armed and engine.snapshot().failed == 0


# -- engine errors -----------------------------------------------------------------------------


def test_queue_full_is_429() -> None:
    net = _toy_net()
    cfg = ServingConfig(queue_size=1, max_wait_ms=0.0, rebatch="always")
    slow = [[7.0, 0.0, 0.0, 0.0]]
    with (ServingEngine(net, MaxProb([1.0, 0.0]), cfg) as engine,
          serve_http(engine, port=0) as server):
        url = server.url + "/v1/predict"
        status, headers, body = _call(url, {"inputs": [[0.0] * 4] * 2})  # 2 > queue_size
        assert status == 429 and headers["Retry-After"] == "1"
        assert json.loads(body)["type"] == "QueueFull"
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(_json, url, {"inputs": slow})
            _until_admitted(engine, 1)  # its stage sleeps 0.3 s: the others queue behind it
            later = [pool.submit(_json, url, {"inputs": slow}) for _ in range(3)]
            replies = [first.result()] + [f.result() for f in later]
        assert replies[0][0] == 200
        codes = sorted(status for status, _ in replies)
        assert 429 in codes and set(codes) <= {200, 429}, codes
        for status, doc in replies:
            if status == 429:
                assert doc["type"] == "QueueFull" and "queue is full" in doc["error"]
        assert engine.snapshot().rejected == 2 + codes.count(429)


def test_stage_failure_is_500_deadline_504_closed_503() -> None:
    net = _toy_net()
    with ServingEngine(net, MaxProb([1.0, 0.0]), TOY_CONFIG) as engine:
        server = serve_http(engine, port=0)
        url = server.url + "/v1/predict"
        status, doc = _json(url, {"inputs": [[13.0, 0, 0, 0]]})
        assert status == 500 and doc["type"] == "StageFailed", doc
        assert doc["index"] == 0 and "stage 0" in doc["error"], doc
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(_json, url, {"inputs": [[7.0, 0, 0, 0]]})
            _until_admitted(engine, 2)  # the refused 13, then the slow 7
            status, doc = _json(url, {"inputs": [[1.0, 0, 0, 0]], "deadline_ms": 50})
            assert slow.result()[0] == 200
        assert status == 504 and doc["type"] == "DeadlineExceeded", doc
        engine.close()
        status, doc = _json(url, {"inputs": [[1.0, 0, 0, 0]]})
        assert status == 503 and doc["type"] == "EngineClosed"
        assert _json(server.url + "/healthz") == (503, {"status": "closed"})
        stats = engine.snapshot()
        assert stats.failed == 2 and stats.deadline_errors == 1 and stats.answered == 1
        server.close()


# -- statistics, metrics, shutdown ---------------------------------------------------------


def test_metrics_in_prometheus_text(cnn_server) -> None:
    pytest.importorskip("prometheus_client")
    server, net, policy, x = cnn_server
    assert _json(server.url + "/v1/predict", {"inputs": x[:6].tolist()})[0] == 200
    status, headers, body = _call(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    exits = torch.bincount(simulate(net, policy, x[:6]).exit_index, minlength=3).tolist()
    for line in ["eenet_serving_submitted_total 6.0", "eenet_serving_answered_total 6.0",
                 "eenet_serving_rejected_total 0.0", "eenet_serving_queue_depth 0.0",
                 *(f'eenet_serving_exit_answers_total{{exit="{k}"}} {n:.1f}'
                   for k, n in enumerate(exits)),
                 'eenet_serving_stage_rows_total{stage="0"} 6.0',
                 'eenet_serving_stage_pending{stage="0"} 0.0']:
        assert line in text.splitlines(), line
    for name in ["eenet_serving_stage_mean_batch_size{stage=\"0\"}",
                 "eenet_serving_latency_seconds{quantile=\"0.99\"}",
                 "eenet_serving_uptime_seconds"]:
        assert any(ln.startswith(name + " ") for ln in text.splitlines()), name


def test_metrics_without_prometheus_client_is_404() -> None:
    net, policy, _ = _tiny_cnn()
    with ServingEngine(net, policy) as engine, serve_http(engine, port=0,
                                                          metrics=False) as server:
        status, doc = _json(server.url + "/metrics")
        assert status == 404 and "serve extra" in doc["error"]


def test_collector_reads_the_snapshot_at_scrape_time() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from eenet.serving.prometheus import register_metrics

    net, policy, x = _tiny_cnn()
    costs = Costs([1.0, 2.0, 3.0], "flops")
    with ServingEngine(net, policy, ServingConfig(costs=costs, budget=0.5)) as engine:
        registry = prometheus_client.CollectorRegistry()
        register_metrics(engine, registry, labels={"model": "tiny"})
        with pytest.raises(ValueError, match="Duplicated"):
            register_metrics(engine, registry)
        value = registry.get_sample_value
        assert value("eenet_serving_answered_total", {"model": "tiny"}) == 0
        for f in engine.submit_many(x[:5]):
            f.result(timeout=30)
        assert value("eenet_serving_answered_total", {"model": "tiny"}) == 5
        stats = engine.snapshot()
        assert value("eenet_serving_cost_per_sample", {"model": "tiny", "unit": "flops"}
                     ) == pytest.approx(stats.cost_per_sample)
        assert value("eenet_serving_budget", {"model": "tiny", "unit": "flops"}
                     ) == pytest.approx(stats.budget)


def test_close_answers_the_calls_in_flight_then_refuses() -> None:
    net = _toy_net()
    with ServingEngine(net, MaxProb([1.0, 0.0]), TOY_CONFIG) as engine:
        server = serve_http(engine, port=0)
        url = server.url + "/v1/predict"
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_json, url, {"inputs": [[7.0, 0, 0, 0]]})
            _until_admitted(engine, 1)
            server.close()
            status, doc = slow.result()
        assert status == 200 and doc["outputs"][0]["exit"] == 1
        assert not server._thread.is_alive()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url, timeout=5)
        server.close()  # idempotent
        assert not engine.closed  # the engine is the caller's


class _Held(nn.Module):
    """A stage that holds a batch with a 7 until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if bool((h == 7).any()):
            assert self.release.wait(20), "the test never released the stage"
        return h


def test_close_answers_the_call_in_flight_then_ends_every_keep_alive_connection() -> None:
    release = threading.Event()
    torch.manual_seed(0)
    net = MultiExitNetwork([_Held(release), _Toy()],
                           [ExitHead.linear(4, 3), ExitHead.linear(4, 3)])
    with ServingEngine(net, MaxProb([1.0, 0.0]), TOY_CONFIG) as engine:
        server = serve_http(engine, port=0)
        host, port = server.server_address[:2]
        busy, idle, quiet = (http.client.HTTPConnection(host, port, timeout=30)
                             for _ in range(3))
        for conn in (idle, quiet):  # open, one call answered, kept alive
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"ok"}'

        def slow_call() -> tuple[int, str | None, Any]:
            busy.request("POST", "/v1/predict", json.dumps({"inputs": [[7.0, 0, 0, 0]]}),
                         {"Content-Type": "application/json"})
            reply = busy.getresponse()
            return reply.status, reply.getheader("Connection"), json.loads(reply.read())

        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(slow_call)
            _until_admitted(engine, 1)
            closing = pool.submit(server.close)
            end = time.monotonic() + 10
            while not server.closing:
                assert time.monotonic() < end, "close() never began"
                time.sleep(0.001)
            # the listening socket is closed: a new connection is refused, not queued
            end = time.monotonic() + 10
            while server.socket.fileno() != -1:
                assert time.monotonic() < end, "the listening socket stayed open"
                time.sleep(0.001)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, port), timeout=5).close()
            # a new call on an open connection while the call in flight is answered: 503
            idle.request("GET", "/healthz")
            reply = idle.getresponse()
            assert reply.status == 503 and reply.getheader("Connection") == "close"
            assert json.loads(reply.read())["type"] == "ServerClosing"
            release.set()
            status, connection, doc = slow.result(timeout=30)
            closing.result(timeout=30)
        assert status == 200 and doc["outputs"][0]["exit"] == 1
        assert connection == "close"  # the call in flight was that connection's last
        # the connection left idle is closed by the server (EOF), not left to time out
        quiet.sock.settimeout(5)
        assert quiet.sock.recv(1) == b""
        assert not engine.closed


def test_serves_on_the_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    net = _toy_net()
    x = [[1.0, 2.0, 3.0, 4.0]]
    ref = simulate(net, MaxProb([1.0, 0.0]), torch.tensor(x))
    with (ServingEngine(net, MaxProb([1.0, 0.0]), TOY_CONFIG) as engine,
          serve_http(engine, host="::1", port=0) as server):
        assert server.address_family == socket.AF_INET6
        assert server.url == f"http://[::1]:{server.port}"
        status, doc = _json(server.url + "/v1/predict", {"inputs": x})
        assert status == 200
        _check_outputs(doc["outputs"], ref, [0])


@pytest.mark.parametrize("interrupts", [1, 2])
def test_run_http_drains_on_one_interrupt_and_fails_the_pending_on_two(
        interrupts: int) -> None:
    release = threading.Event()
    torch.manual_seed(0)
    net = MultiExitNetwork([_Held(release), _Toy()],
                           [ExitHead.linear(4, 3), ExitHead.linear(4, 3)])
    engine = ServingEngine(net, MaxProb([1.0, 0.0]), TOY_CONFIG).start()
    servers: list[Any] = []
    listening = threading.Event()
    replies: list[Any] = []

    def ready(server: Any) -> None:
        servers.append(server)
        listening.set()

    def drive() -> None:  # from another thread: run_http holds the main one
        try:
            assert listening.wait(30)
            server = servers[0]
            url = server.url + "/v1/predict"
            with ThreadPoolExecutor(3) as pool:
                held = pool.submit(_json, url, {"inputs": [[7.0, 0, 0, 0]]})
                _until_admitted(engine, 1)  # holds stage 0: the next two queue behind it
                queued = [pool.submit(_json, url, {"inputs": [[1.0, 0, 0, 0]]})
                          for _ in range(2)]
                _until_admitted(engine, 3)
                os.kill(os.getpid(), signal.SIGINT)
                _wait_for(lambda: server.closing)
                if interrupts == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                    _wait_for(lambda: engine.closed)
                release.set()
                replies.extend(f.result(timeout=30) for f in [held, *queued])
        finally:
            release.set()

    driver = threading.Thread(target=drive)
    driver.start()
    run_http(engine, port=0, on_ready=ready)  # returns once closed
    driver.join(30)
    assert len(replies) == 3
    if interrupts == 1:  # drained: every call admitted is answered
        assert [status for status, _ in replies] == [200] * 3, replies
    else:  # the requests not answered yet fail
        assert all(status == 503 and doc["type"] == "EngineClosed" for status, doc in replies)
    assert engine.closed and engine.snapshot().queue_depth == 0


# -- eenet serve -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: os.PathLike) -> tuple[str, str, MultiExitNetwork, MaxProb]:
    net, policy, _ = _tiny_cnn()
    model = os.path.join(tmp_path, "model.pt")
    save_model(net, model, meta={"dataset": "digits"})
    path = os.path.join(tmp_path, "policy.json")
    save_policy(policy, path, Costs([1.0, 2.0, 3.0], "flops"), 0.5,
                {"dataset": "digits", "model_fingerprint": fingerprint(net)})
    return model, path, net, policy


def _fail_if_started(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the server was started")


@pytest.mark.parametrize(("extra", "message"), [
    (["--port", "70000"], "argument --port: a port is in 0..65535"),
    (["--port", "http"], "argument --port: expected a port number"),
    (["--max-batch", "0"], "argument --max-batch: expected a positive integer"),
    (["--max-wait-ms", "-1"], "argument --max-wait-ms: expected a number >= 0"),
    (["--queue-size", "many"], "argument --queue-size: expected a positive integer"),
    (["--on-full", "drop"], "argument --on-full: invalid choice: 'drop'"),
    (["--threads", "0"], "argument --threads: expected a positive integer"),
    (["--host", ""], "argument --host: expected a host name"),
    (["--ray", "--port", "0"], "--port 0 (any free port) works without --ray only"),
])
def test_cli_serve_argument_errors(saved, extra: list[str], message: str,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("eenet.serving.http.run_http", _fail_if_started)
    model, policy, _, _ = saved
    assert cli.main(["serve", model, policy, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eenet serve: error: ") and message in err, err


def test_cli_serve_file_errors(saved, tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("eenet.serving.http.run_http", _fail_if_started)
    model, policy, _, _ = saved
    assert cli.main(["serve", model]) == 2
    assert "required: POLICY" in capsys.readouterr().err
    assert cli.main(["serve", os.path.join(tmp_path, "none.pt"), policy]) == 2
    assert "none.pt does not exist" in capsys.readouterr().err
    assert cli.main(["serve", model, model]) == 2
    assert "not an eenet policy file" in capsys.readouterr().err
    torch.manual_seed(1)
    other = os.path.join(tmp_path, "other.pt")
    save_model(models.small_cnn(in_channels=1, num_classes=10, image_size=8,
                                widths=(8, 16, 16), head_width=4), other)
    assert cli.main(["serve", other, policy]) == 2
    assert "calibrated for another model" in capsys.readouterr().err
    two = os.path.join(tmp_path, "two.pt")
    save_model(models.small_cnn(in_channels=1, num_classes=10, image_size=8, widths=(8, 16),
                                head_width=4), two)
    assert cli.main(["serve", two, policy]) == 2
    assert "exits" in capsys.readouterr().err


def test_cli_serve_ray_without_the_extra(saved, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from eenet.serving import ray_app

    def missing() -> None:
        raise MissingExtraError("serving with Ray needs the Python package 'ray'; it comes "
                                "with the serve extra", name="ray")

    monkeypatch.setattr(ray_app, "require_ray", missing)
    monkeypatch.setattr(ray_app, "run_ray", _fail_if_started)
    model, policy, _, _ = saved
    assert cli.main(["serve", model, policy, "--ray"]) == 2
    assert "serve extra" in capsys.readouterr().err


def test_cli_serve_runs_until_interrupted(saved) -> None:
    """``eenet serve`` in a process of its own: answers like the oracle, stops on SIGINT
    with exit code 0."""
    model, policy_path, net, policy = saved
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eenet", "serve", model, policy_path,
                             "--port", "0", "--threads", "1", "--max-wait-ms", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()),
                                  daemon=True)
        reader.start()
        reader.join(60)
        assert lines and "listening on http://127.0.0.1:" in lines[0], lines
        url = lines[0].split("listening on ")[1].split()[0]
        x = torch.randn(6, *SAMPLE)
        status, doc = _json(url + "/v1/predict", {"inputs": x.tolist()})
        assert status == 200, doc
        _check_outputs(doc["outputs"], simulate(net, policy, x), range(6))
        status, stats = _json(url + "/v1/stats")
        assert stats["answered"] == 6 and stats["cost_unit"] == "flops"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
