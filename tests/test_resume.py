"""An interrupted shard job finishes on a re-run without duplicating or losing pairs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.shard import shard_dataset
from pipelines.storage import Location
from tests.conftest import REPO_ROOT

SHARD_BOUND = "40000"


def _cli(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.shard", "demo", "--root", str(root), "--out", str(out), "--max-shard-bytes", SHARD_BOUND]


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_output(demo_root: Path, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    shard_dataset("demo", Location(str(demo_root)), Location(str(clean)), max_shard_bytes=int(SHARD_BOUND))

    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    job = subprocess.Popen(_cli(demo_root, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("_manifests/trn/*.json")):  # at least one shard is complete
        assert job.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    job.wait()
    interrupted = _outputs(out)
    assert "index.parquet" not in interrupted, "the index must be written last"
    assert 0 < len([name for name in interrupted if name.endswith(".tar")]) < len([n for n in _outputs(clean) if n.endswith(".tar")])

    rerun = subprocess.run(_cli(demo_root, out), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete, resuming" in rerun.stderr
    assert _outputs(out) == _outputs(clean)
    assert not [p for p in out.rglob(".*") if p.is_file()], "no partial files are left behind"
