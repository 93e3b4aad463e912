"""hack/setup and the other scripts stop only processes they started (by recorded PID)."""

import re
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [p for d in ("hack", ".ci") for p in (ROOT / d).iterdir() if p.is_file()]
# Stopping by name (or by a broad pattern) would hit processes of the user's own.
BY_NAME = re.compile(r"\b(pkill|killall|kill\s+-[A-Z0-9]*\s*-1\b|pgrep\b.*\|\s*xargs\s+kill)")


def test_no_script_stops_processes_by_name() -> None:
    offenders = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in SCRIPTS
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if BY_NAME.search(line) and not line.lstrip().startswith("#")
    ]
    assert not offenders, offenders


def test_foreign_prometheus_survives_the_apt_step(tmp_path: Path) -> None:
    # A process of the user's that is named prometheus (comm is the executable's basename).
    fake = tmp_path / "prometheus"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "300"])
    try:
        time.sleep(0.1)
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "prometheus"
        result = subprocess.run(
            [str(ROOT / "hack" / "setup"), "apt"], capture_output=True, text=True, timeout=600, check=False
        )
        assert result.returncode == 0, result.stderr
        assert proc.poll() is None, "hack/setup apt stopped a prometheus it did not start"
    finally:
        proc.kill()
        proc.wait()


def test_unknown_step_is_refused_with_exit_2() -> None:
    result = subprocess.run(
        [str(ROOT / "hack" / "setup"), "nope"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "unknown step 'nope'" in result.stderr
