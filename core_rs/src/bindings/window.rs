//! `SlidingWindow` and `hit_all` for Python: a [`GilCell`] around [`crate::window::SlidingWindow`]
//! plus argument conversion.
//!
//! As in `bindings/cache.rs`, the GIL is the lock and is kept: a hit is far below the cost of
//! releasing it. `hit_all` borrows each distinct limiter once (the pairs are collected and the keys
//! converted before any borrow); with a mutex per limiter, three levels cost 2.2x one `hit`, mostly
//! in lock round trips.

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::gil_cell::{GilCell, GilRefMut};
use super::keys::{at_least, check_tuple, key_parts, wrong_type};
use crate::clock;
use crate::error::check_seconds;
use crate::window::{self, Decision, KeyKind};

/// Rate-limit counters keyed by ``str | bytes``: at most ``limit`` units per ``window`` seconds per
/// key.
///
/// ``exact=False`` (default): the O(1) sliding-window counter (HAProxy ``http_req_rate``,
/// Cloudflare): fixed windows aligned on multiples of ``window``; the previous window's count,
/// weighted by how much of it still overlaps the last ``window`` seconds and rounded down to whole
/// hits, plus the current window's count must leave room for ``cost``. Within one hit of exact for
/// uniform traffic; never more than ``limit`` in one fixed window; in the worst case ``2*limit`` in
/// an interval of length ``window`` (``limit`` hits at the very end of one fixed window and
/// ``limit`` at the very end of the next); it can also deny early after a burst at the start of the
/// previous window, but never while the two fixed windows together have room.
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
///
/// Bad input: a non-``str``/``bytes`` key or a non-number → ``TypeError``; ``limit < 1``,
/// ``window`` not finite or below 1 ns, ``cost < 0``, ``now`` negative or not finite →
/// ``ValueError``; integers beyond 64 bits → ``OverflowError``.
#[pyclass(module = "pyproxy._core", name = "SlidingWindow", frozen)]
pub struct SlidingWindow {
    inner: GilCell<window::SlidingWindow>,
    limit: u64,
    window_ns: u64,
    exact: bool,
}

/// `now` argument → nanoseconds: finite and >= 0, default the monotonic clock.
#[inline]
pub(super) fn now_ns(now: Option<f64>) -> PyResult<u64> {
    match now {
        None => Ok(clock::monotonic_ns()),
        Some(s) => Ok(clock::secs_to_ns(check_seconds("now", s, true)?)),
    }
}

#[inline]
pub(super) fn cost_arg(cost: i64) -> PyResult<u64> {
    at_least("cost", cost, 0)
}

#[inline]
pub(super) fn retry_secs(retry: Option<u64>) -> f64 {
    retry.map_or(f64::INFINITY, clock::ns_to_secs)
}

#[inline]
pub(super) fn decision_tuple(d: Decision) -> (bool, u64, f64) {
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
            inner: GilCell::new(inner),
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
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, u64, f64)> {
        let (kind, k) = key_parts(key)?;
        let cost = cost_arg(cost)?;
        let now = now_ns(now)?;
        let d = self.inner.borrow_mut(py)?.hit(kind, k, cost, now)?;
        Ok(decision_tuple(d))
    }

    /// What ``hit(key, cost, now)`` would return, charging nothing.
    #[pyo3(signature = (key, cost=1, now=None))]
    fn peek(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, u64, f64)> {
        let (kind, k) = key_parts(key)?;
        let cost = cost_arg(cost)?;
        let now = now_ns(now)?;
        Ok(decision_tuple(
            self.inner.borrow_mut(py)?.peek(kind, k, cost, now),
        ))
    }

    /// Forget ``key``'s history; ``True`` if it had any that still counts (as of the latest
    /// ``now`` seen).
    fn reset(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (kind, k) = key_parts(key)?;
        Ok(self.inner.borrow_mut(py)?.reset(kind, k))
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
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.inner.borrow_mut(py)?.len())
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
/// listed twice is charged twice. ``checks`` is any iterable of ``(SlidingWindow, key)`` tuples
/// (a list or tuple is fastest) and must not be empty (``ValueError``).
#[pyfunction]
#[pyo3(signature = (checks, cost=1, now=None))]
fn hit_all<'py>(
    checks: &Bound<'py, PyAny>,
    cost: i64,
    now: Option<f64>,
) -> PyResult<(bool, i64, f64, u64)> {
    let cost = cost_arg(cost)?;
    let now = now_ns(now)?;
    // The pairs are collected first: iterating an arbitrary sequence may run Python code, which
    // must not happen while limiters are locked.
    with_parsed(checks, pair, |pairs| run_checks(pairs, cost, now))
}

/// Checks of one `hit_all` call on the stack up to this many (the usual global/route/user): four
/// small heap buffers per call would cost as much as the checks themselves.
pub(super) const INLINE: usize = 4;

/// `run` over the items of `checks` (a list or tuple is fastest; any iterable works), each
/// `parse`d first; the first `INLINE` live on the stack. Shared by both limiters' `hit_all`.
pub(super) fn with_parsed<'py, T, R>(
    checks: &Bound<'py, PyAny>,
    parse: impl Fn(&Bound<'py, PyAny>) -> PyResult<T>,
    run: impl FnOnce(&[Option<T>]) -> PyResult<R>,
) -> PyResult<R> {
    let mut inline: [Option<T>; INLINE] = [const { None }; INLINE];
    let mut heap: Vec<Option<T>> = Vec::new();
    let mut n = 0;
    let mut push = |t: T| {
        if n < INLINE {
            inline[n] = Some(t);
        } else {
            if n == INLINE {
                heap.extend(inline.iter_mut().map(Option::take));
            }
            heap.push(Some(t));
        }
        n += 1;
    };
    if let Ok(list) = checks.cast::<PyList>() {
        for item in list.iter() {
            push(parse(&item)?);
        }
    } else if let Ok(tuple) = checks.cast::<PyTuple>() {
        for item in tuple.iter() {
            push(parse(&item)?);
        }
    } else {
        for item in checks.try_iter()? {
            push(parse(&item?)?);
        }
    }
    run(if n <= INLINE { &inline[..n] } else { &heap })
}

/// One check of `hit_all`: a `(SlidingWindow, key)` tuple, validated by [`pair`]. The tuple is kept
/// (one reference) and its items borrowed from it, rather than taking a reference to each item.
type Pair<'py> = Bound<'py, PyTuple>;

/// The limiter and key of a validated pair.
#[inline]
fn pair_parts<'a, 'py>(
    pair: &'a Pair<'py>,
) -> (&'a Bound<'py, SlidingWindow>, &'a Bound<'py, PyAny>) {
    let items = pair.as_slice();
    // SAFETY: `pair` checked the length (2) and the type of item 0; a tuple never changes.
    unsafe {
        (
            items.get_unchecked(0).cast_unchecked::<SlidingWindow>(),
            items.get_unchecked(1),
        )
    }
}

/// Scratch space of `n` items: the first `INLINE` on the stack, a `Vec` beyond.
pub(super) fn scratch<'a, T: Clone>(
    inline: &'a mut [T; INLINE],
    heap: &'a mut Vec<T>,
    n: usize,
    fill: T,
) -> &'a mut [T] {
    if n <= INLINE {
        &mut inline[..n]
    } else {
        heap.resize(n, fill);
        heap
    }
}

fn run_checks(pairs: &[Option<Pair<'_>>], cost: u64, now: u64) -> PyResult<(bool, i64, f64, u64)> {
    let n = pairs.len();
    // Distinct limiters, in order of first use; each check refers to one by index. A linear search:
    // there are a handful of levels, and a sort costs more.
    let mut order_inline: [Option<&Bound<'_, SlidingWindow>>; INLINE] = [None; INLINE];
    let mut order_heap = Vec::new();
    let order = scratch(&mut order_inline, &mut order_heap, n, None);
    let (mut keys_inline, mut keys_heap) = ([(0, KeyKind::Str, &[][..]); INLINE], Vec::new());
    let keys = scratch(
        &mut keys_inline,
        &mut keys_heap,
        n,
        (0, KeyKind::Str, &[][..]),
    );
    let mut distinct = 0;
    for (slot, p) in keys.iter_mut().zip(pairs) {
        let Some(p) = p else { continue };
        let (l, key) = pair_parts(p);
        let (kind, k) = key_parts(key)?;
        let index = match order[..distinct]
            .iter()
            .position(|o| o.is_some_and(|o| o.as_ptr() == l.as_ptr()))
        {
            Some(index) => index,
            None => {
                order[distinct] = Some(l);
                distinct += 1;
                distinct - 1
            }
        };
        *slot = (index, kind, k);
    }
    let order = &order[..distinct];
    let mut guards_inline: [Option<GilRefMut<'_, window::SlidingWindow>>; INLINE] =
        [const { None }; INLINE];
    let mut guards_heap = Vec::new();
    let guards: &mut [Option<GilRefMut<'_, window::SlidingWindow>>] = if distinct <= INLINE {
        &mut guards_inline[..distinct]
    } else {
        guards_heap.resize_with(distinct, || None);
        &mut guards_heap
    };
    for (g, l) in guards.iter_mut().zip(order) {
        *g = l.map(|l| l.get().inner.borrow_mut(l.py())).transpose()?;
    }
    let d = window::hit_all(guards, keys, cost, now)?;
    Ok((
        d.allowed,
        d.first_denied.map_or(-1, |i| i as i64),
        retry_secs(d.retry_after),
        d.remaining,
    ))
}

/// One `(SlidingWindow, key)` item of `hit_all`'s `checks`, validated.
#[inline]
fn pair<'py>(item: &Bound<'py, PyAny>) -> PyResult<Pair<'py>> {
    let tuple = check_tuple(item, 2, "(SlidingWindow, key)")?;
    let limiter = &tuple.as_slice()[0];
    if limiter.cast::<SlidingWindow>().is_err() {
        return Err(wrong_type("a check's limiter", "SlidingWindow", limiter));
    }
    Ok(tuple.clone())
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SlidingWindow>()?;
    m.add_function(wrap_pyfunction!(hit_all, m)?)?;
    Ok(())
}
