//! A native Avro codec for the generated reelbus event classes (`services/bus/events.py`).
//!
//! `services.bus.wire.native_plan` walks a schema together with its dataclass and hands a plan (nested
//! tuples, see `Node::compile`) to `Codec(plan)`. The codec then writes an event object to the Avro
//! body (after a caller-given prefix, the Confluent header) and reads a body back into instances of
//! the same classes, exactly as the generated Python codec (`services.bus.wire`) does.
//!
//! It is strict on purpose: it only takes the exact types the generated classes hold (`str`, `int`,
//! `float`, `bool`, `bytes`, `uuid.UUID`, an aware UTC `datetime`, `list`, `dict`, the enum members,
//! the record classes) and raises on anything else, malformed or not, so the caller falls back to the
//! Python codec, which decides. It must never succeed with bytes or objects the Python codec would
//! not give (tests/unit/test_native_codec.py holds the two to each other).

use pyo3::exceptions::{PyEOFError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDateTime, PyDict, PyList, PyString, PyTuple, PyType, PyTzInfo};
mod kafka;
mod produce;

#[allow(unused_imports)]
use pyo3::types::{PyDateAccess, PyTimeAccess, PyTzInfoAccess};

/// Python objects the codec compares against or builds, looked up once per codec.
struct Ctx {
    uuid_type: Py<PyType>,
    safe_unknown: Py<PyAny>,
    utc: Py<PyTzInfo>,
    datetime_type: Py<PyType>,
    int_name: Py<PyString>,
    is_safe_name: Py<PyString>,
    value_name: Py<PyString>,
    // uuid.UUID's `int` and `is_safe` slot offsets (`slot_offsets`), or None.
    uuid_slots: Option<Vec<isize>>,
}

impl Ctx {
    fn new(py: Python<'_>) -> PyResult<Self> {
        let uuid = py.import("uuid")?;
        let datetime = py.import("datetime")?;
        let uuid_type = uuid.getattr("UUID")?.cast_into::<PyType>()?;
        let int_name = PyString::intern(py, "int").unbind();
        let is_safe_name = PyString::intern(py, "is_safe").unbind();
        let uuid_slots = slot_offsets(
            &uuid_type,
            &[int_name.clone_ref(py), is_safe_name.clone_ref(py)],
        );
        Ok(Ctx {
            uuid_slots,
            uuid_type: uuid_type.unbind(),
            safe_unknown: uuid.getattr("SafeUUID")?.getattr("unknown")?.unbind(),
            utc: datetime
                .getattr("timezone")?
                .getattr("utc")?
                .cast_into::<PyTzInfo>()?
                .unbind(),
            datetime_type: datetime
                .getattr("datetime")?
                .cast_into::<PyType>()?
                .unbind(),
            int_name,
            is_safe_name,
            value_name: PyString::intern(py, "value").unbind(),
        })
    }
}

enum Node {
    Null,
    Boolean,
    Long,
    Float,
    Double,
    Bytes,
    Str,
    Uuid,
    TimestampMillis,
    Fixed(usize),
    Enum {
        members: Vec<Py<PyAny>>,
        by_value: Py<PyDict>,
    },
    Optional {
        null_index: i64,
        inner: Box<Node>,
    },
    Array(Box<Node>),
    Map(Box<Node>),
    Record {
        cls: Py<PyType>,
        names: Vec<Py<PyString>>,
        fields: Vec<Node>,
        direct: bool,
        // The fields' slot offsets (`slot_offsets`), or None: then `object.__setattr__`'s way.
        offsets: Option<Vec<isize>>,
        // Instances can never be part of a reference cycle (a frozen class without __dict__ whose
        // fields hold only immutable, untracked or global objects): made untracked by the garbage
        // collector, as CPython does with tuples of atoms, so it does not scan them again and again.
        untrack: bool,
    },
}

impl Node {
    /// Holds nothing through which a cycle could come back to its owner.
    fn atomic(&self) -> bool {
        match self {
            Node::Array(_) | Node::Map(_) => false,
            Node::Optional { inner, .. } => inner.atomic(),
            Node::Record { untrack, .. } => *untrack,
            _ => true,
        }
    }
}

fn untrack(obj: &Bound<'_, PyAny>) {
    unsafe {
        if ffi::PyObject_IS_GC(obj.as_ptr()) != 0 {
            ffi::PyObject_GC_UnTrack(obj.as_ptr() as *mut std::ffi::c_void);
        }
    }
}

fn bad(msg: &str) -> PyErr {
    PyValueError::new_err(msg.to_string())
}

fn wrong_type(what: &str, v: &Bound<'_, PyAny>) -> PyErr {
    let name = v
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string());
    PyTypeError::new_err(format!("native codec: {what} expected, not {name}"))
}

fn eof() -> PyErr {
    PyEOFError::new_err("truncated Avro body")
}

impl Node {
    /// A plan node: `(tag, ...)`; tags: null boolean int long float double bytes string uuid
    /// timestamp-millis, `("fixed", size)`, `("enum", members, {value: index})`,
    /// `("optional", null_index, node)`, `("array", node)`, `("map", node)`,
    /// `("record", cls, (field names), (nodes), direct)`.
    fn compile(plan: &Bound<'_, PyAny>) -> PyResult<Node> {
        let t = plan.cast::<PyTuple>()?;
        let tag: String = t.get_item(0)?.extract()?;
        Ok(match tag.as_str() {
            "null" => Node::Null,
            "boolean" => Node::Boolean,
            "int" | "long" => Node::Long,
            "float" => Node::Float,
            "double" => Node::Double,
            "bytes" => Node::Bytes,
            "string" => Node::Str,
            "uuid" => Node::Uuid,
            "timestamp-millis" => Node::TimestampMillis,
            "fixed" => Node::Fixed(t.get_item(1)?.extract()?),
            "enum" => {
                let members: Vec<Py<PyAny>> = t
                    .get_item(1)?
                    .cast::<PyTuple>()?
                    .iter()
                    .map(|m| m.unbind())
                    .collect();
                let by_value = t.get_item(2)?.cast_into::<PyDict>()?.unbind();
                Node::Enum { members, by_value }
            }
            "optional" => {
                let null_index: i64 = t.get_item(1)?.extract()?;
                if null_index != 0 && null_index != 1 {
                    return Err(bad("null_index must be 0 or 1"));
                }
                Node::Optional {
                    null_index,
                    inner: Box::new(Node::compile(&t.get_item(2)?)?),
                }
            }
            "array" => Node::Array(Box::new(Node::compile(&t.get_item(1)?)?)),
            "map" => Node::Map(Box::new(Node::compile(&t.get_item(1)?)?)),
            "record" => {
                let cls = t.get_item(1)?.cast_into::<PyType>()?.unbind();
                let py = plan.py();
                let names: Vec<Py<PyString>> = t
                    .get_item(2)?
                    .cast::<PyTuple>()?
                    .iter()
                    .map(|n| {
                        let s: String = n.extract()?;
                        Ok(PyString::intern(py, &s).unbind())
                    })
                    .collect::<PyResult<_>>()?;
                let fields: Vec<Node> = t
                    .get_item(3)?
                    .cast::<PyTuple>()?
                    .iter()
                    .map(|f| Node::compile(&f))
                    .collect::<PyResult<_>>()?;
                if names.len() != fields.len() {
                    return Err(bad("record plan: as many names as fields"));
                }
                let direct: bool = t.get_item(4)?.extract()?;
                let sealed: bool = if t.len() > 5 {
                    t.get_item(5)?.extract()?
                } else {
                    false
                };
                let untrack = direct && sealed && fields.iter().all(Node::atomic);
                let offsets = if direct {
                    slot_offsets(cls.bind(py), &names)
                } else {
                    None
                };
                Node::Record {
                    cls,
                    names,
                    fields,
                    direct,
                    offsets,
                    untrack,
                }
            }
            other => return Err(bad(&format!("unknown plan tag {other:?}"))),
        })
    }

    // -- writing ------------------------------------------------------------------------------

    fn write(&self, ctx: &Ctx, out: &mut Vec<u8>, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = v.py();
        let p = v.as_ptr();
        match self {
            Node::Null => {
                if !v.is_none() {
                    return Err(wrong_type("None", v));
                }
            }
            Node::Boolean => out.push(if v.is_truthy()? { 1 } else { 0 }),
            Node::Long => write_long(out, exact_long(v)?),
            Node::Float => {
                let x = exact_float(v)?;
                let y = x as f32;
                if y.is_infinite() && x.is_finite() {
                    return Err(PyOverflowError::new_err(
                        "float too large to pack with f format",
                    ));
                }
                out.extend_from_slice(&y.to_le_bytes());
            }
            Node::Double => out.extend_from_slice(&exact_float(v)?.to_le_bytes()),
            Node::Bytes => {
                let data = exact_bytes(v)?;
                write_long(out, data.len() as i64);
                out.extend_from_slice(data);
            }
            Node::Fixed(size) => {
                let data = exact_bytes(v)?;
                if data.len() != *size {
                    return Err(bad("fixed of the wrong size"));
                }
                out.extend_from_slice(data);
            }
            Node::Str => write_str(out, v)?,
            Node::Uuid => {
                if v.get_type().is(ctx.uuid_type.bind(py)) {
                    let n = v.getattr(ctx.int_name.bind(py))?;
                    if unsafe { ffi::PyLong_CheckExact(n.as_ptr()) } == 0 {
                        return Err(wrong_type("int", &n));
                    }
                    let n: u128 = n.extract()?;
                    out.push(72); // 36, the length, as an Avro long
                    write_uuid_text(out, n);
                } else {
                    write_str(out, v)?;
                }
            }
            Node::TimestampMillis => {
                if v.get_type().is(ctx.datetime_type.bind(py)) {
                    let dt = v.cast::<PyDateTime>()?;
                    match dt.get_tzinfo() {
                        Some(tz) if tz.is(ctx.utc.bind(py)) => {}
                        _ => {
                            return Err(bad("only datetimes in datetime.UTC are written natively"))
                        }
                    }
                    let days = days_from_civil(
                        dt.get_year() as i64,
                        dt.get_month() as i64,
                        dt.get_day() as i64,
                    );
                    let seconds = days * 86_400
                        + dt.get_hour() as i64 * 3600
                        + dt.get_minute() as i64 * 60
                        + dt.get_second() as i64;
                    let micros = dt.get_microsecond() as i64;
                    write_long(out, seconds * 1000 + micros / 1000);
                } else {
                    write_long(out, exact_long(v)?);
                }
            }
            Node::Enum { members, by_value } => {
                let index = match members.iter().position(|m| m.as_ptr() == p) {
                    Some(i) => i as i64,
                    None => {
                        let value = v.getattr(ctx.value_name.bind(py))?;
                        match by_value.bind(py).get_item(value)? {
                            Some(i) => i.extract()?,
                            None => return Err(bad("not a member of the enum")),
                        }
                    }
                };
                write_long(out, index);
            }
            Node::Optional { null_index, inner } => {
                if v.is_none() {
                    out.push(if *null_index == 0 { 0 } else { 2 });
                } else {
                    out.push(if *null_index == 0 { 2 } else { 0 });
                    inner.write(ctx, out, v)?;
                }
            }
            Node::Array(item) => {
                if unsafe { ffi::PyList_CheckExact(p) } == 0 {
                    return Err(wrong_type("list", v));
                }
                let list = v.cast::<PyList>()?;
                let n = list.len();
                if n > 0 {
                    write_long(out, n as i64);
                    let mut written = 0usize;
                    for x in list.iter() {
                        item.write(ctx, out, &x)?;
                        written += 1;
                    }
                    if written != n {
                        return Err(bad("the list changed while it was written"));
                    }
                }
                out.push(0);
            }
            Node::Map(value) => {
                if unsafe { ffi::PyDict_CheckExact(p) } == 0 {
                    return Err(wrong_type("dict", v));
                }
                let dict = v.cast::<PyDict>()?;
                let n = dict.len();
                if n > 0 {
                    write_long(out, n as i64);
                    for (k, x) in dict.iter() {
                        write_str(out, &k)?;
                        value.write(ctx, out, &x)?;
                    }
                }
                out.push(0);
            }
            Node::Record { names, fields, .. } => {
                for (name, field) in names.iter().zip(fields.iter()) {
                    let x = v.getattr(name.bind(py))?;
                    field.write(ctx, out, &x)?;
                }
            }
        }
        Ok(())
    }

    // -- reading ------------------------------------------------------------------------------

    fn read<'py>(
        &self,
        ctx: &Ctx,
        py: Python<'py>,
        r: &mut Reader<'_>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Node::Null => py.None().into_bound(py),
            Node::Boolean => {
                let b = r.byte()?;
                pyo3::types::PyBool::new(py, b != 0).to_owned().into_any()
            }
            Node::Long => r.long()?.into_pyobject(py)?.into_any(),
            Node::Float => {
                let raw = r.take(4)?;
                let x = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as f64;
                x.into_pyobject(py)?.into_any()
            }
            Node::Double => {
                let raw = r.take(8)?;
                let mut b = [0u8; 8];
                b.copy_from_slice(raw);
                f64::from_le_bytes(b).into_pyobject(py)?.into_any()
            }
            Node::Bytes => {
                let n = r.size()?;
                PyBytes::new(py, r.take(n)?).into_any()
            }
            Node::Fixed(n) => PyBytes::new(py, r.take(*n)?).into_any(),
            Node::Str => {
                let n = r.size()?;
                decode_utf8(py, r.take(n)?)?
            }
            Node::Uuid => {
                let n = r.size()?;
                let text = r.take(n)?;
                let value = parse_uuid(text).ok_or_else(|| bad("not a canonical UUID"))?;
                make_uuid(ctx, py, value)?
            }
            Node::TimestampMillis => {
                let millis = r.long()?;
                make_datetime(ctx, py, millis)?
            }
            Node::Enum { members, .. } => {
                let index = r.long()?;
                if index < 0 || index as usize >= members.len() {
                    return Err(bad("enum index out of range"));
                }
                members[index as usize].bind(py).clone()
            }
            Node::Optional { null_index, inner } => {
                let branch = r.long()?;
                if branch == *null_index {
                    py.None().into_bound(py)
                } else if branch == 1 - *null_index {
                    inner.read(ctx, py, r)?
                } else {
                    return Err(bad("union branch out of range"));
                }
            }
            Node::Array(item) => {
                let mut items: Vec<Bound<'py, PyAny>> = Vec::new();
                loop {
                    let count = r.block_count()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        items.push(item.read(ctx, py, r)?);
                    }
                }
                PyList::new(py, items)?.into_any()
            }
            Node::Map(value) => {
                let dict = PyDict::new(py);
                loop {
                    let count = r.block_count()?;
                    if count == 0 {
                        break;
                    }
                    for _ in 0..count {
                        let n = r.size()?;
                        let key = decode_utf8(py, r.take(n)?)?;
                        let x = value.read(ctx, py, r)?;
                        dict.set_item(key, x)?;
                    }
                }
                dict.into_any()
            }
            Node::Record {
                cls,
                names,
                fields,
                direct,
                offsets,
                untrack: untracked,
            } => {
                let cls = cls.bind(py);
                if *direct {
                    // What the dataclass's own __init__ does (object.__setattr__ per field), without
                    // the call: allocate, then set each slot.
                    let made = alloc(cls)?;
                    if let Some(offsets) = offsets {
                        for (offset, field) in offsets.iter().zip(fields.iter()) {
                            let x = field.read(ctx, py, r)?;
                            set_slot(&made, *offset, &x);
                        }
                    } else {
                        for (name, field) in names.iter().zip(fields.iter()) {
                            let x = field.read(ctx, py, r)?;
                            set_generic(&made, name.bind(py), &x)?;
                        }
                    }
                    if *untracked {
                        untrack(&made);
                    }
                    made
                } else {
                    let kwargs = PyDict::new(py);
                    for (name, field) in names.iter().zip(fields.iter()) {
                        kwargs.set_item(name.bind(py), field.read(ctx, py, r)?)?;
                    }
                    cls.call((), Some(&kwargs))?
                }
            }
        })
    }
}

// -- helpers ------------------------------------------------------------------------------------

#[inline]
fn write_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z > 0x7F {
        out.push(((z & 0x7F) as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn exact_long(v: &Bound<'_, PyAny>) -> PyResult<i64> {
    let p = v.as_ptr();
    if unsafe { ffi::PyLong_CheckExact(p) == 0 && ffi::PyBool_Check(p) == 0 } {
        return Err(wrong_type("int", v));
    }
    v.extract::<i64>()
}

fn exact_float(v: &Bound<'_, PyAny>) -> PyResult<f64> {
    let p = v.as_ptr();
    if unsafe { ffi::PyFloat_CheckExact(p) } != 0 {
        return Ok(unsafe { ffi::PyFloat_AS_DOUBLE(p) });
    }
    if unsafe { ffi::PyLong_CheckExact(p) } != 0 {
        let x = unsafe { ffi::PyLong_AsDouble(p) };
        if x == -1.0 && PyErr::occurred(v.py()) {
            return Err(PyErr::fetch(v.py()));
        }
        return Ok(x);
    }
    Err(wrong_type("float", v))
}

fn exact_bytes<'a>(v: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    if unsafe { ffi::PyBytes_CheckExact(v.as_ptr()) } == 0 {
        return Err(wrong_type("bytes", v));
    }
    Ok(v.cast::<PyBytes>()?.as_bytes())
}

fn write_str(out: &mut Vec<u8>, v: &Bound<'_, PyAny>) -> PyResult<()> {
    if unsafe { ffi::PyUnicode_CheckExact(v.as_ptr()) } == 0 {
        return Err(wrong_type("str", v));
    }
    let text = v.cast::<PyString>()?.to_str()?;
    write_long(out, text.len() as i64);
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `str(uuid.UUID(int=n))`: 32 lowercase hex digits, dashes after 8, 12, 16 and 20.
fn write_uuid_text(out: &mut Vec<u8>, n: u128) {
    let mut text = [0u8; 36];
    let mut j = 0;
    for i in 0..32 {
        if i == 8 || i == 12 || i == 16 || i == 20 {
            text[j] = b'-';
            j += 1;
        }
        let nibble = (n >> (124 - 4 * i)) & 0xF;
        text[j] = HEX[nibble as usize];
        j += 1;
    }
    out.extend_from_slice(&text);
}

/// The canonical 36-character form only (what `wire.uuid_of` takes without `uuid.UUID`).
fn parse_uuid(text: &[u8]) -> Option<u128> {
    // The value of each hex digit, 16 for anything else.
    const HEX: [u8; 256] = {
        let mut t = [16u8; 256];
        let mut c = 0;
        while c < 10 {
            t[b'0' as usize + c] = c as u8;
            c += 1;
        }
        let mut c = 0;
        while c < 6 {
            t[b'a' as usize + c] = 10 + c as u8;
            t[b'A' as usize + c] = 10 + c as u8;
            c += 1;
        }
        t
    };
    let text: &[u8; 36] = text.try_into().ok()?;
    if text[8] != b'-' || text[13] != b'-' || text[18] != b'-' || text[23] != b'-' {
        return None;
    }
    // Two 64-bit halves (16 digits each), each digit checked once: any invalid digit sets bit 4.
    let mut hi: u64 = 0;
    let mut lo: u64 = 0;
    let mut bad: u8 = 0;
    for &i in &[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17] {
        let d = HEX[text[i] as usize];
        bad |= d;
        hi = (hi << 4) | (d & 15) as u64;
    }
    for &i in &[
        19, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35,
    ] {
        let d = HEX[text[i] as usize];
        bad |= d;
        lo = (lo << 4) | (d & 15) as u64;
    }
    if bad & 16 != 0 {
        return None;
    }
    Some(((hi as u128) << 64) | lo as u128)
}

fn alloc<'py>(cls: &Bound<'py, PyType>) -> PyResult<Bound<'py, PyAny>> {
    let py = cls.py();
    unsafe {
        let tp = cls.as_ptr() as *mut ffi::PyTypeObject;
        let alloc = (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
        let made = alloc(tp, 0);
        if made.is_null() {
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, made))
    }
}

/// The offsets of `names`' slots in instances of `cls` (`__slots__` members holding an object), when
/// every one is such a slot: then a fresh instance's fields can be written straight into it, as
/// `object.__setattr__` would after finding the same member descriptor.
fn slot_offsets(cls: &Bound<'_, PyType>, names: &[Py<PyString>]) -> Option<Vec<isize>> {
    let py = cls.py();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let descr = cls.getattr(name.bind(py)).ok()?;
        unsafe {
            if ffi::Py_TYPE(descr.as_ptr()) != std::ptr::addr_of_mut!(ffi::PyMemberDescr_Type) {
                return None;
            }
            let member = (*(descr.as_ptr() as *mut ffi::PyMemberDescrObject)).d_member
                as *const ffi::PyMemberDef;
            if (*member).type_code != ffi::Py_T_OBJECT_EX || (*member).flags & ffi::Py_READONLY != 0
            {
                return None;
            }
            out.push((*member).offset);
        }
    }
    Some(out)
}

/// Write `value` into the slot at `offset` of `obj` (a fresh instance, see `slot_offsets`).
fn set_slot(obj: &Bound<'_, PyAny>, offset: isize, value: &Bound<'_, PyAny>) {
    unsafe {
        let slot = (obj.as_ptr() as *mut u8).offset(offset) as *mut *mut ffi::PyObject;
        let old = *slot;
        *slot = value.clone().into_ptr();
        ffi::Py_XDECREF(old);
    }
}

fn set_generic(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    value: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let rc = unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value.as_ptr()) };
    if rc < 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    Ok(())
}

fn make_uuid<'py>(ctx: &Ctx, py: Python<'py>, n: u128) -> PyResult<Bound<'py, PyAny>> {
    let made = alloc(ctx.uuid_type.bind(py))?;
    let int = n.into_pyobject(py)?.into_any();
    if let Some(slots) = &ctx.uuid_slots {
        set_slot(&made, slots[0], &int);
        set_slot(&made, slots[1], ctx.safe_unknown.bind(py));
    } else {
        set_generic(&made, ctx.int_name.bind(py), &int)?;
        set_generic(&made, ctx.is_safe_name.bind(py), ctx.safe_unknown.bind(py))?;
    }
    // A uuid.UUID holds an int and a global enum member and cannot be changed: never in a cycle.
    untrack(&made);
    Ok(made)
}

fn decode_utf8<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    unsafe {
        let s = ffi::PyUnicode_DecodeUTF8(
            data.as_ptr() as *const std::os::raw::c_char,
            data.len() as ffi::Py_ssize_t,
            c"strict".as_ptr(),
        );
        if s.is_null() {
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, s))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis)`.
fn make_datetime<'py>(ctx: &Ctx, py: Python<'py>, millis: i64) -> PyResult<Bound<'py, PyAny>> {
    make_datetime_in(py, millis, ctx.utc.bind(py))
}

fn make_datetime_in<'py>(
    py: Python<'py>,
    millis: i64,
    utc: &Bound<'py, PyTzInfo>,
) -> PyResult<Bound<'py, PyAny>> {
    let seconds = millis.div_euclid(1000);
    let micros = (millis.rem_euclid(1000) * 1000) as u32;
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(1..=9999).contains(&y) {
        return Err(PyOverflowError::new_err("date value out of range"));
    }
    let made = PyDateTime::new(
        py,
        y as i32,
        m as u8,
        d as u8,
        (of_day / 3600) as u8,
        (of_day % 3600 / 60) as u8,
        (of_day % 60) as u8,
        micros,
        Some(utc),
    )?;
    Ok(made.into_any())
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn byte(&mut self) -> PyResult<u8> {
        let b = *self.data.get(self.pos).ok_or_else(eof)?;
        self.pos += 1;
        Ok(b)
    }

    /// An Avro long as `wire.r_long` reads it, refusing what does not fit 64 bits (the Python codec
    /// decides those).
    #[inline]
    fn long(&mut self) -> PyResult<i64> {
        let mut n: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(bad("an Avro long of more than 64 bits"));
            }
            n |= ((b & 0x7F) as u64) << shift;
            if b < 0x80 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
            shift += 7;
            if shift > 63 {
                return Err(bad("an Avro long of more than 10 bytes"));
            }
        }
    }

    fn size(&mut self) -> PyResult<usize> {
        let n = self.long()?;
        if n < 0 {
            return Err(bad("negative length"));
        }
        Ok(n as usize)
    }

    /// The item count of the next array or map block (0 at the end), skipping a block's byte size.
    fn block_count(&mut self) -> PyResult<u64> {
        let count = self.long()?;
        if count < 0 {
            self.long()?;
            return count
                .checked_neg()
                .map(|c| c as u64)
                .ok_or_else(|| bad("block count"));
        }
        Ok(count as u64)
    }

    #[inline]
    fn take(&mut self, n: usize) -> PyResult<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(eof)?;
        if end > self.data.len() {
            return Err(eof());
        }
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }
}

/// The codec of one event class, compiled from a plan once.
#[pyclass(frozen, module = "reelbus_native")]
struct Codec {
    node: Node,
    ctx: Ctx,
}

#[pymethods]
impl Codec {
    #[new]
    fn new(py: Python<'_>, plan: &Bound<'_, PyAny>) -> PyResult<Self> {
        let node = Node::compile(plan)?;
        if !matches!(node, Node::Record { .. }) {
            return Err(bad("a codec's plan is a record"));
        }
        Ok(Codec {
            node,
            ctx: Ctx::new(py)?,
        })
    }

    /// `prefix` followed by the Avro body of `event`.
    fn encode<'py>(
        &self,
        py: Python<'py>,
        prefix: &[u8],
        event: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(prefix.len() + 128);
        out.extend_from_slice(prefix);
        self.node.write(&self.ctx, &mut out, event)?;
        Ok(PyBytes::new(py, &out))
    }

    /// `[encode(prefix, e) for e in events]`, refusing the whole batch if an event is not exactly
    /// of `event_type` or cannot be written natively.
    fn encode_many<'py>(
        &self,
        py: Python<'py>,
        prefix: &[u8],
        events: &Bound<'py, PyList>,
        event_type: &Bound<'py, PyType>,
    ) -> PyResult<Bound<'py, PyList>> {
        let mut out: Vec<u8> = Vec::with_capacity(prefix.len() + 256);
        let mut encoded: Vec<Bound<'py, PyBytes>> = Vec::with_capacity(events.len());
        for event in events.iter() {
            if !event.get_type().is(event_type) {
                return Err(wrong_type("the batch's event type", &event));
            }
            out.clear();
            out.extend_from_slice(prefix);
            self.node.write(&self.ctx, &mut out, &event)?;
            encoded.push(PyBytes::new(py, &out));
        }
        PyList::new(py, encoded)
    }

    /// Like the generated `_read_<name>(data, pos)`: the event and the position after it.
    fn read<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyBytes>,
        pos: usize,
    ) -> PyResult<(Bound<'py, PyAny>, usize)> {
        let mut r = Reader {
            data: data.as_bytes(),
            pos,
        };
        let made = self.node.read(&self.ctx, py, &mut r)?;
        Ok((made, r.pos))
    }

    /// The event whose body starts at `pos` of `data` (what follows it is not looked at).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        pos: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        if unsafe { ffi::PyBytes_CheckExact(data.as_ptr()) } == 0 {
            return Err(wrong_type("bytes", data));
        }
        let mut r = Reader {
            data: data.cast::<PyBytes>()?.as_bytes(),
            pos,
        };
        self.node.read(&self.ctx, py, &mut r)
    }
}

/// `[str(u).encode() for u in uuids]` for `uuid.UUID` objects; anything else raises.
#[pyfunction]
fn uuid_texts<'py>(py: Python<'py>, uuids: &Bound<'py, PyList>) -> PyResult<Bound<'py, PyList>> {
    let uuid_type = py.import("uuid")?.getattr("UUID")?;
    let int_name = PyString::intern(py, "int");
    let mut out: Vec<Bound<'py, PyBytes>> = Vec::with_capacity(uuids.len());
    let mut text: Vec<u8> = Vec::with_capacity(36);
    for u in uuids.iter() {
        if !u.get_type().is(&uuid_type) {
            return Err(wrong_type("uuid.UUID", &u));
        }
        let n = u.getattr(&int_name)?;
        if unsafe { ffi::PyLong_CheckExact(n.as_ptr()) } == 0 {
            return Err(wrong_type("int", &n));
        }
        text.clear();
        write_uuid_text(&mut text, n.extract()?);
        out.push(PyBytes::new(py, &text));
    }
    PyList::new(py, out)
}

/// The schema id of a Confluent-framed record (magic byte 0, 4-byte big-endian id), or None.
fn framed_id(data: &[u8]) -> Option<u32> {
    if data.len() < 5 || data[0] != 0 {
        return None;
    }
    Some(u32::from_be_bytes([data[1], data[2], data[3], data[4]]))
}

/// The serde's cached reader of a framed record (`readers[schema_id]`), or a LookupError.
fn reader_of<'py>(
    py: Python<'py>,
    bytes: &[u8],
    readers: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let id = framed_id(bytes).ok_or_else(|| bad("not framed"))?;
    match readers.get_item(id.into_pyobject(py)?)? {
        Some(reader) => Ok(reader),
        None => Err(pyo3::exceptions::PyLookupError::new_err(
            "schema id not cached",
        )),
    }
}

/// `reader_of` for a `bytes` object.
fn cached_reader<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    readers: &Bound<'py, PyDict>,
) -> PyResult<(Bound<'py, PyAny>, &'py [u8])> {
    if unsafe { ffi::PyBytes_CheckExact(data.as_ptr()) } == 0 {
        return Err(wrong_type("bytes", data));
    }
    let bytes: &'py [u8] = unsafe {
        let ptr = ffi::PyBytes_AsString(data.as_ptr()) as *const u8;
        std::slice::from_raw_parts(ptr, ffi::PyBytes_Size(data.as_ptr()) as usize)
    };
    Ok((reader_of(py, bytes, readers)?, bytes))
}

/// The fast path of `Serde.decode_event_nowait`: the event of a framed record whose schema id is in
/// `readers` (the serde's `_readers`) with a native codec (its `native`), when its `fullname` is one
/// of `allowed` (or `allowed` is None). Anything else raises; the caller then takes its usual path,
/// which decides (and says why).
#[pyfunction]
#[pyo3(signature = (data, readers, allowed))]
fn decode_framed_event<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    readers: &Bound<'py, PyDict>,
    allowed: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let (reader, bytes) = cached_reader(py, data, readers)?;
    let native = reader.getattr(pyo3::intern!(py, "native"))?;
    let codec = native.cast::<Codec>()?.get();
    if !allowed.is_none() {
        let fullname = reader.getattr(pyo3::intern!(py, "fullname"))?;
        if !allowed.contains(fullname)? {
            return Err(bad("not declared on the topic"));
        }
    }
    let mut r = Reader {
        data: bytes,
        pos: 5,
    };
    codec.node.read(&codec.ctx, py, &mut r)
}

/// The fast path of `Serde.decode_key_nowait` for `string` keys: the key of a framed record whose
/// schema id is in `readers` with `string` set; anything else raises (the caller's usual path decides).
#[pyfunction]
fn decode_framed_string<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    readers: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let (_, bytes) = cached_reader(py, data, readers)?;
    framed_string(py, bytes, readers)
}

/// `decode_framed_string` of a slice.
fn framed_string<'py>(
    py: Python<'py>,
    bytes: &[u8],
    readers: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let reader = reader_of(py, bytes, readers)?;
    if !reader.getattr(pyo3::intern!(py, "string"))?.is_truthy()? {
        return Err(bad("not a string schema"));
    }
    let mut r = Reader {
        data: bytes,
        pos: 5,
    };
    let n = r.size()?;
    let text = r.take(n)?;
    if r.pos != bytes.len() {
        return Err(bad("more than one string"));
    }
    decode_utf8(py, text)
}

/// `[prefix + <Avro string> for s in values]`: string keys, each an exact `str`; anything else raises.
#[pyfunction]
fn encode_strings<'py>(
    py: Python<'py>,
    prefix: &[u8],
    values: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyList>> {
    let mut out: Vec<Bound<'py, PyBytes>> = Vec::with_capacity(values.len());
    let mut buf: Vec<u8> = Vec::with_capacity(prefix.len() + 64);
    for v in values.iter() {
        buf.clear();
        buf.extend_from_slice(prefix);
        write_str(&mut buf, &v)?;
        out.push(PyBytes::new(py, &buf));
    }
    PyList::new(py, out)
}

/// Makes instances of a dataclass whose `__init__` only sets its fields (frozen or not), from the
/// field values in order, without calling `__init__`: `Builder(cls, names)(*values)`.
#[pyclass(frozen, module = "reelbus_native")]
struct Builder {
    cls: Py<PyType>,
    names: Vec<Py<PyString>>,
    offsets: Option<Vec<isize>>,
}

#[pymethods]
impl Builder {
    #[new]
    fn new(py: Python<'_>, cls: &Bound<'_, PyType>, names: &Bound<'_, PyTuple>) -> PyResult<Self> {
        let names = names
            .iter()
            .map(|n| {
                let s: String = n.extract()?;
                Ok(PyString::intern(py, &s).unbind())
            })
            .collect::<PyResult<Vec<Py<PyString>>>>()?;
        let offsets = slot_offsets(cls, &names);
        Ok(Builder {
            cls: cls.clone().unbind(),
            names,
            offsets,
        })
    }

    #[pyo3(signature = (*values))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        values: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if values.len() != self.names.len() {
            return Err(PyTypeError::new_err(format!(
                "{} values for {} fields",
                values.len(),
                self.names.len()
            )));
        }
        self.make(py, values.iter())
    }
}

impl Builder {
    /// An instance from its field values in order (as many as there are fields).
    fn make<'py>(
        &self,
        py: Python<'py>,
        values: impl Iterator<Item = Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let made = alloc(self.cls.bind(py))?;
        if let Some(offsets) = &self.offsets {
            for (offset, value) in offsets.iter().zip(values) {
                set_slot(&made, *offset, &value);
            }
        } else {
            for (name, value) in self.names.iter().zip(values) {
                set_generic(&made, name.bind(py), &value)?;
            }
        }
        Ok(made)
    }
}

/// The current UTC time truncated to milliseconds (the events' `event_time` default): what
/// `datetime.now(UTC)` with its microseconds floored to milliseconds gives.
#[pyfunction]
fn now_ms(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("the clock is before 1970"))?;
    let utc = PyTzInfo::utc(py)?;
    make_datetime_in(py, since.as_millis() as i64, &utc)
}

#[pymodule]
fn reelbus_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Codec>()?;
    m.add_class::<Builder>()?;
    m.add_function(wrap_pyfunction!(uuid_texts, m)?)?;
    m.add_function(wrap_pyfunction!(encode_strings, m)?)?;
    m.add_function(wrap_pyfunction!(now_ms, m)?)?;
    m.add_function(wrap_pyfunction!(decode_framed_event, m)?)?;
    m.add_function(wrap_pyfunction!(decode_framed_string, m)?)?;
    m.add_class::<kafka::KafkaConsumer>()?;
    m.add_class::<kafka::Fetched>()?;
    m.add_class::<kafka::Headers>()?;
    m.add_class::<produce::KafkaProducer>()?;
    m.add_class::<produce::Delivery>()?;
    m.add("KafkaError", m.py().get_type::<kafka::KafkaError>())?;
    m.add("PLAN_VERSION", 2)?;
    Ok(())
}
