"""The services of the stack, as components of the native runner: ``reelbus up`` starts them after
the infrastructure, each as ``python -m services.<name>`` with its settings in the environment, and
waits for its ``/readyz``. One table says which service listens where and needs what."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cli import infra
from services.cli.infra import Component, Layout, Progress

SERVICES_DIR = infra.REPO_ROOT / "services"
APPLIANCES_EXAMPLE = SERVICES_DIR / "playback" / "appliances.example.yaml"
INFRA = ("postgres", "redis", "kafka", "registry", "cassandra", "zipkin")
DATABASES = ("galera-1", "galera-2", "garbd", "galera-replica", "haproxy")  # billing's


@dataclass(frozen=True)
class ServiceDef:
    name: str
    default_port: int
    database: str | None = None  # a PostgreSQL database of its own
    mysql_database: str | None = None  # a database of its own on the Galera cluster (billing)
    env: Callable[[Layout], dict[str, str]] = field(default=lambda _lay: {})
    after: tuple[str, ...] = ("postgres", "kafka", "registry")

    @property
    def port(self) -> int:
        """``REELBUS_<NAME>_PORT`` moves it, as for the infrastructure."""
        return infra.env_int(f"REELBUS_{self.name.upper().replace('-', '_')}_PORT", self.default_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def prefix(self) -> str:
        return self.name.upper().replace("-", "_") + "_"

    @property
    def module(self) -> str:
        return f"services.{self.name.replace('-', '_')}"

    def exists(self) -> bool:
        return (SERVICES_DIR / self.name.replace("-", "_") / "__main__.py").exists()


def galera_ports() -> Any:
    from services.cli.galera import Ports

    return Ports.from_env()


def _pg(layout: Layout, db: str) -> str:
    return f"postgresql://reelbus@127.0.0.1:{layout.postgres_port}/{db}"


def _redis(layout: Layout) -> str:
    return f"redis://127.0.0.1:{layout.redis_port}/0"


SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef("accounts", 8101, database="accounts"),
    ServiceDef(
        "catalog",
        8102,
        database="catalog",
        env=lambda lay: {"CATALOG_REDIS_URL": _redis(lay)},
        after=("postgres", "redis", "kafka", "registry"),
    ),
    ServiceDef(
        "playback",
        8103,
        database="playback",
        env=lambda _lay: {
            "PLAYBACK_APPLIANCES_FILE": str(SERVICES_DIR / "playback" / "appliances.example.yaml")
        },
    ),
    ServiceDef(
        "history",
        8104,
        env=lambda lay: {
            "HISTORY_CASSANDRA_HOSTS": "127.0.0.1",
            "HISTORY_CASSANDRA_PORT": str(lay.cassandra_port),
            "HISTORY_KEYSPACE": "history",
        },
        after=("cassandra", "kafka", "registry"),
    ),
    ServiceDef(
        "billing",
        8105,
        mysql_database="billing",
        env=lambda _lay: {
            "BILLING_DATABASE_NAME": "billing",
            "BILLING_WRITE_HOST": "127.0.0.1",
            "BILLING_READ_HOST": "127.0.0.1",
            "BILLING_WRITE_PORT": str(galera_ports().write),
            "BILLING_READ_PORT": str(galera_ports().read),
        },
        after=("haproxy", "kafka", "registry"),
    ),
    # The live dashboard (issue 7), served through the gateway at /dashboard/.
    ServiceDef(
        "dashboard",
        8110,
        env=lambda lay: {"DASHBOARD_ZIPKIN_URL": lay.zipkin_url},
        after=("kafka", "registry", "zipkin"),
    ),
    ServiceDef(
        "abr",
        8109,
        env=lambda lay: {"ABR_REDIS_URL": _redis(lay), "ABR_ALGORITHM": "robustmpc"},
        after=("redis", "kafka", "registry"),
    ),
    # The recommender (issue 5): a Faust stream processor; its RocksDB tables live under data/streams/.
    ServiceDef("recommender", 8112, after=("kafka", "registry")),
    ServiceDef(
        "gateway",
        8080,
        env=lambda lay: {
            "GATEWAY_REDIS_URL": _redis(lay),
            "GATEWAY_ACCOUNTS_URL": service("accounts").url,
            "GATEWAY_CATALOG_URL": service("catalog").url,
            "GATEWAY_PLAYBACK_URL": service("playback").url,
            "GATEWAY_HISTORY_URL": service("history").url,
            "GATEWAY_BILLING_URL": "http://127.0.0.1:" + str(infra.env_int("REELBUS_BILLING_PORT", 8105)),
            "GATEWAY_ABR_URL": service("abr").url,
            "GATEWAY_DASHBOARD_URL": service("dashboard").url,
            "GATEWAY_RECOMMENDER_URL": service("recommender").url,
        },
        after=("redis", "kafka", "registry", "accounts", "catalog", "playback", "history", "billing", "abr"),
    ),
    # The node agent (issue 6): mounts in private mount namespaces, so it needs CAP_SYS_ADMIN (root
    # here); without it, it says so and publishes the mount table's size and read time only.
    ServiceDef("mount_probe", 8120, after=("kafka", "registry")),
    # The autoscaler (issue 6): decisions on scaling.decisions; `reelbus autoscale` acts on them.
    ServiceDef("autoscaler", 8130, after=("kafka", "registry")),
    # The anomaly detector (issue 5): a faust stream processor; anomalies on anomalies.detected.
    ServiceDef("anomaly_detector", 8140, after=("kafka", "registry")),
)


def service(name: str) -> ServiceDef:
    return next(s for s in SERVICES if s.name == name)


def service_env(layout: Layout, svc: ServiceDef) -> dict[str, str]:
    p = svc.prefix
    env = {
        f"{p}HTTP_HOST": "127.0.0.1",
        f"{p}HTTP_PORT": str(svc.port),
        f"{p}KAFKA_BOOTSTRAP_SERVERS": layout.bootstrap_servers,
        f"{p}REGISTRY_URL": layout.registry_url,
        f"{p}INSTANCE_ID": f"{svc.name}-0",
        "OTEL_SERVICE_NAME": svc.name,
        "OTEL_TRACES_EXPORTER": "zipkin",
        "OTEL_EXPORTER_ZIPKIN_ENDPOINT": f"{layout.zipkin_url}/api/v2/spans",
        "REELBUS_HOME": str(layout.home),
    }
    if svc.database:
        env[f"{p}DATABASE_URL"] = _pg(layout, svc.database)
    env.update(svc.env(layout))
    return env


def _component(svc: ServiceDef) -> Component:
    def install(layout: Layout, _progress: Progress) -> None:
        return None

    def start(layout: Layout) -> subprocess.Popen[bytes]:
        if svc.database:
            infra.ensure_database(layout, svc.database)
        if svc.mysql_database:
            from services.cli.galera import endpoint_sql

            endpoint_sql(galera_ports().write, f"CREATE DATABASE IF NOT EXISTS `{svc.mysql_database}`")
        return infra.spawn(layout, svc.name, [sys.executable, "-m", svc.module], env=service_env(layout, svc),
                           cwd=infra.REPO_ROOT)  # fmt: skip

    def healthy(layout: Layout) -> bool:
        return infra.http_ok(f"{svc.url}/readyz")

    return Component(
        name=svc.name,
        address=lambda _lay: svc.url,
        healthy=healthy,
        install=install,
        start=start,
        stop_signal=signal.SIGTERM,
        after=svc.after,
        start_timeout=90.0,
    )


def service_components() -> list[Component]:
    """The services whose package exists in this checkout, in start order."""
    return [_component(s) for s in SERVICES if s.exists()]


def log_file(layout: Layout, name: str) -> Path:
    return layout.log_file(name)
