"""``python -m sm_eval.viewer``: the viewer's command line (see :mod:`sm_eval.viewer`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from sm_eval.match import add_model_options, load_model_from_args
from sm_eval.runner import DTYPES, EvalSettings, local_device
from sm_eval.viewer.access import DEFAULT_MAX_UPLOAD_MB, Roots, host_warning, parse_upload_cap

log = logging.getLogger("sm_eval.viewer")

EPILOG = """\
example:
  python -m sm_eval.viewer --model zero-shot:dinov2_vits14 --image-size 448
  python -m sm_eval.viewer --model runs/demo/epoch=0006-step=000000 --evaluation runs/demo-eval
  python -m sm_eval.viewer --model best_model.pth --official-config configs/dinov2_vitb14_448_spair.yaml \\
      --backbone-weights checkpoints/dinov2_vitb14_pretrain.pth --root /data --root s3://bucket/evals

Then open http://127.0.0.1:7860 (the port given). Match tab: load two images (upload, path or
s3:// URL), click points on the source. Evaluation tab: open an sm_eval output folder.

security: binds 127.0.0.1 unless --host says otherwise (a warning when that is not loopback); no
public share link; uploads are capped (--max-upload-mb) and decoded within pipelines.imageio's
bounds (non-images and decompression bombs are refused with a message); paths and s3:// URLs typed
in the browser are read only under the --root directories and prefixes (default: the working
directory; the --evaluation folder is one too); inside an evaluation folder only report.json and
predictions.parquet are read, through a Location confined to it."""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sm_eval.viewer",
        description="A browser viewer: click a source point and see its match, score and heat map on the target "
        "(any model sm_eval takes); browse an sm_eval output folder pair by pair.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", "--checkpoint", dest="model", required=True, metavar="PATH_OR_S3|zero-shot:NAME",
        help="a checkpoint file or a directory holding model.pt (any kind), a released best_model.pth "
        "(with --official-config) or LPMFlow folder, local or s3://; or zero-shot:BACKBONE",
    )  # fmt: skip
    parser.add_argument(
        "--evaluation", metavar="DIR_OR_S3", help="an sm_eval output folder to open in the Evaluation tab"
    )
    parser.add_argument(
        "--root", action="append", default=[], metavar="DIR_OR_S3",
        help="a local directory or s3:// prefix under which the browser may name images, evaluation folders and "
        "shard sets (repeatable; default: the working directory)",
    )  # fmt: skip
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    server.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    server.add_argument(
        "--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
        help=f"largest upload in MiB (default {DEFAULT_MAX_UPLOAD_MB})",
    )  # fmt: skip
    add_model_options(parser)
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The :class:`~sm_eval.viewer.app.ViewerConfig` of parsed ``args`` (the model loaded), or
    ``None`` after printing why the model cannot be loaded; usage errors exit through ``parser``."""
    try:
        EvalSettings(model_options=tuple(args.model_options))  # a malformed --set is a usage error
        cap = parse_upload_cap(args.max_upload_mb)
        roots = Roots.of([*(args.root or ["."]), *([args.evaluation] if args.evaluation else [])])
        device = torch.device(local_device(args.device))
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, name = load_model_from_args(args)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"sm_eval.viewer: error: {error}", file=sys.stderr)
        return None

    from sm_eval.viewer.app import ViewerConfig  # gradio: imported once the model is there

    return ViewerConfig(
        model=model.to(device),
        model_name=name,
        roots=roots,
        device=device,
        autocast_dtype=DTYPES[args.dtype],
        endpoint_url=args.s3_endpoint_url,
        max_upload_bytes=cap,
        evaluation=args.evaluation,
    )


LAUNCH_SETTINGS = {
    "share": False,
    "show_error": False,
    "footer_links": [],
    "enable_monitoring": False,
    "mcp_server": False,
    "run_history": False,
    "ssr_mode": False,
    "pwa": False,
    "strict_cors": True,
}
"""What ``launch`` is always told: no public share link, no error details, no footer links (API
page), no monitoring endpoint, no MCP server, no run history, no server-side rendering, no PWA,
strict CORS."""


def viewer_blocks(argv: Sequence[str]):
    """The viewer for an ASGI host other than its own server (Ray Serve's ``GradioServer``, or
    ``gradio.routes.App.create_app``): the command line's options (``--host`` and ``--port`` are the
    host's business), the model loaded, and what ``launch`` would set on the Blocks (the upload cap,
    no footer links, no monitoring, no run history). ``SystemExit`` for unusable options."""
    from gradio import utils

    from sm_eval.viewer.app import CSS, build_app

    parser = build_parser()
    args = parser.parse_args(argv)
    config = _config(parser, args)
    if config is None:
        raise SystemExit(1)
    blocks = build_app(config)
    # What launch() and gradio.mount_gradio_app() set before the app is made.
    blocks.dev_mode, blocks.ssr_mode, blocks.pwa = False, False, False
    blocks.max_file_size = utils._parse_file_size(config.max_upload_bytes)
    blocks.footer_links, blocks.run_history, blocks.enable_monitoring = [], False, False
    blocks.theme = utils.get_theme(None)
    blocks.css, blocks.js, blocks.head, blocks.head_paths, blocks.css_paths = CSS, "", "", [], []
    blocks._set_html_css_theme_variables()
    blocks.transpile_to_js()
    blocks.config = blocks.get_config_file()
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = host_warning(args.host)
    if warning:
        print(f"sm_eval.viewer: warning: {warning}", file=sys.stderr)
    config = _config(parser, args)
    if config is None:
        return 1

    from sm_eval.viewer.app import CSS, build_app

    app = build_app(config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"sm_eval.viewer: {config.model_name.name} on http://{host}:{args.port} (roots: {config.roots.describe()})",
          flush=True)  # fmt: skip
    try:
        app.launch(
            server_name=args.host, server_port=args.port, max_file_size=config.max_upload_bytes, quiet=True, css=CSS,
            **LAUNCH_SETTINGS,
        )  # fmt: skip
    except OSError as error:  # the port is taken, the address cannot be bound
        print(f"sm_eval.viewer: error: cannot serve on {args.host}:{args.port} ({error})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
