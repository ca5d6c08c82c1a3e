"""The Gradio app of ``python -m sm_eval.viewer``: a Match tab and an Evaluation tab over the
browser-free logic of :mod:`sm_eval.viewer.match_view` and :mod:`sm_eval.viewer.eval_view`.

Every handler catches what bad input raises and shows it in the tab's status line, so the server
stays up and the session keeps what it had (a pair loaded before a bad upload still answers
clicks). Elements the browser tests use carry an ``elem_id`` (``source-view``, ``last-match``,
``category-table``, ...).
"""

from __future__ import annotations

import base64
import functools
import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipelines.storage import StorageError
from sm_eval.match import ModelName, model_summary, parse_points
from sm_eval.pck import FLAG_COLUMNS, FRAMES
from sm_eval.viewer import eval_view, match_view
from sm_eval.viewer.access import Roots, read_image_at, read_upload
from sm_model.matcher import MatchModel

# Before gradio is imported: no telemetry, no version check.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr  # noqa: E402
from gradio.data_classes import ImageData  # noqa: E402

log = logging.getLogger("sm_eval.viewer")

POINT_COLUMNS = ["#", "colour", "source x", "source y", "target x", "target y", "score"]
CATEGORY_COLUMNS = ["category", "pairs", "keypoints", "PCK per image (%)", "PCK per keypoint (%)", "report.json"]
CSS = """
#match-view img { cursor: crosshair; }
#match-status, #eval-status { min-height: 1.5em; }
#noop-row { display: none !important; }
"""


@dataclass(frozen=True)
class ViewerConfig:
    """What the app is built with: the model (loaded once), where it runs, the roots the browser
    may name files under, the S3 endpoint, the upload cap, and an evaluation folder to open first."""

    model: MatchModel
    model_name: ModelName
    roots: Roots
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    endpoint_url: str | None = None
    max_upload_bytes: int = 32 * 2**20
    evaluation: str | None = None


INLINE_QUALITY = 80
"""JPEG quality of the Match tab's picture."""


def inline_image(component: gr.Image) -> gr.Image:
    """``component`` made to send its picture inside the event's answer, as a ``data:`` URL of a
    JPEG, instead of as a file the browser then asks for: no file written per click, no second
    request. (An instance attribute rather than a subclass: Gradio writes a ``.pyi`` stub beside the
    module of every Component subclass.)"""

    def postprocess(value: np.ndarray | Image.Image | None) -> ImageData | None:
        if value is None:
            return None
        picture = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=INLINE_QUALITY)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return ImageData(url=f"data:image/jpeg;base64,{data}", orig_name="matches.jpg", mime_type="image/jpeg")

    component.postprocess = postprocess  # type: ignore[method-assign]
    return component


def _error(error: BaseException) -> str:
    return f"**Error:** {error}"


def guarded(outputs: int, status_at: int) -> Callable:
    """A handler that never raises: on an exception it returns ``gr.skip()`` for every output but
    the status one (``status_at``), which gets the message. User errors (``ValueError``, ``OSError``,
    S3 failures) are shown as they are; anything else is logged with its traceback too."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except (ValueError, OSError, StorageError) as error:
                message = _error(error)
            except Exception as error:  # a bug: keep serving, say so
                log.exception("handler %s failed", handler.__name__)
                message = _error(f"unexpected {type(error).__name__}: {error}")
            values: list[Any] = [gr.skip()] * outputs
            values[status_at] = message
            return tuple(values)

        return run

    return wrap


def model_markdown(config: ViewerConfig) -> str:
    summary = model_summary(config.model)
    return (
        f"**Model** `{config.model_name.name}` ({summary['kind']} on {summary['backbone']}, {summary['image_size']} px "
        f"input, {summary['localizer']} localizer, pixel convention {summary['pixel_convention']}) on {config.device}. "
        "Points are (x, y) in original image pixels, the centre of pixel (0, 0) at (0, 0); the score is the highest "
        "cosine similarity of the source point's feature with the target's finest feature map."
    )


def build_app(config: ViewerConfig) -> gr.Blocks:
    """The viewer's Blocks (not launched)."""
    match_view.warm_up()
    with gr.Blocks(title="sm_eval viewer", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown("## sm_eval viewer")
        with gr.Tabs():
            with gr.Tab("Match", id="match"):
                _match_tab(config)
            with gr.Tab("Evaluation", id="evaluation"):
                _evaluation_tab(config, app)
    return app


# ---- Match tab ---------------------------------------------------------------------------------


def _match_tab(config: ViewerConfig) -> None:
    model, upload_dir = config.model, gr.utils.get_upload_folder()
    gr.Markdown(model_markdown(config))
    session = gr.State(None, time_to_live=6 * 3600)
    with gr.Row():
        with gr.Column():
            src_file = gr.File(label="Source image (upload)", type="filepath", elem_id="source-upload", height=120)
            src_path = gr.Textbox(label="or a path / s3:// URL", elem_id="source-path", max_lines=1)
        with gr.Column():
            trg_file = gr.File(label="Target image (upload)", type="filepath", elem_id="target-upload", height=120)
            trg_path = gr.Textbox(label="or a path / s3:// URL", elem_id="target-path", max_lines=1)
    with gr.Row():
        load = gr.Button("Load pair", variant="primary", elem_id="load-pair")
        clear = gr.Button("Clear points", elem_id="clear-points")
        heat = gr.Checkbox(True, label="Heat map of the last point over the target", elem_id="heat-map")
    status = gr.Markdown("Load a pair: upload two images, or give their paths or s3:// URLs.", elem_id="match-status")
    view = inline_image(
        gr.Image(label="Source (left): click a point. Target (right): its match and heat map", interactive=False,
                 elem_id="match-view", buttons=["fullscreen", "download"])
    )  # fmt: skip
    last = gr.Textbox(label="Last match", interactive=False, elem_id="last-match", max_lines=2)
    table = gr.Dataframe(headers=POINT_COLUMNS, value=pd.DataFrame(columns=POINT_COLUMNS), interactive=False,
                         label="Points (original pixels)", elem_id="match-table", max_height=300)  # fmt: skip
    with gr.Accordion("Points by coordinates", open=False):
        typed = gr.Textbox(label='source points "x,y; x,y" (original pixels)', elem_id="typed-points", max_lines=1)
        match_typed = gr.Button("Match these points", elem_id="match-typed")
    # A handler that does nothing: the framework's own round trip, which the browser test measures beside a click's.
    with gr.Row(elem_id="noop-row"):
        noop = gr.Button("no-op", elem_id="noop-button")
        noop_out = gr.Textbox(elem_id="noop-out")

    def side(file: str | None, path: str | None, what: str) -> tuple[np.ndarray | None, str | None]:
        if file:
            return read_upload(file, upload_dir, config.max_upload_bytes, what), Path(file).name
        if path and path.strip():
            return read_image_at(path, config.roots, config.endpoint_url, what), path.strip()
        return None, None

    def pictures(current: match_view.PairSession, heat_on: bool) -> tuple:
        picture, heat_range = match_view.session_image(current, heat_on)
        rows = pd.DataFrame(match_view.points_table(current), columns=POINT_COLUMNS)
        if current.points:
            text = match_view.describe_point(current.points[-1])
            if heat_range is not None:
                text += f"; heat map: cosine similarity {heat_range[0]:.3f} (blue) to {heat_range[1]:.3f} (red)"
        else:
            text = ""
        return picture, rows, text

    @guarded(outputs=7, status_at=4)
    def on_load(src_file_value, src_path_value, trg_file_value, trg_path_value, current, heat_on):
        images, names, errors, drop = {}, {}, [], [gr.skip(), gr.skip()]
        for index, (what, file, path) in enumerate(
            (("source", src_file_value, src_path_value), ("target", trg_file_value, trg_path_value))
        ):
            try:
                images[what], names[what] = side(file, path, f"{what} image")
            except (ValueError, OSError, StorageError) as error:
                errors.append(str(error))
                if file:  # a bad upload is removed, so that the next one starts afresh
                    drop[index] = None
        if errors:
            # The pair loaded before (if any) stays: its points still answer clicks.
            return current, gr.skip(), gr.skip(), gr.skip(), _error("; ".join(errors)), *drop
        src, trg = images["source"], images["target"]
        if src is None or trg is None:
            missing = " and ".join(w for w, image in images.items() if image is None)
            ready = " and ".join(w for w, image in images.items() if image is not None)
            message = f"Give the {missing} image (upload, path or s3:// URL)"
            message += f"; the {ready} image reads well." if ready else "."
            return current, gr.skip(), gr.skip(), gr.skip(), message, *drop
        fresh = match_view.load_pair(model, src, trg, src_name=names["source"], trg_name=names["target"],
                                     device=config.device, autocast_dtype=config.autocast_dtype)  # fmt: skip
        picture, rows, text = pictures(fresh, heat_on)
        message = (
            f"Loaded {names['source']} ({src.shape[1]} x {src.shape[0]}) and {names['target']} ({trg.shape[1]} x "
            f"{trg.shape[0]}); the pair was encoded once in {fresh.encode_seconds * 1e3:.0f} ms. Click a point on the "
            "source image (left)."
        )
        return fresh, picture, rows, text, message, *drop

    @guarded(outputs=5, status_at=4)
    def on_click(current, heat_on, event: gr.SelectData):
        started = time.perf_counter()
        if current is None:
            return current, gr.skip(), gr.skip(), gr.skip(), "Load a pair first."
        point = None
        if event.index is not None and len(event.index) == 2:
            point = match_view.click_point(current, (float(event.index[0]), float(event.index[1])))
        if point is None:
            return current, gr.skip(), gr.skip(), gr.skip(), "Click a point of the source image (on the left)."
        match_view.add_points(model, current, point[None])
        picture, rows, text = pictures(current, heat_on)
        milliseconds = (time.perf_counter() - started) * 1e3
        log.debug("click handled in %.1f ms", milliseconds)
        return current, picture, rows, text, f"Handled the click in {milliseconds:.1f} ms."

    @guarded(outputs=5, status_at=4)
    def on_typed(current, heat_on, text):
        if current is None:
            return current, gr.skip(), gr.skip(), gr.skip(), "Load a pair first."
        match_view.add_points(model, current, parse_points(text))
        return current, *pictures(current, heat_on), "Matched the points."

    @guarded(outputs=5, status_at=4)
    def on_redraw(current, heat_on, clear_them: bool):
        if current is None:
            return current, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if clear_them:
            match_view.clear_points(current)
        return current, *pictures(current, heat_on), "Points cleared." if clear_them else gr.skip()

    outputs = [session, view, table, last, status]
    sides = [src_file, src_path, trg_file, trg_path]
    load_outputs = [*outputs, src_file, trg_file]
    load.click(on_load, [*sides, session, heat], load_outputs)
    src_file.upload(on_load, [*sides, session, heat], load_outputs)
    trg_file.upload(on_load, [*sides, session, heat], load_outputs)
    view.select(on_click, [session, heat], outputs)
    match_typed.click(on_typed, [session, heat, typed], outputs)
    clear.click(functools.partial(on_redraw, clear_them=True), [session, heat], outputs)
    heat.change(functools.partial(on_redraw, clear_them=False), [session, heat], outputs)
    noop.click(lambda count: str(int(count or 0) + 1), noop_out, noop_out)


# ---- Evaluation tab ----------------------------------------------------------------------------


def _evaluation_tab(config: ViewerConfig, app: gr.Blocks) -> None:
    roots = config.roots
    folder_state = gr.State(None, time_to_live=6 * 3600)
    pairs_state = gr.State(None, time_to_live=6 * 3600)
    with gr.Row():
        folder_box = gr.Textbox(label="sm_eval output folder (path or s3:// URL)", value=config.evaluation or "",
                                elem_id="eval-folder", max_lines=1, scale=4)  # fmt: skip
        open_button = gr.Button("Open", variant="primary", elem_id="eval-open", scale=1)
    status = gr.Markdown("Open the output folder of an sm_eval run (it holds report.json and predictions.parquet).",
                         elem_id="eval-status")  # fmt: skip
    with gr.Row():
        model_box = gr.Dropdown(label="model", choices=[], elem_id="eval-model", interactive=True)
        frame_box = gr.Radio(list(FRAMES), value="original", label="frame", elem_id="eval-frame")
        alpha_box = gr.Dropdown(label="alpha", choices=[], allow_custom_value=True, elem_id="eval-alpha",
                                interactive=True)  # fmt: skip
    summary = gr.Markdown(elem_id="eval-summary")
    categories = gr.Dataframe(headers=CATEGORY_COLUMNS, value=pd.DataFrame(columns=CATEGORY_COLUMNS),
                              interactive=False, label="PCK per category", elem_id="category-table",
                              max_height=360)  # fmt: skip
    category_note = gr.Markdown(elem_id="category-note")
    gr.Markdown("**Pairs**: filter and sort (or sort by a column's header); select a row to draw the pair.")
    with gr.Row():
        category_filter = gr.Dropdown(["all"], value="all", label="category", elem_id="filter-category")
        flag_filters = [
            gr.Dropdown(["any"], value="any", label=flag.replace("_", " "), visible=False, elem_id=f"filter-{flag}")
            for flag in FLAG_COLUMNS
        ]
    with gr.Row():
        pck_min = gr.Slider(0, 100, value=0, step=0.5, label="PCK at least (%)", elem_id="filter-pck-min")
        pck_max = gr.Slider(0, 100, value=100, step=0.5, label="PCK at most (%)", elem_id="filter-pck-max")
        sort_by = gr.Dropdown([eval_view.PAIR_COLUMN], value=eval_view.PAIR_COLUMN, label="sort by", elem_id="sort-by")
        descending = gr.Checkbox(False, label="descending", elem_id="sort-descending")
    pairs = gr.Dataframe(interactive=False, label="pairs", elem_id="pairs-table", max_height=400,
                         show_search="filter")  # fmt: skip
    with gr.Row():
        pair_key = gr.Textbox(label="pair", elem_id="pair-key", max_lines=1, scale=4)
        draw_button = gr.Button("Draw", elem_id="pair-draw", scale=1)
    gr.Markdown(
        "The pair: a line from each source keypoint to its prediction, green when correct at the alpha "
        "in the frame chosen, red when not; the ground truth is the white ring."
    )
    pair_view = gr.Image(show_label=False, interactive=False, format="png", elem_id="pair-view",
                         buttons=["fullscreen", "download"])  # fmt: skip
    with gr.Accordion("Where the pair images come from", open=False):
        shards_box = gr.Textbox(label="shard set (default: report.json's data.shards)", elem_id="eval-shards",
                                max_lines=1)  # fmt: skip

    view_inputs = [folder_state, model_box, frame_box, alpha_box]
    filter_inputs = [category_filter, *flag_filters, pck_min, pck_max, sort_by, descending]

    def filtered(frame: pd.DataFrame, category, *rest) -> tuple[pd.DataFrame, str]:
        flags = dict(zip(FLAG_COLUMNS, rest[: len(FLAG_COLUMNS)]))
        low, high, by, desc = rest[len(FLAG_COLUMNS) :]
        chosen = eval_view.filter_pairs(frame, category=category, flags=flags, pck_min=low, pck_max=high,
                                        sort_by=by or eval_view.PAIR_COLUMN, descending=bool(desc))  # fmt: skip
        shown = chosen.head(eval_view.MAX_TABLE_ROWS)
        words = f"{len(chosen):,} of {len(frame):,} pairs"
        if len(chosen) > len(shown):
            words += f" (the first {len(shown):,} shown)"
        return shown, words

    def draw(folder, model, frame, alpha_text, key, shards) -> np.ndarray:
        return eval_view.pair_picture(folder, model, frame, eval_view.parse_alpha(alpha_text), key, roots, shards)

    def figures(folder, model, frame, alpha_text, filters) -> tuple:
        alpha = eval_view.parse_alpha(alpha_text)
        rows, note = eval_view.category_rows(folder, model, frame, alpha)
        frame_pairs = eval_view.pair_frame(folder, model, frame, alpha)
        shown, words = filtered(frame_pairs, *filters)
        return pd.DataFrame(rows, columns=CATEGORY_COLUMNS), note, frame_pairs, shown, words

    @guarded(outputs=18, status_at=1)
    def on_open(url, shards, *filters):
        folder = eval_view.open_folder(url, roots, config.endpoint_url)
        model, alpha = folder.models[0], folder.table_alpha
        frame_name = "original"
        # The category, flag and sort choices are the new folder's: reset; the PCK bounds and the order stay.
        low, high, _, desc = filters[1 + len(FLAG_COLUMNS) :]
        resets = ["all", *(["any"] * len(FLAG_COLUMNS)), low, high, eval_view.PAIR_COLUMN, desc]
        table, note, frame_pairs, shown, words = figures(folder, model, frame_name, alpha, resets)
        data, protocol = folder.report["data"], folder.report["protocol"]
        text = (
            f"`{folder.url}`: {', '.join(data.get('datasets', []))} split `{data.get('split')}`, "
            f"{data.get('pairs')} pairs, {data.get('keypoints')} keypoints; models {', '.join(folder.models)}; "
            f"hit rule `{protocol['rule']}`, threshold {'/'.join(protocol.get('threshold_kinds', []))}."
        )
        picture, message = gr.skip(), f"Opened {folder.url}: {words}."
        key = str(shown.iloc[0][eval_view.PAIR_COLUMN]) if len(shown) else ""
        if key:
            try:
                picture = draw(folder, model, frame_name, alpha, key, shards)
            except (ValueError, OSError, StorageError) as error:
                message += f" The pairs cannot be drawn: {error}"
        flag_updates = [
            gr.update(choices=eval_view.flag_values(folder, flag), value="any", visible=flag in folder.flags)
            for flag in FLAG_COLUMNS
        ]
        sort_choices = [str(c) for c in frame_pairs.columns]
        return (
            folder, message, gr.update(choices=folder.models, value=model), "original",
            gr.update(choices=[f"{a:g}" for a in folder.alphas], value=f"{alpha:g}"), text, table, note,
            gr.update(choices=["all", *folder.categories], value="all"), *flag_updates,
            gr.update(choices=sort_choices, value=eval_view.PAIR_COLUMN), frame_pairs, shown, key, picture,
        )  # fmt: skip

    @guarded(outputs=7, status_at=0)
    def on_view(folder, model, frame, alpha_text, key, shards, *filters):
        if folder is None:
            return "Open an evaluation folder first.", *([gr.skip()] * 6)
        table, note, frame_pairs, shown, words = figures(folder, model, frame, alpha_text, filters)
        picture = draw(folder, model, frame, alpha_text, key, shards) if key else gr.skip()
        return f"{words} at alpha {alpha_text}, {frame} frame.", table, note, frame_pairs, shown, picture, gr.skip()

    @guarded(outputs=2, status_at=0)
    def on_filter(frame_pairs, *filters):
        if frame_pairs is None:
            return "Open an evaluation folder first.", gr.skip()
        shown, words = filtered(frame_pairs, *filters)
        return f"{words}.", shown

    @guarded(outputs=3, status_at=0)
    def on_select(folder, model, frame, alpha_text, shards, event: gr.SelectData):
        if folder is None:
            return "Open an evaluation folder first.", gr.skip(), gr.skip()
        row = event.row_value
        if not row:
            return "Select a row of the pairs table.", gr.skip(), gr.skip()
        key = str(row[0])
        return f"Pair {key}.", key, draw(folder, model, frame, alpha_text, key, shards)

    @guarded(outputs=2, status_at=0)
    def on_draw(folder, model, frame, alpha_text, key, shards):
        if folder is None:
            return "Open an evaluation folder first.", gr.skip()
        key = (key or "").strip()
        return f"Pair {key}.", draw(folder, model, frame, alpha_text, key, shards)

    open_outputs = [folder_state, status, model_box, frame_box, alpha_box, summary, categories, category_note,
                    category_filter, *flag_filters, sort_by, pairs_state, pairs, pair_key, pair_view]  # fmt: skip
    open_button.click(on_open, [folder_box, shards_box, *filter_inputs], open_outputs)
    folder_box.submit(on_open, [folder_box, shards_box, *filter_inputs], open_outputs)
    view_outputs = [status, categories, category_note, pairs_state, pairs, pair_view, pair_key]
    for control in (model_box, frame_box, alpha_box):
        control.input(on_view, [*view_inputs, pair_key, shards_box, *filter_inputs], view_outputs)
    for control in filter_inputs:
        control.input(on_filter, [pairs_state, *filter_inputs], [status, pairs])
    pairs.select(on_select, [*view_inputs, shards_box], [status, pair_key, pair_view])
    draw_button.click(on_draw, [*view_inputs, pair_key, shards_box], [status, pair_view])
    pair_key.submit(on_draw, [*view_inputs, pair_key, shards_box], [status, pair_view])
    if config.evaluation:  # the folder given on the command line opens with the page
        app.load(on_open, [folder_box, shards_box, *filter_inputs], open_outputs)
