"""The contract: Avro schemas (``schemas/``) and topic descriptors (``topics/topics.yaml``).

Services agree on nothing else. This module loads both, validates them against each other, and
answers the questions the bus asks: which topic carries which record types, which subject a schema
is registered under, who produces and who consumes what.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fastavro
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "schemas"
TOPICS_FILE = REPO_ROOT / "topics" / "topics.yaml"
DLQ_SUFFIX = ".dlq"
AVRO_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")
COMPATIBILITY_LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
TOPIC_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,200}$")


class ContractError(ValueError):
    """The schemas or the topics file are inconsistent; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Strict):
    partitions: int = Field(3, ge=1, le=1000)
    replication_factor: int = Field(1, ge=1, le=10)
    compatibility: str = "BACKWARD_TRANSITIVE"


class TopicSpec(_Strict):
    """One topic, as declared. ``partitions`` etc. are resolved against the defaults by ``Contracts``."""

    name: str
    description: str
    partitions: int | None = Field(None, ge=1, le=1000)
    replication_factor: int | None = Field(None, ge=1, le=10)
    config: dict[str, str] = Field(default_factory=dict)
    key: str
    key_doc: str = ""
    values: list[str] = Field(min_length=1)
    producer: str
    consumers: list[str] = Field(default_factory=list)
    compatibility: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOPIC_NAME.match(value) or value.endswith(DLQ_SUFFIX):
            raise ValueError(f"{value!r} is not a valid topic name (lowercase, dots; not ending in .dlq)")
        return value

    @field_validator("config", mode="before")
    @classmethod
    def _config_strings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
        return value


class TopicsFile(_Strict):
    defaults: Defaults = Field(default_factory=Defaults)  # type: ignore[arg-type]
    topics: list[TopicSpec]


@dataclass(frozen=True)
class Topic:
    """A declared topic with its defaults resolved."""

    name: str
    description: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]
    key: str
    values: tuple[str, ...]
    producer: str
    consumers: tuple[str, ...]
    compatibility: str

    @property
    def dlq(self) -> str:
        return self.name + DLQ_SUFFIX

    @property
    def key_subject(self) -> str:
        return f"{self.name}-key"

    def value_subject(self, record_name: str) -> str:
        """TopicRecordNameStrategy: several record types per topic, each evolving on its own."""
        return f"{self.name}-{record_name}"


@dataclass(frozen=True)
class Schema:
    """One Avro schema: its JSON as written, and fastavro's parsed form."""

    fullname: str
    raw: Any
    path: Path | None = None
    parsed: Any = field(default=None, compare=False)

    @cached_property
    def canonical(self) -> str:
        return json.dumps(self.raw, sort_keys=False, separators=(",", ":"))

    @property
    def family(self) -> str:
        return self.fullname.split(".")[-2] if "." in self.fullname else ""


def _fullname(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    name = str(raw["name"])
    namespace = raw.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def make_schema(raw: Any, path: Path | None = None) -> Schema:
    try:
        parsed = fastavro.parse_schema(raw, _write_hint=False)
    except Exception as exc:  # fastavro raises several types for a bad schema
        where = path or _fullname(raw)
        raise ContractError(f"{where}: not a valid Avro schema: {exc}") from exc
    return Schema(fullname=_fullname(raw), raw=raw, path=path, parsed=parsed)


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, Schema]:
    schemas: dict[str, Schema] = {}
    for path in sorted(schema_dir.rglob("*.avsc")):
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ContractError(f"{path}: not JSON: {exc}") from exc
        schema = make_schema(raw, path)
        if schema.fullname in schemas:
            raise ContractError(
                f"{path}: {schema.fullname} is also defined in {schemas[schema.fullname].path}"
            )
        schemas[schema.fullname] = schema
    for name in AVRO_PRIMITIVES:
        schemas[name] = make_schema(name)
    return schemas


class Contracts:
    """Topics and schemas, checked against each other."""

    def __init__(self, topics: Iterable[Topic], schemas: Mapping[str, Schema]) -> None:
        self.schemas = dict(schemas)
        self.topics: dict[str, Topic] = {}
        for topic in topics:
            if topic.name in self.topics:
                raise ContractError(f"topic {topic.name} is declared twice")
            if topic.compatibility not in COMPATIBILITY_LEVELS:
                raise ContractError(f"topic {topic.name}: unknown compatibility {topic.compatibility!r}")
            for name in (topic.key, *topic.values):
                if name not in self.schemas:
                    raise ContractError(f"topic {topic.name}: no schema named {name!r} in schemas/")
            self.topics[topic.name] = topic

    @classmethod
    def from_spec(cls, spec: TopicsFile, schemas: Mapping[str, Schema]) -> Contracts:
        d = spec.defaults
        topics = [
            Topic(
                name=t.name,
                description=t.description,
                partitions=t.partitions or d.partitions,
                replication_factor=t.replication_factor or d.replication_factor,
                config=dict(t.config),
                key=t.key,
                values=tuple(t.values),
                producer=t.producer,
                consumers=tuple(t.consumers),
                compatibility=t.compatibility or d.compatibility,
            )
            for t in spec.topics
        ]
        return cls(topics, schemas)

    @classmethod
    def load(cls, topics_file: Path = TOPICS_FILE, schema_dir: Path = SCHEMA_DIR) -> Contracts:
        try:
            spec = TopicsFile.model_validate(yaml.safe_load(topics_file.read_text()))
        except ValidationError as exc:
            raise ContractError(f"{topics_file}: {exc}") from exc
        return cls.from_spec(spec, load_schemas(schema_dir))

    def topic(self, name: str) -> Topic:
        try:
            return self.topics[name]
        except KeyError:
            raise ContractError(f"topic {name!r} is not declared in the topics file") from None

    def schema(self, fullname: str) -> Schema:
        try:
            return self.schemas[fullname]
        except KeyError:
            raise ContractError(f"no schema named {fullname!r}") from None

    def with_topics(self, topics: Iterable[Topic]) -> Contracts:
        """A copy with more topics: tests declare topics of their own on the same schemas."""
        return Contracts([*self.topics.values(), *topics], self.schemas)

    def produced_by(self, service: str) -> list[Topic]:
        return [t for t in self.topics.values() if t.producer == service]

    def consumed_by(self, service: str) -> list[Topic]:
        return [t for t in self.topics.values() if service in t.consumers]
