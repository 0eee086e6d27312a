"""In-memory backends for the embedded mode."""

from server.backends.memory.agents import InMemoryAgentRegistry
from server.backends.memory.chunks import InMemoryChunkStore
from server.backends.memory.state import InMemoryStateStore
from server.backends.memory.tasks import InMemoryTaskStore

__all__ = ["InMemoryAgentRegistry", "InMemoryChunkStore", "InMemoryStateStore", "InMemoryTaskStore"]
