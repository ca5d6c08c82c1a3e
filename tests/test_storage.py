"""Location: the same behaviour on a local directory and on a real S3-compatible server."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.storage import Location, open_url


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path: Path) -> Location:
    if request.param == "local":
        return Location(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Location(f"{bucket}/some/prefix", request.getfixturevalue("s3_endpoint"))


def test_put_read_list_remove(location: Location, tmp_path: Path) -> None:
    location.put_bytes("a/b.bin", b"abc")
    local = tmp_path / "upload.bin"
    local.write_bytes(b"0123456789")
    location.put_file("c.tar", local)
    assert not local.exists()
    assert location.read_bytes("a/b.bin") == b"abc"
    assert location.list_files("") == {"a/b.bin": 3, "c.tar": 10}
    assert location.list_files("a") == {"a/b.bin": 3}
    assert location.list_files("missing") == {}
    assert location.exists("a") and location.exists("c.tar") and not location.exists("d")
    with open_url(location.full("c.tar"), location.endpoint_url) as stream:
        assert stream.read() == b"0123456789"
    location.remove("c.tar")
    assert location.list_files("") == {"a/b.bin": 3}


def test_missing_file_names_the_path(location: Location) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        location.read_bytes("nothing-here.json")


def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    location = Location(str(tmp_path))
    location.put_bytes("x.json", b"{}")
    location.put_bytes("x.json", b"[]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    assert location.read_text("x.json") == "[]"


def test_bucket_is_required() -> None:
    with pytest.raises(ValueError, match="bucket"):
        Location("s3:///prefix")
