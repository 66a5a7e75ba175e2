"""The billing database, as components of the native runner: a two-node MariaDB Galera cluster with
an arbitrator, an asynchronous read replica and HAProxy in front, all from Debian's packages.

- ``galera-1``, ``galera-2``: the Galera data nodes, MySQL protocol on 127.0.0.1:3311 and 3312
  (group communication on 4567 and 4577, IST on the next port, rsync SST on the one after);
- ``garbd``: the Galera arbitrator on 4587, a third vote without data, so that losing one data
  node leaves two of three members: still a quorum;
- ``galera-replica``: plain MariaDB on 3313, an asynchronous GTID replica of galera-1;
- ``haproxy``: writes on 3306 (galera-1; galera-2 only while galera-1 is down), reads on 3307 (the
  replica; the Galera nodes as backups), stats on http://127.0.0.1:8404/stats.

Ports move with ``REELBUS_GALERA_1_PORT``, ``REELBUS_GALERA_2_PORT``, ``REELBUS_GALERA_REPLICA_PORT``,
``REELBUS_GALERA_1_WSREP_PORT``, ``REELBUS_GALERA_2_WSREP_PORT`` (IST and SST use the next two),
``REELBUS_GARBD_PORT``, ``REELBUS_HAPROXY_WRITE_PORT``, ``REELBUS_HAPROXY_READ_PORT`` and
``REELBUS_HAPROXY_STATS_PORT``. The configuration templates are in ``deploy/native/galera/``.

The MariaDB servers run as the ``mysql`` user (rsync state transfer fails as root), garbd too, with
their data in ``.reelbus/data/galera-1``, ``galera-2`` and ``galera-replica`` (owned by ``mysql``,
kept across ``down``/``up``), their sockets in ``.reelbus/run/galera/`` and their rendered
configuration in ``.reelbus/config/galera/``. When the ``mysql`` user cannot enter the checkout
(a root-only home, say), these live in ``/var/lib/reelbus/<hash of REELBUS_HOME>/`` instead, with a
symlink in ``.reelbus/data/`` for each data folder.

Bootstrapping. A Galera cluster must be started by exactly one node with ``--wsrep-new-cluster``;
the other one joins it. The two data nodes start concurrently, and the decision is taken under a
lock, one node at a time, from what is running and what is on disk:

* the other node runs and answers queries (it is a member): join it, never a second cluster;
* the other node runs silently (a node answers only once it has joined): join it if it was started
  with ``--wsrep-new-cluster``, otherwise it waits for this node, which bootstraps;
* neither runs: the node that Galera marked ``safe_to_bootstrap: 1`` in ``grastate.dat`` (the last
  one to leave the cluster cleanly) bootstraps; failing that (both crashed), the node with the
  highest recovered seqno (``mariadbd --wsrep-recover``), galera-1 on a tie, after marking it safe;
  a fresh cluster is bootstrapped by galera-1 (``mariadb-install-db`` initialises every data folder).

A node whose ``grastate.dat`` says seqno -1 (it crashed) gets its position recovered from InnoDB
first and passed as ``--wsrep_start_position``, so that it can catch up by incremental state
transfer (IST) from the other node's gcache instead of a full copy.

``down`` stops the components in reverse order: HAProxy, the replica, garbd, galera-2, then
galera-1, which leaves last and cleanly, so it is the one marked safe to bootstrap at the next ``up``.

The replica follows galera-1 only. While galera-1 is away the replica serves what it has and its
IO thread retries every second; galera-1 logs the write sets it receives by IST (log_slave_updates),
so the replica resumes where it stopped once galera-1 is back. A node that needed a full state
transfer (SST) starts a new binlog at that position, so a replica behind it must be pointed at the
other node (same GTIDs: ``CHANGE MASTER TO MASTER_PORT=3312, MASTER_USE_GTID=slave_pos``).

Accounts, created once on the cluster (and replicated to the replica through the binlog):
``reelbus``/``reelbus`` (all privileges, from 127.0.0.1, for applications and tests), ``repl``
(replication), ``haproxy_check`` (no password, no privileges: status queries only). The local
``root`` account is reached through the socket with unix_socket authentication.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.cli import infra
from services.cli.infra import Component, InfraError, Layout, Progress

TEMPLATES = infra.NATIVE_DIR / "galera"
CLUSTER_NAME = "reelbus-billing"
DATA_NODES = ("galera-1", "galera-2")
NAMES = ("galera-1", "galera-2", "garbd", "galera-replica", "haproxy")

# The Debian packages the components need, by the file each one provides.
PACKAGES: dict[str, str] = {
    "/usr/sbin/mariadbd": "mariadb-server",  # pulls mariadb-client (mariadb, mariadb-install-db)
    "/usr/lib/galera/libgalera_smm.so": "galera-4",
    "/usr/bin/garbd": "galera-arbitrator-4",
    "/usr/sbin/haproxy": "haproxy",
    "/usr/bin/rsync": "rsync",
}
MARIADBD = "/usr/sbin/mariadbd"
MARIADB = "/usr/bin/mariadb"
INSTALL_DB = "/usr/bin/mariadb-install-db"
GARBD = "/usr/bin/garbd"
HAPROXY = "/usr/sbin/haproxy"

APP_USER = "reelbus"
APP_PASSWORD = "reelbus"
REPL_USER = "repl"
REPL_PASSWORD = "reelbus-repl"
CHECK_USER = "haproxy_check"

# Group-communication timeouts, the same on every member (garbd included: a silent member is
# dropped early when all the others suspect it). With the defaults (suspicion after 5 s) a node
# killed with -9 stalls the cluster's commits for about 5.5 s; we suspect after 2 s, with
# keepalives and checks every 0.5 s, and measured writes through HAProxy resuming 3 to 3.5 s
# after the kill. The price of a shorter timeout: a member that cannot send for that long (a
# stalled process, a starved CPU on a loaded 2-core machine, a slow disk) is dropped although
# alive, must rejoin by IST, and its clients' transactions fail meanwhile; the shorter, the
# likelier. Galera requires keepalive_period <= inactive_check_period <= suspect_timeout <=
# inactive_timeout (left at PT15S, the hard limit when the members disagree).
EVS_OPTIONS = (
    "evs.keepalive_period=PT0.5S",
    "evs.inactive_check_period=PT0.5S",
    "evs.suspect_timeout=PT2S",
)

# One bootstrap decision at a time, so that the two data nodes starting concurrently agree.
_BOOT_LOCK = threading.Lock()


# --- layout ----------------------------------------------------------------------------------


def _env_port(name: str, default: int) -> int:
    return infra._env_int(name, default)


@dataclass(frozen=True)
class Node:
    """A MariaDB server of the billing database."""

    name: str
    port: int
    wsrep_port: int = 0  # 0: not a Galera node
    gtid_domain_id: int = 0
    server_id: int = 1

    @property
    def ist_port(self) -> int:
        return self.wsrep_port + 1

    @property
    def sst_port(self) -> int:
        return self.wsrep_port + 2


@dataclass(frozen=True)
class Ports:
    galera_1: int
    galera_2: int
    replica: int
    galera_1_wsrep: int
    galera_2_wsrep: int
    garbd: int
    write: int
    read: int
    stats: int

    @classmethod
    def from_env(cls) -> Ports:
        return cls(
            galera_1=_env_port("REELBUS_GALERA_1_PORT", 3311),
            galera_2=_env_port("REELBUS_GALERA_2_PORT", 3312),
            replica=_env_port("REELBUS_GALERA_REPLICA_PORT", 3313),
            galera_1_wsrep=_env_port("REELBUS_GALERA_1_WSREP_PORT", 4567),
            galera_2_wsrep=_env_port("REELBUS_GALERA_2_WSREP_PORT", 4577),
            garbd=_env_port("REELBUS_GARBD_PORT", 4587),
            write=_env_port("REELBUS_HAPROXY_WRITE_PORT", 3306),
            read=_env_port("REELBUS_HAPROXY_READ_PORT", 3307),
            stats=_env_port("REELBUS_HAPROXY_STATS_PORT", 8404),
        )

    def node(self, name: str) -> Node:
        if name == "galera-1":
            return Node(name, self.galera_1, self.galera_1_wsrep, gtid_domain_id=11)
        if name == "galera-2":
            return Node(name, self.galera_2, self.galera_2_wsrep, gtid_domain_id=12)
        if name == "galera-replica":
            return Node(name, self.replica, gtid_domain_id=3, server_id=3)
        raise InfraError(f"{name} is not a MariaDB server of the billing database")

    @property
    def cluster_address(self) -> str:
        members = (self.galera_1_wsrep, self.galera_2_wsrep, self.garbd)
        return "gcomm://" + ",".join(f"127.0.0.1:{p}" for p in members)


def _server_user() -> str | None:
    """As root, the servers run as the Debian package's ``mysql`` user; otherwise as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        raise InfraError(
            "running as root needs the 'mysql' system user (Debian package mariadb-server)"
        ) from None
    return "mysql"


def _admin_user() -> str:
    """The MariaDB account reached through the socket by unix_socket authentication."""
    return "root" if os.geteuid() == 0 else getpass.getuser()


def _can_enter(user: str, path: Path) -> bool:
    probe = subprocess.run(["test", "-x", str(path)], user=user, group=user, check=False, capture_output=True)
    return probe.returncode == 0


def _home(layout: Layout) -> Path:
    """Where the servers' files live: the project's folder, or one of their own if they cannot enter it."""
    return _home_of(layout.home)


_HOMES: dict[Path, Path] = {}


def _home_of(home: Path) -> Path:
    if home in _HOMES:
        return _HOMES[home]
    if os.geteuid() != 0:
        return home
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        return home  # not installed yet: nothing of the servers' exists anywhere
    if _can_enter("mysql", home):
        where = home
    else:
        digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
        where = Path("/var/lib/reelbus") / digest
    _HOMES[home] = where
    return where


def _owned_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    user = _server_user()
    if user is not None:
        shutil.chown(path, user, user)
    return path


def run_dir(layout: Layout) -> Path:
    """Sockets and pid files of the servers (owned by the user they run as)."""
    return _home(layout) / "run" / "galera"


def config_dir(layout: Layout) -> Path:
    return _home(layout) / "config" / "galera"


def datadir(layout: Layout, name: str) -> Path:
    """``.reelbus/data/<name>``, or where that symlink points."""
    return (layout.data / name).resolve()


def socket_path(layout: Layout, name: str) -> Path:
    return run_dir(layout) / f"{name}.sock"


def tmpdir(layout: Layout, name: str) -> Path:
    """The server's own temporary folder (its config's ``tmpdir``), beside its socket."""
    return _owned_dir(run_dir(layout) / f"{name}.tmp")


def _prepare_datadir(layout: Layout, name: str) -> Path:
    link = layout.data / name
    home = _home(layout)
    if home != layout.home and not link.is_symlink() and not link.exists():
        target = _owned_dir(home / "data" / name)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
    return _owned_dir(link.resolve())


# --- the mariadb client ----------------------------------------------------------------------


class SqlError(InfraError):
    """A statement failed (or the server could not be reached)."""


def _client(
    args: Sequence[str], sql: str, database: str | None, timeout: float, password: str | None = None
) -> list[tuple[str, ...]]:
    cmd = [MARIADB, "--no-defaults", *args, "--batch", "--skip-column-names", "--connect-timeout=2"]
    if database:
        cmd.append(f"--database={database}")
    env = {**os.environ, "MYSQL_PWD": password} if password is not None else None
    try:
        result = subprocess.run(
            [*cmd, f"--execute={sql}"], capture_output=True, text=True, check=False, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        raise SqlError(f"{sql!r} took longer than {timeout:.0f}s") from None
    except OSError as exc:  # the client is not installed (yet)
        raise SqlError(f"{MARIADB}: {exc}") from None
    if result.returncode != 0:
        raise SqlError(f"{sql!r} failed: {result.stderr.strip()}")
    return [tuple(line.split("\t")) for line in result.stdout.splitlines()]


def node_sql(
    layout: Layout, name: str, sql: str, database: str | None = None, timeout: float = 10.0
) -> list[tuple[str, ...]]:
    """Run SQL on one server through its socket, as the local administrator; rows as tuples of text."""
    args = [f"--socket={socket_path(layout, name)}", f"--user={_admin_user()}"]
    return _client(args, sql, database, timeout)


def endpoint_sql(
    port: int, sql: str, database: str | None = None, timeout: float = 10.0
) -> list[tuple[str, ...]]:
    """Run SQL over TCP on 127.0.0.1:``port`` (a server or an HAProxy endpoint) as the application user."""
    args = ["--protocol=tcp", "--host=127.0.0.1", f"--port={port}", f"--user={APP_USER}"]
    return _client(args, sql, database, timeout, password=APP_PASSWORD)


def wsrep_status(layout: Layout, name: str, timeout: float = 5.0) -> dict[str, str]:
    """The node's ``wsrep_%`` status variables, by lower-case name."""
    rows = node_sql(layout, name, "SHOW GLOBAL STATUS LIKE 'wsrep\\_%'", timeout=timeout)
    return {row[0].lower(): row[1] if len(row) > 1 else "" for row in rows}


def _synced(layout: Layout, name: str) -> bool:
    try:
        status = wsrep_status(layout, name, timeout=3.0)
    except SqlError:
        return False
    return (
        status.get("wsrep_local_state") == "4"
        and status.get("wsrep_cluster_status") == "Primary"
        and status.get("wsrep_ready") == "ON"
    )


# --- install ---------------------------------------------------------------------------------


_INSTALL_LOCK = threading.Lock()


def _install(layout: Layout, progress: Progress) -> None:
    """apt-get install the packages whose files are missing (once, for all five components)."""
    with _INSTALL_LOCK:
        missing = sorted({pkg for path, pkg in PACKAGES.items() if not Path(path).exists()})
        if not missing:
            return
        if os.geteuid() != 0:
            raise InfraError(
                f"the billing database needs the Debian packages {', '.join(missing)} (needs root)"
            )
        progress(f"installing {', '.join(missing)} (apt)")
        log = layout.log_file("install")
        # Installing mariadb-server or haproxy would start Debian's own services (a mariadbd on
        # 3306); a policy-rc.d that says "no" keeps them stopped, as in a container image.
        policy = Path("/usr/sbin/policy-rc.d")
        made_policy = False
        if not policy.exists():
            policy.write_text("#!/bin/sh\n# reelbus: no service starts while installing packages\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
        try:
            infra._run(["apt-get", "update", "-qq"], "apt-get update", log)
            cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-qq", *missing]
            infra._run(cmd, f"apt-get install {' '.join(missing)}", log)
        finally:
            if made_policy:
                policy.unlink(missing_ok=True)


# --- configuration ---------------------------------------------------------------------------


def _render(layout: Layout, template: str, target: str, **values: object) -> Path:
    text = (TEMPLATES / template).read_text().format(**values)
    path = config_dir(layout) / target
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


def _node_config(layout: Layout, node: Node, ports: Ports) -> Path:
    run = _owned_dir(run_dir(layout))
    common: dict[str, object] = {
        "name": node.name,
        "datadir": datadir(layout, node.name),
        "socket": socket_path(layout, node.name),
        "tmpdir": tmpdir(layout, node.name),
        "pid_file": run / f"{node.name}.pid",
        "port": node.port,
        "gtid_domain_id": node.gtid_domain_id,
    }
    if not node.wsrep_port:
        return _render(layout, "replica.cnf", f"{node.name}.cnf", server_id=node.server_id, **common)
    provider_options = ";".join(
        [
            f"base_port={node.wsrep_port}",
            f"gmcast.listen_addr=tcp://127.0.0.1:{node.wsrep_port}",
            f"ist.recv_addr=127.0.0.1:{node.ist_port}",
            "gcache.size=128M",
            *EVS_OPTIONS,
        ]
    )
    return _render(
        layout,
        "galera-node.cnf",
        f"{node.name}.cnf",
        cluster_name=CLUSTER_NAME,
        cluster_address=ports.cluster_address,
        sst_port=node.sst_port,
        provider_options=provider_options,
        **common,
    )


def _init_datadir(layout: Layout, name: str) -> None:
    """``mariadb-install-db`` into an empty data folder, as the user the server runs as."""
    data = _prepare_datadir(layout, name)
    if (data / "mysql").is_dir():
        return
    user = _server_user()
    cmd = [
        INSTALL_DB,
        "--no-defaults",
        f"--datadir={data}",
        f"--tmpdir={tmpdir(layout, name)}",  # not /tmp: see deploy/native/galera/galera-node.cnf
        "--auth-root-authentication-method=socket",
        "--skip-test-db",
        "--skip-name-resolve",
    ]
    log = layout.log_file(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, user=user, group=user)
    if result.returncode != 0:
        raise InfraError(f"{name}: mariadb-install-db failed (exit {result.returncode}); see {log}")


# --- Galera state on disk --------------------------------------------------------------------


@dataclass(frozen=True)
class GraState:
    """What ``grastate.dat`` says: the cluster state's uuid, the last seqno (-1 after a crash or
    while running) and whether this node left last and cleanly."""

    uuid: str
    seqno: int
    safe_to_bootstrap: bool


_NO_UUID = "00000000-0000-0000-0000-000000000000"


def grastate(layout: Layout, name: str) -> GraState | None:
    try:
        text = (datadir(layout, name) / "grastate.dat").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s*(\S+)\s*$", text, re.MULTILINE))
    try:
        return GraState(
            uuid=fields.get("uuid", _NO_UUID),
            seqno=int(fields.get("seqno", "-1")),
            safe_to_bootstrap=fields.get("safe_to_bootstrap") == "1",
        )
    except ValueError:
        return None


def _mark_safe_to_bootstrap(layout: Layout, name: str) -> None:
    path = datadir(layout, name) / "grastate.dat"
    text = re.sub(r"^safe_to_bootstrap:.*$", "safe_to_bootstrap: 1", path.read_text(), flags=re.MULTILINE)
    path.write_text(text)


def _recover_position(layout: Layout, name: str, config: Path) -> tuple[str, int] | None:
    """The last committed position (uuid, seqno) in InnoDB, by ``mariadbd --wsrep-recover``."""
    user = _server_user()
    log = layout.log_file(name)
    result = subprocess.run(
        [MARIADBD, f"--defaults-file={config}", "--wsrep-recover"],
        capture_output=True,
        cwd=datadir(layout, name),
        text=True,
        check=False,
        user=user,
        group=user,
        timeout=120,
    )
    with log.open("a") as out:
        out.write(result.stdout + result.stderr)
    match = re.search(r"WSREP: Recovered position: ([0-9a-f-]{36}):(-?\d+)", result.stdout + result.stderr)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def _position(layout: Layout, name: str, ports: Ports) -> int:
    """The node's seqno: from grastate.dat, or recovered from InnoDB after a crash; -1 if unknown."""
    state = grastate(layout, name)
    if state is None or state.uuid == _NO_UUID:
        return -1
    if state.seqno >= 0:
        return state.seqno
    recovered = _recover_position(layout, name, _node_config(layout, ports.node(name), ports))
    return recovered[1] if recovered is not None and recovered[0] == state.uuid else -1


def _alive(layout: Layout, name: str) -> infra.PidRecord | None:
    record = infra.read_pid(layout, name)
    return record if record is not None and record.alive() else None


def _should_bootstrap(layout: Layout, name: str, ports: Ports) -> bool:
    (peer,) = [n for n in DATA_NODES if n != name]
    running = _alive(layout, peer)
    if running is not None:
        try:
            wsrep_status(layout, peer, timeout=3.0)
        except SqlError:
            # A node answers queries only once it has joined (rsync SST comes first). A silent peer
            # started to form the cluster is joined; any other silent peer is waiting to join this
            # node, which it found to hold the newest state.
            return "--wsrep-new-cluster" not in running.command
        # A member that answers, in the Primary component or cut off from the quorum: never start a
        # second cluster beside it (split brain); joining it restores the quorum, or fails visibly.
        return False
    states = {n: grastate(layout, n) for n in DATA_NODES}
    for n in DATA_NODES:
        state = states[n]
        if state is not None and state.safe_to_bootstrap:
            return n == name
    if all(s is None or s.uuid == _NO_UUID for s in states.values()):
        return name == DATA_NODES[0]  # a new cluster
    positions = {n: _position(layout, n, ports) for n in DATA_NODES}
    best = max(DATA_NODES, key=lambda n: (positions[n], -DATA_NODES.index(n)))
    return best == name


# --- components ------------------------------------------------------------------------------


def _start_data_node(layout: Layout, name: str) -> subprocess.Popen[bytes]:
    ports = Ports.from_env()
    node = ports.node(name)
    with _BOOT_LOCK:
        _init_datadir(layout, name)
        config = _node_config(layout, node, ports)
        cmd = [MARIADBD, f"--defaults-file={config}"]
        if _should_bootstrap(layout, name, ports):
            state = grastate(layout, name)
            if state is not None and not state.safe_to_bootstrap:
                _mark_safe_to_bootstrap(layout, name)
            cmd.append("--wsrep-new-cluster")
            _note(layout, name, "bootstraps the cluster (--wsrep-new-cluster)")
        else:
            (peer,) = [n for n in DATA_NODES if n != name]
            how = "running" if _alive(layout, peer) else "not running yet: it must be started too"
            _note(layout, name, f"joins the cluster through {peer} ({how})")
        state = grastate(layout, name)
        if state is not None and state.uuid != _NO_UUID and state.seqno < 0:
            recovered = _recover_position(layout, name, config)
            if recovered is not None:
                cmd.append(f"--wsrep_start_position={recovered[0]}:{recovered[1]}")
        return infra.spawn(layout, name, cmd, cwd=datadir(layout, name), user=_server_user())


def _note(layout: Layout, name: str, text: str) -> None:
    """A line of the runner's own in the component's log, where its server's lines follow."""
    with layout.log_file(name).open("a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} reelbus: {name} {text}\n")


def _ensure_accounts(layout: Layout, name: str) -> None:
    """The application, replication and health-check accounts, created once on the cluster."""
    if node_sql(layout, name, f"SELECT COUNT(*) FROM mysql.user WHERE User = '{CHECK_USER}'") == [("1",)]:
        return
    statements = [
        f"CREATE USER IF NOT EXISTS '{APP_USER}'@'127.0.0.1' IDENTIFIED BY '{APP_PASSWORD}'",
        f"GRANT ALL PRIVILEGES ON *.* TO '{APP_USER}'@'127.0.0.1'",
        f"CREATE USER IF NOT EXISTS '{REPL_USER}'@'127.0.0.1' IDENTIFIED BY '{REPL_PASSWORD}'",
        f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'127.0.0.1'",
        # last: its presence says that the others exist
        f"CREATE USER IF NOT EXISTS '{CHECK_USER}'@'127.0.0.1'",
    ]
    node_sql(layout, name, ";".join(statements))


def _data_node(name: str) -> Component:
    return Component(
        name=name,
        address=lambda _lay: f"mysql://127.0.0.1:{Ports.from_env().node(name).port}",
        healthy=lambda lay: _synced(lay, name),
        install=_install,
        start=lambda lay: _start_data_node(lay, name),
        stop_signal=signal.SIGTERM,  # a clean shutdown: leave the cluster, save grastate.dat
        start_timeout=180.0,  # a joiner may wait for the other node, then copy its data (SST)
        post_start=lambda lay: _ensure_accounts(lay, name),
    )


def _garbd_start(layout: Layout) -> subprocess.Popen[bytes]:
    ports = Ports.from_env()
    options = ";".join(
        [f"base_port={ports.garbd}", f"gmcast.listen_addr=tcp://127.0.0.1:{ports.garbd}", *EVS_OPTIONS]
    )
    cmd = [
        GARBD,
        f"--address={ports.cluster_address}",
        f"--group={CLUSTER_NAME}",
        "--name=garbd",
        f"--options={options}",
    ]
    run = _owned_dir(run_dir(layout))  # garbd may write its view state in its working folder
    return infra.spawn(layout, "garbd", cmd, cwd=run, user=_server_user())


def cluster_members(layout: Layout, timeout: float = 5.0) -> list[str]:
    """The members' names in the current view, as a running data node sees them."""
    for name in DATA_NODES:
        with contextlib.suppress(SqlError):
            rows = node_sql(
                layout, name, "SELECT node_name FROM mysql.wsrep_cluster_members", timeout=timeout
            )
            if rows:
                return sorted(row[0] for row in rows)
    return []


def _garbd_healthy(layout: Layout) -> bool:
    return _alive(layout, "garbd") is not None and "garbd" in cluster_members(layout, timeout=3.0)


def _replica_start(layout: Layout) -> subprocess.Popen[bytes]:
    ports = Ports.from_env()
    _init_datadir(layout, "galera-replica")
    config = _node_config(layout, ports.node("galera-replica"), ports)
    cmd = [MARIADBD, f"--defaults-file={config}"]
    return infra.spawn(
        layout, "galera-replica", cmd, cwd=datadir(layout, "galera-replica"), user=_server_user()
    )


def _replica_healthy(layout: Layout) -> bool:
    try:
        return node_sql(layout, "galera-replica", "SELECT 1", timeout=3.0) == [("1",)]
    except SqlError:
        return False


def _replica_post_start(layout: Layout) -> None:
    """Point the replica at galera-1, once: from then on it resumes by itself from its GTID position."""
    if node_sql(layout, "galera-replica", "SHOW SLAVE STATUS"):
        return
    master = Ports.from_env().galera_1
    node_sql(
        layout,
        "galera-replica",
        f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={master}, MASTER_USER='{REPL_USER}', "
        f"MASTER_PASSWORD='{REPL_PASSWORD}', MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; START SLAVE",
    )


def _haproxy_start(layout: Layout) -> subprocess.Popen[bytes]:
    ports = Ports.from_env()
    check = _render(layout, "haproxy-check.sh", "haproxy-check.sh", mariadb=MARIADB, check_user=CHECK_USER)
    check.chmod(0o755)
    config = _render(
        layout,
        "haproxy.cfg",
        "haproxy.cfg",
        write_port=ports.write,
        read_port=ports.read,
        stats_port=ports.stats,
        galera_1_port=ports.galera_1,
        galera_2_port=ports.galera_2,
        replica_port=ports.replica,
        check_script=check,
    )
    result = subprocess.run(
        [HAPROXY, "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise InfraError(f"haproxy: {config} is not valid: {result.stdout.strip()} {result.stderr.strip()}")
    return infra.spawn(layout, "haproxy", [HAPROXY, "-db", "-f", str(config)])


def _haproxy_healthy(layout: Layout) -> bool:
    ports = Ports.from_env()
    try:
        return endpoint_sql(ports.write, "SELECT 1", timeout=3.0) == [("1",)]
    except SqlError:
        return False


def galera_components() -> list[Component]:
    """The billing database's five components, in start order (``down`` stops them in reverse)."""

    def address(lay: Layout) -> str:
        p = Ports.from_env()
        return f"mysql://127.0.0.1:{p.write} (writes), :{p.read} (reads); http://127.0.0.1:{p.stats}/stats"

    return [
        _data_node("galera-1"),
        _data_node("galera-2"),
        Component(
            name="garbd",
            address=lambda _lay: f"gcomm://127.0.0.1:{Ports.from_env().garbd}",
            healthy=_garbd_healthy,
            install=_install,
            start=_garbd_start,
            after=DATA_NODES,
            start_timeout=60.0,
        ),
        Component(
            name="galera-replica",
            address=lambda _lay: f"mysql://127.0.0.1:{Ports.from_env().replica}",
            healthy=_replica_healthy,
            install=_install,
            start=_replica_start,
            after=("galera-1",),
            start_timeout=90.0,
            post_start=_replica_post_start,
        ),
        Component(
            name="haproxy",
            address=address,
            healthy=_haproxy_healthy,
            install=_install,
            start=_haproxy_start,
            after=(*DATA_NODES, "galera-replica"),
            start_timeout=30.0,
        ),
    ]
