"""Loading of the Lua scripts that sit next to this module."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load_script(name: str) -> str:
    """The text of ``server/backends/redis/<name>``."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
