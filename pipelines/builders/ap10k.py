"""Build GeoAware-SC's AP-10K pair layout from the raw release, with GeoAware's pairing recipe.

    python -m pipelines.builders.ap10k --raw /data/ap-10k --out /data/ap-10k-pairs [--seed 42]

The raw release (``annotations/ap10k-{train,val,test}-split1.json``, COCO style, and
``data/<file_name>``) is read by :func:`pipelines.sources.ap10k.load_raw_release`, which applies
GeoAware's image filter; :func:`pipelines.sources.ap10k.sample_pairs` forms each split's pairs
following GeoAware's ``prepare_ap10k`` recipe, and :func:`build_pair_layout` writes them as the GeoAware-SC pair layout
(``ImageAnnotation/``, ``JPEGImages/``, ``PairAnnotation/<split>/``) that
:mod:`pipelines.sources.ap10k` reads. That reader applies the same recipe in memory to a raw
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
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pipelines.sources.ap10k import (
    GEOAWARE_PROTOCOL,
    IMAGE_ANNOTATION_DIR,
    IMAGE_DIR,
    PAIR_DIR,
    SPLITS,
    Protocol,
    image_stem,
    load_raw_release,
    sample_pairs,
)
from pipelines.storage import Location

log = logging.getLogger(__name__)

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
