"""The locks (hack/lock) are in step with pyproject.toml, and every install reads them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEV_LOCK = ROOT / "requirements" / "dev.lock"
OPERATOR_LOCK = ROOT / "requirements" / "operator.lock"
TRAINER_LOCK = ROOT / "trainer_image" / "requirements.lock"
DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "trainer_image" / "Dockerfile"]
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)==(\S+)")


def entries(lock: Path) -> dict[str, tuple[str, int]]:
    """Package -> (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    out: dict[str, tuple[str, int]] = {}
    name = None
    for line in lock.read_text().splitlines():
        if m := ENTRY.match(line):
            name = canonicalize_name(m.group(1))
            out[name] = (m.group(2), 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            version, hashes = out[name]
            out[name] = (version, hashes + 1)
    return out


def requirements(*groups: str) -> list[Requirement]:
    """pyproject's requirements of the groups: "runtime" (the operator's) or an extra's name."""
    reqs: list[Requirement] = []
    for group in groups:
        specs = PYPROJECT["dependencies"] if group == "runtime" else PYPROJECT["optional-dependencies"][group]
        reqs += [Requirement(r) for r in specs]
    return reqs


@pytest.mark.parametrize(
    ("lock", "groups", "without"),
    [
        (DEV_LOCK, ("runtime", "trainer", "dev"), ()),
        (OPERATOR_LOCK, ("runtime",), ()),
        (TRAINER_LOCK, ("trainer",), ("torch",)),
    ],
    ids=["dev", "operator", "trainer-image"],
)
def test_every_pyproject_dependency_is_locked_within_its_range(
    lock: Path, groups: tuple[str, ...], without: tuple[str, ...]
) -> None:
    locked = entries(lock)
    for req in requirements(*groups):
        if req.name in without:
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{lock.name}: {req} not locked: run hack/lock"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"{lock.name}: {name}=={version} not in {req}"
        )


@pytest.mark.parametrize("lock", [DEV_LOCK, OPERATOR_LOCK, TRAINER_LOCK], ids=lambda p: p.name)
def test_every_entry_is_pinned_with_hashes(lock: Path) -> None:
    locked = entries(lock)
    assert locked
    assert all(hashes > 0 for _, hashes in locked.values()), [n for n, (_, h) in locked.items() if not h]


def test_the_image_locks_agree_with_the_dev_lock() -> None:
    """One version per package: CI tests exactly what the images run."""
    dev = entries(DEV_LOCK)
    for lock in (OPERATOR_LOCK, TRAINER_LOCK):
        for name, (version, _) in entries(lock).items():
            assert dev[name][0] == version, f"{lock.name}: {name}=={version}, dev.lock has {dev[name][0]}"


def test_the_operator_image_gets_no_trainer_or_dev_package() -> None:
    operator = set(entries(OPERATOR_LOCK))
    runtime = {canonicalize_name(r.name) for r in requirements("runtime")}
    for req in requirements("trainer", "dev"):
        name = canonicalize_name(req.name)
        assert name in runtime or name not in operator, req


def test_the_trainer_image_lock_leaves_torch_to_the_base_image() -> None:
    trainer = entries(TRAINER_LOCK)
    assert "torch" not in trainer and not [n for n in trainer if n.startswith("nvidia-")]
    # torch in the dev lock is PyPI's Linux wheel, as hack/setup has always installed it.
    assert entries(DEV_LOCK)["torch"][0] == "2.15.0"


def test_dev_tools_are_pinned_exactly() -> None:
    for req in requirements("dev"):
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"dev tool {req} must be pinned with =="


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_install_from_the_lock_and_pin_nothing_themselves(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    installs = re.findall(r"pip install[^&]*", text.replace("\\\n", " "))
    assert installs
    assert any("--require-hashes" in i and "-r " in i for i in installs), installs
    for line in installs:
        assert not re.search(r"[A-Za-z0-9_\-]+(==|>=|~=)", line), f"{dockerfile}: a pin of its own: {line}"
    assert not re.search(r"^ARG \w+_VERSION", text, re.MULTILINE), f"{dockerfile}: version ARG"


def test_setup_and_ci_install_from_the_lock() -> None:
    setup = (ROOT / "hack" / "setup").read_text()
    assert "pip install -q --require-hashes -r requirements/dev.lock" in setup
    assert "--no-deps --no-build-isolation -e ." in setup
    assert "-e '.[" not in setup, "an unlocked resolve of the extras"
    assert "./hack/setup" in (ROOT / "hack" / "test").read_text()
    assert "./hack/test" in (ROOT / ".ci" / "run").read_text()
