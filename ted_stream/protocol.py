"""TEDProtocol: the per-step TED protocol, written once for every training loop.

A loop over a pruning dataset (any ``ted_stream.source.PruningSource``: MDS or tar shards), read
through its ``loader_class``, does the same few things whatever trains the model (a plain
PyTorch loop, DeepSpeed, the Hugging Face Trainer):

    protocol.start_epoch()                    # freeze the epoch's keep-mask (collective)
    for batch in loader:
        loss = protocol.loss(per_sample_loss, batch)   # weighted by ted_weight
        loss.backward()
        protocol.score()                      # per-sample scores, kept on the device
        optimizer.step()
    protocol.end_epoch()                      # kept / pruned / trained / saved of the epoch
    state = protocol.checkpoint(folder, loader)        # table into the folder (collective)
    protocol.restore(folder, state, loader)            # exact resume

Scores stay on the device and reach the table every ``flush_every`` micro-steps, and always
before a mask is frozen or the table saved, so the loop syncs the host once per flush, not per step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from math import ceil
from typing import Any, Optional, Union

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from . import dist
from .config import ScorerSettings
from .scorer import Scores, TaylorScorer
from .source import PruningSource, require_source
from .table import copy_atomic

TABLE_FILE = "ted_table.tedt"  # the table as of a checkpoint, inside the checkpoint folder
STATE_VERSION = 1

log = logging.getLogger(__name__)


def deepspeed_loss_scale(engine: Any) -> Union[float, Tensor]:
    """The loss scale ``engine.backward`` multiplies the loss by: 1.0 unless fp16 is on. Read it
    before ``engine.step()``, which changes it after an overflow or a window without one.

    Every DeepSpeed fp16 optimizer exposes ``loss_scale``; ZeRO's also ``cur_scale`` (stage 0's
    FP16_Optimizer has no ``cur_scale``). Anything else raises rather than score with 1.0."""
    if not engine.fp16_enabled():
        return 1.0
    optimizer = engine.optimizer
    for name in ("loss_scale", "cur_scale"):
        scale = getattr(optimizer, name, None)
        if isinstance(scale, (int, float, Tensor)):
            return scale
    raise RuntimeError(
        f"DeepSpeed fp16 is on but its optimizer ({type(optimizer).__name__}) has no numeric "
        "loss_scale or cur_scale: expected one of DeepSpeed's fp16 optimizers, whose loss "
        "scale the scores must be divided by"
    )


def reading_of(scores: Scores, reading: str) -> Tensor:
    """The per-sample value a reading records (see ``ted_stream.config.READINGS``)."""
    if reading == "d":
        return scores.d
    if reading == "s":
        return scores.s
    if reading == "abs_s":
        return scores.s.abs()
    if reading == "sqnorm":
        return scores.sqnorm
    if reading == "loss":
        if scores.loss is None:
            raise ValueError("reading 'loss' needs the per-sample loss: pass loss= to TaylorScorer.compute")
        return scores.loss
    raise ValueError(f"reading={reading!r} is invalid: expected one of d, s, abs_s, sqnorm, loss")


class TEDProtocol:
    """Owns the TED side of a training loop over one ``PruningSource`` (MDS or tar shards).

    dataset: the pruning dataset; its ``batch_size`` is the per-rank micro-batch. Its loader (for
        ``checkpoint``/``restore``): its ``loader_class``.
    model: the module to score (under DeepSpeed the model before ``deepspeed.initialize`` or
        ``engine.module``); not needed for the ``loss`` reading.
    scorer: a ``ted_stream.config.ScorerSettings``, or the ``"scorer"`` object of a ``"ted"``
        block (layers, rows, reading, ref_ema, seed) it is built from; default the measured default.
    epochs: epochs of the run (for ``progress``); default ``dataset.ted.epochs``.
    flush_every: micro-steps between transfers of the buffered scores to the table.
    """

    def __init__(
        self,
        dataset: PruningSource,
        model: Optional[nn.Module] = None,
        *,
        scorer: Union[ScorerSettings, Mapping[str, Any], None] = None,
        epochs: Optional[int] = None,
        flush_every: int = 16,
    ) -> None:
        require_source(dataset, "dataset")
        if not dataset.batch_size:
            raise ValueError(
                f"{type(dataset).__name__}(batch_size={dataset.batch_size!r}): expected the per-rank "
                "batch size the loader uses (the epoch is partitioned by it)"
            )
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every={flush_every!r} is invalid: expected an integer >= 1")
        epochs = dataset.ted.epochs if epochs is None else epochs
        if epochs is not None and dataset.ted.epochs is not None and epochs != dataset.ted.epochs:
            raise ValueError(
                f"epochs={epochs} but the dataset's TEDConfig.epochs={dataset.ted.epochs}: "
                "expected the same number of epochs"
            )
        settings = ScorerSettings.from_dict(scorer)
        self.dataset = dataset
        self.model = model
        self.settings = settings
        self.reading = settings.reading
        self.epochs = epochs
        self.flush_every = flush_every
        self.scorer: Optional[TaylorScorer] = None
        if self.reading != "loss":
            if model is None:
                raise ValueError(
                    f"reading {self.reading!r} scores gradients: pass the model (only the 'loss' reading needs none)"
                )
            self.scorer = TaylorScorer(
                model,
                layers=settings.layers,
                rows=settings.rows,
                seed=settings.seed,
                ref_ema=settings.ref_ema,
            )
        self.epoch = -1  # the epoch in progress (-1: none started)
        self.steps = 0  # micro-steps per rank in that epoch
        self.micro = 0  # micro-steps done in it (a resumed epoch counts those before the checkpoint)
        self.trained = 0  # samples trained over the run, all ranks, in closed epochs
        self.epoch_trained = 0  # samples this rank trained in the epoch in progress
        self.history: list[dict[str, Any]] = []  # one row per closed epoch
        self._closed = True  # whether the epoch in progress was accounted in ``history``
        self._batch: Optional[tuple[Tensor, Tensor, Tensor]] = None  # (ids, weights, loss) of the last loss()
        self._ids: list[Tensor] = []
        self._values: list[Tensor] = []
        self.skipped = 0  # scores dropped as not finite (fp16 loss-scale overflows), over the run

    # ---- per step ------------------------------------------------------------------------------
    def loss(self, per_sample_loss: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The training loss of a micro-batch: the mean of each sample's loss times its
        ``ted_weight`` (the policy's rescaling). Counts the micro-step; call ``score`` after backward."""
        if per_sample_loss.dim() != 1:
            raise ValueError(
                f"per_sample_loss has shape {tuple(per_sample_loss.shape)}: expected one loss per sample, shape [B]"
            )
        ids, weights = batch["ted_id"], batch["ted_weight"]
        # At least fp32: an fp16 weight times the fp16 loss scale (65536) in score() is inf.
        wide = torch.promote_types(per_sample_loss.dtype, torch.float32)
        weights = torch.as_tensor(weights).to(per_sample_loss.device, wide)
        if weights.shape != per_sample_loss.shape:
            raise ValueError(
                f"ted_weight has shape {tuple(weights.shape)} but the loss "
                f"{tuple(per_sample_loss.shape)}: "
                "expected one weight per sample"
            )
        self._batch = (torch.as_tensor(ids), weights, per_sample_loss.detach())
        self.micro += 1
        self.epoch_trained += len(weights)
        return (per_sample_loss * weights).mean()

    def score(self, backward_scale: Union[float, Tensor] = 1.0) -> None:
        """Score the micro-batch whose backward pass just ran and buffer the scores on the device.

        backward_scale: what the value returned by ``loss`` was multiplied by before ``backward``:
            1 / GAS when gradient accumulation divides it, times the fp16 loss scale if any.
        Collective under torch.distributed (the scorer all-reduces the reference gradient).
        """
        if self._batch is None:
            raise RuntimeError("score() without a preceding loss(): call loss() for every micro-batch first")
        ids, weights, per_sample = self._batch
        self._batch = None
        if self.scorer is None:
            value = per_sample
        else:
            value = reading_of(
                self.scorer.compute(weights * backward_scale / len(weights), loss=per_sample), self.reading
            )
        self._ids.append(ids.detach())
        self._values.append(value.detach())
        if len(self._ids) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered scores to the table (one host transfer). Scores that are not finite
        (a step whose fp16 loss scale overflowed: dynamic scaling does so on purpose) are dropped
        and counted in ``skipped``; those samples keep their previous score."""
        if not self._ids:
            return
        ids, values = torch.cat(self._ids).cpu(), torch.cat(self._values).float().cpu()
        self._ids, self._values = [], []
        finite = torch.isfinite(values)
        dropped = len(values) - int(finite.sum())
        if dropped:
            self.skipped += dropped
            log.warning(
                "dropped %d non-finite score(s) (fp16 loss-scale overflow?); %d over the run", dropped, self.skipped
            )
            ids, values = ids[finite], values[finite]
        self.dataset.record(ids, values)

    # ---- per epoch -----------------------------------------------------------------------------
    def start_epoch(self, epoch: Optional[int] = None) -> dict[str, int]:
        """Freeze the keep-mask of ``epoch`` (default: the epoch the loader iterates next); a
        collective. A resumed epoch keeps its mask and its step count. Returns epoch, kept,
        pruned, num_samples and steps (micro-steps per rank)."""
        self.flush()
        ds = self.dataset
        epoch = ds.upcoming_epoch() if epoch is None else epoch
        if epoch != self.epoch:
            if not self._closed:  # the run stopped (checkpoint) right at the end of the last one
                self.end_epoch()
            self.micro, self.epoch_trained, self._closed = 0, 0, False
        mask = ds.start_epoch(epoch)
        dist.barrier()  # each node's leader saved the table: no rank's loader worker reads an older file
        self.epoch = epoch
        self.steps = ceil(ds.rank_samples(epoch) / ds.batch_size)
        return {
            "epoch": epoch,
            "kept": mask.kept,
            "pruned": ds.num_samples - mask.kept,
            "num_samples": ds.num_samples,
            "steps": self.steps,
        }

    def end_epoch(self) -> dict[str, Any]:
        """Close the epoch in progress: flush, and account what it trained. Returns its row
        (epoch, kept, pruned, trained, saved_so_far); calling it again returns the same row."""
        self.flush()
        if self._closed:
            if not self.history:
                raise RuntimeError("end_epoch() before any start_epoch()")
            return self.history[-1]
        # Every rank trains the same number of samples per epoch (the kept count is rounded to
        # ranks x batch, and streaming pads to equal shares), so no collective is needed here.
        world = tdist.get_world_size() if dist.active() else 1
        trained = self.epoch_trained * world
        self.trained += trained
        mask = self.dataset.table.masks[self.epoch]
        n = self.dataset.num_samples
        row = {
            "epoch": self.epoch,
            "kept": mask.kept,
            "pruned": n - mask.kept,
            "trained": trained,
            "saved_so_far": 1.0 - self.trained / ((self.epoch + 1) * n),
        }
        self.history.append(row)
        self._closed = True
        return row

    def remaining(self) -> int:
        """Micro-steps left in the epoch in progress (all of them for a fresh epoch)."""
        return max(self.steps - self.micro, 0)

    def progress(self) -> float:
        """Fraction of the run done, in epochs: (epoch + done / steps) / epochs. A learning-rate
        schedule that follows it ends on time although pruned epochs have fewer steps."""
        if self.epochs is None:
            raise ValueError("progress() needs the run's epochs: set TEDConfig.epochs or pass epochs=")
        if self.epoch < 0:
            return 0.0
        return min((self.epoch + self.micro / max(self.steps, 1)) / self.epochs, 1.0)

    # ---- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, folder: str, loader: Any = None, *, skip_finished_epoch: bool = False) -> dict[str, Any]:
        """Merge every rank's scores, persist the table and copy it into ``folder`` (each node's
        table writer writes: ``folder`` may be node-local); a collective. Returns the protocol's
        state, with the loader's when given: store it with the checkpoint and pass it to
        ``restore``. See ``state_dict`` for ``skip_finished_epoch``."""
        self.flush()
        self.dataset.save_table()
        if self.dataset.pruner.leader:
            os.makedirs(folder, exist_ok=True)
            copy_atomic(self.dataset.table_path, os.path.join(folder, TABLE_FILE))
        return self.state_dict(loader, skip_finished_epoch=skip_finished_epoch)

    def state_dict(self, loader: Any = None, *, skip_finished_epoch: bool = False) -> dict[str, Any]:
        """The protocol's state (and the loader's, when given). At the last step of an epoch
        streaming resumes into that epoch's empty rest, where a loop closes it as usual;
        ``skip_finished_epoch`` resumes at the next epoch's start instead, for loops that stop
        on an empty epoch (the Hugging Face Trainer does)."""
        if self._ids or self._batch is not None:
            raise RuntimeError("state_dict() with scores not yet in the table: call checkpoint(), which flushes")
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "steps": self.steps,
            "micro": self.micro,
            "trained": self.trained,
            "epoch_trained": self.epoch_trained,
            "closed": self._closed,
            "history": list(self.history),
            "reference": None
            if self.scorer is None or self.scorer.reference is None
            else self.scorer.reference.detach().cpu(),
        }
        if loader is not None:
            state["loader"] = self._loader_state(loader, skip_finished_epoch)
        return state

    def _loader_state(self, loader: Any, skip_finished_epoch: bool) -> dict[str, Any]:
        state = loader.state_dict()
        if skip_finished_epoch and self.epoch >= 0 and self.micro >= self.steps and state["epoch"] == self.epoch:
            return self.dataset.next_epoch_state(state, self.epoch + 1)
        return state

    def load_state_dict(self, state: Mapping[str, Any], loader: Any = None) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"TED protocol state version {state.get('version')!r}: expected {STATE_VERSION}")
        self.epoch, self.steps, self.micro = state["epoch"], state["steps"], state["micro"]
        self.trained, self.epoch_trained = state["trained"], state["epoch_trained"]
        self._closed, self.history = state["closed"], list(state["history"])
        if self.scorer is not None and state["reference"] is not None:
            assert self.model is not None  # a scorer exists only with a model
            device = next(self.model.parameters()).device
            self.scorer.reference = state["reference"].to(device)
        if loader is not None:
            if "loader" not in state:
                raise ValueError("the checkpoint holds no loader state: it was saved by checkpoint() without a loader")
            loader.load_state_dict(state["loader"])

    def restore(self, folder: str, state: Mapping[str, Any], loader: Any = None) -> None:
        """Resume from a checkpoint ``folder`` written by ``checkpoint``: its table replaces the
        dataset's (scores recorded after the checkpoint would otherwise count twice), then the
        protocol's and the loader's state are loaded. A collective; call it before iterating."""
        path = os.path.join(folder, TABLE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: expected the score table saved by "
                "TEDProtocol.checkpoint in every checkpoint folder"
            )
        self.dataset.load_table(path)
        self.load_state_dict(state, loader)
