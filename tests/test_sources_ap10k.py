"""AP-10K reader: the raw release (GeoAware's recipe rebuilt), the GeoAware pair layout, and the
builder that turns the first into the second."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import checks
from pipelines.builders import ap10k as builder
from pipelines.schema import PairRecord, Reject, pair_to_json
from pipelines.shard import shard_dataset
from pipelines.sources import ap10k
from pipelines.storage import Location
from tests import ap10k_format as fmt
from tests.conftest import REPO_ROOT

MALFORMED, INCONSISTENT = checks.MALFORMED_ANNOTATION, checks.INCONSISTENT_ANNOTATION
TRAIN_FILE, VAL_FILE, TEST_FILE = ap10k.RAW_ANNOTATION_FILES

SMALL = ap10k.Protocol(
    test_per_species=4,
    val_per_species=2,
    trn_pairs_per_image=1,
    cross_species_pairs={"val": 2, "test": 3},
    cross_family_pairs={"val": 1, "test": 2},
)
LARGE_CAPS = ap10k.Protocol(
    test_per_species=4,
    val_per_species=2,
    trn_pairs_per_image=50,
    cross_species_pairs={"val": 1000, "test": 1000},
    cross_family_pairs={"val": 1000, "test": 1000},
)

# species -> image ids, and the joints each image has labelled where not all 17.
MIXED_SPECIES = {
    "antelope": range(1, 11),  # 10 images: 4 test, 2 val, 4 trn under SMALL
    "cow": range(11, 18),
    "cat": range(21, 27),
    "lion": range(31, 36),
    "tiger": range(41, 45),
    "panda": range(51, 54),
}
MIXED_LABELLED = {
    41: range(14, 17),
    42: range(14, 17),
    51: range(3),
    52: range(3),
    5: (0, 1, 2, 16),
    7: (2, 3, 4),
}


def labelled_set(image_id: int) -> set[int]:
    return set(MIXED_LABELLED.get(image_id, range(fmt.JOINTS)))


def mixed_release_parts() -> dict[str, fmt.ReleasePart]:
    parts = fmt.single_animal_release(MIXED_SPECIES)
    for _, coco_annotations in parts.values():
        for annotation in coco_annotations:
            image_id = annotation["image_id"]
            annotation["keypoints"] = fmt.keypoints(image_id, sorted(labelled_set(image_id)))
    return parts


@pytest.fixture(scope="module")
def mixed_raw_root(tmp_path_factory) -> Path:
    """Six species in three families, some images sharing fewer than 3 joints with others."""
    return fmt.write_raw_release(tmp_path_factory.mktemp("mixed_raw"), mixed_release_parts())


def read(root: Path, split: str, **kwargs) -> list[PairRecord | Reject]:
    if kwargs:
        return list(ap10k.read_raw_pairs(Location(str(root)), split, **kwargs))
    return list(ap10k.read_pairs(Location(str(root)), split))


def pairs_of(items) -> list[PairRecord]:
    return [item for item in items if isinstance(item, PairRecord)]


def rejects_of(items) -> list[Reject]:
    return [item for item in items if isinstance(item, Reject)]


def comparable(pair: PairRecord) -> dict:
    """Everything a pair stores except its origin (paths differ between layouts by design)."""
    doc = pair_to_json(pair, pair.src.declared_size, pair.trg.declared_size)
    del doc["origin"]
    return doc


def image_ids(pair: PairRecord) -> tuple[int, int]:
    return int(pair.src.key.rsplit("_", 1)[1]), int(pair.trg.key.rsplit("_", 1)[1])


# MIXED_SPECIES split by hand (4 test, 2 val per species, both protocols): the last 4 ids of a
# species are test, the 2 before them val, the rest trn.
EXPECTED_SPLITS = {
    "trn": {"antelope": [1, 2, 3, 4], "cow": [11], "cat": [], "lion": [], "tiger": [], "panda": []},
    "val": {"antelope": [5, 6], "cow": [12, 13], "cat": [21, 22], "lion": [31], "tiger": [], "panda": []},
    "test": {
        "antelope": [7, 8, 9, 10],
        "cow": [14, 15, 16, 17],
        "cat": [23, 24, 25, 26],
        "lion": [32, 33, 34, 35],
        "tiger": [41, 42, 43, 44],
        "panda": [51, 52, 53],
    },
}


def valid(a: int, b: int) -> bool:
    return len(labelled_set(a) & labelled_set(b)) >= 3


# ---------------------------------------------------------------------------------------------
# The real AP-10K sample, read as a raw release


@pytest.fixture
def real_sample_root(shared_data, tmp_path) -> Path:
    """The sample COCO file as ``ap10k-test-split1.json``, empty train/val files, its JPEGs under data/."""
    sample = shared_data / "ap10k-sample"
    root = tmp_path / "raw"
    (root / "annotations").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copyfile(sample / "test_ap10k.json", root / "annotations" / "ap10k-test-split1.json")
    empty = json.dumps({"images": [], "annotations": [], "categories": []})
    (root / "annotations" / "ap10k-train-split1.json").write_text(empty)
    (root / "annotations" / "ap10k-val-split1.json").write_text(empty)
    for jpeg in sample.glob("*.jpg"):
        shutil.copyfile(jpeg, root / "data" / jpeg.name)
    return root


def test_real_sample_gives_its_only_possible_pair_cross_family(real_sample_root):
    # Antelope (Bovidae, image 4) and jaguar (Felidae, image 37516): one image per species, so
    # each is its species' whole test list and no intra or cross-species pair exists.
    for split in ap10k.SPLITS:
        if split != "test_cross_family":
            assert read(real_sample_root, split) == [], split
    [pair] = read(real_sample_root, "test_cross_family")
    assert pair.key == "000000000004_000000037516_all"
    assert (pair.category, pair.group, pair.threshold, pair.dataset) == ("all", "all", "bbox", "ap10k")
    assert pair.extras == {
        "src_species": "antelope",
        "trg_species": "jaguar",
        "src_family": "Bovidae",
        "trg_family": "Felidae",
    }
    assert (pair.src.key, pair.src.path, pair.src.declared_size) == (
        "antelope_000000000004",
        "data/000000000004.jpg",
        (1024, 683),
    )
    assert (pair.trg.key, pair.trg.path, pair.trg.declared_size) == (
        "jaguar_000000037516",
        "data/000000037516.jpg",
        (1200, 867),
    )
    # Joint 1 (R_Eye) is v = 0 at (0, 0) in both annotations: masked.
    np.testing.assert_array_equal(pair.kps_ids, [0, *range(2, 17)])
    assert pair.kps_ids.dtype == np.int64 and pair.src_kps.dtype == np.float64
    np.testing.assert_array_equal(pair.src_kps[:3], [[488, 443], [466, 499], [600, 307]])
    np.testing.assert_array_equal(pair.trg_kps[:3], [[134, 415], [94, 475], [302, 330]])
    np.testing.assert_array_equal(pair.trg_kps[-1], [636, 602])
    # bbox [x, y, w, h] -> [x, y, x + w, y + h]
    np.testing.assert_array_equal(pair.src_bbox, [408, 197, 837, 538])
    np.testing.assert_array_equal(pair.trg_bbox, [66, 192, 1158, 704])
    assert pair.origin == "annotations/ap10k-test-split1.json"
    for ref in (pair.src, pair.trg):
        with Image.open(real_sample_root / ref.path) as image:
            assert image.size == ref.declared_size
    assert checks.check_pair(pair) == []
    assert checks.check_against_images(pair, pair.src.declared_size, pair.trg.declared_size) == []


def test_real_sample_builds_geoaware_image_annotations(real_sample_root, tmp_path, caplog):
    (real_sample_root / "data/000000000004.jpg").unlink()  # a missing image: warned, pairs still listed
    out = tmp_path / "layout"
    counts = builder.build_pair_layout(Location(str(real_sample_root)), out)
    assert "000000000004.jpg is missing" in caplog.text
    assert not (out / "JPEGImages/Bovidae/antelope/000000000004.jpg").exists()
    assert counts == {split: int(split == "test_cross_family") for split in ap10k.SPLITS}
    doc = json.loads((out / "ImageAnnotation/Bovidae/antelope/000000000004.json").read_text())
    # {**annotation, **image, name, supercategory}: the image id (4) overwrites the annotation id (6).
    identity = [doc[k] for k in ("id", "image_id", "category_id", "name", "supercategory")]
    assert identity == [4, 4, 1, "antelope", "Bovidae"]
    image_fields = [doc[k] for k in ("width", "height", "file_name", "iscrowd", "background")]
    assert image_fields == [1024, 683, "000000000004.jpg", 0, 1]
    assert doc["bbox"] == [408, 197, 429, 341] and len(doc["keypoints"]) == 51
    copied = (out / "JPEGImages/Felidae/jaguar/000000037516.jpg").read_bytes()
    assert copied == (real_sample_root / "data/000000037516.jpg").read_bytes()
    pair_file = json.loads((out / "PairAnnotation/test_cross_family/000000000004-000000037516:all.json").read_text())
    assert pair_file == {
        "src_json_path": "ImageAnnotation/Bovidae/antelope/000000000004.json",
        "trg_json_path": "ImageAnnotation/Felidae/jaguar/000000037516.json",
    }
    [built] = read(out, "test_cross_family")
    [raw] = read(real_sample_root, "test_cross_family")
    assert comparable(built) == comparable(raw)
    assert built.src.path == "JPEGImages/Bovidae/antelope/000000000004.jpg"


# ---------------------------------------------------------------------------------------------
# Generated raw releases: splits, visibility, exclusions, sampling


def test_split_is_last_30_test_previous_20_val_rest_trn_by_image_id(tmp_path):
    # Ids listed in descending order and dealt across the three files: only the id decides.
    parts = fmt.single_animal_release({"antelope": range(55, 0, -1), "cow": range(110, 100, -1)})
    root = fmt.write_raw_release(tmp_path, parts, with_images=False)
    expected = {
        "test": (set(range(26, 56)), set(range(101, 111))),
        "val": (set(range(6, 26)), set()),
        "trn": (set(range(1, 6)), set()),
    }
    for split, (antelope_ids, cow_ids) in expected.items():
        pairs = pairs_of(read(root, split))
        for species, ids in (("antelope", antelope_ids), ("cow", cow_ids)):
            species_pairs = [p for p in pairs if p.category == species]
            assert {i for p in species_pairs for i in image_ids(p)} == ids, (split, species)
            assert all(p.extras["src_species"] == p.extras["trg_species"] == species for p in species_pairs)
            if split == "trn":
                # 5 images: all 20 ordered pairs (fewer than 50 x 5), both directions.
                assert {image_ids(p) for p in species_pairs} == set(itertools.permutations(ids, 2))
            else:
                # all C(n, 2) unordered pairs, the earlier image as source
                assert sorted(image_ids(p) for p in species_pairs) == sorted(itertools.combinations(sorted(ids), 2))
    assert len(pairs_of(read(root, "test"))) == 435 + 45
    assert len(pairs_of(read(root, "val"))) == 190
    # Cross-species: antelope's 30 x cow's 10 test images, all valid, under the cap of 900.
    cross = pairs_of(read(root, "test_cross_species"))
    assert len(cross) == 300 and {p.category for p in cross} == {"Bovidae"}
    assert all((p.extras["src_species"], p.extras["trg_species"]) == ("antelope", "cow") for p in cross)
    assert pairs_of(read(root, "val_cross_species")) == [] and pairs_of(read(root, "test_cross_family")) == []


def test_pair_keeps_joints_labelled_in_both_and_needs_three(tmp_path):
    # 201 x 202 share joints 2, 3, 4 (joint 2 is v = 1 in 202: labelled, counted);
    # 201 x 203 share {4} and 202 x 203 share {4, 5}: not pairs.
    parts = {
        "test": (
            [fmt.coco_image(i) for i in (201, 202, 203)],
            [
                fmt.coco_annotation(1, 201, "cat", labelled=[0, 1, 2, 3, 4], bbox=(4, 6, 40, 30)),
                fmt.coco_annotation(2, 202, "cat", labelled=[3, 4, 5, 6], occluded=[2], bbox=(1.5, 2, 10, 20.25)),
                fmt.coco_annotation(3, 203, "cat", labelled=[4, 5, 9, 10, 11]),
            ],
        )
    }
    root = fmt.write_raw_release(tmp_path, parts, with_images=False)
    [pair] = read(root, "test")
    assert pair.key == "000000000201_000000000202_cat" and pair.category == "cat"
    np.testing.assert_array_equal(pair.kps_ids, [2, 3, 4])
    np.testing.assert_array_equal(pair.src_kps, [fmt.joint_xy(201, j) for j in (2, 3, 4)])
    np.testing.assert_array_equal(pair.trg_kps, [fmt.joint_xy(202, j) for j in (2, 3, 4)])
    np.testing.assert_array_equal(pair.src_bbox, [4, 6, 44, 36])
    np.testing.assert_array_equal(pair.trg_bbox, [1.5, 2, 11.5, 22.25])
    assert pair.src.declared_size == (64, 48) and pair.origin == "annotations/ap10k-test-split1.json"


def release_with_excluded_images(tmp_path: Path) -> tuple[Path, list[tuple[str, str, str, str]]]:
    """A raw release with one image for each reason to leave it out, and the rejects expected
    (item, file, reason, words of the detail), plus two usable cow images (308, 309)."""
    crowd = fmt.coco_annotation(1, 301, "cow", iscrowd=1)
    two_animals = [fmt.coco_annotation(2, 302, "cow"), fmt.coco_annotation(3, 302, "cow")]
    few_keypoints = fmt.coco_annotation(4, 303, "cow", labelled=[0, 5])
    short_keypoints = {**fmt.coco_annotation(5, 304, "cow"), "keypoints": [1] * 50}
    unknown_category = {**fmt.coco_annotation(6, 305, "cow"), "category_id": 99}
    unlisted_image = fmt.coco_annotation(7, 307, "cow")
    parts = {
        "train": (
            [fmt.coco_image(i) for i in (301, 302, 303, 308)],
            [crowd, *two_animals, few_keypoints, fmt.coco_annotation(8, 308, "cow")],
        ),
        "val": ([fmt.coco_image(i) for i in (304, 305, 306)], [short_keypoints, unknown_category]),
        "test": ([fmt.coco_image(309)], [unlisted_image, fmt.coco_annotation(9, 309, "cow")]),
    }
    root = fmt.write_raw_release(tmp_path, parts, with_images=False)
    expected = [
        ("000000000301", TRAIN_FILE, checks.EXCLUDED_IMAGE, "crowd"),
        ("000000000302", TRAIN_FILE, checks.EXCLUDED_IMAGE, "2 animals"),
        ("000000000303", TRAIN_FILE, checks.EXCLUDED_IMAGE, "2 labelled keypoints"),
        ("000000000304", VAL_FILE, MALFORMED, "found 50"),
        ("000000000305", VAL_FILE, INCONSISTENT, "category_id 99"),
        ("000000000306", VAL_FILE, checks.EXCLUDED_IMAGE, "0 animals"),
        ("000000000307", TEST_FILE, INCONSISTENT, "not listed in 'images'"),
    ]
    return root, expected


def test_excluded_images_are_image_rejects_in_every_split(tmp_path):
    root, expected = release_with_excluded_images(tmp_path)
    for split in ap10k.SPLITS:
        items = read(root, split)
        rejects = rejects_of(items)
        assert [(r.item, r.file, r.reason) for r in rejects] == [e[:3] for e in expected], split
        assert all(r.kind == "image" and e[3] in r.detail for r, e in zip(rejects, expected))
        assert {i for p in pairs_of(items) for i in image_ids(p)} <= {308, 309}
    assert [image_ids(p) for p in pairs_of(read(root, "test"))] == [(308, 309)]


def test_sharding_reports_each_left_out_image_once(tmp_path):
    root, expected = release_with_excluded_images(tmp_path)
    out = tmp_path / "out"
    summary = shard_dataset("ap10k", Location(str(root)), Location(str(out)))
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    image_rejects = [r for r in rejects if r["kind"] == "image"]
    assert sorted((r["item"], r["reason"]) for r in image_rejects) == sorted((e[0], e[2]) for e in expected)
    assert sum(sum(s["images_left_out_by_reason"].values()) for s in summary.values()) == len(expected)
    # The one usable pair has no image files in this release: rejected, counted, not lost.
    assert summary["test"]["input_pairs"] == summary["test"]["rejected_pairs"] == 1
    assert summary["test"]["rejects_by_reason"] == {checks.MISSING_IMAGE: 1}


def test_reading_is_deterministic_and_the_seed_matters(mixed_raw_root):
    for split in ap10k.SPLITS:
        first = [comparable(p) for p in read(mixed_raw_root, split, protocol=SMALL)]
        again = [comparable(p) for p in read(mixed_raw_root, split, protocol=SMALL)]
        assert first == again, split
        assert [doc["key"] for doc in first] == sorted(doc["key"] for doc in first)
    trn = {p.key for p in read(mixed_raw_root, "trn", protocol=SMALL)}
    other_seed = {p.key for p in read(mixed_raw_root, "trn", protocol=SMALL, seed=7)}
    assert len(trn) == len(other_seed) and trn != other_seed


@pytest.mark.parametrize("protocol", [SMALL, LARGE_CAPS], ids=["caps-bind", "all-valid"])
def test_sampling_takes_min_of_cap_and_valid_pairs(mixed_raw_root, protocol):
    lists = EXPECTED_SPLITS
    families = {f: [s for s in MIXED_SPECIES if fmt.FAMILIES[s] == f] for f in ("Bovidae", "Felidae", "Ursidae")}
    for split in ap10k.SPLITS:
        pairs = pairs_of(read(mixed_raw_root, split, protocol=protocol))
        base = split.split("_")[0]
        keys = [p.key for p in pairs]
        assert len(keys) == len(set(keys)), split
        assert all(len(p.kps_ids) >= 3 for p in pairs), split
        counts = {}
        for p in pairs:
            counts[p.category] = counts.get(p.category, 0) + 1
        if split.endswith("_cross_family"):
            expected_total = 0
            for left, right in itertools.combinations(sorted(families), 2):
                left_ids = [i for s in families[left] for i in lists[base][s]]
                right_ids = [i for s in families[right] for i in lists[base][s]]
                n_valid = sum(valid(a, b) for a in left_ids for b in right_ids)
                n_found = sum((p.extras["src_family"], p.extras["trg_family"]) == (left, right) for p in pairs)
                assert n_found == min(protocol.cross_family_pairs[base], n_valid), (split, left, right)
                expected_total += n_found
            assert len(pairs) == expected_total and set(counts) <= {"all"}
        elif split.endswith("_cross_species"):
            for family, species in families.items():
                n_valid = sum(
                    valid(a, b)
                    for s, t in itertools.combinations(species, 2)
                    for a, b in itertools.product(lists[base][s], lists[base][t])
                )
                assert counts.get(family, 0) == min(protocol.cross_species_pairs[base], n_valid), (split, family)
            assert all(p.extras["src_family"] == p.extras["trg_family"] == p.category for p in pairs)
            assert all(p.extras["src_species"] < p.extras["trg_species"] for p in pairs)
        else:
            for species, ids in lists[base].items():
                if split == "trn":
                    n_valid = sum(valid(a, b) for a, b in itertools.permutations(ids, 2))
                    expected = min(protocol.trn_pairs_per_image * len(ids), n_valid)
                else:
                    expected = sum(valid(a, b) for a, b in itertools.combinations(ids, 2))
                assert counts.get(species, 0) == expected, (split, species)
    if protocol is SMALL:
        # The caps bind somewhere, or this test would not test them.
        assert len(pairs_of(read(mixed_raw_root, "test_cross_family", protocol=SMALL))) == 3 * 2
        trn_lists = EXPECTED_SPLITS["trn"].values()
        n_valid_trn = sum(valid(a, b) for ids in trn_lists for a, b in itertools.permutations(ids, 2))
        assert len(pairs_of(read(mixed_raw_root, "trn", protocol=SMALL))) < n_valid_trn


def test_pair_layout_built_from_raw_reads_the_same(mixed_raw_root, tmp_path):
    # A crowd image in the release: a reject when reading raw, simply absent from the layout.
    raw = tmp_path / "raw"
    shutil.copytree(mixed_raw_root, raw)
    parts = mixed_release_parts()
    parts["val"][0].append(fmt.coco_image(99))
    parts["val"][1].append(fmt.coco_annotation(99, 99, "lion", iscrowd=1))
    fmt.write_raw_release(raw, parts)
    out = tmp_path / "layout"
    counts = builder.build_pair_layout(Location(str(raw)), out, protocol=SMALL)
    assert set(counts) == set(ap10k.SPLITS) and sum(counts.values()) > 0
    for split in ap10k.SPLITS:
        raw_items = list(ap10k.read_raw_pairs(Location(str(raw)), split, protocol=SMALL))
        layout_items = read(out, split)
        assert [(r.item, r.reason) for r in rejects_of(raw_items)] == [("000000000099", checks.EXCLUDED_IMAGE)]
        assert rejects_of(layout_items) == []
        raw_pairs, layout_pairs = pairs_of(raw_items), layout_items
        assert len(layout_pairs) == counts[split]
        assert [comparable(p) for p in layout_pairs] == [comparable(p) for p in raw_pairs], split
        for built, source in zip(layout_pairs, raw_pairs):
            for built_ref, raw_ref, family, species in (
                (built.src, source.src, built.extras["src_family"], built.extras["src_species"]),
                (built.trg, source.trg, built.extras["trg_family"], built.extras["trg_species"]),
            ):
                assert built_ref.path == f"JPEGImages/{family}/{species}/{Path(raw_ref.path).name}"
                assert (out / built_ref.path).read_bytes() == (raw / raw_ref.path).read_bytes()
            name = f"{image_ids(built)[0]:012d}-{image_ids(built)[1]:012d}:{built.category}.json"
            assert built.origin == f"PairAnnotation/{split}/{name}"
            assert json.loads((out / built.origin).read_text())["src_json_path"].startswith("ImageAnnotation/")
    assert not (out / "ImageAnnotation/Felidae/lion/000000000099.json").exists()
    with pytest.raises(FileExistsError):
        builder.build_pair_layout(Location(str(raw)), out)


def test_cli_builds_the_default_protocol_layout(mixed_raw_root, tmp_path, capsys):
    out = tmp_path / "cli"
    counts = builder.main(["--raw", str(mixed_raw_root), "--out", str(out), "--seed", "3"])
    assert counts == {split: len(read(mixed_raw_root, split, seed=3)) for split in ap10k.SPLITS}
    assert sorted(p.name for p in (out / "PairAnnotation").iterdir()) == sorted(ap10k.SPLITS)
    with pytest.raises(SystemExit) as exit_info:
        builder.main(["--help"])
    assert exit_info.value.code == 0 and "--raw" in capsys.readouterr().out
    command = [sys.executable, "-m", "pipelines.builders.ap10k", "--help"]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "--seed" in run.stdout


def test_reading_a_raw_release_writes_nothing(mixed_raw_root):
    before = {path: path.stat().st_mtime_ns for path in mixed_raw_root.rglob("*")}
    assert sum(len(read(mixed_raw_root, split)) for split in ap10k.SPLITS) > 0
    assert {path: path.stat().st_mtime_ns for path in mixed_raw_root.rglob("*")} == before


def test_broken_raw_release_files_stop_the_read(tmp_path):
    root = fmt.write_raw_release(tmp_path, {}, with_images=False)
    (root / "annotations/ap10k-val-split1.json").write_text("{not json")
    with pytest.raises(ValueError, match="ap10k-val-split1.json: not valid JSON"):
        read(root, "test")
    (root / "annotations/ap10k-val-split1.json").unlink()
    with pytest.raises(FileNotFoundError, match="ap10k-val-split1.json"):
        read(root, "test")


# ---------------------------------------------------------------------------------------------
# Generated GeoAware pair layouts


@pytest.fixture
def layout_root(tmp_path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A layout with good pairs and one pair per reject reason; returns the root and
    ``{pair file name: (expected reason or "ok", expected file at fault)}``."""
    root = tmp_path / "layout"
    doc = fmt.image_annotation_document
    no_bbox = {key: value for key, value in doc(23, "cat").items() if key != "bbox"}
    bad_visibility = doc(22, "cat", keypoints=[1, 1, 3] * 17)
    ann = {
        11: fmt.write_image_annotation(root, "Felidae", "cat", "000000000011", doc(11, "cat")),
        12: fmt.write_image_annotation(root, "Felidae", "cat", "000000000012", doc(12, "cat", labelled=[0, 1, 2, 3])),
        13: fmt.write_image_annotation(root, "Felidae", "lion", "000000000013", doc(13, "lion")),
        14: fmt.write_image_annotation(root, "Bovidae", "cow", "000000000014", doc(14, "cow", bbox=[0, 0, 0, 5])),
        15: fmt.write_image_annotation(root, "Felidae", "cat", "000000000015", doc(15, "cat", labelled=[3, 4])),
        16: fmt.write_image_annotation(root, "Felidae", "cat", "000000000016", doc(16, "cat", labelled=[5, 6, 7])),
        21: fmt.write_image_annotation(root, "Felidae", "cat", "000000000021", doc(21, "cat", keypoints=[0] * 50)),
        22: fmt.write_image_annotation(root, "Felidae", "cat", "000000000022", bad_visibility),
        23: fmt.write_image_annotation(root, "Felidae", "cat", "000000000023", no_bbox),
        24: fmt.write_image_annotation(root, "Felidae", "cat", "000000000024", '{"id": 24,'),
        25: fmt.write_image_annotation(root, "Felidae", "cat", "000000000025", doc(25, "cat", name="lion")),
        26: fmt.write_image_annotation(root, "Felidae", "cat", "000000000026", doc(26, "cat", supercategory="Bovidae")),
        27: fmt.write_image_annotation(root, "Felidae", "cat", "000000000027", doc(99, "cat")),
        28: "ImageAnnotation/Felidae/cat/000000000028.json",  # never written
    }
    pair = fmt.geoaware_pair_document
    cases: dict[str, tuple[str, str]] = {}

    def add(split: str, name: str, document, reason: str, at_fault: str | None = None) -> None:
        rel = fmt.write_pair_file(root, split, name, document)
        cases[f"{split}/{name}"] = (reason, at_fault or rel)

    add("test", "000000000011-000000000012:cat", pair(ann[11], ann[12]), "ok")
    absolute = "/home/me/GeoAware-SC/data/ap-10k/"
    add("test", "000000000012-000000000011:cat", pair(ann[12], ann[11], prefix=absolute), "ok")
    # 1 and 0 joints labelled in both: passed through (the shard stage rejects 0)
    add("test", "000000000012-000000000015:cat", pair(ann[12], ann[15], prefix=""), "ok")
    add("test", "000000000012-000000000016:cat", pair(ann[12], ann[16], prefix="old/ImageAnnotation/v1/"), "ok")
    for image_id, reason in (
        (21, MALFORMED),
        (22, MALFORMED),
        (23, MALFORMED),
        (24, MALFORMED),
        (25, INCONSISTENT),
        (26, INCONSISTENT),
        (27, INCONSISTENT),
        (28, checks.MISSING_ANNOTATION),
    ):
        add("test", f"000000000011-{image_id:012d}:cat", pair(ann[11], ann[image_id]), reason, ann[image_id])
    add("test", "000000000011-000000000014:cat", pair(ann[11], ann[12]), INCONSISTENT)  # the name says 14
    add("test", "000000000011-000000000013:cat", pair(ann[11], ann[13]), INCONSISTENT)  # a lion among cat pairs
    add("test", "000000000012-000000000013:cat", "{", MALFORMED)
    add("test", "000000000013-000000000012:cat", {"src_json_path": "data/ap-10k/" + ann[13]}, MALFORMED)
    add("test", "000000000013-000000000011:cat", pair("Other/Felidae/lion/000000000013.json", ann[11]), MALFORMED)
    add("test", "000000000015-000000000011:cat", pair("ImageAnnotation/cat/000000000015.json", ann[11]), MALFORMED)
    add("test", "pair_one", pair(ann[11], ann[12]), MALFORMED)
    (root / "PairAnnotation/test/README.txt").write_text("not a pair")
    (root / "PairAnnotation/test/nested").mkdir()
    (root / "PairAnnotation/test/nested/000000000011-000000000016:cat.json").write_text("{}")
    add("test_cross_species", "000000000011-000000000013:Felidae", pair(ann[11], ann[13]), "ok")
    add("test_cross_species", "000000000011-000000000013:cat", pair(ann[11], ann[13]), INCONSISTENT)
    add("test_cross_family", "000000000011-000000000014:all", pair(ann[11], ann[14]), "ok")  # empty bbox: passed
    add("test_cross_family", "000000000011-000000000014:Felidae", pair(ann[11], ann[14]), INCONSISTENT)
    return root, cases


def test_layout_gives_one_item_per_pair_file_with_the_right_reason(layout_root):
    root, cases = layout_root
    seen = {}
    for split in ("test", "test_cross_species", "test_cross_family"):
        items = read(root, split)
        for item in items:
            if isinstance(item, PairRecord):
                seen[f"{split}/{Path(item.origin).stem}"] = ("ok", item.origin)
            else:
                assert item.kind == "pair" and item.detail
                name = item.item if item.item == "pair_one" else "{}-{}:{}".format(*item.item.split("_", 2))
                seen[f"{split}/{name}"] = (item.reason, item.file)
        assert len(items) == sum(key.startswith(f"{split}/") for key in cases)
        assert len({item.key if isinstance(item, PairRecord) else item.item for item in items}) == len(items)
    assert seen == cases


def test_layout_pair_record_values_and_rerooted_paths(layout_root):
    root, _ = layout_root
    pairs = {p.key: p for p in pairs_of(read(root, "test"))}
    pair = pairs["000000000011_000000000012_cat"]
    assert pair.origin == "PairAnnotation/test/000000000011-000000000012:cat.json"
    assert (pair.src.key, pair.src.declared_size) == ("cat_000000000011", (64, 48))
    assert pair.src.path == "JPEGImages/Felidae/cat/000000000011.jpg"
    assert pair.trg.path == "JPEGImages/Felidae/cat/000000000012.jpg"
    np.testing.assert_array_equal(pair.kps_ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(pair.src_kps, [fmt.joint_xy(11, j) for j in range(4)])
    np.testing.assert_array_equal(pair.trg_kps, [fmt.joint_xy(12, j) for j in range(4)])
    np.testing.assert_array_equal(pair.trg_bbox, [4, 6, 44, 36])
    assert pair.extras == {"src_species": "cat", "trg_species": "cat", "src_family": "Felidae", "trg_family": "Felidae"}
    # Absolute, empty and doubled prefixes re-root to the same files.
    assert pairs["000000000012_000000000011_cat"].src.path == "JPEGImages/Felidae/cat/000000000012.jpg"
    np.testing.assert_array_equal(pairs["000000000012_000000000015_cat"].kps_ids, [3])
    no_mutual = pairs["000000000012_000000000016_cat"]
    assert no_mutual.trg.path == "JPEGImages/Felidae/cat/000000000016.jpg" and no_mutual.src_kps.shape == (0, 2)
    assert [r.reason for r in checks.check_pair(no_mutual)] == [checks.NO_KEYPOINTS]
    [cross_family] = pairs_of(read(root, "test_cross_family"))
    assert cross_family.category == "all" and cross_family.extras["trg_family"] == "Bovidae"
    np.testing.assert_array_equal(cross_family.trg_bbox, [0, 0, 0, 5])
    assert [r.reason for r in checks.check_pair(cross_family)] == [checks.EMPTY_BBOX]


def test_layout_split_folder_and_root_errors(layout_root, tmp_path):
    root, _ = layout_root
    with pytest.raises(FileNotFoundError, match="PairAnnotation/val_cross_family"):
        read(root, "val_cross_family")
    with pytest.raises(ValueError, match="unknown AP-10K split"):
        read(root, "train")
    with pytest.raises(FileNotFoundError, match="neither PairAnnotation"):
        read(tmp_path / "empty", "test")
