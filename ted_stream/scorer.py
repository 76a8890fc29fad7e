"""Per-sample TED statistics from hooks on a few linear layers (see docs/scorer.md).

For a linear layer y = W a, sample i's weight gradient is sum_t b_it a_it^T (a: layer input,
b: gradient at the layer output). On a seeded subset R of output rows this |R| x d matrix is
small enough to form per sample, which gives, without any full per-sample gradient:

    sqnorm_i = ||g_i||^2,   s_i = <G, g_i>,   d_i = sqnorm_i - s_i

on the mask, where G is the global batch mean of g_i (all-reduced over data-parallel ranks),
optionally smoothed across steps by an EMA. Only activations and output gradients are read, so
ZeRO-partitioned weights are never touched.
"""

from __future__ import annotations

import fnmatch
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Scores",
    "TaylorScorer",
    "last_layer_scores",
    "per_sample_ce",
    "per_sample_lm_loss",
    "predicted_igd",
]


@dataclass
class Scores:
    """Per-sample statistics of one micro-batch, aligned with its rows (shape [B], float32 or
    the model's dtype if wider).

    s: <G, g_i> with G the reference gradient on the mask (reading 1).
    sqnorm: ||g_i||^2 on the mask.
    d: sqnorm - s = <g_i, g_i - G> (reading 2).
    loss: the per-sample loss passed in, detached (None if none was given).
    """

    s: Tensor
    sqnorm: Tensor
    d: Tensor
    loss: Optional[Tensor] = None


def _at_least_fp32(x: Tensor) -> Tensor:
    # bf16/fp16 statistics lose too much; float64 (tests, small models) stays float64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sample_ce(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of each sample of a classifier batch, shape [B]."""
    return F.cross_entropy(_at_least_fp32(logits), labels, reduction="none", label_smoothing=label_smoothing)


def per_sample_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Causal-LM loss of each sequence: the mean over its own non-ignored tokens, shape [B].

    ``labels`` are aligned with the inputs (as in Hugging Face: ``labels = input_ids`` with
    padding set to ``ignore_index``); the shift by one happens here. A sequence without any
    target token gets loss 0 (and gradient 0).
    """
    logits = _at_least_fp32(logits[:, :-1])
    targets = labels[:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    count = (targets != ignore_index).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / count


class _Input:
    """A scored layer's input, shared by the scored layers that read the same tensor (q, k and v
    do): upcast at most once, the upcast dropped once the last of them has used it."""

    def __init__(self, x: Tensor) -> None:
        self.source = weakref.ref(x)
        self.a = x.detach()
        self.users = 0
        self._wide: Optional[Tensor] = None

    def wide(self) -> Tensor:
        if self._wide is None:
            self._wide = _at_least_fp32(self.a)
        return self._wide

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._wide = None


class _Inputs:
    """The scored layers' inputs of the forward in progress, by tensor identity. Weak: an entry
    lives as long as a backward hook may still use it."""

    def __init__(self) -> None:
        self._by_id: weakref.WeakValueDictionary[int, _Input] = weakref.WeakValueDictionary()

    def share(self, x: Tensor) -> _Input:
        held = self._by_id.get(id(x))
        if held is None or held.source() is not x:
            held = self._by_id[id(x)] = _Input(x)
        held.users += 1
        return held


class _Layer:
    """One scored nn.Linear: its row subset and what its hooks gathered this micro-batch."""

    def __init__(self, name: str, module: nn.Linear, rows: Tensor, inputs: _Inputs) -> None:
        self.name = name
        self.module = module
        self.rows = rows
        self.inputs = inputs
        self.has_bias = module.bias is not None
        self.grad_w: Optional[Tensor] = None  # [B, |R|, d], summed over the hook calls
        self.grad_b: Optional[Tensor] = None  # [B, |R|]
        self.calls = 0
        self._rows_on: dict[torch.device, Tensor] = {}  # no host-to-device copy per hook call

    def on_forward(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        # Reentrant checkpointing first runs the forward without grad; its recompute (with grad,
        # inside backward) is the pass whose output gradient we will see. With non-reentrant
        # checkpointing the recomputed output is never backpropagated, so its hook stays silent.
        if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
            return None
        held = self.inputs.share(inputs[0])
        output.register_hook(lambda grad: self._accumulate(held, grad))
        return None  # a forward hook that returns a value would replace the module's output

    def _rows(self, device: torch.device) -> Tensor:
        if device not in self._rows_on:
            self._rows_on[device] = self.rows.to(device)
        return self._rows_on[device]

    def _accumulate(self, held: _Input, grad: Tensor) -> None:
        batch = held.a.shape[0]
        b = grad.reshape(batch, -1, grad.shape[-1]).index_select(-1, self._rows(grad.device))
        if held.a.dtype == b.dtype == torch.bfloat16:
            # bf16 products with fp32 accumulation (the matmul's), then only the small
            # [B, |R|, d] result upcast: the input is read once, never rewritten in fp32.
            a = held.a.reshape(batch, -1, held.a.shape[-1])
            grad_w = torch.bmm(b.transpose(1, 2), a).float()
        else:  # fp32 and wider (exact); fp16, whose product could overflow at the loss scale
            a = held.wide()
            a = a.reshape(batch, -1, a.shape[-1])
            b = b.to(torch.promote_types(a.dtype, b.dtype))
            grad_w = torch.bmm(b.transpose(1, 2), a.to(b.dtype))  # sum_t b_it[R] a_it^T per sample
        grad_b = b.sum(dim=1, dtype=grad_w.dtype) if self.has_bias else None
        held.release()
        if self.grad_w is None:
            self.grad_w, self.grad_b = grad_w, grad_b
        else:  # the module ran more than once in this forward (shared weights)
            self.grad_w = self.grad_w + grad_w
            if grad_b is not None and self.grad_b is not None:  # the same module: a bias in every call or none
                self.grad_b = self.grad_b + grad_b
        self.calls += 1
        return None  # a tensor hook that returns a value would replace the gradient

    def take(self) -> Tensor:
        """This micro-batch's masked per-sample gradients, flattened to [B, |R| * (d + bias)]."""
        assert self.grad_w is not None
        parts = [self.grad_w.flatten(1)] + ([self.grad_b] if self.grad_b is not None else [])
        self.grad_w = self.grad_b = None
        self.calls = 0
        return torch.cat(parts, dim=1)


class TaylorScorer:
    """Hook-based TED statistics on a seeded mask of linear-layer rows.

    model: the module to score (under DeepSpeed, ``engine.module`` or the model before
        ``deepspeed.initialize``, so that names and hence row draws match a single process).
    layers: fnmatch patterns over module names; every matching ``nn.Linear`` is scored. The
        default (every linear layer, 16 rows each) was chosen by launch/bench_scorer.py: random
        rows of an LM head alone rank samples no better than chance (docs/scorer.md).
    rows: output rows per layer, drawn at random from ``seed`` and the layer name (same on every
        rank); None or at least ``out_features`` scores every row.
    ref_ema: weight of the previous reference in G <- ref_ema * G + (1 - ref_ema) * batch mean;
        0 uses the current global micro-batch mean alone.
    process_group: the data-parallel group G is averaged over (default: the world, when
        torch.distributed is initialised).

    After every backward pass call ``compute(loss_weight)``; see its docstring for the scale.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Union[str, Sequence[str]] = "*",
        rows: Optional[int] = 16,
        seed: int = 0,
        ref_ema: float = 0.0,
        process_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if not 0.0 <= ref_ema < 1.0:
            raise ValueError(f"ref_ema={ref_ema!r} must lie in [0, 1)")
        if rows is not None and rows < 1:
            raise ValueError(f"rows={rows!r} must be None or >= 1")
        patterns = (layers,) if isinstance(layers, str) else tuple(layers)
        self.ref_ema = ref_ema
        self.process_group = process_group
        self.reference: Optional[Tensor] = None  # flat G over all scored coordinates
        self._layers: list[_Layer] = []
        inputs = _Inputs()
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out = module.out_features
                # crc32, unlike hash(), is the same in every process.
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                picked = torch.arange(out) if rows is None or rows >= out else torch.randperm(out, generator=gen)[:rows]
                self._layers.append(_Layer(name, module, picked.sort().values, inputs))
        if not self._layers:
            raise ValueError(f"no nn.Linear module of the model matches {patterns!r}")
        self._handles = [layer.module.register_forward_hook(layer.on_forward) for layer in self._layers]

    @property
    def selection(self) -> dict[str, Tensor]:
        """Scored layer name -> sorted indices of its scored output rows."""
        return {layer.name: layer.rows for layer in self._layers}

    @property
    def hook_calls(self) -> dict[str, int]:
        """Backward-hook calls per scored layer since the last compute() (1 per use of the layer)."""
        return {layer.name: layer.calls for layer in self._layers}

    def compute(self, loss_weight: Union[float, Tensor], loss: Optional[Tensor] = None) -> Scores:
        """Scores of the micro-batch whose backward pass just ran, as if each sample's own loss
        l_i had been differentiated alone.

        loss_weight: w with objective = sum_i w_i * l_i, the thing backward() was called on
            (a float or a [B] tensor). A mean over the micro-batch of B samples: 1/B. DeepSpeed
            with gradient accumulation (engine.backward divides by it): 1/(B * GAS). An fp16
            loss scale S multiplies it: S/(B * GAS). Samples with w_i = 0 get g_i = 0.
        loss: optional per-sample loss, returned detached in ``Scores.loss``.

        Collective when torch.distributed is initialised: every rank must call it once per
        micro-batch, in step.
        """
        silent = [layer.name for layer in self._layers if layer.calls == 0]
        if silent:
            raise RuntimeError(
                f"the backward hook of {', '.join(map(repr, silent))} did not fire since the last "
                "compute(): was backward() run, and does the loss depend on these layers' outputs?"
            )
        grads = torch.cat([layer.take() for layer in self._layers], dim=1)
        batch = grads.shape[0]
        # No tensor from host data on the per-step path: a fill, not a host-to-device copy.
        weight = (
            loss_weight.to(grads.device, grads.dtype)
            if isinstance(loss_weight, Tensor)
            else grads.new_full((), loss_weight)
        ).expand(batch)
        safe = torch.where(weight == 0, torch.ones_like(weight), weight)
        grads = torch.where(weight[:, None] == 0, torch.zeros_like(grads), grads / safe[:, None])

        total = torch.cat([grads.sum(dim=0), grads.new_full((1,), batch)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
        self.reference = self._blend(total[:-1] / total[-1])
        s = grads @ self.reference
        sqnorm = (grads * grads).sum(dim=1)
        return Scores(s=s, sqnorm=sqnorm, d=sqnorm - s, loss=None if loss is None else loss.detach())

    def _blend(self, mean: Tensor) -> Tensor:
        """The new reference G from this step's global mean, without a host sync."""
        if self.reference is None or self.ref_ema == 0.0:
            return mean
        # A reference restored before the model moved (Trainer + DeepSpeed resume) is elsewhere.
        ref = self.reference.to(mean.device, mean.dtype)
        blended = self.ref_ema * ref + (1.0 - self.ref_ema) * mean
        # An fp16 step whose loss scale overflowed has a non-finite mean: keep the reference
        # rather than poison it for good; a non-finite reference (a first step that overflowed)
        # restarts from the mean.
        blended = torch.where(torch.isfinite(mean).all(), blended, ref)
        return torch.where(torch.isfinite(ref).all(), blended, mean)

    def remove(self) -> None:
        """Remove every hook and drop gathered state; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers:
            layer.grad_w = layer.grad_b = None
            layer.calls = 0

    def __enter__(self) -> TaylorScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def last_layer_scores(
    features: Tensor,
    logits: Tensor,
    labels: Tensor,
    reference: Optional[tuple[Tensor, Optional[Tensor]]] = None,
    bias: bool = True,
    label_smoothing: float = 0.0,
) -> Scores:
    """Closed-form scores on the last linear layer of a softmax cross-entropy classifier.

    With e_i = p_i - y_i (y_i the one-hot, optionally smoothed, target) and h_i the layer input,
    g_i^W = e_i h_i^T and g_i^b = e_i, so ||g_i||^2 = ||e_i||^2 (||h_i||^2 + 1) and
    s_i = e_i^T (G^W h_i + G^b). ``reference`` = (G^W [C, h], G^b [C] or None) replaces the batch
    mean (e.g. an all-reduced or EMA reference). ``bias``: whether the layer has a bias.
    Loss is the per-sample cross-entropy with the same smoothing.
    """
    h = _at_least_fp32(features.detach())
    z = _at_least_fp32(logits.detach())
    classes = z.shape[-1]
    target = F.one_hot(labels, classes).float() * (1.0 - label_smoothing) + label_smoothing / classes
    err = z.softmax(dim=-1) - target
    if reference is None:
        ref_w = err.T @ h / h.shape[0]
        ref_b = err.mean(dim=0) if bias else None
    else:
        ref_w, ref_b = reference[0].to(h.dtype), None if reference[1] is None else reference[1].to(h.dtype)
    s = ((h @ ref_w.T) * err).sum(dim=1)
    sqnorm = (err * err).sum(dim=1) * (h * h).sum(dim=1)
    if bias:
        sqnorm = sqnorm + (err * err).sum(dim=1)
        if ref_b is not None:
            s = s + err @ ref_b
    loss = per_sample_ce(z, labels, label_smoothing)
    return Scores(s=s, sqnorm=sqnorm, d=sqnorm - s, loss=loss)


def predicted_igd(stat: Tensor, lr: float, n: int, reading: Literal["s", "d"] = "d") -> float:
    """First-order IGD predicted for one SGD step from the statistics of the pruned samples.

    reading "s" (stat = s_i of the pruned samples): rise of the full-data loss when they are
        dropped from a step theta - (lr/n) sum_j g_j, i.e. (lr/n) * sum s_i.
    reading "d" (stat = d_i): summed shrinkage of each pruned sample's own loss decrease when it
        alone is dropped from the mean step over n samples, i.e. lr/(n-1) * sum d_i (additive
        per sample; the set form is not).
    """
    if reading == "s":
        return float(lr / n * stat.double().sum())
    if reading == "d":
        return float(lr / (n - 1) * stat.double().sum())
    raise ValueError(f"reading={reading!r} must be 's' or 'd'")
