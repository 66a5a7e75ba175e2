//! A Kafka consumer for the bus consumer (`services/bus/consumer.py`), on librdkafka (built into this
//! extension by rdkafka-sys), that hands Python whole fetches without a Python object per record.
//!
//! confluent-kafka's `Consumer.consume()` builds a `Message` object per record (with its value, key
//! and topic as Python objects), and every accessor is a Python method call; `reelbus bench bus`
//! measured that alone at under half of Kafka's own `ConsumerPerformance`. Here a fetch is copied,
//! without the GIL, into one `Fetched` (an arena of bytes and a table of records), and the librdkafka
//! messages are destroyed at once. Python then asks `Fetched` for what it needs by index: a span
//! group's extent (`group_end`), a run of decoded `(event, record)` pairs (`decode_run`, through the
//! same native codecs as `Serde`), or, for the rare record the fast path refuses, its parts.
//!
//! The consumer is the subset of confluent-kafka's the bus uses: subscribe with rebalance callbacks
//! (called with the GIL from inside `fetch`/`close`, as confluent-kafka calls them), `fetch`,
//! synchronous `commit`, `committed`, watermarks and `close`. Its configuration is librdkafka's.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use pyo3::exceptions::{PyIndexError, PyRuntimeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple, PyType};

use rdkafka_sys as rd;
use rdkafka_sys::rd_kafka_resp_err_t as Err;

use crate::{Codec, Reader};

// Raised for what librdkafka refuses or reports (`KafkaError` in Python's terms).
pyo3::create_exception!(reelbus_native, KafkaError, pyo3::exceptions::PyException);

pub(crate) fn err_text(code: Err) -> String {
    unsafe { CStr::from_ptr(rd::rd_kafka_err2str(code)) }
        .to_string_lossy()
        .into_owned()
}

fn kafka_error(what: &str, code: Err) -> PyErr {
    KafkaError::new_err(format!("{what}: {} ({code:?})", err_text(code)))
}

/// A librdkafka object (handle, queue, partition list) handed to the threads that call into it
/// without the GIL (librdkafka is thread-safe).
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Shared<T> {}

impl<T> Shared<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

type Rk = Shared<rd::rd_kafka_t>;
type Queue = Shared<rd::rd_kafka_queue_t>;

/// The rebalance callbacks and what they raised (raised again from the `fetch` or `close` that ran
/// them, as confluent-kafka does).
#[derive(Default)]
struct Callbacks {
    on_assign: Mutex<Option<Py<PyAny>>>,
    on_revoke: Mutex<Option<Py<PyAny>>>,
    on_lost: Mutex<Option<Py<PyAny>>>,
    raised: Mutex<Option<PyErr>>,
}

/// `[(topic, partition), ...]` of a librdkafka partition list.
fn partitions_of<'py>(
    py: Python<'py>,
    list: *const rd::rd_kafka_topic_partition_list_t,
) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    if list.is_null() {
        return Ok(out);
    }
    let list = unsafe { &*list };
    for i in 0..list.cnt as usize {
        let p = unsafe { &*list.elems.add(i) };
        let topic = unsafe { CStr::from_ptr(p.topic) }.to_string_lossy();
        out.append((topic, p.partition))?;
    }
    Ok(out)
}

unsafe extern "C" fn rebalance_cb(
    rk: *mut rd::rd_kafka_t,
    err: Err,
    parts: *mut rd::rd_kafka_topic_partition_list_t,
    opaque: *mut c_void,
) {
    let callbacks = &*(opaque as *const Callbacks);
    let assigning = err == Err::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
    let lost = !assigning && rd::rd_kafka_assignment_lost(rk) != 0;
    Python::attach(|py| {
        let slot = if assigning {
            &callbacks.on_assign
        } else if lost {
            &callbacks.on_lost
        } else {
            &callbacks.on_revoke
        };
        let callback = slot.lock().unwrap().as_ref().map(|c| c.clone_ref(py));
        if let Some(callback) = callback {
            let called = partitions_of(py, parts).and_then(|list| callback.call1(py, (list,)));
            if let Err(raised) = called {
                callbacks.raised.lock().unwrap().get_or_insert(raised);
            }
        }
    });
    let protocol = CStr::from_ptr(rd::rd_kafka_rebalance_protocol(rk));
    if protocol.to_bytes() == b"COOPERATIVE" {
        let error = if assigning {
            rd::rd_kafka_incremental_assign(rk, parts)
        } else {
            rd::rd_kafka_incremental_unassign(rk, parts)
        };
        if !error.is_null() {
            rd::rd_kafka_error_destroy(error);
        }
    } else if assigning {
        rd::rd_kafka_assign(rk, parts);
    } else {
        rd::rd_kafka_assign(rk, ptr::null());
    }
}

/// A librdkafka value for a Python setting: `True`/`False` as `true`/`false`, anything else as `str()`.
fn setting(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = value.cast::<pyo3::types::PyBool>() {
        return Ok(if b.is_true() { "true" } else { "false" }.to_string());
    }
    Ok(value.str()?.to_string())
}

/// A librdkafka configuration from a dict of settings (the caller owns it: `rd_kafka_new` or destroy).
pub(crate) unsafe fn conf_of(config: &Bound<'_, PyDict>) -> PyResult<*mut rd::rd_kafka_conf_t> {
    let conf = rd::rd_kafka_conf_new();
    let mut errstr = [0 as c_char; 512];
    for (name, value) in config.iter() {
        let set = (|| -> PyResult<()> {
            let name: String = name.extract()?;
            let value = setting(&value)?;
            let nul = |_| PyValueError::new_err("a NUL in a setting");
            let (n, v) = (
                CString::new(name.as_str()).map_err(nul)?,
                CString::new(value).map_err(nul)?,
            );
            let res = rd::rd_kafka_conf_set(
                conf,
                n.as_ptr(),
                v.as_ptr(),
                errstr.as_mut_ptr(),
                errstr.len(),
            );
            if res != rd::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK {
                let text = CStr::from_ptr(errstr.as_ptr()).to_string_lossy();
                return Err(KafkaError::new_err(format!("setting {name}: {text}")));
            }
            Ok(())
        })();
        if let Err(e) = set {
            rd::rd_kafka_conf_destroy(conf);
            return Err(e);
        }
    }
    Ok(conf)
}

/// `rd_kafka_new` of `kind` with `conf` (destroyed here if that fails; librdkafka's otherwise).
pub(crate) unsafe fn client(
    kind: rd::rd_kafka_type_t,
    conf: *mut rd::rd_kafka_conf_t,
) -> PyResult<*mut rd::rd_kafka_t> {
    let mut errstr = [0 as c_char; 512];
    let rk = rd::rd_kafka_new(kind, conf, errstr.as_mut_ptr(), errstr.len());
    if rk.is_null() {
        rd::rd_kafka_conf_destroy(conf);
        let text = CStr::from_ptr(errstr.as_ptr()).to_string_lossy();
        return Err(KafkaError::new_err(format!(
            "cannot create the {kind:?} client: {text}"
        )));
    }
    Ok(rk)
}

#[pyclass(frozen, module = "reelbus_native")]
pub struct KafkaConsumer {
    rk: Rk,
    queue: Queue,
    callbacks: *mut Callbacks,
    closed: AtomicBool,
}

unsafe impl Send for KafkaConsumer {}
unsafe impl Sync for KafkaConsumer {}

impl KafkaConsumer {
    fn open(&self) -> PyResult<Rk> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err("the consumer is closed"));
        }
        Ok(self.rk)
    }

    fn reraise(&self) -> PyResult<()> {
        match unsafe { &*self.callbacks }.raised.lock().unwrap().take() {
            Some(raised) => Err(raised),
            None => Ok(()),
        }
    }
}

/// A partition list of `(topic, partition, offset)` for librdkafka (destroyed by the caller).
fn partition_list(
    items: &[(String, i32, i64)],
) -> PyResult<*mut rd::rd_kafka_topic_partition_list_t> {
    let list = unsafe { rd::rd_kafka_topic_partition_list_new(items.len() as c_int) };
    for (topic, partition, offset) in items {
        let name =
            CString::new(topic.as_str()).map_err(|_| PyValueError::new_err("a NUL in a topic"))?;
        unsafe {
            let p = rd::rd_kafka_topic_partition_list_add(list, name.as_ptr(), *partition);
            (*p).offset = *offset;
        }
    }
    Ok(list)
}

#[pymethods]
impl KafkaConsumer {
    /// A consumer with librdkafka's `config` (a dict of settings; `group.id` is required).
    #[new]
    fn new(config: &Bound<'_, PyDict>) -> PyResult<Self> {
        let callbacks = Box::into_raw(Box::<Callbacks>::default());
        let made = unsafe {
            let conf = match conf_of(config) {
                Ok(conf) => conf,
                Err(e) => {
                    drop(Box::from_raw(callbacks));
                    return Err(e);
                }
            };
            rd::rd_kafka_conf_set_opaque(conf, callbacks as *mut c_void);
            rd::rd_kafka_conf_set_rebalance_cb(conf, Some(rebalance_cb));
            let rk = match client(rd::rd_kafka_type_t::RD_KAFKA_CONSUMER, conf) {
                Ok(rk) => rk,
                Err(e) => {
                    drop(Box::from_raw(callbacks));
                    return Err(e);
                }
            };
            rd::rd_kafka_poll_set_consumer(rk);
            (rk, rd::rd_kafka_queue_get_consumer(rk))
        };
        Ok(KafkaConsumer {
            rk: Shared(made.0),
            queue: Shared(made.1),
            callbacks,
            closed: AtomicBool::new(false),
        })
    }

    /// Subscribe to `topics`; each callback gets `[(topic, partition), ...]`.
    #[pyo3(signature = (topics, on_assign=None, on_revoke=None, on_lost=None))]
    fn subscribe(
        &self,
        topics: Vec<String>,
        on_assign: Option<Py<PyAny>>,
        on_revoke: Option<Py<PyAny>>,
        on_lost: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let rk = self.open()?;
        let callbacks = unsafe { &*self.callbacks };
        *callbacks.on_assign.lock().unwrap() = on_assign;
        *callbacks.on_lost.lock().unwrap() = on_lost.or_else(|| {
            Python::attach(|py| {
                callbacks
                    .on_revoke
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|c| c.clone_ref(py))
            })
        });
        *callbacks.on_revoke.lock().unwrap() = on_revoke;
        let list = partition_list(
            &topics
                .iter()
                .map(|t| (t.clone(), -1, rd::RD_KAFKA_OFFSET_INVALID as i64))
                .collect::<Vec<_>>(),
        )?;
        let code = unsafe { rd::rd_kafka_subscribe(rk.get(), list) };
        unsafe { rd::rd_kafka_topic_partition_list_destroy(list) };
        if code != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(kafka_error("subscribe", code));
        }
        Ok(())
    }

    /// Wait up to `timeout` seconds for a record, then take what else librdkafka has already
    /// fetched, up to `max` records in all. Rebalance callbacks run in here.
    fn fetch(&self, py: Python<'_>, max: usize, timeout: f64) -> PyResult<Fetched> {
        let rk = self.open()?;
        let queue = self.queue;
        let max = max.max(1);
        let timeout_ms = (timeout.max(0.0) * 1000.0).round() as c_int;
        let taken = py.detach(move || {
            let mut fetched = Fill::default();
            let mut msgs: Vec<*mut rd::rd_kafka_message_t> = vec![ptr::null_mut(); max];
            let first = unsafe {
                rd::rd_kafka_consume_batch_queue(queue.get(), timeout_ms, msgs.as_mut_ptr(), 1)
            };
            if first < 0 {
                return Err(unsafe { rd::rd_kafka_last_error() });
            }
            let mut n = first as usize;
            if n == 1 && max > 1 {
                let rest = unsafe {
                    rd::rd_kafka_consume_batch_queue(
                        queue.get(),
                        0,
                        msgs.as_mut_ptr().add(1),
                        max - 1,
                    )
                };
                if rest > 0 {
                    n += rest as usize;
                }
            }
            for &m in &msgs[..n] {
                unsafe {
                    fetched.copy(rk, &*m);
                    rd::rd_kafka_message_destroy(m);
                }
            }
            Ok(fetched)
        });
        self.reraise()?;
        match taken {
            Ok(fill) => Ok(fill.into_fetched()),
            Err(code) => Err(kafka_error("fetch", code)),
        }
    }

    /// Commit `[(topic, partition, next_offset), ...]` and wait for the broker's answer.
    fn commit(&self, py: Python<'_>, offsets: Vec<(String, i32, i64)>) -> PyResult<()> {
        let rk = self.open()?;
        if offsets.is_empty() {
            return Ok(());
        }
        let list = Shared(partition_list(&offsets)?);
        let code = py.detach(move || {
            let list = list;
            let code = unsafe { rd::rd_kafka_commit(rk.get(), list.get(), 0) };
            let mut failed = Err::RD_KAFKA_RESP_ERR_NO_ERROR;
            if code == Err::RD_KAFKA_RESP_ERR_NO_ERROR {
                let l = unsafe { &*list.get() };
                for i in 0..l.cnt as usize {
                    let e = unsafe { (*l.elems.add(i)).err };
                    if e != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
                        failed = e;
                    }
                }
            }
            unsafe { rd::rd_kafka_topic_partition_list_destroy(list.get()) };
            if code != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
                code
            } else {
                failed
            }
        });
        self.reraise()?;
        if code != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(kafka_error("commit", code));
        }
        Ok(())
    }

    /// The group's committed offsets of `[(topic, partition), ...]`: `[(topic, partition, offset)]`,
    /// with a negative offset where nothing is committed.
    fn committed(
        &self,
        py: Python<'_>,
        partitions: Vec<(String, i32)>,
        timeout: f64,
    ) -> PyResult<Vec<(String, i32, i64)>> {
        let rk = self.open()?;
        let items: Vec<(String, i32, i64)> = partitions
            .into_iter()
            .map(|(t, p)| (t, p, rd::RD_KAFKA_OFFSET_INVALID as i64))
            .collect();
        let list = Shared(partition_list(&items)?);
        let timeout_ms = (timeout * 1000.0) as c_int;
        let code = py.detach(move || {
            let list = list;
            unsafe { rd::rd_kafka_committed(rk.get(), list.get(), timeout_ms) }
        });
        let mut out = Vec::with_capacity(items.len());
        let l = unsafe { &*list.get() };
        for i in 0..l.cnt as usize {
            let p = unsafe { &*l.elems.add(i) };
            let topic = unsafe { CStr::from_ptr(p.topic) }
                .to_string_lossy()
                .into_owned();
            out.push((topic, p.partition, p.offset));
        }
        unsafe { rd::rd_kafka_topic_partition_list_destroy(list.get()) };
        if code != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(kafka_error("committed", code));
        }
        Ok(out)
    }

    /// `(low, high)` watermarks of a partition: the ones librdkafka learnt from its fetches when
    /// `cached` (negative when unknown), else asked of the broker.
    #[pyo3(signature = (topic, partition, cached=true, timeout=5.0))]
    fn watermarks(
        &self,
        py: Python<'_>,
        topic: &str,
        partition: i32,
        cached: bool,
        timeout: f64,
    ) -> PyResult<(i64, i64)> {
        let rk = self.open()?;
        let name = CString::new(topic).map_err(|_| PyValueError::new_err("a NUL in a topic"))?;
        let timeout_ms = (timeout * 1000.0) as c_int;
        let (code, low, high) = py.detach(move || {
            let (mut low, mut high) = (-1i64, -1i64);
            let code = unsafe {
                if cached {
                    rd::rd_kafka_get_watermark_offsets(
                        rk.get(),
                        name.as_ptr(),
                        partition,
                        &mut low,
                        &mut high,
                    )
                } else {
                    rd::rd_kafka_query_watermark_offsets(
                        rk.get(),
                        name.as_ptr(),
                        partition,
                        &mut low,
                        &mut high,
                        timeout_ms,
                    )
                }
            };
            (code, low, high)
        });
        if code != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(kafka_error("watermarks", code));
        }
        Ok((low, high))
    }

    /// Leave the group (the revoke callback runs in here) and stop; once only.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let rk = self.rk;
        let code = py.detach(move || unsafe { rd::rd_kafka_consumer_close(rk.get()) });
        self.reraise()?;
        if code != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(kafka_error("close", code));
        }
        Ok(())
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        unsafe {
            if !self.closed.swap(true, Ordering::AcqRel) {
                rd::rd_kafka_consumer_close(self.rk.get());
            }
            rd::rd_kafka_queue_destroy(self.queue.get());
            rd::rd_kafka_destroy(self.rk.get());
            drop(Box::from_raw(self.callbacks));
        }
    }
}

// --- a fetch -----------------------------------------------------------------------------------

type Span = (u32, u32); // start, end in the arena

struct Rec {
    topic: u32,
    partition: i32,
    offset: i64,
    timestamp: i64,
    key: Option<Span>,
    value: Option<Span>,
    headers: (u32, u32), // range in `headers`
    error: Option<Box<(String, bool)>>,
}

struct Header {
    name: u32, // index in `names`
    value: Option<Span>,
}

/// A fetch being copied out of librdkafka's messages (no GIL).
#[derive(Default)]
struct Fill {
    recs: Vec<Rec>,
    headers: Vec<Header>,
    arena: Vec<u8>,
    topics: Vec<(usize, String)>, // rd_kafka_topic_t address, name
    names: Vec<String>,
    name_index: HashMap<Vec<u8>, u32>,
}

impl Fill {
    fn put(&mut self, ptr: *const c_void, len: usize) -> Option<Span> {
        if ptr.is_null() {
            return None;
        }
        let start = self.arena.len();
        self.arena
            .extend_from_slice(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) });
        Some((start as u32, self.arena.len() as u32))
    }

    unsafe fn copy(&mut self, rk: Rk, m: &rd::rd_kafka_message_t) {
        let topic = if m.rkt.is_null() {
            u32::MAX
        } else {
            let address = m.rkt as usize;
            match self.topics.iter().position(|(a, _)| *a == address) {
                Some(i) => i as u32,
                None => {
                    let name = CStr::from_ptr(rd::rd_kafka_topic_name(m.rkt))
                        .to_string_lossy()
                        .into_owned();
                    self.topics.push((address, name));
                    (self.topics.len() - 1) as u32
                }
            }
        };
        if m.err != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            let text = CStr::from_ptr(rd::rd_kafka_message_errstr(m))
                .to_string_lossy()
                .into_owned();
            let fatal = m.err == Err::RD_KAFKA_RESP_ERR__FATAL
                || rd::rd_kafka_fatal_error(rk.get(), ptr::null_mut(), 0)
                    != Err::RD_KAFKA_RESP_ERR_NO_ERROR;
            let hstart = self.headers.len() as u32;
            self.recs.push(Rec {
                topic,
                partition: m.partition,
                offset: m.offset,
                timestamp: -1,
                key: None,
                value: None,
                headers: (hstart, hstart),
                error: Some(Box::new((format!("{text} ({:?})", m.err), fatal))),
            });
            return;
        }
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        let timestamp = rd::rd_kafka_message_timestamp(m, &mut kind);
        let key = self.put(m.key, m.key_len);
        let value = self.put(m.payload, m.len);
        let hstart = self.headers.len() as u32;
        let mut hdrs: *mut rd::rd_kafka_headers_t = ptr::null_mut();
        if rd::rd_kafka_message_headers(m, &mut hdrs) == Err::RD_KAFKA_RESP_ERR_NO_ERROR
            && !hdrs.is_null()
        {
            let mut idx = 0usize;
            loop {
                let (mut name, mut val, mut size) =
                    (ptr::null::<c_char>(), ptr::null::<c_void>(), 0usize);
                if rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut val, &mut size)
                    != Err::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    break;
                }
                let bytes = CStr::from_ptr(name).to_bytes();
                let name = match self.name_index.get(bytes) {
                    Some(&i) => i,
                    None => {
                        self.names.push(String::from_utf8_lossy(bytes).into_owned());
                        let i = (self.names.len() - 1) as u32;
                        self.name_index.insert(bytes.to_vec(), i);
                        i
                    }
                };
                let value = self.put(val, size);
                self.headers.push(Header { name, value });
                idx += 1;
            }
        }
        self.recs.push(Rec {
            topic,
            partition: m.partition,
            offset: m.offset,
            timestamp,
            key,
            value,
            headers: (hstart, self.headers.len() as u32),
            error: None,
        });
    }

    fn into_fetched(self) -> Fetched {
        Fetched {
            recs: self.recs,
            headers: self.headers,
            arena: self.arena,
            topics: self
                .topics
                .into_iter()
                .map(|(_, n)| (n, OnceLock::new()))
                .collect(),
            names: self
                .names
                .into_iter()
                .map(|n| (n, OnceLock::new()))
                .collect(),
        }
    }
}

/// The records of one fetch, by index (module doc).
#[pyclass(frozen, module = "reelbus_native")]
pub struct Fetched {
    recs: Vec<Rec>,
    headers: Vec<Header>,
    arena: Vec<u8>,
    topics: Vec<(String, OnceLock<Py<PyString>>)>,
    names: Vec<(String, OnceLock<Py<PyString>>)>,
}

fn cached_str<'py>(
    py: Python<'py>,
    slot: &(String, OnceLock<Py<PyString>>),
) -> Bound<'py, PyString> {
    slot.1
        .get_or_init(|| PyString::intern(py, &slot.0).unbind())
        .bind(py)
        .clone()
}

impl Fetched {
    fn rec(&self, i: usize) -> PyResult<&Rec> {
        self.recs
            .get(i)
            .ok_or_else(|| PyIndexError::new_err("no such record in the fetch"))
    }

    fn bytes(&self, span: Span) -> &[u8] {
        &self.arena[span.0 as usize..span.1 as usize]
    }

    fn topic_str<'py>(&self, py: Python<'py>, rec: &Rec) -> Bound<'py, PyString> {
        match self.topics.get(rec.topic as usize) {
            Some(slot) => cached_str(py, slot),
            None => PyString::intern(py, ""),
        }
    }

    fn headers_list<'py>(&self, py: Python<'py>, rec: &Rec) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for h in &self.headers[rec.headers.0 as usize..rec.headers.1 as usize] {
            let name = cached_str(py, &self.names[h.name as usize]);
            let value = match h.value {
                Some(span) => PyBytes::new(py, self.bytes(span)).into_any(),
                None => py.None().into_bound(py),
            };
            out.append(PyTuple::new(py, [name.into_any(), value])?)?;
        }
        Ok(out)
    }

    /// The trace-context headers of a record: `(name index, value)` of those named in `fields`.
    fn trace_key<'a>(&'a self, rec: &Rec, fields: &[u32]) -> Vec<(u32, Option<&'a [u8]>)> {
        self.headers[rec.headers.0 as usize..rec.headers.1 as usize]
            .iter()
            .filter(|h| fields.contains(&h.name))
            .map(|h| (h.name, h.value.map(|s| self.bytes(s))))
            .collect()
    }

    fn optional_bytes<'py>(&self, py: Python<'py>, span: Option<Span>) -> Bound<'py, PyAny> {
        match span {
            Some(s) => PyBytes::new(py, self.bytes(s)).into_any(),
            None => py.None().into_bound(py),
        }
    }
}

#[pymethods]
impl Fetched {
    /// A fetch made from Python (for tests): `records` are `(topic, partition, offset, key, value,
    /// headers, timestamp)`, or `(topic, partition, offset, error, fatal)` for an error.
    #[classmethod]
    fn of(_cls: &Bound<'_, PyType>, records: &Bound<'_, PyList>) -> PyResult<Fetched> {
        let mut fill = Fill::default();
        for item in records.iter() {
            let item = item.cast::<PyTuple>()?;
            let topic: String = item.get_item(0)?.extract()?;
            let index = match fill.topics.iter().position(|(_, n)| *n == topic) {
                Some(i) => i as u32,
                None => {
                    fill.topics.push((fill.topics.len() + 1, topic));
                    (fill.topics.len() - 1) as u32
                }
            };
            let partition: i32 = item.get_item(1)?.extract()?;
            let offset: i64 = item.get_item(2)?.extract()?;
            let hstart = fill.headers.len() as u32;
            if item.len() == 5 {
                let (text, fatal): (String, bool) =
                    (item.get_item(3)?.extract()?, item.get_item(4)?.extract()?);
                fill.recs.push(Rec {
                    topic: index,
                    partition,
                    offset,
                    timestamp: -1,
                    key: None,
                    value: None,
                    headers: (hstart, hstart),
                    error: Some(Box::new((text, fatal))),
                });
                continue;
            }
            let key: Option<Vec<u8>> = item.get_item(3)?.extract()?;
            let value: Option<Vec<u8>> = item.get_item(4)?.extract()?;
            let headers: Vec<(String, Option<Vec<u8>>)> = item.get_item(5)?.extract()?;
            let timestamp: i64 = item.get_item(6)?.extract()?;
            let key = key.map(|k| fill.put(k.as_ptr() as *const c_void, k.len()).unwrap());
            let value = value.map(|v| fill.put(v.as_ptr() as *const c_void, v.len()).unwrap());
            for (name, value) in headers {
                let n = match fill.name_index.get(name.as_bytes()) {
                    Some(&i) => i,
                    None => {
                        fill.names.push(name.clone());
                        let i = (fill.names.len() - 1) as u32;
                        fill.name_index.insert(name.into_bytes(), i);
                        i
                    }
                };
                let value = value.map(|v| fill.put(v.as_ptr() as *const c_void, v.len()).unwrap());
                fill.headers.push(Header { name: n, value });
            }
            fill.recs.push(Rec {
                topic: index,
                partition,
                offset,
                timestamp,
                key,
                value,
                headers: (hstart, fill.headers.len() as u32),
                error: None,
            });
        }
        Ok(fill.into_fetched())
    }

    fn __len__(&self) -> usize {
        self.recs.len()
    }

    /// `(text, fatal)` when the record is an error librdkafka reported, else None.
    fn error(&self, i: usize) -> PyResult<Option<(String, bool)>> {
        Ok(self.rec(i)?.error.as_ref().map(|e| (e.0.clone(), e.1)))
    }

    fn topic<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyString>> {
        Ok(self.topic_str(py, self.rec(i)?))
    }

    fn partition(&self, i: usize) -> PyResult<i32> {
        Ok(self.rec(i)?.partition)
    }

    fn offset(&self, i: usize) -> PyResult<i64> {
        Ok(self.rec(i)?.offset)
    }

    fn timestamp(&self, i: usize) -> PyResult<i64> {
        Ok(self.rec(i)?.timestamp)
    }

    fn key<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.optional_bytes(py, self.rec(i)?.key))
    }

    fn value<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.optional_bytes(py, self.rec(i)?.value))
    }

    /// `[(name, value), ...]`, value bytes or None.
    fn headers<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyList>> {
        self.headers_list(py, self.rec(i)?)
    }

    /// The end of the span group that starts at record `start` (which is not an error): the
    /// following records of the same topic and partition, not errors, whose headers named in
    /// `fields` (the trace context) are those of `start`, in the same order.
    fn group_end(&self, start: usize, fields: Vec<String>) -> PyResult<usize> {
        let first = self.rec(start)?;
        let wanted: Vec<u32> = self
            .names
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| fields.iter().any(|f| f == n))
            .map(|(i, _)| i as u32)
            .collect();
        let key = self.trace_key(first, &wanted);
        let mut end = start + 1;
        while let Some(rec) = self.recs.get(end) {
            if rec.error.is_some()
                || rec.topic != first.topic
                || rec.partition != first.partition
                || self.trace_key(rec, &wanted) != key
            {
                break;
            }
            end += 1;
        }
        Ok(end)
    }

    /// The consumer's common case: from `start` on (before `end`), the records whose value is a
    /// framed event whose schema id `readers` (the serde's) holds with a native codec, of a type in
    /// `allowed` (None: any), all of the first one's type, and whose key is None or a framed string:
    /// `(pairs, stop)` with `pairs` the `(event, make_record(topic, partition, offset, key, headers,
    /// timestamp))` and `stop` the first record not taken (the caller's usual path takes it).
    #[allow(clippy::too_many_arguments)]
    fn decode_run<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
        start: usize,
        end: usize,
        readers: &Bound<'py, PyDict>,
        allowed: &Bound<'py, PyAny>,
        make_record: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyList>, usize)> {
        let this = slf.get();
        let pairs = PyList::empty(py);
        // Records built natively when `make_record` is the Builder of a six-field class (it is).
        let builder = make_record
            .cast::<crate::Builder>()
            .ok()
            .filter(|b| b.get().names.len() == 6);
        let mut kind: Option<Bound<'py, PyType>> = None;
        let mut allowed_reader: Option<Bound<'py, PyAny>> = None; // the reader already checked
        let mut i = start;
        let end = end.min(this.recs.len());
        while i < end {
            let rec = &this.recs[i];
            if rec.error.is_some() {
                break;
            }
            let Some(value) = rec.value else { break };
            let data = this.bytes(value);
            let Ok(reader) = crate::reader_of(py, data, readers) else {
                break;
            };
            if allowed_reader.as_ref().is_none_or(|r| !r.is(&reader)) {
                let Ok(native) = reader.getattr(pyo3::intern!(py, "native")) else {
                    break;
                };
                if native.cast::<Codec>().is_err() {
                    break;
                }
                if !allowed.is_none() {
                    let fullname = reader.getattr(pyo3::intern!(py, "fullname"))?;
                    if !allowed.contains(fullname)? {
                        break;
                    }
                }
                allowed_reader = Some(reader.clone());
            }
            let native = reader.getattr(pyo3::intern!(py, "native"))?;
            let codec = native.cast::<Codec>()?.get();
            let mut r = Reader { data, pos: 5 };
            let Ok(event) = codec.node.read(&codec.ctx, py, &mut r) else {
                break;
            };
            match &kind {
                None => kind = Some(event.get_type()),
                Some(k) if !event.get_type().is(k) => break,
                Some(_) => {}
            }
            let key = match rec.key {
                None => py.None().into_bound(py),
                Some(span) => match crate::framed_string(py, this.bytes(span), readers) {
                    Ok(k) => k,
                    Err(_) => break,
                },
            };
            let headers = Bound::new(
                py,
                Headers {
                    fetch: slf.clone().unbind(),
                    index: i,
                },
            )?;
            let values: [Bound<'py, PyAny>; 6] = [
                this.topic_str(py, rec).into_any(),
                rec.partition.into_pyobject(py)?.into_any(),
                rec.offset.into_pyobject(py)?.into_any(),
                key,
                headers.into_any(),
                rec.timestamp.into_pyobject(py)?.into_any(),
            ];
            let record = match &builder {
                Some(b) => b.get().make(py, values.into_iter())?,
                None => make_record.call1(PyTuple::new(py, values)?)?,
            };
            // A record holds strings, ints and its headers (no container of Python objects): never
            // in a cycle, so the cyclic GC need not track it (nor the pair, which only it and the
            // event, which never refers back, are in).
            if unsafe { (*ffi::Py_TYPE(record.as_ptr())).tp_dictoffset } == 0 {
                crate::untrack(&record);
            }
            let pair = PyTuple::new(py, [event, record])?;
            crate::untrack(pair.as_any());
            pairs.append(pair)?;
            i += 1;
        }
        Ok((pairs, i))
    }
}

/// The headers of one fetched record, read from the fetch when asked: a sequence of `(name, value)`
/// (what confluent-kafka's `Message.headers()` gives), built only for a handler that reads them.
/// It keeps its fetch alive.
#[pyclass(frozen, sequence, module = "reelbus_native")]
pub struct Headers {
    fetch: Py<Fetched>,
    index: usize,
}

impl Headers {
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let fetch = self.fetch.get();
        fetch.headers_list(py, fetch.rec(self.index)?)
    }
}

#[pymethods]
impl Headers {
    fn __len__(&self) -> PyResult<usize> {
        let rec = self.fetch.get().rec(self.index)?;
        Ok((rec.headers.1 - rec.headers.0) as usize)
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.list(py)?.as_any().get_item(index)
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.list(py)?.as_any().try_iter()?.into_any())
    }

    fn __eq__<'py>(&self, py: Python<'py>, other: &Bound<'py, PyAny>) -> PyResult<bool> {
        let mine = self.list(py)?;
        if let Ok(other) = other.cast::<Headers>() {
            return mine.eq(other.get().list(py)?);
        }
        if other.cast::<PyList>().is_ok() || other.cast::<PyTuple>().is_ok() {
            return mine.eq(PyList::new(
                py,
                other.try_iter()?.collect::<PyResult<Vec<_>>>()?,
            )?);
        }
        Ok(false)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Headers({})", self.list(py)?.repr()?))
    }
}
