"""The root .dockerignore: the image build (context: the repository root) sends
what deploy/Dockerfile copies and nothing heavy (.venv, node_modules, .git);
and the compose stack's secret files stay out of git."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for what we use: a pattern matches the path or one of its parents
    (no ``!`` exceptions here, so the last match is any match)."""
    assert not any(p.startswith("!") for p in patterns)
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pat.removeprefix("**/"))
               or fnmatch.fnmatch(prefix, pat) for pat in patterns for prefix in prefixes)


def _copied() -> list[str]:
    """Build-context sources of the Dockerfile's COPY lines (not --from=stage)."""
    out = []
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
        if m:
            out += m.group(1).split()[:-1]
    return out


def test_what_the_dockerfile_copies_is_sent() -> None:
    patterns = _patterns()
    copied = _copied()
    assert {"pyproject.toml", "README.md", "gen", "server", "agent_sdk"} <= set(copied)
    for src in copied:
        assert not _ignored(src, patterns), src
    # The console bundle ships inside server/ (package data), so it is sent too.
    assert not _ignored("server/console/static/index.html", patterns)


def test_heavy_and_local_directories_are_not_sent() -> None:
    patterns = _patterns()
    for path in (".venv/bin/python", "node_modules/@bufbuild/buf", ".git/HEAD",
                 "server/__pycache__/cli.cpython-311.pyc", ".coverage", ".mypy_cache/x",
                 "loadtests/k6/out/steady.json", "site/index.html", "agentmesh.egg-info/PKG-INFO",
                 ".agentmesh/snapshots/x"):
        assert _ignored(path, patterns), path


def test_compose_secret_files_are_never_committed() -> None:
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    assert "./observability/secrets:/etc/alertmanager/secrets:ro" in compose
    git = shutil.which("git")
    assert git is not None
    for name in ("slack-webhook-url", "smtp-password"):
        path = f"deploy/observability/secrets/{name}"
        out = subprocess.run([git, "check-ignore", "-q", path], cwd=ROOT, check=False,
                             timeout=30)
        assert out.returncode == 0, f"{path} is not ignored by git"
