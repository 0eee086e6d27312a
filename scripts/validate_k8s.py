"""Validate every Kubernetes manifest under deploy/k8s, offline (`make k8s-validate`).

Every kustomization root (a directory holding a ``kustomization.yaml`` that is
not a ``kind: Component``) is built with ``kubectl kustomize`` (kustomize is
built into kubectl), and every object of the output is checked against the
Kubernetes OpenAPI schema of `KUBERNETES_VERSION` in strict mode, so an
unknown or misspelt field is an error, not a silently ignored line. The
schemas ship inside the ``kubernetes-validate`` wheel (PyPI, dev extra):
nothing is fetched. An object of a kind that has no schema there (a custom
resource) is an error as well: give the check its CRD's schema before using one.

Usage: ``python scripts/validate_k8s.py [DIR ...]`` (default: every root under
deploy/k8s). Prints one line per root; exit status 0 when all are valid, 1
when any object is invalid or a build fails, 2 when kubectl is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"
"""The oldest Kubernetes release the manifests are written for (gRPC probes, autoscaling/v2)."""


def kustomization_roots(top: Path) -> list[Path]:
    """Every directory under ``top`` that kustomize can build on its own."""
    roots = []
    for path in sorted(top.rglob("kustomization.yaml")):
        doc = yaml.safe_load(path.read_text()) or {}
        if doc.get("kind") != "Component":
            roots.append(path.parent)
    return roots


def build(kubectl: str, root: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize root`` renders; raises RuntimeError on a failed build."""
    result = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                           else f"kubectl kustomize exited {result.returncode}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def problems(objects: list[dict[str, Any]]) -> list[str]:
    """What is wrong with each object, one line each (empty when all are valid)."""
    out = []
    for obj in objects:
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(top level)"
            out.append(f"{what}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            out.append(f"{what}: {exc.message} (no schema: a custom resource needs its CRD's)")
    return out


def check(kubectl: str, root: Path) -> str:
    """One report line for one kustomization root: ``ok ...`` or ``FAIL ...``."""
    name = root.relative_to(ROOT) if root.is_relative_to(ROOT) else root
    try:
        objects = build(kubectl, root)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"FAIL {name}: kustomize build failed: {exc}"
    found = problems(objects)
    if found or not objects:
        return f"FAIL {name}: " + ("; ".join(found) if found else "no objects rendered")
    return f"ok   {name}: {len(objects)} objects valid (Kubernetes {KUBERNETES_VERSION}, strict)"


def main(argv: list[str] | None = None) -> int:
    """Validate the given kustomization roots (default: all under deploy/k8s)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="kustomization directories")
    args = parser.parse_args(argv)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("k8s-validate: kubectl is not on PATH (it carries kustomize); install kubectl",
              file=sys.stderr)
        return 2
    roots = [d.resolve() for d in args.dirs] or kustomization_roots(K8S)
    # kubectl mostly waits on its own start-up: build the roots side by side.
    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = list(pool.map(lambda root: check(kubectl, root), roots))
    for line in reports:
        print(line)
    return 0 if all(line.startswith("ok") for line in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
