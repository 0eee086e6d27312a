"""The A2A gateway: the mesh as one A2A agent (a2a-sdk; the A2A spec is the contract).

- ``cards.py``: A2A agent cards in and out (a registering agent's card ->
  capabilities; live capabilities -> the mesh card's skills);
- ``mapping.py``: A2A <-> mesh values (task states, messages, artifacts);
- ``handler.py``: the a2a-sdk ``RequestHandler`` over the mesh's services;
- ``http.py``: the HTTP server (JSON-RPC + the agent card), run by ``server/app.py``.

docs/a2a.md has the state table and where agentmesh deliberately differs.
"""
