"""The web console: ``agentmesh serve`` serves it on its own HTTP port.

An operator's view of the mesh (overview, agents, tasks, workflows, dead
letters, state) with the actions they need (drain an agent, re-drive or
cancel tasks, one or all matching a filter). It runs in the server's
process, on the server's event loop (aiohttp), and reads and acts through
the same service objects as the gRPC servicers: there is no second source of
truth and no extra store. Live pages are pushed over Server-Sent Events fed
by the bus events the server already publishes (task, agent, workflow and
state changes); the browser re-reads what changed, the way gRPC watchers do.

Layout, one module per page or API area (the route table is ``routes.py``):

- ``server.py``: the aiohttp application and its listener (start, stop, port errors);
- ``routes.py``: every URL, its handler and the gRPC method whose roles it needs;
- ``access.py``: the same tokens and roles as gRPC (bearer header or login cookie);
- ``http.py``: JSON replies, errors (one mapping to HTTP statuses), query parsing;
- ``render.py``: domain values as JSON (payloads shown safely);
- ``feed.py``: bus events -> throughput figures and the SSE fan-out;
- ``audit.py``: the recent audit records, as the ``agentmesh.audit`` logger writes them;
- ``overview.py``, ``agents.py``, ``tasks.py``, ``workflows.py``, ``dead_letters.py``,
  ``state.py``, ``events.py``: the pages' APIs.

The front end (``console/`` at the repository root: Preact, dagre, built by
Vite) is built into ``static/`` and committed, so ``pip install`` and
``agentmesh serve`` need no Node; ``make console`` rebuilds it and a test
fails when the committed bundle is older than its sources.
"""

from server.console.context import ConsoleServices
from server.console.server import ConsoleServer

__all__ = ["ConsoleServer", "ConsoleServices"]
