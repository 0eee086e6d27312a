"""A2A agent cards: a registering agent's card in, the mesh's card out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from a2a.client.card_resolver import parse_agent_card
from a2a.types import a2a_pb2
from google.protobuf.json_format import ParseError

from server.domain.errors import InvalidArgumentError
from server.domain.models import Agent, Capability

MAX_CARD_BYTES = 64 << 10
MAX_DESCRIPTION_BYTES = 2048
MAX_TAGS = 32
MAX_TAG_BYTES = 64
MAX_EXAMPLES = 16
MAX_EXAMPLE_BYTES = 1024
FIELD = "a2a_agent_card"


@dataclass(frozen=True, slots=True)
class CardInfo:
    """What a registering agent's A2A card contributes to its mesh card."""

    name: str
    description: str
    version: str
    skills: tuple[Capability, ...]


def _cut(value: str, limit: int, field: str) -> str:
    if len(value.encode()) > limit:
        raise InvalidArgumentError.field(field, f"at most {limit} bytes")
    return value


def _list(values: Sequence[str], count: int, size: int, field: str) -> tuple[str, ...]:
    if len(values) > count:
        raise InvalidArgumentError.field(field, f"at most {count} entries")
    return tuple(_cut(v, size, f"{field}[{i}]") for i, v in enumerate(values))


def parse_card(text: str) -> CardInfo:
    """The skills and names of an A2A agent card (its JSON); INVALID_ARGUMENT naming the
    field when it is not a card."""
    if len(text.encode()) > MAX_CARD_BYTES:
        raise InvalidArgumentError.field(FIELD, f"at most {MAX_CARD_BYTES} bytes")
    try:
        card = parse_agent_card(json.loads(text))
    except (ValueError, ParseError, TypeError, RecursionError) as exc:  # too deep: INTERNAL
        raise InvalidArgumentError.field(FIELD, f"not an A2A agent card: {exc}"[:300]) from None
    if not card.skills:
        raise InvalidArgumentError.field(f"{FIELD}.skills", "at least one skill")
    skills = []
    for i, s in enumerate(card.skills):
        where = f"{FIELD}.skills[{i}]"
        skills.append(Capability(
            name=s.id, description=_cut(s.description, MAX_DESCRIPTION_BYTES,
                                        f"{where}.description"),
            tags=_list(s.tags, MAX_TAGS, MAX_TAG_BYTES, f"{where}.tags"),
            examples=_list(s.examples, MAX_EXAMPLES, MAX_EXAMPLE_BYTES, f"{where}.examples")))
    return CardInfo(card.name, _cut(card.description, MAX_DESCRIPTION_BYTES,
                                    f"{FIELD}.description"), card.version, tuple(skills))


def mesh_card(agents: Sequence[Agent], *, url: str, version: str) -> a2a_pb2.AgentCard:
    """The mesh as one A2A agent: a skill per capability live agents offer now.

    A skill takes its description, tags and examples from the agents that
    offer it (the first one with a description; tags and examples merged).
    """
    skills: dict[str, a2a_pb2.AgentSkill] = {}
    for agent in sorted(agents, key=lambda a: a.id):
        for cap in agent.capabilities:
            skill = skills.get(cap.name)
            if skill is None:
                skill = skills[cap.name] = a2a_pb2.AgentSkill(id=cap.name, name=cap.name)
            if not skill.description:
                skill.description = cap.description or agent.description or (
                    f"{cap.name}, served by {agent.display_name}")
            skill.tags.extend(t for t in cap.tags or (cap.name,) if t not in skill.tags)
            skill.examples.extend(e for e in cap.examples if e not in skill.examples)
    return a2a_pb2.AgentCard(
        name="agentmesh",
        description=("A mesh of cooperating agents: each skill is a capability that live "
                     "agents offer now. Name the skill in the message metadata "
                     "(\"skill\"); a message's data part (or its text) is the task input."),
        version=version,
        supported_interfaces=[a2a_pb2.AgentInterface(url=url, protocol_binding="JSONRPC",
                                                     protocol_version="1.0")],
        capabilities=a2a_pb2.AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["application/json", "text/plain"],
        default_output_modes=["application/json", "text/plain"],
        skills=[skills[k] for k in sorted(skills)])
