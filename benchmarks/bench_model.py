"""SimpleMatch training memory and inference speed, each beside its baseline in one run; with
``--kind vitsc`` or ``--kind lpmflow``, ViTSC's or LPMFlow's beside SimpleMatch's.

    .venv/bin/python benchmarks/bench_model.py [--quick] [--device cpu|cuda] [--dtype float32|bfloat16]
    .venv/bin/python benchmarks/bench_model.py --kind vitsc|lpmflow [--quick] [--device cpu|cuda] [--dtype ...]

Random weights throughout (``weights=None``); the official DINOv2 ViT-B/14 LoRA config.

1. Peak memory of one training step (forward + loss + backward) at ``--size`` 252, batch 4,
   20 keypoints, in these modes:

   - ``dense``: every source position's feature against the whole target map (a full
     ``[B, h*w, h*w]`` correlation at 1/4) and a dense soft-argmax for every source position (a
     dense flow field, as a dense-correspondence baseline computes), whose keypoint rows are then
     taken;
   - ``dense-rows`` (for reference): the same correlation, the dense soft-argmax on the keypoint
     rows only;
   - ``window``: the same correlation, the keypoint rows taken, window localization;
   - ``window+sparse``: keypoint features only, window localization (the real model);
   - ``no-matching`` (the floor): backbone and decoder as in training, then a loss that reads the
     source keypoint features and every cell of the target map linearly, with no correlation or
     localization at all. Any matching scheme on this decoder needs at least this much, so
     ``no-matching / dense`` bounds the ratio any ``window+sparse`` implementation can reach.

   Each mode runs in a fresh process. On the CPU the figure is the peak RSS of the process during
   the step (``VmHWM`` of ``/proc/self/status``, reset at the step's start through
   ``/proc/self/clear_refs``) minus its RSS once the model and inputs are built, i.e. the
   activations, gradients and allocator overhead of the step; with CUDA also
   ``torch.cuda.max_memory_allocated`` minus the allocation before the step. Goal:
   ``window+sparse`` at most 0.49 of ``dense``.
2. Inference pairs/s of the full model against the backbone alone on the same inputs (eval, no
   grad, warm-up runs, median of timed runs), and the forward FLOPs of each (matmuls and
   convolutions, ``torch.utils.flop_counter``), which do not depend on the machine. Goal:
   full-model rate at least 0.8 of the backbone's. Backbone FLOPs / full FLOPs bounds that ratio
   for an implementation as efficient on convolutions as on the ViT's matmuls, so the run also
   prints the forward FLOPs of the full model per decoder width (meta device, nothing computed).
3. With ``--device cuda``: the same at 252 and 448; add ``--dtype bfloat16`` for bfloat16 autocast.

``--kind vitsc`` or ``--kind lpmflow`` (instead of 1-3): the kind beside SimpleMatch (the
released ViT-B/14 LoRA config) at 252, each row in a fresh process, its inputs (images and
keypoints) at the side the model takes (``model.input_spec.size``):

- ``vitsc``: ViTSC (the paper's architecture: DINOv2-B/14, last 4 blocks trainable, final
  LayerNorm, one cross-perception layer, the C_low-guided upsampler) at 224 and 448;
  ``--quick``: ViT-S/14 at 56 and 112;
- ``lpmflow``: LPMFlow (``ModelConfig.of_kind("lpmflow")``, the released architecture: iBOT
  ViT-B/16 at 256, fully fine-tuned) taking its 512 input frame, which the network resizes to 256
  itself; ``--quick``: ``configs/lpmflow_demo.yaml``'s model (DINOv2 ViT-S/14 at 56 taking 128).
  The poster's figures (178.9M parameters, 85.7 ms per pair, i.e. 11.7 pairs/s, and 3.8 GB on a
  TITAN RTX) are printed on their own line under its row, as figures of other hardware, not
  compared by ratio.

For each row: the peak memory of one inference forward (eval, no grad) and of one training step
(forward + the kind's loss + backward), both in MiB above the built model and its inputs (the CPU
resident set as in 1., measured from one RSS taken once the model is built, and with CUDA
``torch.cuda.max_memory_allocated``); the inference pairs/s and forward GFLOPs per pair (as in 2.);
the parameters in millions (all of them, trained or frozen). ``--quick``: beside the quick
SimpleMatch at 56, batch 2. The run ends with one JSON line: the run's setting, then
``<kind>_<input side>_<figure>`` for every row (``params_m``, ``cpu_forward_peak_mib``,
``cpu_step_peak_mib``, with CUDA ``cuda_forward_peak_mib`` and ``cuda_step_peak_mib``,
``gflops_per_pair``, ``pairs_per_s``), and the load average.

In the dense modes a keypoint's row is the 1/4 cell nearest to it (the model itself samples
bilinearly). ``--size``/``--batch`` change the memory setting (e.g. ``--size 448 --batch 2
--only memory``): the correlation grows as (S/4)^4, the decoder's activations as (S/4)^2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from sm_model.config import ModelConfig, load_yaml
from sm_model.inputs import InputSpec
from sm_model.localizers import dense_soft_argmax, window_soft_argmax
from sm_model.loss import keypoint_loss
from sm_model.matching import cosine_similarity, sample_keypoint_features
from sm_model.pixels import cells_to_pixels, pixels_to_cells
from sm_model.registry import build_model
from sm_model.simplematch import SimpleMatchOptions
from sm_model.simplematch.model import SimpleMatch

MEMORY_MODES = ("dense", "dense-rows", "window", "window+sparse", "no-matching")
DECODER_WIDTHS = (768, 512, 384, 256, 128)


@dataclass(frozen=True)
class Setup:
    """What every measurement builds: model config, batch size, keypoints per pair, device, dtype."""

    config: ModelConfig
    batch: int
    keypoints: int
    device: str
    dtype: str

    def inputs(self, image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Random ``src``, ``trg`` ``[B, 3, S, S]``, keypoints and targets ``[B, K, 2]``, all-valid mask."""
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(2, self.batch, 3, image_size, image_size, generator=generator)
        points = torch.rand(2, self.batch, self.keypoints, 2, generator=generator) * (image_size - 1)
        valid = torch.ones(self.batch, self.keypoints, dtype=torch.bool)
        src, trg = images.to(self.device)
        src_kps, trg_kps = points.to(self.device)
        return src, trg, src_kps, trg_kps, valid.to(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=getattr(torch, self.dtype))


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _keypoint_rows(src_kps: Tensor, side: int, stride: float) -> Tensor:
    """Flat index ``[B, K]`` of the 1/4 cell nearest to each keypoint."""
    cells = pixels_to_cells(src_kps, stride).round().clamp(0, side - 1).long()
    return cells[..., 1] * side + cells[..., 0]


def _dense_predictions(model: SimpleMatch, mode: str, src: Tensor, trg: Tensor, src_kps: Tensor) -> Tensor:
    """Keypoint predictions ``[B, K, 2]`` (input pixels) through the full ``[B, h*w, h*w]`` correlation."""
    features = model.backbone(torch.cat([src, trg]))
    fine = model.decoder(features, src.shape[-1])[-1]
    src_map, trg_map = fine.features.chunk(2)
    side = src_map.shape[-1]
    scores = cosine_similarity(src_map.flatten(2).transpose(1, 2), trg_map)  # [B, h*w, h, w]
    rows = _keypoint_rows(src_kps, side, fine.stride)  # [B, K]
    if mode == "dense":
        flow = dense_soft_argmax(scores, model.config.beta)  # [B, h*w, 2]
        cells = flow.gather(1, rows.unsqueeze(-1).expand(-1, -1, 2))
    else:
        keypoint_scores = scores.gather(1, rows[..., None, None].expand(-1, -1, side, side))  # [B, K, h, w]
        if mode == "dense-rows":
            cells = dense_soft_argmax(keypoint_scores, model.config.beta)
        else:
            cells = window_soft_argmax(keypoint_scores, model.config.window_size, model.config.beta)
    return cells_to_pixels(cells, fine.stride)


def _floor_loss(model: SimpleMatch, src: Tensor, trg: Tensor, src_kps: Tensor, valid: Tensor) -> Tensor:
    """Backbone + decoder as in training, then a bilinear read of the source keypoint features
    against the mean target feature: every activation a matcher needs, no matching memory."""
    features = model.backbone(torch.cat([src, trg]))
    fine = model.decoder(features, src.shape[-1])[-1]
    src_map, trg_map = fine.features.chunk(2)
    keypoint_features = sample_keypoint_features(src_map, src_kps, fine.stride, model.config.keypoint_sampling)
    target_mean = trg_map.float().mean(dim=(2, 3))  # [B, C]
    return (keypoint_features.float() * target_mean.unsqueeze(1))[valid].sum()


def measure_memory(setup: Setup, mode: str) -> dict[str, float]:
    """One training step in ``mode`` in this process; memory figures in MiB."""
    torch.manual_seed(0)
    model = SimpleMatch(setup.config).to(setup.device).train()
    src, trg, src_kps, trg_kps, valid = setup.inputs(setup.config.image_size)

    def step_loss() -> Tensor:
        if mode == "window+sparse":
            return model.loss(model(src, trg, src_kps, valid), trg_kps, valid)
        if mode == "no-matching":
            return _floor_loss(model, src, trg, src_kps, valid)
        return keypoint_loss(_dense_predictions(model, mode, src, trg, src_kps), trg_kps, valid)

    return step_peak(setup, step_loss)


def _reset_peak_rss() -> None:
    """Start the resident set's high-water mark (``VmHWM``) afresh at the RSS now (Linux 4.0 and
    later); where ``/proc/self/clear_refs`` cannot be written the mark keeps the process's peak so far."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_rss_bytes() -> int:
    """The resident set's high-water mark since :func:`_reset_peak_rss` (``ru_maxrss`` without ``/proc``)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory(
    setup: Setup, run: Callable[[], object], name: str, baseline_rss: int | None = None
) -> dict[str, float]:
    """Peak memory in MiB of ``run()``: ``cpu_{name}_peak_mib``, the resident set's high-water mark
    during the call above ``baseline_rss`` (default: the RSS now), and with CUDA
    ``cuda_{name}_peak_mib``, ``torch.cuda.max_memory_allocated`` during the call above the allocation now."""
    if baseline_rss is None:
        baseline_rss = _current_rss_bytes()
    _reset_peak_rss()
    if setup.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    run()
    result = {f"cpu_{name}_peak_mib": (_peak_rss_bytes() - baseline_rss) / 2**20}
    if setup.device == "cuda":
        torch.cuda.synchronize()
        result[f"cuda_{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
    return result


def step_peak(setup: Setup, step_loss: Callable[[], Tensor], baseline_rss: int | None = None) -> dict[str, float]:
    """:func:`peak_memory` (``step``) of ``step_loss()`` under the setup's autocast and its backward:
    ``cpu_step_peak_mib`` (resident set) and ``cuda_step_peak_mib``."""

    def step() -> None:
        with setup.autocast():
            loss = step_loss()
        loss.backward()

    return peak_memory(setup, step, "step", baseline_rss)


def _in_subprocess(*options: str) -> dict[str, float]:
    """The last line of this script, run in a fresh interpreter with this run's options and
    ``options``, read as JSON; its stderr shown if it fails."""
    command = [sys.executable, __file__, *sys.argv[1:], *options]
    completed = subprocess.run(command, check=False, capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr)
        raise subprocess.CalledProcessError(completed.returncode, command, completed.stdout, completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _memory_in_subprocess(mode: str) -> dict[str, float]:
    """:func:`measure_memory` in a fresh interpreter with this run's options."""
    return _in_subprocess("--measure-memory", mode)


def _median_seconds(step, warmup: int, repeats: int, device: str) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_inference(setup: Setup, image_size: int, warmup: int, repeats: int) -> dict[str, float]:
    """Pairs/s and forward FLOPs (matmuls and convolutions, ``torch.utils.flop_counter``) of the
    full model and of the backbone alone on the same ``2B`` images."""
    torch.manual_seed(0)
    model = SimpleMatch(setup.config).to(setup.device).eval()
    src, trg, src_kps, _, valid = setup.inputs(image_size)
    images = torch.cat([src, trg])

    def full() -> None:
        with torch.no_grad(), setup.autocast():
            model(src, trg, src_kps, valid)

    def backbone() -> None:
        with torch.no_grad(), setup.autocast():
            model.backbone(images)

    result = {}
    for name, step in (("full", full), ("backbone", backbone)):
        result[f"{name}_gflops"] = _gflops(step)
        result[f"{name}_pairs_per_s"] = setup.batch / _median_seconds(step, warmup, repeats, setup.device)
    return result


def _gflops(step: Callable[[], object]) -> float:
    """Forward GFLOPs (matmuls and convolutions) of one call of ``step``."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def flops_per_width(config: ModelConfig, keypoints: int) -> list[tuple[int, float, float]]:
    """``(decoder width, full-model GFLOPs, backbone GFLOPs)`` of one pair's forward at
    ``config.image_size`` for each of :data:`DECODER_WIDTHS`, on the meta device."""
    side = config.image_size
    rows = []
    for width in DECODER_WIDTHS:
        with torch.device("meta"):
            model = SimpleMatch(dataclasses.replace(config, options=dataclasses.replace(config.options, decoder_channels=width), weights=None)).eval()
            inputs = (torch.empty(1, 3, side, side), torch.empty(1, 3, side, side), torch.empty(1, keypoints, 2),
                      torch.ones(1, keypoints, dtype=torch.bool))
        with torch.no_grad():
            full = _gflops(partial(model, *inputs))
            backbone = _gflops(partial(model.backbone, torch.cat(inputs[:2])))
        rows.append((width, full, backbone))
    return rows


KIND_SIZES = {"simplematch": (252,), "vitsc": (224, 448), "lpmflow": (512,)}
"""``--kind``: the input sides measured per kind, the side a pair comes at (the papers' training
sides; ViTSC's 448 is its evaluation at the same weights; LPMFlow takes its 512 frame and resizes
it to its network's 256 itself)."""
QUICK_KIND_SIZES = {"simplematch": (56,), "vitsc": (56, 112), "lpmflow": (128,)}
KIND_TITLES = {"vitsc": "ViTSC", "lpmflow": "LPMFlow"}
"""The kinds ``--kind`` measures beside SimpleMatch."""

LPMFLOW_DEMO = Path(__file__).resolve().parents[1] / "configs" / "lpmflow_demo.yaml"
"""The model ``--kind lpmflow --quick`` measures (DINOv2 ViT-S/14 at 56 taking 128)."""
LPMFLOW_PAPER = {"params_m": 178.9, "ms_per_pair": 85.7, "memory_gb": 3.8, "gpu": "TITAN RTX"}
"""LPMFlow's poster: parameters, inference time per pair and memory on a TITAN RTX."""


def kind_config(kind: str, size: int, quick: bool) -> ModelConfig:
    """The config ``--kind`` measures at input side ``size``, random weights: SimpleMatch's
    released ViT-B/14 LoRA config (the quick one with ``--quick``), ViTSC's paper config
    (ViT-S/14 with ``--quick``), or LPMFlow's released one (iBOT ViT-B/16 at 256, fully
    fine-tuned; ``--quick``: the model of :data:`LPMFLOW_DEMO`, DINOv2 ViT-S/14 at 56), its input
    frame ``lpmflow.input_size`` = ``size``."""
    if kind == "simplematch":
        if quick:
            return ModelConfig(backbone="dinov2_vits14", image_size=size, window_size=7, options=SimpleMatchOptions(decoder_channels=64))
        return ModelConfig(image_size=size)
    if kind == "lpmflow":
        config = ModelConfig.of_kind("lpmflow")
        if quick:
            document = load_yaml(LPMFLOW_DEMO.read_text(), str(LPMFLOW_DEMO))
            config = ModelConfig.from_document(document["model"], str(LPMFLOW_DEMO), "model.")
        if InputSpec.of(config).size == size:
            return config
        return dataclasses.replace(config, options=dataclasses.replace(config.options, input_size=size))
    backbone = "dinov2_vits14" if quick else "dinov2_vitb14"
    return ModelConfig.of_kind("vitsc", backbone=backbone, image_size=size)


def measure_kind(setup: Setup, kind: str, size: int, quick: bool, warmup: int, repeats: int) -> dict[str, float]:
    """In this process, ``kind`` at input side ``size`` (its ``model.input_spec.size``): the peak
    memory of one inference forward (eval, no grad) and of one training step (forward + the kind's
    loss + backward), each in MiB above the built model and its inputs (:func:`peak_memory`), then
    the inference pairs/s and forward GFLOPs per pair, and the parameters in millions."""
    config = kind_config(kind, size, quick)
    torch.manual_seed(0)
    model = build_model(config).to(setup.device).eval()
    side = model.input_spec.size
    if side != size:
        raise ValueError(f"{kind} at {size}: the model takes images at {side}")
    src, trg, src_kps, trg_kps, valid = setup.inputs(side)
    built_rss = _current_rss_bytes()

    def forward() -> None:
        with torch.no_grad(), setup.autocast():
            model(src, trg, src_kps, valid)

    result: dict[str, float] = {"input_size": side, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    result |= peak_memory(setup, forward, "forward", built_rss)
    model.train()
    result |= step_peak(setup, lambda: model.loss(model(src, trg, src_kps, valid), trg_kps, valid), built_rss)
    model.zero_grad(set_to_none=True)
    model.eval()
    result["gflops_per_pair"] = _gflops(forward) / setup.batch
    result["pairs_per_s"] = setup.batch / _median_seconds(forward, warmup, repeats, setup.device)
    return result


def _kind_in_subprocess(kind: str, size: int) -> dict[str, float]:
    """:func:`measure_kind` in a fresh interpreter with this run's options."""
    return _in_subprocess("--measure-kind", f"{kind}:{size}")


def _report_kinds(setup: Setup, kind: str, quick: bool, warmup: int, repeats: int) -> None:
    """The table of ``kind`` beside SimpleMatch (a process per row), LPMFlow's paper figures on
    their own line, then one JSON line with every row's figures."""
    sizes = QUICK_KIND_SIZES if quick else KIND_SIZES
    print(
        f"\n{KIND_TITLES[kind]} beside SimpleMatch, a process per row: peak memory (MiB above the built model and its "
        f"inputs) of one inference forward (eval, no grad) and of one training step (forward + the kind's loss + "
        f"backward), inference pairs/s (median of {repeats} after {warmup} warm-up), forward GFLOPs per pair and "
        f"parameters (millions)"
    )
    devices = ("cpu", "cuda") if setup.device == "cuda" else ("cpu",)
    memory_keys = [f"{device}_{name}_peak_mib" for device in devices for name in ("forward", "step")]
    header = "".join(f"{key:>22}" for key in memory_keys)
    print(f"   {'model':<46}{'input':>6}{header}{'pairs/s':>10}{'GFLOPs':>9}{'params M':>10}")
    figures: dict[str, object] = {
        "kind": kind, "quick": quick, "device": setup.device, "dtype": setup.dtype, "batch": setup.batch,
        "keypoints": setup.keypoints, "threads": torch.get_num_threads(),
    }
    for row_kind in ("simplematch", kind):
        for size in sizes[row_kind]:
            config = kind_config(row_kind, size, quick)
            name = f"{row_kind} ({config.backbone} at {config.image_size}, {config.finetune})"
            r = _kind_in_subprocess(row_kind, size)
            memory = "".join(f"{r[key]:22.1f}" for key in memory_keys)
            rates = f"{r['pairs_per_s']:10.2f}{r['gflops_per_pair']:9.1f}{r['params_m']:10.1f}"
            print(f"   {name:<46}{r['input_size']:6d}{memory}{rates}")
            figures |= {f"{row_kind}_{size}_{key}": value for key, value in r.items() if key != "input_size"}
    if kind == "lpmflow":
        paper = LPMFLOW_PAPER
        print(
            f"   paper (LPMFlow poster, on a {paper['gpu']}: other hardware, not compared): {paper['params_m']}M "
            f"parameters, {paper['ms_per_pair']} ms per pair ({1000 / paper['ms_per_pair']:.1f} pairs/s), "
            f"{paper['memory_gb']} GB memory"
        )
    figures["load_average"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: ViT-S/14 at 56 px, 64 channels, batch 2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype")
    parser.add_argument("--size", type=int, default=252, help="input side (memory; speed too on the CPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--keypoints", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--only", choices=("memory", "speed"), help="run one of the two measurements")
    parser.add_argument(
        "--kind", choices=("simplematch", *KIND_TITLES), default="simplematch",
        help="vitsc: ViTSC at 224 and 448, lpmflow: LPMFlow at 512, beside SimpleMatch at 252 (memory and speed) "
        "instead of 1-3",
    )
    parser.add_argument("--measure-memory", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--measure-kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = ModelConfig(image_size=args.size)
    batch, warmup, repeats = args.batch, args.warmup, args.repeats
    if args.quick:
        config = ModelConfig(backbone="dinov2_vits14", image_size=56, window_size=7, options=SimpleMatchOptions(decoder_channels=64))
        batch, warmup, repeats = 2, 1, 2
    setup = Setup(config, batch, args.keypoints, args.device, args.dtype)

    if args.measure_memory:
        print(json.dumps(measure_memory(setup, args.measure_memory)))
        return
    if args.measure_kind:
        kind, _, size = args.measure_kind.partition(":")
        print(json.dumps(measure_kind(setup, kind, int(size), args.quick, warmup, repeats)))
        return
    if args.kind != "simplematch":
        print(f"batch {batch}, {args.keypoints} keypoints, device {args.device}, {args.dtype}, {torch.get_num_threads()} threads")
        _report_kinds(setup, args.kind, args.quick, warmup, repeats)
        return

    print(
        f"backbone {config.backbone} ({config.finetune}), decoder {config.options.decoder_channels} ch, "
        f"window {config.window_size}, batch {batch}, {args.keypoints} keypoints, "
        f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads"
    )
    if args.only != "speed":
        _report_memory(config.image_size)
    if args.only != "memory":
        _report_speed(setup, args.quick, warmup, repeats)


def _report_memory(image_size: int) -> None:
    print(f"\n1. training-step peak memory at {image_size} px, MiB above the built model (a process per mode)")
    results = {mode: _memory_in_subprocess(mode) for mode in MEMORY_MODES}
    for key in results["dense"]:
        dense = results["dense"][key]
        print(f"   {key}:")
        for mode in MEMORY_MODES:
            print(f"     {mode:<14} {results[mode][key]:9.1f}   {results[mode][key] / dense:5.2f} x dense")
    print("   goal: window+sparse <= 0.49 x dense")
    floor = results["no-matching"]["cpu_step_peak_mib"] / results["dense"]["cpu_step_peak_mib"]
    print(f"   bound: no matching at all already takes {floor:4.2f} x dense (backbone + decoder activations)")


def _report_speed(setup: Setup, quick: bool, warmup: int, repeats: int) -> None:
    config = setup.config
    sizes = [config.image_size] if quick or setup.device == "cpu" else [252, 448]
    print(f"\n2. inference, eval, no grad: pairs/s (median of {repeats} after {warmup} warm-up), GFLOPs per batch")
    for image_size in sizes:
        r = measure_inference(setup, image_size, warmup, repeats)
        rate_ratio = r["full_pairs_per_s"] / r["backbone_pairs_per_s"]
        flop_ratio = r["full_gflops"] / r["backbone_gflops"]
        print(f"   {image_size} px")
        print(f"     full model {r['full_pairs_per_s']:8.2f} pairs/s {r['full_gflops']:9.1f} GFLOPs")
        print(f"     backbone   {r['backbone_pairs_per_s']:8.2f} pairs/s {r['backbone_gflops']:9.1f} GFLOPs")
        print(f"     full / backbone: rate {rate_ratio:4.2f} (goal >= 0.8), FLOPs {flop_ratio:4.2f}")
        print(f"     FLOP-bound ceiling of the rate ratio: {1 / flop_ratio:4.2f}")
    print(f"\n   forward GFLOPs per pair at {config.image_size} px by decoder width (meta device)")
    print("     width   full  backbone  backbone/full")
    for width, full_gflops, backbone_gflops in flops_per_width(config, setup.keypoints):
        official = "  (released model)" if width == 768 else ""
        print(f"     {width:5d} {full_gflops:6.1f} {backbone_gflops:9.1f} {backbone_gflops / full_gflops:14.2f}{official}")


if __name__ == "__main__":
    main()
