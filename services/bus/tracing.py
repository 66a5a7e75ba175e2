"""OpenTelemetry set-up from the standard ``OTEL_*`` variables, and W3C trace context in Kafka headers.

``OTEL_TRACES_EXPORTER`` picks the exporter: ``zipkin`` (the default here, to
``OTEL_EXPORTER_ZIPKIN_ENDPOINT``, default ``http://localhost:9411/api/v2/spans``), ``otlp`` (OTLP over
HTTP, for Jaeger; ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``console`` or ``none``. ``OTEL_SERVICE_NAME``
overrides the service name; ``OTEL_RESOURCE_ATTRIBUTES`` adds attributes.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

HeaderValue = str | bytes | None
KafkaHeaders = list[tuple[str, HeaderValue]]


def header_bytes(value: HeaderValue) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else value


def normalize_headers(raw: object) -> KafkaHeaders:
    """librdkafka hands headers back as a list of pairs (or None); accept a mapping too."""
    if raw is None:
        return []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(str(k), v) for k, v in items]  # type: ignore[attr-defined]


# Names of the business attributes the services put on spans, in one place.
ATTR_EVENT_ID = "reelbus.event.id"
ATTR_EVENT_TYPE = "reelbus.event.type"
ATTR_TITLE_ID = "reelbus.playback.title_id"
ATTR_PROFILE_ID = "reelbus.profile_id"
ATTR_ACCOUNT_ID = "reelbus.account_id"
ATTR_SESSION_ID = "reelbus.playback.session_id"
ATTR_DLQ_REASON = "reelbus.dlq.reason"
ATTR_UPSTREAM = "reelbus.gateway.upstream"


class TracingSettingError(ValueError):
    pass


def _exporter(name: str) -> SpanExporter | None:
    if name == "none":
        return None
    if name == "zipkin":
        from opentelemetry.exporter.zipkin.json import ZipkinExporter

        endpoint = os.environ.get("OTEL_EXPORTER_ZIPKIN_ENDPOINT", "http://localhost:9411/api/v2/spans")
        return ZipkinExporter(endpoint=endpoint)
    if name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise TracingSettingError(f"OTEL_TRACES_EXPORTER={name!r}: expected zipkin, otlp, console or none")


def setup_tracing(service_name: str, extra: Sequence[SpanProcessor] = ()) -> TracerProvider:
    """Install a tracer provider for this process; returns it so the caller can shut it down."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    names = os.environ.get("OTEL_TRACES_EXPORTER", "zipkin")
    for name in filter(None, (n.strip() for n in names.split(","))):
        exporter = _exporter(name)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    for processor in extra:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


class _HeaderSetter(Setter[KafkaHeaders]):
    def set(self, carrier: KafkaHeaders, key: str, value: str) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k != key]
        carrier.append((key, value.encode()))


class _HeaderGetter(Getter[Sequence[tuple[str, HeaderValue]]]):
    def get(self, carrier: Sequence[tuple[str, HeaderValue]], key: str) -> list[str] | None:
        found = [header_bytes(v).decode(errors="replace") for k, v in carrier if k == key and v is not None]
        return found or None

    def keys(self, carrier: Sequence[tuple[str, HeaderValue]]) -> list[str]:
        return [k for k, _ in carrier]


SETTER = _HeaderSetter()
GETTER = _HeaderGetter()


def inject_headers(headers: KafkaHeaders, context: Context | None = None) -> KafkaHeaders:
    propagate.inject(headers, context=context, setter=SETTER)
    return headers


def extract_context(headers: Iterable[tuple[str, HeaderValue]] | None) -> Context:
    return propagate.extract(list(headers or []), getter=GETTER)


def trace_id_hex() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def context_headers(context: Context | None = None) -> KafkaHeaders:
    """The propagation headers (``traceparent`` and what else the global propagator writes) for
    ``context`` (default: the current one), as Kafka header pairs; computed once, put on many records."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return [(k, v.encode()) for k, v in carrier.items()]


def propagation_fields() -> frozenset[str]:
    """The header names the global propagator reads and writes (``traceparent``, ``tracestate``, ...)."""
    return frozenset(propagate.get_global_textmap().fields)


def trace_key(headers: Iterable[tuple[str, HeaderValue]], fields: Collection[str]) -> tuple[Any, ...]:
    """The trace-context headers of a record: records with the same key were sent in one PRODUCER span
    (one batch), so they can share one CONSUMER span. Empty when the record carries no context."""
    return tuple([(k, v) for k, v in headers if k in fields])
