"""Generate typed dataclasses for the Avro schemas: ``schemas/**/*.avsc`` -> ``services/bus/events.py``.

Run ``python -m services.bus.codegen`` after changing a schema; ``python -m services.bus.codegen --check``
writes nothing and exits 1 when the committed module is stale (CI and ``tests/unit/test_events.py`` gate
on it). :func:`render` is pure: the same schema files always give byte-identical output, already in the
layout ``ruff format`` produces, so no formatter runs here.

Mapping of Avro to Python types:

* ``string`` -> ``str``, ``int``/``long`` -> ``int``, ``float``/``double`` -> ``float``,
  ``boolean`` -> ``bool``, ``bytes``/``fixed`` -> ``bytes``;
* ``{"type": "string", "logicalType": "uuid"}`` -> ``uuid.UUID``;
  ``{"type": "long", "logicalType": "timestamp-millis"}`` -> ``datetime`` (aware, UTC);
  any other logical type is rejected rather than silently mistyped;
* ``["null", T]`` (either order) -> ``T | None``; other unions are rejected;
* ``array`` -> ``list[T]``, ``map`` -> ``dict[str, T]``;
* ``enum`` -> an ``enum.StrEnum`` whose members are the symbols;
* nested ``record`` -> a nested frozen dataclass.

Every top-level file becomes one event class named after the record. Nested records and enums are named
after their Avro name. When several files define the same name identically (same full name, same
definition) the class is emitted once and shared; when the definitions differ, *every* variant is
renamed to ``<TopLevelRecord><Name>`` so no class silently means two things.

Field defaults follow the Avro field ``default`` (``null`` -> ``None``, ``[]`` -> ``default_factory=list``,
an enum symbol -> that member, ...). A top-level record's ``event_id`` (uuid) and ``event_time``
(timestamp-millis) default to a fresh random (version 4) UUID and the current time truncated to
milliseconds, so an event that went through Avro compares equal to the original.

Each record also gets a codec (``_write_<name>``/``_read_<name>``, listed per event type in
``AVRO_CODECS`` with the fingerprint of its schema) built from :mod:`services.bus.wire`: it writes the
Avro body straight from the dataclass and reads it straight into one, the bytes fastavro writes.
"""

from __future__ import annotations

import argparse
import json
import keyword
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from services.bus.wire import fingerprint

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "schemas"
OUTPUT = REPO_ROOT / "services" / "bus" / "events.py"
LINE_LENGTH = 110
INDENT = "    "

_PRIMITIVES: dict[str, str] = {
    "string": "str",
    "int": "int",
    "long": "int",
    "float": "float",
    "double": "float",
    "boolean": "bool",
    "bytes": "bytes",
}
_LOGICAL: dict[tuple[str, str], str] = {
    ("string", "uuid"): "uuid.UUID",
    ("long", "timestamp-millis"): "datetime",
}
# Names the generated class bodies refer to: a field with a default binds its name in the class namespace,
# so a field called e.g. ``datetime`` would break the annotations after it.
_RESERVED_FIELD_NAMES = frozenset(
    {"SCHEMA_NAME", "to_record", "from_record", "uuid", "datetime", "field", "enum", "dataclass"}
    | {"list", "dict", "str", "int", "float", "bool", "bytes", "None", "ClassVar", "Any", "Self", "Mapping"}
    | {"_now_ms", "_as_uuid", "_as_datetime", "_optional", "wire", "AVRO_CODECS", "EVENT_TYPES"}
)


class CodegenError(ValueError):
    """A schema the generator cannot (or refuses to) turn into Python."""


# --------------------------------------------------------------------------------------------------------
# Type model
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scalar:
    annotation: str  # str, int, float, bool, bytes, uuid.UUID, datetime, None
    # The Avro type behind it, for the codecs: string, int, long, float, double, boolean, bytes, null,
    # uuid, timestamp-millis or fixed:<size>. Not part of the identity (the annotation is).
    avro: str = field(default="", compare=False)


@dataclass(frozen=True)
class _Optional:
    inner: _Type
    null_first: bool = field(default=True, compare=False)  # ["null", T], else [T, "null"]


@dataclass(frozen=True)
class _List:
    items: _Type


@dataclass(frozen=True)
class _Dict:
    values: _Type


@dataclass(frozen=True)
class _EnumRef:
    name: str  # Python class name
    symbols: tuple[str, ...]


@dataclass(frozen=True)
class _RecordRef:
    name: str  # Python class name


_Type = _Scalar | _Optional | _List | _Dict | _EnumRef | _RecordRef


@dataclass(frozen=True)
class _Field:
    name: str
    type: _Type
    doc: str | None
    has_default: bool
    default: Any


@dataclass(frozen=True)
class _EnumDef:
    name: str
    fullname: str
    doc: str | None
    symbols: tuple[str, ...]


@dataclass(frozen=True)
class _RecordDef:
    name: str
    fullname: str
    doc: str | None
    fields: tuple[_Field, ...]
    top_level: bool


_Definition = _EnumDef | _RecordDef


@dataclass
class _Declared:
    """A named type (record or enum) as found in one schema file."""

    fullname: str
    short: str
    raw: dict[str, Any]
    top: str  # name of the file's top-level record
    source: str  # schema file, relative to the schema dir

    @property
    def identity(self) -> str:
        """Two declarations with the same identity are the same type and may share one class."""
        body = {k: v for k, v in self.raw.items() if k != "namespace"}
        return json.dumps([self.fullname, body], sort_keys=True)


# --------------------------------------------------------------------------------------------------------
# Reading the schemas
# --------------------------------------------------------------------------------------------------------


def _qualify(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _named_declarations(schema: Any, namespace: str, top: str, source: str) -> list[_Declared]:
    """Every record/enum defined (not merely referenced) inside ``schema``, in document order."""
    found: list[_Declared] = []
    if isinstance(schema, list):
        for branch in schema:
            found.extend(_named_declarations(branch, namespace, top, source))
        return found
    if not isinstance(schema, dict):
        return found
    kind = schema.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        name = schema.get("name")
        if not isinstance(name, str) or not name:
            raise CodegenError(f"{source}: {kind} without a name")
        explicit = schema.get("namespace")
        fullname = _qualify(name, explicit if isinstance(explicit, str) else namespace)
        own_ns = fullname.rpartition(".")[0]
        if kind != "fixed":
            found.append(_Declared(fullname, fullname.rpartition(".")[2], schema, top, source))
        for raw_field in schema.get("fields", []) if kind != "enum" else []:
            found.extend(_named_declarations(raw_field.get("type"), own_ns, top, source))
    elif kind == "array":
        found.extend(_named_declarations(schema.get("items"), namespace, top, source))
    elif kind == "map":
        found.extend(_named_declarations(schema.get("values"), namespace, top, source))
    elif isinstance(kind, dict | list):
        found.extend(_named_declarations(kind, namespace, top, source))
    return found


class _FileConverter:
    """Turns one parsed ``.avsc`` into definitions, using the names decided for the whole schema set."""

    def __init__(self, source: str, python_names: dict[tuple[str, str], str]) -> None:
        self.source = source
        self.python_names = python_names  # (source, avro fullname) -> Python class name
        self.known: dict[str, _Type] = {}  # avro fullname -> type, for by-name references in this file
        self.definitions: list[_Definition] = []  # dependencies first

    def error(self, message: str) -> CodegenError:
        return CodegenError(f"{self.source}: {message}")

    def convert(self, schema: Any, namespace: str, *, top_level: bool = False) -> _Type:
        if isinstance(schema, list):
            return self._union(schema, namespace)
        if isinstance(schema, str):
            return self._by_name(schema, namespace)
        if not isinstance(schema, dict):
            raise self.error(f"not a schema: {schema!r}")
        kind = schema.get("type")
        if isinstance(kind, dict | list):
            return self.convert(kind, namespace)
        logical = schema.get("logicalType")
        if logical is not None:
            annotation = _LOGICAL.get((str(kind), str(logical)))
            if annotation is None:
                raise self.error(f"unsupported logicalType {logical!r} on {kind!r}")
            return _Scalar(annotation, str(logical))
        if kind == "array":
            return _List(self.convert(schema.get("items"), namespace))
        if kind == "map":
            return _Dict(self.convert(schema.get("values"), namespace))
        if kind in ("record", "error", "enum", "fixed"):
            return self._named(schema, str(kind), namespace, top_level=top_level)
        if isinstance(kind, str):
            return self._by_name(kind, namespace)
        raise self.error(f"schema without a type: {schema!r}")

    def _by_name(self, name: str, namespace: str) -> _Type:
        if name in _PRIMITIVES:
            return _Scalar(_PRIMITIVES[name], name)
        if name == "null":
            return _Scalar("None", "null")
        for candidate in (_qualify(name, namespace), name):
            if candidate in self.known:
                return self.known[candidate]
        raise self.error(f"unknown type {name!r} (named types must be defined before use, in the same file)")

    def _union(self, branches: list[Any], namespace: str) -> _Type:
        others = [b for b in branches if b != "null"]
        if len(branches) != 2 or len(others) != 1:
            raise self.error(f'only ["null", T] unions are supported, not {json.dumps(branches)}')
        inner = self.convert(others[0], namespace)
        if isinstance(inner, _Optional):
            raise self.error(f"nested union {json.dumps(branches)}")
        return _Optional(inner, branches[0] == "null")

    def _named(self, schema: dict[str, Any], kind: str, namespace: str, *, top_level: bool) -> _Type:
        explicit = schema.get("namespace")
        fullname = _qualify(str(schema["name"]), explicit if isinstance(explicit, str) else namespace)
        if kind == "fixed":
            size = schema.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise self.error(f"fixed {fullname} without a valid size")
            self.known[fullname] = _Scalar("bytes", f"fixed:{size}")
            return self.known[fullname]
        if fullname in self.known:
            raise self.error(f"type {fullname!r} is defined twice")
        name = self.python_names[(self.source, fullname)]
        doc = schema.get("doc")
        doc = doc if isinstance(doc, str) else None
        if kind == "enum":
            symbols = tuple(str(s) for s in schema.get("symbols", []))
            for symbol in symbols:
                if keyword.iskeyword(symbol) or symbol.startswith("_") or not symbol.isidentifier():
                    raise self.error(f"enum {fullname}: symbol {symbol!r} cannot be a Python enum member")
            enum_ref = _EnumRef(name, symbols)
            self.known[fullname] = enum_ref
            self.definitions.append(_EnumDef(name, fullname, doc, symbols))
            return enum_ref
        record_ref = _RecordRef(name)
        self.known[fullname] = record_ref  # so a recursive reference is detected below, not looped on
        own_ns = fullname.rpartition(".")[0]
        fields: list[_Field] = []
        for raw in schema.get("fields", []):
            field_name = raw.get("name")
            if (
                not isinstance(field_name, str)
                or not field_name.isidentifier()
                or keyword.iskeyword(field_name)
            ):
                raise self.error(f"record {fullname}: field name {field_name!r} is not a Python identifier")
            if field_name in _RESERVED_FIELD_NAMES or field_name in self.python_names.values():
                raise self.error(f"record {fullname}: field name {field_name!r} clashes with generated code")
            field_type = self.convert(raw.get("type"), own_ns)
            if _mentions(field_type, name):
                raise self.error(f"record {fullname} is recursive, which the generator does not support")
            field_doc = raw.get("doc")
            fields.append(
                _Field(
                    name=field_name,
                    type=field_type,
                    doc=field_doc if isinstance(field_doc, str) else None,
                    has_default="default" in raw,
                    default=raw.get("default"),
                )
            )
        self.definitions.append(_RecordDef(name, fullname, doc, tuple(fields), top_level))
        return record_ref


def _mentions(type_: _Type, record_name: str) -> bool:
    if isinstance(type_, _RecordRef):
        return type_.name == record_name
    if isinstance(type_, _Optional):
        return _mentions(type_.inner, record_name)
    if isinstance(type_, _List):
        return _mentions(type_.items, record_name)
    if isinstance(type_, _Dict):
        return _mentions(type_.values, record_name)
    return False


def _load(schema_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    files = sorted(schema_dir.rglob("*.avsc"), key=lambda p: p.relative_to(schema_dir).as_posix())
    if not files:
        raise CodegenError(f"no .avsc files under {schema_dir}")
    loaded: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        source = path.relative_to(schema_dir).as_posix()
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CodegenError(f"{source}: not JSON: {exc}") from exc
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise CodegenError(f"{source}: the top level must be a record")
        loaded.append((source, schema))
    return loaded


def _python_names(loaded: list[tuple[str, dict[str, Any]]]) -> dict[tuple[str, str], str]:
    tops: list[_Declared] = []
    nested: list[_Declared] = []
    for source, schema in loaded:
        namespace = schema.get("namespace")
        top, *inner = _named_declarations(
            schema, namespace if isinstance(namespace, str) else "", schema["name"], source
        )
        tops.append(top)
        nested.extend(inner)
    top_names: dict[str, str] = {}
    for top in tops:
        if top.short in top_names:
            raise CodegenError(f"{top.source} and {top_names[top.short]} both define a record {top.short!r}")
        top_names[top.short] = top.source

    identities: dict[str, set[str]] = {}
    for d in nested:
        identities.setdefault(d.short, set()).add(d.identity)
    names: dict[tuple[str, str], str] = {(t.source, t.fullname): t.short for t in tops}
    owner: dict[str, str] = {t.short: t.identity for t in tops}  # Python name -> identity using it
    for d in nested:
        ambiguous = len(identities[d.short]) > 1 or d.short in top_names
        name = f"{d.top}{d.short}" if ambiguous else d.short
        if owner.setdefault(name, d.identity) != d.identity:
            raise CodegenError(
                f"{d.source}: cannot find a unique Python name for {d.fullname} ({name} is taken)"
            )
        names[(d.source, d.fullname)] = name
    return names


def _definitions(schema_dir: Path) -> list[_Definition]:
    loaded = _load(schema_dir)
    python_names = _python_names(loaded)
    emitted: dict[str, _Definition] = {}
    for source, schema in loaded:
        converter = _FileConverter(source, python_names)
        namespace = schema.get("namespace")
        converter.convert(schema, namespace if isinstance(namespace, str) else "", top_level=True)
        top = converter.definitions[-1]
        assert isinstance(top, _RecordDef)
        _check_event_fields(source, top)
        for definition in converter.definitions:
            previous = emitted.setdefault(definition.name, definition)
            if previous != definition:  # same identity, so only possible through a generator bug
                raise CodegenError(f"{source}: conflicting definitions of {definition.name}")
    return list(emitted.values())


def _check_event_fields(source: str, record: _RecordDef) -> None:
    by_name = {f.name: f for f in record.fields}
    for name, annotation in (("event_id", "uuid.UUID"), ("event_time", "datetime")):
        found = by_name.get(name)
        if found is None or found.type != _Scalar(annotation):
            raise CodegenError(
                f"{source}: a top-level record needs a field {name!r} of type {annotation} "
                "(every event implements AvroEvent)"
            )


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _annotation(type_: _Type) -> str:
    if isinstance(type_, _Scalar):
        return type_.annotation
    if isinstance(type_, _Optional):
        return f"{_annotation(type_.inner)} | None"
    if isinstance(type_, _List):
        return f"list[{_annotation(type_.items)}]"
    if isinstance(type_, _Dict):
        return f"dict[str, {_annotation(type_.values)}]"
    return type_.name


def _needs_conversion(type_: _Type) -> bool:
    if isinstance(type_, _Scalar):
        return type_.annotation in ("uuid.UUID", "datetime")
    if isinstance(type_, _Optional):
        return _needs_conversion(type_.inner)
    if isinstance(type_, _List):
        return _needs_conversion(type_.items)
    if isinstance(type_, _Dict):
        return _needs_conversion(type_.values)
    return True


def _var(depth: int) -> str:
    return "v" if depth == 0 else f"v{depth}"


def _to_avro(expr: str, type_: _Type, depth: int = 0) -> str:
    """Expression turning the Python value ``expr`` into what fastavro writes."""
    if isinstance(type_, _EnumRef):
        return f"{expr}.value"
    if isinstance(type_, _RecordRef):
        return f"{expr}.to_record()"
    if isinstance(type_, _Optional) and _needs_to_avro(type_.inner):
        return f"None if {expr} is None else {_to_avro(expr, type_.inner, depth)}"
    if isinstance(type_, _List) and _needs_to_avro(type_.items):
        v = _var(depth)
        return f"[{_to_avro(v, type_.items, depth + 1)} for {v} in {expr}]"
    if isinstance(type_, _Dict) and _needs_to_avro(type_.values):
        v = _var(depth)
        return f"{{k: {_to_avro(v, type_.values, depth + 1)} for k, {v} in {expr}.items()}}"
    return expr  # fastavro handles str/int/... and the uuid and timestamp-millis logical types itself


def _needs_to_avro(type_: _Type) -> bool:
    if isinstance(type_, _EnumRef | _RecordRef):
        return True
    if isinstance(type_, _Optional):
        return _needs_to_avro(type_.inner)
    if isinstance(type_, _List):
        return _needs_to_avro(type_.items)
    if isinstance(type_, _Dict):
        return _needs_to_avro(type_.values)
    return False


def _from_avro(expr: str, type_: _Type, depth: int = 0) -> str:
    """Expression turning the decoded value ``expr`` back into the Python type."""
    if isinstance(type_, _Scalar):
        if type_.annotation == "uuid.UUID":
            return f"_as_uuid({expr})"
        if type_.annotation == "datetime":
            return f"_as_datetime({expr})"
        return expr
    if isinstance(type_, _EnumRef):
        return f"{type_.name}({expr})"
    if isinstance(type_, _RecordRef):
        return f"{type_.name}.from_record({expr})"
    if not _needs_conversion(type_):
        return expr
    if isinstance(type_, _Optional):
        return f"_optional({_converter(type_.inner, depth)}, {expr})"
    v = _var(depth)
    if isinstance(type_, _List):
        return f"[{_from_avro(v, type_.items, depth + 1)} for {v} in {expr}]"
    return f"{{k: {_from_avro(v, type_.values, depth + 1)} for k, {v} in {expr}.items()}}"


def _converter(type_: _Type, depth: int) -> str:
    """A callable (source) doing what :func:`_from_avro` does, for ``_optional(convert, value)``."""
    if isinstance(type_, _Scalar):
        return "_as_uuid" if type_.annotation == "uuid.UUID" else "_as_datetime"
    if isinstance(type_, _EnumRef):
        return type_.name
    if isinstance(type_, _RecordRef):
        return f"{type_.name}.from_record"
    v = _var(depth)
    return f"lambda {v}: {_from_avro(v, type_, depth + 1)}"


def _closing_bracket_split(expr: str) -> int | None:
    """Index of the bracket matching the one that ends ``expr`` (strings skipped), if it ends in one."""
    pairs = {")": "(", "]": "[", "}": "{"}
    if not expr or expr[-1] not in pairs:
        return None
    stack: list[int] = []
    in_string = False
    index = 0
    while index < len(expr):
        char = expr[index]
        if in_string:
            if char == "\\":
                index += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "([{":
            stack.append(index)
        elif char in pairs and stack:
            opened = stack.pop()
            if index == len(expr) - 1:
                return opened
        index += 1
    return None


def _fit(indent: str, prefix: str, expr: str, suffix: str) -> list[str]:
    """``indent + prefix + expr + suffix`` laid out the way ``ruff format`` lays it out when too long.

    Only the shapes this generator produces are handled: a conditional expression (parenthesised, then
    split before ``if`` and ``else``) and an expression ending in a bracket (split inside that bracket).
    """
    line = f"{indent}{prefix}{expr}{suffix}"
    if len(line) <= LINE_LENGTH:
        return [line]
    inner = indent + INDENT
    if expr.startswith("None if "):
        condition, _, value = expr[len("None if ") :].partition(" else ")
        body = [f"{inner}{expr}"]
        if len(body[0]) > LINE_LENGTH:
            body = [f"{inner}None", f"{inner}if {condition}", f"{inner}else {value}"]
        lines = [f"{indent}{prefix}(", *body, f"{indent}){suffix}"]
    else:
        opened = _closing_bracket_split(expr)
        if opened is None or opened == len(expr) - 2:
            raise CodegenError(f"cannot lay out a generated line within {LINE_LENGTH} characters: {line!r}")
        lines = [
            f"{indent}{prefix}{expr[: opened + 1]}",
            f"{inner}{expr[opened + 1 : -1]}",
            f"{indent}{expr[-1]}{suffix}",
        ]
    if any(len(x) > LINE_LENGTH for x in lines):
        raise CodegenError(f"cannot lay out a generated line within {LINE_LENGTH} characters: {line!r}")
    return lines


def _str_literal(value: str) -> str:
    """A str literal quoted the way ``ruff format`` quotes it (double, unless that needs more escapes)."""
    body = json.dumps(value)[1:-1]  # JSON escapes are valid Python escapes
    if '"' in value and "'" not in value:
        return "'" + body.replace('\\"', '"') + "'"
    return f'"{body}"'


def _bytes_literal(value: bytes) -> str:
    body = repr(value)[2:-1]  # repr picks ' or " itself; normalise to what ruff format wants
    if repr(value).startswith("b'"):
        return _quote_bytes(body.replace("\\'", "'"), value)
    return _quote_bytes(body.replace('\\"', '"'), value)


def _quote_bytes(unescaped_quotes: str, value: bytes) -> str:
    if b'"' in value and b"'" not in value:
        return f"b'{unescaped_quotes}'"
    return 'b"' + unescaped_quotes.replace('"', '\\"') + '"'


def _decoded_literal(value: Any, type_: _Type, records: Mapping[str, _RecordDef], where: str) -> str:
    """Python source for the JSON default ``value`` of a field of ``type_``, as fastavro would decode it.

    uuid and timestamp-millis stay in their JSON form (str, int) and enums as their symbol: the converters
    of :func:`_from_avro` handle those, just as they handle what fastavro returns.
    """
    if isinstance(type_, _Optional):
        # Avro: a union's default belongs to its first branch; ["null", T] can only default to null.
        return "None" if value is None else _decoded_literal(value, type_.inner, records, where)
    if isinstance(type_, _EnumRef):
        if value not in type_.symbols:
            raise CodegenError(f"{where}: default {value!r} is not a symbol of {type_.name}")
        return _str_literal(value)
    if isinstance(type_, _RecordRef):
        if not isinstance(value, dict):
            raise CodegenError(f"{where}: default {value!r} for record {type_.name} is not an object")
        fields = {f.name: f for f in records[type_.name].fields}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise CodegenError(f"{where}: default has fields {unknown} that {type_.name} does not")
        items = [
            f"{_str_literal(k)}: {_decoded_literal(v, fields[k].type, records, where)}"
            for k, v in value.items()
        ]
        return "{" + ", ".join(items) + "}"
    if isinstance(type_, _List):
        if not isinstance(value, list):
            raise CodegenError(f"{where}: default {value!r} for an array is not a list")
        return "[" + ", ".join(_decoded_literal(v, type_.items, records, where) for v in value) + "]"
    if isinstance(type_, _Dict):
        if not isinstance(value, dict):
            raise CodegenError(f"{where}: default {value!r} for a map is not an object")
        items = [
            f"{_str_literal(k)}: {_decoded_literal(v, type_.values, records, where)}"
            for k, v in value.items()
        ]
        return "{" + ", ".join(items) + "}"
    expected: dict[str, type | tuple[type, ...]] = {
        "str": str,
        "uuid.UUID": str,
        "bytes": str,
        "int": int,
        "datetime": int,
        "float": (int, float),
        "bool": bool,
        "None": type(None),
    }
    if not isinstance(value, expected[type_.annotation]) or (
        type_.annotation != "bool" and isinstance(value, bool)
    ):
        raise CodegenError(f"{where}: default {value!r} does not fit {type_.annotation}")
    value = cast(Any, value)  # checked just above; mypy narrows it to object
    if type_.annotation in ("str", "uuid.UUID"):
        return _str_literal(value)
    if type_.annotation == "bytes":
        return _bytes_literal(value.encode("latin-1"))  # Avro: bytes defaults are code points 0-255
    if type_.annotation == "float":
        return repr(float(value))
    return repr(value)


def _python_default(owner: _RecordDef, f: _Field, records: Mapping[str, _RecordDef]) -> str | None:
    """Source of the dataclass default for ``f`` (``= ...`` part), or None for a required field."""
    if owner.top_level and not f.has_default:
        if f.name == "event_id":
            return "field(default_factory=wire.uuid4)"
        if f.name == "event_time":
            return "field(default_factory=_now_ms)"
    if not f.has_default:
        return None
    where = f"{owner.fullname}.{f.name}"
    type_ = f.type.inner if isinstance(f.type, _Optional) and f.default is not None else f.type
    if f.default is None:
        if type_ != _Scalar("None") and not isinstance(type_, _Optional):
            raise CodegenError(f"{where}: default null for a field that is not nullable")
        return "None"
    if isinstance(type_, _EnumRef):
        _decoded_literal(f.default, type_, records, where)  # validates the symbol
        return f"{type_.name}.{f.default}"
    if isinstance(type_, _List) and f.default == []:
        return "field(default_factory=list)"
    if isinstance(type_, _Dict) and f.default == {}:
        return "field(default_factory=dict)"
    expr = _from_avro(_decoded_literal(f.default, type_, records, where), type_)
    if isinstance(type_, _Scalar) and type_.annotation not in ("uuid.UUID", "datetime"):
        return expr  # an immutable literal
    return f"field(default_factory=lambda: {expr})"


def _wrap(text: str, width: int) -> list[str]:
    """Paragraph-preserving wrap (blank line between paragraphs)."""
    lines: list[str] = []
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    for paragraph in (p for p in paragraphs if p):
        if lines:
            lines.append("")
        lines.extend(textwrap.wrap(paragraph, width, break_long_words=False, break_on_hyphens=False))
    return lines


def _docstring(text: str, indent: str) -> list[str]:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    one_line = " ".join(text.split())
    if one_line.startswith('"'):
        one_line = " " + one_line  # what ruff format does, so the quotes do not merge
    if one_line.endswith('"'):
        one_line += " "
    if len(indent) + len(one_line) + 6 <= LINE_LENGTH and "\n\n" not in text.strip():
        return [f'{indent}"""{one_line}"""']
    wrapped = _wrap(text, LINE_LENGTH - len(indent) - 3)
    if wrapped[0].startswith('"'):
        wrapped[0] = " " + wrapped[0]
    return [
        f'{indent}"""{wrapped[0]}',
        *(f"{indent}{line}" if line else "" for line in wrapped[1:]),
        f'{indent}"""',
    ]


def _comment(text: str, indent: str) -> list[str]:
    prefix = f"{indent}#: "
    return [f"{prefix}{line}".rstrip() for line in _wrap(text, LINE_LENGTH - len(prefix))]


def _render_enum(definition: _EnumDef) -> list[str]:
    lines = [f"class {definition.name}(enum.StrEnum):"]
    lines += _docstring(definition.doc or f"Avro enum ``{definition.fullname}``.", INDENT)
    lines.append("")
    lines += [f'{INDENT}{symbol} = "{symbol}"' for symbol in definition.symbols]
    return lines


def _render_record(definition: _RecordDef, records: Mapping[str, _RecordDef]) -> list[str]:
    i1, i2, i3 = INDENT, INDENT * 2, INDENT * 3
    lines = ["@dataclass(frozen=True, slots=True, kw_only=True)", f"class {definition.name}:"]
    lines += _docstring(definition.doc or f"Avro record ``{definition.fullname}``.", i1)
    lines += ["", f'{i1}SCHEMA_NAME: ClassVar[str] = "{definition.fullname}"', ""]
    for f in definition.fields:
        lines += _comment(f.doc or f"Avro field ``{f.name}`` (undocumented in the schema).", i1)
        default = _python_default(definition, f, records)
        lines += _fit(
            i1, f"{f.name}: {_annotation(f.type)}" + ("" if default is None else " = "), default or "", ""
        )
    if definition.fields:
        lines.append("")

    lines += [
        f"{i1}def to_record(self) -> dict[str, Any]:",
        f'{i2}"""Plain dict for fastavro: enums as their symbol, nested records as dicts."""',
    ]
    if definition.fields:
        lines.append(f"{i2}return {{")
        for f in definition.fields:
            lines += _fit(i3, f'"{f.name}": ', _to_avro(f"self.{f.name}", f.type), ",")
        lines.append(f"{i2}}}")
    else:
        lines.append(f"{i2}return {{}}")

    lines += [
        "",
        f"{i1}@classmethod",
        f"{i1}def from_record(cls, record: Mapping[str, Any]) -> Self:",
        f'{i2}"""Build from a decoded record; a missing key that has an Avro default takes that default."""',
    ]
    if definition.fields:
        lines.append(f"{i2}return cls(")
        for f in definition.fields:
            if not f.has_default:
                raw = f'record["{f.name}"]'
            elif f.default is None:
                raw = f'record.get("{f.name}")'
            else:
                where = f"{definition.fullname}.{f.name}"
                raw = f'record.get("{f.name}", {_decoded_literal(f.default, f.type, records, where)})'
            lines += _fit(i3, f"{f.name}=", _from_avro(raw, f.type), ",")
        lines.append(f"{i2})")
    else:
        lines.append(f"{i2}return cls()")
    return lines


_SCALAR_CODECS: dict[str, str] = {
    "string": "str",
    "int": "long",
    "long": "long",
    "float": "float",
    "double": "double",
    "boolean": "bool",
    "bytes": "bytes",
    "null": "null",
    "uuid": "uuid",
    "timestamp-millis": "timestamp_millis",
}
_WIRE_ALIASES = [f"_{k}_{name}" for name in sorted(set(_SCALAR_CODECS.values())) for k in ("w", "r")]


def _codec(type_: _Type, kind: str) -> str:
    """Source of the writer (``kind`` w) or reader (r) of ``type_``, built from :mod:`services.bus.wire`."""
    if isinstance(type_, _Scalar):
        if type_.avro.startswith("fixed:"):
            return f"wire.{kind}_fixed({int(type_.avro.partition(':')[2])})"
        if type_.avro not in _SCALAR_CODECS:
            raise CodegenError(f"no codec for the Avro type {type_.avro!r}")
        return f"_{kind}_{_SCALAR_CODECS[type_.avro]}"
    if isinstance(type_, _EnumRef):
        return f"_{kind.upper()}_{type_.name}"
    if isinstance(type_, _RecordRef):
        return f"_{'write' if kind == 'w' else 'read'}_{_snake(type_.name)}"
    if isinstance(type_, _Optional):
        return f"wire.{kind}_optional({0 if type_.null_first else 1}, {_codec(type_.inner, kind)})"
    if isinstance(type_, _List):
        return f"wire.{kind}_array({_codec(type_.items, kind)})"
    return f"wire.{kind}_map({_codec(type_.values, kind)})"


def _snake(name: str) -> str:
    """``BitrateSample`` -> ``bitrate_sample``, for the codec functions' names."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def _render_enum_codec(definition: _EnumDef) -> list[str]:
    return [
        f"_W_{definition.name} = wire.w_enum({definition.name})",
        f"_R_{definition.name} = wire.r_enum(tuple({definition.name}))",
    ]


def _render_record_codec(definition: _RecordDef) -> list[list[str]]:
    """The record's codec: constants for its composite fields, ``_write_<Name>`` and ``_read_<Name>``."""
    name = definition.name
    constants: list[str] = []
    write = [f"def _write_{_snake(name)}(out: bytearray, v: {name}) -> None:"]
    read = [f"def _read_{_snake(name)}(data: bytes, pos: int) -> tuple[{name}, int]:"]
    for f in definition.fields:
        writer, reader = _codec(f.type, "w"), _codec(f.type, "r")
        if "(" in writer:  # composite: built once, at import
            constants += [f"_W_{name}_{f.name} = {writer}", f"_R_{name}_{f.name} = {reader}"]
            writer, reader = f"_W_{name}_{f.name}", f"_R_{name}_{f.name}"
        write.append(f"{INDENT}{writer}(out, v.{f.name})")
        read.append(f"{INDENT}f_{f.name}, pos = {reader}(data, pos)")
    if not definition.fields:
        write.append(f"{INDENT}return None")
        read.append(f"{INDENT}return {name}(), pos")
    else:
        read.append(f"{INDENT}made = {name}(")
        read += [f"{INDENT * 2}{f.name}=f_{f.name}," for f in definition.fields]
        read += [f"{INDENT})", f"{INDENT}return made, pos"]
    return [block for block in (constants, write, read) if block]


_HEADER = '''\
# Generated by services/bus/codegen.py from schemas/**/*.avsc -- DO NOT EDIT.
# Regenerate with: python -m services.bus.codegen  (check with: python -m services.bus.codegen --check)
"""Typed events for the reelbus Avro schemas: one frozen dataclass per ``schemas/<family>/<Record>.avsc``.

``to_record()`` gives the plain dict fastavro writes; ``from_record()`` takes what fastavro reads back
(``uuid.UUID`` for uuid, aware UTC ``datetime`` for timestamp-millis, ``str`` for enum symbols).
:data:`EVENT_TYPES` maps every top-level schema's full name to its class. :data:`AVRO_CODECS` holds, per
top-level schema, a codec that writes and reads the Avro body straight from and into the dataclass (the
same bytes as fastavro), with the fingerprint of the schema it was generated from.
"""

{imports}

_T = TypeVar("_T")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
{aliases}


class AvroEvent(Protocol):
    """What every top-level event class provides; see :data:`EVENT_TYPES`."""

    SCHEMA_NAME: ClassVar[str]

    @property
    def event_id(self) -> uuid.UUID: ...

    @property
    def event_time(self) -> datetime: ...

    def to_record(self) -> dict[str, Any]: ...


def _now_ms() -> datetime:
    """The current UTC time truncated to milliseconds, the precision of timestamp-millis."""
    return wire.now_ms()


def _as_uuid(value: Any) -> uuid.UUID:
    """fastavro decodes logicalType uuid to ``uuid.UUID``; its string form is accepted too."""
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _as_datetime(value: Any) -> datetime:
    """fastavro decodes timestamp-millis to an aware UTC datetime; epoch millis and naive UTC work too."""
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return _EPOCH + timedelta(milliseconds=int(value))


def _optional(convert: Callable[[Any], _T], value: Any) -> _T | None:
    """``convert(value)``, or None for None (a ["null", T] union)."""
    return None if value is None else convert(value)
'''


def render(schema_dir: Path) -> str:
    """Source of ``events.py`` for every ``*.avsc`` under ``schema_dir`` (deterministic)."""
    definitions = _definitions(schema_dir)
    imports = [
        "import uuid",
        "from collections.abc import Callable, Mapping",
        "from dataclasses import dataclass, field",
    ]
    if any(isinstance(d, _EnumDef) for d in definitions):
        imports.insert(0, "import enum")
    imports += [
        "from datetime import UTC, datetime, timedelta",
        "from typing import Any, ClassVar, Protocol, Self, TypeVar",
    ]

    imports += ["", "from services.bus import wire"]

    records = {d.name: d for d in definitions if isinstance(d, _RecordDef)}
    snakes: dict[str, str] = {}
    for name in records:
        if snakes.setdefault(_snake(name), name) != name:
            raise CodegenError(
                f"records {snakes[_snake(name)]} and {name} give one codec name {_snake(name)}"
            )
    aliases = "\n".join(f"{alias} = wire.{alias[1:]}" for alias in _WIRE_ALIASES)
    header = _HEADER.format(imports="\n".join(imports), aliases=aliases)
    blocks: list[list[str]] = [header.rstrip("\n").split("\n")]
    for definition in definitions:
        blocks.append(
            _render_enum(definition)
            if isinstance(definition, _EnumDef)
            else _render_record(definition, records)
        )
    for definition in definitions:
        if isinstance(definition, _EnumDef):
            blocks.append(_render_enum_codec(definition))
        else:
            blocks += _render_record_codec(definition)
    events = [d.name for d in definitions if isinstance(d, _RecordDef) and d.top_level]
    raw_by_name = {
        _qualify(str(raw["name"]), str(raw.get("namespace") or "")): raw for _, raw in _load(schema_dir)
    }
    codecs = ["AVRO_CODECS: dict[str, wire.Codec] = {"]
    for definition in definitions:
        if isinstance(definition, _RecordDef) and definition.top_level:
            codecs += [
                f"{INDENT}{definition.name}.SCHEMA_NAME: wire.Codec(",
                f'{INDENT * 2}"{fingerprint(raw_by_name[definition.fullname])}",',
                f"{INDENT * 2}_write_{_snake(definition.name)},",
                f"{INDENT * 2}_read_{_snake(definition.name)},",
                f"{INDENT}),",
            ]
    codecs.append("}")
    blocks.append(
        [
            "EVENT_TYPES: dict[str, type[AvroEvent]] = {",
            "    cls.SCHEMA_NAME: cls",
            "    for cls in (",
            *(f"        {name}," for name in events),
            "    )",
            "}",
        ]
    )
    blocks.append(codecs)
    lines = "\n\n\n".join("\n".join(block) for block in blocks).split("\n")
    too_long = [line for line in lines if len(line) > LINE_LENGTH]
    if too_long:
        raise CodegenError(f"generated line longer than {LINE_LENGTH} characters: {too_long[0]!r}")
    return "\n".join(lines) + "\n"


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.bus.codegen", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the output is stale")
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=OUTPUT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        source = render(args.schema_dir)
    except CodegenError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 2
    output: Path = args.output
    current = output.read_text(encoding="utf-8") if output.exists() else None
    if args.check:
        if current != source:
            print(f"{_display(output)} is stale: run python -m services.bus.codegen", file=sys.stderr)
            return 1
        return 0
    if current != source:
        output.write_text(source, encoding="utf-8")
        print(f"wrote {_display(output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
