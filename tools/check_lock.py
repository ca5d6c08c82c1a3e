"""Check that requirements-lock.txt matches pyproject.toml's dependency declarations.

Standard library only (Python 3.11+), so CI can run it before any virtual environment exists:

    python3 tools/check_lock.py            # exit 0, or 1 with a one-line message saying to run `make lock`
    python3 tools/check_lock.py --stamp    # after pip-compile (make lock): record the declarations' digest

Two checks:

1. the lock's header line ``# pyproject-deps-sha256: <hex>`` equals the sha256 of pyproject.toml's
   ``project.dependencies`` and ``project.optional-dependencies`` (canonical JSON), written by
   ``make lock``; any edit to those declarations, even one the old pins still satisfy, asks for a relock;
2. every direct requirement (the dependencies and every extra) is pinned in the lock (``name==version``
   with at least one ``--hash``) at a version its specifier admits (PEP 440, including ``~=``, ``==X.*``,
   ``!=``, ``<``, ``>``). A requirement with an environment marker may be absent from the lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP_PREFIX = "# pyproject-deps-sha256:"
STAMP_RE = re.compile(r"^# pyproject-deps-sha256:\s*([0-9a-f]{64})\s*$", re.MULTILINE)

# --- PEP 440 versions, enough to compare pins with specifiers -------------------------------------

_VERSION_RE = re.compile(
    r"""^\s*v?
    (?:(?P<epoch>[0-9]+)!)?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?:[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?:-(?P<post_n1>[0-9]+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?)?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


class Version:
    """A parsed PEP 440 version; ``key`` orders like packaging.version.Version."""

    def __init__(self, text: str):
        m = _VERSION_RE.match(text)
        if not m:
            raise ValueError(f"not a PEP 440 version: {text!r}")
        self.text = text.strip()
        self.epoch = int(m["epoch"] or 0)
        self.release = tuple(int(p) for p in m["release"].split("."))
        self.pre = (_PRE_RANK[m["pre_l"].lower()], int(m["pre_n"] or 0)) if m["pre_l"] else None
        post = m["post_n1"] or (m["post_n2"] or "0" if m["post_l"] else None)
        self.post = int(post) if post is not None else None
        self.dev = int(m["dev_n"] or 0) if m["dev_l"] else None
        self.local = m["local"]

    @property
    def is_prerelease(self) -> bool:
        return self.pre is not None or self.dev is not None

    def public(self) -> Version:
        return Version(self.text.split("+", 1)[0])

    @property
    def key(self) -> tuple:
        release = list(self.release)
        while len(release) > 1 and release[-1] == 0:
            release.pop()
        if self.pre is None and self.post is None and self.dev is not None:
            pre = (-1,)  # 1.0.dev0 sorts before 1.0a0
        elif self.pre is None:
            pre = (3,)  # a final release after all its pre-releases
        else:
            pre = (0, *self.pre)
        post = (self.post,) if self.post is not None else (-1,)
        dev = (0, self.dev) if self.dev is not None else (1, 0)
        local = (
            ()
            if self.local is None
            else tuple((1, int(p)) if p.isdigit() else (0, p.lower()) for p in re.split(r"[-_.]", self.local))
        )
        return (self.epoch, tuple(release), pre, post, dev, local)


def _release_prefix_match(version: Version, prefix: str) -> bool:
    """``==prefix.*``: the release starts with prefix's release segments (zero-padded)."""
    spec = Version(prefix)
    if version.epoch != spec.epoch:
        return False
    n = len(spec.release)
    release = version.release + (0,) * max(0, n - len(version.release))
    return release[:n] == spec.release


def admits(specifier: str, version_text: str) -> bool:
    """Whether a PEP 440 specifier set (``">=1.2,!=1.3.*"``; empty admits all) admits a version."""
    version = Version(version_text)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        m = re.match(r"^(===|~=|==|!=|<=|>=|<|>)\s*(\S+)$", clause)
        if not m:
            raise ValueError(f"not a version specifier: {clause!r}")
        op, target = m.groups()
        if op == "===":
            ok = version.text.lower() == target.lower()
        elif op in ("==", "!=") and target.endswith(".*"):
            ok = _release_prefix_match(version, target[:-2])
            ok = ok if op == "==" else not ok
        elif op in ("==", "!="):
            spec = Version(target)
            candidate = version if spec.local is not None else version.public()
            ok = candidate.key == spec.key
            ok = ok if op == "==" else not ok
        elif op == "~=":
            spec = Version(target)
            if len(spec.release) < 2:
                raise ValueError(f"~= needs two release segments: {clause!r}")
            prefix = ".".join(str(p) for p in spec.release[:-1])
            if spec.epoch:
                prefix = f"{spec.epoch}!{prefix}"
            ok = version.public().key >= spec.key and _release_prefix_match(version, prefix)
        else:
            spec = Version(target)
            candidate = version.public()
            if op == ">=":
                ok = candidate.key >= spec.key
            elif op == "<=":
                ok = candidate.key <= spec.key
            elif op == ">":
                # >V excludes V's post-releases unless V is one (PEP 440)
                ok = candidate.key > spec.key and not (
                    spec.post is None
                    and candidate.post is not None
                    and candidate.public().key[:2] == spec.key[:2]
                    and candidate.pre is None
                )
            else:  # "<": <V excludes V's pre-releases unless V is one
                ok = candidate.key < spec.key and not (
                    not spec.is_prerelease and candidate.is_prerelease and candidate.key[:2] == spec.key[:2]
                )
        if not ok:
            return False
    return True


# --- requirements ----------------------------------------------------------------------------------

_REQ_RE = re.compile(
    r"""^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*
    (?:\[(?P<extras>[^\]]*)\])?\s*
    (?:@\s*(?P<url>[^;\s]+)\s*|\(?(?P<spec>[^;()]*)\)?\s*)
    (?:;(?P<marker>.*))?$""",
    re.VERBOSE,
)


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> dict:
    m = _REQ_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse requirement {text!r}")
    return {
        "name": canonical_name(m["name"]),
        "spec": (m["spec"] or "").replace(" ", ""),
        "url": m["url"],
        "marker": (m["marker"] or "").strip() or None,
    }


def declarations(pyproject: Path) -> dict:
    project = tomllib.loads(pyproject.read_text())["project"]
    return {
        "dependencies": list(project.get("dependencies", [])),
        "optional-dependencies": {k: list(v) for k, v in project.get("optional-dependencies", {}).items()},
    }


def declarations_digest(pyproject: Path) -> str:
    blob = json.dumps(declarations(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def lock_pins(lock_text: str) -> tuple[dict[str, str], list[str]]:
    """{canonical name: pinned version} and the problems with the lock's own lines (unpinned, no hash)."""
    pins: dict[str, str] = {}
    problems: list[str] = []
    logical = re.sub(r"\\\r?\n", " ", lock_text)
    for line in logical.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line or line.startswith("-"):
            continue
        hashes = re.findall(r"--hash=(\w+):\w+", line)
        req_text = re.split(r"\s--", " " + line, maxsplit=1)[0].strip()
        m = re.match(
            r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*(?P<version>[^\s;*]+)\s*(?:;.*)?$", req_text
        )
        if not m:
            problems.append(f"lock line not pinned with ==: {req_text!r}")
            continue
        name = canonical_name(m["name"])
        if not hashes:
            problems.append(f"{name} has no --hash in the lock")
        pins[name] = m["version"]
    return pins, problems


def check(pyproject: Path, lock: Path) -> list[str]:
    """The reasons the lock disagrees with pyproject.toml; empty when it is current."""
    if not lock.is_file():
        return [f"{lock.name} is missing"]
    text = lock.read_text()
    problems: list[str] = []
    stamp = STAMP_RE.search(text)
    if not stamp:
        problems.append(f"{lock.name} records no '{STAMP_PREFIX}' line")
    elif stamp.group(1) != declarations_digest(pyproject):
        problems.append(f"the dependencies in {pyproject.name} changed since {lock.name} was written")
    pins, lock_problems = lock_pins(text)
    problems += lock_problems
    decl = declarations(pyproject)
    direct = [("", r) for r in decl["dependencies"]]
    direct += [(f" (extra {extra})", r) for extra, reqs in decl["optional-dependencies"].items() for r in reqs]
    for where, raw in direct:
        req = parse_requirement(raw)
        version = pins.get(req["name"])
        if version is None:
            if req["marker"] is None:
                problems.append(f"{req['name']}{where} is not pinned in {lock.name}")
            continue
        try:
            ok = admits(req["spec"], version)
        except ValueError as exc:
            problems.append(f"{req['name']}{where}: {exc}")
            continue
        if not ok:
            problems.append(f"{req['name']}=={version} in {lock.name} is outside {raw!r}{where}")
    return problems


def stamp(pyproject: Path, lock: Path) -> None:
    """Write (or replace) the digest line, just below pip-compile's header comment."""
    text = lock.read_text()
    line = f"{STAMP_PREFIX} {declarations_digest(pyproject)}"
    if STAMP_RE.search(text):
        text = STAMP_RE.sub(line, text, count=1)
    else:
        lines = text.splitlines(keepends=True)
        at = 0
        while at < len(lines) and lines[at].startswith("#"):
            at += 1
        note = "# The sha256 of pyproject.toml's dependency declarations (tools/check_lock.py checks it):\n"
        lines[at:at] = [note, line + "\n", "#\n"]
        text = "".join(lines)
    lock.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements-lock.txt")
    parser.add_argument("--stamp", action="store_true", help="record the declarations' digest in the lock first")
    args = parser.parse_args(argv)
    if args.stamp:
        stamp(args.pyproject, args.lock)
    problems = check(args.pyproject, args.lock)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(
            f"{args.lock.name} does not match {args.pyproject.name}: {problems[0]}{more}; run `make lock`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
