"""Shared reading of the deploy files for tests/deploy: compose.yaml, the kustomize base, the service
table (services/cli/stack.py) and the services' settings models."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from services.cli import stack

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ("local", "production")
SCHEMAS = ROOT / "deploy" / "schemas"
INSTALL_TOOLS = "deploy/k8s/install-tools.sh"

# The infrastructure's container host names and the ports they listen on, as natively.
INFRA_HOSTS = {
    "kafka": 9092,
    "registry": 8081,
    "postgres": 5432,
    "redis": 6379,
    "cassandra": 9042,
    "zipkin": 9411,
}

Doc = dict[str, Any]

# Node agents run as a DaemonSet, one pod per node, not as a Deployment: mount_probe measures its
# node's kernel mount path (privileged, deploy/k8s/base/deployments.yaml). They have no autoscaler, no
# replica count in the overlays, and may take the downward-API variables named here (fieldRef only).
NODE_AGENTS = {"mount_probe"}
NODE_AGENT_ENV = {"mount_probe": {"MOUNT_PROBE_NODE_NAME": "spec.nodeName"}}

# Singletons run as exactly one replica in every overlay, with no HPA and a budget that lets a drain
# evict them: the autoscaler keeps per-service windows and per-node state in memory, and replicas
# would split the samples' partitions and each decide over a part of them.
SINGLETONS = {"autoscaler"}

# What the API server accepts as object names (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # at most 63 characters
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # <= 253
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # Services' names; at most 63 characters


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and DNS1123_LABEL.fullmatch(value) is not None


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and DNS1123_SUBDOMAIN.fullmatch(value) is not None


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and DNS1035_LABEL.fullmatch(value) is not None


def k8s_name(package: str) -> str:
    """A service's name in Kubernetes (objects, labels, accounts, containers, Service host names):
    its package name with ``_`` made ``-``. Compose keeps the package name."""
    return package.replace("_", "-")


def workload_kind(package: str) -> str:
    return "DaemonSet" if package in NODE_AGENTS else "Deployment"


def workload(docs: list[Doc], package: str) -> Doc:
    """The Deployment (or, for a node agent, the DaemonSet) running a service."""
    return by_kind(docs, workload_kind(package))[k8s_name(package)]


def service_packages() -> list[str]:
    """Every service folder under services/ that can run (it has ``__main__.py``)."""
    return sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))


def settings_class(package: str) -> type[BaseSettings]:
    module = importlib.import_module(f"services.{package}.settings")
    cls = module.Settings
    assert isinstance(cls, type) and issubclass(cls, BaseSettings)
    return cls


def required_env(package: str) -> set[str]:
    """The variables a service cannot start without: its settings fields without a default."""
    cls = settings_class(package)
    prefix = str(cls.model_config.get("env_prefix", ""))
    return {(prefix + name).upper() for name, f in cls.model_fields.items() if f.is_required()}


def shutdown_grace(package: str, env: dict[str, str]) -> float:
    cls = settings_class(package)
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    default = cls.model_fields["shutdown_grace_seconds"].default
    return float(env.get(f"{prefix}SHUTDOWN_GRACE_SECONDS", default))


def compose() -> Doc:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def base_resources() -> list[Doc]:
    return copy.deepcopy(_base_resources())


@functools.cache
def _base_resources() -> list[Doc]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((BASE / name).read_text()) if d)
    return docs


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def topics() -> dict[str, Doc]:
    data = yaml.safe_load((ROOT / "topics" / "topics.yaml").read_text())
    return {t["name"]: t for t in data["topics"]}


def native_env(name: str) -> dict[str, str]:
    """What ``reelbus up`` gives the service, on the default ports whatever REELBUS_*_PORT says."""
    from services.cli import infra

    layout = dataclasses.replace(
        infra.Layout.from_env(),
        home=ROOT / ".reelbus",
        kafka_port=9092,
        registry_port=8081,
        zipkin_port=9411,
        postgres_port=5432,
        redis_port=6379,
        cassandra_port=9042,
    )
    env = stack.service_env(layout, stack.service(name))
    svc = stack.service(name)
    env[f"{svc.prefix}HTTP_PORT"] = str(svc.default_port)
    for key in env:
        for other in stack.SERVICES:  # upstream URLs use the default ports too
            env[key] = env[key].replace(other.url, f"http://127.0.0.1:{other.default_port}")
    return env


def in_stack(name: str) -> bool:
    return any(s.name == name for s in stack.SERVICES)


def expected_container_env(name: str) -> dict[str, str]:
    """The native environment of a service translated for a container (services/cli/stack.py)."""
    out: dict[str, str] = {}
    for key, value in native_env(name).items():
        if key.endswith("_HTTP_HOST"):
            out[key] = "0.0.0.0"  # reachable from other containers, not only from itself
        elif key == "HISTORY_CASSANDRA_HOSTS":
            out[key] = "cassandra"
        elif key in ("BILLING_WRITE_HOST", "BILLING_READ_HOST"):
            out[key] = "haproxy"  # natively HAProxy's endpoints on loopback
        else:
            out[key] = containerise(value)
    return out


def containerise(value: str) -> str:
    """A native value as it must read in a container: localhost addresses become host names,
    paths under the checkout move to /app, REELBUS_HOME to /var/lib/reelbus."""
    ports = {port: host for host, port in INFRA_HOSTS.items()}
    ports.update({s.default_port: s.name for s in stack.SERVICES})
    ports[8105] = "billing"

    def host(m: re.Match[str]) -> str:
        port = int(m.group(2))
        return f"{ports[port]}:{port}" if port in ports else m.group(0)

    value = re.sub(r"(127\.0\.0\.1|localhost):(\d+)", host, value)
    value = value.replace(str(ROOT / "services"), "/app/services")
    if value == str(ROOT / ".reelbus") or value.endswith("/.reelbus"):
        return "/var/lib/reelbus"
    if value in ("127.0.0.1", "localhost"):
        return value  # a bare host: decided per key by the caller
    return value
