"""Write tests/fixtures/legacy/: checkpoints and flat YAML configs as the code BEFORE the model
config / checkpoint refactor wrote and read them, for a test that they still load afterwards.

Run it against the OLD tree, not against a refactored one: check out the old commit in a worktree
and let that worktree's packages win over the editable install::

    git -C /work/main worktree add /work/wt-base <old commit>
    cd /work/wt-base && PYTHONPATH=/work/wt-base /work/main/.venv/bin/python \\
        /work/main/tools/write_legacy_fixtures.py --out /work/main/tests/fixtures/legacy

(the script prints where ``sm_model`` was imported from and refuses a tree without
``sm_model/checkpoint.py``'s ``save_checkpoint``). ``--verify DIR`` only reloads ``DIR/simplematch.pt``
as the test must (``torch.manual_seed(0)`` right before ``load_model``) and compares with
``DIR/simplematch_expected.pt``; run it in a fresh process to check the outputs are reproducible.

Files written (all with today's ``sm_model.checkpoint.save_checkpoint``, format ``simplematch-v1``,
``trainable_only=True``; the frozen backbones have random weights, ``weights: null``):

- ``simplematch.pt``: kind simplematch, dinov2_vits14, image_size 28, frozen, decoder_channels 16,
  decoder_dropout 0.1, window_size 5, single scale; built under ``torch.manual_seed(0)``; holds
  the decoder only, its BatchNorm running statistics moved off their initial values by two
  training-mode forward passes (no gradient step) so that losing them would show.
- ``simplematch_expected.pt``: the fixed inputs (``src``, ``trg``, ``src_kps``, ``valid``) and, per
  scale ``i``, ``points_i``, ``scores_i``, ``stride_i`` of ``load_model("simplematch.pt")`` in eval
  mode, loaded right after ``torch.manual_seed(0)`` (which rebuilds the same random backbone).
- ``baseline.pt``: kind baseline, dinov2_vits14, image_size 28, frozen, final_norm, loss_temperature
  0.05, target_window 5 (frozen: its trainable-only state dict is empty; the config is the fixture).
- ``zero_shot.pt``: ``zero_shot_config("zero-shot:dinov2_vits14", weights=None, image_size=28)``
  (empty state dict as well).
- ``demo.yaml``, ``baseline_demo.yaml``: the tree's ``configs/`` files, unchanged.
- ``README.md``: the above, with the commit of the tree.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import sm_model
from sm_model.checkpoint import load_model, read_checkpoint, save_checkpoint
from sm_model.config import ModelConfig
from sm_model.registry import build_model, zero_shot_config

TREE = Path(sm_model.__file__).resolve().parents[1]
CONFIGS = ("demo.yaml", "baseline_demo.yaml")
SIZE_LIMIT = 200_000

SIMPLEMATCH = ModelConfig(
    kind="simplematch",
    backbone="dinov2_vits14",
    weights=None,
    image_size=28,
    finetune="frozen",
    decoder_channels=16,
    decoder_dropout=0.1,
    window_size=5,
    multiscale=False,
)
BASELINE = ModelConfig(
    kind="baseline",
    backbone="dinov2_vits14",
    weights=None,
    image_size=28,
    finetune="frozen",
    final_norm=True,
    loss_temperature=0.05,
    target_window=5,
)


def fixed_inputs() -> dict[str, torch.Tensor]:
    """The inputs of ``simplematch_expected.pt``: src, trg ``[1, 3, 28, 28]`` (randn under seed 1),
    three source keypoints in input pixels (one on the right border, one on the top), all valid."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1)
    src = torch.randn(1, 3, 28, 28)
    trg = torch.randn(1, 3, 28, 28)
    torch.random.set_rng_state(generator_state)
    src_kps = torch.tensor([[[3.0, 4.0], [10.5, 20.0], [27.0, 0.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    return {"src": src, "trg": trg, "src_kps": src_kps, "valid": valid}


@torch.no_grad()
def outputs_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.eval()
    matches = model(inputs["src"], inputs["trg"], inputs["src_kps"], inputs["valid"])
    expected: dict[str, torch.Tensor] = {}
    for i, scale in enumerate(matches):
        expected[f"points_{i}"] = scale.points.detach().clone()
        expected[f"scores_{i}"] = scale.scores.detach().clone()
        expected[f"stride_{i}"] = torch.tensor(float(scale.stride), dtype=torch.float64)
    return expected


def reload_outputs(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the test does: seed 0 right before ``load_model`` (the random frozen backbone is
    rebuilt from the RNG, as when the checkpoint was written), then eval-mode outputs."""
    torch.manual_seed(0)
    model = load_model(path)
    return outputs_of(model, inputs)


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    simplematch = build_model(SIMPLEMATCH)
    # Move the decoder's BatchNorm running statistics off their init (mean 0, var 1): two
    # training-mode passes without a gradient step; the frozen ViT has no running statistics.
    simplematch.train()
    with torch.no_grad():
        for _ in range(2):
            batch = torch.randn(2, 3, 28, 28)
            simplematch(batch[:1], batch[1:], torch.tensor([[[5.0, 5.0]]]), torch.ones(1, 1, dtype=torch.bool))
    save_checkpoint(simplematch, out / "simplematch.pt", trainable_only=True)

    inputs = fixed_inputs()
    in_memory = outputs_of(simplematch, inputs)
    reloaded = reload_outputs(out / "simplematch.pt", inputs)
    for key, value in in_memory.items():
        if not torch.equal(value, reloaded[key]):
            raise SystemExit(f"reloaded simplematch.pt differs from the model it was saved from in {key}")
    torch.save({**inputs, **reloaded}, out / "simplematch_expected.pt")

    torch.manual_seed(0)
    save_checkpoint(build_model(BASELINE), out / "baseline.pt", trainable_only=True)
    torch.manual_seed(0)
    zero_shot = zero_shot_config("zero-shot:dinov2_vits14", weights=None, image_size=28)
    save_checkpoint(build_model(zero_shot), out / "zero_shot.pt", trainable_only=True)

    for name in CONFIGS:
        shutil.copyfile(TREE / "configs" / name, out / name)

    for name in ("simplematch.pt", "baseline.pt", "zero_shot.pt"):
        checkpoint = read_checkpoint(out / name)
        print(f"{name}: kind {checkpoint['config']['kind']}, {len(checkpoint['state_dict'])} tensors")
    for path in sorted(out.iterdir()):
        size = path.stat().st_size
        if path.suffix == ".pt" and size > SIZE_LIMIT:
            raise SystemExit(f"{path} is {size} bytes, over {SIZE_LIMIT}")
    write_readme(out)


def tree_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(TREE), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(TREE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git tree)"
    return commit + (" (with uncommitted changes)" if dirty else "")


def write_readme(out: Path) -> None:
    (out / "README.md").write_text(
        "# Legacy fixtures: checkpoints and flat configs of the code before the config/checkpoint refactor\n\n"
        f"Written at commit {tree_commit()} by `tools/write_legacy_fixtures.py` (run against that tree; see its docstring).\n"
        "- `simplematch.pt`, `baseline.pt`, `zero_shot.pt`: `simplematch-v1` checkpoints (`save_checkpoint(..., trainable_only=True)`, "
        "random frozen dinov2_vits14 backbones at 28 px, `weights: null`), one per model kind, with non-default kind-specific fields; "
        "baseline and zero-shot are frozen, so their state dicts are empty and only the config is tested.\n"
        "- `simplematch_expected.pt`: inputs `src`, `trg`, `src_kps`, `valid` and per scale `points_i`, `scores_i`, `stride_i` of "
        f'`load_model("simplematch.pt")` in eval mode; call `torch.manual_seed(0)` right before `load_model` (the random backbone '
        f"is rebuilt from the RNG: backbone first, then decoder). Written with {torch.get_num_threads()} torch threads: bit-identical across processes at that count, "
        "off by a few 1e-6 at another, so compare with a tolerance (e.g. atol 1e-4).\n"
        "- `demo.yaml`, `baseline_demo.yaml`: `configs/` of that commit, unchanged (the flat `model:` section as it was read then).\n"
    )


def verify(out: Path) -> int:
    expected = torch.load(out / "simplematch_expected.pt", weights_only=True)
    inputs = {key: expected[key] for key in ("src", "trg", "src_kps", "valid")}
    found = reload_outputs(out / "simplematch.pt", inputs)
    differing = [key for key, value in found.items() if not torch.equal(value, expected[key])]
    worst = max((float((found[k] - expected[k]).abs().max()) for k in found), default=0.0)
    print(
        f"threads {torch.get_num_threads()}: {len(found)} tensors, bit-identical: {not differing}, max |diff| {worst:.3g}"
    )
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/legacy"), help="directory to write into")
    parser.add_argument(
        "--verify", type=Path, metavar="DIR", help="only check DIR/simplematch_expected.pt against a reload"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"sm_model from {sm_model.__file__}", file=sys.stderr)
    if args.verify:
        return verify(args.verify)
    write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
