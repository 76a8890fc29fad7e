"""TED pruning inside the Hugging Face ``Trainer`` (see docs/integrations.md).

    trainer = TEDTrainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

``TEDTrainer`` (or ``TEDTrainerMixin`` in front of another Trainer subclass) takes a pruning
dataset (a ``ted_stream.source.PruningSource``: MDS shards or indexed WebDataset tar shards) as
``train_dataset`` and runs the TED protocol (``ted_stream.protocol``):

* the loader is the dataset's own ``loader_class`` (streaming's for MDS shards, the exact
  path's for tar shards), handed to the Trainer as is: the dataset already partitions the epoch by
  rank, so accelerate must neither shard nor dispatch it;
* each epoch's keep-mask is frozen when the Trainer calls the loader's ``set_epoch``, and the
  loader's length is the epoch's (pruned) number of batches;
* the per-sample loss is weighted by ``ted_weight``; each sample's score is recorded;
* every Trainer checkpoint gets the table and the TED/loader state; ``resume_from_checkpoint``
  restores them, so the resumed run yields the sample stream of the uninterrupted one; the table
  file is saved when training ends, too;
* the learning-rate schedule follows epoch progress, so it ends with the last (pruned) epoch;
* each epoch's kept / pruned / trained / saved figures go to the Trainer's logs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from math import ceil
from typing import TYPE_CHECKING, Any, Optional, Union

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as e:  # the core install has no transformers
    raise ImportError(
        f"ted_stream.integrations.hf needs transformers and accelerate ({e}): pip install 'ted_stream[hf]'"
    ) from e

import torch
from torch import Tensor

from ..config import ScorerSettings
from ..protocol import TEDProtocol, deepspeed_loss_scale
from ..scorer import per_sample_ce, per_sample_lm_loss
from ..source import PruningSource, model_inputs, require_source

__all__ = [
    "TEDTrainer",
    "TEDTrainerMixin",
    "TEDCallback",
    "trainer_loader",
    "causal_lm_loss",
    "refuse_data_parallel",
    "STATE_FILE",
]

STATE_FILE = "ted_state.pt"  # the protocol's and the loader's state, beside the Trainer's files


def causal_lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sequence loss of a causal LM (mean over its own target tokens; labels as in HF,
    aligned with the inputs, -100 ignored); a classifier's logits [B, C] get cross-entropy."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    return per_sample_lm_loss(logits, labels) if logits.dim() == 3 else per_sample_ce(logits, labels)


class _Collate:
    """The Trainer's collator on everything but ted_id / ted_weight, which become tensors."""

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        ids = [s.pop("ted_id") for s in samples]
        weights = [s.pop("ted_weight") for s in samples]
        batch = self.collate(samples)
        batch["ted_id"] = torch.tensor(ids, dtype=torch.long)
        batch["ted_weight"] = torch.tensor(weights, dtype=torch.float32)
        return batch


class _TrainerEpochs:
    """A loader as the Trainer sees it: ``set_epoch`` (which the Trainer calls at each epoch
    start) freezes that epoch's mask, and ``len`` is the batches left in that epoch. Before the
    first epoch the length is the unpruned one, from which the Trainer sizes its schedule."""

    dataset: Any

    def _follow(self, protocol: TEDProtocol, on_epoch: Callable[[dict[str, int]], None]) -> None:
        self.protocol = protocol
        self.on_epoch = on_epoch
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        # The Trainer's epoch number is not the loader's after a resume (it divides the global
        # step by the unpruned epoch length): the protocol starts the epoch the loader iterates.
        self._started = True
        self.on_epoch(self.protocol.start_epoch())

    def __len__(self) -> int:
        if not self._started:
            return ceil(self.dataset.unpruned_rank_samples / self.dataset.batch_size)
        return self.protocol.remaining()


_TRAINER_LOADERS: dict[type, type] = {}  # made once per dataset loader_class


def trainer_loader(
    dataset: PruningSource, protocol: TEDProtocol, on_epoch: Callable[[dict[str, int]], None], **kwargs: Any
) -> _TrainerEpochs:
    """The dataset's own ``loader_class`` (which keeps its position for an exact resume) with the
    epochs the Trainer sees (``_TrainerEpochs``); kwargs are the loader's (``collate_fn``, ...)."""
    base = dataset.loader_class
    if base not in _TRAINER_LOADERS:
        _TRAINER_LOADERS[base] = type(f"Trainer{base.__name__}", (_TrainerEpochs, base), {"__module__": __name__})
    loader = _TRAINER_LOADERS[base](dataset, batch_size=dataset.batch_size, **kwargs)
    loader._follow(protocol, on_epoch)
    return loader


class TEDCallback(TrainerCallback):
    """The Trainer events of the protocol: epoch accounting and logs, checkpoints, stopping
    after the configured epochs, and ``state.epoch`` in the loader's epochs."""

    def __init__(self, trainer: TEDTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ted = self.trainer.ted
        state.epoch = ted.epoch + ted.micro / max(ted.steps, 1)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ted = self.trainer.ted
        ted.end_epoch()
        self.trainer._log_ted_rows()
        # A resumed Trainer may plan more epochs than are left (see _TrainerEpochs.set_epoch).
        if ted.epochs is not None and ted.epoch + 1 >= ted.epochs:
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The last epoch's scores reach the table file even without a checkpoint at the end.
        self.trainer.ted.flush()
        self.trainer.ted.dataset.save_table()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # The Trainer stops at an empty epoch: a checkpoint at an epoch's end resumes the next one.
        saved = self.trainer.ted.checkpoint(folder, self.trainer.get_train_dataloader(), skip_finished_epoch=True)
        if args.should_save:  # beside the Trainer's own files: on each node with save_on_each_node
            torch.save(saved, os.path.join(folder, STATE_FILE))


if TYPE_CHECKING:  # the mixin's Trainer attributes, for the type checker
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class TEDTrainerMixin(_TrainerBase):
    """Put in front of ``Trainer`` (or a subclass of it): ``class T(TEDTrainerMixin, SFTTrainer)``.

    Extra keyword arguments:
        ted_scorer: a ``ted_stream.config.ScorerSettings`` (e.g. the third value of
            ``split_config``) or its JSON object; default every linear layer, 16 rows, reading d.
        per_sample_loss: ``fn(outputs, labels) -> [B]`` losses; default ``causal_lm_loss``.
        ted_flush_every: micro-steps between transfers of the scores to the table.
    """

    def __init__(
        self,
        *args: Any,
        ted_scorer: Union[ScorerSettings, Mapping[str, Any], None] = None,
        per_sample_loss: Callable[[Any, Tensor], Tensor] = causal_lm_loss,
        ted_flush_every: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        ds, targs = require_source(self.train_dataset, "train_dataset"), self.args
        if ds.batch_size != targs.per_device_train_batch_size:
            raise ValueError(
                f"{type(ds).__name__}(batch_size={ds.batch_size}) but per_device_train_batch_size="
                f"{targs.per_device_train_batch_size}: expected the same per-rank batch (the "
                "dataset partitions each epoch by it)"
            )
        ds.check_world(targs.process_index, targs.world_size)
        refuse_data_parallel(targs)
        if targs.max_steps > 0:
            raise ValueError(
                f"max_steps={targs.max_steps}: expected -1; TED training is counted in epochs "
                "(num_train_epochs), since pruned epochs have fewer steps"
            )
        epochs = targs.num_train_epochs
        if epochs != int(epochs) or epochs < 1:
            raise ValueError(f"num_train_epochs={epochs}: expected a whole number of epochs >= 1")
        self.ted = TEDProtocol(ds, self.model, scorer=ted_scorer, epochs=int(epochs), flush_every=ted_flush_every)
        self.per_sample_loss = per_sample_loss
        # Our loss is a per-sample mean: the Trainer must divide it by the accumulation steps
        # itself, as for any loss that ignores num_items_in_batch.
        self.model_accepts_loss_kwargs = False
        # The loader's state resumes mid-epoch; the Trainer's own batch skipping would skip those
        # batches a second time.
        targs.ignore_data_skip = True
        self._ted_loader: Optional[_TrainerEpochs] = None
        self.add_callback(TEDCallback(self))

    # ---- data ----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:  # a _TrainerEpochs
        """The dataset's own loader (see ``trainer_loader``), not passed through accelerate (which
        would re-shard it by rank)."""
        if self._ted_loader is None:
            targs = self.args
            workers = targs.dataloader_num_workers
            extra = {"prefetch_factor": targs.dataloader_prefetch_factor} if workers else {}
            self._ted_loader = trainer_loader(
                self.ted.dataset,
                self.ted,
                self._log_epoch_start,
                collate_fn=_Collate(self._get_collator_with_removed_columns(self.data_collator, "training")),
                num_workers=workers,
                pin_memory=targs.dataloader_pin_memory,
                persistent_workers=targs.dataloader_persistent_workers and workers > 0,
                **extra,
            )
        return self._ted_loader

    def _log_epoch_start(self, info: dict[str, int]) -> None:
        transformers.logging.get_logger(__name__).info(
            "TED epoch %d: keeping %d of %d samples (%d pruned), %d steps per rank",
            info["epoch"],
            info["kept"],
            info["num_samples"],
            info["pruned"],
            info["steps"],
        )
        self._log_ted_rows()  # a run resumed from a checkpoint at an epoch's last step closes it here

    def _log_ted_rows(self) -> None:
        """Log each closed epoch's row (ted_kept, ted_pruned, ted_trained, ted_saved_so_far) once;
        the Trainer's log history, restored from a checkpoint, says which are logged already."""
        logged = {r["ted_epoch"] for r in self.state.log_history if "ted_epoch" in r}
        for row in self.ted.history:
            if row["epoch"] not in logged:
                self.log({f"ted_{k}": v for k, v in row.items()})

    # ---- the step ------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Tensor] = None,
    ) -> Any:
        if "ted_id" not in inputs or not model.training:  # evaluation, or a batch not from the TED loader
            return super().compute_loss(model, model_inputs(inputs), return_outputs, num_items_in_batch)
        batch = {"ted_id": inputs.pop("ted_id"), "ted_weight": inputs.pop("ted_weight")}
        labels = inputs.pop("labels")
        outputs = model(**inputs)  # without labels: the model computes no loss of its own
        loss = self.ted.loss(self.per_sample_loss(outputs, labels), batch)
        return (loss, outputs) if return_outputs else loss

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if "ted_weight" not in inputs:
            return super()._prepare_inputs(inputs)
        # Under DeepSpeed the Trainer casts float inputs to the engine's dtype: bf16 would round
        # the policy's weights by up to 0.4%.
        prepared = super()._prepare_inputs({k: v for k, v in inputs.items() if k != "ted_weight"})
        prepared["ted_weight"] = inputs["ted_weight"].to(self.args.device, torch.float32)
        return prepared

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Optional[Tensor] = None) -> Tensor:
        # Before the step: under DeepSpeed, accelerate steps the engine inside backward, and a
        # step changes the fp16 loss scale (halved after an overflow, doubled after a window).
        scale = self._loss_scale()
        loss = super().training_step(model, inputs, num_items_in_batch)
        # backward ran on loss / current accumulation steps (times the fp16 loss scale, if any)
        self.ted.score(backward_scale=scale / self.current_gradient_accumulation_steps)
        return loss

    def _loss_scale(self) -> Union[float, Tensor]:
        if getattr(self, "is_deepspeed_enabled", False):
            return deepspeed_loss_scale(self.model_wrapped)
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else 1.0  # fp16 AMP only: one host sync

    # ---- schedule and resume -------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created:
            follow_epochs(scheduler, self.ted.progress, num_training_steps)
        return scheduler

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]  # trial, ... by keyword
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint")
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: expected a checkpoint written by a TEDTrainer")
            state = torch.load(path, weights_only=True)
            self.ted.restore(resume_from_checkpoint, state, self.get_train_dataloader())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class TEDTrainer(TEDTrainerMixin, Trainer):
    """``transformers.Trainer`` with TED pruning; see ``TEDTrainerMixin`` for its extra arguments."""


def refuse_data_parallel(targs: Any) -> None:
    """ValueError if the Trainer would wrap the model in ``nn.DataParallel`` (one process that
    sees several GPUs): its replicas would share the scorer's hooks."""
    if targs.n_gpu > 1:
        raise ValueError(
            f"TrainingArguments.n_gpu={targs.n_gpu}: one process sees several GPUs, so the Trainer "
            "would wrap the model in nn.DataParallel, whose replicas share the scorer's hooks; "
            f"expected one process per GPU: torchrun --nproc_per_node {targs.n_gpu} (or "
            "accelerate launch, or deepspeed) your script, or CUDA_VISIBLE_DEVICES=0 for one GPU"
        )


def follow_epochs(scheduler: Any, progress: Callable[[], float], total_steps: int) -> None:
    """Make a ``LambdaLR`` (every ``get_scheduler`` type but plateau) read the run's progress in
    epochs instead of its step count: at progress p it applies the factor of step p * total_steps,
    so warm-up and decay keep their shape and the schedule ends with the last, pruned, epoch."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(
            f"the learning-rate schedule is a {type(scheduler).__name__}: expected a LambdaLR "
            "(any transformers.get_scheduler type but reduce_lr_on_plateau) to follow epoch progress"
        )

    def at_progress(factor: Callable[[int], float]) -> Callable[[int], float]:
        # A plain function, not an object: LambdaLR.state_dict would pickle an object's __dict__.
        def lr_factor(step: int) -> float:
            return factor(round(progress() * total_steps))

        return lr_factor

    scheduler.lr_lambdas = [at_progress(f) for f in scheduler.lr_lambdas]
