"""Every `agentmesh` command the docs show parses with the real CLI parser.

Code blocks of docs/*.md, README.md and examples/README.md are scanned for command lines that run
``.venv/bin/agentmesh`` (also after a pipe or an environment assignment); each
is split like a shell would and handed to ``server.cli.build_parser()``. A
renamed subcommand or flag in the code then fails here instead of in a
reader's terminal. Placeholders in capitals (TASK_ID, NAME) are ordinary
arguments to the parser.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from server.cli import CLIError, build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md",
         *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console", "text"}
PROGRAM = ".venv/bin/agentmesh"


def _words(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at pipes, ; and &&)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in {"|", ";", "&&", "||", "&"}:
            out.append([])
        else:
            out[-1].append(token)
    return out


def commands() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for page in PAGES:
        for lang, block in FENCE.findall(page.read_text(encoding="utf-8")):
            if lang.strip() not in SHELL_BLOCKS:
                continue
            for line in block.replace("\\\n", " ").splitlines():
                if PROGRAM not in line:
                    continue
                where = f"{page.relative_to(ROOT)}: {line.strip()}"
                for simple in _words(line.removeprefix("$ ").strip()):
                    words = list(simple)
                    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                        words.pop(0)  # VAR=value prefix
                    if words and words[0] == "xargs":
                        words = words[2:] if words[1:2] == ["-n1"] else words[1:]
                    if words and words[0] == PROGRAM:
                        found.append((where, shlex.join(words[1:])))
    return found


COMMANDS = commands()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 30, "the scan found too few commands: is it still working?"


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_command_parses(where: str, argv: str) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(shlex.split(argv))
    except CLIError as exc:
        pytest.fail(f"{where}: the CLI refuses it: {exc.message}")
    except SystemExit as exc:
        pytest.fail(f"{where}: the CLI refuses it (exit {exc.code})")
    assert args.command, where
