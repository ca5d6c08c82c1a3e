"""Hostile configs, checkpoints and images at the model's edge: each ends in a one-line error naming
the input (or is drawn within bounds), never in a traceback, a hang or a silently changed score.

Numbers refer to the hardening issue's list: 1 a YAML alias bomb, 2 deep nesting, 3 absurd sizes,
4 malformed checkpoint documents, 5 a very tall or wide image in sm_eval.match, 7 Ray workers lost
for good, 10 NaN weights (15, matching under every autocast state: tests/test_matching.py)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from sm_eval import runner
from sm_eval.__main__ import main as eval_main
from sm_eval.checkpoints import official_model_config
from sm_eval.evaluate import non_finite_count
from sm_eval.match import main as match_main
from sm_eval.report import _data_lines as data_lines
from sm_model.checkpoint import CHECKPOINT_FORMAT, load_model, save_checkpoint
from sm_model.config import MAX_YAML_VALUES, ConfigError, ModelConfig, from_dict, load_yaml, parse_override
from sm_model.factory import create_model
from sm_model.simplematch import SimpleMatchOptions
from sm_train.config import load_config
from tests.conftest import REPO_ROOT
from tests.test_eval import save_tiny

COMMON = ["--split", "test", "--threads", "2", "--loader-workers", "0", "--matches", "0", "--no-progress",
          "--log-level", "WARNING"]  # fmt: skip
LEVELS = 9


def alias_bomb(levels: int = LEVELS) -> str:
    """A ~500-byte document whose last alias expands to 9**levels strings (about 390 million)."""
    lines = ["a0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def config_bomb(path: Path) -> Path:
    body = alias_bomb().replace("\n", "\n  ")
    path.write_text(f"model:\n  {body}backbone: *l{LEVELS - 1}\n")
    return path


@pytest.mark.parametrize("kind", ["alias bomb", "deep nesting"])
def test_1_2_a_bomb_or_a_deep_config_is_a_one_line_error_in_seconds_within_8_gb(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.yaml"
    if kind == "alias bomb":
        config_bomb(path)
    else:
        path.write_text("model: " + "[" * 50_000 + "]" * 50_000 + "\n")

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sm_train", "--config", str(path), "--print-config"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, preexec_fn=cap_memory, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and str(path) in message[0]
    assert ("expands to more than" if kind == "alias bomb" else "nests deeper than") in message[0]


def test_1_aliases_within_bounds_still_load_and_a_bomb_fails_everywhere_yaml_is_read(tmp_path: Path) -> None:
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "ok.yaml") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(ConfigError, match=f"bomb.yaml: the YAML expands to more than {MAX_YAML_VALUES:,} values"):
        load_yaml(alias_bomb(), "bomb.yaml")
    flow = "{" + alias_bomb().strip().replace("\n", ", ") + "}"
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_override(f"window_size={flow}", "model option", "key=value")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(REPO_ROOT / "configs/demo.yaml", [f"model.window_size={flow}"])
    with pytest.raises(ConfigError, match=r"--official-config .*bomb\.yaml: the YAML expands"):
        official_model_config(str(config_bomb(tmp_path / "bomb.yaml")))
    with pytest.raises(ConfigError, match="more than a config may hold"):
        load_yaml("x" * (2 << 20), "big.yaml")


def test_1_an_error_about_a_huge_value_shows_it_cut_short() -> None:
    with pytest.raises(ConfigError) as raised:
        from_dict(ModelConfig, {"backbone": list(range(50_000))}, "f.yaml", "model.")
    assert len(str(raised.value)) < 300


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": 10**9}, "image_size must be between 1 and 4,096, got 1000000000"),
        ({"image_size": 2**31}, "image_size must be between 1 and 4,096"),
        ({"simplematch": {"decoder_channels": 10**6}}, "decoder_channels must be between 1 and 8,192"),
        ({"lora_rank": 10**7}, "lora_rank must be between 1 and 8,192"),
        ({"window_size": 10**9}, "window_size must be between 1 and 1,024"),
    ],
)
def test_3_absurd_sizes_are_refused_before_anything_is_allocated(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, fields, "checkpoint x config")


def test_3_an_absurd_image_size_on_the_command_line_is_one_line(
    demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_tiny(tmp_path / "tiny.pt", seed=0)
    argv = ["--model", str(checkpoint), "--shards", str(demo_shards), "--out", str(tmp_path / "o"), *COMMON]
    assert eval_main([*argv, "--image-size", "999999994"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sm_eval: error:") and "image_size must be between 1 and 4,096" in err[-1]
    assert not (tmp_path / "o").exists()
    # A checkpoint whose saved config asks for 10**6 decoder channels fails naming the file, unbuilt.
    document = torch.load(checkpoint, weights_only=True)
    document["config"]["simplematch"]["decoder_channels"] = 10**6
    torch.save(document, tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"wide\.pt config: simplematch\.decoder_channels must be between"):
        load_model(tmp_path / "wide.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(config=[1, 2]), "its config is a list, not a mapping"),
        (lambda d: d.pop("config"), "its config is missing"),
        (lambda d: d.update(state_dict=[1, 2]), "its state_dict is a list, not a mapping"),
        (lambda d: d.update(state_dict={"w": 3}), "its state_dict entry 'w' is not a tensor"),
        (lambda d: d.pop("trainable_only"), "its trainable_only flag is missing"),
    ],
)
def test_4_a_malformed_checkpoint_document_is_an_error_naming_the_file(tmp_path: Path, change, message: str) -> None:
    model = ModelConfig(backbone="resnet18", image_size=32, finetune="frozen", options=SimpleMatchOptions(decoder_channels=4))
    save_checkpoint(create_model(model), tmp_path / "m.pt", trainable_only=True)
    document = torch.load(tmp_path / "m.pt", weights_only=True)
    change(document)
    torch.save(document, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"bad.pt is a {CHECKPOINT_FORMAT} checkpoint, but {message}"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("shape", [(80_000_000, 1), (1, 80_000_000)])
def test_5_a_very_tall_or_wide_target_is_drawn_within_bounds(tmp_path: Path, shape: tuple[int, int]) -> None:
    Image.new("RGB", (64, 48), "gray").save(tmp_path / "src.png")
    Image.new("RGB", (shape[1], shape[0]), "white").save(tmp_path / "trg.png")
    argv = ["--model", "zero-shot:dinov2_vits14", "--backbone-weights", "random", "--image-size", "28",
            str(tmp_path / "src.png"), str(tmp_path / "trg.png"), "--grid", "2", "--out", str(tmp_path / "out"),
            "--threads", "2"]  # fmt: skip
    assert match_main(argv) == 0
    assert json.loads((tmp_path / "out" / "matches.json").read_text())["count"] == 4
    with Image.open(tmp_path / "out" / "matches.png") as picture:
        assert max(picture.size) < 4000


def test_7_a_worker_lost_for_good_is_one_line_saying_a_rerun_starts_over() -> None:
    class LostWorker:
        exceptions = ray.exceptions

        @staticmethod
        def get(ref: object) -> None:
            raise ray.exceptions.WorkerCrashedError()

    with pytest.raises(RuntimeError, match=r"a Ray worker evaluating tiny was lost after Ray's retries \(WorkerCrashedError"):
        runner._get(LostWorker, None, "tiny")
    with pytest.raises(RuntimeError, match="nothing was written to --out: run the same command again"):
        runner._get(LostWorker, None, "tiny")


def test_10_nan_weights_are_refused_by_sm_eval_and_sm_eval_match(
    demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_model(save_tiny(tmp_path / "tiny.pt", seed=0))
    with torch.no_grad():
        next(model.decoder.parameters()).fill_(float("nan"))
    save_checkpoint(model, tmp_path / "nan.pt")
    argv = ["--model", str(tmp_path / "nan.pt"), "--shards", str(demo_shards), "--out", str(tmp_path / "o"), *COMMON]
    assert eval_main(argv) == 1
    assert "has NaN or infinite weights in 1 tensors (decoder." in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    Image.new("RGB", (40, 30), "gray").save(tmp_path / "a.png")
    assert match_main(["--model", str(tmp_path / "nan.pt"), str(tmp_path / "a.png"), str(tmp_path / "a.png"),
                       "--grid", "2", "--out", str(tmp_path / "m")]) == 1  # fmt: skip
    assert "NaN or infinite weights" in capsys.readouterr().err


def test_10_non_finite_predictions_are_counted_in_the_report() -> None:
    pred = np.array([[1.0, 2.0], [np.nan, 3.0], [np.inf, np.nan]])
    records = SimpleNamespace(pred_x=pred[:, 0], pred_y=pred[:, 1])
    assert non_finite_count(records) == 2
    model = {"name": "m", "checkpoint": "m.pt", "kind": "simplematch", "config": {"backbone": "x"},
             "image_size": 28, "localizer": "window", "non_finite_predictions": 2}  # fmt: skip
    data = {"shards": "s", "split": "test", "pairs": 1, "keypoints": 3, "categories": ["c"], "shards_read": 1}
    assert "**2 of 3 predictions are NaN or infinite (counted as misses)**" in "\n".join(data_lines(data, [model]))
