"""sm_eval end to end in one process (no Ray): outputs and their agreement, exact predictions
independent of reading order, clear errors for broken data, S3, several checkpoints, AP-10K
splits with a checkpoint from another dataset, the CLI, and the real PF-WILLOW files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
import torch
from PIL import Image

from pipelines.reader import pair_dataset
from pipelines.shard import shard_dataset
from pipelines.storage import Location
from sm_eval.__main__ import main
from sm_eval.checkpoints import resolve_model
from sm_eval.evaluate import EvalRequest, evaluate
from sm_eval.pck import FRAMES, KeypointRecords, records_in_frame, summarize
from sm_eval.plan import canonical_order, read_split_plan
from sm_eval.report import AVERAGE_LABELS, AVERAGES, frame_label, percent
from sm_eval.runner import EvalSettings, worker_records
from sm_model.checkpoint import save_checkpoint
from sm_model.config import ModelConfig
from sm_model.pixels import to_resized_square
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.model import SimpleMatch
from tests import ap10k_format as fmt
from tests.conftest import REPO_ROOT
from tests.report_tables import markdown_table

TINY = ModelConfig(backbone="dinov2_vits14", image_size=28, window_size=5, options=SimpleMatchOptions(decoder_channels=16))
SETTINGS = EvalSettings(batch_size=8, loader_workers=0, threads=2)
ALPHAS = (0.05, 0.1, 0.15)


def save_tiny(path: Path, seed: int) -> Path:
    """A random-init tiny SimpleMatch saved with save_checkpoint (``path``'s parents created)."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(SimpleMatch(TINY), path)
    return path


def request(checkpoints: list[str], shards: str, out: str, **changes: Any) -> EvalRequest:
    fields = dict(settings=SETTINGS, device="cpu", alphas=ALPHAS, matches=4, progress=False) | changes
    return EvalRequest(checkpoints=tuple(checkpoints), shards=shards, out=out, **fields)


def records_of(parquet: Path) -> KeypointRecords:
    return KeypointRecords.from_dict(pq.read_table(parquet).to_pydict())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def single_run(demo_shards: Path, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The demo test split evaluated in this process; ``(out dir, report)``."""
    out = tmp_path_factory.mktemp("single")
    return out, evaluate(request([str(checkpoint)], str(demo_shards), str(out)))


def test_outputs_exist_and_agree_with_report_json(single_run: tuple[Path, dict], demo_shards: Path) -> None:
    out, report = single_run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    plan = read_split_plan(Location(str(demo_shards)), "test")
    data = report["data"]
    assert (data["pairs"], data["split"], data["datasets"]) == (plan.num_pairs, "test", ["demo"])
    assert data["shards_read"] == len(plan.shard_counts) == 5
    assert report["protocol"]["rule"] == "<=" and report["protocol"]["figure_frame"] == "original"
    assert list(report["protocol"]["frames"]) == ["original", "resized"]
    assert report["protocol"]["threshold_kinds"] == ["bbox"] and report["alphas"] == list(ALPHAS)

    records = records_of(out / "predictions.parquet")
    assert len(records) == data["keypoints"]
    assert list(dict.fromkeys(records.pair_key)) == list(plan.pair_keys)  # index order
    (model,) = report["models"]
    assert list(model["results"]) == list(FRAMES)
    # Anyone can recompute every number, in both frames, from predictions.parquet.
    assert set(records.frame) == {"original"} and set(records.input_size) == {TINY.image_size}
    for frame in FRAMES:
        expected = summarize(records_in_frame(records, frame), ALPHAS)
        assert expected == {key: value for key, value in model["results"][frame].items() if key != "curve"}
    assert model["results"]["resized"]["protocol"]["frame"] == f"resized-{TINY.image_size}"

    markdown = (out / "report.md").read_text()
    categories = markdown_table(markdown, "PCK@0.1 per category (%)")
    names = categories[0][3:-1]
    assert names == sorted(data["categories"]) and categories[0][-1] == "all"
    rows = iter(categories[2:])
    alphas = iter(markdown_table(markdown, "PCK per alpha over all pairs (%)")[1:])
    for frame in FRAMES:
        results, label = model["results"][frame], frame_label(frame, TINY.image_size)
        for average in AVERAGES:
            row = next(rows)
            assert row[:3] == [model["name"], label, AVERAGE_LABELS[average]]
            expected = [results["per_category"][c][average][1] for c in names] + [results["overall"][average][1]]
            assert row[3:] == [percent(v) for v in expected]
            assert next(alphas)[3:] == [percent(v) for v in results["overall"][average]]
    flags = markdown_table(markdown, "PCK@0.1 per difficulty flag (%)")
    assert len(flags) > 1
    for flag, value, pairs, label, per_image, per_keypoint in flags[1:]:
        frame = "original" if label == "original" else "resized"
        scores = model["results"][frame]["per_flag"][flag][int(value)]
        assert [int(pairs), per_image, per_keypoint] == [
            scores["n_pairs"], percent(scores["per_image"][1]), percent(scores["per_keypoint"][1])
        ]  # fmt: skip

    assert Image.open(out / "pck_curve.png").size == (900, 560)
    assert len(report["files"]["matches"]) == 4
    for path in report["files"]["matches"]:
        assert Image.open(out / path).mode == "RGB" and f"]({path})" in markdown
    drawn = sorted(path.relative_to(out).as_posix() for path in (out / "matches").iterdir())
    assert drawn == sorted(report["files"]["matches"])


def test_predictions_do_not_depend_on_shard_order_or_loader_processes(
    single_run: tuple[Path, dict], demo_shards: Path, checkpoint: Path
) -> None:
    out, _ = single_run
    plan = read_split_plan(Location(str(demo_shards)), "test")
    reversed_names = list(plan.shard_counts)[::-1]
    settings = EvalSettings(batch_size=8, loader_workers=2, threads=2)
    parts = list(worker_records(checkpoint.read_bytes(), plan.shards, reversed_names, plan.shard_of, settings))
    rng = np.random.default_rng(0)
    shuffled = KeypointRecords.concat([parts[i] for i in rng.permutation(len(parts))])  # batches as workers return them
    assert list(dict.fromkeys(shuffled.pair_key)) != list(plan.pair_keys)
    # Aggregation does not depend on record order at all ...
    scrambled = shuffled.take(rng.permutation(len(shuffled)))
    assert summarize(scrambled, ALPHAS) == summarize(records_of(out / "predictions.parquet"), ALPHAS)
    # ... and the canonical order restores the single run's file, bit for bit.
    canonical = shuffled.take(canonical_order(shuffled.pair_key, plan.position))
    expected = pq.read_table(out / "predictions.parquet").to_pydict()
    for name, values in canonical.to_dict().items():
        assert values.tolist() == expected[name], name  # bit for bit


def broken_copy(demo_shards: Path, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A copy of the demo shards to break, and its test shards' pair counts."""
    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    return copy, read_split_plan(Location(str(copy)), "test").shard_counts


def test_corrupt_shard_error_names_the_shard(demo_shards: Path, checkpoint: Path, tmp_path: Path) -> None:
    copy, counts = broken_copy(demo_shards, tmp_path)
    name = list(counts)[0]
    (copy / name).write_bytes((copy / name).read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"corrupt shard {copy / name}"):
        evaluate(request([str(checkpoint)], str(copy), str(tmp_path / "out")))
    assert not (tmp_path / "out" / "report.json").exists()


def test_empty_shard_error_names_the_shard(demo_shards: Path, checkpoint: Path, tmp_path: Path) -> None:
    copy, counts = broken_copy(demo_shards, tmp_path)
    name = list(counts)[2]
    with tarfile.open(copy / name, "w"):
        pass  # a valid tar without a member, where the index lists pairs
    message = rf"shard {copy / name} yielded 0 of the {counts[name]} pairs index.parquet lists"
    with pytest.raises(ValueError, match=message):
        evaluate(request([str(checkpoint)], str(copy), str(tmp_path / "out")))


def test_missing_split_and_unusable_checkpoint_are_named(demo_shards: Path, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished split 'nope'"):
        evaluate(request([str(checkpoint)], str(demo_shards), str(tmp_path / "out"), split="nope"))
    not_a_model = tmp_path / "notes.pt"
    torch.save({"weights": torch.zeros(2)}, not_a_model)
    with pytest.raises(ValueError, match=f"{not_a_model} is not a simplematch-v2 checkpoint"):
        evaluate(request([str(not_a_model)], str(demo_shards), str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'run'}"):
        evaluate(request([str(tmp_path / "run")], str(demo_shards), str(tmp_path / "out")))


def test_s3_shards_s3_checkpoint_directory_and_two_models(
    single_run: tuple[Path, dict], demo_shards: Path, checkpoint: Path, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    shards = Location(f"{s3_bucket}/demo-shards", s3_endpoint)
    for path in demo_shards.rglob("*"):
        if path.is_file():
            shards.put_bytes(path.relative_to(demo_shards).as_posix(), path.read_bytes())
    run_dir = f"{s3_bucket}/runs/exp2/checkpoint_000001"  # a Ray Train checkpoint directory
    Location(run_dir, s3_endpoint).put_bytes("model.pt", save_tiny(tmp_path / "other.pt", seed=1).read_bytes())
    out = Location(f"{s3_bucket}/eval", s3_endpoint)
    report = evaluate(request([str(checkpoint), run_dir], shards.url, out.url, endpoint_url=s3_endpoint, matches=2))

    assert [m["name"] for m in report["models"]] == ["tiny", "checkpoint_000001"]
    assert report["models"][1]["checkpoint"] == f"{run_dir}/model.pt"
    assert json.loads(out.read_text("report.json")) == json.loads(json.dumps(report))
    table = pq.read_table(io.BytesIO(out.read_bytes("predictions.parquet")))
    assert table.column_names[0] == "model"
    models = np.array(table.column("model").to_pylist())
    assert (models == "tiny").sum() == (models == "checkpoint_000001").sum() == report["data"]["keypoints"]
    # The same checkpoint read from another place gives the same predictions, bit for bit.
    single = pq.read_table(single_run[0] / "predictions.parquet")
    assert table.filter(models == "tiny").drop_columns(["model"]).equals(single)
    assert table.filter(models == "tiny")["pred_x"] != table.filter(models == "checkpoint_000001")["pred_x"]
    assert sorted(out.list_files("matches")) == sorted(report["files"]["matches"])
    assert {path.split("/")[1].split("-")[0] for path in report["files"]["matches"]} == {"tiny", "checkpoint_000001"}
    assert resolve_model(run_dir, "x", s3_endpoint).config["image_size"] == TINY.image_size


@pytest.fixture(scope="module")
def ap10k_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw AP-10K release (cat and lion: Felidae; cow: Bovidae; 3 images each, all in test under
    GeoAware's protocol) sharded into every split."""
    root = tmp_path_factory.mktemp("ap10k") / "raw"
    species_images = {"cat": [21, 22, 23], "lion": [31, 32, 33], "cow": [11, 12, 13]}
    parts: dict[str, fmt.ReleasePart] = {part: ([], []) for part in fmt.SPLIT1_PARTS}
    for turn, (species, image_id) in enumerate((s, i) for s, ids in species_images.items() for i in ids):
        images, annotations = parts[fmt.SPLIT1_PARTS[turn % 3]]
        images.append(fmt.coco_image(image_id, width=100, height=80))
        annotations.append(fmt.coco_annotation(1000 + image_id, image_id, species, bbox=(4, 6, 60 + image_id % 5, 50)))
    fmt.write_raw_release(root, parts, with_images=False)
    (root / "data").mkdir()
    for image_id in (i for ids in species_images.values() for i in ids):
        Image.new("RGB", (100, 80), (image_id, 90, 160)).save(root / "data" / f"{image_id:012d}.jpg")
    out = root.parent / "shards"
    shard_dataset("ap10k", Location(str(root)), Location(str(out)))
    return out


@pytest.mark.parametrize(
    ("split", "categories", "pairs"),
    [
        ("test", ["cat", "cow", "lion"], 9),  # all 3 pairs of 3 images, per species
        ("test_cross_species", ["Felidae"], 9),  # cat x lion
        ("test_cross_family", ["all"], 18),  # Bovidae x Felidae: 3 x 6
    ],
)
def test_ap10k_splits_with_a_checkpoint_from_another_dataset(
    ap10k_shards: Path, checkpoint: Path, tmp_path: Path, split: str, categories: list[str], pairs: int
) -> None:
    # Transfer: the tiny checkpoint stands for one trained on the demo (SPair-layout) data; it is
    # evaluated on AP-10K shards as it is, and the report says which data it was scored on.
    report = evaluate(request([str(checkpoint)], str(ap10k_shards), str(tmp_path / split), split=split, matches=1))
    assert report["data"]["datasets"] == ["ap10k"] and report["data"]["split"] == split
    assert report["data"]["categories"] == categories and report["data"]["pairs"] == pairs
    assert report["protocol"]["threshold_kinds"] == ["bbox"]
    records = records_of(tmp_path / split / "predictions.parquet")
    assert sorted(set(records.category)) == categories
    # bbox threshold: the max side of the target's COCO box (60 + id % 5 wide, 50 high).
    assert set(records.threshold_base) <= {60.0, 61.0, 62.0, 63.0, 64.0}
    assert report["models"][0]["checkpoint"] == str(checkpoint)


def test_cli_help_lists_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--checkpoint", "--shards", "--split", "--workers", "--gpus-per-worker", "--cpus-per-worker", "--alphas",
        "--rule", "--frame", "--batch-size", "--image-size", "--s3-endpoint-url", "--out", "--matches",
        "--threads", "--loader-workers", "--device", "--dtype", "--ray-address", "--no-progress",
    ):  # fmt: skip
        assert option in text, option
    assert "report.json" in text and "bbox-kp" in text and "test_cross_species" in text


@pytest.mark.e2e
def test_cli_end_to_end_in_resized_frame_with_the_strict_rule(
    single_run: tuple[Path, dict], demo_shards: Path, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli"
    command = [
        sys.executable, "-m", "sm_eval", "--checkpoint", str(checkpoint), "--shards", str(demo_shards),
        "--out", str(out), "--frame", "resized", "--rule", "<", "--alphas", "0.05,0.1,0.15",
        "--loader-workers", "0", "--threads", "2", "--batch-size", "8", "--matches", "2", "--device", "cpu",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    assert "pair/s" in completed.stderr  # the progress bar
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["rule"] == "<" and report["protocol"]["figure_frame"] == "resized"
    assert report["protocol"]["record_frame"] == "original"
    for frame in FRAMES:
        pck = percent(report["models"][0]["results"][frame]["overall"]["per_image"][1])
        assert pck in completed.stdout
    assert "per image" in completed.stdout and "resized 28x28" in completed.stdout
    assert "(hit rule `<`)" in (out / "report.md").read_text()
    # predictions.parquet stays in the original frame whatever --frame says ...
    assert pq.read_table(out / "predictions.parquet").equals(pq.read_table(single_run[0] / "predictions.parquet"))
    # ... and the resized frame is its records moved into the 28 x 28 square, exactly.
    original = records_of(out / "predictions.parquet")
    resized = records_in_frame(original, "resized")
    plan = read_split_plan(Location(str(demo_shards)), "test")
    trg_sizes = {sample.key: sample.trg_size for sample in pair_dataset(plan.shards, list(plan.shard_counts))}
    for key in list(plan.pair_keys)[:10]:
        rows = original.pair_key == key
        assert (original.trg_width[rows][0], original.trg_height[rows][0]) == trg_sizes[key]
        pred = np.stack([original.pred_x[rows], original.pred_y[rows]], axis=1)
        moved = to_resized_square(pred, trg_sizes[key], 28)
        np.testing.assert_array_equal(moved, np.stack([resized.pred_x[rows], resized.pred_y[rows]], axis=1))
    expected = json.loads(json.dumps(summarize(resized, (0.05, 0.1, 0.15), "<")))  # flag values as JSON keys
    assert {k: v for k, v in report["models"][0]["results"]["resized"].items() if k != "curve"} == expected


def test_cli_usage_and_data_errors_exit_codes(demo_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["--checkpoint", "x.pt", "--shards", str(demo_shards), "--alphas", "0.1,-0.2"])
    assert usage.value.code == 2 and "distinct positive numbers" in capsys.readouterr().err
    assert main(["--checkpoint", "x.pt", "--shards", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert f"sm_eval: error: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_real_pfwillow_end_to_end(shared_data: Path, checkpoint: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shard_dataset("pfwillow", Location(str(shared_data / "pf-willow")), Location(str(shards)), workers=2)
    settings = EvalSettings(batch_size=30, loader_workers=0, threads=2)
    report = evaluate(request([str(checkpoint)], str(shards), str(tmp_path / "out"), settings=settings, matches=2))
    data = report["data"]
    assert (data["datasets"], data["pairs"], data["keypoints"]) == (["pfwillow"], 900, 9000)
    assert data["categories"] == ["car", "duck", "motorbike", "winebottle"]
    assert report["protocol"]["threshold_kinds"] == ["bbox-kp"]
    records = records_of(tmp_path / "out" / "predictions.parquet")
    # The threshold is the target's real 10-keypoint box, straight from its .mat file.
    for row in pq.read_table(shards / "index.parquet").to_pylist()[::97]:
        stem = row["trg_image"][len(row["subclass"]) + 1 :]
        mat = shared_data / "pf-willow" / "PF-dataset-WILLOW" / row["subclass"] / f"{stem}.mat"
        pts = scipy.io.loadmat(mat)["pts_coord"]
        expected = float(np.max(pts.max(axis=1) - pts.min(axis=1)))  # a box's side is the same 1-based or 0-based
        assert set(records.threshold_base[records.pair_key == row["key"]]) == {expected}, row["key"]
    assert os.path.exists(tmp_path / "out" / report["files"]["matches"][0])
