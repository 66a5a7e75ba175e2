"""Table-driven tests for the pure-Python Avro compatibility checker in services.bus.compat."""

from __future__ import annotations

from typing import Any

import pytest

from services.bus.compat import (
    LEVELS,
    Incompatibility,
    SchemaError,
    check,
    reader_writer_incompatibilities,
)

NS = "reelbus.playback"
HB = f"{NS}.Heartbeat"

# (path, fragment of the message) pairs; an empty tuple means "compatible".
Expected = tuple[tuple[str, str], ...]
OK: Expected = ()


def fld(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    """A record field; pass ``default=...`` (or ``aliases=[...]``) through ``extra``."""
    return {"name": name, "type": type_, **extra}


def rec(*fields: dict[str, Any], name: str = "Heartbeat", namespace: str | None = NS, **extra: Any) -> Any:
    schema: dict[str, Any] = {"type": "record", "name": name, "fields": list(fields), **extra}
    if namespace is not None:
        schema["namespace"] = namespace
    return schema


def hb(type_: Any, **extra: Any) -> Any:
    """Heartbeat record with a single field ``v`` of the given type."""
    return rec(fld("v", type_, **extra))


def enum(*symbols: str, name: str = "DeviceType", **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": list(symbols), **extra}


def assert_matches(issues: list[Incompatibility], expected: Expected) -> None:
    """Same number of issues as expected, each at the expected path and containing the fragment."""
    rendered = [str(i) for i in issues]
    assert len(issues) == len(expected), rendered
    for issue, (path, fragment) in zip(issues, expected, strict=True):
        assert issue.path == path, rendered
        assert fragment in issue.message, rendered


BASE = rec(fld("session_id", "string"), fld("position_ms", "long"))

# ---------------------------------------------------------------------------------------------------------
# Primitive promotions (writer type, reader type, compatible?)
# ---------------------------------------------------------------------------------------------------------

PROMOTIONS: list[tuple[str, str, bool]] = [
    ("int", "int", True),
    ("int", "long", True),
    ("int", "float", True),
    ("int", "double", True),
    ("long", "float", True),
    ("long", "double", True),
    ("float", "double", True),
    ("string", "bytes", True),
    ("bytes", "string", True),
    ("null", "null", True),
    ("boolean", "boolean", True),
    ("long", "int", False),
    ("double", "float", False),
    ("float", "long", False),
    ("double", "int", False),
    ("string", "int", False),
    ("boolean", "int", False),
    ("null", "string", False),
    ("int", "string", False),
]


@pytest.mark.parametrize(("writer", "reader", "compatible"), PROMOTIONS, ids=str)
def test_primitive_promotions(writer: str, reader: str, compatible: bool) -> None:
    issues = reader_writer_incompatibilities(hb(reader), hb(writer))
    if compatible:
        assert issues == []
    else:
        assert_matches(
            issues, ((f"{HB}.v", f"writer schema has {writer} but the reader schema expects {reader}"),)
        )
        assert f"Avro cannot promote {writer} to {reader}" in issues[0].message


# ---------------------------------------------------------------------------------------------------------
# reader_writer_incompatibilities: (id, reader, writer, expected)
# ---------------------------------------------------------------------------------------------------------

DEVICE = enum("TV", "PHONE", name="DeviceType")
LIST_NODE = rec(
    fld("value", "int"),
    fld("next", ["null", "LinkedNode"], default=None),
    name="LinkedNode",
    namespace="reelbus.test",
)
LIST_NODE_WITH_LABEL = rec(
    fld("value", "long"),
    fld("next", ["null", "LinkedNode"], default=None),
    fld("label", "string"),
    name="LinkedNode",
    namespace="reelbus.test",
)

READER_WRITER_CASES: list[tuple[str, Any, Any, Expected]] = [
    # --- records --------------------------------------------------------------------------------------
    ("identical records", BASE, BASE, OK),
    (
        "reader field with default missing in writer",
        rec(fld("session_id", "string"), fld("position_ms", "long"), fld("bitrate_kbps", "int", default=0)),
        BASE,
        OK,
    ),
    (
        "reader field with null default missing in writer",
        rec(
            fld("session_id", "string"),
            fld("position_ms", "long"),
            fld("cdn", ["null", "string"], default=None),
        ),
        BASE,
        OK,
    ),
    (
        "reader field without default missing in writer",
        rec(fld("session_id", "string"), fld("position_ms", "long"), fld("bitrate_kbps", "int")),
        BASE,
        (
            (
                f"{HB}.bitrate_kbps",
                "field 'bitrate_kbps' is missing from the writer schema and has no default",
            ),
        ),
    ),
    ("writer has an extra field", rec(fld("session_id", "string")), BASE, OK),
    (
        "field renamed with reader alias",
        rec(fld("session", "string", aliases=["session_id"]), fld("position_ms", "long")),
        BASE,
        OK,
    ),
    (
        "field renamed without alias",
        rec(fld("session", "string"), fld("position_ms", "long")),
        BASE,
        ((f"{HB}.session", "field 'session' is missing"),),
    ),
    (
        "nested field type change reported with full path",
        rec(fld("device", rec(fld("model", "int"), name="Device"))),
        rec(fld("device", rec(fld("model", "string"), name="Device"))),
        ((f"{HB}.device.model", "has string but the reader schema expects int"),),
    ),
    (
        "no namespace gives a short path",
        rec(fld("device_type", "int"), namespace=None),
        rec(fld("device_type", "long"), namespace=None),
        (("Heartbeat.device_type", "Avro cannot promote long to int"),),
    ),
    # --- record names --------------------------------------------------------------------------------
    (
        "record renamed without alias",
        rec(fld("v", "int"), name="Beat"),
        rec(fld("v", "int")),
        ((f"{NS}.Beat", "record name mismatch: the reader schema expects 'reelbus.playback.Beat'"),),
    ),
    (
        "record renamed with unqualified alias",
        rec(fld("v", "int"), name="Beat", aliases=["Heartbeat"]),
        hb("int"),
        OK,
    ),
    ("record renamed with full-name alias", rec(fld("v", "int"), name="Beat", aliases=[HB]), hb("int"), OK),
    ("same name in another namespace", rec(fld("v", "int"), namespace="reelbus.other"), hb("int"), OK),
    # --- enums ---------------------------------------------------------------------------------------
    ("enum unchanged", hb(DEVICE), hb(DEVICE), OK),
    ("reader enum has more symbols", hb(enum("TV", "PHONE", "CONSOLE")), hb(DEVICE), OK),
    (
        "writer symbol unknown to reader without default",
        hb(enum("TV")),
        hb(enum("TV", "PHONE", "CONSOLE")),
        ((f"{HB}.v", "symbols 'PHONE', 'CONSOLE' of the writer schema are not in the reader schema"),),
    ),
    (
        "writer symbol unknown to reader with default",
        hb(enum("UNKNOWN", "TV", default="UNKNOWN")),
        hb(DEVICE),
        OK,
    ),
    (
        "enum renamed",
        hb(enum("TV", "PHONE", name="Platform")),
        hb(DEVICE),
        ((f"{HB}.v", "enum name mismatch"),),
    ),
    # --- arrays and maps -----------------------------------------------------------------------------
    (
        "array items promoted",
        hb({"type": "array", "items": "long"}),
        hb({"type": "array", "items": "int"}),
        OK,
    ),
    (
        "array items narrowed",
        hb({"type": "array", "items": "int"}),
        hb({"type": "array", "items": "long"}),
        ((f"{HB}.v[]", "Avro cannot promote long to int"),),
    ),
    (
        "array of records: missing field inside items",
        hb({"type": "array", "items": rec(fld("a", "int"), fld("b", "int"), name="Sample")}),
        hb({"type": "array", "items": rec(fld("a", "int"), name="Sample")}),
        ((f"{HB}.v[].b", "field 'b' is missing"),),
    ),
    ("map values promoted", hb({"type": "map", "values": "float"}), hb({"type": "map", "values": "int"}), OK),
    (
        "map values incompatible",
        hb({"type": "map", "values": "int"}),
        hb({"type": "map", "values": "string"}),
        ((f"{HB}.v{{}}", "has string but the reader schema expects int"),),
    ),
    (
        "array read as map",
        hb({"type": "map", "values": "int"}),
        hb({"type": "array", "items": "int"}),
        ((f"{HB}.v", "has array of int but the reader schema expects map of int"),),
    ),
    # --- fixed ---------------------------------------------------------------------------------------
    (
        "fixed unchanged",
        hb({"type": "fixed", "name": "Md5", "size": 16}),
        hb({"type": "fixed", "name": "Md5", "size": 16}),
        OK,
    ),
    (
        "fixed size changed",
        hb({"type": "fixed", "name": "Md5", "size": 16}),
        hb({"type": "fixed", "name": "Md5", "size": 32}),
        ((f"{HB}.v", "fixed 'reelbus.playback.Md5' size mismatch: the writer schema has 32 bytes"),),
    ),
    (
        "fixed renamed",
        hb({"type": "fixed", "name": "Sha", "size": 16}),
        hb({"type": "fixed", "name": "Md5", "size": 16}),
        ((f"{HB}.v", "fixed name mismatch"),),
    ),
    (
        "fixed renamed with alias",
        hb({"type": "fixed", "name": "Sha", "size": 16, "aliases": ["Md5"]}),
        hb({"type": "fixed", "name": "Md5", "size": 16}),
        OK,
    ),
    # --- unions --------------------------------------------------------------------------------------
    ("union widened", hb(["null", "string", "int"]), hb(["null", "string"]), OK),
    ("union branch promoted", hb(["null", "long"]), hb(["null", "int"]), OK),
    (
        "union narrowed",
        hb(["null", "string"]),
        hb(["null", "string", "int"]),
        ((f"{HB}.v", "no branch of that union can read it"),),
    ),
    ("non-union writer read by union", hb(["null", "string"]), hb("string"), OK),
    (
        "non-union writer not in reader union",
        hb(["null", "int"]),
        hb("string"),
        ((f"{HB}.v", "has string but the reader schema expects union [null, int]"),),
    ),
    (
        "optional writer read as required",
        hb("string"),
        hb(["null", "string"]),
        ((f"{HB}.v", "may write null (branch 0 of its union [null, string])"),),
    ),
    ("every writer branch promotable", hb("double"), hb(["int", "long", "float"]), OK),
    (
        "reader union explains the closest branch",
        hb(["null", rec(fld("a", "int"), fld("b", "int"), name="Inner")]),
        hb(["null", rec(fld("a", "int"), name="Inner")]),
        ((f"{HB}.v.b", "field 'b' is missing"),),
    ),
    # --- named references and namespaces ---------------------------------------------------------------
    (
        "reference by short name",
        rec(fld("a", DEVICE), fld("b", "DeviceType")),
        rec(fld("a", DEVICE), fld("b", "DeviceType")),
        OK,
    ),
    (
        "change seen through a reference",
        rec(fld("a", enum("TV")), fld("b", "DeviceType")),
        rec(fld("a", DEVICE), fld("b", "DeviceType")),
        ((f"{HB}.a", "symbol 'PHONE'"), (f"{HB}.b", "symbol 'PHONE'")),
    ),
    (
        "reference by full name from another namespace",
        rec(fld("a", {**DEVICE, "namespace": "reelbus.common"}), fld("b", "reelbus.common.DeviceType")),
        rec(
            fld("a", {**DEVICE, "namespace": "reelbus.common"}),
            fld("b", {"type": "reelbus.common.DeviceType"}),
        ),
        OK,
    ),
    (
        "nested type inherits the namespace of its enclosing record",
        rec(
            fld("a", rec(fld("x", "long"), name="Inner", namespace=None)), fld("b", "reelbus.playback.Inner")
        ),
        rec(fld("a", rec(fld("x", "int"), name="Inner", namespace=None)), fld("b", "Inner")),
        OK,
    ),
    (
        "dotted name sets its own namespace",
        rec(
            fld("a", rec(fld("x", "int"), name="reelbus.geo.Point", namespace=None)),
            fld("b", "reelbus.geo.Point"),
        ),
        rec(
            fld("a", rec(fld("x", "long"), name="reelbus.geo.Point", namespace=None)),
            fld("b", "reelbus.geo.Point"),
        ),
        ((f"{HB}.a.x", "cannot promote long to int"), (f"{HB}.b.x", "cannot promote long to int")),
    ),
    # --- recursion ---------------------------------------------------------------------------------------
    ("recursive type against itself", LIST_NODE, LIST_NODE, OK),
    (
        "recursive type with a promoted field",
        LIST_NODE_WITH_LABEL | {"fields": LIST_NODE_WITH_LABEL["fields"][:2]},
        LIST_NODE,
        OK,
    ),
    (
        "recursive type with a new required field",
        LIST_NODE_WITH_LABEL,
        LIST_NODE,
        (("reelbus.test.LinkedNode.label", "field 'label' is missing"),),
    ),
    # --- logical types (ignored: resolution is on the underlying type) ---------------------------------
    ("uuid string read as plain string", hb("string"), hb({"type": "string", "logicalType": "uuid"}), OK),
    ("plain string read as uuid", hb({"type": "string", "logicalType": "uuid"}), hb("string"), OK),
    (
        "timestamp unit changed on the same long",
        hb({"type": "long", "logicalType": "timestamp-micros"}),
        hb({"type": "long", "logicalType": "timestamp-millis"}),
        OK,
    ),
    ("date int read as long", hb("long"), hb({"type": "int", "logicalType": "date"}), OK),
    (
        "timestamp long read as date int",
        hb({"type": "int", "logicalType": "date"}),
        hb({"type": "long", "logicalType": "timestamp-millis"}),
        ((f"{HB}.v", "Avro cannot promote long to int"),),
    ),
    # --- shapes -------------------------------------------------------------------------------------
    (
        "record read as array",
        hb({"type": "array", "items": "int"}),
        hb(rec(fld("x", "int"), name="Inner")),
        ((f"{HB}.v", "has record 'reelbus.playback.Inner' but the reader schema expects array of int"),),
    ),
    ("top-level primitives", "long", "int", OK),
    ("top-level primitive mismatch", "int", "long", (("<root>", "Avro cannot promote long to int"),)),
]


@pytest.mark.parametrize(
    ("reader", "writer", "expected"),
    [pytest.param(r, w, e, id=i) for i, r, w, e in READER_WRITER_CASES],
)
def test_reader_writer_incompatibilities(reader: Any, writer: Any, expected: Expected) -> None:
    assert_matches(reader_writer_incompatibilities(reader, writer), expected)


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        pytest.param(rec(fld("a", "Nowhere")), "unknown type name 'Nowhere'", id="undefined reference"),
        pytest.param(rec(fld("a", DEVICE), fld("b", DEVICE)), "defined twice", id="redefinition"),
        pytest.param(
            rec(fld("a", rec(fld("x", "int"), name="reelbus.geo.Point")), fld("b", "Point")),
            "unknown type name 'Point'",
            id="short name resolved in the wrong namespace",
        ),
        pytest.param({"type": "array"}, "without 'items'", id="array without items"),
        pytest.param(42, "not an Avro schema", id="not a schema"),
        pytest.param({"name": "X"}, "without a 'type'", id="missing type"),
    ],
)
def test_malformed_schema_raises(schema: Any, fragment: str) -> None:
    with pytest.raises(SchemaError, match=fragment):
        reader_writer_incompatibilities(schema, "int")


# ---------------------------------------------------------------------------------------------------------
# check(): levels against the previous versions
# ---------------------------------------------------------------------------------------------------------

V1 = rec(fld("session_id", "string"), fld("position_ms", "int"))
ADDED_WITH_DEFAULT = rec(
    fld("session_id", "string"), fld("position_ms", "int"), fld("bitrate_kbps", "int", default=0)
)
ADDED_NO_DEFAULT = rec(fld("session_id", "string"), fld("position_ms", "int"), fld("bitrate_kbps", "int"))
REMOVED = rec(fld("session_id", "string"))
PROMOTED = rec(fld("session_id", "string"), fld("position_ms", "long"))
WITH_ENUM = rec(fld("device_type", enum("TV", "PHONE")))
ENUM_ADDED = rec(fld("device_type", enum("TV", "PHONE", "CONSOLE")))
WITH_ENUM_DEFAULT = rec(fld("device_type", enum("UNKNOWN", "TV", "PHONE", default="UNKNOWN")))
ENUM_DEFAULT_ADDED = rec(fld("device_type", enum("UNKNOWN", "TV", "PHONE", "CONSOLE", default="UNKNOWN")))

ADDED_MSG = "field 'bitrate_kbps' was added without a default: a reader using the new schema cannot read"
REMOVED_MSG = "field 'position_ms' was removed but has no default in the old schema (version 1)"

CHECK_CASES: list[tuple[str, Any, list[Any], str, Expected]] = [
    ("add with default, BACKWARD", ADDED_WITH_DEFAULT, [V1], "BACKWARD", OK),
    ("add with default, FORWARD", ADDED_WITH_DEFAULT, [V1], "FORWARD", OK),
    ("add with default, FULL", ADDED_WITH_DEFAULT, [V1], "FULL", OK),
    (
        "add without default, BACKWARD",
        ADDED_NO_DEFAULT,
        [V1],
        "BACKWARD",
        ((f"{HB}.bitrate_kbps", ADDED_MSG),),
    ),
    ("add without default, FORWARD", ADDED_NO_DEFAULT, [V1], "FORWARD", OK),
    ("add without default, FULL", ADDED_NO_DEFAULT, [V1], "FULL", ((f"{HB}.bitrate_kbps", ADDED_MSG),)),
    ("remove without default, BACKWARD", REMOVED, [V1], "BACKWARD", OK),
    ("remove without default, FORWARD", REMOVED, [V1], "FORWARD", ((f"{HB}.position_ms", REMOVED_MSG),)),
    ("remove without default, FULL", REMOVED, [V1], "FULL", ((f"{HB}.position_ms", REMOVED_MSG),)),
    ("remove field that had a default, FORWARD", V1, [ADDED_WITH_DEFAULT], "FORWARD", OK),
    ("remove field that had a default, FULL", V1, [ADDED_WITH_DEFAULT], "FULL", OK),
    ("int to long, BACKWARD", PROMOTED, [V1], "BACKWARD", OK),
    (
        "int to long, FORWARD",
        PROMOTED,
        [V1],
        "FORWARD",
        ((f"{HB}.position_ms", "the new schema has long but the old schema (version 1) expects int"),),
    ),
    (
        "long to int, BACKWARD",
        V1,
        [PROMOTED],
        "BACKWARD",
        ((f"{HB}.position_ms", "the old schema (version 1) has long but the new schema expects int"),),
    ),
    ("enum symbol added, BACKWARD", ENUM_ADDED, [WITH_ENUM], "BACKWARD", OK),
    (
        "enum symbol added, FORWARD, old reader has no default",
        ENUM_ADDED,
        [WITH_ENUM],
        "FORWARD",
        ((f"{HB}.device_type", "symbol 'CONSOLE' of the new schema is not in the old schema (version 1)"),),
    ),
    (
        "enum symbol added, FORWARD, old reader has a default",
        ENUM_DEFAULT_ADDED,
        [WITH_ENUM_DEFAULT],
        "FORWARD",
        OK,
    ),
    (
        "enum symbol removed, BACKWARD, new reader has no default",
        rec(fld("device_type", enum("TV"))),
        [WITH_ENUM],
        "BACKWARD",
        ((f"{HB}.device_type", "symbol 'PHONE' of the old schema (version 1) is not in the new schema"),),
    ),
    (
        "union widened: FULL fails only forward",
        hb(["null", "string", "int"]),
        [hb(["null", "string"])],
        "FULL",
        ((f"{HB}.v", "the new schema has int but the old schema (version 1) expects union [null, string]"),),
    ),
    ("NONE ignores everything", "int", ["string", {"not": "even a schema"}], "NONE", OK),
    ("no previous versions", ADDED_NO_DEFAULT, [], "FULL_TRANSITIVE", OK),
]


@pytest.mark.parametrize(
    ("new", "previous", "level", "expected"),
    [pytest.param(n, p, lv, e, id=i) for i, n, p, lv, e in CHECK_CASES],
)
def test_check(new: Any, previous: list[Any], level: str, expected: Expected) -> None:
    assert_matches(check(new, previous, level), expected)


# A 3-version chain where each step is compatible with its predecessor, but not with the first version.
# BACKWARD: v3 adds "b" without a default; v2 already had "b" but v1 did not.
BW_V1 = rec(fld("a", "int"))
BW_V2 = rec(fld("a", "int"), fld("b", "int", default=0))
BW_V3 = rec(fld("a", "int"), fld("b", "int"))
# FORWARD: v1 required "b", v2 gave it a default, v3 removes it; only v2 can read v3.
FW_V1 = rec(fld("a", "int"), fld("b", "int"))
FW_V2 = rec(fld("a", "int"), fld("b", "int", default=0))
FW_V3 = rec(fld("a", "int"))

BW_FAIL = (
    (
        f"{HB}.b",
        "field 'b' was added without a default: a reader using the new schema cannot read data "
        "written with the old one (version 1)",
    ),
)
FW_FAIL = ((f"{HB}.b", "field 'b' was removed but has no default in the old schema (version 1)"),)

TRANSITIVE_CASES: list[tuple[str, Any, list[Any], str, Expected]] = [
    ("backward chain, BACKWARD", BW_V3, [BW_V1, BW_V2], "BACKWARD", OK),
    ("backward chain, BACKWARD_TRANSITIVE", BW_V3, [BW_V1, BW_V2], "BACKWARD_TRANSITIVE", BW_FAIL),
    ("backward chain, FULL", BW_V3, [BW_V1, BW_V2], "FULL", OK),
    ("backward chain, FULL_TRANSITIVE", BW_V3, [BW_V1, BW_V2], "FULL_TRANSITIVE", BW_FAIL),
    ("forward chain, FORWARD", FW_V3, [FW_V1, FW_V2], "FORWARD", OK),
    ("forward chain, FORWARD_TRANSITIVE", FW_V3, [FW_V1, FW_V2], "FORWARD_TRANSITIVE", FW_FAIL),
    ("forward chain, FULL_TRANSITIVE", FW_V3, [FW_V1, FW_V2], "FULL_TRANSITIVE", FW_FAIL),
    ("forward chain, BACKWARD_TRANSITIVE", FW_V3, [FW_V1, FW_V2], "BACKWARD_TRANSITIVE", OK),
]


@pytest.mark.parametrize(
    ("new", "previous", "level", "expected"),
    [pytest.param(n, p, lv, e, id=i) for i, n, p, lv, e in TRANSITIVE_CASES],
)
def test_transitive_levels(new: Any, previous: list[Any], level: str, expected: Expected) -> None:
    assert_matches(check(new, previous, level), expected)


@pytest.mark.parametrize("level", ["SIDEWAYS", "backward", "", "FULL_TRANSITIVE "])
def test_unknown_level_raises_naming_it(level: str) -> None:
    with pytest.raises(ValueError, match=f"unknown compatibility level {level!r}"):
        check(V1, [V1], level)


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_accepts_identical_schema(level: str) -> None:
    assert check(V1, [V1, V1], level) == []


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (Incompatibility("Heartbeat.device_type", "boom"), "Heartbeat.device_type: boom"),
        (
            Incompatibility(f"{HB}.bitrate_kbps", "field 'x'"),
            "reelbus.playback.Heartbeat.bitrate_kbps: field 'x'",
        ),
    ],
)
def test_incompatibility_str(issue: Incompatibility, text: str) -> None:
    assert str(issue) == text
