"""Server settings: flags of ``agentmesh serve`` and ``AGENTMESH_*`` env vars.

Built once in ``server/cli.py`` (or by tests, explicitly) and passed down.
The defaults are the embedded mode: memory store, in-process bus, local
snapshot directory, no external service.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SHORTHANDS = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
}
"""A bare backend name means that backend's local default address, so
``agentmesh serve --store redis --bus nats`` runs against services on this
machine's default ports."""


MESSAGE_HEADROOM_BYTES = 64 << 10
"""Room a gRPC message keeps next to one payload for everything else it carries.

An assignment sends the task's input with its names, labels (at most 64 of
256 + 256 bytes), trace context (at most 8 of 64 + 1024 bytes), lease and
framing: under 48 KiB with every field at its bound (a test checks it). So
``max_message_bytes >= max_payload_bytes + MESSAGE_HEADROOM_BYTES`` (checked
when settings load) means every task that passes the submit checks can be
assigned, and every result an agent reports can be sent.
"""


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
"""Store URL schemes of the Redis stores (``+cluster``: a Redis Cluster)."""

DEFAULT_CONSOLE_PORT = 8470
"""The web console's port in the embedded mode."""

DEFAULT_A2A_PORT = 41241
"""Port of the A2A gateway in embedded mode (the port the A2A samples use)."""


def backend_url(value: str) -> str:
    """The URL of a ``--store``/``--bus`` value (a bare name is expanded)."""
    return SHORTHANDS.get(value.strip().lower(), value)


class Settings(BaseSettings):
    """Every tunable of one ``agentmesh serve`` process."""

    model_config = SettingsConfigDict(env_prefix="AGENTMESH_", env_nested_delimiter="__",
                                      extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    store: str = Field("memory://", description="memory://, redis://host:port/db or "
                       "redis+cluster://host:port,host:port (a Redis Cluster; or a bare "
                       "name: memory, redis)")
    durability: str = Field(
        "auto", description="Redis: replicas that must confirm each write before it is "
        "acknowledged: auto (1 when the primary has a replica, else none), none, or "
        "replicas:N (WAIT N). See docs/operations/durability.md.")
    durability_timeout: float = Field(
        1.0, gt=0, description="Seconds a write waits for its replicas; fewer confirm -> "
        "UNAVAILABLE (the client retries).")
    bus: str = Field("memory://", description="memory://, nats://host:port or amqp://... "
                     "(or a bare name: memory, nats, amqp)")
    stream_replicas: int = Field(
        0, ge=0, le=5, description="NATS JetStream replicas of the durable-bus stream; 0: "
        "3 on a cluster of 3 or more servers, else 1.")
    blob: str = Field(".agentmesh/snapshots",
                      description="Snapshot location: a directory or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL.")
    key_prefix: str = Field("agentmesh", description="Prefix of Redis keys and bus subjects.")
    metrics_port: int = Field(9464, ge=0, le=65535,
                              description="Prometheus /metrics port; 0 disables it.")
    metrics_host: str = Field("127.0.0.1", description="Address of the metrics endpoint.")
    console_port: int | None = Field(
        None, ge=0, le=65535, description="Web console port; 0 turns it off. Unset: "
        "8470 in the embedded mode (memory store), off with a shared store (every "
        "replica would serve one; turn it on where operators should reach it).")
    console_host: str = Field("127.0.0.1", description="Address of the web console.")
    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"

    heartbeat_interval: float = Field(1.0, gt=0, description="Seconds between agent beats.")
    heartbeat_misses: int = Field(3, ge=1, description="Missed beats before an agent is gone.")
    default_execution_timeout: float = Field(
        300.0, gt=0, description="Lease of one attempt when the task sets no timeout.")
    default_max_attempts: int = Field(3, ge=1)
    tick: float = Field(0.05, gt=0, description="Period of the reaper and retry timers.")

    max_message_bytes: int = Field(
        4 << 20, ge=1024, description="gRPC message size limit, both ways. Agents (the SDK "
        "default is 4 MiB, ChannelConfig.max_message_bytes) must accept as much; must be at "
        "least max_payload_bytes + 64 KiB.")
    max_payload_bytes: int = Field(
        1 << 20, ge=0, description="Limit of one payload (task input or output, state value, "
        "bus message); RESOURCE_EXHAUSTED past it.")
    max_queued_per_namespace: int = Field(100_000, ge=1,
                                          description="Waiting tasks before RESOURCE_EXHAUSTED.")
    max_workflow_steps: int = Field(1000, ge=1, le=10_000)
    max_watch_pending: int = Field(10_000, ge=1,
                                   description="Events buffered per watcher before cut-off.")
    max_chunk_bytes: int = Field(
        64 << 10, ge=1, description="Largest streamed chunk (text or data bytes) a task may "
        "emit; INVALID_ARGUMENT (CHUNK_TOO_LARGE) past it.")
    max_chunks_per_task: int = Field(
        10_000, ge=1, description="Most chunks kept per task; RESOURCE_EXHAUSTED "
        "(CHUNK_LIMIT) past it.")
    chunk_retention: float = Field(
        86_400.0, gt=0, description="Seconds a task's chunks are kept after its last one.")
    approval_timeout: float = Field(
        3600.0, gt=0, description="Seconds a human task (an approval or input step) waits for "
        "a person when it sets no timeout; then it is dead-lettered and escalated.")
    a2a_port: int | None = Field(
        None, ge=0, le=65535, description="A2A gateway HTTP port (JSON-RPC and the agent card "
        "at /.well-known/agent-card.json); 0 disables it; unset: 41241 in embedded mode "
        "(memory store), off otherwise.")
    a2a_host: str | None = Field(None, description="Address of the A2A gateway; unset: host.")
    a2a_public_url: str = Field(
        "", description="URL the agent card advertises (behind a proxy); unset: "
        "http://<a2a host>:<a2a port>/.")
    drain_grace: float = Field(10.0, ge=0,
                               description="Seconds to wait for in-flight results on shutdown.")

    breaker_fail_max: int = Field(
        5, ge=1, description="Consecutive failures of an agent for a capability that open "
        "its circuit breaker.")
    breaker_reset_timeout: float = Field(
        10.0, gt=0, description="Seconds an open breaker waits before letting one probe through.")
    capability_limits: dict[str, int] = Field(
        default_factory=dict, description="Most RUNNING tasks per capability (per namespace).")
    key_label: str = Field("tenant", description="Task label whose value is the fairness key.")
    key_limits: dict[str, int] = Field(
        default_factory=dict, description="Most RUNNING tasks per key value.")
    default_key_limit: int = Field(
        0, ge=0, description="Most RUNNING tasks of a key value not in key_limits; 0: none.")
    capability_rates: dict[str, float] = Field(
        default_factory=dict, description="Leases per second per capability (token bucket).")
    snapshot_interval: float = Field(
        0.0, ge=0, description="Seconds between periodic snapshots to the blob store; 0 = off.")
    gauge_interval: float = Field(
        2.0, gt=0, description="Seconds between refreshes of the store-mirroring metrics "
        "(queue depth, agents, in-flight, autonomy).")

    auth_file: str | None = Field(
        None, description="YAML file of principals (hashed tokens, role, namespaces); "
        "unset: no authentication (local use only).")
    tls_cert: str | None = Field(None, description="PEM certificate chain of the server (TLS).")
    tls_key: str | None = Field(None, description="PEM private key of the server (TLS).")
    tls_client_ca: str | None = Field(
        None, description="PEM CA that client certificates must chain to (mTLS, required).")
    max_watch_streams: int = Field(
        1024, ge=1, description="Watch/subscribe streams open at once, server-wide; "
        "RESOURCE_EXHAUSTED past it.")
    max_streams_per_principal: int = Field(
        4096, ge=1, description="Streams (watch, heartbeat, work) open at once per "
        "authenticated principal; RESOURCE_EXHAUSTED past it.")

    @model_validator(mode="after")
    def _payload_fits_in_a_message(self) -> Settings:
        """A payload must leave room in a message for what travels with it."""
        if self.max_payload_bytes + MESSAGE_HEADROOM_BYTES > self.max_message_bytes:
            raise ValueError(
                f"max_payload_bytes ({self.max_payload_bytes}) leaves no room in a message: "
                f"max_message_bytes ({self.max_message_bytes}) must be at least "
                f"max_payload_bytes + {MESSAGE_HEADROOM_BYTES}")
        return self

    @field_validator("durability")
    @classmethod
    def _check_durability(cls, value: str) -> str:
        """auto, none or replicas:N (parsed once more where the stores connect)."""
        from server.backends.redis._durability import parse_durability  # noqa: PLC0415

        parse_durability(value)
        return value.strip().lower()

    @property
    def console_port_effective(self) -> int | None:
        """The console's port: None when it is off (see ``console_port``)."""
        if self.console_port is None:
            return DEFAULT_CONSOLE_PORT if self.store == "memory://" else None
        return self.console_port or None

    @model_validator(mode="after")
    def _chunk_fits_in_a_message(self) -> Settings:
        """A chunk must fit in a message with its framing."""
        if self.max_chunk_bytes + MESSAGE_HEADROOM_BYTES > self.max_message_bytes:
            raise ValueError(
                f"max_chunk_bytes ({self.max_chunk_bytes}) must leave "
                f"{MESSAGE_HEADROOM_BYTES} bytes of room in a message (max_message_bytes "
                f"{self.max_message_bytes})")
        return self

    @property
    def a2a_listen_port(self) -> int:
        """The A2A gateway's port: ``a2a_port``, or its embedded-mode default (0: off)."""
        if self.a2a_port is not None:
            return self.a2a_port
        return DEFAULT_A2A_PORT if self.store in ("memory://", "") else 0

    @field_validator("store", "bus")
    @classmethod
    def _expand(cls, value: str) -> str:
        """A bare backend name becomes its local default URL (``SHORTHANDS``)."""
        return backend_url(value)
