"""Training any model kind: parameter groups (backbone and head learning rates), the per-epoch
MultiStep schedule beside the per-iteration StepLR (unchanged), zero-shot refused, and the
survey's baseline trained through Ray Train on the demo shards and evaluated by ``sm_eval``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sm_model.checkpoint import load_model, save_checkpoint
from sm_model.config import ModelConfig, from_dict
from sm_model.registry import build_model
from sm_model.simplematch import SimpleMatchOptions
from sm_train.config import ConfigError, OptimConfig, TrainConfig, load_config
from sm_train.loop import STATE_FILE, Position, build_optimizer, build_scheduler, learning_rates, restore

REPO_ROOT = Path(__file__).resolve().parents[1]

BASELINE = ModelConfig(
    kind="baseline", backbone="dinov2_vits14", image_size=28, finetune="last_blocks", finetune_blocks=2, final_norm=True
)
SIMPLEMATCH = ModelConfig(backbone="dinov2_vits14", image_size=28, window_size=5, options=SimpleMatchOptions(decoder_channels=16))
EPOCHS = OptimConfig(
    optimizer="adamw", lr=1e-3, backbone_lr=1e-4, lr_schedule="epochs", lr_milestones=(1, 2), lr_gamma=0.5
)


def _ids(parameters) -> list[int]:
    return [id(p) for p in parameters]


def _trainable(module: torch.nn.Module) -> list[int]:
    return _ids(p for p in module.parameters() if p.requires_grad)


def test_parameter_groups_hold_the_backbone_and_the_head_at_their_rates() -> None:
    torch.manual_seed(0)
    model = build_model(SIMPLEMATCH)  # LoRA on the backbone, a decoder as head
    head = [id(p) for name, p in model.named_parameters() if p.requires_grad and not name.startswith("backbone.")]
    assert head and _trainable(model.backbone)
    optimizer = build_optimizer(EPOCHS, model)
    backbone_group, head_group = optimizer.param_groups
    assert _ids(backbone_group["params"]) == _trainable(model.backbone) and backbone_group["lr"] == 1e-4
    assert _ids(head_group["params"]) == head and head_group["lr"] == 1e-3
    assert isinstance(optimizer, torch.optim.AdamW) and head_group["weight_decay"] == EPOCHS.weight_decay
    assert learning_rates(optimizer) == {"lr": 1e-3, "lr/backbone": 1e-4}

    # The baseline has no head: one group, the backbone's last 2 blocks, at backbone_lr.
    baseline = build_model(BASELINE)
    (only,) = build_optimizer(EPOCHS, baseline).param_groups
    blocks = baseline.backbone.tunable_blocks()
    assert _ids(only["params"]) == _trainable(baseline) == _ids(p for b in blocks[-2:] for p in b.parameters())
    assert only["lr"] == 1e-4
    # A frozen backbone leaves the head's group only.
    frozen = build_model(dataclasses.replace(SIMPLEMATCH, finetune="frozen"))
    (only,) = build_optimizer(EPOCHS, frozen).param_groups
    assert _ids(only["params"]) == _trainable(frozen) and only["lr"] == 1e-3
    # Without backbone_lr: one group of every trainable parameter, in the model's order, at lr.
    (only,) = build_optimizer(dataclasses.replace(EPOCHS, backbone_lr=None), model).param_groups
    assert _ids(only["params"]) == _trainable(model) and only["lr"] == 1e-3


def test_epoch_schedule_halves_after_epochs_1_and_2_and_restores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(SIMPLEMATCH)
    optimizer = build_optimizer(EPOCHS, model)
    scheduler = build_scheduler(EPOCHS, optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    seen = [learning_rates(optimizer)]
    for _ in range(3):  # the loop steps it once at the end of every epoch
        optimizer.step()
        scheduler.step()
        seen.append(learning_rates(optimizer))
    assert seen == [
        {"lr": 1e-3, "lr/backbone": 1e-4},
        {"lr": 5e-4, "lr/backbone": 5e-5},
        {"lr": 2.5e-4, "lr/backbone": 2.5e-5},
        {"lr": 2.5e-4, "lr/backbone": 2.5e-5},
    ]

    # What a checkpoint after epoch 1 holds continues the schedule where it left off.
    optimizer = build_optimizer(EPOCHS, model)
    scheduler = build_scheduler(EPOCHS, optimizer)
    optimizer.step()
    scheduler.step()
    save_checkpoint(model, tmp_path / "model.pt")
    position = Position(epoch=1, global_step=7)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "position": vars(position)}
    torch.save(state, tmp_path / STATE_FILE)
    fresh = build_model(SIMPLEMATCH)
    fresh_optimizer = build_optimizer(EPOCHS, fresh)
    fresh_scheduler = build_scheduler(EPOCHS, fresh_optimizer)
    assert restore(tmp_path, fresh, fresh_optimizer, fresh_scheduler, torch.device("cpu")) == position
    assert learning_rates(fresh_optimizer) == {"lr": 5e-4, "lr/backbone": 5e-5}
    fresh_scheduler.step()
    assert learning_rates(fresh_optimizer) == {"lr": 2.5e-4, "lr/backbone": 2.5e-5}


def test_iteration_schedule_is_the_one_group_step_lr_of_before() -> None:
    """The default optimizer and schedule step the same numbers as the code before parameter
    groups (one Adam group over the trainable parameters, StepLR per iteration), to the bit."""
    config = dataclasses.replace(OptimConfig(), lr_step_iterations=2, weight_decay=1e-2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(SIMPLEMATCH))
    old, new = models
    trainable = [p for p in old.parameters() if p.requires_grad]
    old_optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    old_scheduler = torch.optim.lr_scheduler.StepLR(old_optimizer, config.lr_step_iterations, config.lr_gamma)
    new_optimizer = build_optimizer(config, new)
    new_scheduler = build_scheduler(config, new_optimizer)
    assert isinstance(new_scheduler, torch.optim.lr_scheduler.StepLR)
    generator = torch.Generator().manual_seed(1)
    shapes = [p.shape for p in old.parameters() if p.requires_grad]
    gradients = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(5)]
    for step in gradients:
        for model, optimizer, scheduler in ((old, old_optimizer, old_scheduler), (new, new_optimizer, new_scheduler)):
            for p, gradient in zip((p for p in model.parameters() if p.requires_grad), step):
                p.grad = gradient.clone()
            optimizer.step()
            scheduler.step()
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    assert new_optimizer.state_dict()["param_groups"] == old_optimizer.state_dict()["param_groups"]
    assert learning_rates(new_optimizer) == {"lr": old_scheduler.get_last_lr()[0]}
    assert learning_rates(new_optimizer)["lr"] == pytest.approx(config.lr * config.lr_gamma**2)


def test_zero_shot_is_refused_for_training() -> None:
    message = (
        r"model\.kind must be one of \['baseline', 'lpmflow', 'simplematch', 'vitsc'\] to train, "
        r"got 'zero-shot': a zero-shot model trains nothing; evaluate it with python -m sm_eval --model zero-shot:{}"
    )
    with pytest.raises(ConfigError, match=r"overrides model\.kind=zero-shot: " + message.format("dinov2_vitb14")):
        load_config(None, ["model.kind=zero-shot"])
    frozen = ["model.kind=zero-shot", "model.finetune=frozen", "model.backbone=resnet18"]
    with pytest.raises(ConfigError, match=message.format("resnet18")):
        load_config(None, frozen)
    # The loop's and the sweeps' path (from_dict of a config dict) refuses it as well.
    document = {"model": {"kind": "zero-shot", "finetune": "frozen", "backbone": "dinov2_vits14"}}
    with pytest.raises(ConfigError, match=r"^train_loop_config: " + message.format("dinov2_vits14")):
        from_dict(TrainConfig, document, "train_loop_config")
    assert load_config(None, ["model.kind=baseline"]).model.kind == "baseline"


def test_baseline_configs_hold_the_survey_recipe() -> None:
    for name in ("spair", "ap10k"):
        config = load_config(REPO_ROOT / f"configs/baseline_dinov2_vitb14_840_{name}.yaml")
        model, optim = config.model, config.optim
        assert (model.kind, model.backbone, model.weights) == ("baseline", "dinov2_vitb14", "hub")
        assert model.image_size == 840
        assert (model.finetune, model.finetune_blocks, model.final_norm) == ("last_blocks", 2, True)
        assert (model.options.loss_temperature, model.options.target_window) == (0.03, 7)
        assert (model.localizer_method, model.kernel_sigma, model.beta) == ("kernel", 7.0, 0.04)
        assert (optim.optimizer, optim.lr, optim.backbone_lr, optim.weight_decay) == ("adamw", 1e-4, 1e-4, 0.05)
        assert (optim.lr_schedule, optim.lr_milestones, optim.lr_gamma) == ("epochs", (1, 2), 0.5)
        assert (config.train.batch_size, config.train.val_frame, config.augment.enabled) == (4, "resized", False)
    demo = load_config(REPO_ROOT / "configs/baseline_demo.yaml")
    assert (demo.model.kind, demo.model.weights, demo.optim.lr_milestones) == ("baseline", None, (1, 2))


def test_baseline_trains_through_ray_train_and_evaluates(ray_cluster: str, demo_shards: Path, tmp_path: Path) -> None:
    _, result = train_demo(REPO_ROOT / "configs/baseline_demo.yaml", demo_shards, tmp_path, "baseline", 3, "model.image_size=56")
    # The epoch schedule stepped at the end of the epoch, before its checkpoint: halved once.
    assert result.metrics["lr"] == pytest.approx(5e-5)
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, weights_only=True)
        assert state["scheduler"]["last_epoch"] == 1 and state["position"]["epoch"] == 1
        assert_evaluates(Path(directory) / "model.pt", demo_shards, tmp_path / "eval", "baseline")


def train_demo(
    config_file: Path, shards: Path, tmp_path: Path, kind: str, steps: int, *overrides: str
) -> tuple[TrainConfig, Any]:
    """``config_file`` (with ``overrides``) trained through Ray Train on the session's cluster for one
    epoch of ``steps`` steps on the demo ``shards``, run ``kind`` under ``tmp_path``: the config and
    the Ray ``Result``, whose fit succeeded with a finite validation PCK after that epoch."""
    from sm_train.trainer import build_trainer

    config = load_config(
        config_file,
        [
            f"data.shards={shards}",
            f"run.storage_path={tmp_path / 'runs'}",
            f"run.name={kind}",
            *overrides,
            "data.loader_workers=0",
            "data.val_batch_size=15",
            "train.epochs=1",
            f"train.max_steps_per_epoch={steps}",
            "train.log_every_steps=1",
        ],
    )
    result = build_trainer(config).fit()
    assert result.error is None
    metrics = result.metrics
    assert metrics["epoch"] == 1 and metrics["step"] == steps and math.isfinite(metrics["val/pck@0.1"])
    return config, result


def assert_evaluates(checkpoint: Path, shards: Path, out: Path, kind: str) -> None:
    """The trained ``checkpoint`` holds a ``kind`` model, and ``sm_eval`` scores it on the demo test
    split: PCK in [0, 1] in both frames."""
    from sm_eval.evaluate import EvalRequest, evaluate
    from sm_eval.runner import EvalSettings

    assert load_model(checkpoint).config.kind == kind

    report = evaluate(
        EvalRequest(
            checkpoints=(str(checkpoint),),
            shards=str(shards),
            out=str(out),
            split="test",
            settings=EvalSettings(batch_size=15, loader_workers=0, threads=2),
            device="cpu",
            matches=0,
            progress=False,
        )
    )
    (model,) = report["models"]
    assert model["config"]["kind"] == kind
    for frame in ("original", "resized"):
        overall = model["results"][frame]["overall"]
        assert all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in overall["per_image"])


def test_sweeps_take_any_trainable_kind(tmp_path: Path) -> None:
    from sm_train.tune import load_space, trial_config

    base = load_config(REPO_ROOT / "configs/baseline_demo.yaml")
    space = tmp_path / "kinds.yaml"
    space.write_text(
        "space:\n  model.kind: {grid: [simplematch, baseline]}\n  optim.lr_milestones: {grid: [[1], [1, 2]]}\n"
    )
    assert load_space(space, base).space["model.kind"] == ("grid", ["simplematch", "baseline"])
    trial = trial_config(base, {"model.kind": "simplematch", "optim.backbone_lr": 1e-5}, "trial")
    assert (trial.model.kind, trial.optim.backbone_lr, trial.run.name) == ("simplematch", 1e-5, "trial")
    assert trial.model.options == SimpleMatchOptions()  # the base's baseline options are left behind
    space.write_text("space:\n  model.kind: {grid: [zero-shot]}\n")
    refused = r"space\.model\.kind='zero-shot': model\.kind must be one of .* trains nothing"
    with pytest.raises(ConfigError, match=refused):
        load_space(space, base)
