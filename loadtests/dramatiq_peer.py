"""Dramatiq on Redis, the peer that ``peer_bench.py`` compares agentmesh with.

One module, two roles:

- the actor module the Dramatiq workers load
  (``python -m dramatiq dramatiq_peer --path loadtests --processes 2``);
- the submitter (``python loadtests/dramatiq_peer.py --only w1|w2``), which
  runs bench.py's workloads (``peer_workload.py``, the same code for every
  peer) with Dramatiq's own client API: ``actor.send`` and
  ``message.get_result(block=True)`` through the Results middleware on the
  same Redis, and prints one JSON line like bench.py.

W1: N no-op messages sent back to back from one thread while another thread
    collects the results in order (each a blocking BRPOPLPUSH); tasks/s from
    the first send to the last result seen here.
W2: open loop at --rate messages/s for --duration s; each result is awaited
    by its own thread from a pool (blocking get); p50/p95/p99 of send ->
    result seen here.

The broker URL and key namespace come from DRAMATIQ_PEER_REDIS and
DRAMATIQ_PEER_NS, so the workers and the submitter agree.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

URL = os.environ.get("DRAMATIQ_PEER_REDIS", "redis://127.0.0.1:6379/0")
NS = os.environ.get("DRAMATIQ_PEER_NS", "dramatiq-peer")
RESULT_TTL_MS = 600_000
GET_TIMEOUT_MS = 60_000

backend = RedisBackend(url=URL, namespace=f"{NS}-results")
broker = RedisBroker(url=URL, namespace=NS)
broker.add_middleware(Results(backend=backend, store_results=True, result_ttl=RESULT_TTL_MS))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=3)
def noop(value: Any) -> Any:
    """The no-op task: returns its input (like loadtests/noop_agent.py)."""
    return value


def send(value: dict[str, Any]) -> Any:
    """Enqueue one no-op message."""
    return noop.send(value)


def wait(message: Any) -> Any:
    """Block until the message's result is in the results backend."""
    return message.get_result(backend=backend, block=True, timeout=GET_TIMEOUT_MS)


if __name__ == "__main__":
    from peer_workload import main  # loadtests/ is on sys.path (run as a script)

    main("dramatiq", send, wait, __doc__)
