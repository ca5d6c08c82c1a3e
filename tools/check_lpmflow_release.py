"""The outside check of LPMFlow (issue 20): the released code, built with random perturbed weights,
saved as a released ``--pretrained`` folder, must predict the keypoints that
``sm_model.released.load_released(folder)`` predicts.

    git -C LPMFlow.git archive 8ac9737 | tar -x -C /tmp/lpmflow-code     # github YXSUNMADMAX/LPMFlow
    pip install --target /tmp/lpm-deps einops                            # the released Swin imports it
    PYTHONPATH=/tmp/lpm-deps .venv/bin/python tools/check_lpmflow_release.py --code /tmp/lpmflow-code

The released side runs exactly as its ``test.py`` does (``transforms.Resize((512, 512))`` of a PIL
image, ``ToTensor``, ImageNet ``Normalize``, ``LPMFlow(source, target)``, ``flow2kps`` on keypoints
scaled ``x * 512 / W``), on the CPU (its hard-coded ``.cuda()`` in ``flow2kps`` is made a no-op);
its 512-frame points are scaled back ``x * W / 512``. This project's side is
``model.predict_matches`` on ``model.prepare`` d images, in original pixels. Pass: at least
``--min-fraction`` of the keypoints agree within ``--tolerance`` original pixels, for a 500 x 375
and a 333 x 500 pair. The same run checks that a folder missing one used ``decoder_s3`` parameter
is refused and that an ``args.pkl`` that would run code is refused without running it. Ends with
one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sm_model.released import load_released

logger = logging.getLogger("check_lpmflow_release")

SIZES = ((500, 375), (333, 500))
"""(W, H) of the source and target images of the two pairs."""
KEYPOINTS = 40
ARGS = {"feature_size": 128, "depth": 6, "num_heads": 8, "mlp_ratio": 4, "benchmark": "spair", "lr": 4e-5}
"""The released ``train.py``'s defaults that ``args.pkl`` holds (a subset)."""


def released_model(code: Path, seed: int, noise: float) -> torch.nn.Module:
    """The released ``LPMFlow`` with random weights (no iBOT file: the backbone is random too),
    every parameter perturbed by Gaussian noise of ``noise`` times its own spread (at least
    ``noise``), the coordinate grids and zero-initialised embeddings included. Replacing each
    tensor also undoes the released encoder's aliased position embeddings."""
    sys.path.insert(0, str(code))
    from models.LPMFlow import LPMFlow as Released

    torch.manual_seed(seed)
    model = Released(freeze=False, ibot_ckp_file=str(code / "no-ibot-checkpoint.pth"))
    with torch.no_grad():
        for parameter in model.parameters():
            spread = max(float(parameter.std()) if parameter.numel() > 1 else 0.0, 1.0)
            parameter.data = parameter.data + noise * spread * torch.randn_like(parameter)
    return model.eval()


def save_folder(model: torch.nn.Module, folder: Path) -> None:
    """``args.pkl`` (an ``argparse.Namespace``) and ``model_best.pth`` as the released ``train.py`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "args.pkl", "wb") as file:
        pickle.dump(argparse.Namespace(**ARGS), file)
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "best_loss": 0.0}, folder / "model_best.pth")


def random_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random RGB image (low-frequency noise upsampled), uint8 ``(H, W, 3)``."""
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def released_points(
    code: Path, model: torch.nn.Module, src: np.ndarray, trg: np.ndarray, src_kps: np.ndarray
) -> np.ndarray:
    """The released evaluation's target points of ``src_kps`` ``[N, 2]`` (original source pixels),
    in original target pixels."""
    from torchvision import transforms
    from utils_training.utils import flow2kps

    side = 512
    transform = transforms.Compose(
        [
            transforms.Resize((side, side)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    (src_h, src_w), (trg_h, trg_w) = src.shape[:2], trg.shape[:2]
    kps = torch.from_numpy(src_kps).float().t()  # [2, N] as the released loader holds them
    kps = torch.stack([kps[0] * (side / src_w), kps[1] * (side / src_h)])
    with torch.no_grad():
        flow, *_ = model(transform(Image.fromarray(src))[None], transform(Image.fromarray(trg))[None])
        with _cuda_is_identity():
            points = flow2kps(kps[None], flow, torch.tensor([len(src_kps)]))[0].t()  # [N, 2] in the 512 frame
    return (points * torch.tensor([trg_w / side, trg_h / side])).numpy()


@contextlib.contextmanager
def _cuda_is_identity():
    """The released ``flow2kps`` pads with ``torch.ones(...).cuda()``; on the CPU that tensor stays."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def our_points(model: torch.nn.Module, src: np.ndarray, trg: np.ndarray, src_kps: np.ndarray) -> np.ndarray:
    """This project's target points of ``src_kps`` in original target pixels."""
    size = lambda image: torch.tensor([[image.shape[1], image.shape[0]]])  # noqa: E731
    prediction = model.predict_matches(
        model.prepare(src)[None],
        model.prepare(trg)[None],
        torch.from_numpy(src_kps).float()[None],
        torch.ones(1, len(src_kps), dtype=torch.bool),
        size(src),
        size(trg),
    )
    return prediction.points[0].numpy()


def refusals(folder: Path, work: Path) -> dict[str, bool]:
    """Whether a folder without one used ``decoder_s3`` parameter and one whose ``args.pkl`` would
    run code are refused (and the code did not run)."""
    state = torch.load(folder / "model_best.pth", weights_only=True)
    missing = work / "missing"
    missing.mkdir()
    (missing / "args.pkl").write_bytes((folder / "args.pkl").read_bytes())
    key = "decoder_s3.last_block.0.cattn.qkv.weight"
    del state["state_dict"][key]
    torch.save(state, missing / "model_best.pth")
    try:
        load_released(missing)
        missing_refused = False
    except ValueError as error:
        logger.info("missing %s: %s", key, error)
        missing_refused = key.replace("decoder_s3.last_block.0.", "decoder_fine.") in str(error) or key in str(error)

    marker = work / "code-ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = work / "hostile"
    hostile.mkdir()
    (hostile / "model_best.pth").write_bytes((folder / "model_best.pth").read_bytes())
    with open(hostile / "args.pkl", "wb") as file:
        pickle.dump(Hostile(), file)
    try:
        load_released(hostile)
        hostile_refused = False
    except ValueError as error:
        logger.info("hostile args.pkl: %s", error)
        hostile_refused = True
    return {
        "missing_decoder_s3_refused": missing_refused,
        "hostile_args_refused": hostile_refused,
        "hostile_code_ran": marker.exists(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", type=Path, required=True, help="a checkout of github YXSUNMADMAX/LPMFlow at 8ac9737")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.02, help="perturbation, relative to each parameter's spread")
    parser.add_argument("--tolerance", type=float, default=0.05, help="original pixels")
    parser.add_argument("--min-fraction", type=float, default=0.98)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_grad_enabled(False)
    released = released_model(args.code.resolve(), args.seed, args.noise)
    rng = np.random.default_rng(args.seed)
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="lpmflow-release-") as work:
        folder = Path(work) / "spair"
        save_folder(released, folder)
        ours = load_released(folder).eval()
        agree = total = 0
        worst = 0.0
        for pair, (src_size, trg_size) in enumerate((SIZES, SIZES[::-1])):
            src, trg = random_image(rng, *src_size), random_image(rng, *trg_size)
            src_kps = rng.uniform(0, 1, size=(KEYPOINTS, 2)) * (np.array(src_size) - 1)
            expected = released_points(args.code.resolve(), released, src, trg, src_kps)
            found = our_points(ours, src, trg, src_kps)
            distance = np.linalg.norm(expected - found, axis=1)
            agree += int((distance <= args.tolerance).sum())
            total += len(distance)
            worst = max(worst, float(distance.max()))
            figures[f"pair{pair}_{src_size[0]}x{src_size[1]}_to_{trg_size[0]}x{trg_size[1]}_median_px"] = float(
                np.median(distance)
            )
            figures[f"pair{pair}_spread_px"] = float(np.ptp(expected, axis=0).max())
            logger.info(
                "pair %d %s -> %s: median %.2e px, max %.2e px",
                pair,
                src_size,
                trg_size,
                np.median(distance),
                distance.max(),
            )
        figures |= {"agree": agree, "keypoints": total, "fraction": agree / total, "max_px": worst}
        figures |= refusals(folder, Path(work))
    passed = (
        figures["fraction"] >= args.min_fraction
        and figures["missing_decoder_s3_refused"]
        and figures["hostile_args_refused"]
        and not figures["hostile_code_ran"]
    )
    figures["passed"] = bool(passed)
    print(json.dumps(figures))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
