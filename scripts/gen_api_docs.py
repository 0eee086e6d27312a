"""Generate docs/reference/api.md from the comments in protos/ (never edit it by hand).

protoc (grpc_tools) compiles the protos into a descriptor set with source info,
so every comment on a service, method, message, field, enum and value is read
from the descriptors, exactly as buf lint sees them. Run by ``make docs`` and
``make protos``; ``tests/test_docs_generated.py`` fails when the committed page
is stale.

    .venv/bin/python scripts/gen_api_docs.py [--out docs/reference/api.md]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "agentmesh.v1"
DEFAULT_OUT = ROOT / "docs" / "reference" / "api.md"
FILE_ORDER = ("discovery.proto", "task.proto", "state.proto", "bus.proto", "common.proto")
"""Files in reading order (an agent's path first); others follow by name."""
# Field numbers in descriptor.proto, used to address comments (SourceCodeInfo paths).
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2

_SCALARS = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """Compile protos/ into a FileDescriptorSet with comments."""
    protos = sorted(str(p.relative_to(ROOT / "protos"))
                    for p in (ROOT / "protos").rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", "--include_source_info",
             f"--descriptor_set_out={out}", *protos],
            cwd=ROOT, check=True, capture_output=True)
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return fds


def _escape(text: str) -> str:
    """Markdown-safe text: code spans kept, <, >, * and | escaped outside them."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = (parts[i].replace("&", "&amp;").replace("<", "&lt;")
                    .replace(">", "&gt;").replace("*", r"\*"))
    return "`".join(parts).replace("|", r"\|")


class Comments:
    """Leading comments of one file by SourceCodeInfo path."""

    def __init__(self, f: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(loc.path): loc.leading_comments
                         for loc in f.source_code_info.location if loc.leading_comments}

    def paragraph(self, *path: int) -> str:
        """The comment as Markdown paragraphs (blank comment lines split them)."""
        raw = self._by_path.get(path, "")
        lines = [line[1:] if line.startswith(" ") else line for line in raw.splitlines()]
        paragraphs = re.split(r"\n\s*\n", "\n".join(lines).strip())
        return "\n\n".join(_escape(" ".join(p.split())) for p in paragraphs if p.strip())

    def cell(self, *path: int) -> str:
        """The comment on one line, for a table cell."""
        return " ".join(self.paragraph(*path).split())


def _anchor(full_name: str) -> str:
    return full_name.lstrip(".")


def _type_name(field: descriptor_pb2.FieldDescriptorProto,
               maps: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    """The field's type as Markdown, linked when it is one of ours."""
    if field.type_name in maps:
        entry = maps[field.type_name]
        key, value = entry.field[0], entry.field[1]
        return f"map&lt;{_type_name(key, maps)}, {_type_name(value, maps)}&gt;"
    if field.type in _SCALARS:
        name = _SCALARS[field.type]
    elif field.type_name.startswith(f".{PACKAGE}."):
        short = field.type_name.removeprefix(f".{PACKAGE}.")
        name = f"[{short}](#{_anchor(field.type_name)})"
    else:
        name = f"`{field.type_name.lstrip('.')}`"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {name}"
    if field.proto3_optional:
        return f"optional {name}"
    return name


def _roles(table: Mapping[str, Any], service: str, method: str) -> str:
    """Roles allowed to call the method (``server/api/auth.py``, ``RPC_ROLES``)."""
    allowed = table.get(f"/{service.lstrip('.')}/{method}")
    if not allowed:
        return "none (refused)"
    return ", ".join(sorted(str(getattr(r, "value", r)) for r in allowed))


def _rpc_type(type_name: str, streaming: bool) -> str:
    short = type_name.removeprefix(f".{PACKAGE}.")
    link = f"[{short}](#{_anchor(type_name)})"
    return f"stream {link}" if streaming else link


def render(fds: descriptor_pb2.FileDescriptorSet) -> str:
    order = {name: i for i, name in enumerate(FILE_ORDER)}
    files = sorted((f for f in fds.file if f.package == PACKAGE),
                   key=lambda f: (order.get(Path(f.name).name, len(order)), f.name))
    out: list[str] = [
        "# gRPC API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from protos/agentmesh/v1; do not edit. "
        "Run `make docs` (or `make protos`) after changing a .proto. -->",
        "",
        f"Package `{PACKAGE}`, generated from the comments in `protos/agentmesh/v1/*.proto`. "
        "Every service also has the standard `grpc.health.v1.Health` and server reflection "
        "beside it, so `grpcurl -plaintext 127.0.0.1:50051 list` shows them on a running "
        "server. The roles column is `RPC_ROLES` in `server/api/auth.py`: with "
        "authentication on, only a token of those roles may call the method "
        "([security](../operations/security.md)). How the pieces fit together: "
        "[Concepts](../concepts/index.md); the agent streams step by step: "
        "[the agent protocol](../protocol.md).",
        "",
    ]
    from server.api.auth import RPC_ROLES  # noqa: PLC0415 - the one role table

    roles: Mapping[str, Any] = RPC_ROLES
    for f in files:
        comments = Comments(f)
        out += [f"## {Path(f.name).name} {{ #{Path(f.name).stem} }}", ""]
        for si, service in enumerate(f.service):
            full = f".{PACKAGE}.{service.name}"
            out += [f"### {service.name} {{ #{_anchor(full)} }}", "",
                    comments.paragraph(FILE_SERVICE, si), ""]
            out += ["| method | request | response | roles (with auth) |", "|---|---|---|---|"]
            for method in service.method:
                out.append(f"| [{method.name}](#{_anchor(full)}.{method.name}) "
                           f"| {_rpc_type(method.input_type, method.client_streaming)} "
                           f"| {_rpc_type(method.output_type, method.server_streaming)} "
                           f"| {_roles(roles, full, method.name)} |")
            out.append("")
            for mi, method in enumerate(service.method):
                out += [f"#### {method.name} {{ #{_anchor(full)}.{method.name} }}",
                        "",
                        f"`rpc {method.name}({'stream ' if method.client_streaming else ''}"
                        f"{method.input_type.removeprefix(f'.{PACKAGE}.')}) returns "
                        f"({'stream ' if method.server_streaming else ''}"
                        f"{method.output_type.removeprefix(f'.{PACKAGE}.')})`",
                        "",
                        comments.paragraph(FILE_SERVICE, si, SERVICE_METHOD, mi), ""]
        for mi, message in enumerate(f.message_type):
            out += _message(message, f".{PACKAGE}", (FILE_MESSAGE, mi), comments)
        for ei, enum in enumerate(f.enum_type):
            out += _enum(enum, f".{PACKAGE}", (FILE_ENUM, ei), comments)
    return "\n".join(out).rstrip() + "\n"


def _message(message: descriptor_pb2.DescriptorProto, scope: str, path: tuple[int, ...],
             comments: Comments) -> list[str]:
    full = f"{scope}.{message.name}"
    maps = {f"{full}.{n.name}": n for n in message.nested_type if n.options.map_entry}
    title = full.removeprefix(f".{PACKAGE}.")
    out = [f"### {title} {{ #{_anchor(full)} }}", "", comments.paragraph(*path), ""]
    if message.field:
        out += ["| field | number | type | description |", "|---|---|---|---|"]
        real_oneofs = [o.name for i, o in enumerate(message.oneof_decl)
                       if not any(fl.proto3_optional and fl.oneof_index == i
                                  for fl in message.field)]
        for fi, field in enumerate(message.field):
            note = ""
            if field.HasField("oneof_index") and not field.proto3_optional:
                note = f"(oneof `{message.oneof_decl[field.oneof_index].name}`) "
            out.append(f"| `{field.name}` | {field.number} | {_type_name(field, maps)} "
                       f"| {note}{comments.cell(*path, MESSAGE_FIELD, fi)} |")
        out.append("")
        if real_oneofs:
            out += [f"Exactly one of the fields marked oneof `{name}` is set."
                    for name in real_oneofs]
            out.append("")
    else:
        out += ["No fields.", ""]
    for ni, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            out += _message(nested, full, (*path, MESSAGE_NESTED, ni), comments)
    for ei, enum in enumerate(message.enum_type):
        out += _enum(enum, full, (*path, MESSAGE_ENUM, ei), comments)
    return out


def _enum(enum: descriptor_pb2.EnumDescriptorProto, scope: str, path: tuple[int, ...],
          comments: Comments) -> list[str]:
    full = f"{scope}.{enum.name}"
    out = [f"### {full.removeprefix(f'.{PACKAGE}.')} {{ #{_anchor(full)} }}", "",
           comments.paragraph(*path), "",
           "| value | number | description |", "|---|---|---|"]
    for vi, value in enumerate(enum.value):
        out.append(f"| `{value.name}` | {value.number} "
                   f"| {comments.cell(*path, ENUM_VALUE, vi)} |")
    out.append("")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(descriptor_set()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
