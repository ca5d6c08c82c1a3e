"""The cluster definitions in infra/: every YAML parses; every ``python -m sm_train`` and
``python -m sm_train.tune`` command written in infra files and README code blocks passes the real
CLI parser and names existing config and sweep files and only existing config keys (with values the
config accepts); the KubeRay manifests, the cluster-launcher config, the Dockerfile and the runtime
environment agree with each other and with the project. Static checks only: no cluster starts here
(tests/test_train_ray.py runs the infra/local scripts and ``ray job submit``)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import io
import json
import re
import shlex
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from sm_train.config import ConfigError, config_keys, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
AWS_CLUSTER = INFRA / "aws" / "cluster.yaml"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
RAY_UPLOAD_LIMIT = 500 * 2**20  # Ray's limit on a local working_dir package


# --------------------------------------------------------------------------- finding commands


@dataclass(frozen=True)
class Command:
    source: str
    module: str  # "sm_train" or "sm_train.tune"
    args: tuple[str, ...]

    @property
    def dynamic(self) -> bool:
        """Holds a shell expansion or a <placeholder>, so values are not known here."""
        return any("@" in arg or "$" in arg for arg in self.args)

    def __str__(self) -> str:
        return f"{self.source}: python -m {self.module} {shlex.join(self.args)}"


MODULES = ("sm_train", "sm_train.tune")
_PYTHON = re.compile(r"(^|/)python(3(\.\d+)?)?$")
_MAKE_PYTHON = re.compile(r"\$\(PY\)|\$\{PY\}|\$PY\b")  # the Makefile's interpreter variable
_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "|&", ";;", "(", ")"}
_PLACEHOLDER = re.compile(r"<([A-Za-z0-9_.-]+)>")
_EXPANSION = re.compile(r"\$\([^()]*\)|\$\{[^{}]*\}")
_OPTIONAL = re.compile(r"(?<=\s)\[[^\[\]]*\]")  # a bracketed group starting a word, not a value's "=[...]"


def logical_lines(text: str, only_comments: bool = False) -> list[str]:
    """Lines with backslash continuations joined; comment markers and ``$ `` prompts removed.
    ``only_comments`` keeps just ``#`` comment lines (YAML, whose values are scanned parsed)."""
    lines, pending = [], ""
    for raw in text.splitlines():
        stripped = raw.lstrip()
        if stripped.startswith("#"):
            line = stripped[1:]
        elif only_comments:
            if pending:
                lines.append(pending)
            pending = ""
            continue
        else:
            line = raw
        line = re.sub(r"^\s*\$\s+", "", line)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def find_commands(text: str, source: str, only_comments: bool = False) -> list[Command]:
    """Every ``python -m sm_train[.tune] ...`` invocation in ``text``, its arguments up to the
    first shell operator, redirection or comment."""
    commands = []
    lines = logical_lines(text, only_comments)
    # Prose (comments) quotes commands in backticks: only the quoted spans are commands there.
    lines = [span for line in lines for span in (re.findall(r"`([^`]*)`", line) if "`" in line else [line])]
    for line in lines:
        if not re.search(r"-m\s+sm_train\b", line):
            continue
        line = _PLACEHOLDER.sub(r"@\1@", _EXPANSION.sub("@expansion@", _MAKE_PYTHON.sub("python", line)))
        while _OPTIONAL.search(line):  # usage synopses: "[--num-samples N] [section.key=value ...]"
            line = _OPTIONAL.sub("", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        try:
            tokens = list(lexer)
        except ValueError as error:  # unbalanced quotes
            commands.append(Command(source, "sm_train", (f"<untokenizable: {error}>",)))
            continue
        for i in range(1, len(tokens) - 1):
            if tokens[i] != "-m" or tokens[i + 1] not in MODULES or not _PYTHON.search(tokens[i - 1]):
                continue
            args = []
            for token in tokens[i + 2 :]:
                if token in _SHELL_OPERATORS or token.startswith(("#", ">", "<")):
                    if token.startswith((">", "<")) and args and args[-1].isdigit():
                        args.pop()  # the file descriptor of "2>&1"
                    break
                args.append(token)
            commands.append(Command(source, tokens[i + 1], tuple(args)))
    return commands


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def yaml_commands(path: Path, source: str) -> list[Command]:
    """Commands in a YAML file's comments and in its values (parsed, so folded scalars are whole)."""
    text = path.read_text()
    commands = find_commands(text, source, only_comments=True)
    for document in yaml.safe_load_all(text):
        for value in _strings(document):
            commands += find_commands(value, f"{source} (value)")
    return commands


def readme_commands(path: Path) -> list[Command]:
    """Commands in a Markdown file's fenced code blocks."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    return [c for block in blocks for c in find_commands(block, str(path.relative_to(REPO_ROOT)))]


def all_commands() -> list[Command]:
    """Commands in infra/ (YAML, Dockerfile, READMEs), in the comments of configs/ and sweeps/,
    and in the code blocks of the top-level, package and notebooks/ READMEs."""
    roots = (INFRA, REPO_ROOT / "configs", REPO_ROOT / "sweeps")
    paths = [path for root in roots if root.is_dir() for path in root.rglob("*")]
    paths += [*REPO_ROOT.glob("*.md"), *REPO_ROOT.glob("*/README.md")]
    commands = []
    for path in sorted(set(paths)):
        if path.suffix in (".yaml", ".yml"):
            commands += yaml_commands(path, str(path.relative_to(REPO_ROOT)))
        elif path.name == "Dockerfile":
            commands += find_commands(path.read_text(), str(path.relative_to(REPO_ROOT)))
        elif path.suffix == ".md":
            commands += readme_commands(path)
    return commands


# --------------------------------------------------------------------------- checking commands


class _Parsed(Exception):
    pass


def parse_with_cli(command: Command) -> argparse.Namespace | None:
    """Run the module's own ``main`` up to its argument parsing and return the namespace: the
    real parser, its options and required arguments, without running anything else. ``None``:
    the arguments ask for help, which the CLI printed. A rejection raises ``ValueError``."""
    import ray

    if command.module == "sm_train":
        from sm_train.__main__ import main
    else:
        from sm_train.tune import main
    original = argparse.ArgumentParser.parse_known_args

    def parse_and_stop(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        raise _Parsed(namespace, extras)

    def no_cluster(*args, **kwargs):  # a safety net should a CLI ever parse without argparse
        raise AssertionError(f"python -m {command.module} got past its argument parsing")

    output = io.StringIO()
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", parse_and_stop),
        mock.patch.object(ray, "init", no_cluster),
        contextlib.redirect_stdout(output),
        contextlib.redirect_stderr(output),
    ):
        try:
            main(list(command.args))
        except SystemExit as exit:
            if exit.code == 0:
                return None
            message = output.getvalue().strip().splitlines()
            raise ValueError(f"the CLI rejects these arguments: {message[-1] if message else exit.code}") from None
        except _Parsed as parsed:
            namespace, extras = parsed.args
            if extras:
                raise ValueError(f"unrecognized arguments: {' '.join(extras)}") from None
            return namespace
    raise AssertionError(f"python -m {command.module} did not parse its arguments with argparse")


def image_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)[-1]


def repo_path(path: Path | str) -> Path:
    """A path as a command names it: relative to the repository root, or absolute inside the
    image (infra/docker/Dockerfile's WORKDIR holds the repository's configs/ and sweeps/)."""
    path = Path(path)
    workdir = Path(image_workdir())
    if path.is_absolute() and path.is_relative_to(workdir):
        return REPO_ROOT / path.relative_to(workdir)
    return REPO_ROOT / path


def check_command(command: Command) -> list[str]:
    """What is wrong with ``command`` (empty: nothing)."""
    try:
        namespace = parse_with_cli(command)
    except ValueError as error:
        return [f"{command}: {error}"]
    if namespace is None:
        return []
    errors = []
    files = {"--config": namespace.config, "--space": getattr(namespace, "space", None)}
    for option, path in files.items():
        if path is not None and "@" not in str(path) and "$" not in str(path) and not repo_path(path).is_file():
            errors.append(f"{command}: {option} {path} does not exist in the repository")
    keys = set(config_keys())
    for override in namespace.overrides:
        key, sep, _ = override.partition("=")
        if not sep or key not in keys:
            errors.append(f"{command}: {override!r} is not section.key=value with a config key")
    if not errors and not command.dynamic:
        config = repo_path(namespace.config) if namespace.config is not None else None
        try:
            load_config(config, namespace.overrides)
        except ConfigError as error:
            errors.append(f"{command}: {error}")
    return errors


def test_command_finder_and_checker_catch_mistakes(tmp_path: Path) -> None:
    text = """
        ray job submit --address http://127.0.0.1:8265 -- \\
          python -m sm_train --config configs/demo.yaml 'model.simplematch.coarse_window_sizes=[null, 3]' \\
            data.shards=$PWD/data run.num_workers=2 2>&1 | tee log   # a comment
        $(PY) -m sm_train --config configs/demo.yaml optim.lrr=1 && echo done
        .venv/bin/python -m sm_train --config configs/nope.yaml
        python3 -m sm_train --config configs/demo.yaml run.num_workers=two
        python -m sm_train --cfg configs/demo.yaml
        python -m sm_train.tune --config configs/<name>.yaml --space sweeps/<name>.yaml --max-concurrent 2
        python -m sm_train.tune --config configs/demo.yaml --space sweeps/missing.yaml
        python -m sm_train.tune --config configs/demo.yaml
        python -m sm_eval --config configs/demo.yaml
        # prose: `python -m sm_train` runs this checkout's code, `python -m sm_train optim.lrr=1` would not
        python -m sm_train.tune --config configs/<name>.yaml --space sweeps/<name>.yaml [--num-samples N] [k=v ...]
    """
    commands = find_commands(text, "sample")
    assert [(c.module, c.args[:2]) for c in commands] == [
        ("sm_train", ("--config", "configs/demo.yaml")),
        ("sm_train", ("--config", "configs/demo.yaml")),
        ("sm_train", ("--config", "configs/nope.yaml")),
        ("sm_train", ("--config", "configs/demo.yaml")),
        ("sm_train", ("--cfg", "configs/demo.yaml")),
        ("sm_train.tune", ("--config", "configs/@name@.yaml")),
        ("sm_train.tune", ("--config", "configs/demo.yaml")),
        ("sm_train.tune", ("--config", "configs/demo.yaml")),
        ("sm_train", ()),
        ("sm_train", ("optim.lrr=1",)),
        ("sm_train.tune", ("--config", "configs/@name@.yaml")),
    ]
    first = commands[0]
    assert first.args[2:] == ("model.simplematch.coarse_window_sizes=[null, 3]", "data.shards=$PWD/data", "run.num_workers=2")
    assert first.dynamic and not commands[1].dynamic
    verdicts = [check_command(c) for c in commands]
    assert verdicts[0] == [] and verdicts[5] == []
    assert "optim.lrr" in verdicts[1][0]
    assert "configs/nope.yaml does not exist" in verdicts[2][0]
    assert "run.num_workers must be an integer" in verdicts[3][0]
    assert "unrecognized arguments: --cfg" in verdicts[4][0]
    assert "--space sweeps/missing.yaml does not exist" in verdicts[6][0]
    assert "the CLI rejects" in verdicts[7][0]  # --space is required
    assert verdicts[8] == [] and "optim.lrr" in verdicts[9][0]
    assert commands[10].args[2:] == ("--space", "sweeps/@name@.yaml") and verdicts[10] == []

    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text(
        "# python -m sm_train --config configs/demo.yaml \\\n#   train.epochz=1\n"
        "spec:\n  entrypoint: >-\n    python -m sm_train --config configs/demo.yaml\n    run.name=x\n"
    )
    found = [(c.source, c.args) for c in yaml_commands(yaml_file, "job.yaml")]
    assert found == [
        ("job.yaml", ("--config", "configs/demo.yaml", "train.epochz=1")),
        ("job.yaml (value)", ("--config", "configs/demo.yaml", "run.name=x")),
    ]
    assert "train.epochz" in check_command(yaml_commands(yaml_file, "job.yaml")[0])[0]


def test_every_command_in_infra_and_readmes_is_valid() -> None:
    commands = all_commands()
    sources = {c.source for c in commands}
    # The RayJob's entrypoint, the headers of the manifests and the local README all hold one.
    assert {
        "infra/kuberay/rayjob.yaml (value)",
        "infra/kuberay/raycluster.yaml",
        "infra/aws/cluster.yaml",
        "infra/runtime_env.yaml",
        "infra/local/README.md",
        "sm_train/README.md",
    } <= sources
    errors = [error for command in commands for error in check_command(command)]
    assert errors == []


# --------------------------------------------------------------------------- YAML files


YAML_FILES = sorted(
    path
    for root in (INFRA, REPO_ROOT / "configs", REPO_ROOT / "sweeps")
    if root.is_dir()
    for path in root.rglob("*")
    if path.suffix in (".yaml", ".yml")
)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_yaml_parses_to_mappings(path: Path) -> None:
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(document, dict) and document for document in documents)


# --------------------------------------------------------------------------- KubeRay


def _ray_containers(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, Ray container) for the head and every worker group."""
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (group["groupName"], group) for group in cluster_spec.get("workerGroupSpecs", [])
    ]
    return [(name, group["template"]["spec"], group["template"]["spec"]["containers"][0]) for name, group in groups]


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict) -> dict:
    """The checks both manifests share; returns {worker group: (replicas, GPUs per pod, CPUs per pod)}."""
    assert spec["rayVersion"] == dockerfile_ray_version()
    # One authentication mode everywhere: KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN from authOptions.
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the job server, reachable in the cluster
    containers = _ray_containers(spec)
    head_ports = {port["name"]: port["containerPort"] for port in containers[0][2]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["gcs-server"] == 6379
    assert _gpus(containers[0][2]) == 0
    images = {container["image"] for _, _, container in containers}
    assert len(images) == 1, f"head and workers must run one image, got {images}"
    secrets = set()
    for name, pod, container in containers:
        assert not any(var["name"] in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") for var in container.get("env", [])), name
        secrets |= {source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source}
        memory_volumes = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        mounts = container["volumeMounts"]
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in memory_volumes for m in mounts), name
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{name}: requests and limits differ"
    assert len(secrets) == 1, f"every Ray container loads the same S3 Secret, got {secrets}"
    groups = {}
    for name, pod, container in containers[1:]:
        group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)
        gpus = _gpus(container)
        assert gpus >= 1, f"worker group {name} has no GPU"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        groups[name] = (group["replicas"], gpus, _cpus(container["resources"]["limits"]["cpu"]))
    assert groups
    return groups


def test_raycluster_manifest() -> None:
    documents = list(yaml.safe_load_all(RAYCLUSTER.read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in documents] == [("ray.io/v1", "RayCluster")]
    check_ray_cluster_spec(documents[0]["spec"])


def test_rayjob_manifest_fits_its_cluster() -> None:
    documents = list(yaml.safe_load_all(RAYJOB.read_text()))
    assert [(d["apiVersion"], d["kind"]) for d in documents] == [("ray.io/v1", "RayJob")]
    spec = documents[0]["spec"]
    groups = check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True

    # KubeRay pastes the entrypoint unquoted after `ray job submit ... --` into the submitter
    # pod's shell command, so a shell operator would run its right side in the submitter pod.
    lexer = shlex.shlex(spec["entrypoint"], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    assert not _SHELL_OPERATORS & set(lexer), "the entrypoint must be a single command"
    [command] = find_commands(spec["entrypoint"], "entrypoint")
    assert command.module == "sm_train" and not command.dynamic
    namespace = parse_with_cli(command)
    assert str(namespace.config).startswith(image_workdir() + "/configs/")
    config = load_config(repo_path(namespace.config), namespace.overrides)
    run = config.run
    assert run.use_gpu
    assert config.data.shards.startswith("s3://") and run.storage_path.startswith("s3://")
    total_gpus = sum(replicas * gpus for replicas, gpus, _ in groups.values())
    assert run.num_workers == total_gpus, "one training worker per GPU of the worker group"
    for _, gpus, cpus in groups.values():  # the workers of one pod fit its CPUs
        assert gpus * run.cpus_per_worker <= cpus

    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # raises on unknown fields or non-string env values
    assert "working_dir" not in runtime_env  # the code comes from the image


# --------------------------------------------------------------------------- versions, Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_ray_version() -> str:
    args = [args for op, args in dockerfile_instructions() if op == "ARG" and args.startswith("RAY_VERSION=")]
    [version] = [arg.split("=", 1)[1] for arg in args]
    return version


def test_ray_versions_agree() -> None:
    version = dockerfile_ray_version()
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert froms == ["rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${PLATFORM}"]
    assert yaml.safe_load(RAYCLUSTER.read_text())["spec"]["rayVersion"] == version
    assert yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]["rayVersion"] == version
    aws = yaml.safe_load(AWS_CLUSTER.read_text())
    assert aws["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    assert any(f"ray[default,train,tune]=={version}" in command for command in aws["setup_commands"])


def test_dockerfile_installs_the_whole_project() -> None:
    instructions = dockerfile_instructions()
    copied = []
    for op, args in instructions:
        if op == "COPY":
            parts = [part for part in args.split() if not part.startswith("--")]
            copied += parts[:-1]
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        path.name
        for path in REPO_ROOT.iterdir()
        if (path / "__init__.py").is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)
    }
    assert packages and packages <= set(copied), f"packages not copied: {packages - set(copied)}"
    assert {"pyproject.toml", pyproject["project"]["readme"], "configs", "sweeps"} <= set(copied)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert re.search(r"pip install [^&]*--no-deps \.(\s|$)", runs)

    # The build context is what Dockerfile.dockerignore lets through: everything copied, no more.
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {pattern[1:] for pattern in patterns if pattern.startswith("!")}
    assert set(copied) == allowed


# --------------------------------------------------------------------------- AWS cluster launcher


def test_aws_cluster_config_is_valid_for_ray_up() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(AWS_CLUSTER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # unknown fields are errors: the schema is strict
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before touching AWS

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        # Training workers read shards from and write checkpoints to S3 themselves.
        assert "IamInstanceProfile" in node_type["node_config"], name
        assert node_type["max_workers"] * node_type["resources"]["GPU"] >= 4, name
    for remote, local in config["file_mounts"].items():
        assert (REPO_ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
        assert any(remote in command for command in config["setup_commands"]), f"{remote}: synced, not installed"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=disabled" in command  # the same mode on every node


# --------------------------------------------------------------------------- runtime environment


def _package(directory: Path, excludes: list[str], out: Path) -> zipfile.ZipFile:
    """The zip `ray job submit` uploads for ``working_dir=directory``: Ray's own packaging code
    with its default excludes, .gitignore/.rayignore, and ``excludes``."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    excludes = ray_constants.get_runtime_env_default_excludes() + excludes
    create_package(str(directory), out, include_gitignore=True, excludes=excludes)
    return zipfile.ZipFile(out)


def test_runtime_env_is_valid() -> None:
    from ray.runtime_env import RuntimeEnv

    document = yaml.safe_load(RUNTIME_ENV.read_text())
    RuntimeEnv(**document)
    assert document["working_dir"] == "."
    assert document["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"


def test_runtime_env_excludes_data_runs_and_archives(tmp_path: Path) -> None:
    """The excludes alone (no .gitignore in this tree) keep bulk out and code, configs and
    relative weight files in."""
    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    tree = tmp_path / "repo"
    kept = [
        "sm_train/__main__.py", "configs/demo.yaml", "sweeps/demo.yaml", "infra/runtime_env.yaml", "pyproject.toml",
        "checkpoints/ibot_vitb16_teacher.pth", "tests/data_helpers.py",
    ]  # fmt: skip
    dropped = [
        "data/demo-shards/trn-000000.tar", "data/demo/x.jpg", "runs/demo/epoch=0001/model.pt", "notebooks/out.png",
        ".venv/lib/site.py", ".git/HEAD", "shards/val-000000.tar", "index.parquet", "sm_train/__pycache__/x.pyc",
        "simplematch_system.egg-info/PKG-INFO", "build/lib/x.py", ".pytest_cache/v/x", "bundle.zip",
    ]  # fmt: skip
    for name in kept + dropped:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    package = _package(tree, excludes, tmp_path / "pkg.zip")
    assert sorted(info.filename for info in package.infolist() if not info.is_dir()) == sorted(kept)


def test_runtime_env_upload_of_this_checkout(tmp_path: Path) -> None:
    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    out = tmp_path / "pkg.zip"
    package = _package(REPO_ROOT, excludes, out)
    names = {info.filename for info in package.infolist()}
    assert {"sm_train/__main__.py", "configs/dinov2_vitb14_252_spair.yaml", "pipelines/reader.py"} <= names
    bulk = {"data", "runs", ".venv", ".git", "notebooks"}
    assert not [name for name in names if name.split("/")[0] in bulk or name.endswith(".tar")]
    size = out.stat().st_size
    largest = sorted(package.infolist(), key=lambda info: -info.compress_size)[:5]
    assert size < RAY_UPLOAD_LIMIT, f"upload {size / 2**20:.0f} MiB; largest: {[i.filename for i in largest]}"
