"""compose.yaml and the kustomize base against the code: every runnable service is deployed, with
every setting it requires, the environment ``reelbus up`` gives it natively (container host names),
its port, and only topics that topics/topics.yaml declares."""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.cli import stack
from services.gateway.routes import ROUTES
from tests.deploy import helpers as h

SERVICES = h.service_packages()
EXTRA_ENV = {"OTEL_EXPORTER_OTLP_ENDPOINT"}  # for OTEL_TRACES_EXPORTER=otlp (Jaeger); unused by default


def k8s_env(deployment: h.Doc) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_there_are_services() -> None:
    assert {"accounts", "catalog", "playback", "history", "gateway"} <= set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_is_in_compose_and_in_the_base(name: str) -> None:
    compose = h.compose()["services"]
    assert name in compose, f"compose.yaml has no service {name}"
    assert compose[name]["command"] == ["python", "-m", f"services.{name}"]
    assert compose[name]["build"]["dockerfile"] == "Dockerfile"
    kind, k8s = h.workload_kind(name), h.k8s_name(name)
    workloads = h.by_kind(h.base_resources(), kind)
    assert k8s in workloads, f"deploy/k8s/base has no {kind} {k8s}"
    container = workloads[k8s]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    assert container["image"] == "reelbus"


@pytest.mark.parametrize("name", SERVICES)
def test_required_settings_are_set(name: str) -> None:
    required = h.required_env(name)
    env = h.compose()["services"][name]["environment"]
    assert required <= set(env), f"compose {name} misses {sorted(required - set(env))}"
    kenv = k8s_env(h.workload(h.base_resources(), name))
    assert required <= set(kenv), f"k8s {name} misses {sorted(required - set(kenv))}"


@pytest.mark.parametrize("name", SERVICES)
def test_every_variable_names_a_setting(name: str) -> None:
    """A misspelt variable would be ignored silently (extra="ignore"): each must be a field."""
    cls = h.settings_class(name)
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    fields = {prefix + f.upper() for f in cls.model_fields}
    env = h.compose()["services"][name]["environment"]
    kenv = k8s_env(h.workload(h.base_resources(), name))
    for key in set(env) | set(kenv):
        if key.startswith(prefix):
            assert key in fields, f"{name}: {key} is no setting of {cls.__module__}.Settings"


@pytest.mark.parametrize("name", [s for s in SERVICES if h.in_stack(s)])
def test_compose_environment_is_the_native_one(name: str) -> None:
    expected = h.expected_container_env(name)
    env = {k: str(v) for k, v in h.compose()["services"][name]["environment"].items()}
    assert set(env) - EXTRA_ENV == set(expected), "the same variables as services/cli/stack.py sets"
    assert {k: env[k] for k in expected} == expected


@pytest.mark.parametrize("name", [s for s in SERVICES if h.in_stack(s)])
def test_k8s_environment_is_the_native_one(name: str) -> None:
    expected = h.expected_container_env(name)
    kenv = k8s_env(h.workload(h.base_resources(), name))
    downward = h.NODE_AGENT_ENV.get(name, {}) if name in h.NODE_AGENTS else {}
    for key, path in downward.items():  # a node agent's node, from the downward API only
        assert key not in expected
        assert kenv.pop(key) == {"fieldRef": {"fieldPath": path}}
    assert set(kenv) - EXTRA_ENV == set(expected)
    instance = next(k for k in expected if k.endswith("_INSTANCE_ID"))
    assert kenv.pop(instance) == {"fieldRef": {"fieldPath": "metadata.name"}}, "unique per replica"
    expected.pop(instance)
    assert {k: kenv[k] for k in expected} == expected


@pytest.mark.parametrize("name", SERVICES)
def test_ports_agree(name: str) -> None:
    prefix = name.upper() + "_"
    port = int(h.compose()["services"][name]["environment"][f"{prefix}HTTP_PORT"])
    if h.in_stack(name):
        assert port == stack.service(name).default_port
    assert f"127.0.0.1:{port}:{port}" in h.compose()["services"][name]["ports"]
    docs = h.base_resources()
    container = h.workload(docs, name)["spec"]["template"]["spec"]["containers"][0]
    assert k8s_env(h.workload(docs, name))[f"{prefix}HTTP_PORT"] == str(port)
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    service = h.by_kind(docs, "Service")[h.k8s_name(name)]
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": h.k8s_name(name)}


LISTENS = {
    "kafka": {9092},
    "registry": {8081},
    "postgres": {5432},
    "redis": {6379},
    "cassandra": {9042},
    "zipkin": {9411},
    "jaeger": {4317, 4318},
    "haproxy": {3306, 3307},
}


def test_every_address_names_a_deployed_host_and_port() -> None:
    """host:port pairs (and <X>_HOST(S)/<X>_PORT pairs) in the services' variables point at compose
    services on ports they listen on; in the base, at its Services (Kubernetes names) or at the
    infrastructure, on the ports those Services serve."""
    compose = h.compose()["services"]
    listens = dict(LISTENS)
    for name in SERVICES:
        listens[name] = {int(compose[name]["environment"][f"{name.upper()}_HTTP_PORT"])}
    docs = h.base_resources()
    k8s_listens = dict(LISTENS)
    for service_name, service in h.by_kind(docs, "Service").items():
        k8s_listens[service_name] = {p["port"] for p in service["spec"]["ports"]}
    for name in SERVICES:
        for env, hosts in (
            (compose[name]["environment"], listens),
            (k8s_env(h.workload(docs, name)), k8s_listens),
        ):
            pairs = [
                (m.group(1), int(m.group(2)), key)
                for key, value in env.items()
                for m in re.finditer(r"(?:^|//|@)([a-z][a-z0-9-]*):(\d+)", str(value))
            ]
            for key, value in env.items():
                stem = re.sub(r"_HOSTS?$", "", key)
                if stem != key and f"{stem}_PORT" in env and not key.endswith("_HTTP_HOST"):
                    pairs.append((str(value), int(env[f"{stem}_PORT"]), key))
            for host, port, key in pairs:
                assert host in hosts, f"{name} {key}: no service {host}"
                assert port in hosts[host], f"{name} {key}: {host} does not listen on {port}"
                if hosts is listens:
                    assert host in compose, f"{name} {key}: no compose service {host}"


def test_keda_triggers_name_declared_topics_consumed_by_their_service() -> None:
    """A ScaledObject is named after its service's Kubernetes name, which is also its consumer group
    and the consumer topics/topics.yaml declares for each topic it measures."""
    topics = h.topics()
    scaled = h.by_kind(h.base_resources(), "ScaledObject")
    assert scaled, "a ScaledObject per Kafka consumer"
    k8s_names = {h.k8s_name(n) for n in SERVICES}
    for name, obj in scaled.items():
        assert name in k8s_names, f"ScaledObject {name} is no service's Kubernetes name"
        kafka = [t for t in obj["spec"]["triggers"] if t["type"] == "kafka"]
        assert kafka, f"{name}: no kafka lag trigger"
        for trigger in kafka:
            topic = trigger["metadata"]["topic"]
            assert topic in topics, f"{name}: topic {topic} is not in topics/topics.yaml"
            assert name in topics[topic]["consumers"], f"{name} is no consumer of {topic} in topics.yaml"
            assert trigger["metadata"]["consumerGroup"] == name
            assert trigger["metadata"]["bootstrapServers"] == "kafka:9092"
        assert len({t["metadata"]["topic"] for t in kafka}) == len(kafka), f"{name}: a topic twice"


def test_consumers_with_a_shared_group_have_a_scaled_object() -> None:
    """playback and history consume in one group named after the service; the stream services
    (anomaly_detector, recommender) in their faust app id, their Kubernetes name, with an agent per
    topic. catalog's group is per replica (every replica sees every change), so lag does not measure
    its load."""
    from services.anomaly_detector import app as anomaly
    from services.history.app import CONSUMES as HISTORY
    from services.playback.app import CONSUMES as PLAYBACK
    from services.recommender import app as recommender
    from services.recommender.handlers import VIEWS

    scaled = h.by_kind(h.base_resources(), "ScaledObject")
    groups = {
        "playback": ("playback", set(PLAYBACK)),
        "history": ("history", set(HISTORY)),
        "anomaly_detector": (anomaly.NAME, {*anomaly.INPUTS, *anomaly.ROUTES.values()}),
        "recommender": (recommender.NAME, {VIEWS}),
    }
    for name, (group, consumes) in groups.items():
        assert group == h.k8s_name(name), f"{name}: its consumer group is {group}"
        triggers = [t for t in scaled[h.k8s_name(name)]["spec"]["triggers"] if t["type"] == "kafka"]
        assert {t["metadata"]["topic"] for t in triggers} == consumes, name
        assert {t["metadata"]["consumerGroup"] for t in triggers} == {group}, name


def test_gateway_routes_reach_their_upstreams() -> None:
    compose = h.compose()["services"]["gateway"]["environment"]
    docs = h.base_resources()
    policies = h.by_kind(docs, "NetworkPolicy")
    egress = policies["gateway"]["spec"]["egress"]
    reachable = {
        (peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"], port["port"])
        for rule in egress
        for peer in rule["to"]
        for port in rule["ports"]
    }
    kenv = k8s_env(h.workload(docs, "gateway"))
    for upstream in {r.upstream for r in ROUTES}:
        url = compose[f"GATEWAY_{upstream.upper()}_URL"]
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://{upstream}:{port}"
        k8s = h.k8s_name(upstream)  # the base's Service, pod label and policy for that package
        assert kenv[f"GATEWAY_{upstream.upper()}_URL"] == f"http://{k8s}:{port}"
        assert (k8s, port) in reachable, f"NetworkPolicy: gateway cannot reach {k8s}:{port}"
        ingress = policies[k8s]["spec"]["ingress"] if k8s in policies else []
        assert any(
            peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "gateway"}
            for rule in ingress
            for peer in rule["from"]
        ), f"NetworkPolicy: {k8s} does not admit the gateway"
