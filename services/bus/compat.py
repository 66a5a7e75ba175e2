"""Pure-Python Avro schema compatibility checking that explains *which* field breaks *what*.

Schemas are taken as parsed JSON (``str`` / ``dict`` / ``list`` exactly as they appear in an ``.avsc``
file), never as fastavro-parsed objects, and only the standard library is used.

:func:`reader_writer_incompatibilities` applies the Avro schema-resolution rules to one reader/writer pair;
:func:`check` applies a schema-registry style compatibility level (``BACKWARD``, ``FORWARD_TRANSITIVE``, ...)
to a new schema and the previously registered versions.

Rules implemented (following the Avro specification and Java's ``SchemaCompatibility``):

* primitives must be equal or promotable: int -> long/float/double, long -> float/double, float -> double,
  string <-> bytes;
* records: every reader field is matched to a writer field by name, or by one of the reader field's
  ``aliases``; a reader field with no writer counterpart needs a ``default``; extra writer fields are
  skipped and therefore fine;
* enums: a writer symbol the reader lacks is only acceptable when the reader enum has a ``default``;
* arrays compare their ``items``, maps their ``values``; fixed types must have the same ``size``;
* records, enums and fixed types must have the same *unqualified* name (as in Java), unless one of the
  reader's ``aliases`` names the writer type (either as a full name or by its unqualified part);
* unions: every branch of a writer union must be readable by the reader; a reader union can read a
  non-union writer type when at least one of its branches can;
* named-type references (``"Device"`` after ``Device`` has been defined) are resolved per the spec: a
  dotted name is a full name, otherwise it is qualified by the enclosing namespace (falling back to the
  null namespace like Java); nested definitions inherit the enclosing namespace;
* recursive types are supported: a (reader, writer) pair of named types already under comparison is
  assumed compatible, which makes the comparison terminate.

Logical types: Avro schema resolution ignores ``logicalType`` and resolves on the underlying type, so this
checker does the same. A ``{"type": "string", "logicalType": "uuid"}`` field read as plain ``"string"`` (or
vice versa), or a ``timestamp-millis`` long changed to ``timestamp-micros``, is reported as *compatible*
even though the meaning of the value may have changed; a change of the underlying type (``date`` int read as
a ``long``-based type is fine, the reverse is not) is judged by the primitive rules above.

Field default values are not validated against the field type.

Paths (:attr:`Incompatibility.path`) start at the (reader's) top-level named type's full name and descend
through field names, e.g. ``reelbus.playback.Heartbeat.bitrate_kbps``; array items append ``[]`` and map
values ``{}`` (``Heartbeat.samples[]``); unions are transparent. A problem at the very top of a schema that is
not a named type is reported at ``<root>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

__all__ = [
    "LEVELS",
    "Incompatibility",
    "SchemaError",
    "check",
    "reader_writer_incompatibilities",
]

LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)

_PRIMITIVES: Final = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# writer type -> reader types it can be promoted to
_PROMOTIONS: Final[dict[str, frozenset[str]]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_ROOT: Final = "<root>"


class SchemaError(ValueError):
    """The given JSON is not a usable Avro schema (bad shape, unknown or redefined type name...)."""


@dataclass(frozen=True)
class Incompatibility:
    """One reason why data written with one schema cannot be read with another."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --------------------------------------------------------------------------------------------------------
# Parsed schema model (identity-compared so that recursive types can point at themselves)
# --------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Primitive:
    name: str


@dataclass(eq=False)
class _Named:
    kind: str
    fullname: str
    aliases: frozenset[str]

    @property
    def name(self) -> str:
        return self.fullname.rpartition(".")[2]

    @property
    def namespace(self) -> str:
        return self.fullname.rpartition(".")[0]


@dataclass(eq=False)
class _Field:
    name: str
    aliases: tuple[str, ...]
    type: _Node
    has_default: bool


@dataclass(eq=False)
class _Record(_Named):
    fields: list[_Field] = field(default_factory=list)


@dataclass(eq=False)
class _Enum(_Named):
    symbols: tuple[str, ...] = ()
    default: str | None = None


@dataclass(eq=False)
class _Fixed(_Named):
    size: int = 0


@dataclass(eq=False)
class _Array:
    items: _Node


@dataclass(eq=False)
class _Map:
    values: _Node


@dataclass(eq=False)
class _Union:
    branches: tuple[_Node, ...]


_Node: TypeAlias = "_Primitive | _Record | _Enum | _Fixed | _Array | _Map | _Union"


def _qualify(name: str, namespace: str) -> str:
    """Full name of ``name`` as written inside ``namespace`` (a dotted name is already full)."""
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


class _Parser:
    """Turns one parsed-JSON schema into the node model, resolving named-type references."""

    def __init__(self) -> None:
        self._names: dict[str, _Record | _Enum | _Fixed] = {}

    def parse(self, schema: Any, namespace: str = "") -> _Node:
        if isinstance(schema, str):
            return self._reference(schema, namespace)
        if isinstance(schema, list):
            return _Union(tuple(self.parse(branch, namespace) for branch in schema))
        if isinstance(schema, dict):
            return self._parse_object(schema, namespace)
        raise SchemaError(f"not an Avro schema: {schema!r}")

    def _reference(self, name: str, namespace: str) -> _Node:
        if name in _PRIMITIVES:
            return _Primitive(name)
        candidates = [name] if "." in name else [_qualify(name, namespace), name]
        for candidate in candidates:
            named = self._names.get(candidate)
            if named is not None:
                return named
        raise SchemaError(f"unknown type name {name!r} (named types must be defined before they are used)")

    def _parse_object(self, schema: dict[str, Any], namespace: str) -> _Node:
        type_ = schema.get("type")
        if type_ is None:
            raise SchemaError(f"schema object without a 'type': {schema!r}")
        if not isinstance(type_, str):
            return self.parse(type_, namespace)  # {"type": {...}} / {"type": [...]}: unwrap
        if type_ in _PRIMITIVES:
            return _Primitive(type_)  # logicalType (if any) is deliberately ignored, see module docstring
        if type_ == "array":
            return _Array(self.parse(self._require(schema, "items"), namespace))
        if type_ == "map":
            return _Map(self.parse(self._require(schema, "values"), namespace))
        if type_ in ("record", "error", "enum", "fixed"):
            return self._parse_named(schema, type_, namespace)
        return self._reference(type_, namespace)  # {"type": "SomeDefinedName"}

    @staticmethod
    def _require(schema: dict[str, Any], key: str) -> Any:
        if key not in schema:
            raise SchemaError(f"{schema.get('type')} schema without {key!r}: {schema!r}")
        return schema[key]

    def _parse_named(self, schema: dict[str, Any], kind: str, enclosing: str) -> _Node:
        name = schema.get("name")
        if not isinstance(name, str) or not name:
            raise SchemaError(f"{kind} schema without a name: {schema!r}")
        explicit_ns = schema.get("namespace")
        namespace = explicit_ns if isinstance(explicit_ns, str) else enclosing
        fullname = _qualify(name, namespace)
        if fullname in self._names:
            raise SchemaError(f"type {fullname!r} is defined twice")
        own_ns = fullname.rpartition(".")[0]
        raw_aliases = schema.get("aliases") or []
        aliases = frozenset(_qualify(str(alias), own_ns) for alias in raw_aliases)

        node: _Record | _Enum | _Fixed
        if kind == "enum":
            symbols = self._require(schema, "symbols")
            default = schema.get("default")
            node = _Enum(
                kind,
                fullname,
                aliases,
                symbols=tuple(str(s) for s in symbols),
                default=default if isinstance(default, str) else None,
            )
            self._names[fullname] = node
        elif kind == "fixed":
            size = self._require(schema, "size")
            if not isinstance(size, int):
                raise SchemaError(f"fixed {fullname!r} has a non-integer size {size!r}")
            node = _Fixed(kind, fullname, aliases, size=size)
            self._names[fullname] = node
        else:
            node = _Record(kind, fullname, aliases)
            self._names[fullname] = node  # registered before the fields: allows recursive references
            for raw in self._require(schema, "fields"):
                if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or "type" not in raw:
                    raise SchemaError(f"bad field in record {fullname!r}: {raw!r}")
                node.fields.append(
                    _Field(
                        name=raw["name"],
                        aliases=tuple(str(a) for a in raw.get("aliases") or []),
                        type=self.parse(raw["type"], own_ns),
                        has_default="default" in raw,
                    )
                )
        return node


def _parse(schema: Any) -> _Node:
    return _Parser().parse(schema)


# --------------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------------


def _describe(node: _Node) -> str:
    """Short human description of a schema node (named types by name, so recursion stops there)."""
    if isinstance(node, _Primitive):
        return node.name
    if isinstance(node, _Record | _Enum | _Fixed):
        return f"{node.kind} '{node.fullname}'"
    if isinstance(node, _Array):
        return f"array of {_describe(node.items)}"
    if isinstance(node, _Map):
        return f"map of {_describe(node.values)}"
    return "union [" + ", ".join(_describe(b) for b in node.branches) + "]"


def _same_kind(reader: _Node, writer: _Node) -> bool:
    """Could ``writer`` be resolved against ``reader`` at all (ignoring their contents)?"""
    if isinstance(reader, _Primitive) and isinstance(writer, _Primitive):
        return reader.name == writer.name or reader.name in _PROMOTIONS.get(writer.name, frozenset())
    return type(reader) is type(writer) and not isinstance(reader, _Union)


def _names_match(reader: _Named, writer: _Named) -> bool:
    if reader.name == writer.name:
        return True
    return writer.fullname in reader.aliases or writer.name in {a.rpartition(".")[2] for a in reader.aliases}


def _join(path: str, segment: str) -> str:
    return f"{path}.{segment}" if path else segment


@dataclass(frozen=True)
class _Roles:
    """How to talk about the reader and the writer schema in messages."""

    reader: str = "the reader schema"
    writer: str = "the writer schema"
    direction: Literal["plain", "backward", "forward"] = "plain"
    version: int = 0

    @classmethod
    def backward(cls, version: int) -> _Roles:
        return cls("the new schema", f"the old schema (version {version})", "backward", version)

    @classmethod
    def forward(cls, version: int) -> _Roles:
        return cls(f"the old schema (version {version})", "the new schema", "forward", version)

    def missing_field(self, name: str) -> str:
        if self.direction == "backward":
            return (
                f"field '{name}' was added without a default: a reader using the new schema cannot read "
                f"data written with the old one (version {self.version})"
            )
        if self.direction == "forward":
            return (
                f"field '{name}' was removed but has no default in the old schema (version {self.version}): "
                "a reader using the old schema cannot read data written with the new one"
            )
        return (
            f"field '{name}' is missing from the writer schema and has no default in the reader schema: "
            "a reader using the reader schema cannot read data written with the writer one"
        )


class _Checker:
    def __init__(self, roles: _Roles) -> None:
        self._roles = roles
        self._in_progress: set[tuple[int, int]] = set()

    def run(self, reader: _Node, writer: _Node) -> list[Incompatibility]:
        issues = self._compare(reader, writer, "")
        return [Incompatibility(i.path or _ROOT, i.message) for i in issues]

    def _compare(self, reader: _Node, writer: _Node, path: str) -> list[Incompatibility]:
        if isinstance(writer, _Union):
            return self._writer_union(reader, writer, path)
        if isinstance(reader, _Union):
            return self._reader_union(reader, writer, path)
        if not _same_kind(reader, writer):
            return [self._mismatch(reader, writer, path)]
        if isinstance(reader, _Array) and isinstance(writer, _Array):
            return self._compare(reader.items, writer.items, f"{path}[]")
        if isinstance(reader, _Map) and isinstance(writer, _Map):
            return self._compare(reader.values, writer.values, f"{path}{{}}")
        if isinstance(reader, _Record | _Enum | _Fixed) and isinstance(writer, _Record | _Enum | _Fixed):
            return self._named(reader, writer, path or reader.fullname)
        return []  # equal or promotable primitives

    def _mismatch(self, reader: _Node, writer: _Node, path: str) -> Incompatibility:
        r, w = _describe(reader), _describe(writer)
        message = f"type mismatch: {self._roles.writer} has {w} but {self._roles.reader} expects {r}"
        if isinstance(reader, _Primitive) and isinstance(writer, _Primitive):
            message += f" (Avro cannot promote {w} to {r})"
        return Incompatibility(path, message)

    def _named(self, reader: _Named, writer: _Named, path: str) -> list[Incompatibility]:
        key = (id(reader), id(writer))
        if key in self._in_progress:
            return []  # recursive type: this pair is already being compared further up
        self._in_progress.add(key)
        try:
            issues: list[Incompatibility] = []
            if not _names_match(reader, writer):
                issues.append(
                    Incompatibility(
                        path,
                        f"{reader.kind} name mismatch: {self._roles.reader} expects '{reader.fullname}' but "
                        f"{self._roles.writer} has '{writer.fullname}' (names are compared unqualified; "
                        f"add alias '{writer.fullname}' to the reader's {reader.kind} to allow a rename)",
                    )
                )
            if isinstance(reader, _Record) and isinstance(writer, _Record):
                issues.extend(self._record(reader, writer, path))
            elif isinstance(reader, _Enum) and isinstance(writer, _Enum):
                issues.extend(self._enum(reader, writer, path))
            elif isinstance(reader, _Fixed) and isinstance(writer, _Fixed) and reader.size != writer.size:
                issues.append(
                    Incompatibility(
                        path,
                        f"fixed '{reader.fullname}' size mismatch: {self._roles.writer} has {writer.size} "
                        f"bytes but {self._roles.reader} expects {reader.size}",
                    )
                )
            return issues
        finally:
            self._in_progress.discard(key)

    def _record(self, reader: _Record, writer: _Record, path: str) -> list[Incompatibility]:
        writer_fields = {f.name: f for f in writer.fields}
        issues: list[Incompatibility] = []
        for reader_field in reader.fields:
            field_path = _join(path, reader_field.name)
            writer_field = writer_fields.get(reader_field.name)
            if writer_field is None:
                aliased = [writer_fields[a] for a in reader_field.aliases if a in writer_fields]
                writer_field = aliased[0] if aliased else None
            if writer_field is None:
                if not reader_field.has_default:
                    issues.append(Incompatibility(field_path, self._roles.missing_field(reader_field.name)))
                continue
            issues.extend(self._compare(reader_field.type, writer_field.type, field_path))
        return issues

    def _enum(self, reader: _Enum, writer: _Enum, path: str) -> list[Incompatibility]:
        if reader.default is not None:
            return []  # unknown writer symbols resolve to the reader's default
        known = set(reader.symbols)
        missing = [s for s in writer.symbols if s not in known]
        if not missing:
            return []
        listed = ", ".join(repr(s) for s in missing)
        noun = "symbol" if len(missing) == 1 else "symbols"
        verb = "is" if len(missing) == 1 else "are"
        return [
            Incompatibility(
                path,
                f"enum '{reader.fullname}': {noun} {listed} of {self._roles.writer} {verb} not in "
                f"{self._roles.reader}, which has no enum default to fall back on",
            )
        ]

    def _writer_union(self, reader: _Node, writer: _Union, path: str) -> list[Incompatibility]:
        issues: list[Incompatibility] = []
        for index, branch in enumerate(writer.branches):
            if isinstance(reader, _Union) or isinstance(branch, _Union) or _same_kind(reader, branch):
                issues.extend(self._compare(reader, branch, path))
            else:
                issues.append(
                    Incompatibility(
                        path,
                        f"{self._roles.writer} may write {_describe(branch)} (branch {index} of its "
                        f"{_describe(writer)}) but {self._roles.reader} expects {_describe(reader)}, "
                        "which cannot read it",
                    )
                )
        return issues

    def _reader_union(self, reader: _Union, writer: _Node, path: str) -> list[Incompatibility]:
        trials: list[tuple[_Node, list[Incompatibility]]] = []
        for branch in reader.branches:
            issues = self._compare(branch, writer, path)
            if not issues:
                return []
            trials.append((branch, issues))

        def closeness(trial: tuple[_Node, list[Incompatibility]]) -> int:
            branch = trial[0]
            if isinstance(branch, _Named) and isinstance(writer, _Named) and _names_match(branch, writer):
                return 2
            return 1 if _same_kind(branch, writer) else 0

        best = max(trials, key=closeness, default=None)
        if best is not None and closeness(best) > 0:
            return best[1]  # explain why the obvious candidate branch does not fit
        return [
            Incompatibility(
                path,
                f"type mismatch: {self._roles.writer} has {_describe(writer)} but {self._roles.reader} "
                f"expects {_describe(reader)}, and no branch of that union can read it",
            )
        ]


def reader_writer_incompatibilities(reader: Any, writer: Any) -> list[Incompatibility]:
    """Can data written with `writer` be read with `reader` (Avro schema resolution rules)? Empty list = yes.

    Both schemas are parsed JSON (str / dict / list). Logical types are ignored, as Avro schema resolution
    does: only the underlying types are compared (so ``uuid`` string vs plain string is compatible).
    Raises :class:`SchemaError` (a ``ValueError``) when either schema is malformed.
    """
    return _Checker(_Roles()).run(_parse(reader), _parse(writer))


def check(new: Any, previous: list[Any], level: str) -> list[Incompatibility]:
    """`previous` is oldest first. BACKWARD: new reads latest; FORWARD: latest reads new; FULL: both;
    *_TRANSITIVE: against all previous. NONE: always []. Unknown level -> ValueError naming it.

    Messages name the previous version they were found against as ``version N``, N being the 1-based
    position in `previous` (so the latest is ``version len(previous)``). Level names are case-sensitive.
    With no previous versions there is nothing to be incompatible with and the result is ``[]``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}: expected one of {', '.join(LEVELS)}")
    if level == "NONE":
        return []
    new_node = _parse(new)
    versions = list(enumerate(previous, start=1))
    if not level.endswith("_TRANSITIVE"):
        versions = versions[-1:]
    backward = level.startswith(("BACKWARD", "FULL"))
    forward = level.startswith(("FORWARD", "FULL"))
    issues: list[Incompatibility] = []
    for version, old in versions:
        old_node = _parse(old)
        if backward:
            issues.extend(_Checker(_Roles.backward(version)).run(new_node, old_node))
        if forward:
            issues.extend(_Checker(_Roles.forward(version)).run(old_node, new_node))
    return issues
