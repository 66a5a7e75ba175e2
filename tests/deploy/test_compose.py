"""compose.yaml: valid against the Compose Specification's JSON schema, and a bus that starts in
order, on real readiness, within a documented memory budget."""

from __future__ import annotations

import json
import re

import jsonschema

from tests.deploy import helpers as h

SCHEMA = h.SCHEMAS / "compose-spec" / "compose-spec.json"
ONE_SHOTS = {"keys", "topics"}
NO_HEALTHCHECK = {"jaeger"}  # its image has no shell nor HTTP client (see compose.yaml's header)


def test_compose_yaml_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(h.compose())
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_is_not_vacuous() -> None:
    """A deliberate mistake (an unknown key, a bad depends_on condition) is refused."""
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    bad = h.compose()
    bad["services"]["kafka"]["healthcheck"]["intervall"] = "10s"
    bad["services"]["gateway"]["depends_on"]["accounts"]["condition"] = "service_ready"
    assert len(list(validator.iter_errors(bad))) >= 2
    assert (SCHEMA.parent / "LICENSE").exists()


def _mib(value: str) -> int:
    m = re.fullmatch(r"(\d+)([mg])", str(value).lower())
    assert m, f"memory limit {value!r}: expected <n>m or <n>g"
    return int(m.group(1)) * (1024 if m.group(2) == "g" else 1)


def test_memory_limits_add_up_to_the_documented_totals() -> None:
    services = h.compose()["services"]
    limits = {name: _mib(svc["mem_limit"]) for name, svc in services.items()}
    assert set(limits) == set(services), "every container has a memory limit"
    header = h.COMPOSE.read_text().split("\nservices:")[0]
    figures = header.split("Memory limits")[1].split("\n", 1)[1].split("#   total without profiles")[0]
    figures += header.split("`load` profile")[1].split(":")[0]
    listed = {m.group(1): int(m.group(2)) for m in re.finditer(r"([a-z0-9_-]+) (\d+)", figures)}
    assert listed == limits, "the header's per-container figures match the mem_limits"
    default = sum(v for name, v in limits.items() if "profiles" not in services[name])
    everything = sum(limits.values())
    assert f"total without profiles: {default} MiB" in header
    assert f"(load {limits['load']}): {everything} MiB" in header


def test_healthchecks_test_real_readiness() -> None:
    services = h.compose()["services"]
    expect = {
        "kafka": "kafka-broker-api-versions.sh",
        "cassandra": "SELECT release_version FROM system.local",
        "postgres": "pg_isready",
        "redis": "redis-cli ping",
        "registry": "/apis/ccompat/v7/subjects",
        "galera-1": "--galera_online",
        "galera-2": "--galera_online",
    }
    for name, needle in expect.items():
        assert needle in " ".join(services[name]["healthcheck"]["test"]), name
    for name in h.service_packages():
        port = services[name]["environment"][f"{name.upper()}_HTTP_PORT"]
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "urllib" in test and f"http://127.0.0.1:{port}/readyz" in test, name
    for name, svc in services.items():
        if name not in ONE_SHOTS | NO_HEALTHCHECK | {"load"}:
            assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_depends_on_waits_for_health_or_completion() -> None:
    services = h.compose()["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep in ONE_SHOTS else "service_healthy"
            assert cond == {"condition": want}, f"{name} -> {dep}: {cond}"
            if want == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_one_shots_and_the_load_profile() -> None:
    services = h.compose()["services"]
    topics = services["topics"]["command"]
    assert topics[:3] == ["reelbus", "topics", "apply"]
    assert "kafka:9092" in topics and "http://registry:8081/apis/ccompat/v7" in topics
    assert services["load"]["profiles"] == ["load"]
    assert all("profiles" not in svc for name, svc in services.items() if name != "load")


def test_official_images() -> None:
    images = {name: svc.get("image", "") for name, svc in h.compose()["services"].items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["cassandra"] == "cassandra:5.0"
    assert images["postgres"] == "postgres:15"
    assert images["redis"] == "redis:7"
    assert images["registry"].startswith("apicurio/apicurio-registry:3.")
    assert images["zipkin"].startswith("openzipkin/zipkin:")
    assert images["jaeger"].startswith("jaegertracing/jaeger:2.")
    assert all(images[n].startswith("mariadb:11") for n in ("galera-1", "galera-2", "garbd"))
    assert "--wsrep-new-cluster" in h.compose()["services"]["galera-1"]["command"]
    assert "--wsrep-new-cluster" not in h.compose()["services"]["galera-2"]["command"]


def test_dockerfile_builds_one_image_from_what_the_context_keeps() -> None:
    """The image's Python is the project's, and .dockerignore keeps every path the Dockerfile copies."""
    import tomllib

    dockerfile = (h.ROOT / "Dockerfile").read_text()
    ignored = {line.strip() for line in (h.ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    requires = tomllib.loads((h.ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=3.11,<3.12")
    assert dockerfile.count("FROM python:3.11-") == 2
    copied = re.findall(r"^COPY (?!--from)(\S+)", dockerfile, flags=re.M)
    assert copied == ["pyproject.toml", "services", "schemas", "topics"]
    for path in copied:
        assert (h.ROOT / path).exists() and path not in ignored
    assert (
        "appliances.example.yaml"
        in h.compose()["services"]["playback"]["environment"]["PLAYBACK_APPLIANCES_FILE"]
    )
    assert (h.ROOT / "services" / "playback" / "appliances.example.yaml").exists()
