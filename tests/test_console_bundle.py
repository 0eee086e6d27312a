"""The committed console bundle (server/console/static) is what its sources build.

Decision: the built front end is committed, so ``pip install -e .`` (or a
wheel) and ``agentmesh serve`` give a working console with no Node on the
machine. The price is this check: the sources are built again into a
temporary directory (Vite's output is deterministic: the file names are
content hashes) and every file must equal the committed one. After a change
under console/, run ``make console`` and commit server/console/static.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests._services import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "server" / "console" / "static"
VITE = ROOT / "node_modules" / ".bin" / "vite"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_committed_bundle_is_built_from_the_current_sources(tmp_path: Path) -> None:
    if not VITE.exists() or shutil.which("node") is None:
        skip_or_fail("node_modules missing: run `npm install` (make test does)")
    out = tmp_path / "static"
    subprocess.run([str(VITE), "build", "--config", "console/vite.config.mjs", "--outDir",
                    str(out), "--emptyOutDir", "--logLevel", "error"], cwd=ROOT, check=True,
                   timeout=120)
    built, committed = _files(out), _files(STATIC)
    assert sorted(built) == sorted(committed), "run `make console` and commit the bundle"
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"stale bundle files {stale}: run `make console` and commit them"


def test_the_page_references_only_bundled_assets() -> None:
    """Nothing is fetched from the internet at run time: every URL is local."""
    html = (STATIC / "index.html").read_text()
    assert "http://" not in html and "https://" not in html
    for asset in (STATIC / "assets").iterdir():
        text = asset.read_text(errors="replace")
        assert "https://cdn" not in text and "fonts.googleapis" not in text, asset.name
    for ref in ("/assets/",):
        assert ref in html
