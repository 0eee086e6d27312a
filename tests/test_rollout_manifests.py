"""The phased-rollout wiring holds together (deploy/k8s/rollout, docs/operations/rollout.md).

Each phase is rendered with ``kubectl kustomize`` and checked for what the
runbook promises: the replica split of each phase with the autoscaler pinned
to it, a canary that differs from the stable Deployment only in its image and
its track label, one Service (and PDB) that selects both tracks while each
Deployment selects only its own, and the candidate image where each phase
says it runs. The ``track`` label the alerts and dashboard compare is the one
the pods carry and the Kubernetes scrape config copies. Last, the offline
validator behind ``make k8s-validate`` (scripts/validate_k8s.py) is shown to
refuse an unknown field and a kind it has no schema for.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._services import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ROLLOUT = K8S / "rollout"
OBS = ROOT / "deploy" / "observability"
PHASES = {  # phase -> (stable replicas, canary replicas)
    "phase-10": (9, 1),
    "phase-50": (5, 5),
    "phase-100": (10, 0),
    "abort": (10, 0),
}

Objects = dict[tuple[str, str], dict[str, Any]]


def _render(kubectl: str, path: Path) -> Objects:
    result = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.fixture(scope="module")
def built() -> dict[str, Objects]:
    """The prod overlay and every rollout phase, rendered once."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip_or_fail("kubectl is not on PATH (it carries kustomize)")
    targets = {"prod": K8S / "overlays" / "prod", **{p: ROLLOUT / p for p in PHASES}}
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        return dict(zip(targets, pool.map(lambda p: _render(kubectl, p), targets.values()),
                        strict=True))


def _candidate() -> str:
    doc = yaml.safe_load((ROLLOUT / "canary" / "candidate.yaml").read_text())
    return str(doc["data"]["image"])


def _image(deployment: dict[str, Any]) -> str:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "agentmesh"]
    return str(container["image"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_phase_splits_replicas_and_pins_the_autoscaler(built: dict[str, Objects],
                                                       phase: str) -> None:
    objs = built[phase]
    stable, canary = objs[("Deployment", "agentmesh")], objs[("Deployment", "agentmesh-canary")]
    want_stable, want_canary = PHASES[phase]
    assert (stable["spec"]["replicas"], canary["spec"]["replicas"]) == (want_stable, want_canary)
    hpa = objs[("HorizontalPodAutoscaler", "agentmesh")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "agentmesh"
    assert hpa["spec"]["minReplicas"] == hpa["spec"]["maxReplicas"] == want_stable
    # Everything else the prod overlay renders is there, unchanged.
    prod = built["prod"]
    for key, obj in prod.items():
        if key[0] not in ("Deployment", "HorizontalPodAutoscaler"):
            assert objs[key] == obj, key


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_canary_is_the_stable_pod_but_for_image_and_track(built: dict[str, Objects],
                                                          phase: str) -> None:
    objs = built[phase]
    stable, canary = objs[("Deployment", "agentmesh")], objs[("Deployment", "agentmesh-canary")]
    s_tpl = copy.deepcopy(stable["spec"]["template"])
    c_tpl = copy.deepcopy(canary["spec"]["template"])
    assert s_tpl["metadata"]["labels"].pop("track") == "stable"
    assert c_tpl["metadata"]["labels"].pop("track") == "canary"
    for tpl in (s_tpl, c_tpl):
        for c in tpl["spec"]["containers"]:
            c.pop("image")
    assert c_tpl == s_tpl
    for field in ("strategy", "revisionHistoryLimit"):
        assert canary["spec"][field] == stable["spec"][field]
    # The prod overlay's pod spec (its patches included) is what both run.
    prod_tpl = copy.deepcopy(built["prod"][("Deployment", "agentmesh")]["spec"]["template"])
    prod_tpl["metadata"]["labels"].pop("track")
    for c in prod_tpl["spec"]["containers"]:
        c.pop("image")
    assert s_tpl == prod_tpl


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_one_service_selects_both_tracks_each_deployment_its_own(built: dict[str, Objects],
                                                                 phase: str) -> None:
    objs = built[phase]
    stable, canary = objs[("Deployment", "agentmesh")], objs[("Deployment", "agentmesh-canary")]
    pods = {"stable": stable["spec"]["template"]["metadata"]["labels"],
            "canary": canary["spec"]["template"]["metadata"]["labels"]}
    for name in ("agentmesh", "agentmesh-headless"):
        selector = objs[("Service", name)]["spec"]["selector"]
        assert all(_selects(selector, labels) for labels in pods.values()), name
    pdb = objs[("PodDisruptionBudget", "agentmesh")]["spec"]["selector"]["matchLabels"]
    assert all(_selects(pdb, labels) for labels in pods.values())
    assert _selects(stable["spec"]["selector"]["matchLabels"], pods["stable"])
    assert not _selects(stable["spec"]["selector"]["matchLabels"], pods["canary"])
    assert _selects(canary["spec"]["selector"]["matchLabels"], pods["canary"])
    assert not _selects(canary["spec"]["selector"]["matchLabels"], pods["stable"])


def test_each_phase_runs_the_candidate_where_it_says(built: dict[str, Objects]) -> None:
    current = _image(built["prod"][("Deployment", "agentmesh")])
    candidate = _candidate()
    images = {p: (_image(built[p][("Deployment", "agentmesh")]),
                  _image(built[p][("Deployment", "agentmesh-canary")])) for p in PHASES}
    assert images["phase-10"] == images["phase-50"] == (current, candidate)
    assert images["phase-100"] == (candidate, candidate)
    assert images["abort"] == (current, candidate)
    # Nothing kustomize uses only as input (the candidate ConfigMap) is applied.
    for phase in PHASES:
        assert ("ConfigMap", "agentmesh-candidate") not in built[phase]


def test_candidate_image_follows_candidate_yaml(tmp_path: Path) -> None:
    """Editing candidate.yaml (the runbook's one edit) moves the canary, and only it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip_or_fail("kubectl is not on PATH (it carries kustomize)")
    copy_root = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy" / "k8s", copy_root / "k8s")
    candidate = copy_root / "k8s" / "rollout" / "canary" / "candidate.yaml"
    text = candidate.read_text()
    image = "ghcr.io/agentmesh/agentmesh:9.9.9-test"
    new = re.sub(r"(?m)^(  image: ).*$", rf"\g<1>{image}", text)
    assert new != text
    candidate.write_text(new)
    objs = _render(kubectl, copy_root / "k8s" / "rollout" / "phase-10")
    assert _image(objs[("Deployment", "agentmesh-canary")]) == image
    assert _image(objs[("Deployment", "agentmesh")]) != image


def test_track_label_reaches_the_series_the_alerts_compare(built: dict[str, Objects]) -> None:
    # The pods carry track=stable|canary ...
    phase = built["phase-10"]
    tracks = {phase[("Deployment", n)]["spec"]["template"]["metadata"]["labels"]["track"]
              for n in ("agentmesh", "agentmesh-canary")}
    assert tracks == {"stable", "canary"}
    # ... the Kubernetes scrape config copies that pod label onto every series ...
    config = yaml.safe_load((OBS / "prometheus-kubernetes.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "agentmesh"]
    relabels = {r.get("target_label"): r for r in job["relabel_configs"]}
    assert relabels["track"]["source_labels"] == ["__meta_kubernetes_pod_label_track"]
    assert relabels["pod"]["source_labels"] == ["__meta_kubernetes_pod_name"]
    # (and never as "namespace", which agentmesh series use for the task namespace)
    assert "namespace" not in relabels
    # ... and the rollout alerts and dashboard select exactly those values.
    rules = yaml.safe_load((OBS / "alerts.yml").read_text())
    (group,) = [g for g in rules["groups"] if g["name"] == "agentmesh.rollout"]
    used = set()
    for rule in group["rules"]:
        used |= set(re.findall(r'track="(\w+)"', rule["expr"]))
    board = json.loads((OBS / "grafana" / "dashboards" / "rollout.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert any("by (track)" in e or "by (le, track)" in e for e in exprs)
    assert used == tracks


def test_validator_refuses_unknown_fields_and_unknown_kinds(tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        skip_or_fail("kubectl is not on PATH (it carries kustomize)")
    (tmp_path / "kustomization.yaml").write_text("resources: [objects.yaml]\n")
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"replicaz": 2, "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i"}]}}},
    }
    custom = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all([deployment, custom]))
    script = ROOT / "scripts" / "validate_k8s.py"
    bad = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "'replicaz' was unexpected" in bad.stdout
    assert "Widget" in bad.stdout
    # The same objects, corrected and without the custom kind, pass.
    deployment["spec"]["replicas"] = deployment["spec"].pop("replicaz")
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump(deployment))
    good = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("ok")


def _runbook_commands() -> list[str]:
    doc = (ROOT / "docs" / "operations" / "rollout.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", doc, re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_runbook_edits_and_paths_work(tmp_path: Path) -> None:
    """The runbook's file edits do what it says; every directory it applies exists."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        skip_or_fail("kubectl is not on PATH (it carries kustomize)")
    commands = _runbook_commands()
    for cmd in commands:
        for path in re.findall(r"kubectl (?:apply|diff) -k (\S+)", cmd):
            assert (ROOT / path / "kustomization.yaml").is_file(), cmd
    edits = [c for c in commands if c.startswith("sed -i ")]
    assert len(edits) == 3  # candidate, prod's newTag, candidate back after an abort
    shutil.copytree(ROOT / "deploy" / "k8s", tmp_path / "deploy" / "k8s")
    candidate, finish, reset = edits
    for cmd in (candidate, finish):
        subprocess.run(["bash", "-c", cmd], cwd=tmp_path, check=True, timeout=30)
    target = re.search(r"\|  image: ([^|]+)\|", candidate)
    assert target is not None
    new_image = target.group(1)
    phase10 = _render(kubectl, tmp_path / "deploy" / "k8s" / "rollout" / "phase-10")
    assert _image(phase10[("Deployment", "agentmesh-canary")]) == new_image
    # After the finish edit, prod's stable image is exactly the candidate's.
    prod = _render(kubectl, tmp_path / "deploy" / "k8s" / "overlays" / "prod")
    assert _image(prod[("Deployment", "agentmesh")]) == new_image
    subprocess.run(["bash", "-c", reset], cwd=tmp_path, check=True, timeout=30)
    text = (tmp_path / "deploy" / "k8s" / "rollout" / "canary" / "candidate.yaml").read_text()
    assert new_image not in text
