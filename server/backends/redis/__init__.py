"""Redis backends: the source of truth shared by several server replicas.

Every multi-key transition is ONE call of a Lua function (``tasks.lua``,
``agents.lua``, ``state.lua``), so two replicas can never both lease a task or
both accept a result. Each call is one round trip; no hot path uses KEYS or SCAN.

Redis 7.0 or later is required. The Lua files are Redis Functions libraries
(``_scripts.py``): loaded once with FUNCTION LOAD, then called with FCALL (or
FCALL_RO for the reads). Under EVALSHA Redis ran the whole file, defining every
Lua function, before each op (about 20 microseconds of Redis time); a function
call skips that. :meth:`RedisStores.connect` refuses an older server with
:class:`RedisVersionError` (there is no EVALSHA fallback: one code path).

- Names: ``agentmesh_<file>_<12 hex>``, a hash of the code, so replicas
  running different versions during a rolling upgrade each call their own code.
  ``connect`` loads the three libraries (FUNCTION LOAD REPLACE: harmless with
  such names); a library that goes missing later (Redis restarted without
  persistence, ``FUNCTION FLUSH``, failover to a node without it) is loaded
  again by the first call that meets "Function not found", which is retried once.
- Old versions stay in Redis after an upgrade (``FUNCTION LIST LIBRARYNAME
  'agentmesh_*'``); ``FUNCTION DELETE`` them at leisure: a replica still running
  one loads it again on its next call.
- Functions are saved with the data (RDB/AOF) and replicated to a node's
  replicas, but Redis Cluster does not copy them between shards. The loader
  loads them only through the connection it has: the node serving the ``{P}``
  slot (a deployment's keys are all in that slot). An operator should load
  them on every primary that may come to own the slot (after adding a node or
  migrating the slot), as the Redis docs advise: ``redis-cli
  --cluster-only-masters --cluster call <host:port> FUNCTION LOAD REPLACE
  "<code>"``, with the code from ``_scripts.library_code("tasks")`` (and
  "agents", "state"). A node without them costs one failed call per library:
  the reload-on-missing then loads them there.
- With Redis ACLs, the stores' user needs FUNCTION LOAD, FCALL and FCALL_RO
  (instead of EVALSHA and SCRIPT LOAD), besides the plain key commands.

Key layout (``P`` is the deployment prefix, default ``agentmesh``). Every key
carries the one hash tag ``{P}``, so the functions also run on Redis Cluster;
one tag per deployment means one slot (one shard). Sharding by namespace,
with a tag per namespace, is future work. The functions receive ``{P}`` as
KEYS[1] and derive every other key from it (per call: one library serves every
prefix).

Tasks (``tasks.lua``)::

    {P}:task:<id>                 string  the Task as JSON (codec.py; cjson in Lua)
    {P}:wf:<id>                   string  the Workflow as JSON
    {P}:seq                       string  INCR counter: Task.seq / Workflow.seq
    {P}:q:<len(ns)>:<ns>:<cap>    zset    ready queue, score -priority*2**40 + seq
    {P}:retry                     zset    RETRYING task ids by retry_time
    {P}:leases                    zset    RUNNING task ids by lease_deadline
    {P}:agent_tasks:<agent>       set     RUNNING task ids leased to an agent
    {P}:tasks:<ns>                zset    task ids by seq (list_tasks, newest first)
    {P}:wfs:<ns>                  zset    workflow ids by seq (list_workflows)
    {P}:stats:<ns>                hash    count per TaskState value, ended, autonomous
    {P}:idem:<ns>                 hash    request_id -> task id ("wf:"+request_id -> workflow id)

Agents (``agents.lua``)::

    {P}:agent:<id>                string  the Agent as JSON
    {P}:agents:<ns>               zset    agent ids (score 0, ordered by id)
    {P}:agents_live               zset    ACTIVE/DRAINING agent ids by expire_time
    {P}:agents_gone               zset    GONE agent ids by heartbeat_time (purge)
    {P}:caps:<ns>                 hash    capability -> number of ACTIVE agents
    {P}:agents_active             hash    ACTIVE agent id -> expire_time

``tasks.lua``'s ``lease_batch`` reads ``{P}:agents_active`` (one HGET, same
hash tag) and leases nothing to an agent missing from it or whose
expire_time has passed. The hash is written by ``agents.lua`` with each
agent version, so it matches the cards: an agent registered by a version
without the hash enters it at its next heartbeat (until then it gets no lease).

Chunks (``chunks.lua``): streamed partial results, fenced against ``{P}:task:<id>``::

    {P}:chunks:<task>             list    chunk JSON docs; chunk n at index n - 1
    {P}:chunkx:<task>             string  when the log expires (retention after the last append)

State (``state.lua``), with ``S = {P}:st:<len(ns)>:<ns>``::

    S:e                           hash    key -> StateEntry JSON
    S:k                           zset    keys (score 0, lexicographic for list/prefix)
    S:rev                         string  namespace revision (INCR in the writing script)
    S:log                         list    change log (StateEvent JSON), trimmed to log_size

Times are stored as exact float strings (see ``codec``). Entries with a TTL
keep their ``expire_time`` and are removed lazily by the script that meets
them, which logs the DELETE (Redis EXPIRE would lose that event).
"""

from __future__ import annotations

import logging
from types import TracebackType

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from server.backends.redis._client import FunctionCluster, RedisClient, open_client
from server.backends.redis._durability import NONE, Durability, parse_durability
from server.backends.redis._scripts import RedisVersionError, check_version
from server.backends.redis.agents import RedisAgentRegistry
from server.backends.redis.chunks import RedisChunkStore
from server.backends.redis.state import DEFAULT_LOG_SIZE, RedisStateStore
from server.backends.redis.tasks import RedisTaskStore

__all__ = ["Durability", "RedisAgentRegistry", "RedisChunkStore", "RedisStateStore",
           "RedisStores", "RedisTaskStore", "RedisVersionError", "parse_durability"]

logger = logging.getLogger(__name__)


class RedisStores:
    """The three Redis stores sharing one client (``redis.asyncio.Redis`` or, for
    ``redis+cluster://``, a ``RedisCluster``: see ``_client``).

    Use :meth:`connect`; close with :meth:`aclose` or ``async with``.
    """

    def __init__(self, client: RedisClient, prefix: str = "agentmesh", *,
                 state_log_size: int = DEFAULT_LOG_SIZE, durability: Durability = NONE) -> None:
        self.client = client
        """The shared client (``decode_responses=True``)."""
        self.prefix = prefix
        self.durability = durability
        """Replicas that confirm each mutating call (``_durability``), ``auto`` resolved."""
        self.tasks = RedisTaskStore(client, prefix, durability=durability)
        self.agents = RedisAgentRegistry(client, prefix, durability=durability)
        self.state = RedisStateStore(client, prefix, log_size=state_log_size,
                                     durability=durability)
        self.chunks = RedisChunkStore(client, prefix, durability=durability)
        self._closed = False

    @classmethod
    async def connect(cls, url: str, *, prefix: str = "agentmesh",
                      state_log_size: int = DEFAULT_LOG_SIZE, retries: int = 8,
                      socket_timeout: float = 5.0,
                      durability: Durability | str = "auto") -> RedisStores:
        """Connect to ``url`` and load the functions.

        ``url``: ``redis://``, ``rediss://``, ``unix://`` (one server) or
        ``redis+cluster://host:port,host:port`` (a Redis Cluster; ``_client``).
        Raises :class:`RedisVersionError` when a server is older than Redis 7.0.
        Commands are retried ``retries`` times with jittered exponential backoff
        on connection errors and timeouts, so the stores ride out a Redis
        restart (and, on a cluster, a failover). A retried call may run twice
        when the first reply was lost; the fencing checks make that harmless
        for results and leases. ``durability``: see ``_durability`` (``auto``
        is resolved here, from the replicas of the deployment's primary).
        """
        if not prefix or any(c in prefix for c in "{}"):
            raise ValueError("prefix must be non-empty and free of '{' and '}'")
        wanted = parse_durability(durability) if isinstance(durability, str) else durability
        client = open_client(url, socket_timeout=socket_timeout, retries=retries)
        try:
            await client.ping()
            await _check_versions(client)
            resolved = wanted.resolve(await _replicas_of(client, "{" + prefix + "}"))
            stores = cls(client, prefix, state_log_size=state_log_size, durability=resolved)
            await stores.load_libraries()
        except BaseException:
            await client.aclose()
            raise
        logger.info("connected to Redis%s, key prefix %s, durability %s",
                    " Cluster" if isinstance(client, RedisCluster) else "", prefix,
                    resolved.describe())
        return stores

    async def load_libraries(self) -> None:
        """FUNCTION LOAD (REPLACE) the Lua libraries (on a cluster: on every primary)."""
        for library in (self.tasks.library, self.agents.library, self.state.library,
                        self.chunks.library):
            await library.load()

    async def delete_all_keys(self) -> int:
        """Delete every key of this prefix (tests and tear-down only: it SCANs)."""
        pattern = "{" + _glob_escape(self.prefix) + "}:*"
        n = 0
        batch: list[str] = []
        async for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += await self.client.delete(*batch)
                batch = []
        if batch:
            n += await self.client.delete(*batch)
        return n

    async def aclose(self) -> None:
        """Close the shared client. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        await self.client.aclose()

    async def __aenter__(self) -> RedisStores:
        """Return self."""
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the client."""
        await self.aclose()


async def _check_versions(client: RedisClient) -> None:
    """RedisVersionError unless every server (every primary of a cluster) runs Redis 7+."""
    try:
        if isinstance(client, RedisCluster):
            replies = await client.info("server", target_nodes=RedisCluster.PRIMARIES)
            infos = list(replies.values()) if "redis_version" not in replies else [replies]
        else:
            infos = [await client.info("server")]
    except ResponseError:  # INFO disabled: an old server fails FUNCTION LOAD later
        return
    for info in infos:
        check_version(str(info.get("redis_version", "")))


async def _replicas_of(client: RedisClient, key: str) -> int:
    """Replicas connected to the primary that serves ``key`` (``durability=auto``)."""
    try:
        if isinstance(client, FunctionCluster):
            info = await client.info("replication", target_nodes=client.slot_primary(key))
        else:
            info = await client.info("replication")
    except ResponseError:
        return 0
    return int(info.get("connected_slaves", 0) or 0)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
