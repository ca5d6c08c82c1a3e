"""``python -m sm_train --config configs/<name>.yaml [section.key=value ...]``: train a model
(``model.kind``: SimpleMatch, or the survey's ``baseline``) with Ray Train.

Runs on the Ray cluster named by ``RAY_ADDRESS`` (or the one ``ray job submit`` attached the job
to); without one it starts a local Ray instance. Starting again with the same ``run.name`` and
``run.storage_path`` continues the run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sm_train.config import (
    SELECTION_ALPHA,
    SELECTION_METRIC,
    ConfigError,
    TrainConfig,
    config_keys,
    dump_yaml,
    load_config,
    resolve_paths,
)

logger = logging.getLogger("sm_train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sm_train",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Overrides are dotted config keys with YAML values, e.g. model.image_size=448 optim.lr=1e-4 "
            "run.num_workers=4 run.use_gpu=true run.storage_path=s3://bucket/runs.\n\n"
            "Model kinds (model.kind): simplematch (default; configs/<backbone>_<size>_<dataset>.yaml),\n"
            "baseline, the survey's strong baseline (configs/baseline_*.yaml), vitsc (configs/vitsc_*.yaml)\n"
            "or lpmflow (configs/lpmflow_*.yaml); a zero-shot model trains\n"
            "nothing: evaluate it with python -m sm_eval --model zero-shot:BACKBONE. Any model predicts\n"
            "with model.localizer: argmax, dense, window or kernel (null: the kind's own).\n\nConfig keys:\n  "
            + "\n  ".join(config_keys())
        ),
    )
    parser.add_argument("--config", type=Path, help="YAML config (see configs/); defaults apply where it is silent")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument(
        "--backbone-weights",
        metavar="PATH",
        help="the pretrained backbone file to start from (model.weights; e.g. the iBOT teacher checkpoint for lpmflow)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--result-json", type=Path, help="write the final metrics and checkpoint path here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        overrides = [*args.overrides, *([f"model.weights={args.backbone_weights}"] if args.backbone_weights else [])]
        config: TrainConfig = resolve_paths(load_config(args.config, overrides), Path.cwd())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(config), end="")
        return 0

    import ray

    from sm_train.trainer import build_trainer  # Ray and torch load only once the config is valid

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    result = build_trainer(config).fit()
    summary = {
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": _best_checkpoint_path(result),
        "path": result.path,
    }
    logger.info("finished: %s", json.dumps(summary, default=str))
    metrics = result.metrics or {}
    if SELECTION_METRIC in metrics:
        initial = metrics.get(SELECTION_METRIC.replace("val/", "val_initial/"), float("nan"))
        print(
            f"val PCK@{SELECTION_ALPHA:g} (per image): before training {initial:.4f}, "
            f"after epoch {metrics['epoch']} {metrics[SELECTION_METRIC]:.4f}; best checkpoint {summary['best_checkpoint']}"
        )
    if args.result_json:
        args.result_json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _best_checkpoint_path(result) -> str | None:
    scored = [(metrics.get(SELECTION_METRIC), checkpoint.path) for checkpoint, metrics in result.best_checkpoints]
    scored = [(score, path) for score, path in scored if score is not None and score == score]
    return max(scored)[1] if scored else None


if __name__ == "__main__":
    sys.exit(main())
