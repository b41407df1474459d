//! Argument conversion shared by the bindings: `str | bytes` keys, bytes-like values, durations.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use crate::cache::KeyKind;
use crate::clock;

/// Borrow a `str` (as UTF-8) or `bytes` key without copying.
#[inline]
pub(crate) fn key_parts<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<(KeyKind, &'a [u8])> {
    if let Ok(s) = key.cast::<PyString>() {
        return Ok((KeyKind::Str, str_utf8(s)?));
    }
    if let Ok(b) = key.cast::<PyBytes>() {
        return Ok((KeyKind::Bytes, b.as_bytes()));
    }
    Err(wrong_type("key", "str or bytes", key))
}

/// The UTF-8 bytes of a `str`. Compact ASCII strings (nearly all keys) are read in place without a
/// call into the interpreter; others go through `PyUnicode_AsUTF8AndSize`, which caches the encoding
/// on the object.
#[inline]
pub(crate) fn str_utf8<'a>(s: &'a Bound<'_, PyString>) -> PyResult<&'a [u8]> {
    let ptr = s.as_ptr();
    // SAFETY: `ptr` is a live str object for 'a (borrowed from `s`). A compact ASCII str stores its
    // `length` bytes, which are valid UTF-8, directly after the header and never moves or changes them.
    unsafe {
        if pyo3::ffi::PyUnicode_IS_COMPACT_ASCII(ptr) != 0 {
            let data = pyo3::ffi::PyUnicode_DATA(ptr) as *const u8;
            let len = pyo3::ffi::PyUnicode_GET_LENGTH(ptr) as usize;
            return Ok(std::slice::from_raw_parts(data, len));
        }
    }
    Ok(s.to_str()?.as_bytes())
}

/// Bytes of a bytes-like value: `bytes` without a copy, anything with a contiguous buffer
/// (`bytearray`, `memoryview`, ...) copied.
pub(crate) enum Value<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Value<'_> {
    #[inline]
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Value::Borrowed(b) => b,
            Value::Owned(v) => v,
        }
    }
}

#[inline]
pub(crate) fn value_bytes<'a>(value: &'a Bound<'_, PyAny>) -> PyResult<Value<'a>> {
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(Value::Borrowed(b.as_bytes()));
    }
    value_from_buffer(value)
}

#[cold]
#[inline(never)]
fn value_from_buffer<'a>(value: &'a Bound<'_, PyAny>) -> PyResult<Value<'a>> {
    if value.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "value must be bytes-like, not str (encode it first)",
        ));
    }
    let buf = PyBuffer::<u8>::get(value).map_err(|_| wrong_type("value", "bytes-like", value))?;
    Ok(Value::Owned(buf.to_vec(value.py())?))
}

/// A duration in seconds: finite and > 0, or `inf` for "forever" (`None` returned).
pub(crate) fn ttl_ns(name: &str, seconds: f64) -> PyResult<Option<u64>> {
    if seconds == f64::INFINITY {
        return Ok(None);
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(PyValueError::new_err(format!(
            "{name} must be > 0 seconds (or math.inf for no expiry), got {seconds}"
        )));
    }
    Ok(Some(clock::secs_to_ns(seconds).max(1)))
}

/// A size or count that must be >= `min`.
pub(crate) fn at_least(name: &str, value: i64, min: i64) -> PyResult<u64> {
    if value < min {
        return Err(PyValueError::new_err(format!(
            "{name} must be >= {min}, got {value}"
        )));
    }
    Ok(value as u64)
}

#[cold]
#[inline(never)]
pub(crate) fn wrong_type(what: &str, expected: &str, got: &Bound<'_, PyAny>) -> PyErr {
    let name = got
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    PyTypeError::new_err(format!("{what} must be {expected}, not {name}"))
}

/// One item of a `hit_all` `checks` sequence: a tuple of `n` items (`shape` names them in the
/// messages, e.g. "(limit, window, key)"), else a `TypeError` saying what it was.
#[inline]
pub(crate) fn check_tuple<'a, 'py>(
    item: &'a Bound<'py, PyAny>,
    n: usize,
    shape: &str,
) -> PyResult<&'a Bound<'py, PyTuple>> {
    let tuple = item
        .cast::<PyTuple>()
        .map_err(|_| wrong_type("each check", &format!("a {shape} tuple"), item))?;
    if tuple.len() != n {
        return Err(PyTypeError::new_err(format!(
            "each check must be a {shape} tuple, got a tuple of {}",
            tuple.len()
        )));
    }
    Ok(tuple)
}
