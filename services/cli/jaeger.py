"""Jaeger, natively, as an optional component of the runner: ``reelbus up jaeger``.

The binary is built from the Go module proxy: the module ``github.com/jaegertracing/jaeger`` at
``JAEGER_MODULE_VERSION`` (Jaeger v2, an OpenTelemetry Collector distribution). ``go install
…/cmd/jaeger@version`` refuses it because its go.mod has a ``replace`` directive, so the install
downloads the module with ``go mod download`` and builds ``./cmd/jaeger`` inside a copy of it, where
the module is the main module and its go.mod applies as written. The module carries no UI assets: the
query API answers (``/api/traces/<id>``, ``/api/services``), the web UI does not.

It is not part of a plain ``reelbus up`` (the first build takes minutes); ``reelbus up jaeger``
builds it once into ``.reelbus/lib/jaeger/`` and starts it with ``deploy/native/jaeger.yaml``.
Services send to it when started with ``OTEL_TRACES_EXPORTER=otlp`` and
``OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318`` (the default stays Zipkin).

Ports move with ``REELBUS_JAEGER_OTLP_HTTP_PORT`` (4318), ``REELBUS_JAEGER_OTLP_GRPC_PORT`` (4317),
``REELBUS_JAEGER_QUERY_PORT`` (16686), ``REELBUS_JAEGER_QUERY_GRPC_PORT`` (16685),
``REELBUS_JAEGER_HEALTH_PORT`` (13133) and ``REELBUS_JAEGER_METRICS_PORT`` (8888).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.cli import infra
from services.cli.infra import Component, InfraError, Layout, Progress

JAEGER_MODULE = "github.com/jaegertracing/jaeger"
JAEGER_MODULE_VERSION = "v1.76.0"  # the Go module's version; the binary reports itself as Jaeger v2
CONFIG = infra.REPO_ROOT / "deploy" / "native" / "jaeger.yaml"


@dataclass(frozen=True)
class Ports:
    otlp_http: int
    otlp_grpc: int
    query: int
    query_grpc: int
    health: int
    metrics: int

    @classmethod
    def from_env(cls) -> Ports:
        return cls(
            otlp_http=infra.env_int("REELBUS_JAEGER_OTLP_HTTP_PORT", 4318),
            otlp_grpc=infra.env_int("REELBUS_JAEGER_OTLP_GRPC_PORT", 4317),
            query=infra.env_int("REELBUS_JAEGER_QUERY_PORT", 16686),
            query_grpc=infra.env_int("REELBUS_JAEGER_QUERY_GRPC_PORT", 16685),
            health=infra.env_int("REELBUS_JAEGER_HEALTH_PORT", 13133),
            metrics=infra.env_int("REELBUS_JAEGER_METRICS_PORT", 8888),
        )

    @property
    def otlp_endpoint(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` should be for a service sending here."""
        return f"http://127.0.0.1:{self.otlp_http}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query}"


def binary(layout: Layout) -> Path:
    return layout.lib / "jaeger" / f"jaeger-{JAEGER_MODULE_VERSION}"


def _go(args: list[str], what: str, layout: Layout, cwd: Path | None = None) -> str:
    if shutil.which("go") is None:
        raise InfraError(f"{what}: Go is not installed; jaeger is built from the Go module proxy")
    log = layout.log_file("install")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:
        result = subprocess.run(["go", *args], stdout=subprocess.PIPE, stderr=err, cwd=cwd, check=False)
    if result.returncode != 0:
        raise InfraError(f"{what} failed (exit {result.returncode}); see {log}")
    return result.stdout.decode()


def install(layout: Layout, progress: Progress) -> None:
    target = binary(layout)
    if target.exists():
        return
    progress(f"building Jaeger {JAEGER_MODULE_VERSION} from the Go module proxy (takes minutes, once)")
    info = json.loads(
        _go(
            ["mod", "download", "-json", f"{JAEGER_MODULE}@{JAEGER_MODULE_VERSION}"],
            "go mod download",
            layout,
        )
    )
    source = layout.lib / "jaeger" / "src"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(info["Dir"], source)  # the module cache is read-only; build in a writable copy
    for root, dirs, _files in os.walk(source):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(Path(root) / d, 0o755)
    partial = target.with_suffix(".partial")
    _go(["build", "-o", str(partial), "./cmd/jaeger"], "go build ./cmd/jaeger", layout, cwd=source)
    partial.rename(target)
    shutil.rmtree(source)


def start(layout: Layout) -> subprocess.Popen[bytes]:
    ports = Ports.from_env()
    env = {
        "JAEGER_OTLP_HTTP_PORT": str(ports.otlp_http),
        "JAEGER_OTLP_GRPC_PORT": str(ports.otlp_grpc),
        "JAEGER_QUERY_PORT": str(ports.query),
        "JAEGER_QUERY_GRPC_PORT": str(ports.query_grpc),
        "JAEGER_HEALTH_PORT": str(ports.health),
        "JAEGER_METRICS_PORT": str(ports.metrics),
    }
    return infra.spawn(layout, "jaeger", [str(binary(layout)), "--config", f"file:{CONFIG}"], env=env)


def healthy(_layout: Layout) -> bool:
    """The query API answers (the health extension says only that the process is up)."""
    try:
        with urllib.request.urlopen(f"{Ports.from_env().query_url}/api/services", timeout=2.0) as resp:
            return "data" in json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False


def jaeger_components() -> list[Component]:
    return [
        Component(
            name="jaeger",
            address=lambda _lay: Ports.from_env().query_url,
            healthy=healthy,
            install=install,
            start=start,
            start_timeout=60.0,
            default=False,
        )
    ]
