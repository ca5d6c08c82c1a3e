"""The model contract every kind keeps (sm_model.matcher): the model owns its input, encodes a
pair once and matches any points; one front door builds any model; a config section per kind;
checkpoints and configs written before kinds had sections still load (tests/fixtures/legacy)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sm_model.checkpoint import load_model, save_checkpoint
from sm_model.config import ConfigError, ModelConfig, from_dict, replace_fields, to_dict
from sm_model.factory import RANDOM_WEIGHTS, create_model, read_model_file
from sm_model.feature_matcher import BaselineOptions, ZeroShotOptions
from sm_model.inputs import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from sm_model.lpmflow import LpmflowOptions
from sm_model.matcher import MatchModel
from sm_model.registry import zero_shot_config
from sm_model.simplematch import SimpleMatchOptions
from sm_model.vitsc import VitscOptions
from sm_train.config import load_config
from tests.conftest import REPO_ROOT

LEGACY = Path(__file__).parent / "fixtures" / "legacy"

KINDS = {
    "simplematch": ModelConfig(
        backbone="dinov2_vits14", image_size=28, window_size=5, options=SimpleMatchOptions(decoder_channels=16)
    ),
    "simplematch-multiscale": ModelConfig(
        backbone="resnet18",
        image_size=64,
        finetune="full",
        window_size=5,
        options=SimpleMatchOptions(decoder_channels=8, multiscale=True, coarse_window_sizes=(None, 3)),
    ),
    "zero-shot": zero_shot_config("zero-shot:dinov2_vits14", weights=None, image_size=28),
    "baseline": ModelConfig(
        kind="baseline",
        backbone="dinov2_vits14",
        image_size=28,
        finetune="last_blocks",
        finetune_blocks=2,
        final_norm=True,
        options=BaselineOptions(),
    ),
    "vitsc": ModelConfig(
        kind="vitsc",
        backbone="dinov2_vits14",
        image_size=56,
        finetune="last_blocks",
        finetune_blocks=2,
        final_norm=True,
        options=VitscOptions(dim=32, heads=4),
    ),
    "lpmflow": ModelConfig.of_kind(
        "lpmflow",
        backbone="dinov2_vits14",
        image_size=56,
        finetune="last_blocks",
        finetune_blocks=2,
        options=LpmflowOptions(input_size=64, encoder_depth=1, heads=4, context_channels=8),
    ),
}


@pytest.fixture(scope="module", params=list(KINDS))
def model(request: pytest.FixtureRequest) -> MatchModel:
    torch.manual_seed(0)
    return create_model(KINDS[request.param]).eval()


def _pair(size: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, batch, 3, size, size, generator=generator).unbind(0)


def _keypoints(size: int, batch: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    kps = torch.rand(batch, count, 2, generator=generator) * (size - 1)
    valid = torch.rand(batch, count, generator=generator) > 0.2
    return kps, valid


def _assert_same(outputs, expected) -> None:
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got.points, want.points) and torch.equal(got.scores, want.scores)
        assert got.stride == want.stride


def test_match_of_encode_equals_forward_for_any_keypoints(model: MatchModel) -> None:
    size = model.input_spec.size
    src, trg = _pair(size)
    with torch.no_grad():
        encoded = model.encode(src, trg)
        for seed, count in ((0, 5), (1, 11)):  # a second keypoint set against the same encoding
            kps, valid = _keypoints(size, 2, count, seed)
            _assert_same(model.match(encoded, kps, valid), model(src, trg, kps, valid))


def test_prepare_is_a_float_network_input(model: MatchModel) -> None:
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    prepared = model.prepare(image)
    size = model.input_spec.size
    assert prepared.dtype == torch.float32 and prepared.shape == (3, size, size)
    spec = model.input_spec
    expected = (spec.resize(image).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    torch.testing.assert_close(prepared, expected, rtol=0, atol=0)
    assert torch.equal(spec.batch([image, image]), torch.stack([prepared, prepared]))


def test_input_spec_follows_the_config() -> None:
    config = dataclasses.replace(KINDS["simplematch"], image_resize="official", pixel_convention="official")
    assert InputSpec.of(config) == InputSpec(28, resize_method="official", pixel_convention="official")
    points, sizes = torch.tensor([[[10.0, 20.0]]]), torch.tensor([[56, 112]])
    spec = InputSpec.of(config)
    torch.testing.assert_close(spec.to_input_pixels(points, sizes), torch.tensor([[[5.0, 5.0]]]))
    torch.testing.assert_close(spec.to_original_pixels(spec.to_input_pixels(points, sizes), sizes), points)


def test_match_original_refuses_an_encoding_of_another_size(model: MatchModel) -> None:
    size = model.input_spec.size
    src, trg = _pair(size * 2, batch=1)
    kps, valid = _keypoints(size, 1, 2, 0)
    with pytest.raises(ValueError, match=f"encoded at {size * 2} px but the model's input is {size} px"):
        model.match_original(model.encode(src, trg), kps, valid, torch.tensor([[60, 40]]), torch.tensor([[60, 40]]))


# ---- the front door ----------------------------------------------------------------------------


def test_checkpoint_round_trip_of_every_kind(model: MatchModel, tmp_path: Path) -> None:
    save_checkpoint(model, tmp_path / "model.pt")
    loaded = create_model(tmp_path).eval()
    assert loaded.config == model.config and type(loaded) is type(model)
    for (name, saved), restored in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(saved, restored), name
    size = model.input_spec.size
    src, trg = _pair(size, batch=1)
    kps, valid = _keypoints(size, 1, 4, 0)
    with torch.no_grad():
        _assert_same(loaded(src, trg, kps, valid), model(src, trg, kps, valid))


def test_the_front_door_takes_a_config_a_checkpoint_a_folder_and_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    built = create_model(KINDS["simplematch"]).eval()
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    save_checkpoint(built, folder / "model.pt")
    src, trg = _pair(28, batch=1)
    kps, valid = _keypoints(28, 1, 4, 0)
    expected = built(src, trg, kps, valid)
    for source in (folder / "model.pt", folder, str(folder), (folder / "model.pt").read_bytes()):
        _assert_same(create_model(source).eval()(src, trg, kps, valid), expected)
    overridden = create_model(folder, window_size=3, localizer="kernel")
    assert (overridden.config.window_size, overridden.config.localizer_method) == (3, "kernel")
    with pytest.raises(ConfigError, match="window_sizes"):
        create_model(folder, window_sizes=3)


def test_the_front_door_builds_zero_shot_models_seeded() -> None:
    first = create_model("zero-shot:dinov2_vits14", backbone_weights=RANDOM_WEIGHTS, image_size=28)
    second = create_model("zero-shot:dinov2_vits14", backbone_weights=RANDOM_WEIGHTS, image_size=28)
    assert first.config.kind == "zero-shot" and first.config.weights is None and first.config.image_size == 28
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_front_door_names_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="notes.txt is not a readable torch checkpoint"):
        read_model_file(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_model(tmp_path / "missing.pt")


# ---- config sections ---------------------------------------------------------------------------


def test_each_kind_has_its_section_under_its_name() -> None:
    document = to_dict(KINDS["baseline"])
    assert document["baseline"] == {"loss_temperature": 0.03, "target_window": 7}
    assert "loss_temperature" not in document and "simplematch" not in document
    assert from_dict(ModelConfig, document, "x") == KINDS["baseline"]
    assert to_dict(KINDS["zero-shot"])["zero-shot"] == {}
    assert isinstance(KINDS["zero-shot"].options, ZeroShotOptions)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"loss_temperature": 0.1},
            r"model\.loss_temperature is an option of kind 'baseline', but the model's kind is 'simplematch'",
        ),
        (
            {"kind": "baseline", "multiscale": True},
            r"model\.multiscale is an option of kind 'simplematch', but the model's kind is 'baseline'",
        ),
        (
            {"kind": "baseline", "simplematch": {}},
            r"model\.simplematch is the section of kind 'simplematch', but the model's kind is 'baseline'",
        ),
        (
            {"simplematch": {"decoder_chanels": 8}},
            r"unknown key 'model\.simplematch\.decoder_chanels' \(did you mean 'decoder_channels'\?\)",
        ),
        ({"simplematch": [1, 2]}, r"model\.simplematch must be a mapping of simplematch options"),
        (
            {"kind": "lpm"},
            r"model\.kind='lpm' is not one of \['baseline', 'lpmflow', 'simplematch', 'vitsc', 'zero-shot'\]",
        ),
        ({"bogus": 1}, r"unknown key 'model\.bogus'"),
    ],
)
def test_a_key_of_another_kind_or_none_is_an_error_naming_it(document: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, document, "f.yaml", "model.")


def test_a_flat_key_of_the_kind_moves_into_its_section_and_dotted_overrides_reach_it() -> None:
    flat = from_dict(ModelConfig, {"decoder_channels": 16, "multiscale": True}, "old.yaml")
    assert flat.options == SimpleMatchOptions(decoder_channels=16, multiscale=True)
    replaced = replace_fields(flat, {"simplematch.decoder_dropout": 0.1, "window_size": 7}, "overrides")
    assert replaced.options == SimpleMatchOptions(decoder_channels=16, multiscale=True, decoder_dropout=0.1)
    assert replace_fields(flat, {"decoder_channels": 32}, "overrides").options.decoder_channels == 32


# ---- written before kinds had sections ---------------------------------------------------------


def test_old_flat_yaml_configs_still_load(tmp_path: Path) -> None:
    for name in ("demo.yaml", "baseline_demo.yaml"):
        old, new = load_config(LEGACY / name), load_config(REPO_ROOT / "configs" / name)
        assert old == new, name


def test_old_checkpoints_still_load_with_their_options(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the frozen backbone is rebuilt randomly, as when the fixture was written
    simplematch = load_model(LEGACY / "simplematch.pt")
    assert simplematch.config.options == SimpleMatchOptions(decoder_channels=16, decoder_dropout=0.1)
    expected = torch.load(LEGACY / "simplematch_expected.pt", weights_only=True)
    with torch.no_grad():
        (matches,) = simplematch.eval()(expected["src"], expected["trg"], expected["src_kps"], expected["valid"])
    torch.testing.assert_close(matches.points, expected["points_0"], rtol=0, atol=1e-4)
    torch.testing.assert_close(matches.scores, expected["scores_0"], rtol=0, atol=1e-4)

    baseline = load_model(LEGACY / "baseline.pt")
    assert baseline.config.kind == "baseline" and baseline.config.options == BaselineOptions(0.05, 5)
    zero_shot = load_model(LEGACY / "zero_shot.pt")
    assert zero_shot.config.kind == "zero-shot" and zero_shot.config.final_norm
    # Saved again, an old checkpoint is written in today's format and reads back the same.
    save_checkpoint(baseline, tmp_path / "baseline.pt", trainable_only=True)
    assert load_model(tmp_path / "baseline.pt").config == baseline.config
    shutil.copy(LEGACY / "baseline.pt", tmp_path / "old.pt")
    assert yaml.safe_dump(to_dict(load_model(tmp_path / "old.pt").config))  # plain values throughout
