"""The service runtime every reelbus service runs in.

- Settings from the environment with one prefix per service; a missing or malformed setting ends the
  process with exit code 2 and a message naming the variable.
- ``/livez`` (the loop and the root tasks are alive), ``/readyz`` (partitions assigned, producer
  ready, broker and registry answering), ``/metrics`` (Prometheus).
- JSON logs carrying trace ids.
- Root tasks fail together: if the HTTP site, the consume loop or the bus connection ends
  unexpectedly, everything stops and the process exits non-zero; no zombie consumer behind a green
  health check.
- SIGTERM starts a staged shutdown within ``shutdown_grace_seconds``: not ready, stop fetching,
  finish in-flight work, commit, flush the producer, close the HTTP site and pools.
- Every ``load_sample_interval_s`` seconds (0: never) the instance publishes a
  ``reelbus.scaling.LoadSample`` on ``load_sample_topic`` (``scaling.load``), keyed by the service's
  name: request rate (HTTP requests plus consumed records per second), in-flight HTTP requests,
  consumer lag per assigned partition and in total, CPU (process CPU time over wall time times the
  CPUs it may run on), and the error rate and p99 latency of its HTTP requests. The autoscaler
  scales from these. A sample that cannot be sent is logged and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.bus import metrics
from services.bus.auth import TokenVerifier, auth_middleware, load_public_key
from services.bus.consumer import AnyHandler, BusConsumer, ConsumerConfig, RetryPolicy
from services.bus.contracts import Contracts
from services.bus.events import LoadSample
from services.bus.http import MAX_BODY_BYTES, UNTRACED, errors_middleware, tracing_middleware
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient, RegistryError, RegistryUnavailable
from services.bus.serde import Serde
from services.bus.tracing import setup_tracing, trace_id_hex

log = logging.getLogger("reelbus.runtime")

EXIT_BAD_SETTING = 2
EXIT_FAILED = 1


class BusSettings(BaseSettings):
    """Settings every service has; a service subclasses this with its own ``env_prefix``."""

    model_config = SettingsConfigDict(env_prefix="REELBUS_", extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = "localhost:9092"
    registry_url: str = "http://localhost:8081/apis/ccompat/v7"
    http_host: str = "127.0.0.1"
    http_port: int = 0
    instance_id: str = ""  # set it to use static group membership (stable per replica)
    group_id: str = ""  # defaults to the service's name
    shutdown_grace_seconds: float = 20.0
    log_level: str = "INFO"
    handler_retry_attempts: int = 5
    # Load samples for the autoscaler (module doc): every this many seconds; 0 turns them off.
    load_sample_interval_s: float = Field(default=5.0, ge=0)
    load_sample_topic: str = "scaling.load"
    token_public_key_file: Path = Field(default_factory=lambda: default_keys_dir() / "token-signing.pub.pem")


S = TypeVar("S", bound=BusSettings)


def default_keys_dir() -> Path:
    """Where ``reelbus up`` writes the token-signing key pair."""
    home = os.environ.get("REELBUS_HOME")
    return (Path(home) if home else Path(__file__).resolve().parents[2] / ".reelbus") / "keys"


def load_settings(cls: type[S]) -> S:
    """Build the settings or exit 2 with one line per bad variable, naming it."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for err in exc.errors():
            name = (prefix + "_".join(str(p) for p in err["loc"])).upper()
            print(f"setting {name}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        raise SystemExit(EXIT_BAD_SETTING) from None


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = trace_id_hex()
        if trace_id:
            doc["trace_id"] = trace_id
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LoadMeter:
    """What the load samples count of this process's HTTP traffic (the probes and /metrics aside)."""

    LATENCIES = 4096  # the slowest of at most this many requests per window make its p99

    def __init__(self) -> None:
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.latencies: list[float] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: HttpHandler) -> web.StreamResponse:
        if request.path in UNTRACED:
            return await handler(request)
        self.in_flight += 1
        started = time.perf_counter()
        failed = True
        try:
            response = await handler(request)
            failed = response.status >= 500
            return response
        finally:
            self.in_flight -= 1
            self.requests += 1
            self.errors += failed
            if len(self.latencies) < self.LATENCIES:
                self.latencies.append(time.perf_counter() - started)

    def take_latencies(self) -> list[float]:
        taken, self.latencies = self.latencies, []
        return taken


def consumed_records() -> tuple[int, int]:
    """Records this process's consumers finished (handled, ignored or dead-lettered), and of them
    the dead-lettered ones, from the bus's Prometheus counter."""
    done = failed = 0
    for family in metrics.CONSUMED.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            outcome = sample.labels.get("outcome")
            if outcome != "retried":
                done += int(sample.value)
            if outcome == "dead_lettered":
                failed += int(sample.value)
    return done, failed


def cpu_cores() -> float:
    """CPUs this process may run on (its affinity), the denominator of the CPU utilization."""
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return float(os.cpu_count() or 1)


@dataclass
class _LoadMark:
    """Counters at the start of a sampling window."""

    wall: float
    cpu: float
    requests: int
    errors: int
    consumed: int
    failed: int


class LoadSampler:
    """Builds this instance's load samples (module doc) and sends them; one per window."""

    def __init__(self, bus: Bus, meter: LoadMeter, interval: float) -> None:
        self.bus = bus
        self.meter = meter
        self.interval = interval
        self.topic = bus.settings.load_sample_topic
        self._mark = self._now()
        self._prepared = False

    def _now(self) -> _LoadMark:
        consumed, failed = consumed_records()
        meter = self.meter
        return _LoadMark(
            time.monotonic(), time.process_time(), meter.requests, meter.errors, consumed, failed
        )

    async def sample(self) -> LoadSample:
        """The sample of the window since the last call (or since this sampler was made)."""
        lag: dict[tuple[str, int], int] = {}
        consumer = self.bus.consumer
        if consumer is not None and consumer.ready:
            lag = await asyncio.to_thread(consumer.lag)
        mark, self._mark = self._mark, self._now()
        wall = max(self._mark.wall - mark.wall, 1e-6)
        cores = cpu_cores()
        handled = (self._mark.requests - mark.requests) + (self._mark.consumed - mark.consumed)
        failures = (self._mark.errors - mark.errors) + (self._mark.failed - mark.failed)
        latencies = sorted(self.meter.take_latencies())
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000 if latencies else None
        return LoadSample(
            service=self.bus.spec.name,
            instance=self.bus.instance,
            cpu_utilization=min(1.0, max(0.0, (self._mark.cpu - mark.cpu) / (wall * cores))),
            in_flight=self.meter.in_flight,
            request_rate=handled / wall,
            consumer_lag=sum(lag.values()),
            window_ms=round(wall * 1000),
            error_rate=min(1.0, failures / handled) if handled else None,
            latency_p99_ms=p99,
            consumer_group=consumer.config.group_id if consumer is not None else None,
            partition_lag={f"{t}/{p}": n for (t, p), n in sorted(lag.items())},
            cpu_cores=cores,
        )

    async def send_one(self) -> LoadSample:
        if not self._prepared:
            await asyncio.to_thread(self.bus.serde.prepare, self.bus.contracts.topic(self.topic))
            self._prepared = True
        sample = await self.sample()
        await self.bus.producer.send(self.topic, self.bus.spec.name, sample)
        return sample

    async def run(self) -> None:
        """Until cancelled: one sample per interval; a failure is logged, and the next one tried."""
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.send_one()
                if failing:
                    log.info("load samples are sent to %s again", self.topic)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "cannot send a load sample to %s (%r); trying every %.0fs",
                        self.topic,
                        exc,
                        self.interval,
                    )
                failing = True


Routes = Callable[[web.Application], None]
Resource = Callable[[web.Application], AsyncIterator[None]]


@dataclass
class ServiceSpec:
    """What a service is, for the runtime: its name, its topics, its handler table, its HTTP routes."""

    name: str
    consumes: Sequence[str] = ()
    produces: Sequence[str] = ()
    handlers: Mapping[str, AnyHandler] = field(default_factory=dict)  # per-record or batched(...)
    routes: Routes | None = None
    resources: Sequence[Resource] = ()  # cleanup_ctx entries: set up, yield, tear down
    group_id: str | None = None
    # Every request needs a verified access token except the probes and these (method, path) pairs.
    public_routes: Sequence[tuple[str, str]] = ()
    # Long-running loops of the service (an outbox relay, a periodic job): started once the producer
    # is ready, they fail together with the consume loop and the HTTP site; cancelled at shutdown
    # after the consumer stopped and before the producer is flushed.
    root_tasks: Mapping[str, Callable[[web.Application], Awaitable[None]]] = field(default_factory=dict)
    # Extra readiness checks (the service's database, say), each answering within 2 s.
    ready_checks: Mapping[str, Callable[[web.Application], Awaitable[bool]]] = field(default_factory=dict)


class Bus:
    """The producer, the consumer and what they share, for one service process."""

    def __init__(self, spec: ServiceSpec, settings: BusSettings, contracts: Contracts) -> None:
        self.spec = spec
        self.settings = settings
        self.contracts = contracts
        self.registry = RegistryClient(settings.registry_url)
        self.serde = Serde(contracts, self.registry)
        instance = settings.instance_id or f"{spec.name}-{socket.gethostname()}-{os.getpid()}"
        self.instance = instance
        self.producer = Producer(
            ProducerConfig(settings.kafka_bootstrap_servers, client_id=instance), contracts, self.serde
        )
        self.consumer: BusConsumer | None = None
        if spec.consumes:
            self.consumer = BusConsumer(
                ConsumerConfig(
                    bootstrap_servers=settings.kafka_bootstrap_servers,
                    group_id=settings.group_id or spec.group_id or spec.name,
                    topics=list(spec.consumes),
                    client_id=instance,
                    group_instance_id=settings.instance_id or None,
                    retry=RetryPolicy(attempts=settings.handler_retry_attempts),
                ),
                contracts,
                self.serde,
                spec.handlers,
                dead_letters=self.producer,
            )
        self.producer_ready = False

    async def start_producer(self) -> None:
        """Look up schema ids, retrying with backoff while the registry or broker is not there yet."""
        delay = 0.5
        while True:
            try:
                await self.producer.start(list(self.spec.produces))
                self.producer_ready = True
                return
            except RegistryUnavailable as exc:
                log.warning(
                    "waiting for the schema registry at %s (%s); retry in %.1fs",
                    self.settings.registry_url,
                    exc,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def dependencies_answer(self) -> dict[str, bool]:
        """Blocking probe of the broker and the registry, for ``/readyz``."""
        checks: dict[str, bool] = {}
        try:
            self.registry.subjects()
            checks["registry"] = True
        except (RegistryUnavailable, RegistryError):
            checks["registry"] = False
        from confluent_kafka.admin import AdminClient

        try:
            meta = AdminClient(
                {"bootstrap.servers": self.settings.kafka_bootstrap_servers, "log_level": 0}
            ).list_topics(timeout=1.0)
            checks["kafka"] = bool(meta.brokers)
        except Exception:
            checks["kafka"] = False
        return checks


BUS = web.AppKey("bus", Bus)
SETTINGS = web.AppKey("settings", BusSettings)


class ServiceRuntime:
    def __init__(self, spec: ServiceSpec, settings: BusSettings, contracts: Contracts | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.contracts = contracts or Contracts.load()
        self.bus = Bus(spec, settings, self.contracts)
        self.verifier: TokenVerifier | None = None
        self.load_meter = LoadMeter()
        middlewares: list[Any] = [tracing_middleware, self.load_meter.middleware, errors_middleware]
        if spec.routes is not None:
            key_file = settings.token_public_key_file
            try:
                self.verifier = TokenVerifier(load_public_key(key_file))
            except (OSError, ValueError) as exc:
                prefix = str(type(settings).model_config.get("env_prefix", ""))
                print(
                    f"setting {prefix}TOKEN_PUBLIC_KEY_FILE: cannot load {key_file}: {exc}", file=sys.stderr
                )
                raise SystemExit(EXIT_BAD_SETTING) from None
            middlewares.append(auth_middleware(self.verifier, spec.public_routes))
        self.app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
        self.app[BUS] = self.bus
        self.app[SETTINGS] = settings
        self.app.router.add_get("/livez", self._livez)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        if spec.routes is not None:
            spec.routes(self.app)
        self.app.cleanup_ctx.extend(spec.resources)
        self._shutting_down = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._helpers: set[asyncio.Task[None]] = set()
        self._producer_ready = asyncio.Event()
        self.port: int | None = None

    # -- probes ---------------------------------------------------------------------------

    async def _livez(self, _req: web.Request) -> web.Response:
        dead = [name for name, t in self._tasks.items() if t.done()]
        body = {"live": not dead, "dead_tasks": dead}
        return web.json_response(body, status=200 if not dead else 503)

    async def _readyz(self, _req: web.Request) -> web.Response:
        checks = await asyncio.to_thread(self.bus.dependencies_answer)
        checks["producer"] = self.bus.producer_ready
        if self.bus.consumer is not None:
            checks["partitions_assigned"] = self.bus.consumer.ready
        for name, check in self.spec.ready_checks.items():
            try:
                async with asyncio.timeout(2.0):
                    checks[name] = bool(await check(self.app))
            except Exception as exc:  # a failing probe is "not ready", never a 500
                log.warning("readiness check %s failed: %r", name, exc)
                checks[name] = False
        checks["not_shutting_down"] = not self._shutting_down
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def _metrics(self, _req: web.Request) -> web.Response:
        if self.bus.consumer is not None and self.bus.consumer.ready:
            await asyncio.to_thread(self.bus.consumer.lag)
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, on_started: Callable[[int], Awaitable[None]] | None = None) -> int:
        stop, runner, self.port = await start_http(self.app, self.settings, self.spec.name)
        if on_started is not None:
            await on_started(self.port)

        self._tasks["bus"] = asyncio.create_task(self._run_bus(), name="bus")
        sampler = self.load_sampler()
        if sampler is not None:
            self._tasks["load-sampler"] = asyncio.create_task(
                self._run_root("load-sampler", lambda _app: sampler.run()), name="load-sampler"
            )
        for name, loop_fn in self.spec.root_tasks.items():
            self._tasks[name] = asyncio.create_task(self._run_root(name, loop_fn), name=name)
        stopper = asyncio.create_task(stop.wait(), name="sigterm")
        code = 0
        try:
            done, _ = await asyncio.wait(
                [stopper, *self._tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
            if stopper not in done:
                failed = next(iter(done))
                exc = failed.exception() if not failed.cancelled() else None
                log.error("root task %s ended unexpectedly: %r; stopping the service", failed.get_name(), exc)
                code = EXIT_FAILED
        finally:
            stopper.cancel()
            code = max(code, await self._shutdown(runner))
        return code

    def load_sampler(self) -> LoadSampler | None:
        """The load sampler, or None when samples are off or their topic is not declared."""
        interval = self.settings.load_sample_interval_s
        if interval <= 0:
            return None
        if self.settings.load_sample_topic not in self.contracts.topics:
            log.warning("no load samples: topic %s is not declared", self.settings.load_sample_topic)
            return None
        return LoadSampler(self.bus, self.load_meter, interval)

    async def _run_root(self, name: str, loop_fn: Callable[[web.Application], Awaitable[None]]) -> None:
        while not self.bus.producer_ready:
            await self._producer_ready.wait()
        await loop_fn(self.app)
        if not self._shutting_down:
            raise RuntimeError(f"root task {name} returned while the service was not stopping")

    async def _report_waits(self) -> None:
        """Until ready, say what the service waits for, backing off from 2 s to 30 s."""
        delay = 2.0
        while not self._shutting_down:
            checks = await asyncio.to_thread(self.bus.dependencies_answer)
            if self.bus.consumer is not None:
                checks["partitions_assigned"] = self.bus.consumer.ready
            waiting = [name for name, ok in checks.items() if not ok]
            if not waiting and self.bus.producer_ready:
                log.info("ready: %s", ", ".join(checks))
                return
            where = {
                "kafka": f"kafka at {self.settings.kafka_bootstrap_servers}",
                "registry": f"the schema registry at {self.settings.registry_url}",
                "partitions_assigned": "a partition assignment",
            }
            log.warning(
                "not ready; waiting for %s", ", ".join(where.get(w, w) for w in waiting) or "the producer"
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _run_bus(self) -> None:
        reporter = asyncio.create_task(self._report_waits(), name="readiness-reporter")
        self._helpers.add(reporter)
        reporter.add_done_callback(self._helpers.discard)
        await self.bus.start_producer()
        self._producer_ready.set()
        if self.bus.consumer is not None:
            await self.bus.consumer.run()
            if not self._shutting_down:
                raise RuntimeError("the consume loop returned while the service was not stopping")
        else:
            await asyncio.Event().wait()  # a producer-only service: live until stopped

    async def _shutdown(self, runner: web.AppRunner) -> int:
        started = time.monotonic()
        grace = self.settings.shutdown_grace_seconds
        self._shutting_down = True  # /readyz turns false at once
        code = 0
        try:
            async with asyncio.timeout(grace):
                if self.bus.consumer is not None:
                    self.bus.consumer.stop()  # stop fetching; finishes the record in hand and commits
                for name, task in self._tasks.items():
                    if name != "bus" and not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            try:
                                await task
                            except Exception as exc:
                                log.error("root task %s failed: %r", name, exc)
                                code = EXIT_FAILED
                bus_task = self._tasks.get("bus")
                if bus_task is not None:
                    if self.bus.consumer is None or not self.bus.producer_ready:
                        bus_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        try:
                            await bus_task
                        except Exception as exc:  # already reported as a root-task failure
                            log.error("bus task failed: %r", exc)
                            code = EXIT_FAILED
                await self.bus.producer.close(timeout=max(1.0, grace - (time.monotonic() - started) - 1))
                await runner.cleanup()
        except TimeoutError:
            log.error("shutdown did not finish within %.1fs; exiting anyway", grace)
            return EXIT_FAILED
        for helper in list(self._helpers):
            helper.cancel()
        log.info("shutdown complete in %.2fs", time.monotonic() - started)
        return code


async def start_http(
    app: web.Application, settings: BusSettings, name: str
) -> tuple[asyncio.Event, web.AppRunner, int]:
    """What every service does first: SIGTERM and SIGINT set the returned event, and ``app`` listens
    on the settings' host and port (port 0: a free one). Returns the event, the runner to clean up
    and the port it listens on."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    port = int(sockets[0].getsockname()[1]) if sockets else settings.http_port
    log.info("%s listening on http://%s:%s", name, settings.http_host, port)
    return stop, runner, port


def serve(spec: ServiceSpec, settings: BusSettings, contracts: Contracts | None = None) -> None:
    """The whole of a service's ``__main__`` after building its settings: logs, traces, run, exit.
    ``contracts`` defaults to the repository's; tests pass a copy with private topics."""
    setup_logging(spec.name, settings.log_level)
    provider = setup_tracing(spec.name)
    # What start-up made (modules, settings, schemas) lives as long as the process: the cyclic garbage
    # collector skips it from now on, which keeps its full collections short on busy hot paths.
    gc.freeze()
    try:
        code = asyncio.run(ServiceRuntime(spec, settings, contracts).run())
    finally:
        provider.shutdown()
    raise SystemExit(code)
