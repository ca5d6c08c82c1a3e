"""``python -m sm_train.tune --config configs/<name>.yaml --space sweeps/<name>.yaml``: sweep
training settings with Ray Tune, every trial a full distributed Ray Train run.

A search space is YAML. ``space`` maps dotted config keys (those ``python -m sm_train --help``
lists) to one sampler each; a key that is not a config key names a *bundle*, whose values are
mappings of config keys set together (e.g. a backbone with its input size)::

    space:
      model.window_size: {grid: [9, 15, 30, 45, 60]}
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      backbone:
        grid:
          - {model.backbone: ibot_vitb16, model.image_size: 256}
          - {model.backbone: dinov2_vitb14, model.image_size: 252}
    asha: {grace_period: 1, reduction_factor: 2}   # optional; "asha: null" turns early stopping off
    overrides: [train.epochs=4]                     # optional, applied to every trial

Samplers: ``grid`` (every value, times ``--num-samples``), ``choice`` (one at random), ``uniform``,
``loguniform`` ([low, high]) and ``randint`` ([low, high), integers). ASHA stops trials early on
val PCK@0.1 by epoch. Results go to ``run.storage_path/<--name>`` (local or ``s3://``); running the
same command again resumes an interrupted sweep (``Tuner.restore``). At the end ``--out`` gets
``results.parquet`` and ``results.md`` (one row per trial: its values, best val PCK@0.1, epochs
run), ``best_config.yaml`` (the base config with the best trial's values, ready for
``python -m sm_train --config``) and ``pck_vs_<key>.png`` plots; with ``s3://`` storage they are
also copied to ``<run.storage_path>/<name>/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.storage import arrow_filesystem
from sm_eval.report import markdown_table
from sm_train.config import (
    SELECTION_ALPHA,
    SELECTION_METRIC,
    ConfigError,
    TrainConfig,
    config_keys,
    dump_yaml,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    resolve_paths,
    set_dotted,
    to_dict,
    train_config,
)
from sm_train.trainer import build_trainer

logger = logging.getLogger("sm_train.tune")

BEST_COLUMN = f"best_pck@{SELECTION_ALPHA:g}"
"""The results table's column of each trial's best :data:`~sm_train.config.SELECTION_METRIC`."""

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed search space: ``space`` (key -> (sampler, argument)), ``asha`` settings (``None``:
    no early stopping) and ``overrides`` applied to every trial."""

    space: dict[str, tuple[str, Any]]
    asha: dict[str, Any] | None
    overrides: list[str]


def load_space(path: str | Path, base: TrainConfig) -> SweepSpec:
    """Read and check a search-space YAML against ``base``: unknown keys, unknown samplers and
    values that do not fit the config are errors naming the file and key."""
    try:
        document = load_yaml(Path(path).read_bytes(), f"search space {path}") or {}
    except FileNotFoundError:
        raise ConfigError(f"search space {path} does not exist") from None
    unknown = set(document) - {"space", "asha", "overrides"}
    if unknown or not isinstance(document.get("space"), dict) or not document["space"]:
        raise ConfigError(f"{path}: expected a non-empty 'space' mapping (and optional 'asha', 'overrides'); got {sorted(document)}")
    keys = set(config_keys())
    space = {}
    for key, spec in document["space"].items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{path}: space.{key} must be one sampler of {SAMPLERS}, e.g. {{grid: [1, 2]}}; got {spec!r}")
        sampler, argument = next(iter(spec.items()))
        values = argument if sampler in ("grid", "choice") else []
        if sampler in ("uniform", "loguniform", "randint") and (not isinstance(argument, list) or len(argument) != 2):
            raise ConfigError(f"{path}: space.{key}: {sampler} needs [low, high], got {argument!r}")
        if sampler in ("grid", "choice") and (not isinstance(argument, list) or not argument):
            raise ConfigError(f"{path}: space.{key}: {sampler} needs a non-empty list, got {argument!r}")
        if key not in keys and not all(isinstance(v, dict) for v in values or [None]):
            raise ConfigError(f"{path}: space.{key} is not a config key (see python -m sm_train --help), nor a bundle of config keys")
        for value in values:  # every listed value must make a valid config
            _apply(base, _assignments(key, value), f"{path}: space.{key}={value!r}")
        if sampler in ("uniform", "loguniform", "randint"):
            for bound in argument:
                _apply(base, {key: bound}, f"{path}: space.{key} bound {bound!r}")
        space[key] = (sampler, argument)
    overrides = list(document.get("overrides") or [])
    asha = document["asha"] if "asha" in document else {}
    return SweepSpec(space, asha, overrides)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune ``param_space`` of ``spec``: one sampler per space key under ``"values"``."""
    from ray import tune

    build = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda bounds: tune.uniform(*bounds),
        "loguniform": lambda bounds: tune.loguniform(*bounds),
        "randint": lambda bounds: tune.randint(*bounds),
    }
    return {"values": {key: build[sampler](argument) for key, (sampler, argument) in spec.space.items()}}


def trial_config(base: TrainConfig, values: Mapping[str, Any], name: str) -> TrainConfig:
    """``base`` with a trial's sampled ``values`` (config keys or bundles) and run name ``name``."""
    assignments: dict[str, Any] = {}
    for key, value in values.items():
        assignments.update(_assignments(key, value))
    config = _apply(base, assignments, f"trial {name}")
    return dataclasses.replace(config, run=dataclasses.replace(config.run, name=name))


def run_trial(trial: dict[str, Any]) -> None:
    """The Tune trainable: one full Ray Train run whose reports Tune receives (the V2 pattern)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = from_dict(TrainConfig, trial["base"], "sweep base config")
    context = ray.tune.get_context()
    # The trial id (not a timestamp) names the run, so a restarted trial continues its own run.
    config = trial_config(base, trial["values"], f"{context.get_experiment_name()}-{context.get_trial_id()}")
    build_trainer(config, callbacks=[TuneReportCallback()]).fit()


def run_sweep(
    base: TrainConfig,
    spec: SweepSpec,
    name: str,
    num_samples: int,
    max_concurrent: int,
):
    """Run (or resume) the sweep; returns Tune's ``ResultGrid``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    storage_path, filesystem = arrow_filesystem(base.run.storage_path, base.run.s3_endpoint_url)
    experiment = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        logger.info("resuming the sweep in %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=run_trial, resume_errored=True, storage_filesystem=filesystem)
        return tuner.fit()
    scheduler = None
    if spec.asha is not None:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=base.train.epochs,
            grace_period=spec.asha.get("grace_period", 1),
            reduction_factor=spec.asha.get("reduction_factor", 2),
        )
    tuner = tune.Tuner(
        run_trial,
        param_space={"base": to_dict(base), **param_space(spec)},
        tune_config=tune.TuneConfig(
            metric=SELECTION_METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=base.run.max_failures),
        ),
    )
    return tuner.fit()


def summarize_results(results, base: TrainConfig, spec: SweepSpec, out: Path) -> dict[str, Any]:
    """Write the results table, the best config and the plots to ``out``; returns the best row."""
    import pandas as pd

    rows = []
    for result in results:
        values = result.config["values"]
        history = result.metrics_dataframe
        scores = history[SELECTION_METRIC].dropna() if history is not None and SELECTION_METRIC in history else []
        rows.append(
            {
                "trial": Path(result.path).name,
                **{key: _cell(value) for key, value in values.items()},
                BEST_COLUMN: float(max(scores)) if len(scores) else math.nan,
                "epochs": float(history["epoch"].max()) if history is not None and "epoch" in history else 0.0,
                "error": repr(result.error) if result.error else "",
            }
        )
    table = pd.DataFrame(rows).sort_values(BEST_COLUMN, ascending=False, na_position="last")
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "results.parquet", index=False)
    (out / "results.md").write_text(_markdown(table))
    if table[BEST_COLUMN].isna().all():
        raise RuntimeError(f"no trial of the sweep reported {SELECTION_METRIC}; see {out / 'results.md'}")
    best = table.iloc[0]
    best_values = next(r.config["values"] for r in results if Path(r.path).name == best["trial"])
    best_config = trial_config(base, best_values, f"{base.run.name}-best")
    (out / "best_config.yaml").write_text(
        f"# Best trial {best['trial']} of the sweep: val PCK@{SELECTION_ALPHA:g} {best[BEST_COLUMN]:.4f}\n" + dump_yaml(best_config)
    )
    _plot(table, list(spec.space), out)
    return best.to_dict()


def publish_results(out: Path, base: TrainConfig, name: str) -> str:
    """Copy the results folder to ``<run.storage_path>/<name>/results`` on remote storage (a
    submitted job's working directory is temporary); returns where they went."""
    import pyarrow.fs

    storage_path, filesystem = arrow_filesystem(base.run.storage_path, base.run.s3_endpoint_url)
    if filesystem is None:
        filesystem, storage_path = pyarrow.fs.FileSystem.from_uri(storage_path)
    destination = f"{storage_path.rstrip('/')}/{name}/results"
    pyarrow.fs.copy_files(str(out.resolve()), destination, destination_filesystem=filesystem)
    return f"{base.run.storage_path.rstrip('/')}/{name}/results"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sm_train.tune",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="base training config (YAML)")
    parser.add_argument("--space", type=Path, required=True, help="search space (YAML, see above)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of the space (the grid is repeated)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials running at once (e.g. GPUs / workers per trial)")
    parser.add_argument("--name", help="sweep name (default: the space file's name); reuse it to resume")
    parser.add_argument("--out", type=Path, help="results folder (default: <run.storage_path>/<name> when local, else sweeps-out/<name>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="base config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = args.name or args.space.stem
    try:
        base = load_config(args.config, args.overrides)
        spec = load_space(args.space, base)
        base = resolve_paths(_apply(base, dict(parse_override(o) for o in spec.overrides), str(args.space)), Path.cwd())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
    results = run_sweep(base, spec, name, args.num_samples, args.max_concurrent)
    local = "://" not in base.run.storage_path
    out = args.out or (Path(base.run.storage_path) / name if local else Path("sweeps-out") / name)
    best = summarize_results(results, base, spec, out)
    print(f"best trial {best['trial']}: val PCK@{SELECTION_ALPHA:g} {best[BEST_COLUMN]:.4f}; results in {out}")
    if not local:
        print(f"and in {publish_results(out, base, name)}")
    print(f"train it: python -m sm_train --config {out / 'best_config.yaml'}")
    return 0


def _assignments(key: str, value: Any) -> dict[str, Any]:
    """A space key's value as config assignments: itself, or a bundle's mapping."""
    return dict(value) if isinstance(value, dict) else {key: value}


def _apply(base: TrainConfig, assignments: Mapping[str, Any], source: str) -> TrainConfig:
    document = to_dict(base)
    if assignments.get("model.kind", base.model.kind) != base.model.kind:
        # The base's options are its kind's; a trial of another kind starts from that kind's defaults.
        del document["model"][base.model.kind]
    for key, value in assignments.items():
        set_dotted(document, key, value, source)
    return train_config(document, source)


def _cell(value: Any) -> Any:
    """A table cell for a sampled value (bundles are shown as ``k=v`` lists)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return value


def _markdown(table) -> str:
    rows = [
        [f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else str(v) for v in row]
        for row in table.itertuples(index=False)
    ]
    return "\n".join(markdown_table(list(table.columns), rows)) + "\n"


def _plot(table, keys: list[str], out: Path) -> None:
    """One PNG per swept key: best val PCK@0.1 of each trial against the key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in keys:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        values = table[key]
        numeric = all(isinstance(v, (int, float)) for v in values)
        positions = values if numeric else [sorted(set(map(str, values))).index(str(v)) for v in values]
        axis.scatter(positions, table[BEST_COLUMN], color="tab:blue")
        if not numeric:
            labels = sorted(set(map(str, values)))
            axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=7)
        axis.set_xlabel(key)
        axis.set_ylabel(f"best val PCK@{SELECTION_ALPHA:g}")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / f"pck_vs_{key.replace('.', '_')}.png", dpi=120)
        plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
