"""Model / policy files, the ``eenet`` command line and a short run of the demo."""

from __future__ import annotations

import json
import os

import pytest
import torch

from eenet import cli, demo, models
from eenet.budget import Costs
from eenet.policies import EENet, Entropy, ExitPolicy, MaxProb, Patience
from eenet.saving import load_model, load_policy, save_model, save_policy

CONFIG = {"in_channels": 1, "num_classes": 10, "image_size": 8}


@pytest.fixture
def model_file(tmp_path: os.PathLike) -> str:
    torch.manual_seed(0)
    net = models.small_cnn(**CONFIG).eval()
    path = os.path.join(tmp_path, "model.pt")
    save_model(net, path, "small_cnn", CONFIG, {"seed": 0})
    return path


def test_model_round_trip(model_file: str) -> None:
    net, meta = load_model(model_file)
    torch.manual_seed(0)
    original = models.small_cnn(**CONFIG).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for a, b in zip(net(x), original(x), strict=True):
            torch.testing.assert_close(a, b)
    assert meta == {"seed": 0}


def test_model_file_mismatch(tmp_path: os.PathLike, model_file: str) -> None:
    junk = os.path.join(tmp_path, "junk.pt")
    with open(junk, "wb") as f:
        f.write(b"not a model")
    with pytest.raises(ValueError, match="not an eenet model file"):
        load_model(junk)
    other = os.path.join(tmp_path, "other.pt")
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="expected format"):
        load_model(other)
    blob = torch.load(model_file, weights_only=True)
    blob["config"] = {**CONFIG, "head_width": 4}
    torch.save(blob, other)
    with pytest.raises(ValueError, match="weights do not match architecture 'small_cnn'"):
        load_model(other)
    blob["arch"] = "resnet9000"
    torch.save(blob, other)
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'"):
        load_model(other)


def _policies() -> list[ExitPolicy]:
    weights = [torch.randn(10 + 2 + k) for k in range(4)]
    return [MaxProb([0.9, 0.8, 0.7, 0.0]), Entropy([0.5, 0.4, 0.3, 0.0]),
            Patience([1.0, 1.0, 2.0, 0.0]), EENet([0.6, 0.5, 0.4, 0.0], weights, [0.1] * 4)]


@pytest.mark.parametrize("policy", _policies(), ids=lambda p: type(p).__name__)
def test_policy_round_trip(policy: ExitPolicy, tmp_path: os.PathLike) -> None:
    path = os.path.join(tmp_path, "policy.json")
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    save_policy(policy, path, costs, 0.5)
    loaded, loaded_costs, info = load_policy(path, num_exits=4)
    assert type(loaded) is type(policy)
    assert loaded.thresholds == policy.thresholds
    assert loaded_costs == costs and info["budget"] == 0.5
    logits = [torch.randn(20, 10) for _ in range(4)]
    for a, b in zip(loaded.decide(logits), policy.decide(logits), strict=True):
        torch.testing.assert_close(a, b)


def test_policy_file_mismatch(tmp_path: os.PathLike) -> None:
    path = os.path.join(tmp_path, "policy.json")
    save_policy(MaxProb([0.9, 0.0]), path, Costs([1.0, 2.0], "flops"))
    with pytest.raises(ValueError, match="2 exit rules but the network has 4 exits"):
        load_policy(path, num_exits=4)
    with open(path, "w") as f:
        json.dump({"format": "something-else"}, f)
    with pytest.raises(ValueError, match="not an eenet policy file"):
        load_policy(path)
    with open(path, "w") as f:
        f.write("{ not json")
    with pytest.raises(ValueError, match="not an eenet policy file"):
        load_policy(path)
    with open(path, "w") as f:
        json.dump({"format": "eenet-policy/1", "policy": {"class": "Oracle"},
                   "costs": {"values": [1.0], "unit": "ms"}}, f)
    with pytest.raises(ValueError, match="unknown policy class 'Oracle'"):
        load_policy(path)


def test_cli_calibrate_and_report(model_file: str, tmp_path: os.PathLike,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    policy_file = os.path.join(tmp_path, "p.json")
    assert cli.main(["calibrate", "--model", model_file, "--dataset", "digits", "--policy",
                     "maxprob", "--budget", "0.6", "--out", policy_file]) == 0
    assert "achieved" in capsys.readouterr().out
    policy, costs, _ = load_policy(policy_file, num_exits=4)
    assert isinstance(policy, MaxProb) and costs.unit == "flops"
    assert cli.main(["report", "--model", model_file, "--policy", policy_file, "--dataset",
                     "digits"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "samples per exit" in out


def test_cli_errors(model_file: str, tmp_path: os.PathLike,
                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["calibrate", "--model", model_file, "--dataset", "digits", "--budget",
                     "0.01", "--out", os.path.join(tmp_path, "p.json")]) == 2
    assert "below the cost of the first exit" in capsys.readouterr().err
    assert cli.main(["report", "--model", os.path.join(tmp_path, "missing.pt"), "--policy",
                     "x.json", "--dataset", "digits"]) == 2


def test_demo_short_run(tmp_path: os.PathLike, capsys: pytest.CaptureFixture[str]) -> None:
    rows = demo.main(("digits",), epochs=1, out_dir=str(tmp_path), budgets=(0.5,),
                     progress=False)
    assert {r.policy for r in rows} == {"MaxProb", "Entropy", "Patience", "EENet"}
    for r in rows:
        assert 0.0 <= r.low <= r.accuracy <= r.high <= 1.0
    out = capsys.readouterr().out
    assert "compact mode takes the oracle's exit for 100.0%" in out
    assert os.path.exists(os.path.join(tmp_path, "accuracy_vs_cost.png"))
    assert os.path.exists(os.path.join(tmp_path, "digits_model.pt"))
