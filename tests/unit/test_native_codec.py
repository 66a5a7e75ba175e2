"""The native codec (``services/bus/native``, Rust) against the generated Python codecs.

For every schema in ``schemas/`` the two must write byte-identical bodies and read them back into equal
objects of the same types, on representative values and on edge cases (unicode, negative and extreme
longs, empty and large maps, null unions, dates at both ends of ``datetime``'s range). What the native
codec does not take (a naive datetime, an int subclass, a non-canonical uuid string, a truncated body)
it refuses, and the serde falls back to the Python codec, which decides as it always did.

``make install`` builds the extension; without it (or with ``REELBUS_NATIVE_CODEC=0``) the serde uses
the Python codecs only, which the last tests check too.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import itertools
import os
import random
import types
import typing
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.bus import serde as serde_module
from services.bus import wire
from services.bus.contracts import Contracts
from services.bus.events import AVRO_CODECS, EVENT_TYPES, Heartbeat
from services.bus.serde import HEADER, PoisonMessage, Serde, _Reader
from tests.unit.test_events import _assert_identical

CONTRACTS = Contracts.load()
EVENT_CLASSES = sorted(EVENT_TYPES.values(), key=lambda cls: cls.SCHEMA_NAME)
PREFIX = HEADER.pack(0, 8)
NATIVE_OFF = os.environ.get("REELBUS_NATIVE_CODEC", "1").strip().lower() in ("0", "false", "no", "off")

INTS = (0, -1, 1, 63, -64, 64, -65, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 1_700_000_000_000)
FLOATS = (0.0, -0.0, 0.1, -2.5, 1e-40, 3.4e38, float("inf"), float("-inf"), 1e-320)
STRINGS = ("", "ünïcödé", "😀 emoji 𝄞 and 中文", "a" * 300, "\x00nul\x7f", "tt0000042")
TIMES = (
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(2000, 2, 29, 12, 0, 0, 1000, tzinfo=UTC),
    datetime(2024, 5, 17, 12, 34, 56, 789000, tzinfo=UTC),
)
UUIDS = (uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID("123e4567-e89b-12d3-a456-426614174000"))


class _Values:
    """Values for every field of a generated class, driven by its type hints. ``style``: ``full``
    (optionals set, collections of 2), ``none`` (optionals None, collections empty), ``edge`` (the
    extremes above, cycling, a map of 1000 entries) or ``random`` (a seeded mix of all)."""

    def __init__(self, style: str, seed: int = 0) -> None:
        self.style = style
        self.rng = random.Random(seed)
        self.n = itertools.count()

    def pick(self, choices: tuple[Any, ...]) -> Any:
        n = next(self.n)
        return self.rng.choice(choices) if self.style == "random" else choices[n % len(choices)]

    def instance(self, cls: type[Any]) -> Any:
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: self.value(hints[f.name], f.name) for f in dataclasses.fields(cls)})

    def size(self, big: bool) -> int:
        if self.style == "none":
            return 0
        if self.style == "full":
            return 2
        if self.style == "edge":
            return int(self.pick((0, 1, 1000) if big else (0, 1, 3)))
        return int(self.rng.choice((0, 1, 2, 5, 40)))

    def value(self, tp: Any, name: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is types.UnionType:
            (inner,) = [a for a in args if a is not type(None)]
            if self.style == "none" or (self.style != "full" and self.pick((True, False))):
                return None
            return self.value(inner, name)
        if origin is list:
            return [self.value(args[0], name) for _ in range(self.size(big=False))]
        if origin is dict:
            keys = [f"{self.pick(STRINGS)}-{i}" for i in range(self.size(big=True))]
            return {key: self.value(args[1], name) for key in keys}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self.pick(tuple(tp))
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.instance(tp)
        if tp is bool:
            return self.pick((True, False))
        if tp is int:
            return self.pick(INTS) if self.style in ("edge", "random") else 1000 + next(self.n)
        if tp is float:
            return self.pick(FLOATS) if self.style in ("edge", "random") else 0.25 + next(self.n)
        if tp is str:
            return self.pick(STRINGS)
        if tp is bytes:
            return self.pick((b"", bytes(range(256)), b"\x00\xff"))
        if tp is uuid.UUID:
            return self.pick((*UUIDS, uuid.uuid4()))
        if tp is datetime:
            return self.pick(TIMES)
        raise TypeError(f"no value for {tp!r} ({name})")


def _native(cls: type[Any]) -> Any:
    codec = wire.native_codec(CONTRACTS.schema(cls.SCHEMA_NAME).raw, cls)
    assert codec is not None, f"no native codec for {cls.SCHEMA_NAME}"
    return codec


def _python_bytes(cls: type[Any], event: Any) -> bytes:
    out = bytearray(PREFIX)
    AVRO_CODECS[cls.SCHEMA_NAME].write(out, event)
    return bytes(out)


def _same(a: Any, b: Any) -> None:
    """Equal and of the same types; NaN-free values, so == holds (and -0.0 shows in the repr)."""
    _assert_identical(a, b)


needs_native = pytest.mark.skipif(NATIVE_OFF, reason="REELBUS_NATIVE_CODEC=0")


@needs_native
def test_the_extension_is_built_and_takes_every_schema() -> None:
    """``make install`` builds it; a missing extension here means the install step is broken."""
    assert wire.NATIVE is not None, "reelbus_native is not installed: run `make install`"
    for cls in EVENT_CLASSES:
        assert wire.native_plan(CONTRACTS.schema(cls.SCHEMA_NAME).raw, cls) is not None, cls.SCHEMA_NAME
        _native(cls)


@needs_native
@pytest.mark.parametrize("style", ["full", "none", "edge"])
@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_native_and_python_codecs_agree(cls: type[Any], style: str) -> None:
    native = _native(cls)
    event = _Values(style).instance(cls)
    expected = _python_bytes(cls, event)

    assert native.encode(PREFIX, event) == expected
    decoded, end = native.read(expected, len(PREFIX))
    python_decoded, python_end = AVRO_CODECS[cls.SCHEMA_NAME].read(expected, len(PREFIX))
    assert end == python_end == len(expected)
    _same(decoded, python_decoded)
    _same(native.decode(expected, len(PREFIX)), python_decoded)


@needs_native
@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_native_and_python_codecs_agree_on_random_values(cls: type[Any]) -> None:
    native = _native(cls)
    values = _Values("random", seed=hash(cls.SCHEMA_NAME) & 0xFFFF)
    events = [values.instance(cls) for _ in range(60)]
    expected = [_python_bytes(cls, event) for event in events]
    assert native.encode_many(PREFIX, events, cls) == expected
    for data in expected:
        _same(native.decode(data, len(PREFIX)), AVRO_CODECS[cls.SCHEMA_NAME].read(data, len(PREFIX))[0])


@needs_native
@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_a_truncated_body_is_refused_where_python_refuses_it(cls: type[Any]) -> None:
    native = _native(cls)
    python = AVRO_CODECS[cls.SCHEMA_NAME]
    data = _python_bytes(cls, _Values("full").instance(cls))
    for cut in range(len(PREFIX), len(data)):
        part = data[:cut]
        try:
            python_result = python.read(part, len(PREFIX))
        except Exception:
            python_result = None
        try:
            native_result = native.read(part, len(PREFIX))
        except Exception:
            native_result = None
        if native_result is not None:  # it may refuse more, never accept something else
            assert python_result is not None
            _same(native_result[0], python_result[0])
            assert native_result[1] == python_result[1]


@needs_native
def test_what_the_native_codec_refuses_the_python_codec_decides() -> None:
    native = _native(Heartbeat)
    event = _Values("full").instance(Heartbeat)
    for bad in (
        dataclasses.replace(event, event_time=datetime(2024, 1, 1)),  # naive: fastavro's business
        dataclasses.replace(event, event_time=datetime(2024, 1, 1, tzinfo=UTC).astimezone()),  # not UTC
        dataclasses.replace(event, sequence=3.0),
        dataclasses.replace(event, title_id=b"tt1"),
        dataclasses.replace(event, session_id=uuid.uuid4().bytes),
    ):
        with pytest.raises(Exception):  # noqa: B017 - any refusal: the caller falls back
            native.encode(PREFIX, bad)
    with pytest.raises(Exception):  # noqa: B017
        native.encode_many(PREFIX, [event, object()], Heartbeat)
    # A bool is an int to the Python codec too, and a str goes as it is for a uuid: the same bytes.
    for same in (
        dataclasses.replace(event, rebuffer_ms=True),
        dataclasses.replace(event, session_id="not-a-uuid-object"),
    ):
        assert native.encode(PREFIX, same) == _python_bytes(Heartbeat, same)


def _serde(native: bool) -> tuple[Serde, Any]:
    topic = CONTRACTS.topic("playback.events")
    serde = Serde(CONTRACTS, None)  # type: ignore[arg-type]  # never asked: the ids are set here
    serde._ids[(topic.key_subject, topic.key)] = 7
    serde._ids[(topic.value_subject(Heartbeat.SCHEMA_NAME), Heartbeat.SCHEMA_NAME)] = 8
    serde._readers[7] = _Reader.of(CONTRACTS.schema(topic.key), None)
    reader = _Reader.of(CONTRACTS.schema(Heartbeat.SCHEMA_NAME), None)
    serde._readers[8] = reader if native else dataclasses.replace(reader, native=None)
    writer = serde._writer(topic.value_subject(Heartbeat.SCHEMA_NAME), Heartbeat.SCHEMA_NAME, topic)
    if not native:
        serde._writers[(topic.value_subject(Heartbeat.SCHEMA_NAME), Heartbeat.SCHEMA_NAME)] = (
            dataclasses.replace(writer, native=None)
        )
    return serde, topic


@needs_native
def test_the_serde_gives_the_same_bytes_and_events_with_and_without_it() -> None:
    fast, topic = _serde(native=True)
    slow, _ = _serde(native=False)
    assert fast._writers[(topic.value_subject(Heartbeat.SCHEMA_NAME), Heartbeat.SCHEMA_NAME)].native
    values = _Values("random", seed=7)
    events = [values.instance(Heartbeat) for _ in range(50)]
    events.append(dataclasses.replace(events[0], event_time=datetime(2024, 1, 1)))  # naive: fastavro
    assert fast.encode_values(topic, events) == slow.encode_values(topic, events)
    assert [fast.encode_value(topic, e) for e in events] == [slow.encode_value(topic, e) for e in events]
    for data in slow.encode_values(topic, events):
        _same(fast.decode_event_nowait(topic, data), slow.decode_event_nowait(topic, data))


@needs_native
def test_non_canonical_uuids_and_corrupt_bodies_decode_as_in_python() -> None:
    fast, topic = _serde(native=True)
    slow, _ = _serde(native=False)
    event = _Values("full").instance(Heartbeat)
    data = slow.encode_value(topic, event)
    text = str(event.event_id).encode()
    upper = data.replace(text, text.upper())
    _same(fast.decode_event_nowait(topic, upper), slow.decode_event_nowait(topic, upper))
    braces = data.replace(b"\x48" + text, b"\x4c{" + text + b"}")  # 38 characters: uuid.UUID decides
    _same(fast.decode_event_nowait(topic, braces), slow.decode_event_nowait(topic, braces))
    for corrupt in (data[:20], data.replace(text, b"z" * 36)):
        with pytest.raises(PoisonMessage) as slow_error:
            slow.decode_event_nowait(topic, corrupt)
        with pytest.raises(PoisonMessage) as fast_error:
            fast.decode_event_nowait(topic, corrupt)
        assert fast_error.value.reason == slow_error.value.reason


@needs_native
def test_uuid_texts() -> None:
    ids = [*UUIDS, uuid.uuid4()]
    assert wire.uuid_texts(ids) == [str(u).encode() for u in ids]
    assert wire.uuid_texts([*ids, "x"]) == [*(str(u).encode() for u in ids), b"x"]  # type: ignore[list-item]


def test_without_the_extension_the_python_codecs_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "NATIVE", None)
    monkeypatch.setattr(serde_module, "_NATIVE_CODECS", {})
    assert wire.native_codec(CONTRACTS.schema(Heartbeat.SCHEMA_NAME).raw, Heartbeat) is None
    serde, topic = _serde(native=True)  # built while the extension is "absent"
    writer = serde._writers[(topic.value_subject(Heartbeat.SCHEMA_NAME), Heartbeat.SCHEMA_NAME)]
    assert writer.native is None and writer.codec is not None
    assert serde._readers[8].native is None
    event = _Values("full").instance(Heartbeat)
    [data] = serde.encode_values(topic, [event])
    assert data == _python_bytes(Heartbeat, event)
    _same(serde.decode_event_nowait(topic, data), event)
    assert wire.uuid_texts([event.event_id]) == [str(event.event_id).encode()]


def test_a_long_event_stream_round_trips_through_the_serde() -> None:
    """Whatever codec is in use: encode then decode gives every event back (times at ms precision)."""
    serde, topic = _serde(native=True)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    events = [
        dataclasses.replace(
            _Values("full").instance(Heartbeat), sequence=-i, event_time=base + timedelta(milliseconds=i)
        )
        for i in range(500)
    ]
    decoded = [serde.decode_event_nowait(topic, data) for data in serde.encode_values(topic, events)]
    assert decoded == events


def test_now_ms_is_the_current_utc_time_in_milliseconds() -> None:
    for now_ms in (wire.now_ms, wire._now_ms_python):
        before = datetime.now(UTC)
        made = now_ms()
        after = datetime.now(UTC)
        assert made.tzinfo is UTC
        assert made.microsecond % 1000 == 0
        assert before - timedelta(milliseconds=1) < made <= after
    assert (wire.now_ms is wire._now_ms_python) == (wire.NATIVE is None)


def test_uuid4_ids_are_distinct_version_4_and_not_shared_with_a_forked_child() -> None:
    made = [wire.uuid4() for _ in range(5000)]  # several refills of the random buffer
    assert len(set(made)) == len(made)
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in made)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, which must not be the parent's next one
        os.write(write, wire.uuid4().bytes)
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = uuid.UUID(bytes=os.read(read, 16))
    os.close(read)
    assert child != wire.uuid4()


@needs_native
def test_the_framed_fast_paths_decide_as_the_usual_paths() -> None:
    fast, topic = _serde(native=True)
    event = _Values("full").instance(Heartbeat)
    data = fast.encode_value(topic, event)
    readers = fast._readers
    _same(wire.NATIVE.decode_framed_event(data, readers, topic.values), event)
    _same(wire.NATIVE.decode_framed_event(data, readers, None), event)
    other = CONTRACTS.topic("history.views")  # does not carry Heartbeat: the usual path says so
    with pytest.raises(ValueError):
        wire.NATIVE.decode_framed_event(data, readers, other.values)
    with pytest.raises(PoisonMessage, match="not declared"):
        fast.decode_event_nowait(other, data)
    for refused in (b"\x01" + data[1:], data[:3], HEADER.pack(0, 99) + data[5:], None, bytearray(data)):
        with pytest.raises(Exception):  # noqa: B017 - not framed, not cached, not bytes: the usual path
            wire.NATIVE.decode_framed_event(refused, readers, None)

    key = fast.encode_key(topic, "ké-1")
    assert wire.NATIVE.decode_framed_string(key, readers) == "ké-1" == fast.decode_key_nowait(key)
    with pytest.raises(ValueError):  # not the key's reader: the usual path decides
        wire.NATIVE.decode_framed_string(data, readers)
    trailing = key + b"x"  # the Python reader ignores what follows the string; so the serde does
    assert fast.decode_key_nowait(trailing) == "ké-1"
    with pytest.raises(PoisonMessage):
        fast.decode_key_nowait(key[:-1])


@needs_native
@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_decoded_events_the_gc_need_not_scan_are_untracked(cls: type[Any]) -> None:
    """A decoded uuid.UUID, and an event whose fields are all immutable (no list, no dict, at any
    depth), can never be in a reference cycle: the extension leaves them untracked by the GC, as
    CPython does with tuples of atoms. An event holding a list or a dict stays tracked."""
    native = _native(cls)
    event = _Values("full").instance(cls)
    decoded = native.decode(native.encode(PREFIX, event), len(PREFIX))
    _same(decoded, event)

    def mutable(value: Any) -> bool:
        if isinstance(value, list | dict):
            return True
        if dataclasses.is_dataclass(value):
            return any(mutable(getattr(value, f.name)) for f in dataclasses.fields(value))
        return False

    assert gc.is_tracked(decoded) == mutable(decoded)
    assert not gc.is_tracked(decoded.event_id)
    del decoded
    gc.collect()
