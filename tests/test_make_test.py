"""`make test` prints why tests were skipped: a plain run used to say only
"N skipped", hiding which service or tool was missing and how to get it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest_flags() -> list[str]:
    """The flags `make test` passes to pytest (read from `make -n`, nothing runs)."""
    dry = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    lines = [ln for ln in dry.stdout.splitlines() if "bin/pytest" in ln]
    assert lines, dry.stdout + dry.stderr
    return [a for a in shlex.split(lines[-1])[1:] if not a.startswith("--cov")]


def test_make_test_lists_each_skip_with_its_reason(tmp_path: Path) -> None:
    flags = _pytest_flags()
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pytest\n\n\ndef test_needs_a_service():\n"
                     "    pytest.skip('Redis is not reachable; `.ci/run` starts it')\n")
    out = subprocess.run([sys.executable, "-m", "pytest", *flags, str(probe)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SKIPPED [1]" in out.stdout, out.stdout
    assert "Redis is not reachable; `.ci/run` starts it" in out.stdout, out.stdout
