"""Outputs that cannot be written, file modes, and S3 endpoints that never answer (hostile sweep,
defects 6, 13 and 14). ``--out`` naming an existing file, a path under a file, a read-only
directory or filesystem is one error line (exit 2) naming the path and the problem, before
anything is written; every file written is ``0o666`` less the umask, as ``open()`` makes it; a
stalled S3 endpoint is an error after the configured timeouts (``SM_S3_CONNECT_TIMEOUT``,
``SM_S3_READ_TIMEOUT``, ``SM_S3_MAX_ATTEMPTS``), and the message names them."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.shard import main, shard_dataset
from pipelines.storage import Location, StorageError, arrow_filesystem, open_url
from tests.conftest import REPO_ROOT
from tests.test_shard import build_spair


class _Hung(BaseException):
    """Not an OSError (a socket timeout is one, and botocore would retry it)."""


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A test that waits on a silent endpoint fails after 30 s instead of hanging the suite."""

    def hung(*_):
        raise _Hung("still waiting after 30 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def spair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs") / "spair"
    build_spair(root)
    return root


def _shard_cli(spair: Path, out: str, *extra: str, env: dict | None = None, prefix: list[str] | None = None):
    command = [
        sys.executable,
        "-m",
        "pipelines.shard",
        "spair",
        "--root",
        str(spair),
        "--split",
        "trn",
        "--out",
        out,
        *extra,
    ]
    return subprocess.run(
        [*(prefix or []), *command],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )


def _the_error(result: subprocess.CompletedProcess) -> str:
    """The one error line of a CLI run that failed with exit 2 and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --- defect 6: an --out that cannot be written ------------------------------------------------


def test_out_naming_an_existing_file_is_one_error_and_leaves_the_file_alone(spair: Path, tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_bytes(b"precious results")
    before = sorted(tmp_path.iterdir())
    error = _the_error(_shard_cli(spair, str(target)))
    assert error.endswith(f"{target}: cannot write output there: it is an existing file, not a directory")
    assert target.read_bytes() == b"precious results"
    assert sorted(tmp_path.iterdir()) == before


def test_out_under_a_file_is_one_error(spair: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    error = _the_error(_shard_cli(spair, str(blocker / "shards" / "spair")))
    assert error.endswith(
        f"{blocker}/shards/spair: cannot create the output directory: {blocker} is a file, not a directory"
    )
    assert blocker.read_bytes() == b"x"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_out_is_one_error_before_anything_is_written(
    code: int, spair: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only filesystem (EROFS) or a directory without write permission (EACCES, which
    root never sees from chmod), simulated below ``readonly``: creating a file or directory there fails."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_open, real_mkdir = os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | getattr(os, "O_TMPFILE", 0)

    def refused(path) -> bool:
        return str(os.fspath(path)).startswith(str(readonly))

    def guarded_open(path, flags, *args, **kwargs):
        if refused(path) and flags & writing:
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if refused(path):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    for out, expected in (
        (readonly, f"{readonly}: cannot write in the output directory: {os.strerror(code)}"),
        (readonly / "new" / "dir", f"{readonly}/new/dir: cannot create the output directory: {os.strerror(code)}"),
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="pipelines.shard"):
            assert main(["spair", "--root", str(spair), "--split", "trn", "--out", str(out)]) == 2
        assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == [expected]
    assert list(readonly.iterdir()) == []


def _read_only_mount_prefix(mount_point: Path) -> list[str] | None:
    """A command prefix running what follows in a private mount namespace where ``mount_point``
    is an empty read-only tmpfs; None where this machine does not allow it (no root, no unshare)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return None
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o ro tmpfs '{mount_point}' && ! touch '{mount_point}/x' 2>/dev/null",
        ],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{mount_point}' && exec \"$@\"", "sh"]


def test_out_on_a_real_read_only_filesystem(spair: Path, tmp_path: Path) -> None:
    mount_point = tmp_path / "ro-mount"
    mount_point.mkdir()
    prefix = _read_only_mount_prefix(mount_point)
    if prefix is None:
        pytest.skip("cannot mount a read-only tmpfs here (needs root and unshare)")
    error = _the_error(_shard_cli(spair, str(mount_point), prefix=prefix))
    assert error.endswith(f"{mount_point}: cannot write in the output directory: Read-only file system")
    error = _the_error(_shard_cli(spair, str(mount_point / "shards"), prefix=prefix))
    assert error.endswith(f"{mount_point}/shards: cannot create the output directory: Read-only file system")


# --- defect 13: file modes follow the umask ---------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.mark.parametrize(
    ("umask", "mode", "workers"), [(0o022, 0o644, 1), (0o027, 0o640, 2)], ids=["022", "027-workers"]
)
def test_every_file_written_honours_the_umask(umask: int, mode: int, workers: int, spair: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        shard_dataset(
            "spair", Location(str(spair)), Location(str(out)), ["trn"], max_shard_bytes=40_000, workers=workers
        )
        location = Location(str(tmp_path / "direct"))
        location.put_bytes("report/report.json", b"{}")
        scratch = tmp_path / "scratch.bin"
        scratch.write_bytes(b"x")
        scratch.chmod(0o600)  # as tempfile.mkstemp makes a scratch file
        location.put_file("matches/matches.bin", scratch)
    finally:
        os.umask(previous)
    modes = _modes(out)
    assert {"index.parquet", "rejects.jsonl", "summary.json", "trn-000000.tar", "trn-000001.tar"} <= set(modes)
    assert any(name.startswith("_manifests/trn/") for name in modes) and "_manifests/trn.json" in modes
    assert set(modes.values()) == {mode}, modes
    assert _modes(tmp_path / "direct") == {"report/report.json": mode, "matches/matches.bin": mode}
    if umask == 0o022:
        assert all(m & stat.S_IROTH for m in modes.values()), "readable by other users"


# --- defect 14: S3 timeouts -------------------------------------------------------------------


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "SM_S3_CONNECT_TIMEOUT", "SM_S3_READ_TIMEOUT", "SM_S3_MAX_ATTEMPTS", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts every connection and never answers (a stalled S3 server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


@pytest.fixture
def unconnectable_endpoint() -> Iterator[str]:
    """An endpoint whose connections never complete: a listener that never accepts, its queue full."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    address = server.getsockname()
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_a_stalled_endpoint_is_an_error_after_the_read_timeout(
    s3_env: None, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SM_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("SM_S3_MAX_ATTEMPTS", "1")
    location = Location("s3://bucket/prefix", silent_endpoint)
    local = tmp_path / "file.bin"
    calls = {
        "read_bytes": lambda: location.read_bytes("a.json"),
        "exists": lambda: location.exists("a.json"),
        "list_files": lambda: location.list_files(""),
        "put_bytes": lambda: location.put_bytes("a.json", b"{}"),
        "put_file": lambda: location.put_file("a.tar", local),
        "open_url": lambda: open_url(location.full("a.json"), silent_endpoint),
    }
    for name, call in [*calls.items(), ("read_bytes, 2 attempts", calls["read_bytes"])]:
        attempts = 2 if "2 attempts" in name else 1
        monkeypatch.setenv("SM_S3_MAX_ATTEMPTS", str(attempts))
        local.write_bytes(b"x" * 100)
        started = time.monotonic()
        with pytest.raises(StorageError) as raised:
            call()
        assert time.monotonic() - started < 4 * attempts, name
        assert re.fullmatch(
            rf"s3://bucket/prefix\S*: waiting for an answer from the S3 endpoint {silent_endpoint} timed out"
            rf" after 0\.5 s \(SM_S3_READ_TIMEOUT\), {attempts} attempts? \(SM_S3_MAX_ATTEMPTS\)",
            str(raised.value),
        ), (name, str(raised.value))


def test_an_endpoint_that_never_connects_is_an_error_after_the_connect_timeout(
    s3_env: None, unconnectable_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SM_S3_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("SM_S3_MAX_ATTEMPTS", "1")
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        Location("s3://bucket/prefix", unconnectable_endpoint).read_bytes("a.json")
    assert time.monotonic() - started < 5
    assert str(raised.value) == (
        f"s3://bucket/prefix/a.json: connecting to the S3 endpoint {unconnectable_endpoint} timed out"
        " after 0.5 s (SM_S3_CONNECT_TIMEOUT), 1 attempt (SM_S3_MAX_ATTEMPTS)"
    )


def test_the_shard_cli_reports_a_stalled_endpoint_in_seconds(s3_env: None, silent_endpoint: str, spair: Path) -> None:
    started = time.monotonic()
    result = _shard_cli(
        spair, "s3://bucket/shards", "--s3-endpoint-url", silent_endpoint, "--s3-read-timeout", "0.5",
        env={"SM_S3_MAX_ATTEMPTS": "1"},
    )  # fmt: skip
    assert time.monotonic() - started < 20
    assert re.search(
        rf"ERROR pipelines\.shard: s3://bucket/shards\S*: waiting for an answer from the S3 endpoint {silent_endpoint}"
        r" timed out after 0\.5 s \(SM_S3_READ_TIMEOUT\), 1 attempt \(SM_S3_MAX_ATTEMPTS\)$",
        _the_error(result),
    )


def test_the_pyarrow_filesystem_uses_the_same_timeouts(
    s3_env: None, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SM_S3_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("SM_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("SM_S3_MAX_ATTEMPTS", "1")
    path, filesystem = arrow_filesystem("s3://bucket/runs", silent_endpoint)
    settings = filesystem.__reduce__()[1][0]
    assert (settings["connect_timeout"], settings["request_timeout"]) == (2.5, 1.0)
    started = time.monotonic()
    with pytest.raises(OSError, match="Timeout"):
        filesystem.get_file_info(path)
    assert time.monotonic() - started < 8


def test_timeout_settings_have_defaults_and_are_checked(
    s3_env: None, monkeypatch: pytest.MonkeyPatch, spair: Path
) -> None:
    from pipelines.storage import s3_timeouts

    timeouts = s3_timeouts()
    assert (timeouts.connect, timeouts.read, timeouts.attempts) == (10.0, 60.0, 3)
    for name, value in (("SM_S3_READ_TIMEOUT", "soon"), ("SM_S3_CONNECT_TIMEOUT", "0"), ("SM_S3_MAX_ATTEMPTS", "2.5")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=rf"^{name}='{re.escape(value)}' is not "):
            s3_timeouts()
        monkeypatch.delenv(name)
    result = _shard_cli(spair, "s3://bucket/x", "--s3-read-timeout", "-1")
    assert result.returncode == 2 and "'-1' is not a number of seconds > 0" in result.stderr
    result = _shard_cli(
        spair, "s3://bucket/x", "--s3-endpoint-url", "http://127.0.0.1:9", env={"SM_S3_READ_TIMEOUT": "soon"}
    )
    assert _the_error(result).endswith("SM_S3_READ_TIMEOUT='soon' is not a number of seconds > 0 (default 60.0)")
