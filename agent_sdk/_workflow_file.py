"""Loading workflow definitions from YAML (or JSON, which is YAML) files."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from agent_sdk._types import WorkflowSpec


def load_workflow_file(path: str | os.PathLike[str]) -> WorkflowSpec:
    """Read a workflow YAML file into a :class:`WorkflowSpec`.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming
    the file and the bad field) for invalid YAML or a bad shape.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from exc
    try:
        return WorkflowSpec.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from exc
