"""Session-wide fixtures: the real-format files in ``../shared/data`` (skipped when absent) and a
real S3-compatible server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs the session's Ray cluster is an end-to-end one (``make test-fast`` skips them)."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; the test is skipped where it does not exist."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto in server mode) on loopback, in its own process, with
    fake credentials in the environment. Yields its endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in _FAKE_AWS_ENV}
    os.environ.update(_FAKE_AWS_ENV)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=10)


_FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh empty bucket on the test server; yields ``s3://<bucket>``."""
    from pipelines.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo dataset in the SPair-71k layout, generated once per session."""
    from pipelines.builders.demo import generate

    return generate(
        tmp_path_factory.mktemp("demo") / "demo",
        images_per_category=16,
        pairs_per_category={"trn": 60, "val": 12, "test": 12},
        size=(200, 150),
    )


@pytest.fixture(scope="session")
def demo_shards(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``demo_root`` sharded with a small bound, so every split spans several shards."""
    from pipelines.shard import shard_dataset
    from pipelines.storage import Location

    out = tmp_path_factory.mktemp("demo-shards")
    shard_dataset("demo", Location(str(demo_root)), Location(str(out)), max_shard_bytes=60_000)
    return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One local Ray cluster for the whole session, started and stopped by the ``infra/local``
    scripts (a head with the dashboard, so ``ray job submit`` and Tune work), with this process
    connected to it. Yields the job server address ``http://127.0.0.1:<port>``."""
    import ray

    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_NUM_CPUS": "4",
        "RAY_PORT": str(_free_port()),
        "RAY_DASHBOARD_PORT": str(_free_port()),
        "RAY_DASHBOARD_AGENT_LISTEN_PORT": str(_free_port()),
        # A temp dir of its own: stop.sh then stops this cluster only, not other Ray on the machine.
        "RAY_TEMP_DIR": f"/tmp/ray-test-{os.getpid()}",
        "RAY_BIN": str(Path(sys.executable).parent / "ray"),
        # Job drivers and workers find this environment's python first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    os.environ["RAY_AUTH_MODE"] = "disabled"
    started = subprocess.run(
        ["bash", str(REPO_ROOT / "infra/local/start.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    if started.returncode != 0:
        raise RuntimeError(f"infra/local/start.sh failed:\n{started.stderr}")
    address = started.stdout.strip().splitlines()[-1]
    ray.init(address=f"127.0.0.1:{env['RAY_PORT']}", logging_level="WARNING")
    try:
        yield address
    finally:
        ray.shutdown()
        subprocess.run(["bash", str(REPO_ROOT / "infra/local/stop.sh")], env=env, capture_output=True, timeout=120)
