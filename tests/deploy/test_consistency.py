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
    deployments = h.by_kind(h.base_resources(), "Deployment")
    assert name in deployments, f"deploy/k8s/base has no Deployment {name}"
    container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", f"services.{name}"]
    assert container["image"] == "reelbus"


@pytest.mark.parametrize("name", SERVICES)
def test_required_settings_are_set(name: str) -> None:
    required = h.required_env(name)
    env = h.compose()["services"][name]["environment"]
    assert required <= set(env), f"compose {name} misses {sorted(required - set(env))}"
    kenv = k8s_env(h.by_kind(h.base_resources(), "Deployment")[name])
    assert required <= set(kenv), f"k8s {name} misses {sorted(required - set(kenv))}"


@pytest.mark.parametrize("name", SERVICES)
def test_every_variable_names_a_setting(name: str) -> None:
    """A misspelt variable would be ignored silently (extra="ignore"): each must be a field."""
    cls = h.settings_class(name)
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    fields = {prefix + f.upper() for f in cls.model_fields}
    env = h.compose()["services"][name]["environment"]
    kenv = k8s_env(h.by_kind(h.base_resources(), "Deployment")[name])
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
    kenv = k8s_env(h.by_kind(h.base_resources(), "Deployment")[name])
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
    container = h.by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
    assert k8s_env(h.by_kind(docs, "Deployment")[name])[f"{prefix}HTTP_PORT"] == str(port)
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    service = h.by_kind(docs, "Service")[name]
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}


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
    services on ports they listen on, and the base uses the same Service names."""
    compose = h.compose()["services"]
    listens = dict(LISTENS)
    for name in SERVICES:
        listens[name] = {int(compose[name]["environment"][f"{name.upper()}_HTTP_PORT"])}
    deployments = h.by_kind(h.base_resources(), "Deployment")
    for name in SERVICES:
        for env in (compose[name]["environment"], k8s_env(deployments[name])):
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
                assert host in compose, f"{name} {key}: no compose service {host}"
                assert port in listens[host], f"{name} {key}: {host} does not listen on {port}"


def test_keda_triggers_name_declared_topics_consumed_by_their_service() -> None:
    topics = h.topics()
    scaled = h.by_kind(h.base_resources(), "ScaledObject")
    assert scaled, "a ScaledObject per Kafka consumer"
    for name, obj in scaled.items():
        kafka = [t for t in obj["spec"]["triggers"] if t["type"] == "kafka"]
        assert kafka, f"{name}: no kafka lag trigger"
        for trigger in kafka:
            topic = trigger["metadata"]["topic"]
            assert topic in topics, f"{name}: topic {topic} is not in topics/topics.yaml"
            assert name in topics[topic]["consumers"], f"{name} is no consumer of {topic} in topics.yaml"
            assert trigger["metadata"]["consumerGroup"] == name
            assert trigger["metadata"]["bootstrapServers"] == "kafka:9092"


def test_consumers_with_a_shared_group_have_a_scaled_object() -> None:
    """playback and history consume in one group named after the service; catalog's group is per
    replica (every replica sees every change), so lag does not measure its load."""
    from services.history.app import CONSUMES as HISTORY
    from services.playback.app import CONSUMES as PLAYBACK

    scaled = h.by_kind(h.base_resources(), "ScaledObject")
    for name, consumes in (("playback", PLAYBACK), ("history", HISTORY)):
        topics = {t["metadata"]["topic"] for t in scaled[name]["spec"]["triggers"] if t["type"] == "kafka"}
        assert topics == set(consumes)


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
    for upstream in {r.upstream for r in ROUTES}:
        url = compose[f"GATEWAY_{upstream.upper()}_URL"]
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://{upstream}:{port}"
        assert (upstream, port) in reachable, f"NetworkPolicy: gateway cannot reach {upstream}:{port}"
        ingress = policies[upstream]["spec"]["ingress"] if upstream in policies else []
        assert any(
            peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "gateway"}
            for rule in ingress
            for peer in rule["from"]
        ), f"NetworkPolicy: {upstream} does not admit the gateway"
