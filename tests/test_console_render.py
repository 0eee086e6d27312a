"""Payloads and agent health as the console shows them (pure functions)."""

from __future__ import annotations

import base64
import json

from server.console import render
from server.console.feed import MAX_TOPICS, Listener
from server.domain.models import Agent, AgentState, Payload


def test_json_is_pretty_text_is_text_bytes_are_hex() -> None:
    shown = render.payload(Payload(b'{"b":1,"a":[1,2]}', {"encoding": b"json/plain"}))
    assert shown is not None and shown["kind"] == "json"
    assert json.loads(shown["text"]) == {"a": [1, 2], "b": 1} and "\n" in shown["text"]
    text = render.payload(Payload("<script>alert(1)</script> café".encode()))
    assert text is not None and text["kind"] == "text"
    assert text["text"] == "<script>alert(1)</script> café"  # shown as text, never markup
    raw = bytes(range(256))
    binary = render.payload(Payload(raw))
    assert binary is not None and binary["kind"] == "binary" and binary["size"] == 256
    assert base64.b64decode(binary["base64"]) == raw and binary["hex"].startswith("00 01 02")
    controls = render.payload(Payload(b"ok\x00\x1b[31m"))
    assert controls is not None and controls["kind"] == "binary"
    assert render.payload(None) is None
    assert render.payload(Payload(b""))["kind"] == "empty"  # type: ignore[index]


def test_large_payloads_are_cut_with_their_size() -> None:
    big = render.payload(Payload(b"x" * (render.MAX_SHOWN + 10)))
    assert big is not None and big["truncated"] and big["size"] == render.MAX_SHOWN + 10
    assert len(big["text"]) == render.MAX_SHOWN
    # A cut in the middle of a UTF-8 character is still text.
    cut = render.payload(Payload("é".encode() * render.MAX_SHOWN))
    assert cut is not None and cut["kind"] == "text" and set(cut["text"]) == {"é"}


def test_health_classes_before_gone() -> None:
    agent = Agent(id="a", display_name="a", heartbeat_time=100.0)
    assert render.health(agent, now=100.5, interval=1.0) == "ok"
    assert render.health(agent, now=101.2, interval=1.0) == "late"
    assert render.health(agent, now=102.5, interval=1.0) == "hung"
    assert render.health(Agent(id="b", display_name="b"), now=5, interval=1.0) == "starting"
    gone = Agent(id="c", display_name="c", state=AgentState.GONE, heartbeat_time=1.0)
    assert render.health(gone, now=500, interval=1.0) == "gone"


def test_trace_id_from_traceparent() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert render.trace_id({"traceparent": tp}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert render.trace_id({"traceparent": "garbage"}) == ""
    assert render.trace_id({}) == ""


def test_a_listener_bounds_its_dirty_set() -> None:
    listener = Listener("ns")
    for i in range(MAX_TOPICS + 50):
        listener.mark(("tasks", f"task:{i}"))
    topics, many = listener.take()
    assert many and topics == ["tasks"]
    assert listener.take() == ([], False) and not listener.changed.is_set()


def test_json_nested_past_the_parsers_depth_is_shown_as_text() -> None:
    """2 kB of brackets made the parser raise RecursionError: the task's page failed."""
    deep = b"[" * 2000 + b"]" * 2000
    shown = render.payload(Payload(deep, {"encoding": b"json/plain"}))
    assert shown is not None and shown["kind"] == "text" and shown["text"] == deep.decode()

