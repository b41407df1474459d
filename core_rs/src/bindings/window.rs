//! `SlidingWindow` and `hit_all` for Python: a `Mutex` around [`crate::window::SlidingWindow`] plus
//! argument conversion.
//!
//! As in `bindings/cache.rs`, the GIL is kept: a hit is far below the cost of releasing it. `hit_all`
//! locks each distinct limiter once, in address order, so concurrent calls listing the same
//! limiters in different orders cannot deadlock (free-threaded builds included).

use parking_lot::{Mutex, MutexGuard};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::keys::{at_least, key_parts, wrong_type};
use crate::clock;
use crate::error::check_seconds;
use crate::window::{self, Decision, KeyKind};

/// Rate-limit counters keyed by ``str | bytes``: at most ``limit`` units per ``window`` seconds per
/// key.
///
/// ``exact=False`` (default): the O(1) sliding-window counter (HAProxy ``http_req_rate``,
/// Cloudflare): fixed windows aligned on multiples of ``window``, the previous window's count
/// weighted by how much of it still overlaps the last ``window`` seconds. Exact when traffic is
/// uniform; in the worst case it admits at most ``2*limit - 1`` in some interval of length
/// ``window`` (``limit`` hits at the very end of one fixed window, ``limit - 1`` at the very end of
/// the next), never more than ``limit`` in one fixed window; it can also deny early after a burst
/// at the start of the previous window.
///
/// ``exact=True``: a per-key log of ``(time, cost)``; never more than ``limit`` in any interval
/// ``[t, t + window)``; memory up to one entry per distinct hit time per key.
///
/// ``hit``/``peek`` return ``(allowed, remaining, retry_after)``: ``remaining`` whole units left
/// (after this hit; as they stand when denied), ``retry_after`` seconds until the same hit would be
/// allowed if no other came (``0.0`` when allowed, ``math.inf`` when ``cost > limit``). A denied hit
/// charges nothing. ``cost=0`` charges nothing and is always allowed (a peek). ``now`` is seconds on
/// ``time.monotonic()``'s scale (default: that clock); a ``now`` earlier than one already seen counts
/// as the latest seen. Keys idle for long enough that they no longer matter (counter: two windows;
/// exact: one) are dropped a few per hit and all at once by ``len()``. Thread-safe.
#[pyclass(module = "pyproxy._core", name = "SlidingWindow", frozen)]
pub struct SlidingWindow {
    inner: Mutex<window::SlidingWindow>,
    limit: u64,
    window_ns: u64,
    exact: bool,
}

/// `now` argument → nanoseconds: finite and >= 0, default the monotonic clock.
#[inline]
fn now_ns(now: Option<f64>) -> PyResult<u64> {
    match now {
        None => Ok(clock::monotonic_ns()),
        Some(s) => Ok(clock::secs_to_ns(check_seconds("now", s, true)?)),
    }
}

#[inline]
fn cost_arg(cost: i64) -> PyResult<u64> {
    at_least("cost", cost, 0)
}

#[inline]
fn retry_secs(retry: Option<u64>) -> f64 {
    retry.map_or(f64::INFINITY, clock::ns_to_secs)
}

#[inline]
fn decision_tuple(d: Decision) -> (bool, u64, f64) {
    (d.allowed, d.remaining, retry_secs(d.retry_after))
}

#[pymethods]
impl SlidingWindow {
    #[new]
    #[pyo3(signature = (limit, window, *, exact=false))]
    fn new(limit: i64, window: f64, exact: bool) -> PyResult<Self> {
        let limit = at_least("limit", limit, 1)?;
        let window_ns = clock::secs_to_ns(check_seconds("window", window, false)?);
        let inner = window::SlidingWindow::new(limit, window_ns, exact)?;
        Ok(SlidingWindow {
            inner: Mutex::new(inner),
            limit,
            window_ns,
            exact,
        })
    }

    /// Charge ``cost`` to ``key`` if it fits; returns ``(allowed, remaining, retry_after)``.
    #[pyo3(signature = (key, cost=1, now=None))]
    #[inline]
    fn hit(
        &self,
        key: &Bound<'_, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, u64, f64)> {
        let (kind, k) = key_parts(key)?;
        let cost = cost_arg(cost)?;
        let now = now_ns(now)?;
        let d = self.inner.lock().hit(kind, k, cost, now)?;
        Ok(decision_tuple(d))
    }

    /// What ``hit(key, cost, now)`` would return, charging nothing.
    #[pyo3(signature = (key, cost=1, now=None))]
    fn peek(
        &self,
        key: &Bound<'_, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, u64, f64)> {
        let (kind, k) = key_parts(key)?;
        let cost = cost_arg(cost)?;
        let now = now_ns(now)?;
        Ok(decision_tuple(self.inner.lock().peek(kind, k, cost, now)))
    }

    /// Forget ``key``'s history; ``True`` if it had any that still counts (as of the latest
    /// ``now`` seen).
    fn reset(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (kind, k) = key_parts(key)?;
        Ok(self.inner.lock().reset(kind, k))
    }

    /// Units allowed per window.
    #[getter]
    fn limit(&self) -> u64 {
        self.limit
    }

    /// The window in seconds.
    #[getter]
    fn window(&self) -> f64 {
        clock::ns_to_secs(self.window_ns)
    }

    /// Whether this is the exact (per-key log) mode.
    #[getter]
    fn exact(&self) -> bool {
        self.exact
    }

    /// Number of keys that can still affect a decision (idle ones, as of the latest ``now`` seen,
    /// are dropped first).
    fn __len__(&self) -> usize {
        self.inner.lock().len()
    }

    fn __repr__(&self) -> String {
        format!(
            "SlidingWindow(limit={}, window={:?}, exact={})",
            self.limit,
            clock::ns_to_secs(self.window_ns),
            if self.exact { "True" } else { "False" }
        )
    }
}

/// Check several ``(limiter, key)`` pairs at once (global, route, user...) and charge ``cost`` to
/// all of them only if every one allows it.
///
/// Returns ``(allowed, first_denied, retry_after, remaining)``: ``first_denied`` is the index of
/// the first denying pair (``-1`` when allowed), ``retry_after`` the longest wait over the denying
/// pairs (``0.0`` when allowed, ``math.inf`` if one can never pass), ``remaining`` the smallest
/// ``remaining`` over all pairs (after charging when allowed, as they stand when denied). A pair
/// listed twice is charged twice. ``checks`` must not be empty (``ValueError``).
#[pyfunction]
#[pyo3(signature = (checks, cost=1, now=None))]
fn hit_all(
    checks: &Bound<'_, PyAny>,
    cost: i64,
    now: Option<f64>,
) -> PyResult<(bool, i64, f64, u64)> {
    let cost = cost_arg(cost)?;
    let now = now_ns(now)?;
    // Collect the pairs first: iterating an arbitrary sequence may run Python code, which must not
    // happen while limiters are locked.
    let items: Vec<Bound<'_, PyAny>> = match checks.cast::<PyList>() {
        Ok(list) => list.iter().collect(),
        Err(_) => match checks.cast::<PyTuple>() {
            Ok(tuple) => tuple.iter().collect(),
            Err(_) => checks.try_iter()?.collect::<PyResult<_>>()?,
        },
    };
    let mut pairs: Vec<(Bound<'_, SlidingWindow>, Bound<'_, PyAny>)> =
        Vec::with_capacity(items.len());
    for item in &items {
        pairs.push(pair(item)?);
    }
    let mut keys: Vec<(usize, KeyKind, &[u8])> = Vec::with_capacity(pairs.len());
    // Distinct limiters in address order; each check refers to one by index.
    let mut order: Vec<&Bound<'_, SlidingWindow>> = pairs.iter().map(|(l, _)| l).collect();
    order.sort_unstable_by_key(|l| l.as_ptr() as usize);
    order.dedup_by_key(|l| l.as_ptr() as usize);
    for (limiter, key) in &pairs {
        let (kind, k) = key_parts(key)?;
        let index = order
            .binary_search_by_key(&(limiter.as_ptr() as usize), |l| l.as_ptr() as usize)
            .map_err(|_| PyTypeError::new_err("limiter vanished"))?;
        keys.push((index, kind, k));
    }
    let mut guards: Vec<MutexGuard<'_, window::SlidingWindow>> =
        order.iter().map(|l| l.get().inner.lock()).collect();
    let mut limiters: Vec<&mut window::SlidingWindow> =
        guards.iter_mut().map(|g| &mut **g).collect();
    let d = window::hit_all(&mut limiters, &keys, cost, now)?;
    Ok((
        d.allowed,
        d.first_denied.map_or(-1, |i| i as i64),
        retry_secs(d.retry_after),
        d.remaining,
    ))
}

/// One `(SlidingWindow, key)` item of `hit_all`'s `checks`.
#[inline]
fn pair<'py>(item: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, SlidingWindow>, Bound<'py, PyAny>)> {
    let tuple = item
        .cast::<PyTuple>()
        .map_err(|_| wrong_type("each check", "a (SlidingWindow, key) tuple", item))?;
    if tuple.len() != 2 {
        return Err(PyTypeError::new_err(format!(
            "each check must be a (SlidingWindow, key) tuple, got a tuple of {}",
            tuple.len()
        )));
    }
    let limiter = tuple.get_item(0)?;
    let limiter = limiter
        .cast_into::<SlidingWindow>()
        .map_err(|e| wrong_type("a check's limiter", "SlidingWindow", &e.into_inner()))?;
    Ok((limiter, tuple.get_item(1)?))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SlidingWindow>()?;
    m.add_function(wrap_pyfunction!(hit_all, m)?)?;
    Ok(())
}
