"""Exits on Hugging Face encoders (tiny random-init configs; no download)."""

from __future__ import annotations

import pytest
import torch

from eenet.nn import MultiExitNetwork, architecture_of, hf_encoder_exits
from eenet.policies import MaxProb
from eenet.runtime import Engine, simulate
from eenet.saving import load_model, save_model

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, C = 100, 32, 4, 3

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: OpenMP only adds waits


def _tiny(kind: str = "bert") -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**shape)).eval()
    return transformers.RobertaModel(transformers.RobertaConfig(**shape)).eval()


def _ids(n: int, length: int = 12) -> torch.Tensor:
    # ids from 3 up: RoBERTa reads id 1 as padding when it numbers the positions
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_stages_reproduce_the_encoder(kind: str) -> None:
    model = _tiny(kind)
    ids = _ids(5)
    net = hf_encoder_exits(model, (1, 3), C, example_input=ids)
    assert isinstance(net, MultiExitNetwork) and net.num_exits == 3
    assert net.stages[0].names == ("embeddings", "encoder.layer.0")
    assert net.stages[2].names == ("encoder.layer.3",)
    # the stages hold the model's own layers: no copies
    assert net.stages[1].blocks[0] is model.encoder.layer[1]
    h = ids
    with torch.no_grad():
        for stage in net.stages:
            h = stage(h)
        torch.testing.assert_close(h, model(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
        assert [z.shape for z in net(ids)] == [(5, C)] * 3


def test_heads_follow_the_model_dtype_and_mode() -> None:
    model = _tiny().double().train()
    net = hf_encoder_exits(model, (2,), C)
    head = net.heads[0]
    assert head.classifier.weight.dtype == torch.float64 and head.training
    assert head.classifier.in_features == HIDDEN


def test_engine_on_hf_encoder_matches_simulate() -> None:
    model = _tiny()
    net = hf_encoder_exits(model, (1, 2), C).eval()
    ids = _ids(33)
    with torch.no_grad():
        scores = MaxProb([0.0] * 3).scores([z.float() for z in net(ids)])
    policy = MaxProb([float(scores[:, 0].median()), float(scores[:, 1].median()), 0.0])
    oracle = simulate(net, policy, ids)
    out = Engine(net, policy, mode="compact")(ids)
    assert torch.equal(out.exit_index, oracle.exit_index)
    assert set(out.exit_index.tolist()) >= {0, 2}
    torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("after", "match"), [
    ((0,), r"layer counts in \[1, 4\)"),
    ((4,), r"layer counts in \[1, 4\)"),
    ((2, 2), "strictly increasing"),
    ((3, 1), "strictly increasing"),
    ((True,), "layer counts"),
])
def test_bad_after_layers(after: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hf_encoder_exits(_tiny(), after, C)


def test_not_an_hf_encoder_and_bad_classes() -> None:
    with pytest.raises(ValueError, match="not a Hugging Face encoder model"):
        hf_encoder_exits(torch.nn.Linear(3, 3), (1,), C)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        hf_encoder_exits(_tiny(), (1,), 0)


def test_forward_that_does_more_is_caught() -> None:
    model = _tiny()
    model.pooler = None
    real = model.forward

    def shifted(*args, **kwargs):  # a forward that is not embeddings -> layers
        out = real(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state + 1.0
        return out

    model.forward = shifted
    with pytest.raises(ValueError, match="do not reproduce"):
        hf_encoder_exits(model, (2,), C, example_input=_ids(2))


def _padded(n: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _ids(n, length)
    lengths = torch.randint(1, length + 1, (n,), generator=torch.Generator().manual_seed(7))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_padded_batch_matches_the_masked_encoder(kind: str) -> None:
    model = _tiny(kind)
    ids, mask = _padded(6)
    net = hf_encoder_exits(model, (2,), C)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state
        h = ids
        for stage in net.stages:
            h = stage(h, attention_mask=mask)
        unmasked = net.stages[1](net.stages[0](ids))
    real = mask.bool()
    torch.testing.assert_close(h[real], want[real], rtol=1e-5, atol=1e-5)
    # without the mask the padding leaks into the real tokens
    assert float((unmasked - want)[real].abs().max()) > 1e-3


def test_engine_compacts_the_attention_mask() -> None:
    model = _tiny()
    net = hf_encoder_exits(model, (1, 2), C).eval()
    ids, mask = _padded(40)
    with torch.no_grad():
        scores = MaxProb([0.0] * 3).scores([z.float() for z in net(ids, attention_mask=mask)])
    policy = MaxProb([float(scores[:, 0].median()), float(scores[:, 1].median()), 0.0])
    oracle = simulate(net, policy, ids, attention_mask=mask)
    out = Engine(net, policy, mode="compact")(ids, attention_mask=mask)
    assert torch.equal(out.exit_index, oracle.exit_index)
    torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)
    last = out.exit_index == 2
    with torch.no_grad():
        full = net.heads[2](model(ids, attention_mask=mask).last_hidden_state).float()
    torch.testing.assert_close(out.logits[last], full[last], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kind", "head"), [("bert", "first"), ("roberta", "first"),
                                          ("bert", "mean")])
def test_save_and_load_round_trip(kind: str, head: str, tmp_path) -> None:
    model = _tiny(kind)
    net = hf_encoder_exits(model, (1, 3), C, head=head).eval()
    assert architecture_of(net)["arch"] == "hf_encoder_exits"
    path = str(tmp_path / "net.pt")
    save_model(net, path, meta={"task": "test"})
    loaded, meta = load_model(path)
    assert meta == {"task": "test"} and type(loaded.stages[0].blocks[0]) is type(
        model.embeddings)
    assert loaded.heads[0].row_inputs == (("attention_mask",) if head == "mean" else ())
    ids, mask = _padded(4)
    with torch.no_grad():
        for a, b in zip(loaded(ids, attention_mask=mask), net(ids, attention_mask=mask),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_masked_mean_pool_matches_a_per_row_mean() -> None:
    from eenet.nn import MaskedMeanPool

    h = torch.randn(5, 7, 4, dtype=torch.float64)
    lengths = [7, 1, 3, 0, 5]
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    got = MaskedMeanPool()(h, mask)
    for i, n in enumerate(lengths):  # independently: the mean of the row's first n tokens
        want = h[i, :n].mean(dim=0) if n else torch.zeros(4, dtype=torch.float64)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(MaskedMeanPool()(h), h.mean(dim=1))  # no mask: every token
    half = MaskedMeanPool()(h.to(torch.bfloat16), mask.bool())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), got, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="attention_mask must be"):
        MaskedMeanPool()(h, mask[:, :6])
    with pytest.raises(ValueError, match="batch-first"):
        MaskedMeanPool()(h[0], mask[0])


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_mean_heads_ignore_the_padding(kind: str) -> None:
    model = _tiny(kind)
    net = hf_encoder_exits(model, (1, 2), C, head="mean").eval()
    assert all(h.row_inputs == ("attention_mask",) for h in net.heads)
    ids, mask = _padded(6)
    with torch.no_grad():
        padded = net(ids, attention_mask=mask)
        for i in range(ids.shape[0]):  # each row alone, unpadded: the same logits
            n = int(mask[i].sum())
            alone = net(ids[i:i + 1, :n])
            for z, z1 in zip(padded, alone, strict=True):
                torch.testing.assert_close(z[i:i + 1], z1, rtol=1e-4, atol=1e-5)
        # the first-token head ignores the mask in its pooling; mean heads do not
        wrong = [net.heads[k](h) for k, h in enumerate(_stage_outputs(net, ids, mask))]
    assert max(float((a - b).abs().max()) for a, b in zip(wrong, padded, strict=True)) > 1e-3


def _stage_outputs(net: MultiExitNetwork, ids: torch.Tensor, mask: torch.Tensor
                   ) -> list[torch.Tensor]:
    outs, h = [], ids
    for stage in net.stages:
        h = stage(h, attention_mask=mask)
        outs.append(h)
    return outs


def _between(scores: torch.Tensor, q: float) -> float:
    """A threshold halfway between two neighbouring scores near quantile q: no row lies
    within rounding of it."""
    s = scores.sort().values
    i = min(max(int(q * len(s)), 1), len(s) - 1)
    return float((s[i - 1] + s[i]) / 2)


@pytest.mark.parametrize("mode", ["compact", "mask", "compiled"])
def test_engine_hands_the_mask_to_mean_heads(mode: str) -> None:
    if mode == "compiled" and torch.__version__ < "2.13":
        pytest.skip("compiled mode with an attention mask needs torch >= 2.13 (older torch's "
                    "attention kernel choice guards on the unbacked survivor count)")
    model = _tiny()
    net = hf_encoder_exits(model, (1, 2), C, head="mean").eval()
    ids, mask = _padded(40)
    with torch.no_grad():
        scores = MaxProb([0.0] * 3).scores([z.float() for z in net(ids, attention_mask=mask)])
    policy = MaxProb([_between(scores[:, 0], 0.6), _between(scores[:, 1], 0.5), 0.0])
    oracle = simulate(net, policy, ids, attention_mask=mask)
    assert 0 < int((oracle.exit_index == 0).sum()) < 40  # a mixed batch
    with torch.no_grad():
        full = torch.stack([z.float() for z in net(ids, attention_mask=mask)], dim=1)
    torch.testing.assert_close(oracle.logits, full[torch.arange(40), oracle.exit_index],
                               rtol=1e-5, atol=1e-5)
    kw = {"compile_backend": "eager"} if mode == "compiled" else {}
    out = Engine(net, policy, mode=mode, **kw)(ids, attention_mask=mask)
    assert torch.equal(out.exit_index, oracle.exit_index)
    torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)


def test_head_factory_and_bad_heads() -> None:
    from eenet.nn import ExitHead

    model = _tiny()
    made: list[int] = []

    def factory(hidden: int, classes: int) -> ExitHead:
        made.append(hidden)
        return ExitHead.token(hidden, classes, pool="mean")

    net = hf_encoder_exits(model, (2,), C, head=factory)
    assert made == [HIDDEN, HIDDEN] and net.heads[0].row_inputs == ("attention_mask",)
    assert architecture_of(net)["arch"] is None  # a factory cannot be saved by name
    with pytest.raises(ValueError, match="unknown head"):
        hf_encoder_exits(model, (2,), C, head="max")
    with pytest.raises(TypeError, match=r"must return an eenet\.nn\.ExitHead"):
        hf_encoder_exits(model, (2,), C, head=lambda hidden, classes: torch.nn.Identity())
    with pytest.raises(TypeError, match="attention_mask and token_type_ids only"):
        net.stages[0](_ids(2), attention_mask=torch.ones(2, 12), position_ids=_ids(2))


def test_flops_and_latency_costs_take_the_mask() -> None:
    from eenet import budget

    net = hf_encoder_exits(_tiny(), (1, 2), C, head="mean").eval()
    ids, mask = _padded(4)
    flops = budget.count_flops(net, ids, attention_mask=mask)
    assert len(flops.values) == 3 and flops.values[0] < flops.values[1] < flops.values[2]
    ms = budget.measure(net, ids, repeats=2, warmup=1, attention_mask=mask)
    assert len(ms.values) == 3 and ms.unit == "ms"


def test_segment_ids_reach_the_embeddings_through_every_mode() -> None:
    """A tokenizer's ``token_type_ids`` (sentence pairs: segment 1 on the second part) go
    to the embeddings and change the result as in the encoder itself; the engine carries
    them as a row input in every mode."""
    model = _tiny("bert")
    ids, mask = _padded(6)
    segments = (torch.arange(12)[None, :] >= 5).long().expand(6, 12).contiguous()
    net = hf_encoder_exits(model, (2,), C).eval()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, token_type_ids=segments).last_hidden_state
        h = ids
        for stage in net.stages:
            h = stage(h, attention_mask=mask, token_type_ids=segments)
        without = net.stages[1](net.stages[0](ids, attention_mask=mask), attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(h[real], want[real], rtol=1e-5, atol=1e-5)
    assert float((without - want)[real].abs().max()) > 1e-3
    policy = MaxProb([0.6, 0.0])
    oracle = simulate(net, policy, ids, attention_mask=mask, token_type_ids=segments)
    for mode in ("mask", "compact"):
        out = Engine(net, policy, mode=mode)(ids, attention_mask=mask, token_type_ids=segments)
        assert torch.equal(out.exit_index, oracle.exit_index), mode
        torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="attention_mask and token_type_ids only"):
        net.stages[0](ids, position_ids=ids)


def test_attention_implementation_survives_save_and_load(tmp_path) -> None:
    """eager and sdpa attention round to different last bits: the file records which one
    the model used, and the reloaded network gives identical outputs."""
    torch.manual_seed(0)
    config = _tiny("bert").config
    model = transformers.BertModel._from_config(config, attn_implementation="eager").eval()
    net = hf_encoder_exits(model, (2,), C).eval()
    save_model(net, str(tmp_path / "eager.pt"))
    loaded, _ = load_model(str(tmp_path / "eager.pt"))
    assert loaded.stages[0].blocks[1].attention.self.config._attn_implementation == "eager"
    ids, mask = _padded(5)
    with torch.no_grad():
        for a, b in zip(net(ids, attention_mask=mask), loaded(ids, attention_mask=mask),
                        strict=True):
            assert torch.equal(a, b)


def test_the_model_record_of_a_network_matches_it_after_save_and_load(tmp_path) -> None:
    """What a policy file records of the model (weights, architecture) matches the network
    the model file gives back, so that a policy recorded in memory serves the saved file."""
    from eenet.saving import model_mismatch, model_record

    net = hf_encoder_exits(_tiny("bert"), (2,), C).eval()
    save_model(net, str(tmp_path / "m.pt"))
    loaded, _ = load_model(str(tmp_path / "m.pt"))
    assert model_mismatch(model_record(net), loaded) is None
    assert model_mismatch(model_record(loaded), net) is None
