"""The generated event dataclasses (services/bus/events.py) against the real ``.avsc`` files and fastavro.

Every class in ``EVENT_TYPES`` is filled with representative values (derived from its dataclass field
types), written with ``fastavro.schemaless_writer`` against its parsed schema, read back and rebuilt with
``from_record``; the result must equal the original, down to the Python types of the values. The committed
module must be exactly what the generator renders now (the staleness gate).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import io
import itertools
import json
import types
import typing
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest

from services.bus import codegen, events
from services.bus.events import EVENT_TYPES

SCHEMA_DIR = codegen.SCHEMA_DIR
EVENTS_PY = Path(events.__file__)
NEWER_SYMBOL = "ZZ_SYMBOL_FROM_A_NEWER_WRITER"


def _load_schemas(schema_dir: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(schema_dir.rglob("*.avsc")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        found[f"{schema['namespace']}.{schema['name']}"] = schema
    return found


SCHEMAS = _load_schemas(SCHEMA_DIR)


class _Samples:
    """Representative values driven by the dataclass field types; every call gives a different value.

    ``full``: every field set, optionals non-null, collections non-empty, enums never their fallback
    symbol. Not ``full``: only the fields without a default are passed, optionals are None and
    collections empty, so the defaults (``event_id``, ``event_time``, Avro defaults) get exercised.
    """

    def __init__(self, *, full: bool) -> None:
        self.full = full
        self._counter = itertools.count(1)

    def instance(self, cls: type[Any]) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if self.full or not has_default:
                kwargs[f.name] = self.value(hints[f.name], f.name)
        return cls(**kwargs)

    def value(self, tp: Any, name: str) -> Any:
        n = next(self._counter)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is types.UnionType:
            (inner,) = [a for a in args if a is not type(None)]
            return self.value(inner, name) if self.full else None
        if origin is list:
            return [self.value(args[0], name) for _ in range(2 if self.full else 0)]
        if origin is dict:
            return {f"{name}-key{i}": self.value(args[1], name) for i in range(2 if self.full else 0)}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            members = list(tp)
            return members[1 + n % (len(members) - 1)]  # skip members[0], the UNKNOWN fallback
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.instance(tp)
        if tp is bool:
            return n % 2 == 0
        if tp is int:
            return 1000 * n + 7  # fits an Avro int
        if tp is float:
            return n + 0.25  # exact in an Avro float too
        if tp is str:
            return f"{name}-{n} é"
        if tp is bytes:
            return bytes([n % 256, 0, 255])
        if tp is uuid.UUID:
            return uuid.UUID(int=n * 0x1_0000_0001)
        if tp is datetime:
            return datetime(2024, 5, 17, 12, 34, 56, 789000, tzinfo=UTC) + timedelta(minutes=n)
        raise TypeError(f"no sample value for {tp!r} ({name})")


def _write(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record, strict=True)
    return buf.getvalue()


def _read(data: bytes, writer: dict[str, Any], reader: dict[str, Any] | None = None) -> dict[str, Any]:
    parsed_writer = fastavro.parse_schema(writer)
    parsed_reader = fastavro.parse_schema(reader) if reader is not None else None
    record = fastavro.schemaless_reader(io.BytesIO(data), parsed_writer, parsed_reader)
    assert isinstance(record, dict)
    return record


def _assert_identical(decoded: Any, original: Any) -> None:
    assert decoded == original
    # == alone would accept "TV" for DeviceType.TV or a naive datetime's twin; repr shows the types too.
    assert repr(decoded) == repr(original)


EVENT_CLASSES = sorted(EVENT_TYPES.values(), key=lambda cls: cls.SCHEMA_NAME)


def test_every_schema_file_has_an_event_type() -> None:
    assert set(EVENT_TYPES) == set(SCHEMAS)
    for name, cls in EVENT_TYPES.items():
        assert name == cls.SCHEMA_NAME


@pytest.mark.parametrize("full", [True, False], ids=["full", "minimal"])
@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_round_trip_through_fastavro(cls: type[Any], full: bool) -> None:
    schema = SCHEMAS[cls.SCHEMA_NAME]
    event = _Samples(full=full).instance(cls)

    decoded = cls.from_record(_read(_write(schema, event.to_record()), schema))

    _assert_identical(decoded, event)


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_event_id_and_event_time_default_to_new_id_and_now_in_ms(cls: type[Any]) -> None:
    first, second = (_Samples(full=False).instance(cls) for _ in range(2))
    assert first.event_id != second.event_id
    assert first.event_id.version == 4
    assert first.event_time.tzinfo is UTC
    assert first.event_time.microsecond % 1000 == 0
    assert abs(datetime.now(UTC) - first.event_time) < timedelta(minutes=1)


def _defaulted_fields(schema: dict[str, Any]) -> list[str]:
    return [f["name"] for f in schema["fields"] if "default" in f]


WITH_AVRO_DEFAULTS = [cls for cls in EVENT_CLASSES if _defaulted_fields(SCHEMAS[cls.SCHEMA_NAME])]


@pytest.mark.parametrize("cls", WITH_AVRO_DEFAULTS, ids=lambda cls: cls.__name__)
def test_fields_missing_from_an_older_writer_take_their_defaults(cls: type[Any]) -> None:
    schema = SCHEMAS[cls.SCHEMA_NAME]
    missing = _defaulted_fields(schema)
    event = _Samples(full=True).instance(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in missing}
    for f in dataclasses.fields(cls):
        if f.name in missing and f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    expected = dataclasses.replace(event, **defaults)
    old_schema = {**schema, "fields": [f for f in schema["fields"] if f["name"] not in missing]}
    old_record = {k: v for k, v in event.to_record().items() if k not in missing}

    # fastavro fills the reader's defaults in ...
    _assert_identical(cls.from_record(_read(_write(old_schema, old_record), old_schema, schema)), expected)
    # ... and from_record copes with a record that simply lacks the keys.
    _assert_identical(cls.from_record(old_record), expected)


def _enum_fields() -> list[tuple[str, str]]:
    found = []
    for fullname, schema in SCHEMAS.items():
        for f in schema["fields"]:
            branches = f["type"] if isinstance(f["type"], list) else [f["type"]]
            if any(isinstance(b, dict) and b.get("type") == "enum" for b in branches):
                found.append((fullname, f["name"]))
    return sorted(found)


@pytest.mark.parametrize(("fullname", "field_name"), _enum_fields(), ids=lambda v: v.rpartition(".")[2])
def test_unknown_enum_symbol_from_a_newer_writer_reads_as_unknown(fullname: str, field_name: str) -> None:
    reader_schema = SCHEMAS[fullname]
    writer_schema = copy.deepcopy(reader_schema)
    (writer_field,) = [f for f in writer_schema["fields"] if f["name"] == field_name]
    branches = writer_field["type"] if isinstance(writer_field["type"], list) else [writer_field["type"]]
    (enum_schema,) = [b for b in branches if isinstance(b, dict) and b.get("type") == "enum"]
    enum_schema["symbols"].append(NEWER_SYMBOL)
    cls: type[Any] = EVENT_TYPES[fullname]  # AvroEvent does not declare from_record
    record = {**_Samples(full=True).instance(cls).to_record(), field_name: NEWER_SYMBOL}

    decoded = cls.from_record(_read(_write(writer_schema, record), writer_schema, reader_schema))

    value = getattr(decoded, field_name)
    enum_cls = typing.get_type_hints(cls)[field_name]
    assert type(value) is enum_cls
    assert value == enum_schema["default"] == "UNKNOWN"


def test_events_py_is_up_to_date() -> None:
    assert codegen.render(SCHEMA_DIR) == EVENTS_PY.read_text(encoding="utf-8"), (
        "services/bus/events.py is stale: run python -m services.bus.codegen"
    )


def test_check_flag_reports_a_stale_file_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert codegen.main(["--check"]) == 0
    output = tmp_path / "events.py"
    output.write_text("# hand-edited\n", encoding="utf-8")

    assert codegen.main(["--check", "--output", str(output)]) == 1
    assert "is stale: run python -m services.bus.codegen" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == "# hand-edited\n"

    assert codegen.main(["--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8") == EVENTS_PY.read_text(encoding="utf-8")
    assert codegen.main(["--check", "--output", str(output)]) == 0


def _write_schema(directory: Path, family: str, schema: dict[str, Any]) -> None:
    (directory / family).mkdir(parents=True, exist_ok=True)
    schema = {"type": "record", "namespace": f"t.{family}", **schema}
    schema["fields"] = [
        {"name": "event_id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "event_time", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        *schema["fields"],
    ]
    (directory / family / f"{schema['name']}.avsc").write_text(json.dumps(schema), encoding="utf-8")


def test_nested_names_are_shared_when_identical_and_prefixed_when_not(tmp_path: Path) -> None:
    plan = {"type": "enum", "name": "Plan", "symbols": ["UNKNOWN", "BASIC"], "default": "UNKNOWN"}
    item = {
        "type": "record",
        "name": "Item",
        "fields": [
            {"name": "n", "type": "int", "default": 3},
            {"name": "raw", "type": "bytes", "default": "\u00ff"},
            {"name": "color", "type": ["null", "string"], "default": None},
        ],
    }
    _write_schema(
        tmp_path,
        "a",
        {
            "name": "One",
            "fields": [
                {"name": "plan", "type": plan, "default": "BASIC"},
                {"name": "items", "type": {"type": "array", "items": item}, "default": [{"n": 1}]},
                {"name": "by_key", "type": {"type": "map", "values": "Item"}, "default": {}},
                {"name": "maybe", "type": ["null", "Item"], "default": None},
            ],
        },
    )
    _write_schema(tmp_path, "a", {"name": "Two", "fields": [{"name": "plan", "type": plan}]})
    other_item = {**item, "fields": item["fields"][:1]}
    _write_schema(tmp_path, "a", {"name": "Three", "fields": [{"name": "item", "type": other_item}]})

    source = codegen.render(tmp_path)

    assert source.count("class Plan(enum.StrEnum):") == 1
    assert "class Item:" not in source
    assert "class OneItem:" in source
    assert "class ThreeItem:" in source
    namespace: dict[str, Any] = {"__name__": "generated_for_test"}
    exec(compile(source, "<generated>", "exec", dont_inherit=True), namespace)
    one_cls, item_cls = namespace["One"], namespace["OneItem"]
    assert one_cls().plan is namespace["Plan"].BASIC
    assert one_cls().items == [item_cls(n=1, raw=b"\xff")]
    schemas = _load_schemas(tmp_path)
    event = one_cls(by_key={"k": item_cls(color="red")}, maybe=item_cls(n=5))
    decoded = one_cls.from_record(_read(_write(schemas["t.a.One"], event.to_record()), schemas["t.a.One"]))
    _assert_identical(decoded, event)
    assert set(namespace["EVENT_TYPES"]) == {"t.a.One", "t.a.Two", "t.a.Three"}


@pytest.mark.parametrize(
    ("field_type", "message"),
    [
        (["null", "string", "int"], "unions are supported"),
        ({"type": "int", "logicalType": "date"}, "unsupported logicalType"),
        ("NoSuchType", "unknown type"),
    ],
)
def test_unsupported_schemas_are_rejected(tmp_path: Path, field_type: Any, message: str) -> None:
    _write_schema(tmp_path, "a", {"name": "Bad", "fields": [{"name": "x", "type": field_type}]})
    with pytest.raises(codegen.CodegenError, match=message):
        codegen.render(tmp_path)
