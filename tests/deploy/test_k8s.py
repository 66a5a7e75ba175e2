"""deploy/k8s: the base's shape (probes, grace, autoscaling, budgets, network policies, service
accounts), and both overlays rendered by kustomize and validated offline: kubeconform against the
Kubernetes 1.35 JSON schemas (strict), KEDA's ScaledObjects by the validators generated from KEDA's
CRD schemas. A missing tool fails, naming the install step; nothing is skipped."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import helpers as h

SERVICES = h.service_packages()
HOME = Path(os.environ.get("REELBUS_HOME") or h.ROOT / ".reelbus")
BIN = HOME / "bin"
K8S_VERSION = "1.35.0"
SCHEMA_DIR = HOME / "k8s-schemas"
NODE_DIR = HOME / "node"
HTTP_ONLY_AUTOSCALED = "HorizontalPodAutoscaler"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash {h.INSTALL_TOOLS}` (Go module proxy, PyPI and npm)")
    return str(path)


def render(overlay: str) -> list[h.Doc]:
    return copy.deepcopy(_render(overlay))


@functools.cache
def _render(overlay: str) -> list[h.Doc]:
    out = subprocess.run(
        [tool("kustomize"), "build", str(h.K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kubeconform(docs: list[h.Doc], tmp: Path) -> subprocess.CompletedProcess[str]:
    if not (SCHEMA_DIR / f"v{K8S_VERSION}-standalone-strict" / ".complete").exists():
        pytest.fail(f"Kubernetes schemas missing in {SCHEMA_DIR}: run `bash {h.INSTALL_TOOLS}`")
    manifest = tmp / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    template = f"{SCHEMA_DIR}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
    template += "{{ .ResourceKind }}{{ .KindSuffix }}.json"
    return subprocess.run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            K8S_VERSION,
            "-schema-location",
            template,
            "-skip",
            "ScaledObject",  # a CRD: validated by validate_scaled_objects below, never unchecked
            str(manifest),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


KEDA_SCRIPT = """
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import fs from "node:fs";
const errors = [];
for (const obj of JSON.parse(fs.readFileSync(0, "utf8"))) {
  try { new ScaledObject(obj).validate(); } catch (e) { errors.push(`${obj.metadata.name}: ${e.message}`); }
}
if (errors.length) { console.error(errors.join("\\n")); process.exit(1); }
"""


def validate_scaled_objects(objs: list[h.Doc]) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@kubernetes-models" / "keda").exists():
        pytest.fail(f"node or @kubernetes-models/keda missing in {NODE_DIR}: run `bash {h.INSTALL_TOOLS}`")
    return subprocess.run(
        [node, "--input-type=module", "-e", KEDA_SCRIPT],
        input=json.dumps(objs),
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        check=False,
    )


# -- the base, read as YAML ------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_deployment_probes_grace_resources_account(name: str) -> None:
    docs = h.base_resources()
    deployment = h.by_kind(docs, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] > h.shutdown_grace(name, env)
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    assert pod["serviceAccountName"] == name
    account = h.by_kind(docs, "ServiceAccount")[name]
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", SERVICES)
def test_one_autoscaler_a_budget_and_a_policy_per_service(name: str) -> None:
    docs = h.base_resources()
    hpa = h.by_kind(docs, "HorizontalPodAutoscaler").get(name)
    scaled = h.by_kind(docs, "ScaledObject").get(name)
    assert (hpa is None) != (scaled is None), (
        f"{name}: exactly one of HPA and ScaledObject (KEDA owns an HPA)"
    )
    target = (hpa or scaled or {})["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", name)
    if scaled is not None:  # an HTTP service too: its cpu trigger stands for the HPA
        assert any(t["type"] == "cpu" for t in scaled["spec"]["triggers"])
    assert name in h.by_kind(docs, "PodDisruptionBudget")
    policy = h.by_kind(docs, "NetworkPolicy")[name]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": name}}
    targets = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for r in policy["egress"]
        for peer in r["to"]
    }
    assert {"kafka", "registry", "zipkin", "jaeger"} <= targets


def test_default_deny_and_dns() -> None:
    policies = h.by_kind(h.base_resources(), "NetworkPolicy")
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert {p["port"] for p in policies["allow-dns"]["spec"]["egress"][0]["ports"]} == {53}


def test_ingress_sends_everything_to_the_gateway() -> None:
    ingress = h.by_kind(h.base_resources(), "Ingress")["gateway"]
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": "gateway", "port": {"name": "http"}}]


# -- the overlays, rendered and validated ----------------------------------------------------


@pytest.mark.parametrize("overlay", h.OVERLAYS)
def test_overlay_renders_and_passes_kubeconform(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    result = kubeconform(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    others = sum(1 for d in docs if d["kind"] != "ScaledObject")
    assert summary["valid"] == others and summary["invalid"] == summary["errors"] == 0, summary
    assert summary["skipped"] == len(docs) - others


@pytest.mark.parametrize("overlay", h.OVERLAYS)
def test_overlay_scaled_objects_pass_keda_validation(overlay: str) -> None:
    objs = [d for d in render(overlay) if d["kind"] == "ScaledObject"]
    assert objs
    result = validate_scaled_objects(objs)
    assert result.returncode == 0, result.stderr


def test_validators_refuse_mistakes(tmp_path: Path) -> None:
    """Neither validation is vacuous: a misspelt field and a missing one are refused."""
    docs = render("local")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert kubeconform([deployment], tmp_path).returncode != 0
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    del scaled["spec"]["triggers"][0]["type"]
    assert validate_scaled_objects([scaled]).returncode != 0


def test_overlays_differ_in_replicas_resources_and_images() -> None:
    local, production = (h.by_kind(render(o), "Deployment") for o in h.OVERLAYS)
    assert set(local) == set(production) == set(SERVICES)
    for name in SERVICES:
        lc = local[name]["spec"]["template"]["spec"]["containers"][0]
        pc = production[name]["spec"]["template"]["spec"]["containers"][0]
        assert local[name]["spec"]["replicas"] == 1 and production[name]["spec"]["replicas"] == 3
        assert lc["image"] == "reelbus:dev" and pc["image"].endswith(":0.1.0") and "/" in pc["image"]
        assert lc["resources"] != pc["resources"]
        assert all(d["metadata"].get("namespace") == "reelbus" for d in (local[name], production[name]))
