"""console/src/format.js, run by node itself: what the console shows for figures
(autonomy on a mesh where nothing has ended is "n/a", not "100.0 %" of 0 of 0)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

from tests._services import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
FORMAT = ROOT / "console" / "src" / "format.js"


def _node(expr: str) -> object:
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node is not installed (the console build needs it too)")
    # Imported as a data: module, so it is ESM whatever the nearest package.json says.
    source = base64.b64encode(FORMAT.read_bytes()).decode()
    script = (f"const f = await import('data:text/javascript;base64,{source}');\n"
              f"console.log(JSON.stringify({expr}));")
    out = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_autonomy_is_na_until_a_task_ends() -> None:
    assert _node("[f.autonomy(1, 0), f.autonomy(1, 7), f.autonomy(0.9995, 2000)]") == [
        "n/a", "100.0 %", "100.0 %"]
    assert _node("f.autonomy(0.5, 2)") == "50.0 %"
