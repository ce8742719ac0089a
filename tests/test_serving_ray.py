"""The Ray Serve deployment (eenet.serving.ray_app): a local one-CPU Ray on the loopback
interface, the saved tiny model and policy deployed on a free port, concurrent HTTP calls
checked against the offline oracle. Skipped where Ray is not installed (the serve extra).
Ray's start, the deployment and the shutdown take about 20 s here."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from test_serving_http import _call, _check_outputs, _json, _tiny_cnn

from eenet import models
from eenet.budget import Costs
from eenet.data import MissingExtraError
from eenet.policies import MaxProb
from eenet.runtime import simulate
from eenet.saving import fingerprint, save_model, save_policy

# Ray Serve's own pydantic models warn when Ray is first imported
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using extra keyword arguments on `Field`:DeprecationWarning")
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (the serve extra)")
COSTS = Costs([1.0, 2.0, 3.0], "flops")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Any, MaxProb, Any]:
    net, policy, x = _tiny_cnn()
    folder = tmp_path_factory.mktemp("ray_app")
    model, path = str(folder / "model.pt"), str(folder / "policy.json")
    save_model(net, model, meta={"dataset": "digits"})
    save_policy(policy, path, COSTS, 0.5, {"model_fingerprint": fingerprint(net)})
    return model, path, net, policy, x


@pytest.fixture(scope="module")
def app_url(files) -> Iterator[str]:
    from eenet.serving import ray_app

    model, policy, _, _, _ = files
    ray = ray_app.start_ray(num_cpus=1)
    from ray import serve

    port = _free_port()
    try:
        ray_app.deploy(model, policy, port=port, max_batch=16, max_wait_ms=2.0, threads=1,
                       ray_batch_size=8, ray_batch_wait_s=0.005,
                       ray_actor_options={"num_cpus": 1})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@needs_ray
def test_concurrent_calls_match_the_oracle_on_ray(files, app_url: str) -> None:
    _, _, net, policy, x = files
    ref = simulate(net, policy, x)
    spans = [(a, min(a + 4, len(x))) for a in range(0, len(x), 4)]

    def post(span: tuple[int, int]) -> tuple[int, Any]:
        return _json(app_url + "/v1/predict", {"inputs": x[span[0]:span[1]].tolist()})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, spans))
    for (a, b), (status, doc) in zip(spans, replies, strict=True):
        assert status == 200, doc
        _check_outputs(doc["outputs"], ref, range(a, b))
    status, stats = _json(app_url + "/v1/stats")
    assert status == 200
    assert stats["submitted"] == stats["answered"] == len(x)
    assert stats["exits"] == torch.bincount(ref.exit_index, minlength=3).tolist()
    assert stats["cost_unit"] == "flops" and stats["budget"] == pytest.approx(1.5)


@needs_ray
def test_routes_and_errors_on_ray(app_url: str) -> None:
    status, doc = _json(app_url + "/v1/predict", {"inputs": [[1.0, 2.0]]})
    assert status == 400 and "shape (1, 8, 8)" in doc["error"]
    status, doc = _json(app_url + "/v1/predict", body=b"{oops")
    assert status == 400 and "not valid JSON" in doc["error"]
    status, headers, _ = _call(app_url + "/v1/predict")
    assert status == 405 and headers["Allow"] == "POST"
    assert _json(app_url + "/v1/nothing")[0] == 404
    assert _json(app_url + "/healthz") == (200, {"status": "ok"})
    if importlib.util.find_spec("prometheus_client") is not None:
        status, headers, body = _call(app_url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert any(line.startswith("eenet_serving_answered_total ")
                   for line in body.decode().splitlines())


@needs_ray
def test_build_app_checks_the_files_in_the_caller(files, tmp_path: os.PathLike) -> None:
    from eenet.serving.ray_app import build_app

    model, policy, _, _, _ = files
    torch.manual_seed(1)
    other = os.path.join(tmp_path, "other.pt")
    save_model(models.small_cnn(in_channels=1, num_classes=10, image_size=8,
                                widths=(8, 16, 16), head_width=4), other)
    with pytest.raises(ValueError, match="calibrated for another model"):
        build_app(other, policy)
    with pytest.raises(FileNotFoundError):
        build_app(os.path.join(tmp_path, "none.pt"), policy)
    with pytest.raises(ValueError, match="max_batch"):
        build_app(model, policy, max_batch=0)


@needs_ray
def test_failed_samples_leave_no_unretrieved_future_behind(files, caplog) -> None:
    """A call whose samples fail (a 1 ns deadline) is answered 504, and asyncio has nothing
    to complain about when the futures it waited on are collected (it logged "Future
    exception was never retrieved" once per failed sample)."""
    import asyncio
    import gc
    import json

    from eenet.serving import ray_app
    from eenet.serving.http import parse_predict

    model, policy, _, _, x = files
    replica = ray_app.EENetReplica(model, policy, {"max_batch": 4}, metrics_interval_s=0)
    try:
        call = parse_predict(json.dumps({"inputs": x[:3].tolist(), "deadline_ms": 1e-6}),
                             replica.spec)
        with caplog.at_level("ERROR", logger="asyncio"):
            (status, reply), = asyncio.run(replica._run_batch([call]))
            gc.collect()
        assert status == 504 and reply["type"] == "DeadlineExceeded"
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        replica.engine.close()


def test_missing_ray_names_the_serve_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from eenet.serving import ray_app

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(MissingExtraError, match=r"serve extra: pip install "
                       r"\"eenet-kernels\[serve\]\""):
        ray_app.require_ray()
    with pytest.raises(MissingExtraError, match="serve extra"):
        ray_app.build_app("model.pt", "policy.json")


def test_missing_prometheus_client_names_the_serve_extra(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from eenet.serving import prometheus

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MissingExtraError, match="serve extra"):
        prometheus.register_metrics(object())
