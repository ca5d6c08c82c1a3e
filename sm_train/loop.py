"""The training loop each Ray Train worker runs: ``train_loop_per_worker``.

Any trainable model kind (:func:`sm_model.factory.create_model`; ``simplematch`` or ``baseline``)
trains here unchanged. Per epoch every worker reads its exact share of the training pairs
(:func:`sm_train.data.plan_epoch`), augments on the device, steps the optimizer and the
learning-rate schedule (:func:`build_scheduler`: per iteration, or per epoch at the epoch's end,
before its checkpoint), then all workers validate their share of the val shards; rank 0 scores
the gathered per-keypoint records with :mod:`sm_eval.pck` and reports them with a checkpoint.
Mid-epoch checkpoints (``checkpoint_every_steps``) carry the position in the epoch, so a restarted
worker group (``FailureConfig``) or a resubmitted run (same ``name`` and ``storage_path``)
continues exactly where the last checkpoint left off.

A checkpoint directory holds ``model.pt`` (:func:`sm_model.save_checkpoint`, full weights,
loadable by ``sm_eval``), ``train_state.pt`` (optimizer, scheduler, position) and ``config.yaml``.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipelines.reader import split_shards
from pipelines.storage import Location
from sm_eval.pck import KeypointRecords, records_in_frame, summarize
from sm_eval.predict import predict_records
from sm_feed.batches import PairBatch
from sm_model.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from sm_model.config import from_dict
from sm_model.factory import create_model
from sm_model.matcher import MatchModel
from sm_train.augment import PairAugmentation
from sm_train.config import SELECTION_METRIC, OptimConfig, TrainConfig, dump_yaml, val_metric
from sm_train.data import pair_batches, plan_epoch

logger = logging.getLogger("sm_train")

STATE_FILE, CONFIG_FILE = "train_state.pt", "config.yaml"


@dataclass
class Position:
    """Where training stands: ``epoch`` in progress and ``step`` optimizer steps into it;
    ``global_step`` counts every step of the run; ``resumes`` how often it restarted from a
    checkpoint; ``initial_val`` the validation metrics of the untrained model."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    resumes: int = 0
    initial_val: dict[str, float] = field(default_factory=dict)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config = {"config": to_dict(TrainConfig)}``."""
    import ray.train.torch  # here, not at the top: the step functions run where Ray is not installed

    config: TrainConfig = from_dict(TrainConfig, loop_config["config"], "train_loop_config")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # kornia draws augmentation parameters from torch's global generator: one stream per rank.
    torch.manual_seed(config.train.seed + rank)
    autocast_dtype = autocast_dtype_for(config.train.precision, device)

    model = create_model(config.model).to(device)
    optimizer = build_optimizer(config.optim, model)
    scheduler = build_scheduler(config.optim, optimizer)
    per_iteration = config.optim.lr_schedule == "iterations"
    position = Position()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # A private copy per rank: with Checkpoint.as_directory the ranks of a node share one
        # download, which the first rank done deletes while a later one may still be starting
        # ("Checkpoint directory ... does not exist, even though it should have been created").
        with tempfile.TemporaryDirectory(prefix="sm-restore-") as directory:
            position = restore(Path(checkpoint.to_directory(directory)), model, optimizer, scheduler, device)
        position.resumes += 1
        logger.info("rank %d resumed at epoch %d step %d (global step %d)", rank, position.epoch, position.step, position.global_step)
    trained = ray.train.torch.prepare_model(model) if world_size > 1 else model

    shards = Location(config.data.shards, config.run.s3_endpoint_url)
    train_counts = split_shards(shards, config.data.train_split)
    val_split = config.data.val_split
    val_shards = [name for name, count in split_shards(shards, val_split).items() if count] if val_split else []
    augment = PairAugmentation(config.augment).to(device)
    writer = _tensorboard_writer(context) if rank == 0 else None

    if position.global_step == 0:
        position.initial_val = {
            key.replace("val/", "val_initial/"): value
            for key, value in validation_metrics(model, shards, val_shards, config, device, autocast_dtype).items()
        }
        if rank == 0:
            logger.info("val before training: %s", _format_metrics(position.initial_val))
            _log_scalars(writer, position.initial_val, 0)

    for epoch in range(position.epoch, config.train.epochs):
        model.set_epoch(epoch)
        plan = plan_epoch(train_counts, world_size, config.train.batch_size, config.train.seed, epoch)
        steps = min(plan.steps, config.train.max_steps_per_epoch or plan.steps)
        if rank == 0 and position.step == 0:
            logger.info(
                "epoch %d: %d pairs per worker, %d steps of %d x %d, %d pairs left out this epoch",
                epoch, plan.pairs_per_rank, steps, world_size, config.train.batch_size,
                plan.dropped + world_size * (plan.steps - steps) * config.train.batch_size,
            )
        seen: list[str] = []
        window, epoch_start, first_step = _Window(device), time.perf_counter(), position.step
        batches = pair_batches(
            shards,
            plan.ranks[rank],
            spec=model.input_spec,
            batch_size=config.train.batch_size,
            loader_workers=config.data.loader_workers,
            shuffle_buffer=config.data.shuffle_buffer,
            seed=config.train.seed,
            epoch=epoch,
            split_nodes=False,
            max_batches=steps,
            skip_batches=position.step,
            device=device,
        )
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            loss = train_step(trained, model, augment, optimizer, batch, config, autocast_dtype)
            if per_iteration:
                scheduler.step()
            position.step += 1
            position.global_step += 1
            seen += [meta.key for meta in batch.meta]
            window.add(loss, len(batch))
            if position.step % config.train.log_every_steps == 0 or position.step == steps:
                metrics = window.summary(world_size) | learning_rates(optimizer)
                if rank == 0:
                    logger.info("epoch %d step %d/%d %s", epoch, position.step, steps, _format_metrics(metrics))
                    _log_scalars(writer, {f"train/{k}": v for k, v in metrics.items()}, position.global_step)
                window = _Window(device)
            every = config.train.checkpoint_every_steps
            if every and position.step % every == 0 and position.step < steps:
                progress = {SELECTION_METRIC: math.nan, "epoch": epoch + position.step / steps}
                _report(model, optimizer, scheduler, position, config, rank, progress)

        throughput = (position.step - first_step) * config.train.batch_size * world_size / (time.perf_counter() - epoch_start)
        audit = audit_epoch(seen, trained if world_size > 1 else None)
        val = validation_metrics(model, shards, val_shards, config, device, autocast_dtype)
        if not per_iteration:
            scheduler.step()  # the epoch is done: its checkpoint below holds the next epoch's rates
        position.epoch, position.step = epoch + 1, 0
        metrics = {
            **val,
            **position.initial_val,
            **audit,
            "epoch": epoch + 1,
            **learning_rates(optimizer),
            "train/pairs_per_s": throughput,
            **_memory(device),
        }
        if rank == 0:
            logger.info("epoch %d done: %s", epoch, _format_metrics(metrics))
            _log_scalars(writer, metrics, position.global_step)
        _report(model, optimizer, scheduler, position, config, rank, metrics)
        if writer is not None:
            _publish_tensorboard(writer, context.get_storage())
    if writer is not None:
        writer.close()


def train_step(
    trained: nn.Module,
    model: MatchModel,
    augment: PairAugmentation,
    optimizer: torch.optim.Optimizer,
    batch: PairBatch,
    config: TrainConfig,
    autocast_dtype: torch.dtype | None,
) -> Tensor:
    """One optimizer step on ``batch`` (on the device); returns the detached loss.

    ``trained`` is what runs forward (the DDP wrapper when distributed), ``model`` the bare module."""
    spec = model.input_spec  # its pixel convention is the frame of the model's predictions
    batch = augment.exchange(batch)
    categories = [meta.category for meta in batch.meta]
    src_kps = spec.to_input_pixels(batch.src_kps, batch.src_size)
    trg_kps = spec.to_input_pixels(batch.trg_kps, batch.trg_size)
    src_bbox = spec.to_input_pixels(batch.src_bbox.view(-1, 2, 2), batch.src_size).view(-1, 4)
    trg_bbox = spec.to_input_pixels(batch.trg_bbox.view(-1, 2, 2), batch.trg_size).view(-1, 4)
    with torch.no_grad():
        # augment.pair_draws decides whether the geometry is drawn per image or once per pair.
        (src, src_kps, src_in), (trg, trg_kps, trg_in) = augment.pair(
            (batch.src_image.float() / 255, src_kps, src_bbox),
            (batch.trg_image.float() / 255, trg_kps, trg_bbox),
            categories,
        )
    valid = batch.valid & src_in & trg_in
    with torch.autocast(src.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        predictions = trained(spec.normalize(src), spec.normalize(trg), src_kps, valid)
    loss = model.loss(predictions, trg_kps, valid)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.optim.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
    optimizer.step()
    return loss.detach()


def parameter_groups(config: OptimConfig, model: MatchModel) -> list[dict[str, Any]]:
    """The optimizer's parameter groups over ``model``'s trainable parameters, in the model's
    parameter order. Without ``config.backbone_lr``: one group at ``config.lr``. With it: the
    backbone's (``model.backbone``) at ``backbone_lr``, then the rest (the head) at ``lr``; an
    empty group is left out (a ``baseline`` has no head). The last group is the head's whenever
    the model has one (:func:`learning_rates`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.backbone_lr is None:
        return [{"params": trainable, "lr": config.lr}]
    in_backbone = {id(p) for p in model.backbone.parameters()}
    backbone = [p for p in trainable if id(p) in in_backbone]
    head = [p for p in trainable if id(p) not in in_backbone]
    groups = [{"params": backbone, "lr": config.backbone_lr}, {"params": head, "lr": config.lr}]
    return [group for group in groups if group["params"]]


def build_optimizer(config: OptimConfig, model: MatchModel) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over ``model``'s trainable parameters
    (:func:`parameter_groups`). Built on the bare model, before DDP wraps it: the wrapper trains
    the same parameter tensors."""
    groups = parameter_groups(config, model)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def build_scheduler(config: OptimConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of ``config.lr_schedule`` (every group alike): ``iterations``, a
    ``StepLR`` stepped after every optimizer step (``lr_gamma`` every ``lr_step_iterations``);
    ``epochs``, a ``MultiStepLR`` stepped at the end of every epoch (``lr_gamma`` after each epoch of
    ``lr_milestones``)."""
    if config.lr_schedule == "epochs":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_milestones), config.lr_gamma)
    return torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step_iterations, config.lr_gamma)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The logged rates: ``lr`` of the last parameter group (the head's, or the only one's) and,
    with two groups, ``lr/backbone``."""
    rates = {"lr": optimizer.param_groups[-1]["lr"]}
    if len(optimizer.param_groups) > 1:
        rates["lr/backbone"] = optimizer.param_groups[0]["lr"]
    return rates


def validation_metrics(
    model: MatchModel,
    shards: Location,
    val_shards: list[str],
    config: TrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """PCK on the val split: every worker predicts its share of the shards (split by rank), the
    per-keypoint records are gathered, and every rank returns the same metrics
    (``val/pck@<alpha>`` per image, ``val/pck_kp@<alpha>`` per keypoint) in the frame
    ``train.val_frame``."""
    if not val_shards:
        return {}
    batches = pair_batches(
        shards,
        val_shards,
        spec=model.input_spec,
        batch_size=config.data.val_batch_size,
        loader_workers=config.data.loader_workers,
        device=device,
    )
    mine = predict_records(model, batches, device, autocast_dtype=autocast_dtype)
    gathered = _all_gather(mine.to_dict() if mine is not None else None)
    records = [KeypointRecords.from_dict(part) for part in gathered if part is not None]
    if not records:
        return {}
    gathered_records = records_in_frame(KeypointRecords.concat(records), config.train.val_frame)
    summary = summarize(gathered_records, config.train.val_alphas)["overall"]
    metrics = {}
    for alpha, per_image, per_keypoint in zip(config.train.val_alphas, summary["per_image"], summary["per_keypoint"]):
        metrics[val_metric(alpha)] = per_image
        metrics[val_metric(alpha, per_keypoint=True)] = per_keypoint
    metrics["val/pairs"] = summary["n_pairs"]
    return metrics


def audit_epoch(seen: list[str], replicated: nn.Module | None) -> dict[str, float]:
    """Epoch invariants across workers: pairs seen, pairs seen by more than one worker or twice
    (both must be 0 when epochs are exact) and the largest difference between the workers'
    parameter checksums (0 when DDP keeps the replicas identical)."""
    gathered = _all_gather(seen)
    everything = [key for keys in gathered for key in keys]
    checksum = 0.0
    if replicated is not None:
        checksum = float(sum(p.detach().double().sum().item() for p in replicated.parameters()))
    checksums = _all_gather(checksum)
    return {
        "data/pairs_seen": len(everything),
        "data/pairs_repeated": len(everything) - len(set(everything)),
        "ddp/replica_max_abs_diff": max(abs(c - checksums[0]) for c in checksums),
    }


def restore(
    directory: Path,
    model: MatchModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> Position:
    """Load a checkpoint directory written by :func:`_report` into the model, optimizer and
    scheduler; returns the saved position."""
    load_checkpoint(model, directory / MODEL_FILE)
    state = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Position(**state["position"])


def _report(
    model: MatchModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    config: TrainConfig,
    rank: int,
    metrics: dict[str, float],
) -> None:
    """Report ``metrics`` with a checkpoint of the current state (written by rank 0 only; every
    rank calls this, because ``ray.train.report`` is a barrier)."""
    import ray.train

    metrics = {**metrics, "step": position.global_step, "epoch_step": position.step, "resumes": position.resumes}
    name = f"epoch={position.epoch:04d}-step={position.step:06d}"
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            path = Path(directory)
            save_checkpoint(model, path / MODEL_FILE)
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "position": vars(position)},
                path / STATE_FILE,
            )
            (path / CONFIG_FILE).write_text(dump_yaml(config))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class _Window:
    """Loss and throughput over the steps since the last progress line."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start = device, time.perf_counter()
        self.loss_sum, self.pairs, self.steps = torch.zeros((), device=device), 0, 0

    def add(self, loss: Tensor, pairs: int) -> None:
        self.loss_sum += loss.float()
        self.pairs += pairs
        self.steps += 1

    def summary(self, world_size: int) -> dict[str, float]:
        """Mean loss over all workers and the global pairs/s (a collective: every rank calls it)."""
        loss = self.loss_sum / max(self.steps, 1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= world_size
        elapsed = time.perf_counter() - self.start
        return {"loss": float(loss), "pairs_per_s": self.pairs * world_size / elapsed}


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this worker in MiB: device memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return {"memory/peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"memory/peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _tensorboard_writer(context: Any):
    """A TensorBoard writer under the run directory when it is local; for remote storage the
    events go to the worker's local run directory (TensorBoard reads it from there)."""
    from torch.utils.tensorboard import SummaryWriter

    storage = context.get_storage()
    run_dir = Path(storage.experiment_fs_path)
    if not run_dir.is_absolute() or not _is_local(storage):
        run_dir = Path(tempfile.gettempdir()) / "sm_train" / context.get_experiment_name()
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _is_local(storage: Any) -> bool:
    return isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)


def _publish_tensorboard(writer: Any, storage: Any) -> None:
    """Copy the event files into the run directory when it is on remote storage."""
    if _is_local(storage):
        return
    writer.flush()
    pyarrow.fs.copy_files(
        writer.log_dir,
        f"{storage.experiment_fs_path}/tensorboard",
        destination_filesystem=storage.storage_filesystem,
    )


def _log_scalars(writer: Any, metrics: dict[str, float], step: int) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, (int, float, np.floating)) and math.isfinite(value):
            writer.add_scalar(key, value, step)
    writer.flush()


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
