"""Training configuration: every shipped YAML loads, unknown keys, bad values and values out of
range are rejected with a message naming the file and key, overrides and YAML round trips."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_args

import pytest
import torch
import yaml

from pipelines.storage import Location, arrow_filesystem
from sm_eval.pck import FRAMES
from sm_model.config import ModelConfig, from_dict
from sm_model.inputs import InputSpec
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.model import SimpleMatch
from sm_train.config import (
    ConfigError,
    TrainConfig,
    ValFrame,
    config_keys,
    dump_yaml,
    load_config,
    resolve_paths,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    copy = tmp_path / "copy.yaml"
    copy.write_text(dump_yaml(config))
    assert load_config(copy) == config


def test_paper_settings_are_shipped() -> None:
    names = {p.stem for p in CONFIGS}
    for expected in (
        "demo",
        "dinov2_vitb14_252_spair",
        "dinov2_vitb14_448_spair",
        "dinov2_vitb14_252_pfpascal",
        "dinov2_vitb14_448_pfpascal",
        "dinov2_vitb14_448_ap10k",
        "ibot_vitb16_256_spair",
        "resnet101_256_spair",
    ):
        assert expected in names
    spair = load_config(CONFIGS[[p.stem for p in CONFIGS].index("dinov2_vitb14_252_spair")])
    assert (spair.optim.lr, spair.optim.lr_step_iterations, spair.optim.lr_gamma) == (6e-4, 800, 0.95)
    assert (spair.train.batch_size, spair.train.epochs, spair.model.window_size) == (8, 10, 45)


def test_paper_configs_use_the_official_pair_draws_and_the_resized_val_frame() -> None:
    assert get_args(ValFrame) == FRAMES  # the config's names are sm_eval.pck's frames
    for path in CONFIGS:
        config = load_config(path)
        # The baseline configs train without augmentation, as the survey's code does by default.
        geometry = config.augment.enabled and (config.augment.crop_p > 0 or config.augment.rotation_p > 0)
        paper = not path.stem.endswith("demo")
        assert config.augment.pair_draws == ("official" if paper and geometry else "independent"), path.stem
        assert config.train.val_frame == ("resized" if paper else "original"), path.stem
    with pytest.raises(ConfigError, match=r"train\.val_frame='square' is not one of \['original', 'resized'\]"):
        load_config(None, ["train.val_frame=square"])
    with pytest.raises(ConfigError, match=r"augment\.pair_draws='pairwise' is not one of"):
        load_config(None, ["augment.pair_draws=pairwise"])


def test_val_frame_picks_the_frame_of_validation_pck(demo_shards: Path) -> None:
    from pipelines.reader import split_shards
    from sm_eval.pck import records_in_frame, summarize
    from sm_eval.predict import predict_records
    from sm_train.data import pair_batches
    from sm_train.loop import validation_metrics

    torch.manual_seed(0)
    tiny = ModelConfig(backbone="dinov2_vits14", image_size=28, window_size=5, options=SimpleMatchOptions(decoder_channels=16))
    model = SimpleMatch(tiny).eval()
    shards = Location(str(demo_shards))
    names = [name for name, count in split_shards(shards, "val").items() if count]
    device = torch.device("cpu")
    records = predict_records(
        model, pair_batches(shards, names, spec=InputSpec(28), batch_size=16, loader_workers=0), device
    )
    alphas = (0.05, 0.1, 0.15)
    seen = []
    for frame in FRAMES:
        config = dataclasses.replace(
            load_config(None, ["data.loader_workers=0", f"train.val_frame={frame}"]), model=tiny
        )
        metrics = validation_metrics(model, shards, names, config, device, None)
        overall = summarize(records_in_frame(records, frame), alphas)["overall"]
        assert [metrics[f"val/pck@{a:g}"] for a in alphas] == overall["per_image"]
        assert [metrics[f"val/pck_kp@{a:g}"] for a in alphas] == overall["per_keypoint"]
        seen.append(overall["per_keypoint"])
    assert seen[0] != seen[1]  # the frames score differently


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'optim\.learning_rate'.*optim accepts"):
        load_config(path)
    path.write_text("model:\n  image_sise: 252\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.image_sise' \(did you mean 'image_size'\?\)"):
        load_config(path)
    path.write_text("modle:\n  image_size: 252\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        load_config(path)


def test_bad_values_are_rejected_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    for text, message in [
        ("train:\n  batch_size: eight\n", r"train\.batch_size must be an integer"),
        ("train:\n  precision: fp8\n", r"train\.precision='fp8' is not one of"),
        ("optim:\n  lr: fast\n", r"optim\.lr must be a number"),
        ("model:\n  scale_weights: [1, 1]\n", r"model\.simplematch\.scale_weights must have 3 items"),
        ("augment:\n  crop_p: 1.5\n", r"augment: crop_p must be a probability"),
        ("- just\n- a list\n", r"expected a mapping of sections"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_values() -> None:
    config = load_config(None, ["model.image_size=448", "optim.lr=1e-4", "optim.grad_clip_norm=null", "run.use_gpu=true"])
    assert config.model.image_size == 448
    assert config.optim.lr == pytest.approx(1e-4)  # "1e-4" is a string in YAML 1.1: coerced
    assert config.optim.grad_clip_norm is None and config.run.use_gpu is True
    assert load_config(None, ["train.val_alphas=[0.05, 0.1]"]).train.val_alphas == (0.05, 0.1)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["model.image_size"])
    with pytest.raises(ConfigError, match="with overrides optim.lrr=1: unknown key 'optim.lrr'.*did you mean 'lr'"):
        load_config(None, ["optim.lrr=1"])


def test_config_keys_lists_every_leaf() -> None:
    keys = config_keys()
    assert {"model.image_size", "optim.lr", "augment.crop_p", "run.num_workers", "train.epochs"} <= set(keys)
    assert not any(key in {"model", "optim"} for key in keys)
    assert TrainConfig() == load_config(None)


def test_paths_and_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = resolve_paths(load_config(None, ["data.shards=rel/shards", "run.storage_path=s3://bucket/runs"]), tmp_path)
    assert config.data.shards == str(tmp_path / "rel/shards")
    assert config.run.storage_path == "s3://bucket/runs"
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert arrow_filesystem("s3://bucket/runs", None) == ("s3://bucket/runs", None)
    assert arrow_filesystem(str(tmp_path), "http://127.0.0.1:9000") == (str(tmp_path), None)
    path, filesystem = arrow_filesystem("s3://bucket/runs", "http://127.0.0.1:9000")
    assert path == "bucket/runs" and filesystem is not None
    # One endpoint setting: the environment's, where the config gives none.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert arrow_filesystem("s3://bucket/runs", None)[1] is not None


def test_one_s3_endpoint_key_and_the_selection_alpha() -> None:
    assert load_config(None, ["run.s3_endpoint_url=http://127.0.0.1:9000"]).run.s3_endpoint_url == "http://127.0.0.1:9000"
    for old in ("data.s3_endpoint_url", "run.storage_endpoint_url"):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(None, [f"{old}=http://127.0.0.1:9000"])
    with pytest.raises(ConfigError, match=r"val_alphas \[0.05, 0.15\] must hold 0.1: val/pck@0.1 ranks the checkpoints"):
        load_config(None, ["train.val_alphas=[0.05, 0.15]"])


def test_demo_config_builds_a_model() -> None:
    config = load_config(Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    model = SimpleMatch(config.model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


OUT_OF_RANGE = [
    "train.batch_size=-4",
    "train.batch_size=0",
    "train.epochs=-1",
    "train.log_every_steps=0",
    "train.checkpoint_every_steps=-1",
    "train.max_steps_per_epoch=0",
    "optim.lr=.nan",
    "optim.lr=0",
    "optim.lr=-1e-3",
    "optim.weight_decay=-0.1",
    "optim.lr_gamma=0",
    "optim.lr_gamma=1.5",
    "optim.grad_clip_norm=0",
    "optim.grad_clip_norm=.inf",
    "optim.backbone_lr=0",
    "optim.backbone_lr=.nan",
    "optim.lr_milestones=[0, 2]",
    "model.image_size=-128",
    "model.beta=.nan",
    "model.simplematch.decoder_dropout=1",
    "model.simplematch.coarse_window_sizes=[null, 0]",
    "run.num_workers=-2",
    "run.cpus_per_worker=0",
    "run.keep_checkpoints=0",
    "run.max_failures=-1",
    "data.loader_workers=-1",
    "data.val_batch_size=0",
    "data.shuffle_buffer=-1",
]


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_out_of_range_values_are_rejected_naming_the_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"with overrides {re.escape(override)}: {re.escape(key)} must be "):
        load_config(None, [override])


def test_learning_rate_schedules_and_groups_are_checked() -> None:
    config = load_config(None, ["optim.lr_schedule=epochs", "optim.lr_milestones=[1, 2]", "optim.backbone_lr=1e-5"])
    assert (config.optim.lr_schedule, config.optim.lr_milestones, config.optim.backbone_lr) == ("epochs", (1, 2), 1e-5)
    defaults = load_config(None).optim  # today's per-iteration StepLR, one learning rate
    assert (defaults.lr_schedule, defaults.lr_milestones, defaults.backbone_lr) == ("iterations", (), None)
    with pytest.raises(ConfigError, match=r"optim\.lr_milestones must be increasing epochs, got \[2, 1\]"):
        load_config(None, ["optim.lr_schedule=epochs", "optim.lr_milestones=[2, 1]"])
    with pytest.raises(ConfigError, match=r"optim\.lr_milestones \[1\] need lr_schedule 'epochs'"):
        load_config(None, ["optim.lr_milestones=[1]"])
    with pytest.raises(ConfigError, match=r"optim\.lr_schedule='steps' is not one of \['iterations', 'epochs'\]"):
        load_config(None, ["optim.lr_schedule=steps"])


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "/abs", "..", ".", "", "a\\b"])
def test_run_name_is_one_directory_of_the_storage_path(name: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.name must be one directory name"):
        load_config(None, [f"run.name={name!r}"])
    assert load_config(None, ["run.name=demo-2.1_a b"]).run.name == "demo-2.1_a b"


def test_cli_refuses_a_bad_value_in_one_line(capsys: pytest.CaptureFixture) -> None:
    from sm_train.__main__ import main

    demo = str(Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    assert main(["--config", demo, "train.batch_size=-4", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {demo} with overrides train.batch_size=-4: train.batch_size must be at least 1, got -4"
    ]


def test_cli_backbone_weights_set_the_model_weights(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from sm_train.__main__ import main

    demo = str(Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    teacher = tmp_path / "ibot_vitb16_teacher.pth"
    assert main(["--config", demo, "--backbone-weights", str(teacher), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["weights"] == str(teacher)


def test_model_config_checks_its_own_ranges() -> None:
    with pytest.raises(ValueError, match=r"image_size must be between 1 and 4,096, got 0"):
        ModelConfig(image_size=0)
    with pytest.raises(ConfigError, match=r"checkpoint x: model\.lora_alpha must be a finite number above 0, got inf"):
        from_dict(TrainConfig, {"model": {"lora_alpha": float("inf")}}, "checkpoint x")
