"""Properties of the model heads: attention pooling equations, padding invariance, layer mixing, norms,
state dict round trips and the model factory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from emotune.errors import EmotuneError
from emotune.model import (
    AttentionPooling,
    AttentionPoolingModel,
    ClassifierHead,
    CogniCICModel,
    FeatureAdapter,
    LayerMix,
    build_model,
    masked_mean,
)

N_CLASSES = 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def lengths_to_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


def make_batch(dims: dict[str, tuple[int, int]], lengths: dict[str, list[int]], total: dict[str, int]) -> dict:
    """Random features with padding filled with huge garbage, so any leak of padding shows up."""
    batch = {}
    for m, (n_layers, width) in dims.items():
        b = len(lengths[m])
        x = torch.randn(b, n_layers, total[m], width)
        mask = lengths_to_mask(lengths[m], total[m])
        garbage = 1e4 * torch.randn_like(x)
        batch[m] = torch.where(mask[:, None, :, None], x, garbage)
        batch[m + "_mask"] = mask
    return batch


def with_gradient_leaves(batch: dict) -> tuple[dict, dict]:
    """The batch fed as float16 (as cached on disk) from float32 leaves whose gradients the test can read."""
    leaves = {k: v.clone().requires_grad_() for k, v in batch.items() if not k.endswith("_mask")}
    return {**batch, **{m: leaf.half() for m, leaf in leaves.items()}}, leaves


def assert_gradient_reaches_every_weight_and_real_position(model: nn.Module, batch: dict, leaves: dict) -> None:
    """After a backward pass: every trainable weight and every real frame or token got a non-zero, finite
    gradient (a weight or input that gets none is never learnt from), and padding got exactly none.

    The one exception is the layer mix of a single-layer encoder: it is the layer itself and has nothing to learn.
    """
    for name, param in model.named_parameters():
        if name.endswith("layer_mix.logits") and param.numel() == 1:
            assert param.grad is None or not param.grad.any(), name
            continue
        assert param.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets an all-zero gradient"
    for m, leaf in leaves.items():
        mask = batch[m + "_mask"]
        per_position = leaf.grad.abs().sum(dim=(1, 3))  # (batch, time): summed over layers and width
        assert torch.all(per_position[mask] > 0), f"a real {m} position gets no gradient"
        assert torch.all(per_position[~mask] == 0), f"{m} padding gets a gradient"


def pad_more(batch: dict, extra: int) -> dict:
    """The same batch with ``extra`` more padded positions of garbage appended to every modality."""
    out = {}
    for key, value in batch.items():
        if key.endswith("_mask"):
            out[key] = torch.cat([value, torch.zeros(value.shape[0], extra, dtype=torch.bool)], dim=1)
        else:
            b, n_layers, _, width = value.shape
            out[key] = torch.cat([value, 1e6 * torch.randn(b, n_layers, extra, width)], dim=2)
    return out


# --- AttentionPooling ---------------------------------------------------------------------------------


def test_attention_weights_sum_to_one_and_padding_gets_exactly_zero():
    pool = AttentionPooling(8)
    h = torch.randn(3, 7, 8)
    mask = lengths_to_mask([7, 4, 1], 7)
    _, weights = pool(h, mask)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    assert torch.all(weights[~mask] == 0.0)
    assert torch.all(weights[mask] > 0.0)
    assert weights[2, 0].item() == pytest.approx(1.0)
    # Padding is excluded, not merely given a very low score: it stays at 0 even when every real score is
    # far below any finite "large negative" fill value.
    u = pool.query.detach()
    very_negative = (-1e6 * u / u.norm()).expand(3, 7, 8)
    _, weights = pool(very_negative, mask)
    assert torch.all(weights[~mask] == 0.0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)


def test_attention_pooled_vector_ignores_appended_garbage_padding():
    pool = AttentionPooling(8)
    h = torch.randn(2, 5, 8)
    mask = lengths_to_mask([5, 3], 5)
    pooled, _ = pool(h, mask)
    h_long = torch.cat([h, 1e6 * torch.randn(2, 4, 8)], dim=1)
    h_long[1, 3:5] = float("inf")  # non-finite padding must not leak either
    mask_long = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    pooled_long, weights_long = pool(h_long, mask_long)
    torch.testing.assert_close(pooled_long, pooled, atol=1e-6, rtol=0)
    assert torch.all(weights_long[:, 5:] == 0.0)


def test_attention_matches_the_equations_with_sqrt_scaling():
    dim = 16
    pool = AttentionPooling(dim)
    h = torch.randn(2, 6, dim)
    mask = lengths_to_mask([6, 4], 6)
    pooled, weights = pool(h, mask)
    u = pool.query.detach()
    for b, length in enumerate([6, 4]):
        scores = torch.stack([h[b, t] @ u for t in range(length)]) / math.sqrt(dim)
        expected_w = torch.exp(scores - scores.max())
        expected_w = expected_w / expected_w.sum()
        expected_c = (expected_w[:, None] * h[b, :length]).sum(dim=0)
        torch.testing.assert_close(weights[b, :length], expected_w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pooled[b], expected_c, atol=1e-6, rtol=1e-5)
    # Without the 1/sqrt(E) the weights would be visibly sharper: the check above can tell them apart.
    unscaled = torch.softmax(h[0] @ u, dim=0)
    assert not torch.allclose(unscaled, weights[0], atol=1e-3)


def test_attention_query_is_xavier_initialised_and_trainable():
    dim = 64
    pool = AttentionPooling(dim)
    bound = math.sqrt(6.0 / (1 + dim))
    assert pool.query.shape == (dim,)
    assert pool.query.requires_grad
    assert pool.query.abs().max().item() <= bound
    assert pool.query.std().item() > bound / 4  # not left at zero or at a tiny scale


def test_masked_mean_counts_only_real_positions():
    x = torch.randn(2, 5, 3)
    mask = lengths_to_mask([5, 2], 5)
    x[1, 2:] = 1e8
    out = masked_mean(x, mask)
    torch.testing.assert_close(out[0], x[0].mean(dim=0))
    torch.testing.assert_close(out[1], x[1, :2].mean(dim=0))


# --- LayerMix and the feature adapter ------------------------------------------------------------------


def test_layer_mix_starts_uniform_and_equals_the_layer_mean():
    mix = LayerMix(4)
    torch.testing.assert_close(mix.weights(), torch.full((4,), 0.25))
    x = torch.randn(2, 4, 5, 3)
    torch.testing.assert_close(mix(x), x.mean(dim=1), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    torch.testing.assert_close(mix(x), x[:, 3], atol=1e-5, rtol=1e-5)


def test_layer_mix_with_one_layer_is_the_layer_itself():
    x = torch.randn(2, 1, 5, 3)
    torch.testing.assert_close(LayerMix(1)(x), x[:, 0])


def test_global_norm_uses_statistics_and_stores_them_in_the_state_dict():
    adapter = FeatureAdapter(n_layers=2, width=4, norm="global")
    x = torch.randn(3, 2, 5, 4)
    torch.testing.assert_close(adapter(x), x.mean(dim=1))  # defaults: mean 0, std 1
    mean, std = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    adapter.set_statistics(mean, std)
    torch.testing.assert_close(adapter(x), (x.mean(dim=1) - mean) / std)
    state = adapter.state_dict()
    torch.testing.assert_close(state["mean"], mean)
    torch.testing.assert_close(state["std"], std)
    restored = FeatureAdapter(n_layers=2, width=4, norm="global")
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x), adapter(x), atol=0, rtol=0)


def test_adapter_norm_choices_and_projection():
    x = torch.randn(2, 3, 5, 8)
    layer = FeatureAdapter(3, 8, norm="layer")
    out = layer(x)
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    assert layer.projection is None
    none = FeatureAdapter(3, 8, norm="none")
    torch.testing.assert_close(none(x), x.mean(dim=1))
    projected = FeatureAdapter(3, 8, norm="layer", out_dim=12)
    assert isinstance(projected.projection, nn.Linear)
    assert projected(x).shape == (2, 5, 12)
    with pytest.raises(EmotuneError, match="layer, global, none"):
        FeatureAdapter(3, 8, norm="batch")
    with pytest.raises(EmotuneError, match="global"):
        layer.set_statistics(torch.zeros(8), torch.ones(8))


# --- AttentionPoolingModel -----------------------------------------------------------------------------


def _linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


@pytest.mark.parametrize(
    "dims, projected",
    [
        ({"speech": (3, 16), "text": (2, 16)}, set()),
        ({"speech": (3, 16), "text": (1, 24)}, {"speech"}),
        ({"speech": (3, 16)}, set()),
        ({"text": (2, 24)}, set()),
    ],
    ids=["equal-widths", "unequal-widths", "speech-only", "text-only"],
)
def test_attention_model_forward_backward(dims, projected):
    model = AttentionPoolingModel(dims, N_CLASSES, width=32, hidden_layers=1)
    assert model.modalities == tuple(m for m in ("speech", "text") if m in dims)
    assert model.fused_dim == max(width for _, width in dims.values())
    for m in model.modalities:
        adapter = model.adapters[m]
        assert (adapter.projection is not None) == (m in projected)
        assert _linears(adapter) == (1 if m in projected else 0)
    lengths = {"speech": [9, 4, 1], "text": [3, 5, 2]}
    total = {"speech": 9, "text": 5}
    batch, leaves = with_gradient_leaves(make_batch(dims, lengths, total))
    logits = model(batch)
    assert logits.shape == (3, N_CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    # the layer mix, the LayerNorm, the projection (when widths differ), the attention query that makes the
    # pooling scores and every classifier layer all learn; so does every real frame's and token's input
    assert_gradient_reaches_every_weight_and_real_position(model, batch, leaves)


def test_attention_model_pool_exposes_weights_over_the_fused_sequence():
    dims = {"speech": (3, 16), "text": (1, 24)}
    model = AttentionPoolingModel(dims, N_CLASSES).eval()
    batch = make_batch(dims, {"speech": [6, 2], "text": [3, 4]}, {"speech": 6, "text": 4})
    pooled, weights, mask = model.pool(batch)
    assert pooled.shape == (2, 24)
    assert weights.shape == mask.shape == (2, 10)
    torch.testing.assert_close(mask, torch.cat([batch["speech_mask"], batch["text_mask"]], dim=1))
    assert torch.all(weights[~mask] == 0.0)
    assert torch.all(weights[:, 6:][mask[:, 6:]] > 0)  # text tokens take part in the pooling


def test_pooling_before_projecting_equals_projecting_every_frame():
    """The model projects the pooled vector, not each frame; values and gradients must match the paper's order."""
    dims = {"speech": (2, 16), "text": (1, 24)}
    model = AttentionPoolingModel(dims, N_CLASSES, width=32).eval()
    with torch.no_grad():
        model.adapters["speech"].projection.bias.normal_()  # a zero bias would hide a bias term handled wrongly
    batch = make_batch(dims, {"speech": [7, 3], "text": [2, 5]}, {"speech": 7, "text": 5})

    def paper_order(model):
        sequences = [model.adapters[m](batch[m]) for m in model.modalities]
        mask = torch.cat([batch[m + "_mask"] for m in model.modalities], dim=1)
        return model.attention(torch.cat(sequences, dim=1), mask)

    pooled, weights, _ = model.pool(batch)
    expected_pooled, expected_weights = paper_order(model)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    assert model.adapters["speech"].projection.bias.abs().sum() > 0
    grads = []
    for pooled_of in (lambda: model.pool(batch)[0], lambda: paper_order(model)[0]):
        model.zero_grad()
        (pooled_of() ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "adapters.speech.projection.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4)
        assert grads[0][name].abs().sum() > 0, name


def test_attention_model_logits_ignore_extra_padding_in_eval():
    dims = {"speech": (3, 16), "text": (1, 24)}
    model = AttentionPoolingModel(dims, N_CLASSES, width=32).eval()
    batch = make_batch(dims, {"speech": [7, 3], "text": [2, 5]}, {"speech": 7, "text": 5})
    with torch.no_grad():
        logits = model(batch)
        logits_padded = model(pad_more(batch, 6))
    torch.testing.assert_close(logits_padded, logits, atol=1e-6, rtol=0)


def test_attention_model_state_dict_round_trip_gives_identical_outputs():
    dims = {"speech": (3, 16), "text": (2, 16)}
    norms = {"speech": "global", "text": "layer"}
    model = AttentionPoolingModel(dims, N_CLASSES, width=32, norms=norms)
    model.adapters["speech"].set_statistics(torch.randn(16), torch.rand(16) + 0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move away from the init so a fresh model would differ
    model.eval()
    assert "adapters.speech.mean" in model.state_dict() and "adapters.speech.std" in model.state_dict()
    batch = make_batch(dims, {"speech": [5, 2], "text": [4, 1]}, {"speech": 5, "text": 4})
    fresh = AttentionPoolingModel(dims, N_CLASSES, width=32, norms=norms).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(batch), model(batch))
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(batch), model(batch), atol=0, rtol=0)


def test_attention_model_explicit_fused_dim_projects_every_modality():
    model = AttentionPoolingModel({"speech": (2, 16), "text": (2, 24)}, N_CLASSES, fused_dim=8)
    assert all(model.adapters[m].projection is not None for m in model.modalities)
    assert model.attention.query.shape == (8,)


def test_attention_model_rejects_unknown_modalities_and_missing_inputs():
    with pytest.raises(EmotuneError, match="video"):
        AttentionPoolingModel({"video": (1, 4)}, N_CLASSES)
    model = AttentionPoolingModel({"speech": (1, 4), "text": (1, 4)}, N_CLASSES)
    batch = make_batch({"speech": (1, 4)}, {"speech": [2]}, {"speech": 2})
    with pytest.raises(EmotuneError, match="text"):
        model(batch)


# --- CogniCIC ------------------------------------------------------------------------------------------


def test_cognicic_runs_and_ignores_padding():
    dims = {"speech": (3, 16), "text": (2, 24)}
    model = CogniCICModel(dims, N_CLASSES, dropout=0.5)
    assert model.modalities == ("speech", "text")
    assert model.classifier[0].in_features == 2 * 256
    lengths, total = {"speech": [7, 3], "text": [2, 5]}, {"speech": 7, "text": 5}
    batch, leaves = with_gradient_leaves(make_batch(dims, lengths, total))
    logits = model(batch)
    assert logits.shape == (2, N_CLASSES)
    logits.logsumexp(dim=1).sum().backward()
    assert_gradient_reaches_every_weight_and_real_position(model, batch, leaves)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pad_more(batch, 4)), model(batch), atol=1e-6, rtol=0)


def test_cognicic_single_modality():
    model = CogniCICModel({"text": (2, 8)}, N_CLASSES)
    assert model.modalities == ("text",)
    batch = make_batch({"text": (2, 8)}, {"text": [3, 1]}, {"text": 3})
    assert model(batch).shape == (2, N_CLASSES)


# --- ClassifierHead and build_model --------------------------------------------------------------------


@pytest.mark.parametrize("hidden_layers", [0, 3])
def test_classifier_head_layer_count(hidden_layers):
    head = ClassifierHead(10, N_CLASSES, width=12, hidden_layers=hidden_layers, dropout=0.2)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == hidden_layers + 2
    assert linears[0].in_features == 10 and linears[-1].out_features == N_CLASSES
    assert sum(isinstance(m, nn.LayerNorm) for m in head.modules()) == hidden_layers + 1
    assert isinstance(head.net[0], nn.Dropout)  # dropout on the pooled input comes first
    assert head(torch.randn(4, 10)).shape == (4, N_CLASSES)


def test_build_model_families():
    dims = {"speech": (3, 16), "text": (1, 24)}
    cfg = {"family": "attention", "width": 32, "hidden_layers": 0, "dropout": 0.1, "fused_dim": None,
           "branch_width": 64}  # every model config carries it (model/attention.yaml): a search may switch family
    model = build_model(cfg, dims, N_CLASSES)
    assert isinstance(model, AttentionPoolingModel)
    assert _linears(model.classifier) == 2
    assert model.fused_dim == 24
    model = build_model({**cfg, "fused_dim": 8}, dims, N_CLASSES, norms={"speech": "none"})
    assert model.fused_dim == 8 and model.adapters["speech"].norm_kind == "none"
    model = build_model({**cfg, "family": "cognicic", "dropout": 0.5}, dims, N_CLASSES)
    assert isinstance(model, CogniCICModel) and model.classifier[0].in_features == 2 * 64


def test_build_model_unknown_family_names_the_known_ones():
    cfg = {"family": "transformer", "width": 32, "hidden_layers": 1, "dropout": 0.1}
    with pytest.raises(EmotuneError, match="transformer") as info:
        build_model(cfg, {"speech": (1, 4)}, N_CLASSES)
    assert "attention" in str(info.value) and "cognicic" in str(info.value)
