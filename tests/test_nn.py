"""eenet.nn: exit heads, MultiExitNetwork and attach_exits on Sequential, ResNet-like and
transformer-encoder backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import eenet_kernels as ek
from eenet.budget import count_flops
from eenet.nn import (
    ChainStage,
    ExitHead,
    FirstToken,
    MultiExitNetwork,
    attach_exits,
    conv_head_shape,
)

C = 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- models built for the tests


class BasicBlock(nn.Module):
    """torchvision-style residual block (conv-bn-relu-conv-bn + shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """ResNet-like: conv1, bn1, relu, maxpool, layer1..layer3, avgpool, fc (flatten in forward)."""

    def __init__(self, num_classes: int = C) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 24, stride=2), BasicBlock(24, 24))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ShuffledResNet(TinyResNet):
    """Children registered in one order, run in another: attach_exits must notice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x) + 1.0
        x = self.layer3(self.layer2(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TupleLayer(nn.Module):
    """An HF-style layer: returns a tuple whose first element is the hidden states."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inner = nn.TransformerEncoderLayer(hidden, 2, 2 * hidden, dropout=0.0,
                                                batch_first=True)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.inner(h), None


class TinyEncoder(nn.Module):
    """embed -> layers (ModuleList) -> norm -> fc on the first token."""

    def __init__(self, vocab: int = 20, hidden: int = 16, depth: int = 4, num_classes: int = C,
                 tuple_layers: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        if tuple_layers:
            self.layers = nn.ModuleList(TupleLayer(hidden) for _ in range(depth))
        else:
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(hidden, 2, 2 * hidden, dropout=0.0, batch_first=True)
                for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
            if isinstance(h, tuple):
                h = h[0]
        return self.fc(self.norm(h)[:, 0])


def conv_sequential() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),          # 0 1 2
        nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU(),                  # 3 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, C))              # 5 6 7


def warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    model.eval()


def assert_shared(net: MultiExitNetwork, backbone: nn.Module) -> None:
    """Every backbone parameter is in the network as the same tensor, not a copy."""
    net_params = {id(p): p for p in net.parameters()}
    for name, p in backbone.named_parameters():
        assert id(p) in net_params, f"backbone parameter {name} is not in the network"
        assert net_params[id(p)].data_ptr() == p.data_ptr()


# ---------------------------------------------------------------- ExitHead


def _head_and_input(kind: str) -> tuple[ExitHead, torch.Tensor]:
    if kind == "conv":
        return ExitHead.conv(6, C, width=10), torch.randn(4, 6, 5, 7)
    if kind == "token":
        return ExitHead.token(12, C), torch.randn(4, 9, 12)
    if kind == "linear2d":
        return ExitHead.linear(12, C), torch.randn(4, 12)
    return ExitHead.linear(3 * 2 * 2, C), torch.randn(4, 3, 2, 2)


@pytest.mark.parametrize("kind", ["conv", "token", "linear2d", "linear4d"])
@pytest.mark.parametrize("training", [False, True])
def test_head_forward_matches_reference(kind: str, training: bool) -> None:
    head, h = _head_and_input(kind)
    head.train(training)  # in training mode BatchNorm uses the batch's statistics: same batch
    with torch.no_grad():
        feats = head.features(h)
        ref = ek.reference.exit_logits(feats, head.classifier.weight, head.classifier.bias)
        out = head(h)
    assert out.shape == (4, C)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_head_feature_shapes() -> None:
    conv = ExitHead.conv(6, C)
    assert conv.features(torch.randn(2, 6, 3, 4)).shape == (2, 6, 12)  # width = in_channels
    assert conv.classifier.weight.shape == (C, 6) and conv.classifier.bias.shape == (C,)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in conv.body.modules())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in conv.body.modules())
    assert n_conv == 3 and n_bn == 3
    token = ExitHead.token(8, C)
    assert token.features(torch.randn(2, 5, 8)).shape == (2, 8)
    lin = ExitHead.linear(24, C)
    assert lin.features(torch.randn(2, 2, 3, 4)).shape == (2, 24)
    assert lin.num_classes == C and lin.in_features == 24


def test_head_features_feed_the_fused_op() -> None:
    """What the runtime does: exit_score(features, classifier) gives the head's logits."""
    head, h = _head_and_input("conv")
    head.eval()
    with torch.no_grad():
        res = ek.exit_score(head.features(h), head.classifier.weight, head.classifier.bias,
                            policy="max_prob", threshold=0.5)
        torch.testing.assert_close(res.logits, head(h), rtol=1e-5, atol=1e-5)


def test_head_bad_construction() -> None:
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        ExitHead(nn.Identity(), nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        ExitHead.linear(4, 0)
    with pytest.raises(ValueError, match="width"):
        ExitHead.conv(4, 3, width=-1)
    head = ExitHead(nn.Identity(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, D, S\)"):
        head(torch.randn(2, 4, 1, 1))


# ---------------------------------------------------------------- MultiExitNetwork


def test_multi_exit_network_forward() -> None:
    stages = [nn.Linear(6, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 4))]
    heads = [ExitHead.linear(8, 3), ExitHead.linear(4, 3)]
    net = MultiExitNetwork(stages, heads)
    assert net.num_exits == 2 and net.num_classes == 3
    assert isinstance(net.stages, nn.ModuleList) and isinstance(net.heads, nn.ModuleList)
    x = torch.randn(7, 6)
    for training in (True, False):
        net.train(training)
        outs = net(x)
        assert isinstance(outs, list) and [o.shape for o in outs] == [(7, 3), (7, 3)]
    torch.testing.assert_close(outs[1], heads[1](stages[1](stages[0](x))))


def test_multi_exit_network_bad_construction() -> None:
    with pytest.raises(ValueError, match="at least one"):
        MultiExitNetwork([], [])
    with pytest.raises(ValueError, match="2 stages but 1 exit heads"):
        MultiExitNetwork([nn.Identity(), nn.Identity()], [ExitHead.linear(4, 3)])
    with pytest.raises(ValueError, match=r"disagree on the number of classes.*\[3, 4\]"):
        MultiExitNetwork([nn.Identity(), nn.Identity()],
                         [ExitHead.linear(4, 3), ExitHead.linear(4, 4)])
    with pytest.raises(TypeError, match="ExitHead"):
        MultiExitNetwork([nn.Identity()], [nn.Linear(4, 3)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a single Sequential"):
        MultiExitNetwork(nn.Sequential(nn.Identity()), [ExitHead.linear(4, 3)])  # type: ignore[arg-type]


# ---------------------------------------------------------------- attach_exits: Sequential


def test_attach_sequential() -> None:
    model = conv_sequential()
    x = torch.randn(4, 3, 8, 8)
    warm_bn(model, x)
    net = attach_exits(model, ["2", "4"], C, example_input=x, head_width=1.0, head_stride=1)
    assert net.num_exits == 3 and net.num_classes == C
    # the new modules follow the backbone's mode
    assert not any(m.training for m in net.modules())
    assert all(isinstance(s, ChainStage) for s in net.stages)
    assert net.stages[0].names == ("0", "1", "2") and net.stages[2].names == ("5", "6")
    assert net.stages[0].blocks[0] is model[0] and net.stages[1].blocks[0] is model[3]
    assert net.heads[-1].classifier is model[7]
    # auto heads: conv heads on 4-D activations, here as wide as the activation (the paper's)
    assert net.heads[0].features(torch.randn(2, 8, 8, 8)).shape == (2, 8, 64)
    assert net.heads[1].classifier.in_features == 12
    # the default: a quarter of the channels, stride 2 on the 8 x 8 activation, 1 on 4 x 4
    light = attach_exits(model, ["2", "4"], C, example_input=x)
    assert light.heads[0].features(torch.randn(2, 8, 8, 8)).shape == (2, 2, 16)
    assert light.heads[1].features(torch.randn(2, 12, 4, 4)).shape == (2, 3, 16)
    assert_shared(net, model)
    with torch.no_grad():
        outs = net(x)
        ref = model(x)
    assert [o.shape for o in outs] == [(4, C)] * 3
    torch.testing.assert_close(outs[-1], ref, rtol=0, atol=0)
    net.train()
    assert [o.shape for o in net(x)] == [(4, C)] * 3


def test_attach_sequential_mlp_linear_heads_and_shared_training() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, C))
    net = attach_exits(model, ["1", "3"], C, example_input=torch.randn(2, 6))
    assert [type(h.body) for h in net.heads] == [nn.Flatten] * 3
    before = model[0].weight.detach().clone()
    sum(o.sum() for o in net(torch.randn(3, 6))).backward()
    assert model[0].weight.grad is not None  # gradients reach the backbone's own weights
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(net.stages[0].blocks[0].weight, before + 1.0)


def test_attach_sequential_heads_without_example_input() -> None:
    model = conv_sequential()
    with pytest.raises(ValueError, match="example_input"):
        attach_exits(model, ["2"], C)  # auto cannot see the shapes of a CNN
    net = attach_exits(model, ["2"], C, head="conv")  # width read from the last conv/BN
    assert net.heads[0].body[0].in_channels == 8 and net.heads[0].classifier.in_features == 2
    assert net.heads[0].body[0].stride == (1, 1)  # the activation's size is unknown
    assert [o.shape for o in net(torch.randn(2, 3, 8, 8))] == [(2, C)] * 2


def test_attach_sequential_without_final_linear_adds_a_head() -> None:
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.Tanh())
    net = attach_exits(model, ["1"], 3, example_input=torch.randn(2, 6))
    assert net.num_exits == 2 and net.heads[-1].classifier.in_features == 7
    assert net.stages[-1].names == ("2", "3")


# ---------------------------------------------------------------- attach_exits: ResNet-like


def test_attach_resnet() -> None:
    model = TinyResNet()
    x = torch.randn(3, 3, 16, 16)
    warm_bn(model, x)
    net = attach_exits(model, ["layer1", "layer2"], C, example_input=x)
    assert net.num_exits == 3
    assert net.stages[0].names == ("conv1", "bn1", "relu", "maxpool", "layer1")
    assert net.stages[2].names == ("layer3", "avgpool")
    assert net.stages[1].blocks[0] is model.layer2
    assert net.heads[-1].classifier is model.fc
    assert isinstance(net.heads[-1].body, nn.Flatten)
    assert [h.body[0].in_channels for h in net.heads[:-1]] == [8, 16]
    assert [h.classifier.in_features for h in net.heads] == [2, 4, 24]  # light conv heads
    assert_shared(net, model)
    with torch.no_grad():
        outs = net(x)
        ref = model(x)
    assert [o.shape for o in outs] == [(3, C)] * 3
    torch.testing.assert_close(outs[-1], ref, rtol=1e-6, atol=1e-6)
    # the fused op consumes the last exit too: features (N, D) from Flatten(1)
    with torch.no_grad():
        h = x
        for stage in net.stages:
            h = stage(h)
        feats = net.heads[-1].features(h)
        assert feats.shape == (3, 24)
        ref_logits = ek.reference.exit_logits(feats, model.fc.weight, model.fc.bias)
        torch.testing.assert_close(ref_logits, ref, rtol=1e-5, atol=1e-5)


def test_attach_resnet_nested_names() -> None:
    model = TinyResNet()
    x = torch.randn(2, 3, 16, 16)
    warm_bn(model, x)
    net = attach_exits(model, ["layer2.0", "layer3.0"], C, example_input=x)
    assert net.stages[0].names[-2:] == ("layer1", "layer2.0")
    assert net.stages[1].names == ("layer2.1", "layer3.0")
    assert net.stages[2].names == ("layer3.1", "avgpool")
    assert net.stages[0].blocks[-1] is model.layer2[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x)[-1], model(x), rtol=1e-6, atol=1e-6)


def test_attach_bad_inputs() -> None:
    model = TinyResNet()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"unknown module name 'layer9'.*'layer1'"):
        attach_exits(model, ["layer9"], C, example_input=x)
    with pytest.raises(ValueError, match=r"not in forward order: 'layer1'.*before 'layer2'"):
        attach_exits(model, ["layer2", "layer1"], C, example_input=x)
    with pytest.raises(ValueError, match="same position"):
        attach_exits(model, ["layer3", "layer3.1"], C, example_input=x)
    with pytest.raises(ValueError, match=r"duplicate module names.*'layer1'"):
        attach_exits(model, ["layer1", "layer1"], C, example_input=x)
    with pytest.raises(ValueError, match=r"out_features=5, but num_classes=7"):
        attach_exits(model, ["layer1"], 7, example_input=x)
    with pytest.raises(ValueError, match="'fc' is the backbone's final classifier"):
        attach_exits(model, ["layer1", "fc"], C, example_input=x)
    with pytest.raises(ValueError, match="no block runs between 'avgpool' and the final"):
        attach_exits(model, ["avgpool"], C, example_input=x)
    with pytest.raises(ValueError, match=r"inside 'layer1.0' \(BasicBlock\)"):
        attach_exits(model, ["layer1.0.conv1"], C, example_input=x)
    with pytest.raises(ValueError, match="sequence of module names"):
        attach_exits(model, "layer1", C, example_input=x)
    with pytest.raises(ValueError, match="unknown head kind"):
        attach_exits(model, ["layer1"], C, head="mlp", example_input=x)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        attach_exits(model, ["layer1"], 0, example_input=x)
    with pytest.raises(ValueError, match="a token head needs a 3-D activation"):
        attach_exits(model, ["layer1"], C, head="token", example_input=x)
    for bad in (0, -2, 1.5, 0.0, True, "wide"):
        with pytest.raises(ValueError, match="head_width"):
            attach_exits(model, ["layer1"], C, example_input=x, head_width=bad)
    for bad in (0, 1.0, False):
        with pytest.raises(ValueError, match="head_stride"):
            attach_exits(model, ["layer1"], C, example_input=x, head_stride=bad)
    with pytest.raises(ValueError, match="does not reproduce"):
        attach_exits(ShuffledResNet(), ["layer1"], C, example_input=x)
    with pytest.raises(ValueError, match="unsupported backbone"):
        attach_exits(BasicBlock(3, 3), ["conv1"], C)
    seq = conv_sequential()
    with pytest.raises(ValueError, match=r"unknown module name '9'"):
        attach_exits(seq, ["9"], C)
    with pytest.raises(ValueError, match=r"not in forward order: '2'"):
        attach_exits(seq, ["4", "2"], C, example_input=torch.randn(2, 3, 8, 8))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, C))
    with pytest.raises(ValueError, match="no block runs between '1' and the final classifier"):
        attach_exits(mlp, ["1"], C)


# ---------------------------------------------------------------- attach_exits: encoders


def test_attach_encoder_with_classifier() -> None:
    model = TinyEncoder().eval()
    ids = torch.randint(0, 20, (3, 6))
    for example in (None, ids):  # encoder activations are (N, L, H): no example needed
        net = attach_exits(model, ["layers.0", "layers.2"], C, example_input=example)
        assert net.num_exits == 3
        assert net.stages[0].names == ("embed", "layers.0")
        assert net.stages[1].names == ("layers.1", "layers.2")
        assert net.stages[2].names == ("layers.3", "norm")
        assert net.stages[1].blocks[1] is model.layers[2]
        assert [h.classifier.in_features for h in net.heads] == [16, 16, 16]
        assert net.heads[0].features(torch.randn(3, 6, 16)).shape == (3, 16)  # token pooler
        assert net.heads[-1].classifier is model.fc
        assert_shared(net, model)
        with torch.no_grad():
            outs = net(ids)
            ref = model(ids)
        assert [o.shape for o in outs] == [(3, C)] * 3
        torch.testing.assert_close(outs[-1], ref, rtol=1e-5, atol=1e-5)


def test_attach_encoder_tuple_layers() -> None:
    model = TinyEncoder(tuple_layers=True).eval()
    ids = torch.randint(0, 20, (2, 5))
    net = attach_exits(model, ["layers.1"], C, example_input=ids)
    assert net.stages[0].unwrap == (False, True, True)
    with torch.no_grad():
        outs = net(ids)
        torch.testing.assert_close(outs[-1], model(ids), rtol=1e-5, atol=1e-5)
    assert outs[0].shape == (2, C)


def test_attach_transformer_encoder_stack() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    x = torch.randn(4, 7, 16)
    net = attach_exits(model, ["layers.0", "layers.1"], 3)
    assert net.num_exits == 3 and net.num_classes == 3
    assert net.stages[2].names == ("layers.2", "norm")
    assert all(isinstance(h.body.pool, FirstToken) for h in net.heads)  # token heads
    assert [h.classifier.in_features for h in net.heads] == [16, 16, 16]
    assert_shared(net, model)
    assert [o.shape for o in net(x)] == [(4, 3)] * 3
    model.eval()
    net2 = attach_exits(model, ["layers"], 3, example_input=x)  # a container: after its end
    assert net2.stages[0].names == ("layers.0", "layers.1", "layers.2")
    assert net2.stages[1].names == ("norm",)


def test_attach_nested_transformer_encoder() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.fc = nn.Linear(8, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.encoder(self.embed(ids))[:, 0])

    model = Wrapped().eval()
    ids = torch.randint(0, 10, (3, 4))
    net = attach_exits(model, ["encoder.layers.0"], 2, example_input=ids)
    assert net.stages[1].names == ("encoder.layers.1",)
    with torch.no_grad():
        torch.testing.assert_close(net(ids)[-1], model(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- exit head costs


class CifarResNet(nn.Module):
    """ResNet-like for 32 x 32 inputs: stem, four stages of two basic blocks (16..128 wide)."""

    def __init__(self, num_classes: int = C) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, stride=2), BasicBlock(64, 64))
        self.layer4 = nn.Sequential(BasicBlock(64, 128, stride=2), BasicBlock(128, 128))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


AFTER = ["layer1", "layer2", "layer3"]


def test_default_conv_heads_are_light() -> None:
    model = CifarResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    light = attach_exits(model, AFTER, C, example_input=x).flops(x)
    paper = attach_exits(model, AFTER, C, example_input=x, head_width=1.0,
                         head_stride=1).flops(x)
    assert light.backbone == paper.backbone  # the same backbone, only the heads differ
    assert all(f < 0.05 for f in light.head_fractions[:-1]), light.head_fractions
    assert all(f > 0.10 for f in paper.head_fractions[:-1]), paper.head_fractions
    assert light.overhead < 0.1 < 0.3 < paper.overhead


def test_head_width_and_stride_change_the_head() -> None:
    model = CifarResNet().eval()
    x = torch.randn(2, 3, 32, 32)

    def heads(**kw: object) -> tuple[list[int], list[int], list[float]]:
        net = attach_exits(model, AFTER, C, example_input=x, **kw)
        first = [h.body[0] for h in net.heads[:-1]]
        return ([c.out_channels for c in first], [c.stride[0] for c in first],
                net.flops(x).heads[:-1])

    widths, strides, default = heads()
    assert widths == [4, 8, 16] and strides == [2, 2, 2]  # 32, 16 and 8 pixels wide maps
    widths, strides, wide = heads(head_width=24)
    assert widths == [24, 24, 24] and all(w > d for w, d in zip(wide, default, strict=True))
    widths, _, _ = heads(head_width=0.5)
    assert widths == [8, 16, 32]
    widths, strides, dense = heads(head_stride=1)
    assert strides == [1, 1, 1]
    assert all(d > 3 * f for d, f in zip(dense, default, strict=True))
    _, strides, _ = heads(head_stride=3)
    assert strides == [3, 3, 3]


def test_conv_head_shape() -> None:
    assert conv_head_shape(64, [8, 8]) == (16, 2)
    assert conv_head_shape(64, [4, 4]) == (16, 1)
    assert conv_head_shape(6, None) == (2, 1)
    assert conv_head_shape(64, [8, 8], head_width=1.0, head_stride=1) == (64, 1)
    assert conv_head_shape(64, [2, 2], head_width=10, head_stride=3) == (10, 3)


def test_flops_per_stage_and_head_hand_computed() -> None:
    stages = [nn.Linear(6, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 4))]
    heads = [ExitHead.linear(8, 3), ExitHead.linear(4, 3)]
    net = MultiExitNetwork(stages, heads).train()
    f = net.flops(torch.randn(5, 6))
    assert f.stages == [2 * 6 * 8, 2 * 8 * 4] and f.heads == [2 * 8 * 3, 2 * 4 * 3]
    assert f.backbone == 96 + 64 + 24
    assert f.head_fractions == pytest.approx([48 / 184, 24 / 184])
    assert f.overhead == pytest.approx(48 / 184)
    assert net.training  # the mode is restored
    # cumulative, they are what eenet.budget.count_flops gives per exit
    assert count_flops(net, torch.randn(5, 6)).values == [96 + 48, 96 + 48 + 64 + 24]


def test_head_placed_like_a_module() -> None:
    module = torch.nn.Linear(3, 3).double().eval()
    head = ExitHead.linear(3, 4).placed_like(module)
    assert head.classifier.weight.dtype == torch.float64 and not head.training
    assert ExitHead.linear(3, 4).placed_like(torch.nn.ReLU()).classifier.weight.dtype == (
        torch.float32)


def test_an_in_place_block_after_a_cut_trains_as_without_in_place() -> None:
    """VGG-style Sequentials put ReLU(inplace=True) right after a conv: with an exit after
    the conv, the head saved the conv output for its backward pass. The stage after the cut
    runs the in-place block on a copy, so the gradients equal those of the same network with
    inplace=False (and autograd raises nothing)."""
    grads = []
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for inplace in (True, False):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace),
                                 nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, C))
        net = attach_exits(backbone, ["0"], C, example_input=x[:2])
        assert net.stages[1].copies_input is inplace
        sum(z.square().sum() for z in net(x)).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
