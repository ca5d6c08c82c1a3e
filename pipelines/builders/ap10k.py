"""Build GeoAware-SC's AP-10K pair layout from the raw release, with GeoAware's pairing recipe.

    python -m pipelines.builders.ap10k --raw /data/ap-10k --out /data/ap-10k-pairs [--seed 42]

The raw release (``annotations/ap10k-{train,val,test}-split1.json``, COCO style, and
``data/<file_name>``) is read by :func:`pipelines.sources.ap10k.load_raw_release`, which applies
GeoAware's image filter; :func:`sample_pairs` forms each split's pairs following GeoAware's
``prepare_ap10k`` recipe, and :func:`build_pair_layout` writes them as the GeoAware-SC pair layout
(``ImageAnnotation/``, ``JPEGImages/``, ``PairAnnotation/<split>/``) that
:mod:`pipelines.sources.ap10k` reads. That reader applies :func:`sample_pairs` in memory to a raw
root, writing nothing, so reading the built layout gives the same pair records as reading the raw
root (only image paths and ``origin`` differ).

Deliberate differences from GeoAware's script, so a rebuilt benchmark is reproducible but not
pair-for-pair GeoAware's: images are split and paired in image-id order (GeoAware used
``os.walk`` order, which depends on the filesystem); crowd images are found from COCO's own
``iscrowd`` and from several annotations on one image (GeoAware kept the first annotation and
excluded a released list of crowd ids); the keypoint counts use ``v > 0`` (GeoAware:
``num_keypoints`` per image and ``sum(v_s / 2 * v_t / 2)`` per pair, equal when ``v`` is 0 or 2);
``trn`` samples ordered pairs; each split has its own ``random.Random(seed)``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.sources.ap10k import (
    CROSS_FAMILY_CATEGORY,
    GEOAWARE_PROTOCOL,
    IMAGE_ANNOTATION_DIR,
    IMAGE_DIR,
    INTRA_SPLITS,
    PAIR_DIR,
    SPLITS,
    AnimalImage,
    PairSpec,
    Protocol,
    image_stem,
    load_raw_release,
)
from pipelines.storage import Location

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# GeoAware's pairing recipe: images split per species, then paired per split

SpeciesLists = dict[tuple[str, str], list[AnimalImage]]
"""``{(family, species): images}``, the images sorted by id."""


def split_species(images: Sequence[AnimalImage], protocol: Protocol = GEOAWARE_PROTOCOL) -> dict[str, SpeciesLists]:
    """``{"trn" | "val" | "test": {(family, species): images}}``: per species, by image id, the
    last ``test_per_species`` images are test, the ``val_per_species`` before them val, the rest trn.
    (GeoAware splits in ``os.walk`` order, which depends on the filesystem; sorting fixes that.)"""
    by_species: dict[tuple[str, str], list[AnimalImage]] = defaultdict(list)
    for image in sorted(images, key=lambda im: im.image_id):
        by_species[(image.family, image.species)].append(image)
    splits: dict[str, SpeciesLists] = {name: {} for name in INTRA_SPLITS}
    for species in sorted(by_species):
        members = by_species[species]
        n_test = min(protocol.test_per_species, len(members))
        n_val = min(protocol.val_per_species, len(members) - n_test)
        n_trn = len(members) - n_test - n_val
        splits["trn"][species] = members[:n_trn]
        splits["val"][species] = members[n_trn : n_trn + n_val]
        splits["test"][species] = members[n_trn + n_val :]
    return splits


def sample_pairs(
    images: Sequence[AnimalImage], split: str, seed: int = 42, protocol: Protocol = GEOAWARE_PROTOCOL
) -> list[PairSpec]:
    """GeoAware's pairs of ``split``, sorted by pair file name. A pair is valid when at least
    ``min_keypoints`` joints are labelled in both images. Each split draws from its own
    ``random.Random(seed)`` (so one split can be built alone), species and families in name order:

    - ``val``/``test``: every valid unordered pair of a species, the earlier image id as source.
    - ``trn``: per species, ``trn_pairs_per_image`` x (its images) valid *ordered* pairs sampled
      without repeats, or all of them if fewer exist.
    - ``*_cross_species``: per family with several species, the products of its species' image
      lists (species in name order, source from the earlier species) are pooled and
      ``min(cross_species_pairs, valid)`` are sampled.
    - ``*_cross_family``: per unordered family pair (source from the earlier family),
      ``min(cross_family_pairs, valid)`` of the product of the two families' images.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown AP-10K split {split!r}; choose one of {', '.join(SPLITS)}")
    base = split.split("_")[0]
    lists = split_species(images, protocol)[base]
    rng = random.Random(seed)
    if split.endswith("_cross_family"):
        pairs = _cross_family_pairs(lists, rng, protocol.cross_family_pairs[base], protocol.min_keypoints)
    elif split.endswith("_cross_species"):
        pairs = _cross_species_pairs(lists, rng, protocol.cross_species_pairs[base], protocol.min_keypoints)
    else:
        per_image = protocol.trn_pairs_per_image if split == "trn" else None
        pairs = _intra_species_pairs(lists, rng, per_image, protocol.min_keypoints)
    return sorted(pairs, key=lambda pair: f"{pair.name}.json")


def _intra_species_pairs(
    lists: SpeciesLists, rng: random.Random, pairs_per_image: int | None, min_mutual: int
) -> list[PairSpec]:
    """All valid unordered pairs per species (``pairs_per_image`` None), or a sample of
    ``pairs_per_image`` x n valid ordered pairs."""
    pairs = []
    for (_, species), members in lists.items():
        valid = _valid_index_pairs(members, members, min_mutual)
        if pairs_per_image is None:
            chosen = valid[valid[:, 0] < valid[:, 1]]
        else:
            ordered = valid[valid[:, 0] != valid[:, 1]]
            chosen = _sample_rows(rng, ordered, pairs_per_image * len(members))
        pairs.extend(PairSpec(members[i], members[j], species) for i, j in chosen)
    return pairs


def _cross_species_pairs(lists: SpeciesLists, rng: random.Random, cap: int, min_mutual: int) -> list[PairSpec]:
    by_family: dict[str, list[list[AnimalImage]]] = defaultdict(list)
    for (family, _), members in lists.items():
        by_family[family].append(members)
    pairs = []
    for family in sorted(by_family):
        species_lists = by_family[family]
        members = [image for species_members in species_lists for image in species_members]
        offsets = np.cumsum([0] + [len(species_members) for species_members in species_lists])
        pooled = [np.zeros((0, 2), dtype=np.int64)] + [
            _valid_index_pairs(species_lists[a], species_lists[b], min_mutual) + [offsets[a], offsets[b]]
            for a, b in itertools.combinations(range(len(species_lists)), 2)
        ]
        chosen = _sample_rows(rng, np.concatenate(pooled), cap)
        pairs.extend(PairSpec(members[i], members[j], family) for i, j in chosen)
    return pairs


def _cross_family_pairs(lists: SpeciesLists, rng: random.Random, cap: int, min_mutual: int) -> list[PairSpec]:
    by_family: dict[str, list[AnimalImage]] = defaultdict(list)
    for (family, _), members in lists.items():
        by_family[family].extend(members)
    pairs = []
    for left, right in itertools.combinations(sorted(by_family), 2):
        valid = _sample_rows(rng, _valid_index_pairs(by_family[left], by_family[right], min_mutual), cap)
        pairs.extend(PairSpec(by_family[left][i], by_family[right][j], CROSS_FAMILY_CATEGORY) for i, j in valid)
    return pairs


def _valid_index_pairs(left: Sequence[AnimalImage], right: Sequence[AnimalImage], min_mutual: int) -> np.ndarray:
    """``(K, 2)`` int64 index pairs ``(i, j)`` into ``left`` x ``right``, in product order, whose
    images share at least ``min_mutual`` labelled joints."""
    if not left or not right:
        return np.zeros((0, 2), dtype=np.int64)
    left_labelled = np.stack([image.labelled for image in left]).astype(np.int64)
    right_labelled = np.stack([image.labelled for image in right]).astype(np.int64)
    return np.argwhere(left_labelled @ right_labelled.T >= min_mutual)


def _sample_rows(rng: random.Random, rows: np.ndarray, count: int) -> np.ndarray:
    """``min(count, len(rows))`` rows drawn without repeats."""
    return rows[rng.sample(range(len(rows)), min(count, len(rows)))]


# ---------------------------------------------------------------------------------------------
# Writing the pair layout


def build_pair_layout(
    raw_root: Location, out_dir: Path, seed: int = 42, protocol: Protocol = GEOAWARE_PROTOCOL
) -> dict[str, int]:
    """Write GeoAware's layout for the raw release at ``raw_root`` into ``out_dir``: an
    ``ImageAnnotation`` JSON (as GeoAware writes it) and a ``JPEGImages`` copy of the raw bytes for
    every kept image, and a ``PairAnnotation/<split>/`` folder (possibly empty) for every split,
    whose files point to ``ImageAnnotation/...`` relative to ``out_dir``. Returns pairs per split."""
    if (out_dir / PAIR_DIR).exists():
        raise FileExistsError(f"{out_dir / PAIR_DIR} exists; build into an empty directory so no stale pair remains")
    release = load_raw_release(raw_root, protocol.min_keypoints)
    annotation_paths = {}
    for image in release.images:
        family_species = f"{image.family}/{image.species}"
        annotation_path = f"{IMAGE_ANNOTATION_DIR}/{family_species}/{image_stem(image.image_id)}.json"
        _write(out_dir / annotation_path, json.dumps(release.documents[image.image_id], indent=4).encode())
        annotation_paths[image.image_id] = annotation_path
        try:
            image_bytes = raw_root.read_bytes(image.image_path)
        except FileNotFoundError:
            log.warning("%s is missing; the shard stage will reject its pairs", raw_root.full(image.image_path))
            continue
        except OSError as error:  # a directory, FIFO or device where the image should be
            log.warning("%s cannot be read (%s); the shard stage will reject its pairs", raw_root.full(image.image_path), error)
            continue
        _write(out_dir / IMAGE_DIR / family_species / f"{image_stem(image.image_id)}.jpg", image_bytes)
    counts = {}
    for split in SPLITS:
        pairs = sample_pairs(release.images, split, seed, protocol)
        (out_dir / PAIR_DIR / split).mkdir(parents=True, exist_ok=True)
        for pair in pairs:
            doc = {
                "src_json_path": annotation_paths[pair.src.image_id],
                "trg_json_path": annotation_paths[pair.trg.image_id],
            }
            _write(out_dir / PAIR_DIR / split / f"{pair.name}.json", json.dumps(doc, indent=4).encode())
        counts[split] = len(pairs)
    log.info("%s: %d images kept, %d left out; pairs %s", out_dir, len(release.images), len(release.rejects), counts)
    return counts


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.builders.ap10k",
        description="Build GeoAware-SC's AP-10K pair layout (ImageAnnotation/, JPEGImages/, PairAnnotation/) "
        "from the raw release (annotations/ap10k-*-split1.json, data/).",
    )
    parser.add_argument("--raw", required=True, help="raw AP-10K root: local directory or s3:// URL")
    parser.add_argument("--out", required=True, type=Path, help="local output directory, without PairAnnotation/ yet")
    parser.add_argument("--seed", type=int, default=42, help="seed of the pair sampling (default: 42, as GeoAware)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return build_pair_layout(Location(args.raw), args.out, args.seed)


if __name__ == "__main__":
    main()
