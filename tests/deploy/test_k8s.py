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

from services.bus.streams import StreamSettings
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


def test_workload_kinds() -> None:
    """A Deployment per service, but a DaemonSet for each declared node agent; nothing else."""
    docs = h.base_resources()
    assert set(SERVICES) >= h.NODE_AGENTS | h.SINGLETONS
    assert not h.NODE_AGENTS & h.SINGLETONS
    assert set(h.by_kind(docs, "DaemonSet")) == {h.k8s_name(n) for n in h.NODE_AGENTS}
    assert set(h.by_kind(docs, "Deployment")) == {h.k8s_name(n) for n in SERVICES if n not in h.NODE_AGENTS}
    assert not {"StatefulSet", "ReplicaSet", "Pod", "Job", "CronJob"} & {d["kind"] for d in docs}


@pytest.mark.parametrize("name", SERVICES)
def test_deployment_probes_grace_resources_account(name: str) -> None:
    docs = h.base_resources()
    deployment = h.workload(docs, name)
    k8s = h.k8s_name(name)
    assert deployment["kind"] == ("DaemonSet" if name in h.NODE_AGENTS else "Deployment")
    assert deployment["metadata"]["labels"] == {"app.kubernetes.io/name": k8s}
    assert deployment["spec"]["selector"] == {"matchLabels": {"app.kubernetes.io/name": k8s}}
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app.kubernetes.io/name": k8s}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert len(pod["containers"]) == 1 and container["name"] == k8s
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] > h.shutdown_grace(name, env)
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    assert pod["serviceAccountName"] == k8s
    account = h.by_kind(docs, "ServiceAccount")[k8s]
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", SERVICES)
def test_one_autoscaler_a_budget_and_a_policy_per_service(name: str) -> None:
    docs = h.base_resources()
    k8s = h.k8s_name(name)
    selector = {"matchLabels": {"app.kubernetes.io/name": k8s}}
    hpa = h.by_kind(docs, "HorizontalPodAutoscaler").get(k8s)
    scaled = h.by_kind(docs, "ScaledObject").get(k8s)
    budget = h.by_kind(docs, "PodDisruptionBudget").get(k8s)
    if name in h.NODE_AGENTS:  # one pod per node: nothing to scale, and no budget (base/pdb.yaml)
        assert hpa is None and scaled is None and budget is None, f"{name} is a node agent"
    elif name in h.SINGLETONS:  # one replica: no HPA (min = max = 1 is noise), a drain may evict it
        assert hpa is None and scaled is None, f"{name} is a singleton: no autoscaler"
        deployment = h.workload(docs, name)["spec"]
        assert deployment["replicas"] == 1
        assert deployment["strategy"] == {"type": "Recreate"}, "no surge pod beside the singleton"
        assert budget is not None and budget["spec"] == {"maxUnavailable": 1, "selector": selector}
    else:
        assert (hpa is None) != (scaled is None), (
            f"{name}: exactly one of HPA and ScaledObject (KEDA owns an HPA)"
        )
        target = (hpa or scaled or {})["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", k8s)
        if scaled is not None:  # an HTTP service too: its cpu trigger stands for the HPA
            assert any(t["type"] == "cpu" for t in scaled["spec"]["triggers"])
        assert budget is not None and budget["spec"]["selector"] == selector
    policy = h.by_kind(docs, "NetworkPolicy")[k8s]["spec"]
    assert policy["podSelector"] == selector
    targets = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for r in policy["egress"]
        for peer in r["to"]
    }
    assert {"kafka", "registry", "zipkin", "jaeger"} <= targets


def test_autoscalers_and_budgets_target_workloads() -> None:
    """No HPA, ScaledObject or budget is left over for a workload that is gone or renamed."""
    docs = h.base_resources()
    workloads = set(h.by_kind(docs, "Deployment")) | set(h.by_kind(docs, "DaemonSet"))
    for kind in ("HorizontalPodAutoscaler", "ScaledObject", "PodDisruptionBudget", "NetworkPolicy"):
        for name, obj in h.by_kind(docs, kind).items():
            if name in ("default-deny", "allow-dns"):
                continue
            assert name in workloads, f"{kind} {name} names no Deployment or DaemonSet"
            if "scaleTargetRef" in obj["spec"]:
                assert obj["spec"]["scaleTargetRef"]["name"] == name


def test_node_agents_run_one_pod_per_node() -> None:
    docs = h.base_resources()
    for name in h.NODE_AGENTS:
        spec = h.workload(docs, name)["spec"]
        assert "replicas" not in spec
        assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
        pod = spec["template"]["spec"]
        assert "affinity" not in pod, "a DaemonSet places one pod per node by itself"
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        for key, path in h.NODE_AGENT_ENV[name].items():
            assert env[key] == {"name": key, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            field = key.removeprefix(name.upper() + "_").lower()
            assert field in h.settings_class(name).model_fields, f"{key} is no setting of {name}"


def _walk_names(node: object, out: list[tuple[str, str]], where: str = "") -> None:
    """Every app.kubernetes.io/name value (labels, selectors, policy peers) and container name."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "app.kubernetes.io/name":
                out.append((f"{where}/{key}", str(value)))
            elif key in ("containers", "initContainers") and isinstance(value, list):
                out.extend((f"{where}/{key}", str(c["name"])) for c in value)
            if key == "serviceAccountName":
                out.append((f"{where}/{key}", str(value)))
            _walk_names(value, out, f"{where}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _walk_names(item, out, f"{where}/{i}")


def dns_name_errors(docs: list[h.Doc]) -> list[str]:
    errors = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if not h.is_dns1123_subdomain(name):
            errors.append(f"{kind} {name}: metadata.name is no DNS-1123 subdomain")
        if kind == "Service" and not h.is_dns1035_label(name):
            errors.append(f"Service {name}: no DNS-1035 label")
        if kind in ("Deployment", "DaemonSet", "Namespace") and not h.is_dns1123_label(name):
            errors.append(f"{kind} {name}: no DNS-1123 label (it names its pods)")
        labels: list[tuple[str, str]] = []
        _walk_names(doc, labels)
        errors.extend(
            f"{kind} {name} {where}: {value!r} is no DNS-1123 label"
            for where, value in labels
            if not h.is_dns1123_label(value)
        )
    return errors


@pytest.mark.parametrize("overlay", h.OVERLAYS)
def test_names_are_dns_1123(overlay: str) -> None:
    """The API server refuses a name with `_` (kubeconform does not check names): every object's name,
    every app.kubernetes.io/name label and selector, container and service account name."""
    docs = render(overlay)
    assert not dns_name_errors(docs), "\n".join(dns_name_errors(docs))
    names = {d["metadata"]["name"] for d in docs}
    assert {h.k8s_name(n) for n in SERVICES} <= names


def test_name_check_refuses_package_names() -> None:
    """Not vacuous: the package names with `_`, put back anywhere, are refused."""
    assert [n for n in SERVICES if "_" in n], "a package with `_` to check the mapping on"
    assert h.k8s_name("mount_probe") == "mount-probe" and h.is_dns1123_label("mount-probe")
    assert not h.is_dns1123_subdomain("mount_probe") and not h.is_dns1035_label("1abc")
    assert not h.is_dns1123_label("a" * 64) and not h.is_dns1123_label("abc-")
    docs = render("local")
    for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "NetworkPolicy"):
        doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
        doc["metadata"]["name"] = "anomaly_detector"
        assert dns_name_errors([doc]), kind
    doc = copy.deepcopy(h.by_kind(docs, "NetworkPolicy")["gateway"])
    doc["spec"]["egress"][-1]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "a_b"
    assert dns_name_errors([doc])
    doc = copy.deepcopy(h.by_kind(docs, "Deployment")["gateway"])
    doc["spec"]["template"]["spec"]["containers"][0]["name"] = "a_b"
    assert dns_name_errors([doc])


STREAM_SERVICES = [n for n in SERVICES if issubclass(h.settings_class(n), StreamSettings)]


@pytest.mark.parametrize("name", STREAM_SERVICES)
def test_stream_tables_are_on_a_writable_volume(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root file system is read-only: a stream service's RocksDB directory, as its settings
    resolve it from the pod's environment, must lie on one of its emptyDir mounts."""
    workload = h.workload(h.base_resources(), name)
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for entry in container["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value", f"{h.k8s_name(name)}-0"))
    data_dir = h.settings_class(name)().data_dir  # type: ignore[attr-defined]
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = [Path(m["mountPath"]) for m in container["volumeMounts"] if m["name"] in empty]
    assert any(data_dir.is_relative_to(m) for m in mounts), f"{name}: {data_dir} is on no emptyDir"


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
    """Production runs three replicas of each Deployment, local one; the singletons one in both; the
    node agents have no replica count anywhere (one pod per node)."""
    rendered = {o: render(o) for o in h.OVERLAYS}
    for overlay, docs in rendered.items():
        kinds = {h.workload_kind(n) for n in SERVICES}
        names = {d["metadata"]["name"] for d in docs if d["kind"] in kinds}
        assert names == {h.k8s_name(n) for n in SERVICES}, overlay
        hpas = set(h.by_kind(docs, "HorizontalPodAutoscaler")) | set(h.by_kind(docs, "ScaledObject"))
        assert not hpas & {h.k8s_name(n) for n in h.NODE_AGENTS | h.SINGLETONS}, overlay
    local, production = (rendered[o] for o in h.OVERLAYS)
    for name in SERVICES:
        lw, pw = h.workload(local, name), h.workload(production, name)
        lc = lw["spec"]["template"]["spec"]["containers"][0]
        pc = pw["spec"]["template"]["spec"]["containers"][0]
        if name in h.NODE_AGENTS:
            assert "replicas" not in lw["spec"] and "replicas" not in pw["spec"]
        elif name in h.SINGLETONS:
            assert lw["spec"]["replicas"] == pw["spec"]["replicas"] == 1
        else:
            assert lw["spec"]["replicas"] == 1 and pw["spec"]["replicas"] == 3
        assert lc["image"] == "reelbus:dev" and pc["image"].endswith(":0.1.0") and "/" in pc["image"]
        assert (lc["imagePullPolicy"], pc["imagePullPolicy"]) == ("Never", "Always")
        assert lc["resources"] != pc["resources"]
        assert all(d["metadata"].get("namespace") == "reelbus" for d in (lw, pw))


def test_overlays_replicas_name_deployments_only() -> None:
    """kustomize ignores a `replicas` entry naming nothing: each must name a Deployment that is
    neither a node agent nor left out."""
    deployments = {h.k8s_name(n) for n in SERVICES if n not in h.NODE_AGENTS}
    for overlay in h.OVERLAYS:
        spec = yaml.safe_load((h.K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        entries = [r["name"] for r in spec["replicas"]]
        assert sorted(entries) == sorted(deployments), overlay
        counts = {r["name"]: r["count"] for r in spec["replicas"]}
        assert all(counts[h.k8s_name(n)] == 1 for n in h.SINGLETONS), overlay
