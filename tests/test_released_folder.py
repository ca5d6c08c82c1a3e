"""Released LPMFlow folders (``args.pkl`` and ``model_best.pth``, as the official ``test.py
--pretrained`` takes): the restricted unpickler refuses every global but ``argparse.Namespace``
before anything runs, the weights are read with ``weights_only=True``, and the front door and
``sm_eval`` take the folder without ``--official-config`` and build the model it holds (a small
LPMFlow of the released architecture, saved under the released key names)."""

from __future__ import annotations

import argparse
import builtins
import collections
import dataclasses
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.storage import Location
from sm_eval.checkpoints import model_names, open_model, resolve_model
from sm_eval.match import load_match_model
from sm_model.checkpoint import load_model, save_checkpoint
from sm_model.config import ModelConfig
from sm_model.factory import create_model, read_model_file
from sm_model.lpmflow import LpmflowOptions
from sm_model.lpmflow.released import to_released_key
from sm_model.matcher import MatchModel
from sm_model.released import (
    MAX_ARGS_BYTES,
    load_released,
    read_released_args,
    read_released_folder,
    read_released_weights,
)
from sm_model.simplematch import SimpleMatchOptions

ARGS = argparse.Namespace(feature_size=128, depth=6, num_heads=8, mlp_ratio=4, benchmark="spair")
TINY = ModelConfig(
    backbone="dinov2_vits14", image_size=28, window_size=5, options=SimpleMatchOptions(decoder_channels=16)
)


class Hostile:
    """Pickles as a call of ``function(*arguments)``: what a hostile args.pkl holds."""

    def __init__(self, function: Any, *arguments: Any) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.arguments


class Payload:
    """A custom class: ``torch.load(weights_only=True)`` refuses a file that pickles one."""


def _state(prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}encoder.weight": torch.ones(2, 3), f"{prefix}head.bias": torch.arange(4.0)}


def _folder(path: Path, args: Any = ARGS, saved: Any = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "args.pkl").write_bytes(pickle.dumps(args))
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 4e-5, "params": [0]}]}
    scheduler = {"milestones": collections.Counter([100, 150]), "gamma": 0.5, "last_epoch": 3}
    document = {"epoch": 4, "state_dict": _state(), "optimizer": optimizer, "scheduler": scheduler, "best_loss": 51.2}
    torch.save(document if saved is None else saved, path / "model_best.pth")
    return path


# ---- args.pkl ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "subprocess.call"])
def test_a_hostile_args_pickle_is_refused_before_it_runs(tmp_path: Path, protocol: int, how: str) -> None:
    marker = tmp_path / "MARKER"
    payload = {
        "os.system": Hostile(os.system, f"touch {marker}"),
        "builtins.exec": Hostile(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Hostile(subprocess.call, ["touch", str(marker)]),
    }[how]
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    refused = r"names \w+\.(system|exec|call): refused, a pickle naming other code could run"
    with pytest.raises(ValueError, match=rf"{path} {refused}"):
        read_released_args(path)
    # Inside a Namespace, and through the folder and the front door: refused all the same.
    _folder(tmp_path / "spair", args=argparse.Namespace(feature_size=128, hook=payload))
    with pytest.raises(ValueError, match=refused):
        read_model_file(tmp_path / "spair")
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, refused",
    [
        (collections.OrderedDict(depth=6), "collections.OrderedDict"),
        (argparse.Namespace(step=collections.OrderedDict()), "collections.OrderedDict"),
        (argparse.Namespace(size=complex(1, 2)), "builtins.complex"),
    ],
)
def test_any_global_but_namespace_is_refused(tmp_path: Path, value: Any, refused: str) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps(value))
    with pytest.raises(ValueError, match=rf"{path} names {refused}: refused"):
        read_released_args(path)


def test_args_must_be_a_namespace_a_whole_pickle_and_small(tmp_path: Path) -> None:
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps([128, 6, 8]))
    with pytest.raises(ValueError, match=f"{path} holds a list, not the argparse.Namespace of training arguments"):
        read_released_args(path)
    path.write_bytes(pickle.dumps(ARGS)[:-5])
    with pytest.raises(ValueError, match=f"{path} is not a readable pickle"):
        read_released_args(path)
    path.write_bytes(b"\x80\x04" + b" " * MAX_ARGS_BYTES)
    with pytest.raises(ValueError, match=rf"{path} is {MAX_ARGS_BYTES + 2} bytes, more than the {MAX_ARGS_BYTES}"):
        read_released_args(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_genuine_namespace_round_trips(tmp_path: Path, protocol: int) -> None:
    expected = {"feature_size": 128, "depth": 6, "num_heads": 8, "mlp_ratio": 4, "benchmark": "spair"}
    path = tmp_path / "args.pkl"
    path.write_bytes(pickle.dumps(ARGS, protocol=protocol))
    assert read_released_args(path) == expected
    assert read_released_args(path.read_bytes(), "args bytes") == expected
    plain = {"lr": 4e-5, "step": "[100, 150, 250]", "freeze": False, "pretrained": None, "sizes": (1, [2.5])}
    assert read_released_args(pickle.dumps(plain, protocol=protocol)) == plain


# ---- model_best.pth and the folder -------------------------------------------------------------


def test_a_folder_reads_its_args_and_state(tmp_path: Path) -> None:
    args, state = read_released_folder(_folder(tmp_path / "spair"))
    assert args == vars(ARGS)
    assert state.keys() == _state().keys() and torch.equal(state["head.bias"], torch.arange(4.0))


def test_a_folder_names_the_file_it_lacks(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "spair")
    (folder / "model_best.pth").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} holds no model_best.pth: a released LPMFlow folder holds"):
        read_released_folder(folder)
    with pytest.raises(FileNotFoundError, match="holds no model_best.pth"):
        read_model_file(folder)
    folder = _folder(tmp_path / "pfpascal")
    (folder / "args.pkl").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder} holds no args.pkl: a released LPMFlow folder holds"):
        read_released_folder(folder)
    with pytest.raises(FileNotFoundError, match="holds no args.pkl"):
        create_model(folder)


def test_weights_need_a_state_dict_of_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 4, "model": _state()}, path)
    with pytest.raises(ValueError, match=f"{path} holds no 'state_dict' entry"):
        read_released_weights(path)
    torch.save({"state_dict": [torch.ones(1)]}, path)
    with pytest.raises(ValueError, match=f"{path} holds a list as 'state_dict', not a mapping"):
        read_released_weights(path)
    torch.save({"state_dict": {"head.bias": 1.0}}, path)
    with pytest.raises(ValueError, match=f"{path}: its 'state_dict' entry 'head.bias' is not a tensor"):
        read_released_weights(path)


def test_weights_that_pickle_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model_best.pth"
    for saved in ({"state_dict": _state(), "extra": Payload()}, {"state_dict": Hostile(os.system, f"touch {marker}")}):
        torch.save(saved, path)
        with pytest.raises(
            ValueError, match=rf"{path} is not a readable torch checkpoint \(read with weights_only=True\)"
        ):
            read_released_weights(path)
    assert not marker.exists()


def test_a_data_parallel_prefix_is_dropped_only_when_every_key_has_it(tmp_path: Path) -> None:
    path = tmp_path / "model_best.pth"
    torch.save({"state_dict": _state("module.")}, path)
    assert read_released_weights(path).keys() == _state().keys()
    mixed = {"module.encoder.weight": torch.ones(1), "head.bias": torch.ones(1)}
    torch.save({"state_dict": mixed}, path)
    assert read_released_weights(path.read_bytes()).keys() == mixed.keys()


# ---- the front door ----------------------------------------------------------------------------


def test_read_model_file_tells_a_released_folder_from_a_checkpoint_folder(tmp_path: Path) -> None:
    file = read_model_file(_folder(tmp_path / "spair"))
    assert file.name == str(tmp_path / "spair") and file.checkpoint is None
    assert file.released_args == vars(ARGS) and file.released is not None and file.released.keys() == _state().keys()
    (tmp_path / "run").mkdir()
    save_checkpoint(create_model(TINY), tmp_path / "run" / "model.pt")
    checkpoint = read_model_file(tmp_path / "run")
    assert checkpoint.checkpoint is not None and checkpoint.released is None and checkpoint.released_args is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds neither model.pt .* nor args.pkl and model_best.pth"):
        read_model_file(tmp_path / "empty")


SMALL = ModelConfig.of_kind(
    "lpmflow", image_size=64, weights=None, options=LpmflowOptions(encoder_depth=1, heads=4, context_channels=8)
)
"""A released-architecture LPMFlow (iBOT ViT-B/16) at 64 px: a 4 x 4 token grid, one encoder block."""
SMALL_ARGS = argparse.Namespace(feature_size=32, depth=1, num_heads=4, mlp_ratio=4, benchmark="spair")


@pytest.fixture(scope="module")
def small() -> MatchModel:
    torch.manual_seed(0)
    return create_model(SMALL).eval()


def _released_folder(path: Path, model: MatchModel) -> Path:
    """``model`` saved as the released ``train.py`` saves a run: its state under the released names."""
    optimizer = {"state": {}, "param_groups": [{"lr": 4e-5, "params": []}]}
    document = {
        "epoch": 1,
        "state_dict": {to_released_key(key): value for key, value in model.state_dict().items()},
        "optimizer": optimizer,
        "scheduler": {"milestones": collections.Counter([100, 150, 250]), "gamma": 0.5, "last_epoch": 1},
        "best_loss": 12.5,
    }
    return _folder(path, SMALL_ARGS, document)


def _same_state(model: MatchModel, expected: MatchModel) -> bool:
    state = model.state_dict()
    return state.keys() == expected.state_dict().keys() and all(
        torch.equal(state[key], value) for key, value in expected.state_dict().items()
    )


def test_the_front_door_builds_a_folder_without_a_config(tmp_path: Path, small: MatchModel) -> None:
    folder = _released_folder(tmp_path / "spair", small)
    for model in (create_model(str(folder) + "/"), load_released(folder)):
        assert model.config == small.config and _same_state(model, small)
    # Overrides replace the released model's run-time settings; its architecture stays.
    assert create_model(folder, **{"lpmflow.input_size": 256}).input_spec.size == 256
    file = read_model_file(folder)
    given = dataclasses.replace(SMALL, options=dataclasses.replace(SMALL.options, input_size=64))
    assert create_model(file, config=given).input_spec.size == 64
    assert create_model(file, config=given, **{"lpmflow.input_size": 512}).input_spec.size == 512
    with pytest.raises(ValueError, match=r"architecture differs from the released model's in \['image_size'"):
        create_model(file, config=dataclasses.replace(SMALL, image_size=128))


# ---- sm_eval -----------------------------------------------------------------------------------


def test_sm_eval_takes_a_folder_without_official_config(tmp_path: Path, small: MatchModel) -> None:
    folder = _released_folder(tmp_path / "released" / "spair", small)
    model, path, official = open_model(str(folder), official_config=TINY)
    # a SimpleMatch official config is never an LPMFlow folder's
    assert (model.config, path, official) == (small.config, str(folder), False) and _same_state(model, small)
    file = resolve_model(str(folder) + "/", "spair")
    assert not file.official and file.path == str(folder)
    assert _same_state(load_model(file.data), small)
    model, name = load_match_model(str(folder))
    assert (name.name, name.official, model.config.kind) == ("spair", False, "lpmflow")
    assert model_names([str(folder), str(tmp_path / "released" / "pfpascal") + "/"]) == ["spair", "pfpascal"]


def test_sm_eval_reads_a_folder_on_s3(s3_bucket: str, s3_endpoint: str, tmp_path: Path, small: MatchModel) -> None:
    folder = _released_folder(tmp_path / "spair", small)
    bucket = Location(s3_bucket, s3_endpoint)
    bucket.put_bytes("lpmflow/spair/args.pkl", (folder / "args.pkl").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/lpmflow/spair holds no model_best.pth"):
        open_model(f"{s3_bucket}/lpmflow/spair", s3_endpoint)
    bucket.put_bytes("lpmflow/spair/model_best.pth", (folder / "model_best.pth").read_bytes())
    model, path, official = open_model(f"{s3_bucket}/lpmflow/spair", s3_endpoint)
    assert (path, official) == (f"{s3_bucket}/lpmflow/spair", False) and _same_state(model, small)
