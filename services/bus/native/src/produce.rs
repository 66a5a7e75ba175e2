//! A Kafka producer for the bus producer (`services/bus/producer.py`), on the same librdkafka as the
//! consumer (`kafka.rs`): records are queued without a Python call per record, and their delivery
//! reports are counted on a thread of its own without the GIL, so Python hears once per batch.
//!
//! confluent-kafka's `Producer.produce()` parses keyword arguments and converts the headers on every
//! call, and every delivery report comes back as a `Message` object and a Python call on the polling
//! thread, fighting the event loop for the GIL. Here a `Delivery` (one per batch, or per record sent
//! alone) counts its records down; the last report calls its `done(errors, partition, offset)` once.

use std::ffi::{CStr, CString};
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use rdkafka_sys as rd;
use rdkafka_sys::rd_kafka_resp_err_t as Err;

use crate::kafka::{err_text, KafkaError};

/// The librdkafka handle, destroyed when the producer and its delivery thread are both done with it.
struct Handle(*mut rd::rd_kafka_t);
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Handle {
    fn get(&self) -> *mut rd::rd_kafka_t {
        self.0
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        unsafe { rd::rd_kafka_destroy(self.0) };
    }
}

struct Counter {
    remaining: AtomicUsize,
    errors: Mutex<Vec<String>>,
    last: Mutex<(i32, i64)>,
    done: Py<PyAny>,
}

impl Counter {
    /// One record settled (delivered, or `error`); the last one calls `done`.
    fn settle(&self, error: Option<String>, partition: i32, offset: i64) {
        if let Some(e) = error {
            self.errors.lock().unwrap().push(e);
        } else {
            *self.last.lock().unwrap() = (partition, offset);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
                return; // the interpreter is gone (a producer never closed): nobody waits
            }
            let errors = std::mem::take(&mut *self.errors.lock().unwrap());
            let (partition, offset) = *self.last.lock().unwrap();
            Python::attach(|py| {
                if let Err(e) = self.done.call1(py, (errors, partition, offset)) {
                    e.write_unraisable(py, Some(self.done.bind(py)));
                }
            });
        }
    }
}

/// The deliveries of `total` records: `done(errors, partition, offset)` is called once, when the last
/// one is settled (from librdkafka's reports, or `failed`), with the reasons of those that were not
/// delivered and the partition and offset of the last one that was.
#[pyclass(frozen, module = "reelbus_native")]
pub struct Delivery {
    counter: Arc<Counter>,
}

#[pymethods]
impl Delivery {
    #[new]
    fn new(total: usize, done: Py<PyAny>) -> PyResult<Self> {
        if total == 0 {
            return Err(PyValueError::new_err("a delivery of no records"));
        }
        Ok(Delivery {
            counter: Arc::new(Counter {
                remaining: AtomicUsize::new(total),
                errors: Mutex::new(Vec::new()),
                last: Mutex::new((-1, -1)),
                done,
            }),
        })
    }

    /// `n` records that will never be delivered (they could not be queued), for `reason`.
    fn failed(&self, py: Python<'_>, reason: String, n: usize) {
        let counter = self.counter.clone();
        py.detach(move || {
            for _ in 0..n {
                counter.settle(Some(reason.clone()), -1, -1);
            }
        });
    }
}

unsafe extern "C" fn delivered_cb(
    _rk: *mut rd::rd_kafka_t,
    m: *const rd::rd_kafka_message_t,
    _opaque: *mut c_void,
) {
    let m = &*m;
    if m._private.is_null() {
        return;
    }
    let counter = Arc::from_raw(m._private as *const Counter);
    let error = if m.err != Err::RD_KAFKA_RESP_ERR_NO_ERROR {
        let topic = if m.rkt.is_null() {
            String::new()
        } else {
            CStr::from_ptr(rd::rd_kafka_topic_name(m.rkt))
                .to_string_lossy()
                .into_owned()
        };
        Some(format!("delivery to {topic} failed: {}", err_text(m.err)))
    } else {
        None
    };
    counter.settle(error, m.partition, m.offset);
}

/// One record's parts, borrowed from Python objects for one `rd_kafka_producev` call.
struct Out<'a> {
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
}

fn optional_bytes<'a>(v: &'a Bound<'_, PyAny>) -> PyResult<Option<&'a [u8]>> {
    if v.is_none() {
        return Ok(None);
    }
    Ok(Some(v.cast::<PyBytes>()?.as_bytes()))
}

/// `(name, value)` pairs (value bytes, str or None) as librdkafka headers (owned by the caller until
/// produced).
fn headers_of(items: &[(CString, Option<Vec<u8>>)]) -> *mut rd::rd_kafka_headers_t {
    unsafe {
        let hdrs = rd::rd_kafka_headers_new(items.len());
        for (name, value) in items {
            let (ptr, len) = match value {
                Some(v) => (v.as_ptr() as *const c_void, v.len() as isize),
                None => (ptr::null(), 0),
            };
            rd::rd_kafka_header_add(hdrs, name.as_ptr(), -1, ptr, len);
        }
        hdrs
    }
}

fn header_pairs(list: &Bound<'_, PyList>) -> PyResult<Vec<(CString, Option<Vec<u8>>)>> {
    let mut out = Vec::with_capacity(list.len());
    for item in list.iter() {
        let pair = item.cast::<PyTuple>()?;
        let name: String = pair.get_item(0)?.extract()?;
        let value = pair.get_item(1)?;
        let value = if value.is_none() {
            None
        } else if let Ok(s) = value.cast::<PyString>() {
            Some(s.to_str()?.as_bytes().to_vec())
        } else {
            Some(value.cast::<PyBytes>()?.as_bytes().to_vec())
        };
        out.push((
            CString::new(name).map_err(|_| PyValueError::new_err("a NUL in a header name"))?,
            value,
        ));
    }
    Ok(out)
}

#[pyclass(frozen, module = "reelbus_native")]
pub struct KafkaProducer {
    rk: Arc<Handle>,
    closing: Arc<AtomicBool>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

impl KafkaProducer {
    /// Queue one record; Ok(false) when librdkafka's queue is full (nothing queued).
    fn queue(
        &self,
        topic: &CStr,
        out: Out<'_>,
        headers: *mut rd::rd_kafka_headers_t,
        counter: &Arc<Counter>,
    ) -> Result<bool, Err> {
        let opaque = Arc::into_raw(counter.clone()) as *mut c_void;
        let (kptr, klen) = out.key.map_or((ptr::null(), 0), |k| (k.as_ptr(), k.len()));
        let (vptr, vlen) = out
            .value
            .map_or((ptr::null(), 0), |v| (v.as_ptr(), v.len()));
        let code = unsafe {
            rd::rd_kafka_producev(
                self.rk.get(),
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
                topic.as_ptr(),
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_MSGFLAGS,
                rd::RD_KAFKA_MSG_F_COPY as c_int,
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY,
                kptr as *const c_void,
                klen,
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE,
                vptr as *mut c_void,
                vlen,
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADERS,
                headers,
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_OPAQUE,
                opaque,
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_END,
            )
        };
        if code == Err::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Ok(true); // librdkafka owns the headers now
        }
        unsafe {
            drop(Arc::from_raw(opaque as *const Counter));
            rd::rd_kafka_headers_destroy(headers);
        }
        if code == Err::RD_KAFKA_RESP_ERR__QUEUE_FULL {
            return Ok(false);
        }
        Err(code)
    }

    fn open(&self) -> PyResult<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(PyRuntimeError::new_err("the producer is closed"));
        }
        Ok(())
    }
}

fn topic_name(topic: &str) -> PyResult<CString> {
    CString::new(topic).map_err(|_| PyValueError::new_err("a NUL in a topic"))
}

#[pymethods]
impl KafkaProducer {
    /// A producer with librdkafka's `config`; a thread of its own serves the delivery reports.
    #[new]
    fn new(config: &Bound<'_, PyDict>) -> PyResult<Self> {
        let rk = unsafe {
            let conf = crate::kafka::conf_of(config)?;
            rd::rd_kafka_conf_set_dr_msg_cb(conf, Some(delivered_cb));
            let rk = crate::kafka::client(rd::rd_kafka_type_t::RD_KAFKA_PRODUCER, conf)?;
            Arc::new(Handle(rk))
        };
        let closing = Arc::new(AtomicBool::new(false));
        let stop = closing.clone();
        let polled = rk.clone();
        let poller = std::thread::Builder::new()
            .name("reelbus-deliveries".into())
            .spawn(move || {
                let rk = polled;
                while !stop.load(Ordering::Acquire) {
                    unsafe { rd::rd_kafka_poll(rk.get(), 100) };
                }
            })
            .map_err(|e| {
                PyRuntimeError::new_err(format!("cannot start the delivery thread: {e}"))
            })?;
        Ok(KafkaProducer {
            rk,
            closing,
            poller: Mutex::new(Some(poller)),
        })
    }

    /// Queue one record for `delivery`; False when librdkafka's queue is full (nothing queued: try
    /// again once it drains). Raises KafkaError for anything else.
    fn produce(
        &self,
        topic: &str,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyList>,
        delivery: &Delivery,
    ) -> PyResult<bool> {
        self.open()?;
        let name = topic_name(topic)?;
        let hdrs = headers_of(&header_pairs(headers)?);
        let out = Out {
            key: optional_bytes(key)?,
            value: optional_bytes(value)?,
        };
        self.queue(&name, out, hdrs, &delivery.counter)
            .map_err(|code| {
                KafkaError::new_err(format!("cannot produce to {topic}: {}", err_text(code)))
            })
    }

    /// Queue records `start`, `start + 1`, ... of a batch to `topic` for `delivery`: record `i` is
    /// `keys[i]`, `values[i]` with the headers `heads[i]` (or `heads[0]` for all, when it has one
    /// item), then `(id_name, ids[i])`, then `tail`. Returns the index of the first record not queued
    /// (librdkafka's queue is full: queue the rest once it drains), or `len(values)`. A record that
    /// cannot be queued for another reason is settled as failed.
    #[allow(clippy::too_many_arguments)]
    fn produce_batch(
        &self,
        py: Python<'_>,
        topic: &str,
        keys: &Bound<'_, PyList>,
        values: &Bound<'_, PyList>,
        heads: &Bound<'_, PyList>,
        id_name: &str,
        ids: &Bound<'_, PyList>,
        tail: &Bound<'_, PyList>,
        start: usize,
        delivery: &Delivery,
    ) -> PyResult<usize> {
        self.open()?;
        let n = values.len();
        if keys.len() != n || ids.len() != n || !(heads.len() == 1 || heads.len() == n) {
            return Err(PyValueError::new_err(
                "keys, values, ids and heads differ in length",
            ));
        }
        let name = topic_name(topic)?;
        let id_name =
            CString::new(id_name).map_err(|_| PyValueError::new_err("a NUL in a header name"))?;
        let tail = header_pairs(tail)?;
        let shared = if heads.len() == 1 {
            Some(header_pairs(&heads.get_item(0)?.cast_into::<PyList>()?)?)
        } else {
            None
        };
        let mut i = start;
        while i < n {
            let own;
            let head = match &shared {
                Some(h) => h,
                None => {
                    own = header_pairs(&heads.get_item(i)?.cast_into::<PyList>()?)?;
                    &own
                }
            };
            let id = ids.get_item(i)?;
            let id = id.cast::<PyBytes>()?.as_bytes();
            let hdrs = unsafe {
                let hdrs = rd::rd_kafka_headers_new(head.len() + 1 + tail.len());
                for (k, v) in head.iter() {
                    let (p, l) = v.as_ref().map_or((ptr::null(), 0), |v| {
                        (v.as_ptr() as *const c_void, v.len() as isize)
                    });
                    rd::rd_kafka_header_add(hdrs, k.as_ptr(), -1, p, l);
                }
                rd::rd_kafka_header_add(
                    hdrs,
                    id_name.as_ptr(),
                    -1,
                    id.as_ptr() as *const c_void,
                    id.len() as isize,
                );
                for (k, v) in tail.iter() {
                    let (p, l) = v.as_ref().map_or((ptr::null(), 0), |v| {
                        (v.as_ptr() as *const c_void, v.len() as isize)
                    });
                    rd::rd_kafka_header_add(hdrs, k.as_ptr(), -1, p, l);
                }
                hdrs
            };
            let key = keys.get_item(i)?;
            let value = values.get_item(i)?;
            let out = Out {
                key: optional_bytes(&key)?,
                value: optional_bytes(&value)?,
            };
            match self.queue(&name, out, hdrs, &delivery.counter) {
                Ok(true) => i += 1,
                Ok(false) => return Ok(i),
                Err(code) => {
                    let reason = format!("cannot produce to {topic}: {}", err_text(code));
                    let counter = delivery.counter.clone();
                    py.detach(move || counter.settle(Some(reason), -1, -1));
                    i += 1;
                }
            }
        }
        Ok(n)
    }

    /// Wait up to `timeout` s for every queued record to be settled; returns how many are left.
    fn flush(&self, py: Python<'_>, timeout: f64) -> usize {
        let rk = self.rk.clone();
        let ms = (timeout.max(0.0) * 1000.0) as c_int;
        py.detach(move || unsafe {
            rd::rd_kafka_flush(rk.get(), ms);
            rd::rd_kafka_outq_len(rk.get()).max(0) as usize
        })
    }

    /// Stop serving delivery reports (after `flush`); once only.
    fn close(&self, py: Python<'_>) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        let poller = self.poller.lock().unwrap().take();
        let rk = self.rk.clone();
        py.detach(move || {
            if let Some(p) = poller {
                let _ = p.join();
            }
            unsafe { rd::rd_kafka_poll(rk.get(), 0) };
        });
    }
}

impl Drop for KafkaProducer {
    fn drop(&mut self) {
        // Not joined here (a report being served may be waiting for the GIL this drop may hold): the
        // thread stops within its poll's 100 ms and the last of the two to let go destroys the handle.
        self.closing.store(true, Ordering::Release);
    }
}
