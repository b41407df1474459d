//! `LruCache` for Python: a `Mutex` around [`crate::cache::LruCache`] plus argument conversion.
//!
//! State sits in a [`GilCell`]: the GIL is the lock (see `gil_cell.rs` for why and the rule that
//! keeps it sound: arguments are converted, iterables collected and the injected timer read before
//! the cell is entered; Python containers are filled after). The GIL is never released: a lookup is
//! far below the cost of releasing and re-taking it.
//!
//! Values come back without a copy: a value is kept as a Python `bytes` object from its first read on
//! (see `cache.rs`'s shared values), so every later `get` returns that object; `bytes` values of
//! [`SHARE_FROM`] bytes or more are kept as the caller's object from the start. A read of an entry
//! therefore costs a reference count, not an allocation and a copy — which decides both a cache of
//! large HTTP bodies and a caller that keeps what it reads (the copy was 1.5-1.8x cachebox's `get`).
//!
//! Time: without an injected timer, expiry uses the coarse monotonic clock (3.9 ns a read instead of
//! 17 ns, measured here; a tick is typically 4 ms). Reads compare deadlines against `coarse + one
//! tick`, which is never earlier than the true time, so an expired entry is never returned; an entry
//! may expire up to two ticks early.

use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use super::gil_cell::GilCell;
use super::keys::{at_least, key_parts, ttl_ns, value_bytes, Value};
use crate::cache::{self, KeyKind, SharedValue, Ttl};
use crate::clock;

/// `bytes` values at least this long are stored as the caller's object, not copied: the object's
/// header (33 bytes) is small beside them, and the copy would cost more than the rest of a `set`.
/// Shorter ones are copied into the slot, the most compact form, until their first read.
const SHARE_FROM: usize = 256;

/// A stored value held as the `bytes` object reads return.
struct SharedBytes(Py<PyBytes>);

impl SharedValue for SharedBytes {
    #[inline]
    fn bytes(&self) -> &[u8] {
        let p = self.0.as_ptr();
        // SAFETY: `p` is a bytes object kept alive by this reference; a bytes object's buffer is
        // immutable and lives, at a fixed address, as long as the object.
        unsafe {
            let data = pyo3::ffi::PyBytes_AsString(p) as *const u8;
            std::slice::from_raw_parts(data, pyo3::ffi::Py_SIZE(p) as usize)
        }
    }
}

/// A value on its way into the cache: copied, or kept as the caller's `bytes`.
enum Incoming<'a> {
    Copy(Value<'a>),
    Shared(SharedBytes),
}

impl<'a> Incoming<'a> {
    fn from_value(value: &'a Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(b) = value.cast_exact::<PyBytes>() {
            if b.as_bytes().len() >= SHARE_FROM {
                return Ok(Incoming::Shared(SharedBytes(b.clone().unbind())));
            }
        }
        Ok(Incoming::Copy(value_bytes(value)?))
    }

    fn len(&self) -> usize {
        match self {
            Incoming::Copy(v) => v.as_slice().len(),
            Incoming::Shared(s) => s.bytes().len(),
        }
    }

    fn store(
        self,
        c: &mut Inner,
        kind: KeyKind,
        key: &[u8],
        ttl: Ttl,
        now: u64,
    ) -> crate::error::Result<()> {
        match self {
            Incoming::Copy(v) => c.set(kind, key, v.as_slice(), ttl, now),
            Incoming::Shared(s) => c.set_shared(kind, key, s, ttl, now),
        }
    }
}

type Inner = cache::LruCache<SharedBytes>;

/// LRU cache with per-entry TTL and a byte budget; keys ``str | bytes``, values bytes-like.
#[pyclass(module = "pyproxy._core", name = "LruCache", frozen)]
pub struct LruCache {
    inner: GilCell<Inner>,
    /// Injected clock (seconds on ``time.monotonic()``'s scale), for tests; `None` = the real clock.
    timer: Option<Py<PyAny>>,
}

/// Where "now" comes from for one call.
#[derive(Clone, Copy)]
enum Clock {
    Real,
    /// The injected timer's reading, taken before the cell is entered.
    Fixed(u64),
}

impl Clock {
    /// A time no earlier than the true time: for deciding whether a deadline has passed.
    #[inline]
    fn check(self) -> u64 {
        match self {
            Clock::Real => clock::coarse_ns() + clock::coarse_resolution_ns(),
            Clock::Fixed(t) => t,
        }
    }
    /// The time a new deadline counts from.
    #[inline]
    fn stamp(self) -> u64 {
        match self {
            Clock::Real => clock::coarse_ns(),
            Clock::Fixed(t) => t,
        }
    }
}

impl LruCache {
    #[inline]
    fn clock(&self, py: Python<'_>) -> PyResult<Clock> {
        match &self.timer {
            None => Ok(Clock::Real),
            Some(t) => read_timer(py, t),
        }
    }

    fn ttl_arg(ttl: Option<f64>) -> PyResult<Ttl> {
        Ok(match ttl {
            None => Ttl::Default,
            Some(s) => match ttl_ns("ttl", s)? {
                None => Ttl::Never,
                Some(ns) => Ttl::Nanos(ns),
            },
        })
    }

    /// Key/value pairs of a mapping or an iterable of pairs, collected before the cell is entered
    /// (iterating may run Python code).
    fn collect_items<'py>(
        items: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>)>> {
        let iter = match items.cast::<PyDict>() {
            Ok(d) => d.items().into_any().try_iter()?,
            Err(_) => items.try_iter()?,
        };
        iter.map(|pair| pair?.extract()).collect()
    }

    fn lookup<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let (kind, k) = key_parts(key)?;
        let clock = self.clock(py)?;
        self.inner.with(py, |c| {
            c.get_shared(kind, k, || clock.check(), |v| share(py, v))
                .map(|s| s.0.clone_ref(py).into_bound(py))
        })
    }
}

#[pymethods]
impl LruCache {
    #[new]
    #[pyo3(signature = (max_bytes, *, max_entries=None, default_ttl=None, timer=None))]
    fn new(
        max_bytes: i64,
        max_entries: Option<i64>,
        default_ttl: Option<f64>,
        timer: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let max_bytes = at_least("max_bytes", max_bytes, 1)?;
        let max_entries = max_entries
            .map(|n| at_least("max_entries", n, 1))
            .transpose()?
            .map(|n| n.min(u32::MAX as u64 - 2) as usize);
        let default_ttl = match default_ttl {
            None => None,
            Some(s) => ttl_ns("default_ttl", s)?,
        };
        Ok(LruCache {
            inner: GilCell::new(Inner::with_shared_values(
                max_bytes,
                max_entries,
                default_ttl,
            )?),
            timer,
        })
    }

    /// The value for ``key`` (a ``bytes``; the same object on every read), or ``default`` if absent
    /// or expired.
    #[pyo3(signature = (key, default=None))]
    #[inline]
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self.lookup(py, key)? {
            Some(v) => v.into_any(),
            None => default.unwrap_or_else(|| py.None().into_bound(py)),
        })
    }

    /// Store ``value`` under ``key``. ``ttl`` in seconds (``None``: the cache's ``default_ttl``;
    /// ``math.inf``: never expires). Evicts least recently used entries to stay within budget.
    /// Raises ``ValueError`` if the entry alone is larger than ``max_bytes``.
    #[pyo3(signature = (key, value, ttl=None))]
    fn set(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        ttl: Option<f64>,
    ) -> PyResult<()> {
        let ttl = Self::ttl_arg(ttl)?;
        let (kind, k) = key_parts(key)?;
        let v = Incoming::from_value(value)?;
        let clock = self.clock(py)?;
        self.inner
            .with(py, |c| v.store(c, kind, k, ttl, clock.stamp()))??;
        Ok(())
    }

    /// Remove ``key``; ``True`` if a live entry was removed.
    fn delete(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (kind, k) = key_parts(key)?;
        let clock = self.clock(py)?;
        self.inner.with(py, |c| c.delete(kind, k, clock.check()))
    }

    /// Remaining lifetime of ``key`` in seconds; ``None`` if the key is absent or never expires.
    fn ttl(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
        let (kind, k) = key_parts(key)?;
        let clock = self.clock(py)?;
        let remaining = self.inner.with(py, |c| c.ttl(kind, k, clock.check()))?;
        Ok(remaining.flatten().map(clock::ns_to_secs))
    }

    /// ``{key: value}`` for each of ``keys`` that is present (one pass, in one borrow of the cache).
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let keys: Vec<Bound<'py, PyAny>> = keys.try_iter()?.collect::<PyResult<_>>()?;
        let clock = self.clock(py)?;
        let parts = keys.iter().map(key_parts).collect::<PyResult<Vec<_>>>()?;
        let found = self.inner.with(py, |c| {
            let mut found = Vec::new();
            for (n, &(kind, k)) in parts.iter().enumerate() {
                if let Some(s) = c.get_shared(kind, k, || clock.check(), |v| share(py, v)) {
                    found.push((n, s.0.clone_ref(py)));
                }
            }
            found
        })?;
        // Filled outside the cell: inserting may call a str/bytes subclass's Python __hash__.
        let out = PyDict::new(py);
        for (n, v) in found {
            out.set_item(&keys[n], v)?;
        }
        Ok(out)
    }

    /// Store every ``(key, value)`` of a mapping or an iterable of pairs, with one ``ttl``.
    /// Every item is validated before any is stored: a bad one raises and stores nothing.
    #[pyo3(signature = (items, ttl=None))]
    fn set_many(&self, py: Python<'_>, items: &Bound<'_, PyAny>, ttl: Option<f64>) -> PyResult<()> {
        let ttl = Self::ttl_arg(ttl)?;
        let items = Self::collect_items(items)?;
        let mut converted = Vec::with_capacity(items.len());
        for (key, value) in &items {
            let (kind, k) = key_parts(key)?;
            converted.push((kind, k, Incoming::from_value(value)?));
        }
        let max_bytes = self.inner.with(py, |c| c.max_bytes())?;
        for (_, k, v) in &converted {
            let charge = Inner::charge_for(k.len(), v.len());
            if charge > max_bytes {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "entry of {charge} bytes exceeds max_bytes={max_bytes}; nothing was stored"
                )));
            }
        }
        let clock = self.clock(py)?;
        self.inner.with(py, |c| {
            converted
                .into_iter()
                .try_for_each(|(kind, k, v)| v.store(c, kind, k, ttl, clock.stamp()))
        })??;
        Ok(())
    }

    /// Reclaim up to ``limit`` expired entries now (writes already do this a few at a time);
    /// returns how many were removed.
    #[pyo3(signature = (limit=1024))]
    fn purge_expired(&self, py: Python<'_>, limit: i64) -> PyResult<usize> {
        let limit = at_least("limit", limit, 0)? as usize;
        let clock = self.clock(py)?;
        self.inner
            .with(py, |c| c.purge_expired(clock.stamp(), limit))
    }

    /// Drop every entry; counters other than ``bytes``/``entries`` are kept.
    fn clear(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.with(py, |c| c.clear())
    }

    /// Keys from most to least recently used (a snapshot, for inspection).
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let keys = self.inner.with(py, |c| c.keys_mru())?;
        keys.into_iter()
            .map(|(kind, k)| -> PyResult<Bound<'py, PyAny>> {
                Ok(match kind {
                    // Stored from a Python str, so valid UTF-8; decoding again cannot fail.
                    KeyKind::Str => PyString::new(py, &String::from_utf8_lossy(&k)).into_any(),
                    KeyKind::Bytes => PyBytes::new(py, &k).into_any(),
                })
            })
            .collect()
    }

    /// ``hits``, ``misses``, ``evictions``, ``expirations``, ``bytes``, ``entries`` and ``max_bytes``.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (s, max) = self.inner.with(py, |c| (c.stats(), c.max_bytes()))?;
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("expirations", s.expirations)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("entries", s.entries)?;
        d.set_item("max_bytes", max)?;
        Ok(d)
    }

    /// Bytes charged for all entries: keys + values + ``ENTRY_OVERHEAD`` each.
    #[getter]
    fn nbytes(&self, py: Python<'_>) -> PyResult<u64> {
        self.inner.with(py, |c| c.bytes())
    }

    #[getter]
    fn max_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        self.inner.with(py, |c| c.max_bytes())
    }

    #[getter]
    fn max_entries(&self, py: Python<'_>) -> PyResult<Option<usize>> {
        self.inner.with(py, |c| c.max_entries())
    }

    #[getter]
    fn default_ttl(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        self.inner
            .with(py, |c| c.default_ttl().map(clock::ns_to_secs))
    }

    fn __contains__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (kind, k) = key_parts(key)?;
        let clock = self.clock(py)?;
        self.inner.with(py, |c| c.contains(kind, k, clock.check()))
    }

    fn __getitem__<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        self.lookup(py, key)?
            .ok_or_else(|| PyKeyError::new_err(key.clone().unbind()))
    }

    fn __setitem__(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.set(py, key, value, None)
    }

    fn __delitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<()> {
        if self.delete(py, key)? {
            Ok(())
        } else {
            Err(PyKeyError::new_err(key.clone().unbind()))
        }
    }

    /// Number of stored entries (expired ones not yet reclaimed included).
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.inner.with(py, |c| c.len())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        self.inner.with(py, |c| {
            format!(
                "LruCache(entries={}, bytes={}, max_bytes={})",
                c.len(),
                c.bytes(),
                c.max_bytes()
            )
        })
    }

    fn __traverse__(&self, visit: pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        if let Some(t) = &self.timer {
            visit.call(t)?;
        }
        Ok(())
    }
}

/// A stored value's first read: the `bytes` object it is kept as from now on.
#[inline]
fn share(py: Python<'_>, value: &[u8]) -> SharedBytes {
    SharedBytes(PyBytes::new(py, value).unbind())
}

#[cold]
#[inline(never)]
fn read_timer(py: Python<'_>, timer: &Py<PyAny>) -> PyResult<Clock> {
    let secs: f64 = timer.call0(py)?.extract(py)?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "timer() must return a finite number of seconds >= 0, got {secs}"
        )));
    }
    Ok(Clock::Fixed(clock::secs_to_ns(secs)))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LruCache>()?;
    m.add("ENTRY_OVERHEAD", cache::ENTRY_OVERHEAD)?;
    Ok(())
}
