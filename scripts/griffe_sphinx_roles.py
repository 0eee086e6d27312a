"""Griffe extension for the SDK reference: reST roles in docstrings become code spans.

The SDK's docstrings use Sphinx roles (``:class:`MeshClient```) and ``::``
literal blocks; mkdocstrings renders Markdown, where those would show as raw
text. Loaded by mkdocs.yml (mkdocstrings ``extensions``), docs only.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(?m)^(\s*)(.*?)::\s*$")


def _markdown(text: str) -> str:
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return _LITERAL.sub(lambda m: f"{m.group(1)}{m.group(2)}:" if m.group(2) else "", text)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring once it is loaded."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _markdown(obj.docstring.value)
