"""gen/ is committed; this fails when it no longer matches protos/."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "protos").rglob("*.proto"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--mypy_out={tmp_path}",
         f"--mypy_grpc_out={tmp_path}", *protos],
        cwd=ROOT, env=env, check=True, capture_output=True)
    fresh = tmp_path / "agentmesh" / "v1"
    committed = ROOT / "gen" / "agentmesh" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names, "protoc generated nothing"
    stale = [n for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    missing = sorted({p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi")}
                     - set(names) - {"__init__.py"})
    assert not stale and not missing, (
        f"gen/ is stale ({stale or missing}); run `make protos` and commit gen/")
