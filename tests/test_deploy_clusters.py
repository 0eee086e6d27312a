"""The cluster wiring in deploy/ says what the code accepts.

Docker Compose cannot run here, and Helm charts are not rendered offline, so
these checks read the files: every service a compose service waits for
exists, the agentmesh command's store, bus and durability parse as the server
parses them, the prod ConfigMap builds valid Settings, and the Helm values ask
for 3 primaries with a replica each and a 3-node NATS cluster with JetStream.
(The Kubernetes manifests themselves are validated by ``make k8s-validate``.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.backends.redis import parse_durability
from server.backends.redis._client import parse_cluster_url
from server.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_cluster_override_is_consistent() -> None:
    base = _load(DEPLOY / "docker-compose.yml")
    override = _load(DEPLOY / "docker-compose.clusters.yml")
    services = {**base["services"], **override["services"]}
    for name, service in override["services"].items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            assert volume.split(":", 1)[0] in override["volumes"], (name, volume)
    redis_nodes = [n for n in override["services"] if n.startswith("redis-node-")]
    assert len(redis_nodes) == 6
    create = override["services"]["redis-cluster-init"]["command"][0]
    assert "--cluster-replicas 1" in create
    assert all(f"getent hosts {n} " in create for n in redis_nodes)
    for i in (1, 2, 3):
        nats = override["services"][f"nats-{i}"]["command"]
        assert "-js" in nats and _flag(nats, "--cluster_name") == "agentmesh"
        assert _flag(nats, "--routes").count("nats://") == 3
    for name in ("agentmesh-1", "agentmesh-2"):
        command = override["services"][name]["command"]
        seeds = parse_cluster_url(_flag(command, "--store")).seeds
        assert {host for host, _ in seeds} <= set(redis_nodes)
        assert parse_durability(_flag(command, "--durability")).replicas == 1
        bus = _flag(command, "--bus").split(",")
        assert [u.split("//")[1].split(":")[0] for u in bus] == ["nats-1", "nats-2", "nats-3"]


def test_prod_config_builds_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (make k8s-validate needs it too)")
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / "prod")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    config = next(d for d in yaml.safe_load_all(rendered)
                  if d and d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(
                      "agentmesh-config"))
    for key, value in config["data"].items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.store.startswith("redis+cluster://")
    parse_cluster_url(settings.store)
    assert parse_durability(settings.durability).replicas == 1
    assert settings.heartbeat_interval * settings.heartbeat_misses >= 10


def test_helm_values_ask_for_the_cluster_shapes() -> None:
    redis = _load(DEPLOY / "k8s" / "clusters" / "redis-cluster-values.yaml")
    assert redis["cluster"] == {"nodes": 6, "replicas": 1}
    assert redis["redis"]["useAOFPersistence"] == "yes"
    assert "appendfsync everysec" in redis["redis"]["configmap"]
    assert redis["fullnameOverride"] == "redis-cluster"  # the service the prod URL names
    nats = _load(DEPLOY / "k8s" / "clusters" / "nats-values.yaml")
    assert nats["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert nats["config"]["jetstream"]["enabled"] is True
    assert nats["config"]["jetstream"]["fileStore"]["enabled"] is True
