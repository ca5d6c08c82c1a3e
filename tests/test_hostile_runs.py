"""Broken storage and killed runs: an S3 store that fails mid-run, refuses the credentials, has no
such bucket or no endpoint at all, and a sharder killed with SIGKILL. Each gives one clear error
(exit 2 from the CLIs, no traceback) naming the shard or the resource, stops the run at the first
failed shard, leaves no scratch file and no process behind, and a re-run resumes to the output
of a clean run."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipelines.shard import ShardError, main, shard_dataset
from pipelines.storage import SCRATCH_PREFIX, Location, StorageError, open_url
from tests.conftest import REPO_ROOT
from tests.test_shard import VALID_PAIRS, build_spair

ONE_PAIR_PER_SHARD = 1
"""A shard bound below any pair: every pair gets a shard of its own (many small shards)."""


@pytest.fixture
def refuse_s3_after(s3_endpoint: str) -> Iterator[Callable[[float], None]]:
    """``refuse_s3_after(n)``: the test S3 server answers ``n`` more requests, then refuses every
    one (``InvalidAccessKeyId``, as for wrong credentials) until the test ends or
    ``refuse_s3_after(inf)``."""

    def refuse_after(count: float) -> None:
        request = urllib.request.Request(
            f"{s3_endpoint}/moto-api/reset-auth",
            data=str(count).encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).read()

    yield refuse_after
    refuse_after(float("inf"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _same_files(a: Location, b: Location) -> None:
    assert a.list_files("") == b.list_files("")
    for name in a.list_files(""):
        assert a.read_bytes(name) == b.read_bytes(name), name


@pytest.fixture(scope="module")
def spair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "spair"
    build_spair(root)
    return root


@pytest.fixture(scope="module")
def clean_shards(spair: Path, tmp_path_factory: pytest.TempPathFactory) -> Location:
    """``spair`` sharded one pair per shard, locally, in one process: what every run must give."""
    out = Location(str(tmp_path_factory.mktemp("clean")))
    shard_dataset("spair", Location(str(spair)), out, ["trn"], max_shard_bytes=ONE_PAIR_PER_SHARD)
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_s3_failure_mid_run_stops_it_leaves_no_scratch_and_a_rerun_resumes(
    workers: int,
    spair: Path,
    clean_shards: Location,
    tmp_path: Path,
    s3_bucket: str,
    s3_endpoint: str,
    refuse_s3_after: Callable[[float], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    killed_run = temp / f"{SCRATCH_PREFIX}{_dead_pid()}-killed"  # what a SIGKILLed run leaves
    killed_run.mkdir()
    (killed_run / ".trn-000003.tar.x1y2.partial").write_bytes(bytes(4096))
    live_run = temp / f"{SCRATCH_PREFIX}{os.getpid()}-running"  # another run, still going
    live_run.mkdir()

    out = Location(f"{s3_bucket}/shards", s3_endpoint)
    refuse_s3_after(1 + 2 * 2)  # the listing of --out, then two shards (tar and manifest each)
    failed = "trn-000002" if workers == 1 else r"trn-\d{6}"
    # One process refuses the third shard's tar; with two, either upload of a shard in flight
    # (its tar or its manifest) can be the first refused request.
    refused = rf"{failed}\.tar" if workers == 1 else rf"(_manifests/trn/)?{failed}\.tar(\.json)?"
    message = rf"^shard {failed}\.tar not written: {s3_bucket}/shards/{refused}: {s3_endpoint} refused the request \(InvalidAccessKeyId"
    with pytest.raises(ShardError, match=message) as raised:
        shard_dataset("spair", Location(str(spair)), out, ["trn"], max_shard_bytes=ONE_PAIR_PER_SHARD, workers=workers)
    assert "\n" not in str(raised.value) and "run again to resume" in str(raised.value)
    # This run's scratch directory and the killed run's are gone; the live run's is kept.
    assert [p.name for p in temp.iterdir()] == [live_run.name]

    refuse_s3_after(float("inf"))
    kept = [name for name in out.list_files("") if name.endswith(".tar")]
    if workers == 1:
        assert kept == ["trn-000000.tar", "trn-000001.tar"]
    assert len(kept) < VALID_PAIRS // 4, "shards queued after the failure were not written"
    shard_dataset("spair", Location(str(spair)), out, ["trn"], max_shard_bytes=ONE_PAIR_PER_SHARD, workers=workers)
    _same_files(out, clean_shards)
    assert [p.name for p in temp.iterdir()] == [live_run.name]


def test_first_failed_shard_cancels_the_queued_ones(
    spair: Path, clean_shards: Location, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    (out / "trn-000001.tar").mkdir(parents=True)  # shard 1 cannot be moved into place
    args = ["spair", "--root", str(spair), "--out", str(out), "--split", "trn", "--max-shard-bytes", "1"]
    args += ["--workers", "2"]
    assert main(args) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert re.match(r"shard trn-000001\.tar not written: .*Is a directory", errors[0]), errors[0]
    assert "Traceback" not in capsys.readouterr().err
    written = [p.name for p in out.glob("trn-*.tar") if p.is_file()]
    assert len(written) < VALID_PAIRS // 4, f"{len(written)} shards written after the failure"
    assert not [p for p in out.rglob(".*") if p.is_file()], "no partial file is left"

    (out / "trn-000001.tar").rmdir()
    assert main(args) == 0
    _same_files(Location(str(out)), clean_shards)


def test_sigkill_of_the_sharder_leaves_no_process_and_a_rerun_removes_its_scratch(
    spair: Path, clean_shards: Location, tmp_path: Path, s3_bucket: str, s3_endpoint: str
) -> None:
    psutil = pytest.importorskip("psutil")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(temp)}
    out = Location(f"{s3_bucket}/shards", s3_endpoint)
    cli = [sys.executable, "-m", "pipelines.shard", "spair", "--root", str(spair), "--out", out.url, "--split", "trn"]
    cli += ["--s3-endpoint-url", s3_endpoint, "--max-shard-bytes", "1", "--workers", "2"]
    job = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(name.startswith("_manifests/trn/") for name in out.list_files("")):
        assert job.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    descendants = psutil.Process(job.pid).children(recursive=True)
    assert len(descendants) >= 3, descendants  # two pool workers and multiprocessing's resource tracker
    job.kill()
    job.wait()

    def running(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(running(p) for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in descendants if running(p)], "processes of the killed run are still alive"
    left = [p.name for p in temp.iterdir()]
    assert len(left) == 1 and left[0].startswith(f"{SCRATCH_PREFIX}{job.pid}-"), left  # the killed run's scratch

    rerun = subprocess.run(cli, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete, resuming" in rerun.stderr
    assert list(temp.iterdir()) == [], "the killed run's scratch directory is removed by the re-run"
    _same_files(out, clean_shards)


@pytest.mark.parametrize(
    "method", ["read_bytes", "exists", "list_files", "put_bytes", "put_file", "remove", "open_url"]
)
def test_every_s3_method_names_a_missing_bucket(method: str, s3_endpoint: str, tmp_path: Path) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    location = Location(f"s3://{bucket}/prefix", s3_endpoint)
    local = tmp_path / "file"
    local.write_bytes(b"x")
    calls = {
        "read_bytes": lambda: location.read_bytes("a.json"),
        "exists": lambda: location.exists("a.json"),
        "list_files": lambda: location.list_files(""),
        "put_bytes": lambda: location.put_bytes("a.json", b"{}"),
        "put_file": lambda: location.put_file("a.tar", local),
        "remove": lambda: location.remove("a.json"),
        "open_url": lambda: open_url(location.full("a.json"), s3_endpoint),
    }
    with pytest.raises(
        StorageError, match=rf"^s3://{bucket}/prefix/?\S*: bucket '{bucket}' does not exist at {s3_endpoint}$"
    ):
        calls[method]()


def _cli_runs(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Run the CLIs side by side (a dead endpoint costs each its retries)."""
    started = {
        name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, command in commands.items()
    }
    outputs = {name: job.communicate(timeout=240) for name, job in started.items()}
    return {
        name: subprocess.CompletedProcess(job.args, job.returncode, *outputs[name]) for name, job in started.items()
    }


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_eval import save_tiny

    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny.pt", seed=0)


@pytest.mark.parametrize("case", ["no such bucket", "credentials refused", "no credentials", "dead endpoint"])
def test_s3_errors_are_one_line_naming_the_resource_from_both_clis(
    case: str,
    spair: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    s3_bucket: str,
    s3_endpoint: str,
    refuse_s3_after: Callable[[float], None],
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    endpoint, bucket = s3_endpoint, s3_bucket
    if case == "no such bucket":
        bucket = f"s3://missing-{uuid.uuid4().hex[:8]}"
        expected = rf"bucket '{bucket[5:]}' does not exist at {endpoint}"
    elif case == "credentials refused":
        refuse_s3_after(0)
        expected = rf"{endpoint} refused the request \((InvalidAccessKeyId|403): .*\); check the credentials"
    elif case == "no credentials":
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(key, None)
        nowhere = str(tmp_path / "nowhere")
        env.update(AWS_SHARED_CREDENTIALS_FILE=nowhere, AWS_CONFIG_FILE=nowhere, AWS_EC2_METADATA_DISABLED="true")
        expected = r"no S3 credentials \(set AWS_ACCESS_KEY_ID"
    else:
        endpoint = f"http://127.0.0.1:{_closed_port()}"
        expected = rf"cannot reach the S3 endpoint {endpoint} \(Could not connect"
    results = _cli_runs(
        {
            "pipelines.shard": [
                *(sys.executable, "-m", "pipelines.shard", "spair", "--root", str(spair), "--split", "trn"),
                *("--out", f"{bucket}/shards", "--s3-endpoint-url", endpoint),
            ],
            "sm_eval": [
                *(sys.executable, "-m", "sm_eval", "--checkpoint", str(tiny_checkpoint), "--no-progress"),
                *("--shards", f"{bucket}/shards", "--s3-endpoint-url", endpoint, "--out", str(tmp_path / "eval")),
            ],
        },
        env,
    )
    for name, result in results.items():
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line or "error:" in line]
        assert len(errors) == 1, (name, result.stderr)
        assert re.search(rf"{bucket}/shards\S*: {expected}", errors[0]), (name, errors[0])
