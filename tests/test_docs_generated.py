"""The generated reference pages are committed; these fail when one no longer matches.

docs/reference/api.md comes from the proto comments, cli.md from the argparse
parser, settings.md from the pydantic settings model (scripts/gen_*_docs.py).
Each generator renders in a clean environment (no AGENTMESH_* variables, a
fixed terminal width) and the result must equal the committed page.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"),
                                                  ROOT / "scripts" / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, page", [
    ("gen_api_docs.py", "api.md"),
    ("gen_cli_docs.py", "cli.md"),
    ("gen_settings_docs.py", "settings.md"),
])
def test_reference_page_is_fresh(monkeypatch: pytest.MonkeyPatch, script: str,
                                 page: str) -> None:
    generator = _load(script)
    for key in [k for k in os.environ if k.startswith("AGENTMESH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("COLUMNS", "88")
    if script == "gen_api_docs.py":
        fresh = generator.render(generator.descriptor_set())
    else:
        environ = dict(os.environ)
        generator.clean_environment(environ)
        assert environ == dict(os.environ), "clean_environment wants more than this test sets"
        fresh = generator.render()
    committed = ROOT / "docs" / "reference" / page
    assert committed.is_file(), f"{committed} is missing; run `make docs-gen` and commit it"
    assert fresh == committed.read_text(encoding="utf-8"), (
        f"docs/reference/{page} is stale: run `make docs-gen` (or `make docs`) and commit it")
