"""``python -m sm_eval``: PCK of one or more models on a split of a shard set: checkpoints of any
kind (SimpleMatch, the survey's baseline), released SimpleMatch checkpoints and LPMFlow folders,
and zero-shot pretrained features.

    python -m sm_eval --model runs/spair/checkpoint_000010 --shards s3://bucket/spair-shards \\
        --split test --workers 4 --out eval/spair-test
    python -m sm_eval --model zero-shot:dinov2_vitb14 --image-size 840 --localizer kernel \\
        --shards data/shards/spair --out eval/dinov2-zero-shot
    python -m sm_eval --checkpoint ckpts/dinov2_448x448_spair/best_model.pth \
        --official-config configs/dinov2_vitb14_448_spair.yaml --backbone-weights dinov2_vitb14_pretrain.pth \
        --shards data/shards/spair --out eval/released-448

A released ``best_model.pth`` is recognised by its keys (a released LPMFlow folder by its
``args.pkl`` and ``model_best.pth``, no ``--official-config``) and converted once in this process
(:mod:`sm_eval.checkpoints`), so the workers, local or Ray, load it as any checkpoint.
``--workers 0`` (the default) predicts in this process without Ray; ``--workers N`` starts or joins
a Ray cluster (``--ray-address``, or ``RAY_ADDRESS`` as ``ray job submit`` sets it; else a local
one) and predicts on N workers, each over its own whole shards, with results identical to the
single process to the last bit. Outputs: see :mod:`sm_eval.evaluate`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipelines.storage import StorageError
from sm_eval.checkpoints import OfficialSettings
from sm_eval.evaluate import DEFAULT_ALPHAS, EvalRequest, check_alphas, evaluate
from sm_eval.match import positive_int
from sm_eval.pck import FRAMES, RULES
from sm_eval.report import AVERAGE_LABELS, AVERAGES, frame_label, non_finite_words, percent
from sm_eval.runner import DTYPES, EvalSettings
from sm_model.localizers import LOCALIZERS

log = logging.getLogger("sm_eval")

EPILOG = """\
models (--model, repeatable; --checkpoint is the same option):
  PATH_OR_S3           a checkpoint file or a Ray Train checkpoint directory holding model.pt, of
                       any kind (simplematch, baseline, zero-shot; the checkpoint records it), a
                       released best_model.pth with --official-config, or a released LPMFlow folder
                       (args.pkl and model_best.pth, as its test.py --pretrained takes)
  zero-shot:BACKBONE   a frozen pretrained backbone's last-layer features, no training, no checkpoint:
                       dinov2_vit{s,b,l,g}14[_reg4], ibot_vitb16, resnet18/50/101; final LayerNorm on
                       for ViTs (--set final_norm=false: off); weights from the timm hub, or
                       --backbone-weights FILE (or random)

localizers (--localizer; default: the model's own):
  argmax   nearest neighbour: the best-scoring cell (zero-shot's default)
  dense    soft-argmax over the whole map at temperature beta
  window   argmax, then soft-argmax in a window_size window (SimpleMatch's default)
  kernel   a Gaussian of kernel_sigma cells at the argmax times the scores, then soft-argmax
           (the survey baseline's default: sigma 7, beta 0.04)
  tune them with --set beta=0.04 --set kernel_sigma=5 --set window_size=15

outputs in --out:
  predictions.parquet  per-keypoint records (pair_key, kp_id, category, pred_x/y, gt_x/y,
                       threshold_base, frame, SPair flags, input_size, trg_width/height,
                       threshold_base_resized; a model column with several checkpoints)
  report.json          every number: overall / per category / per flag, per image and per keypoint,
                       in both frames (results.original, results.resized)
  report.md            per-category table at alpha 0.1, alpha table, per-flag table, protocol;
                       every table has both frames side by side
  pck_curve.png        PCK against alpha (a line per category, or per model with several)
  matches/*.png        --matches sample pairs: green lines correct at alpha 0.1, red wrong

protocol: correct when ||pred - gt|| <= alpha * base (--rule '<' for the strict variant); base
from the target: bbox (SPair, AP-10K), img (PF-PASCAL), bbox-kp (PF-WILLOW, real keypoints only);
both frames: original-image pixels, and the resized S x S input of the paper and the survey
(compare published numbers with the resized rows, per image). AP-10K: --split test, test_cross_species or
test_cross_family. A checkpoint trained on one dataset evaluates on another's shards as is.

exit status: 0 done, 1 the data or a checkpoint is unusable (the message names the file), 2 usage,
or an S3 store that cannot be used (no such bucket, credentials, endpoint: the message names it)."""


def parse_alphas(text: str) -> tuple[float, ...]:
    """``"0.01,0.05,0.1"`` -> ``(0.01, 0.05, 0.1)``; each must be a positive number of at most 1
    (:func:`~sm_eval.evaluate.check_alphas`), no repeats."""
    try:
        alphas = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas must be comma-separated numbers, got {text!r}") from None
    try:
        check_alphas(alphas)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return alphas


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sm_eval",
        description="PCK of one or more models (checkpoints of any kind, or zero-shot features) on a split of a shard set.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to evaluate")
    what.add_argument(
        "--model", "--checkpoint", dest="models", action="append", required=True, metavar="PATH_OR_S3|zero-shot:NAME",
        help="a save_checkpoint file or a (Ray Train) checkpoint directory holding model.pt (any kind), a released "
        "best_model.pth (with --official-config) or LPMFlow folder (args.pkl, model_best.pth), local or s3://; "
        "or zero-shot:BACKBONE (below). Repeat to "
        "compare models on the same pairs",
    )  # fmt: skip
    what.add_argument(
        "--shards", required=True, metavar="DIR_OR_S3", help="a shard directory written by pipelines.shard"
    )
    what.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    what.add_argument(
        "--official-config", action="append", metavar="YAML",
        help="for a released best_model.pth: the training config of its backbone and size (e.g. "
        "configs/dinov2_vitb14_448_spair.yaml), whose model section gives image size and windows; the model "
        "predicts in the official pixel convention and resizes as the official code. One for all released "
        "checkpoints, or one each in the order of --checkpoint",
    )  # fmt: skip
    what.add_argument(
        "--backbone-weights", metavar="PATH",
        help="for a released DINOv2 LoRA checkpoint: the frozen backbone's pretrained file, e.g. "
        "dinov2_vitb14_pretrain.pth (default: the config's weights); for zero-shot models: their backbone's "
        "weights file (default: the timm hub; 'random': untrained, for smoke tests). Read once here, not by the workers",
    )  # fmt: skip
    what.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint (else AWS_ENDPOINT_URL or AWS)")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--alphas", type=parse_alphas, default=DEFAULT_ALPHAS, metavar="A,B,...",
        help=f"PCK thresholds as fractions of the base (default: {','.join(map(str, DEFAULT_ALPHAS))})",
    )  # fmt: skip
    protocol.add_argument("--rule", choices=RULES, default="<=", help="hit rule: '<=' (default) or strict '<'")
    protocol.add_argument(
        "--frame", choices=FRAMES, default="original",
        help="frame of pck_curve.png and of the match pictures' colours: original-image pixels (default) or "
        "the resized S x S input; report.json, report.md and the printed summary always give both frames",
    )  # fmt: skip

    compute = parser.add_argument_group("compute")
    compute.add_argument(
        "--workers", type=_count, default=0, metavar="N",
        help="0: predict in this process without Ray (default); N: on N Ray workers, each over whole shards",
    )  # fmt: skip
    compute.add_argument(
        "--gpus-per-worker", type=float, metavar="G",
        help="GPUs per Ray worker (default: 1 when the cluster has GPUs, else 0)",
    )  # fmt: skip
    compute.add_argument(
        "--cpus-per-worker", type=float, metavar="C", help="CPUs Ray reserves per worker (default: --threads)"
    )
    compute.add_argument(
        "--ray-address", metavar="ADDR",
        help="Ray cluster to join (default: RAY_ADDRESS, else the latest one started on this machine, else a new one)",
    )  # fmt: skip
    compute.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="device with --workers 0 (default: cuda when available); Ray workers use cuda when given GPUs",
    )  # fmt: skip
    compute.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (default: float32)")
    compute.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="B", help="pairs per batch (default: %(default)s)"
    )
    compute.add_argument(
        "--image-size", type=positive_int, metavar="S",
        help="network input side (default: the checkpoint's; a multiple of the patch size for ViTs)",
    )  # fmt: skip
    compute.add_argument(
        "--localizer", choices=LOCALIZERS,
        help="how score maps become points, for every model (default: each model's own; see below)",
    )  # fmt: skip
    compute.add_argument(
        "--set", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
        help="replace a model config field for every model, e.g. beta=0.04, kernel_sigma=5, window_size=15 "
        "(run-time fields; for zero-shot models any field, e.g. final_norm=false). Repeatable",
    )  # fmt: skip
    compute.add_argument(
        "--loader-workers", type=_count, default=2, metavar="P",
        help="decoding processes per worker (default: %(default)s; 0 decodes in the worker itself)",
    )  # fmt: skip
    compute.add_argument(
        "--threads", type=positive_int, default=4, metavar="T",
        help="torch CPU threads in every worker and in this process (default: %(default)s); keep it fixed "
        "to get bit-identical results for any --workers",
    )  # fmt: skip

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out", default="eval-out", metavar="DIR_OR_S3", help="output directory (default: %(default)s)"
    )
    output.add_argument(
        "--matches", type=_count, default=8, metavar="K", help="pairs drawn into matches/ (default: %(default)s)"
    )
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def request_from_args(args: argparse.Namespace) -> EvalRequest:
    settings = EvalSettings(
        batch_size=args.batch_size,
        loader_workers=args.loader_workers,
        threads=args.threads,
        dtype=args.dtype,
        image_size=args.image_size,
        localizer=args.localizer,
        model_options=tuple(args.model_options),
    )
    return EvalRequest(
        checkpoints=tuple(args.models),
        shards=args.shards,
        out=args.out,
        split=args.split,
        alphas=args.alphas,
        rule=args.rule,
        frame=args.frame,
        settings=settings,
        device=args.device,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        matches=args.matches,
        endpoint_url=args.s3_endpoint_url,
        progress=not args.no_progress,
        official=OfficialSettings(tuple(args.official_config or ()), args.backbone_weights),
    )


def summary_lines(report: dict) -> list[str]:
    """The overall PCK of each model at each alpha in both frames, as printed at the end of a run."""
    alphas = report["alphas"]
    header = f"{'model':<24} {'frame':<16} {'average':<13} "
    lines = [header + " ".join(f"{'PCK@' + format(a, 'g'):>9}" for a in alphas)]
    for model in report["models"]:
        for frame in FRAMES:
            label = frame_label(frame, model["image_size"])
            for average in AVERAGES:
                values = " ".join(f"{percent(v):>9}" for v in model["results"][frame]["overall"][average])
                lines.append(f"{model['name']:<24} {label:<16} {AVERAGE_LABELS[average]:<13} {values}")
    for model in report["models"]:
        if model.get("non_finite_predictions"):
            lines.append(f"{model['name']}: {non_finite_words(model['non_finite_predictions'], report['data']['keypoints'])}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        request = request_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        if request.workers > 0:
            import ray

            ray.init(address=args.ray_address, log_to_driver=True)
        report = evaluate(request)
    except StorageError as error:  # no bucket, credentials refused, endpoint unreachable: the setup, not the data
        print(f"sm_eval: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as error:  # OSError: e.g. --out cannot be written
        log.error("%s", error)
        print(f"sm_eval: error: {error}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(report)))
    protocol = report["protocol"]
    print(f"protocol: {protocol['correct_when']}; compare with the paper: {protocol['compare_with_paper']}")
    print(f"outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
