"""TaylorScorer and the closed-form scores against exact per-sample gradients (torch.func)."""
from __future__ import annotations

import os
from copy import deepcopy

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from ted_stream.scorer import (
    TaylorScorer,
    last_layer_scores,
    per_sample_ce,
    per_sample_lm_loss,
    predicted_igd,
)

TOL = 1e-4


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max())


def mlp(d_in: int = 12, hidden: int = 24, classes: int = 5, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, classes))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()  # eval: no dropout, so the oracle sees the same function


def lm_batch(seed: int = 1, batch: int = 4, length: int = 10, vocab: int = 67):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[3, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 2:5] = -100  # prompt tokens that carry no loss
    return ids, mask, labels


def clean_copy(model: nn.Module) -> nn.Module:
    """The same model without the scorer's hooks, so torch.func transforms never run them."""
    copy = deepcopy(model)
    for m in copy.modules():
        m._forward_hooks.clear()
    return copy


def masked_oracle(model: nn.Module, per_sample_grads: dict[str, torch.Tensor], selection: dict[str, torch.Tensor]):
    """Exact per-sample gradients restricted to the scorer's rows -> (s, sqnorm) with a batch-mean G."""
    parts = []
    for name, rows in selection.items():
        parts.append(per_sample_grads[f"{name}.weight"][:, rows].flatten(1))
        if f"{name}.bias" in per_sample_grads:
            parts.append(per_sample_grads[f"{name}.bias"][:, rows])
    g = torch.cat(parts, dim=1).double()
    ref = g.mean(dim=0)
    return g @ ref, (g * g).sum(dim=1)


def mlp_oracle_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model = clean_copy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return per_sample_ce(functional_call(model, p, (xi[None],)), yi[None])[0]

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def test_mlp_matches_oracle_on_row_subset():
    model = mlp()
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    scorer = TaylorScorer(model, layers=("0", "2", "4"), rows=7, seed=3)
    loss = per_sample_ce(model(x), y)
    loss.mean().backward()
    scores = scorer.compute(loss_weight=1 / len(x), loss=loss)

    s_ref, sq_ref = masked_oracle(model, mlp_oracle_grads(model, x, y), scorer.selection)
    assert all(len(r) == 7 for r in list(scorer.selection.values())[:2])  # 24 rows -> 7 sampled
    assert rel_err(scores.s, s_ref) <= TOL
    assert rel_err(scores.sqnorm, sq_ref) <= TOL
    assert torch.allclose(scores.d, scores.sqnorm - scores.s)
    assert torch.equal(scores.loss, loss.detach())


def test_row_draw_is_seeded_per_layer():
    a = TaylorScorer(mlp(), layers="*", rows=5, seed=0).selection
    b = TaylorScorer(mlp(), layers="*", rows=5, seed=0).selection
    c = TaylorScorer(mlp(), layers="*", rows=5, seed=1).selection
    assert list(a) == ["0", "2", "4"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in ("0", "2"))
    assert torch.equal(a["4"], torch.arange(5))  # 5 classes: every row
    with pytest.raises(ValueError):
        TaylorScorer(mlp(), layers="nothing*")


def test_sum_loss_and_per_sample_weights_are_undone():
    model = mlp()
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    scorer = TaylorScorer(model, layers="*", rows=None)
    per_sample_ce(model(x), y).mean().backward()
    mean = scorer.compute(1 / 8)
    model.zero_grad()
    w = torch.linspace(0.5, 2.0, 8)
    (w * per_sample_ce(model(x), y)).sum().backward()
    weighted = scorer.compute(w)
    assert rel_err(weighted.s, mean.s) <= TOL and rel_err(weighted.sqnorm, mean.sqnorm) <= TOL


def test_llama_with_padding_and_ignored_labels_matches_oracle():
    model = tiny_llama()
    ids, mask, labels = lm_batch()
    layers = ("lm_head", "*.mlp.down_proj", "model.layers.0.self_attn.q_proj")
    scorer = TaylorScorer(model, layers=layers, rows=9, seed=0)
    loss = per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.mean().backward()
    scores = scorer.compute(1 / len(ids), loss=loss)
    assert set(scorer.hook_calls) == set(scorer.selection) and len(scorer.selection) == 4

    model = clean_copy(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, i):  # sample i alone, with its own padding mask
        out = functional_call(model, p, (), {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]})
        return per_sample_lm_loss(out.logits, labels[i : i + 1])[0]

    per_sample = [grad(loss_one)(params, i) for i in range(len(ids))]
    stacked = {k: torch.stack([g[k] for g in per_sample]) for k in per_sample[0]}
    s_ref, sq_ref = masked_oracle(model, stacked, scorer.selection)
    assert rel_err(scores.s, s_ref) <= TOL
    assert rel_err(scores.sqnorm, sq_ref) <= TOL
    assert torch.allclose(scores.loss, torch.stack([loss_one(params, i) for i in range(len(ids))]), rtol=1e-5)


def test_padding_and_ignored_tokens_contribute_nothing():
    """A sample's ||g_i||^2 is the same alone and unpadded as inside a padded batch."""
    model = tiny_llama()
    ids, mask, labels = lm_batch()
    scorer = TaylorScorer(model, layers=("lm_head", "*.mlp.down_proj"), rows=9)
    per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
    batched = scorer.compute(1 / len(ids))
    model.zero_grad()
    per_sample_lm_loss(model(input_ids=ids[1:2, :7]).logits, labels[1:2, :7]).mean().backward()
    alone = scorer.compute(1.0)
    assert rel_err(alone.sqnorm, batched.sqnorm[1:2]) <= TOL


def test_last_layer_closed_form_matches_oracle():
    model = mlp()
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    features = model[:4](x)
    for smoothing in (0.0, 0.1):
        scores = last_layer_scores(features, model[4](features), y, label_smoothing=smoothing)
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss_one(p, xi, yi):
            logits = functional_call(model, p, (xi[None],))
            return per_sample_ce(logits, yi[None], label_smoothing=smoothing)[0]

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        s_ref, sq_ref = masked_oracle(model, grads, {"4": torch.arange(5)})
        assert rel_err(scores.s, s_ref) <= TOL
        assert rel_err(scores.sqnorm, sq_ref) <= TOL
        assert torch.allclose(scores.loss, per_sample_ce(model(x), y, smoothing), rtol=1e-6)

    # An explicit reference replaces the batch mean: with G = 0 every s_i vanishes.
    zero = last_layer_scores(features, model[4](features), y, reference=(torch.zeros(5, 24), torch.zeros(5)))
    assert torch.all(zero.s == 0) and torch.allclose(zero.d, zero.sqnorm)


class Blocks(nn.Module):
    """Two checkpointed blocks; the scored layers sit inside them."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)) for _ in range(2))
        self.head = nn.Linear(16, 3)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + (block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant))
        return self.head(h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_fires_once_and_scores_match(reentrant):
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    results = []
    for mode in (None, reentrant):
        model = Blocks(mode)
        scorer = TaylorScorer(model, layers=("blocks.*", "head"), rows=None)
        per_sample_ce(model(x), y).mean().backward()
        assert all(calls == 1 for calls in scorer.hook_calls.values()), scorer.hook_calls
        results.append(scorer.compute(1 / 8))
    assert rel_err(results[1].s, results[0].s) <= 1e-6
    assert rel_err(results[1].sqnorm, results[0].sqnorm) <= 1e-6


@pytest.mark.parametrize("reentrant", [True, False])
def test_llama_gradient_checkpointing(reentrant):
    ids, mask, labels = lm_batch()
    results = []
    for ckpt in (False, True):
        model = tiny_llama().train()  # HF checkpoints only in train mode; no dropout in Llama
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        scorer = TaylorScorer(model, layers=("lm_head", "*.mlp.down_proj"), rows=9)
        per_sample_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
        assert all(calls == 1 for calls in scorer.hook_calls.values()), scorer.hook_calls
        results.append(scorer.compute(1 / len(ids)))
    assert rel_err(results[1].s, results[0].s) <= TOL
    assert rel_err(results[1].sqnorm, results[0].sqnorm) <= TOL


def test_missing_backward_hook_is_an_error():
    model = mlp()
    scorer = TaylorScorer(model, layers="*", rows=4)
    with pytest.raises(RuntimeError, match="did not fire"):
        scorer.compute(1.0)
    with torch.no_grad():
        model(torch.randn(2, 12))  # no-grad forwards (evaluation) are ignored
    assert all(c == 0 for c in scorer.hook_calls.values())


class TwoHeads(nn.Module):
    def __init__(self, in_place: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.unused = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)
        self.in_place = in_place

    def forward(self, x):
        h = self.body(x)
        if self.in_place:
            h.mul_(2.0)  # torch hands a hook registered before this the pre-in-place gradient
        else:
            h = h * 2.0
        self.unused(h)
        return self.head(torch.tanh(h))


def test_in_place_modified_output_is_scored_correctly():
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    results = []
    for in_place in (False, True):
        model = TwoHeads(in_place)
        scorer = TaylorScorer(model, layers=("body", "head"), rows=None)
        per_sample_ce(model(x), y).mean().backward()
        assert scorer.hook_calls == {"body": 1, "head": 1}
        results.append(scorer.compute(1 / 5))
    assert rel_err(results[1].sqnorm, results[0].sqnorm) <= 1e-6
    assert rel_err(results[1].s, results[0].s) <= 1e-6


def test_layer_without_gradient_is_an_error():
    model = TwoHeads(False)
    scorer = TaylorScorer(model, layers=("head", "unused"), rows=None)
    per_sample_ce(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).mean().backward()
    assert scorer.hook_calls == {"head": 1, "unused": 0}
    with pytest.raises(RuntimeError, match="'unused' did not fire"):
        scorer.compute(1 / 5)


def test_remove_leaves_model_as_it_was():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {name: set(vars(m)) for name, m in model.named_modules()}
    ids, mask, labels = lm_batch()
    with TaylorScorer(model, layers=("lm_head", "*.mlp.*"), rows=4) as scorer:
        out = model(input_ids=ids, attention_mask=mask)
        assert model.lm_head._forward_hooks
        per_sample_lm_loss(out.logits, labels).mean().backward()
        scorer.compute(1 / 4)
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks, name
        assert set(vars(m)) == attrs[name], name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.zero_grad()
    out2 = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out2.logits, out.logits)  # outputs unchanged by the hooks, before or after


def test_reference_ema():
    model = mlp()
    scorer = TaylorScorer(model, layers="4", rows=None, ref_ema=0.75)
    means = []
    for seed in range(2):
        torch.manual_seed(seed)
        x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
        per_sample_ce(model(x), y).mean().backward()
        scorer.compute(1 / 6)
        grads = mlp_oracle_grads(model, x, y)
        means.append(torch.cat([grads["4.weight"].flatten(1), grads["4.bias"]], dim=1).mean(0))
    expected = 0.75 * means[0] + 0.25 * means[1]
    assert torch.allclose(scorer.reference, expected, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# First-order claims of method.md on an all-linear model with every coordinate scored (exact
# statistics), in float64: the prediction error of one SGD step must shrink ~linearly in lr.


def linear_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def sgd_from(model: nn.Module, step: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    return {k: v.detach() - lr * step[k] for k, v in model.named_parameters()}


def first_order_setup(n: int = 12):
    model = linear_net()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    scorer = TaylorScorer(model, layers="*", rows=None)
    per_sample_ce(model(x), y).mean().backward()
    scores = scorer.compute(1 / n)
    scorer.remove()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p):
        return per_sample_ce(functional_call(model, p, (x,)), y)

    grads = vmap(grad(lambda p, xi, yi: per_sample_ce(functional_call(model, p, (xi[None],)), yi[None])[0]),
                 in_dims=(None, 0, 0))(params, x, y)
    return model, scores, losses, grads


def decade_ratios(errors: list[float]) -> list[float]:
    return [errors[k] / errors[k + 1] for k in range(len(errors) - 1)]


LRS = (1e-1, 1e-2, 1e-3)


def test_reading_1_predicts_full_data_loss_rise():
    model, scores, losses, grads = first_order_setup()
    n = len(scores.s)
    pruned = torch.tensor([1, 4, 7, 10])
    errors = []
    for lr in LRS:
        full = {k: v.sum(0) / n for k, v in grads.items()}  # theta - (lr/n) sum_j g_j
        kept = {k: (v.sum(0) - v[pruned].sum(0)) / n for k, v in grads.items()}
        true = losses(sgd_from(model, kept, lr)).mean() - losses(sgd_from(model, full, lr)).mean()
        pred = predicted_igd(scores.s[pruned], lr=lr, n=n, reading="s")
        errors.append(abs(float(true) - pred) / abs(pred))
    assert errors[-1] < 1e-2
    assert all(5 < r < 20 for r in decade_ratios(errors)), errors


def test_reading_2_predicts_own_loss_decrease_shrinkage():
    model, scores, losses, grads = first_order_setup()
    n = len(scores.d)
    errors = []
    for lr in LRS:
        full = {k: v.mean(0) for k, v in grads.items()}
        after_full = losses(sgd_from(model, full, lr))
        base = losses({k: v.detach() for k, v in model.named_parameters()})
        true = torch.empty(n, dtype=torch.float64)
        for i in range(n):  # drop sample i: the step becomes (n G - g_i) / (n - 1)
            without = {k: (v.sum(0) - v[i]) / (n - 1) for k, v in grads.items()}
            decrease_full = base[i] - after_full[i]
            decrease_without = base[i] - losses(sgd_from(model, without, lr))[i]
            true[i] = decrease_full - decrease_without
        pred = torch.tensor([predicted_igd(scores.d[i : i + 1], lr=lr, n=n, reading="d") for i in range(n)])
        errors.append(float((true - pred).abs().max() / pred.abs().max()))
        summed = predicted_igd(scores.d, lr=lr, n=n, reading="d")  # the set's additive prediction
        assert abs(float(true.sum()) - summed) <= n * errors[-1] * float(pred.abs().max())
    assert errors[-1] < 1e-2
    assert all(5 < r < 20 for r in decade_ratios(errors)), errors
