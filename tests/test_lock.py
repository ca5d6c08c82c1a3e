"""requirements-lock.txt against pyproject.toml, through tools/check_lock.py (no network, no installs)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKER = REPO_ROOT / "tools" / "check_lock.py"
LOCK = REPO_ROOT / "requirements-lock.txt"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_lock", CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = _load_checker()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECKER), *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """pyproject.toml and the lock, copied into tmp_path."""
    pyproject, lock = tmp_path / "pyproject.toml", tmp_path / "requirements-lock.txt"
    shutil.copy(REPO_ROOT / "pyproject.toml", pyproject)
    shutil.copy(LOCK, lock)
    return pyproject, lock


def test_committed_lock_is_current():
    assert check_lock.check(REPO_ROOT / "pyproject.toml", LOCK) == []
    result = _run()
    assert result.returncode == 0, result.stderr


def test_every_pin_has_a_hash():
    pins, problems = check_lock.lock_pins(LOCK.read_text())
    assert problems == []
    assert {"torch", "torchvision", "botocore", "pytest", "moto", "jsonschema"} <= set(pins)


def _one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "make lock" in lines[0]
    return lines[0]


def test_changed_pyproject_is_detected(copies):
    pyproject, lock = copies
    text = pyproject.read_text()
    # A new dependency: the digest changes and the package is not pinned.
    pyproject.write_text(
        re.sub(r"^dependencies = \[", 'dependencies = [\n    "tabulate>=0.9",', text, count=1, flags=re.MULTILINE)
    )
    assert pyproject.read_text() != text
    message = _one_line_failure(_run("--pyproject", str(pyproject), "--lock", str(lock)))
    assert "changed" in message and "1 more" in message
    # A tightened specifier the pin still satisfies: only the digest tells.
    tightened = text.replace('"numpy>=1.26"', '"numpy>=1.26,<3"', 1)
    assert tightened != text
    pyproject.write_text(tightened)
    problems = check_lock.check(pyproject, lock)
    assert len(problems) == 1 and "changed" in problems[0]


def test_pin_outside_its_specifier_is_detected(copies):
    pyproject, lock = copies
    text = lock.read_text()
    pinned = re.search(r"^numpy==(\S+)", text, re.MULTILINE).group(1)
    lock.write_text(text.replace(f"numpy=={pinned} ", "numpy==1.25.2 ", 1))
    message = _one_line_failure(_run("--pyproject", str(pyproject), "--lock", str(lock)))
    assert "numpy==1.25.2" in message and "numpy>=1.26" in message


def test_stamp_makes_a_copy_current(copies):
    pyproject, lock = copies
    pyproject.write_text(pyproject.read_text().replace('"pytest>=8"', '"pytest>=8.1"', 1))
    assert check_lock.check(pyproject, lock)
    assert _run("--stamp", "--pyproject", str(pyproject), "--lock", str(lock)).returncode == 0
    assert check_lock.check(pyproject, lock) == []


@pytest.mark.parametrize(
    ("specifier", "version", "expected"),
    [
        (">=2.3", "2.14.1", True),
        (">=0.18", "0.29.1", True),
        (">=1.26", "1.25.2", False),
        (">=2.50", "2.9.0", False),
        (">=1.0", "1.0.0", True),
        (">=5", "5.0.0rc1", False),
        ("<2", "2.0.dev1", False),
        ("<2", "1.9.post1", True),
        ("~=1.4.2", "1.4.9", True),
        ("~=1.4.2", "1.5.0", False),
        ("==2.14.*", "2.14.1+cu130", True),
        ("!=1.3.*,>=1", "1.3.4", False),
        ("==2.14.1", "2.14.1+cu130", True),
        (">=2026.1", "2026.10.19.post1", True),
        ("", "0.1", True),
    ],
)
def test_specifiers(specifier, version, expected):
    assert check_lock.admits(specifier, version) is expected
