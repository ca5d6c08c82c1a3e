"""Training LPMFlow (kind ``lpmflow``): the released recipe's configs (``shared/reference/lpmflow.md``
section 5), the demo config, ``sm_train``'s per-epoch ``set_epoch`` hook seen from inside the
model's loss (the real loop in Ray Train's in-process local mode), and the demo trained through
Ray Train on 2 DDP workers, then evaluated by ``sm_eval`` (e2e)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from sm_model.config import ModelConfig, replace_fields
from sm_model.factory import create_model
from sm_model.lpmflow.model import LPMFlow
from sm_model.registry import build_model
from sm_train.config import AugmentConfig, load_config, resolve_paths, to_dict
from sm_train.loop import build_optimizer
from tests.conftest import REPO_ROOT
from tests.test_train_kinds import assert_evaluates, train_demo

DEMO = REPO_ROOT / "configs/lpmflow_demo.yaml"


@pytest.mark.parametrize("dataset", ["spair", "pfpascal"])
def test_the_recipe_configs_hold_the_released_recipe(dataset: str) -> None:
    config = load_config(REPO_ROOT / f"configs/lpmflow_ibot_256_{dataset}.yaml")
    model, optim, train = config.model, config.optim, config.train
    teacher = "checkpoints/ibot_vitb16_teacher.pth"
    assert (model.kind, model.backbone, model.weights) == ("lpmflow", "ibot_vitb16", teacher)
    assert (model.image_size, model.finetune, model.final_norm, model.localizer) == (256, "full", True, None)
    assert model.options.input_size == 512 and model.options.input_side(model.image_size) == 512
    # The kind's registered defaults are the released model; the config only spells them out.
    defaults = ModelConfig.of_kind("lpmflow", weights=model.weights, options=model.options)
    assert model == defaults
    assert (optim.optimizer, optim.weight_decay, optim.lr, optim.backbone_lr) == ("adamw", 0.05, 4e-5, 3e-6)
    assert (optim.lr_schedule, optim.lr_milestones) == ("epochs", ())  # a constant rate over 10 epochs
    assert (train.batch_size * config.run.num_workers, train.epochs) == (32, 10)
    assert (train.val_frame, config.data.val_split) == ("resized", "val")  # selection on val, never test
    # The project's default augmentation, drawn per pair as every paper config here.
    assert config.augment == dataclasses.replace(AugmentConfig(), pair_draws="official")
    assert config.data.shards == f"data/shards/{dataset}" and config.run.name == f"lpmflow_ibot_256_{dataset}"
    # Ray workers run elsewhere: the iBOT teacher file resolves against the starting directory.
    assert resolve_paths(config, Path("/base")).model.weights == f"/base/{teacher}"

    # Full fine-tuning: every parameter trains, the ViT at 3e-6 and the rest at 4e-5, all decayed.
    with torch.device("meta"):
        built = build_model(replace_fields(model, {"weights": None}, "test"))
    assert all(p.requires_grad for p in built.parameters())
    backbone, head = build_optimizer(optim, built).param_groups
    assert len(backbone["params"]) == len(list(built.backbone.parameters())) and backbone["lr"] == 3e-6
    assert head["lr"] == 4e-5 and backbone["weight_decay"] == head["weight_decay"] == 0.05


def test_the_demo_config_loads_and_its_model_builds() -> None:
    config = load_config(DEMO)
    model = config.model
    assert (model.kind, model.backbone, model.weights, model.image_size, model.finetune) == (
        "lpmflow", "dinov2_vits14", None, 56, "full"
    )
    assert (config.run.num_workers, config.augment.enabled) == (2, False)
    assert (config.optim.optimizer, config.optim.lr, config.optim.backbone_lr, config.optim.weight_decay) == (
        "adamw", 4e-5, 3e-6, 0.05
    )
    torch.manual_seed(0)
    built = create_model(model)
    assert isinstance(built, LPMFlow) and built.grid == 4 and built.input_spec.size == 128
    src, trg = torch.rand(2, 1, 3, 128, 128).unbind(0)
    with torch.no_grad():
        encoded = built.eval().encode(src, trg)
    assert encoded.flow.shape == (1, 2, 32, 32) and encoded.contrastive is None
    # topk_fraction 1.0: 4 of the 16 patches are replaced in training, so the InfoNCE has negatives.
    assert int(16 * model.options.topk_fraction * model.options.replace_fraction) == 4


def test_sm_train_sets_the_epoch_before_each_epochs_steps(
    demo_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ``train_loop_per_worker`` in Ray Train's local mode (``ScalingConfig(num_workers=0)``:
    the loop runs in this process, with Ray's own single-worker context), so the model's loss can
    be observed: every step of epoch ``e`` sees ``model.epoch == e`` and the InfoNCE weight of
    ``e`` (0.2, 0.2, 0.1). Only the TensorBoard writer is left out: local mode has no storage
    context to put it under."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    import sm_train.loop

    seen: list[tuple[int | None, float]] = []
    loss = LPMFlow.loss

    def recording_loss(self: LPMFlow, *args, **kwargs):
        seen.append((self.epoch, self.config.options.contrastive_weight_at(self.epoch)))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(LPMFlow, "loss", recording_loss)
    monkeypatch.setattr(sm_train.loop, "_tensorboard_writer", lambda context: None)
    config = load_config(
        DEMO,
        [
            f"data.shards={demo_shards}",
            "data.loader_workers=0",
            "data.val_split=null",
            "train.epochs=3",
            "train.max_steps_per_epoch=2",
            "train.batch_size=1",
            "train.log_every_steps=1",
        ],
    )
    trainer = TorchTrainer(
        sm_train.loop.train_loop_per_worker,
        train_loop_config={"config": to_dict(config)},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name="lpmflow-local", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.metrics["epoch"] == 3 and result.metrics["step"] == 6
    assert seen == [(0, 0.2), (0, 0.2), (1, 0.2), (1, 0.2), (2, 0.1), (2, 0.1)]


@pytest.mark.e2e
def test_the_demo_trains_with_ddp_through_ray_train_and_evaluates(
    ray_cluster: str, demo_shards: Path, tmp_path: Path
) -> None:
    """2 workers under DDP as ``ray.train.torch.prepare_model`` wraps it (no
    ``find_unused_parameters``): every parameter must get a gradient each step, or the second
    step fails."""
    config, result = train_demo(DEMO, demo_shards, tmp_path, "lpmflow", 2)
    assert config.run.num_workers == 2
    metrics = result.metrics
    assert metrics["data/pairs_seen"] == 2 * 2 * config.train.batch_size and metrics["data/pairs_repeated"] == 0
    assert metrics["ddp/replica_max_abs_diff"] == 0.0  # the replicas stayed identical
    assert metrics["lr"] == pytest.approx(4e-5) and metrics["lr/backbone"] == pytest.approx(3e-6)
    with result.checkpoint.as_directory() as directory:
        assert_evaluates(Path(directory) / "model.pt", demo_shards, tmp_path / "eval", "lpmflow")
