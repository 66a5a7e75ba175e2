"""The native runner: installs and starts the bus's infrastructure without a Docker engine.

Every component is a plain child process started in its own session, with its data, logs and pid
files under one project-local folder (``.reelbus/`` by default, ``REELBUS_HOME`` to move it). A
component's pid file records the process start time as well, so ``down`` never signals a pid that
the kernel has since handed to another program. ``up`` is idempotent: a component that is already
running and healthy is left alone, and ``up`` reports which ones it started, so a test session
stops only those.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.bus.auth import generate_key_pair

REPO_ROOT = Path(__file__).resolve().parents[2]
NATIVE_DIR = REPO_ROOT / "deploy" / "native"

APICURIO_ARTIFACT = "io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all"
ZIPKIN_ARTIFACT = "io.zipkin:zipkin-server:3.5.1:jar:exec"
DEBIAN_PACKAGES = {"postgres": "postgresql", "redis-server": "redis-server"}

Progress = Callable[[str], None]


class InfraError(RuntimeError):
    """A component could not be installed or started; the message names it and its log."""


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InfraError(f"{name}={raw!r} is not a port number") from None
    if not 0 < value < 65536:
        raise InfraError(f"{name}={raw!r} is outside 1..65535")
    return value


_env_int = env_int  # the old name, still used by work in progress


@dataclass(frozen=True)
class Layout:
    """Where everything lives, and on which ports it listens."""

    home: Path
    kafka_port: int
    kafka_controller_port: int
    registry_port: int
    registry_management_port: int
    zipkin_port: int
    postgres_port: int
    redis_port: int
    cassandra_port: int
    cassandra_storage_port: int

    @classmethod
    def from_env(cls) -> Layout:
        home = Path(os.environ.get("REELBUS_HOME") or REPO_ROOT / ".reelbus").resolve()
        return cls(
            home=home,
            kafka_port=env_int("REELBUS_KAFKA_PORT", 9092),
            kafka_controller_port=env_int("REELBUS_KAFKA_CONTROLLER_PORT", 9093),
            registry_port=env_int("REELBUS_REGISTRY_PORT", 8081),
            registry_management_port=env_int("REELBUS_REGISTRY_MANAGEMENT_PORT", 8091),
            zipkin_port=env_int("REELBUS_ZIPKIN_PORT", 9411),
            postgres_port=env_int("REELBUS_POSTGRES_PORT", 5432),
            redis_port=env_int("REELBUS_REDIS_PORT", 6379),
            cassandra_port=env_int("REELBUS_CASSANDRA_PORT", 9042),
            cassandra_storage_port=env_int("REELBUS_CASSANDRA_STORAGE_PORT", 7000),
        )

    @property
    def lib(self) -> Path:
        return self.home / "lib"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def bootstrap_servers(self) -> str:
        return f"localhost:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return f"http://localhost:{self.registry_port}/apis/ccompat/v7"

    @property
    def zipkin_url(self) -> str:
        return f"http://localhost:{self.zipkin_port}"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.json"


# --- processes -------------------------------------------------------------------------------


def _proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces; fields after it are space separated.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has ended
        return None
    return int(fields[19])


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int
    command: list[str]

    def alive(self) -> bool:
        return _proc_start_ticks(self.pid) == self.start_ticks


def read_pid(layout: Layout, name: str) -> PidRecord | None:
    path = layout.pid_file(name)
    try:
        raw = json.loads(path.read_text())
        return PidRecord(
            pid=int(raw["pid"]), start_ticks=int(raw["start_ticks"]), command=list(raw["command"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_pid(layout: Layout, name: str, proc: subprocess.Popen[bytes], command: Sequence[str]) -> None:
    ticks = _proc_start_ticks(proc.pid)
    if ticks is None:
        raise InfraError(f"{name} exited at once; see {layout.log_file(name)}")
    layout.run.mkdir(parents=True, exist_ok=True)
    record = {"pid": proc.pid, "start_ticks": ticks, "command": list(command)}
    layout.pid_file(name).write_text(json.dumps(record))


# The children this process started, so their Popen objects live as long as they do (a collected
# Popen of a running child warns); ``stop_pid`` reaps them.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def spawn(
    layout: Layout,
    name: str,
    command: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    log = layout.log_file(name).open("ab")
    try:
        proc = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            user=user,
            group=user,
        )
    finally:
        log.close()
    _CHILDREN[proc.pid] = proc
    _write_pid(layout, name, proc, command)
    return proc


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(10)


def stop_pid(layout: Layout, name: str, sig: signal.Signals, timeout: float = 45.0) -> str:
    """Stop the component by the pid ``up`` recorded; never by name. Returns what happened."""
    record = read_pid(layout, name)
    if record is None:
        return "not started"
    if not record.alive():
        layout.pid_file(name).unlink(missing_ok=True)
        return "was not running"
    os.kill(record.pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not record.alive():
            layout.pid_file(name).unlink(missing_ok=True)
            _reap(record.pid)
            return f"stopped (pid {record.pid})"
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
        time.sleep(0.1)
    os.kill(record.pid, signal.SIGKILL)
    _reap(record.pid)
    layout.pid_file(name).unlink(missing_ok=True)
    return f"killed after {timeout:.0f}s (pid {record.pid})"


# --- health probes ---------------------------------------------------------------------------


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _postgres_ready(port: int) -> bool:
    result = subprocess.run(
        ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)], check=False, capture_output=True
    )
    return result.returncode == 0


def _kafka_ready(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 1500, "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=1.5)
    except Exception:
        return False
    return len(metadata.brokers) > 0


# --- components ------------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    address: Callable[[Layout], str]
    healthy: Callable[[Layout], bool]
    install: Callable[[Layout, Progress], None]
    start: Callable[[Layout], subprocess.Popen[bytes]]
    stop_signal: signal.Signals = signal.SIGTERM
    after: tuple[str, ...] = ()
    start_timeout: float = 90.0
    post_start: Callable[[Layout], None] | None = None
    memory_flags: tuple[str, ...] = field(default_factory=tuple)
    default: bool = True  # started by a plain ``up``; otherwise only when named (``up jaeger``)


def _run(cmd: Sequence[str], what: str, log: Path, cwd: Path | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, check=False, cwd=cwd)
    if result.returncode != 0:
        raise InfraError(f"{what} failed (exit {result.returncode}); see {log}")


def _mvn(layout: Layout, args: Sequence[str], what: str) -> None:
    if shutil.which("mvn") is None:
        raise InfraError(f"{what}: Maven (mvn) is not installed; install it (apt-get install maven)")
    _run(["mvn", "-B", "-q", *args], what, layout.log_file("install"))


def _apt_install(layout: Layout, binary: str) -> None:
    package = DEBIAN_PACKAGES[binary]
    if os.geteuid() != 0:
        raise InfraError(f"{binary} is missing: install the Debian package {package!r} (needs root)")
    log = layout.log_file("install")
    _run(["apt-get", "update", "-qq"], "apt-get update", log)
    env_cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", package]
    _run(env_cmd, f"apt-get install {package}", log)


def _which_postgres() -> Path | None:
    found = shutil.which("postgres")
    if found:
        return Path(found)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    return candidates[0] if candidates else None


def java_major(java: Path) -> int | None:
    release = java.parent.parent / "release"
    with contextlib.suppress(OSError):
        match = re.search(r'^JAVA_VERSION="(\d+)', release.read_text(), re.MULTILINE)
        if match:
            return int(match.group(1))
    result = subprocess.run([str(java), "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)', result.stderr)
    return int(match.group(1)) if match else None


def find_java(minimum: int, setting: str) -> Path:
    """A java binary of at least ``minimum``: ``setting`` (a JAVA_HOME) first, then the installed JDKs."""
    configured = os.environ.get(setting)
    if configured:
        java = Path(configured) / "bin" / "java"
        major = java_major(java) if java.exists() else None
        if major is None or major < minimum:
            raise InfraError(f"{setting}={configured} is not a Java {minimum}+ home (found {major})")
        return java
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]) / "bin" / "java")
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve())
    candidates += sorted(Path("/usr/lib/jvm").glob("*/bin/java"))
    best: tuple[int, Path] | None = None
    for java in candidates:
        major = java_major(java) if java.exists() else None
        if major is not None and major >= minimum and (best is None or major < best[0]):
            best = (major, java)
    if best is None:
        raise InfraError(
            f"no Java {minimum} or newer found (looked in JAVA_HOME, PATH, /usr/lib/jvm); set {setting}"
        )
    return best[1]


# postgres ------------------------------------------------------------------------------------


def _pg_user() -> str | None:
    """Postgres refuses to run as root: as root, run it as the Debian package's postgres user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise InfraError(
            "running as root needs the 'postgres' system user (Debian package postgresql)"
        ) from None
    return "postgres"


def _pg_data(layout: Layout) -> Path:
    """The cluster's folder: ``data/postgres``, or where that symlink points (see ``_pg_install``)."""
    return (layout.data / "postgres").resolve()


def _reachable_by(user: str, path: Path) -> bool:
    probe = subprocess.run(["test", "-w", str(path)], user=user, group=user, check=False, capture_output=True)
    return probe.returncode == 0


def _pg_install(layout: Layout, progress: Progress) -> None:
    if _which_postgres() is None:
        progress("installing PostgreSQL (apt)")
        _apt_install(layout, "postgres")
    link = layout.data / "postgres"
    if (_pg_data(layout) / "PG_VERSION").exists():
        return
    progress("initialising the PostgreSQL cluster")
    link.mkdir(parents=True, exist_ok=True)
    user = _pg_user()
    if user:
        shutil.chown(link, user, user)
        if not _reachable_by(user, link):
            # The checkout sits under a folder the postgres user cannot enter (a root-only home, say):
            # keep the cluster in a folder of its own and leave a symlink in the project's data folder.
            digest = hashlib.sha1(str(layout.home).encode()).hexdigest()[:12]
            elsewhere = Path("/var/lib/reelbus") / digest / "postgres"
            elsewhere.mkdir(parents=True, exist_ok=True)
            shutil.chown(elsewhere, user, user)
            link.rmdir()
            link.symlink_to(elsewhere, target_is_directory=True)
            progress(f"postgres cannot reach {layout.data}; its cluster lives in {elsewhere}")
    data = _pg_data(layout)
    postgres = _which_postgres()
    assert postgres is not None
    initdb = postgres.parent / "initdb"
    cmd = [str(initdb), "-D", str(data), "-U", "reelbus", "--auth=trust", "-E", "UTF8", "--no-instructions"]
    log = layout.log_file("postgres")
    layout.logs.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, user=user, group=user)
    if result.returncode != 0:
        raise InfraError(f"postgres: initdb failed; see {log}")


def _pg_start(layout: Layout) -> subprocess.Popen[bytes]:
    postgres = _which_postgres()
    assert postgres is not None
    data = _pg_data(layout)
    cmd = [
        str(postgres),
        "-D",
        str(data),
        "-p",
        str(layout.postgres_port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"unix_socket_directories={data}",
        "-c",
        "max_connections=200",
        "-c",
        "shared_buffers=128MB",
        "-c",
        "fsync=on",
    ]
    return spawn(layout, "postgres", cmd, user=_pg_user())


def psql(layout: Layout, sql: str, database: str = "postgres") -> str:
    result = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(layout.postgres_port),
            "-U",
            "reelbus",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-qtAc",
            sql,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise InfraError(f"postgres: {sql!r} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def ensure_database(layout: Layout, name: str) -> None:
    if psql(layout, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
        psql(layout, f'CREATE DATABASE "{name}"')


def _pg_post_start(layout: Layout) -> None:
    ensure_database(layout, "registry")


# redis ---------------------------------------------------------------------------------------


def _redis_install(layout: Layout, progress: Progress) -> None:
    if shutil.which("redis-server") is None:
        progress("installing Redis (apt)")
        _apt_install(layout, "redis-server")


def _redis_start(layout: Layout) -> subprocess.Popen[bytes]:
    data = layout.data / "redis"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        "redis-server",
        "--port",
        str(layout.redis_port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--daemonize",
        "no",
        "--maxmemory",
        "256mb",
        "--maxmemory-policy",
        "allkeys-lru",
    ]
    return spawn(layout, "redis", cmd)


# kafka ---------------------------------------------------------------------------------------


def _kafka_lib(layout: Layout) -> Path:
    return layout.lib / "kafka"


def _kafka_install(layout: Layout, progress: Progress) -> None:
    lib = _kafka_lib(layout)
    if any(lib.glob("kafka_2.13-*.jar")):
        return
    progress("downloading Kafka (maven)")
    tmp = lib.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _mvn(
        layout,
        [
            "-f",
            str(NATIVE_DIR / "kafka-pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ],
        "downloading Kafka",
    )
    tmp.rename(lib)


def kafka_java_cmd(layout: Layout, main: str, *args: str, heap: str = "256m") -> list[str]:
    java = find_java(17, "REELBUS_KAFKA_JAVA_HOME")
    return [
        str(java),
        f"-Xmx{heap}",
        "-cp",
        f"{_kafka_lib(layout)}/*",
        f"-Dlog4j2.configurationFile={NATIVE_DIR / 'kafka-log4j2.properties'}",
        f"-Dkafka.logs.dir={layout.logs / 'kafka-tools'}",
        main,
        *args,
    ]


def _kafka_config(layout: Layout) -> Path:
    data = layout.data / "kafka"
    template = (NATIVE_DIR / "kafka-server.properties").read_text()
    text = template.format(
        port=layout.kafka_port, controller_port=layout.kafka_controller_port, data_dir=data / "log"
    )
    config = layout.home / "config" / "kafka-server.properties"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    if not (data / "log" / "meta.properties").exists():
        (data / "log").mkdir(parents=True, exist_ok=True)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = kafka_java_cmd(
            layout, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(config)
        )
        _run(cmd, "kafka: formatting the KRaft log dir", layout.log_file("kafka"))
    return config


def _kafka_start(layout: Layout) -> subprocess.Popen[bytes]:
    config = _kafka_config(layout)
    java = find_java(17, "REELBUS_KAFKA_JAVA_HOME")
    cmd = [
        str(java),
        "-Xms512m",
        "-Xmx512m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        "-cp",
        f"{_kafka_lib(layout)}/*",
        f"-Dlog4j2.configurationFile={NATIVE_DIR / 'kafka-log4j2.properties'}",
        f"-Dkafka.logs.dir={layout.logs}",
        "kafka.Kafka",
        str(config),
    ]
    return spawn(layout, "kafka", cmd)


# apicurio registry ---------------------------------------------------------------------------


def _registry_dir(layout: Layout) -> Path:
    return layout.lib / "apicurio-registry"


def _registry_install(layout: Layout, progress: Progress) -> None:
    target = _registry_dir(layout)
    if (target / "quarkus-run.jar").exists():
        return
    progress("downloading Apicurio Registry (maven)")
    download = layout.lib / "download"
    _mvn(
        layout,
        ["dependency:copy", f"-Dartifact={APICURIO_ARTIFACT}", f"-DoutputDirectory={download}"],
        "downloading Apicurio Registry",
    )
    archive = next(download.glob("apicurio-registry-app-*-all.tar.gz"))
    tmp = target.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(
        ["tar", "xzf", str(archive), "-C", str(tmp)],
        "unpacking Apicurio Registry",
        layout.log_file("install"),
    )
    tmp.rename(target)
    archive.unlink()


def _registry_start(layout: Layout) -> subprocess.Popen[bytes]:
    java = find_java(21, "REELBUS_REGISTRY_JAVA_HOME")
    env = {
        "APICURIO_STORAGE_KIND": "sql",
        "APICURIO_STORAGE_SQL_KIND": "postgresql",
        "APICURIO_DATASOURCE_URL": f"jdbc:postgresql://127.0.0.1:{layout.postgres_port}/registry",
        "APICURIO_DATASOURCE_USERNAME": "reelbus",
        "APICURIO_DATASOURCE_PASSWORD": "reelbus",
        "QUARKUS_HTTP_HOST": "127.0.0.1",
        "QUARKUS_HTTP_PORT": str(layout.registry_port),
        "QUARKUS_MANAGEMENT_HOST": "127.0.0.1",
        "QUARKUS_MANAGEMENT_PORT": str(layout.registry_management_port),
        "QUARKUS_LOG_CONSOLE_JSON": "false",
    }
    cmd = [str(java), "-Xms128m", "-Xmx384m", "-jar", str(_registry_dir(layout) / "quarkus-run.jar")]
    return spawn(layout, "registry", cmd, env=env, cwd=_registry_dir(layout))


# zipkin --------------------------------------------------------------------------------------


def _zipkin_jar(layout: Layout) -> Path:
    return layout.lib / "zipkin" / "zipkin-server-exec.jar"


def _zipkin_install(layout: Layout, progress: Progress) -> None:
    jar = _zipkin_jar(layout)
    if jar.exists():
        return
    progress("downloading Zipkin (maven)")
    download = layout.lib / "download"
    _mvn(
        layout,
        ["dependency:copy", f"-Dartifact={ZIPKIN_ARTIFACT}", f"-DoutputDirectory={download}"],
        "downloading Zipkin",
    )
    jar.parent.mkdir(parents=True, exist_ok=True)
    next(download.glob("zipkin-server-*-exec.jar")).rename(jar)


def _zipkin_start(layout: Layout) -> subprocess.Popen[bytes]:
    java = find_java(17, "REELBUS_ZIPKIN_JAVA_HOME")
    cmd = [
        str(java),
        "-Xms64m",
        "-Xmx768m",
        "-jar",
        str(_zipkin_jar(layout)),
        "--server.address=127.0.0.1",
        f"--server.port={layout.zipkin_port}",
        "--logging.level.root=WARN",
    ]
    return spawn(layout, "zipkin", cmd, env={"STORAGE_TYPE": "mem", "MEM_MAX_SPANS": "60000"})


def _zipkin_healthy(layout: Layout) -> bool:
    try:
        with urllib.request.urlopen(f"{layout.zipkin_url}/health", timeout=2.0) as resp:
            return bool(json.loads(resp.read()).get("status") == "UP")
    except (urllib.error.URLError, OSError, ValueError):
        return False


# cassandra -----------------------------------------------------------------------------------


def _cassandra_lib(layout: Layout) -> Path:
    return layout.lib / "cassandra"


def _cassandra_install(layout: Layout, progress: Progress) -> None:
    lib = _cassandra_lib(layout)
    if any(lib.glob("cassandra-all-*.jar")):
        return
    progress("downloading Cassandra (maven)")
    tmp = lib.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _mvn(
        layout,
        [
            "-f",
            str(NATIVE_DIR / "cassandra-pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ],
        "downloading Cassandra",
    )
    tmp.rename(lib)


def _cassandra_start(layout: Layout) -> subprocess.Popen[bytes]:
    data = layout.data / "cassandra"
    for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    template = (NATIVE_DIR / "cassandra.yaml").read_text()
    config = layout.home / "config" / "cassandra.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        template.format(port=layout.cassandra_port, storage_port=layout.cassandra_storage_port, data=data)
    )
    options = [
        line.strip()
        for line in (NATIVE_DIR / "cassandra-jvm17.options").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    java = find_java(17, "REELBUS_CASSANDRA_JAVA_HOME")
    cmd = [
        str(java),
        "-Xms768m",
        "-Xmx768m",
        "-Xss512k",
        *options,
        f"-Dcassandra.config=file://{config}",
        f"-Dcassandra.storagedir={data}",
        f"-Dcassandra.logdir={layout.logs}",
        "-Dcassandra-foreground=yes",
        "-Dcassandra.jmx.local.port=0",
        f"-Dlogback.configurationFile={NATIVE_DIR / 'cassandra-logback.xml'}",
        "-cp",
        f"{_cassandra_lib(layout)}/*",
        "org.apache.cassandra.service.CassandraDaemon",
    ]
    return spawn(layout, "cassandra", cmd)


def _cassandra_ready(layout: Layout) -> bool:
    """A real CQL query on the native protocol port, not a port check."""
    try:
        with socket.create_connection(("127.0.0.1", layout.cassandra_port), timeout=1.0):
            pass
    except OSError:
        return False
    from cassandra.cluster import Cluster  # a heavy import, only when a port answers

    cluster = Cluster(["127.0.0.1"], port=layout.cassandra_port, connect_timeout=2, protocol_version=5)
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local", timeout=3).one()
        return row is not None
    except Exception:  # any failure means "not ready yet"
        return False
    finally:
        cluster.shutdown()


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="postgres",
        address=lambda lay: f"postgresql://reelbus@127.0.0.1:{lay.postgres_port}",
        healthy=lambda lay: _postgres_ready(lay.postgres_port),
        install=_pg_install,
        start=_pg_start,
        stop_signal=signal.SIGINT,  # "fast" shutdown: roll back open transactions, then stop
        start_timeout=60.0,
        post_start=_pg_post_start,
    ),
    Component(
        name="redis",
        address=lambda lay: f"redis://127.0.0.1:{lay.redis_port}",
        healthy=lambda lay: _redis_ping(lay.redis_port),
        install=_redis_install,
        start=_redis_start,
        start_timeout=30.0,
    ),
    Component(
        name="kafka",
        address=lambda lay: lay.bootstrap_servers,
        healthy=lambda lay: _kafka_ready(lay.bootstrap_servers),
        install=_kafka_install,
        start=_kafka_start,
        start_timeout=90.0,
    ),
    Component(
        name="registry",
        address=lambda lay: lay.registry_url,
        healthy=lambda lay: http_ok(f"{lay.registry_url}/subjects"),
        install=_registry_install,
        start=_registry_start,
        after=("postgres",),
        start_timeout=120.0,
    ),
    Component(
        name="cassandra",
        address=lambda lay: f"cql://127.0.0.1:{lay.cassandra_port}",
        healthy=_cassandra_ready,
        install=_cassandra_install,
        start=_cassandra_start,
        start_timeout=150.0,
    ),
    Component(
        name="zipkin",
        address=lambda lay: f"{lay.zipkin_url}/zipkin",
        healthy=_zipkin_healthy,
        install=_zipkin_install,
        start=_zipkin_start,
        start_timeout=90.0,
    ),
)

BY_NAME = {c.name: c for c in COMPONENTS}


def all_components() -> list[Component]:
    """The infrastructure, then the services this checkout has (``services/cli/stack.py``)."""
    from services.cli.galera import galera_components
    from services.cli.jaeger import jaeger_components
    from services.cli.stack import service_components

    return [*COMPONENTS, *galera_components(), *jaeger_components(), *service_components()]


def select(names: Sequence[str] | None, *, defaults_only: bool = False) -> list[Component]:
    """The named components, or all of them; ``up`` without names leaves out the optional ones."""
    known = {c.name: c for c in all_components()}
    if not names:
        return [c for c in known.values() if c.default or not defaults_only]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InfraError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


# --- orchestration ---------------------------------------------------------------------------


@dataclass
class UpResult:
    started: list[str]
    reused: list[str]
    seconds: float


async def _wait_healthy(layout: Layout, comp: Component, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + comp.start_timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(comp.healthy, layout):
            return
        if proc is not None and proc.poll() is not None:
            raise InfraError(
                f"{comp.name} exited with code {proc.returncode} while starting; "
                f"see {layout.log_file(comp.name)}"
            )
        await asyncio.sleep(0.25)
    raise InfraError(
        f"{comp.name} was not healthy within {comp.start_timeout:.0f}s; see {layout.log_file(comp.name)}"
    )


async def up(
    layout: Layout, names: Sequence[str] | None = None, progress: Progress | None = None
) -> UpResult:
    """Install what is missing, start what is not running, and wait until everything is healthy."""
    say: Progress = progress or (lambda _msg: None)
    t0 = time.monotonic()
    comps = select(names, defaults_only=True)
    for sub in (layout.lib, layout.data, layout.logs, layout.run):
        sub.mkdir(parents=True, exist_ok=True)
    generate_key_pair(layout.home / "keys")  # the access-token signing keys (accounts signs, all verify)
    # Installs run one at a time (Maven and apt each take a lock of their own) but before any start.
    for comp in comps:
        await asyncio.to_thread(comp.install, layout, say)
    done: dict[str, asyncio.Event] = {c.name: asyncio.Event() for c in all_components()}
    started: list[str] = []
    reused: list[str] = []
    spawned: list[str] = []  # started by this call, healthy or not yet

    async def bring_up(comp: Component) -> None:
        for dep in comp.after:
            if dep not in {c.name for c in comps}:
                continue
            await done[dep].wait()
        record = read_pid(layout, comp.name)
        if record is not None and record.alive():
            await _wait_healthy(layout, comp, None)
            reused.append(comp.name)
        else:
            if await asyncio.to_thread(comp.healthy, layout):
                raise InfraError(
                    f"{comp.name}: something not started by reelbus already answers at "
                    f"{comp.address(layout)}; "
                    "stop it or move reelbus with REELBUS_* port settings"
                )
            say(f"starting {comp.name}")
            proc = await asyncio.to_thread(comp.start, layout)
            spawned.append(comp.name)
            await _wait_healthy(layout, comp, proc)
            started.append(comp.name)
        if comp.post_start is not None:
            await asyncio.to_thread(comp.post_start, layout)
        say(f"{comp.name} healthy at {comp.address(layout)}")
        done[comp.name].set()

    tasks = [asyncio.create_task(bring_up(c), name=f"up-{c.name}") for c in comps]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if spawned:  # what this call started does not outlive its failure (stopped by pid)
            say(f"stopping what was started: {', '.join(spawned)}")
            await asyncio.to_thread(down, layout, spawned, say)
        raise
    return UpResult(started=started, reused=reused, seconds=time.monotonic() - t0)


def down(layout: Layout, names: Sequence[str] | None = None, progress: Progress | None = None) -> None:
    """Stop, by recorded pid and in reverse start order, exactly what ``up`` started."""
    say: Progress = progress or (lambda _msg: None)
    for comp in reversed(select(names)):
        say(f"{comp.name}: {stop_pid(layout, comp.name, comp.stop_signal)}")


@dataclass(frozen=True)
class Status:
    name: str
    url: str
    healthy: bool
    pid: int | None
    memory_kib: int | None
    log: str


def _memory_kib(pid: int) -> int | None:
    """Proportional set size (KiB) of a process and its children: postgres's backends share memory,
    and PSS counts each shared page once across them, so the sum is what the machine really spends."""
    total = 0
    found = False
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    found = True
    return total if found else None


async def status(layout: Layout, names: Sequence[str] | None = None) -> list[Status]:
    async def one(comp: Component) -> Status:
        record = read_pid(layout, comp.name)
        pid = record.pid if record is not None and record.alive() else None
        healthy = await asyncio.to_thread(comp.healthy, layout)
        return Status(
            name=comp.name,
            url=comp.address(layout),
            healthy=healthy,
            pid=pid,
            memory_kib=_memory_kib(pid) if pid else None,
            log=str(layout.log_file(comp.name)),
        )

    def shown(comp: Component) -> bool:  # optional components only while they run
        record = read_pid(layout, comp.name)
        return comp.default or bool(names) or (record is not None and record.alive())

    waits: list[Awaitable[Status]] = [one(c) for c in select(names) if shown(c)]
    return list(await asyncio.gather(*waits))
