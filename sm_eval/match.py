"""Matching points on your own images: any model (a checkpoint of any kind, a released
``best_model.pth`` or LPMFlow folder, or ``zero-shot:BACKBONE``) on one source and one target image.

    python -m sm_eval.match --model runs/demo/epoch=0006-step=000000 cat.jpg cat2.jpg --grid 10 --out match-out
    python -m sm_eval.match --model zero-shot:dinov2_vitb14 --image-size 448 \\
        s3://bucket/a.png s3://bucket/b.png --points "120,80; 300.5,41" --out s3://bucket/match

The same in Python::

    model, checkpoint = load_match_model("runs/demo/epoch=0006-step=000000")
    result = match_points(model, src_image, trg_image, grid_points(src_image.shape[1], src_image.shape[0], 10))
    write_matches(Location("match-out"), result, src_image, trg_image, model_name=checkpoint.name)

Points are ``(x, y)`` in original-image pixels with the centre of pixel ``(0, 0)`` at ``(0, 0)``
(:mod:`sm_model.pixels`), so a point lies in a ``W x H`` image when ``-0.5 <= x <= W - 0.5`` and
``-0.5 <= y <= H - 0.5``; any other point is refused (``ValueError`` naming it and the image size).
The two images are prepared as the model takes them (its ``input_spec``, as in evaluation) and
encoded once (:func:`encode_pair`); any number of points is then matched against that encoding
(:func:`match_encoded`), and each source point's
prediction comes back in original target pixels with its *score*: the highest cosine similarity
of the point's feature with the target's finest feature map, the value at its best-matching cell, in
``[-1, 1]`` (1: the same feature). Images are decoded as stored (:func:`pipelines.imageio.decode_rgb`,
bounded), so an EXIF orientation tag is not applied.

Outputs (:func:`write_matches`, to a local directory or an ``s3://`` prefix):

``matches.png``   source and target side by side, a line per match coloured by its score
                  (red 0 or below, yellow 0.5, green 1), with a colour bar
``matches.json``  the model (name, source, kind, backbone, localizer, image size, pixel convention),
                  both images (path, width, height), and per match ``source_x``, ``source_y``,
                  ``target_x``, ``target_y``, ``score``; written last
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.imageio import MAX_IMAGE_BYTES, decode_rgb
from pipelines.storage import Location, StorageError, is_s3, split_s3_url
from sm_eval import figures
from sm_eval.checkpoints import model_names, official_model_config, open_model
from sm_eval.evaluate import check_output_dir
from sm_eval.runner import DTYPES, EvalSettings, local_device, torch_threads
from sm_model.localizers import LOCALIZERS
from sm_model.matcher import MatchModel

log = logging.getLogger("sm_eval.match")

MATCHES_JSON = "matches.json"
MATCHES_PNG = "matches.png"
FORMAT = "sm_eval.match-v1"
MAX_POINTS_FILE_BYTES = 16 * 2**20
"""Bound on a ``--points-file``: about a million points."""
MAX_GRID = 256
"""Largest ``--grid N`` (N x N = 65,536 points)."""
SCORE_BUDGET = 2**25
"""Score-map entries (float32: 128 MiB) predicted at once: :func:`match_encoded` matches the points
in chunks of at most ``SCORE_BUDGET / (S/4)**2`` (the finest map of any model kind has a stride of
at least 4) against the pair encoded once."""
POINTS_MEANING = "(x, y) original-image pixels, the centre of pixel (0, 0) at (0, 0)"
SCORE_MEANING = (
    "the highest cosine similarity of the source point's feature with the target's finest feature map "
    "(the value at its best-matching cell), in [-1, 1]"
)


@dataclass(frozen=True)
class ModelName:
    """Where a model came from: ``name`` for reports (:func:`~sm_eval.checkpoints.model_names`),
    ``source`` as the user gave it, ``path`` the file read, ``official`` for a released SimpleMatch file."""

    name: str
    source: str
    path: str
    official: bool


@dataclass(frozen=True)
class MatchResult:
    """What :func:`match_points` found: ``source_points`` ``(N, 2)`` float64 as given (original
    source pixels), ``target_points`` ``(N, 2)`` float64 original target pixels, ``scores``
    ``(N,)`` float64 (the peak cosine similarity, see the module); ``source_size`` and
    ``target_size`` ``(W, H)``; ``model``: the model's kind, backbone, localizer, input side,
    pixel convention and image resize, as recorded in ``matches.json``."""

    source_points: np.ndarray
    target_points: np.ndarray
    scores: np.ndarray
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    model: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)


# ---- points ------------------------------------------------------------------------------------


def grid_points(width: int, height: int, n: int) -> np.ndarray:
    """``(n * n, 2)`` float64 points spread over a ``width x height`` image: the centres of an
    ``n x n`` tiling of it, ``x_i = (i + 0.5) * width / n - 0.5`` (and the same for ``y``) in the
    pixel-centre convention, row by row (``y`` outer, ``x`` inner).

    With ``n`` the side of a model's finest feature map (``S / stride``: 16 for a 64-pixel input
    at stride 4), they are exactly the centres of its feature cells mapped back to the original
    image in the ``center`` pixel convention (cell ``j`` at input pixel ``s*j + (s - 1)/2``, then
    ``x = (x' + 0.5) * W / S - 0.5``)."""
    if n < 1 or width < 1 or height < 1:
        raise ValueError(f"grid_points needs n, width and height of at least 1, got n={n}, {width} x {height}")
    xs = (np.arange(n) + 0.5) * width / n - 0.5
    ys = (np.arange(n) + 0.5) * height / n - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    return np.column_stack([grid_x.ravel(), grid_y.ravel()])


def _parse_point(text: str, where: str) -> tuple[float, float]:
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"{where}: expected a point 'x,y' (or 'x y'), got {text.strip()!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{where}: the point {text.strip()!r} is not finite")
    return x, y


def parse_points(text: str) -> np.ndarray:
    """``"x,y;x,y;..."`` -> ``(N, 2)`` float64: points separated by ``;`` (or new lines), the two
    coordinates of each by a comma or spaces; empty entries are skipped. ``ValueError`` naming the
    entry that is not two finite numbers, or when there is no point."""
    entries = [entry for entry in re.split(r"[;\n]", text) if entry.strip()]
    if not entries:
        raise ValueError(f"no points in {text!r}: expected 'x,y;x,y;...'")
    return np.array([_parse_point(entry, f"point {i + 1}") for i, entry in enumerate(entries)], dtype=np.float64)


def points_from_text(text: str, source: str = "points") -> np.ndarray:
    """The points of a points file's ``text`` (``source`` names it in errors), ``(N, 2)`` float64.
    Two formats: a JSON list of ``[x, y]`` pairs (the text starts with ``[``), or one point per
    line as ``x,y`` or ``x y``, where blank lines and everything after a ``#`` are ignored."""
    if text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not valid JSON: {error}") from None
        points = []
        for i, item in enumerate(document):
            ok = isinstance(item, list) and len(item) == 2
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in item)
            if not ok:
                raise ValueError(f"{source}: item {i + 1} is not an [x, y] pair of finite numbers: {item!r}")
            points.append((float(item[0]), float(item[1])))
    else:
        points = []
        for number, line in enumerate(text.splitlines(), start=1):
            content = line.split("#", 1)[0]
            if content.strip():
                points.append(_parse_point(content, f"{source}, line {number}"))
    if not points:
        raise ValueError(f"{source}: no points (one 'x,y' or 'x y' per line, or a JSON list of [x, y])")
    return np.array(points, dtype=np.float64)


def check_points(points: np.ndarray, size: tuple[int, int], image: str = "source image") -> np.ndarray:
    """``points`` as ``(N, 2)`` float64, checked: at least one, finite, and inside the
    ``size = (W, H)`` image, i.e. ``-0.5 <= x <= W - 0.5`` and ``-0.5 <= y <= H - 0.5`` (the pixel
    centre convention). ``ValueError`` naming the first point outside and the image size."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise ValueError(f"points must be an (N, 2) array of (x, y) with N >= 1, got shape {array.shape}")
    width, height = size
    inside = (
        np.isfinite(array).all(axis=1)
        & (array[:, 0] >= -0.5)
        & (array[:, 0] <= width - 0.5)
        & (array[:, 1] >= -0.5)
        & (array[:, 1] <= height - 0.5)
    )
    if not inside.all():
        bad = int(np.flatnonzero(~inside)[0])
        x, y = array[bad]
        raise ValueError(
            f"point {bad + 1} ({x:g}, {y:g}) lies outside the {image} ({width} x {height} pixels: x must lie in "
            f"[-0.5, {width - 0.5:g}] and y in [-0.5, {height - 0.5:g}], the centre of pixel (0, 0) at (0, 0))"
            + (f"; {int((~inside).sum())} points in all" if (~inside).sum() > 1 else "")
        )
    return array


# ---- files -------------------------------------------------------------------------------------


def file_location(url: str, endpoint_url: str | None = None) -> tuple[Location, str]:
    """``(directory, name)`` of a local path or ``s3://bucket/key`` file, to read it through a
    :class:`~pipelines.storage.Location` (bounded, regular files only)."""
    if is_s3(url):
        _, key = split_s3_url(url)
        if not key or url.endswith("/"):
            raise ValueError(f"{url}: expected the URL of a file (s3://bucket/key)")
        parent, _, name = url.rpartition("/")
        return Location(parent, endpoint_url), name
    path = Path(url).expanduser()
    if not path.name:
        raise ValueError(f"{url}: expected the path of a file")
    return Location(str(path.parent), endpoint_url), path.name


def _read_file(url: str, what: str, max_bytes: int, endpoint_url: str | None) -> bytes:
    location, name = file_location(url, endpoint_url)
    try:
        return location.read_bytes(name, max_bytes=max_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {url}: no such file") from None
    except OSError as error:  # a directory, a FIFO, too large, unreadable
        raise OSError(f"{what} {url}: cannot be read ({error.strerror or error})") from None


def read_image(url: str, endpoint_url: str | None = None, what: str = "image") -> np.ndarray:
    """The image at ``url`` (local or ``s3://``) as ``(H, W, 3)`` uint8 RGB, any format PIL reads,
    within the bounds of :mod:`pipelines.imageio`. ``FileNotFoundError`` / ``OSError`` for a file
    that cannot be read and ``ValueError`` for one that is no decodable image, both naming ``what``
    and ``url``; :class:`~pipelines.storage.StorageError` for an S3 store that cannot be used."""
    data = _read_file(url, what, MAX_IMAGE_BYTES, endpoint_url)
    try:
        return decode_rgb(data)
    except Exception as error:  # RejectError (not an image, too large) or PIL's error on a truncated file
        raise ValueError(f"{what} {url}: not a readable image ({error})") from None


def read_points_file(url: str, endpoint_url: str | None = None) -> np.ndarray:
    """The points of the file at ``url`` (local or ``s3://``): see :func:`points_from_text`."""
    data = _read_file(url, "points file", MAX_POINTS_FILE_BYTES, endpoint_url)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"points file {url}: not UTF-8 text") from None
    return points_from_text(text, f"points file {url}")


# ---- model and matching ------------------------------------------------------------------------


def load_match_model(
    source: str,
    *,
    backbone_weights: str | None = None,
    official_config: str | None = None,
    image_size: int | None = None,
    localizer: str | None = None,
    model_options: Sequence[str] = (),
    endpoint_url: str | None = None,
) -> tuple[MatchModel, ModelName]:
    """The model of ``source`` as ``python -m sm_eval`` loads it, in eval mode on the CPU, with its
    :class:`ModelName` (its ``name`` for reports): a checkpoint file or a
    directory holding ``model.pt`` (local or ``s3://``), a released ``best_model.pth`` with
    ``official_config``, a released LPMFlow folder (``args.pkl``, ``model_best.pth``), or ``zero-shot:BACKBONE`` with ``backbone_weights`` (``None``: the timm hub,
    ``"random"``: untrained, else a local file). ``image_size``, ``localizer`` and ``model_options``
    (``key=value``) replace config fields (:class:`~sm_eval.runner.EvalSettings`)."""
    settings = EvalSettings(image_size=image_size, localizer=localizer, model_options=tuple(model_options))
    config = official_model_config(official_config) if official_config else None
    model, path, official = open_model(source, endpoint_url, config, backbone_weights, settings.model_overrides())
    (name,) = model_names([source])
    return model.eval(), ModelName(name=name, source=source, path=path, official=official)


def load_model_from_args(args: argparse.Namespace) -> tuple[MatchModel, ModelName]:
    """:func:`load_match_model` of ``args.model`` with the options :func:`add_model_options` adds."""
    return load_match_model(
        args.model,
        backbone_weights=args.backbone_weights,
        official_config=args.official_config,
        image_size=args.image_size,
        localizer=args.localizer,
        model_options=args.model_options,
        endpoint_url=args.s3_endpoint_url,
    )


def model_summary(model: MatchModel) -> dict[str, Any]:
    """What ``matches.json`` records of ``model``'s config."""
    config = model.config
    return {
        "kind": config.kind,
        "backbone": config.backbone,
        "localizer": config.localizer_method,
        "image_size": model.input_spec.size,  # the side images come at (LPMFlow: 512, its network at 256)
        "pixel_convention": config.pixel_convention,
        "image_resize": config.image_resize,
    }


def _check_image(image: np.ndarray, what: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"the {what} must be an (H, W, 3) uint8 array, got {getattr(image, 'dtype', type(image))} {shape}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"the {what} is empty: {image.shape}")


def default_chunk_size(model: MatchModel) -> int:
    """Points matched at a time: :data:`SCORE_BUDGET` over the cells of a stride-4 map of the input."""
    cells = max(1, model.input_spec.size // 4) ** 2
    return max(1, SCORE_BUDGET // cells)


@dataclass(frozen=True)
class EncodedPair:
    """Two images encoded once by a model (:func:`encode_pair`), ready to match any points:
    ``encoded`` (the model's :meth:`~sm_model.matcher.MatchModel.encode` of the pair as a batch of
    one), the images' original ``(W, H)`` sizes, and the ``device`` and ``autocast_dtype`` it ran with."""

    encoded: Any
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    device: torch.device
    autocast_dtype: torch.dtype | None


@torch.no_grad()
def encode_pair(
    model: MatchModel,
    src_image: np.ndarray,
    trg_image: np.ndarray,
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> EncodedPair:
    """``src_image`` and ``trg_image`` (``(H, W, 3)`` uint8 RGB of any sizes) prepared as the
    model takes them (:meth:`~sm_model.matcher.MatchModel.prepare`) and encoded once, in eval mode.
    ``device``: where to run (the model is moved there; default: where its parameters are);
    ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the network under autocast as ``sm_eval
    --dtype`` does. ``ValueError`` for a malformed image."""
    _check_image(src_image, "source image")
    _check_image(trg_image, "target image")
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    model = model.to(device).eval()
    src = model.prepare(src_image).unsqueeze(0).to(device)
    trg = model.prepare(trg_image).unsqueeze(0).to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        encoded = model.encode(src, trg)
    return EncodedPair(
        encoded,
        (int(src_image.shape[1]), int(src_image.shape[0])),
        (int(trg_image.shape[1]), int(trg_image.shape[0])),
        device,
        autocast_dtype,
    )


@torch.no_grad()
def match_encoded(
    model: MatchModel,
    pair: EncodedPair,
    points: np.ndarray | Sequence[Sequence[float]],
    *,
    chunk_size: int | None = None,
) -> MatchResult:
    """Where each of ``points`` (``(N, 2)`` original source pixels) lies in the target of ``pair``
    (:func:`encode_pair`), by ``model``, without encoding again. ``chunk_size``: points matched at
    a time (default :func:`default_chunk_size`, bounding the score maps held at once).
    ``ValueError`` for a point outside the source image (:func:`check_points`)."""
    points = check_points(np.asarray(points, dtype=np.float64), pair.source_size, "source image")
    chunk = chunk_size or default_chunk_size(model)
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device, autocast_dtype = pair.device, pair.autocast_dtype
    src_sizes = torch.tensor([pair.source_size], dtype=torch.float32, device=device)
    trg_sizes = torch.tensor([pair.target_size], dtype=torch.float32, device=device)
    targets, scores = [], []
    for start in range(0, len(points), chunk):
        kps = torch.as_tensor(points[start : start + chunk], dtype=torch.float32, device=device).unsqueeze(0)
        valid = torch.ones(kps.shape[:2], dtype=torch.bool, device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            prediction = model.match_original(pair.encoded, kps, valid, src_sizes, trg_sizes)
        targets.append(prediction.points[0].float().cpu().numpy())
        scores.append(prediction.score[0].float().cpu().numpy())
    return MatchResult(
        source_points=points,
        target_points=np.concatenate(targets).astype(np.float64),
        scores=np.concatenate(scores).astype(np.float64),
        source_size=pair.source_size,
        target_size=pair.target_size,
        model=model_summary(model),
    )


@torch.no_grad()
def match_encoded_with_maps(
    model: MatchModel, pair: EncodedPair, points: np.ndarray | Sequence[Sequence[float]]
) -> tuple[MatchResult, np.ndarray]:
    """:func:`match_encoded` of ``points`` in one ``match`` call (no chunks: for a few points, as a
    click in :mod:`sm_eval.viewer` gives), plus each point's score map: ``(N, h, w)`` float32, the
    cosine similarity of its feature with every cell of the target's finest feature map (the map the
    model localized from, covering the whole target image; its maximum is the point's score). The
    points and scores are those of :meth:`~sm_model.matcher.MatchModel.match_original`, computed the
    same way (tests/test_viewer.py checks them against :func:`match_encoded`)."""
    points = check_points(np.asarray(points, dtype=np.float64), pair.source_size, "source image")
    device, autocast_dtype = pair.device, pair.autocast_dtype
    spec = model.input_spec
    src_sizes = torch.tensor([pair.source_size], dtype=torch.float32, device=device)
    trg_sizes = torch.tensor([pair.target_size], dtype=torch.float32, device=device)
    kps = torch.as_tensor(points, dtype=torch.float32, device=device).unsqueeze(0)
    valid = torch.ones(kps.shape[:2], dtype=torch.bool, device=device)
    if pair.encoded.size != spec.size:
        raise ValueError(f"the pair was encoded at {pair.encoded.size} px but the model's input is {spec.size} px")
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            finest = model.match(pair.encoded, spec.to_input_pixels(kps, src_sizes), valid)[-1]
    finally:
        model.train(was_training)
    targets = spec.to_original_pixels(finest.points, trg_sizes)[0].float().cpu().numpy()
    maps = finest.scores[0].float().cpu().numpy()
    result = MatchResult(
        source_points=points,
        target_points=targets.astype(np.float64),
        scores=maps.reshape(len(points), -1).max(axis=1).astype(np.float64),
        source_size=pair.source_size,
        target_size=pair.target_size,
        model=model_summary(model),
    )
    return result, maps


def match_points(
    model: MatchModel,
    src_image: np.ndarray,
    trg_image: np.ndarray,
    points: np.ndarray | Sequence[Sequence[float]],
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> MatchResult:
    """Where each of ``points`` (``(N, 2)`` original source pixels) lies in ``trg_image``, by
    ``model``: the pair encoded once (:func:`encode_pair`), every point matched against that
    encoding (:func:`match_encoded`). Arguments as those two take them."""
    _check_image(src_image, "source image")
    check_points(np.asarray(points, dtype=np.float64), (int(src_image.shape[1]), int(src_image.shape[0])), "source image")
    pair = encode_pair(model, src_image, trg_image, device=device, autocast_dtype=autocast_dtype)
    return match_encoded(model, pair, points, chunk_size=chunk_size)


# ---- outputs -----------------------------------------------------------------------------------


def match_picture(
    src_image: np.ndarray,
    trg_image: np.ndarray,
    result: MatchResult,
    caption: str | None = None,
    score_range: tuple[float, float] = figures.SCORE_RANGE,
) -> Any:
    """``matches.png`` as a ``PIL.Image``: :func:`sm_eval.figures.scored_matches_image` of ``result``,
    the colour scale spanning ``score_range`` (default 0 to 1, the same for every picture)."""
    if caption is None:
        caption = f"{len(result)} matches, mean score {float(np.mean(result.scores)):.3f}"
    return figures.scored_matches_image(
        src_image, trg_image, result.source_points, result.target_points, result.scores, caption, None, score_range
    )


def matches_document(
    result: MatchResult,
    *,
    model_name: str | None = None,
    model_source: str | None = None,
    source_path: str | None = None,
    target_path: str | None = None,
) -> dict[str, Any]:
    """The ``matches.json`` document of ``result``: ``format``, ``model`` (``name``, ``source``,
    then :attr:`MatchResult.model`), ``source_image`` and ``target_image`` (``path``, ``width``,
    ``height``), ``points`` and ``score`` (what the numbers mean), ``count``, ``mean_score`` and
    ``matches``: one ``{source_x, source_y, target_x, target_y, score}`` per point, in the order
    given (coordinates rounded to 1e-4 pixel, scores to 1e-6; a non-finite value, which no model
    should give, becomes ``null``)."""
    matches = [
        {
            "source_x": _number(s[0], 4),
            "source_y": _number(s[1], 4),
            "target_x": _number(t[0], 4),
            "target_y": _number(t[1], 4),
            "score": _number(score, 6),
        }
        for s, t, score in zip(result.source_points, result.target_points, result.scores)
    ]
    return {
        "format": FORMAT,
        "model": {"name": model_name, "source": model_source, **result.model},
        "source_image": {"path": source_path, "width": result.source_size[0], "height": result.source_size[1]},
        "target_image": {"path": target_path, "width": result.target_size[0], "height": result.target_size[1]},
        "points": POINTS_MEANING,
        "score": SCORE_MEANING,
        "count": len(matches),
        "mean_score": _number(np.mean(result.scores), 6) if len(matches) else None,
        "matches": matches,
    }


def _number(value: float, digits: int) -> float | None:
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def matches_json(document: dict[str, Any]) -> str:
    """``document`` (:func:`matches_document`) as JSON text: indented, one match per line."""
    head = json.dumps({key: value for key, value in document.items() if key != "matches"}, indent=1, allow_nan=False)
    rows = ",\n".join("  " + json.dumps(match, allow_nan=False) for match in document["matches"])
    return f'{head[:-2]},\n "matches": [\n{rows}\n ]\n}}\n'


def check_finite_result(result: MatchResult, model_name: str) -> None:
    """A ValueError naming the model when any match is not a finite number (a broken model's
    NaN), rather than matches and a "mean score nan" that look like results."""
    broken = ~(np.isfinite(result.target_points).all(axis=1) & np.isfinite(result.scores))
    if broken.any():
        raise ValueError(
            f"model {model_name} predicted NaN or infinite matches for {int(broken.sum())} of {len(result)} points"
        )


def write_matches(
    out: Location,
    result: MatchResult,
    src_image: np.ndarray,
    trg_image: np.ndarray,
    *,
    model_name: str | None = None,
    model_source: str | None = None,
    source_path: str | None = None,
    target_path: str | None = None,
    score_range: tuple[float, float] = figures.SCORE_RANGE,
) -> dict[str, str]:
    """Write :data:`MATCHES_PNG` (:func:`match_picture` with ``score_range``) then
    :data:`MATCHES_JSON` (:func:`matches_document`) into ``out``; returns ``{file name: full path or URL}``."""
    caption = f"{model_name or 'model'}: {len(result)} matches, mean score {float(np.mean(result.scores)):.3f}"
    picture = match_picture(src_image, trg_image, result, caption, score_range)
    document = matches_document(
        result, model_name=model_name, model_source=model_source, source_path=source_path, target_path=target_path
    )
    out.put_bytes(MATCHES_PNG, figures.png_bytes(picture))
    out.put_bytes(MATCHES_JSON, matches_json(document).encode())
    return {name: out.full(name) for name in (MATCHES_PNG, MATCHES_JSON)}


# ---- command line ------------------------------------------------------------------------------

EPILOG = f"""\
example:
  python -m sm_eval.match --model runs/demo/epoch=0006-step=000000 cat.jpg cat2.jpg --grid 10 --out match-out
  python -m sm_eval.match --model zero-shot:dinov2_vitb14 --image-size 448 a.png b.png \\
      --points "120,80; 300.5,41" --out s3://bucket/match

points: (x, y) in original source-image pixels, the centre of pixel (0, 0) at (0, 0); each must lie
in the source image: -0.5 <= x <= W - 0.5, -0.5 <= y <= H - 0.5.
  --points "x,y;x,y"   points separated by ';', coordinates by ',' or a space (write --points=-0.25,5
                       when the first coordinate is negative)
  --points-file F      one 'x,y' or 'x y' per line ('#' starts a comment), or a JSON list of [x, y];
                       local or s3://
  --grid N             the centres of an N x N tiling of the source image (N at most {MAX_GRID});
                       N = S / stride (the finest feature map's side) puts them on the feature cells

models: as python -m sm_eval --model: a checkpoint file or a directory holding model.pt (any kind),
a released best_model.pth with --official-config, a released LPMFlow folder (args.pkl and
model_best.pth), or zero-shot:BACKBONE (weights from the timm hub, --backbone-weights FILE, or
random). Localizers: {", ".join(LOCALIZERS)} (default: the model's own).

outputs in --out (a local directory or s3:// prefix):
  matches.png   source and target side by side, a line per match coloured by its score
                (red at 0 or below, yellow 0.5, green 1) and a colour bar
  matches.json  model (name, source, kind, backbone, localizer, image_size, pixel_convention,
                image_resize), source_image and target_image (path, width, height), count,
                mean_score, and matches: [{{source_x, source_y, target_x, target_y, score}}, ...]
                with target points in original target-image pixels

score: the highest cosine similarity of the source point's feature with the target's finest feature
map (the value at its best-matching cell), in [-1, 1]; 1 is the same feature.

exit status: 0 done, 1 an image, the points or the checkpoint are unusable (the message names the
file or the point), 2 usage, or an S3 store that cannot be used."""


def positive_int(text: str) -> int:
    """An argparse type: ``text`` as an integer of at least 1 (both CLIs of sm_eval use it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _grid(text: str) -> int:
    value = positive_int(text)
    if value > MAX_GRID:
        raise argparse.ArgumentTypeError(f"--grid is at most {MAX_GRID} ({MAX_GRID**2} points), got {value}")
    return value


def _points(text: str) -> np.ndarray:
    try:
        return parse_points(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose and set up one model and where it runs, as ``python -m sm_eval``
    names them: ``--backbone-weights``, ``--official-config``, ``--image-size``, ``--localizer``,
    ``--set``, ``--s3-endpoint-url``, ``--device``, ``--dtype``, ``--threads`` (``--model`` is the
    caller's: it may be repeatable or not); :func:`load_model_from_args` loads the model they name."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone-weights", metavar="PATH",
        help="for zero-shot models: their backbone's weights file (default: the timm hub; 'random': untrained, "
        "for smoke tests); for a released DINOv2 LoRA checkpoint: the frozen backbone's pretrained file",
    )  # fmt: skip
    model.add_argument(
        "--official-config", metavar="YAML",
        help="for a released best_model.pth: the training config of its backbone and size "
        "(e.g. configs/dinov2_vitb14_448_spair.yaml)",
    )  # fmt: skip
    model.add_argument(
        "--image-size", type=positive_int, metavar="S",
        help="network input side (default: the checkpoint's; a multiple of the patch size for ViTs)",
    )  # fmt: skip
    model.add_argument(
        "--localizer", choices=LOCALIZERS, help="how score maps become points (default: the model's own)"
    )
    model.add_argument(
        "--set", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
        help="replace a model config field, e.g. beta=0.04, kernel_sigma=5, window_size=15. Repeatable",
    )  # fmt: skip
    model.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")
    compute = parser.add_argument_group("compute")
    compute.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available"
    )
    compute.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (default: float32)")
    compute.add_argument("--threads", type=positive_int, metavar="T", help="torch CPU threads (default: torch's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sm_eval.match",
        description="Match points of a source image to a target image with any model, and write matches.json "
        "(every source point, its predicted target point in original pixels, its score) and matches.png.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SRC_IMAGE", help="the source image (local path or s3://)")
    parser.add_argument("target", metavar="TRG_IMAGE", help="the target image (local path or s3://)")
    parser.add_argument(
        "--model", "--checkpoint", dest="model", required=True, metavar="PATH_OR_S3|zero-shot:NAME",
        help="a checkpoint file or a directory holding model.pt (any kind), a released best_model.pth "
        "(with --official-config) or LPMFlow folder, local or s3://; or zero-shot:BACKBONE",
    )  # fmt: skip
    points = parser.add_mutually_exclusive_group(required=True)
    points.add_argument("--points", type=_points, metavar='"x,y;x,y"', help="source points, ';'-separated")
    points.add_argument("--points-file", metavar="FILE", help="a file of source points (local or s3://; see below)")
    points.add_argument("--grid", type=_grid, metavar="N", help="the centres of an N x N tiling of the source image")
    parser.add_argument("--out", required=True, metavar="DIR_OR_S3", help="output directory (local or s3://)")
    parser.add_argument(
        "--chunk-size", type=positive_int, metavar="K",
        help="points matched at a time against the encoded pair (default: as many as 128 MiB of score maps hold)",
    )  # fmt: skip
    add_model_options(parser)
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        EvalSettings(model_options=tuple(args.model_options))  # a malformed --set is a usage error
        check_output_dir(args.out)
        device = torch.device(local_device(args.device))
        out = Location(args.out, args.s3_endpoint_url)
    except (ValueError, RuntimeError) as error:  # RuntimeError: --device cuda without CUDA
        parser.error(str(error))
    try:
        with torch_threads(args.threads):
            src_image = read_image(args.source, args.s3_endpoint_url, "source image")
            trg_image = read_image(args.target, args.s3_endpoint_url, "target image")
            if args.grid is not None:
                points = grid_points(src_image.shape[1], src_image.shape[0], args.grid)
            elif args.points_file is not None:
                points = read_points_file(args.points_file, args.s3_endpoint_url)
            else:
                points = args.points
            check_points(points, (src_image.shape[1], src_image.shape[0]), f"source image {args.source}")
            model, checkpoint = load_model_from_args(args)
            result = match_points(
                model, src_image, trg_image, points, device=device, autocast_dtype=DTYPES[args.dtype],
                chunk_size=args.chunk_size,
            )  # fmt: skip
            check_finite_result(result, checkpoint.name)
            paths = write_matches(
                out, result, src_image, trg_image, model_name=checkpoint.name, model_source=checkpoint.source,
                source_path=args.source, target_path=args.target,
            )  # fmt: skip
    except StorageError as error:  # no bucket, credentials refused, endpoint unreachable: the setup
        print(f"sm_eval.match: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as error:
        print(f"sm_eval.match: error: {error}", file=sys.stderr)
        return 1
    scores, model_info = result.scores, result.model
    print(
        f"{len(result)} matches with {checkpoint.name} ({model_info['kind']}, localizer {model_info['localizer']}, "
        f"input {model_info['image_size']}): mean score {scores.mean():.3f} "
        f"(min {scores.min():.3f}, max {scores.max():.3f})"
    )
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
