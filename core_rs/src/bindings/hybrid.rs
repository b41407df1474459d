//! Hybrid rate limiting's local side for Python: [`crate::hybrid`]'s counters, the estimate of
//! Redis' clock they are decided on, the all-or-none charge, and `HybridPlan` (a prepared charge
//! answering the response fields, like `ChargePlan` for the shared table).
//!
//! One process and one event loop own these objects; the GIL is their lock ([`GilCell`]).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use super::gil_cell::{GilCell, GilRefMut};
use super::keys::at_least;
use super::plan::{PlanOutput, Tally};
use super::window::cost_arg;
use crate::clock;
use crate::hybrid::{self, binding, charge_all, Charged};

/// One counter of a hybrid limiter: the cluster-wide counts of two windows as Redis last
/// reported them, plus this process's units pending (not sent) and in flight (sent, no reply yet).
/// ``HybridCounter(rkey, key, limit, window_us)``; ``rkey`` is its Redis key, ``key`` the check's.
#[pyclass(module = "pyproxy._core", name = "HybridCounter", frozen)]
pub struct HybridCounter {
    inner: GilCell<hybrid::HybridCounter>,
    rkey: Py<PyString>,
    key: Py<PyString>,
    limit: u64,
    w: u64,
}

#[pymethods]
impl HybridCounter {
    #[new]
    fn new(
        rkey: Bound<'_, PyString>,
        key: Bound<'_, PyString>,
        limit: i64,
        window_us: i64,
    ) -> PyResult<Self> {
        let limit = at_least("limit", limit, 0)?; // 0: every charge is refused
        let w = at_least("window_us", window_us, 1)?;
        Ok(HybridCounter {
            inner: GilCell::new(hybrid::HybridCounter::new(limit, w)),
            rkey: rkey.unbind(),
            key: key.unbind(),
            limit,
            w,
        })
    }

    #[getter]
    fn rkey(&self, py: Python<'_>) -> Py<PyString> {
        self.rkey.clone_ref(py)
    }

    #[getter]
    fn key(&self, py: Python<'_>) -> Py<PyString> {
        self.key.clone_ref(py)
    }

    #[getter]
    fn limit(&self) -> u64 {
        self.limit
    }

    /// Window, µs.
    #[getter]
    fn w(&self) -> u64 {
        self.w
    }

    /// The window the global counts are of, and those counts: ``(gidx, previous, current)``.
    #[getter]
    fn global_counts(&self, py: Python<'_>) -> PyResult<(i64, u64, u64)> {
        self.inner.with(py, |c| (c.gidx, c.gp, c.gc))
    }

    /// Used since the last sync.
    #[getter]
    fn used(&self, py: Python<'_>) -> PyResult<bool> {
        self.inner.with(py, |c| c.used)
    }

    /// Mark it used (it is reconciled at the next sync).
    fn touch(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.with(py, |c| c.used = true)
    }

    /// Nothing to push and not used since the last sync: may be forgotten.
    #[getter]
    fn idle(&self, py: Python<'_>) -> PyResult<bool> {
        self.inner.with(py, |c| c.idle())
    }

    /// Units not sent yet, ``[(window index, units)]``.
    #[getter]
    fn pending(&self, py: Python<'_>) -> PyResult<Vec<(i64, u64)>> {
        self.inner.with(py, |c| c.pending.items().to_vec())
    }

    /// Units in window ``idx`` as far as this process knows.
    fn count(&self, py: Python<'_>, idx: i64) -> PyResult<u64> {
        self.inner.with(py, |c| c.count(idx))
    }

    /// Its limiter no longer reconciles it: charges through it are refused from now on.
    fn retire(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.with(py, |c| c.retired = true)
    }

    /// Add ``units`` to window ``idx`` (pending) and mark it used.
    fn add(&self, py: Python<'_>, idx: i64, units: u64) -> PyResult<()> {
        self.inner.with(py, |c| {
            c.pending.add(idx, units);
            c.used = true;
        })
    }

    /// A sync starts: what is pending goes in flight; returns everything in flight.
    fn begin_sync(&self, py: Python<'_>) -> PyResult<Vec<(i64, u64)>> {
        self.inner.with(py, |c| c.begin_sync().items().to_vec())
    }

    /// The sync failed: what was in flight is pending again.
    fn sync_failed(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.with(py, |c| c.sync_failed())
    }

    /// The sync ran at Redis time ``now_us`` and reported ``(previous, current)`` window counts:
    /// they replace this view's. Returns the units it pushed.
    fn sync_done(&self, py: Python<'_>, now_us: u64, previous: u64, current: u64) -> PyResult<u64> {
        self.inner
            .with(py, |c| c.sync_done(now_us, previous, current))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let key = self.key.bind(py).to_string();
        self.inner.with(py, |c| {
            format!(
                "HybridCounter({key:?}, limit={}, w={}, gidx={}, gp={}, gc={}, pending={:?}, inflight={:?})",
                c.limit,
                c.w,
                c.gidx,
                c.gp,
                c.gc,
                c.pending.items(),
                c.inflight.items()
            )
        })
    }
}

/// A hybrid limiter's estimate of Redis' clock (this process's monotonic clock plus an offset
/// learnt at each sync; it never goes back) and whether Redis is reachable (``degraded``: no).
#[pyclass(module = "pyproxy._core", name = "HybridClock", frozen)]
pub struct HybridClock {
    inner: GilCell<ClockState>,
}

struct ClockState {
    offset: f64,
    last_us: u64,
    degraded: bool,
}

#[pymethods]
impl HybridClock {
    #[new]
    fn new(offset: f64) -> Self {
        HybridClock {
            inner: GilCell::new(ClockState {
                offset,
                last_us: 0,
                degraded: false,
            }),
        }
    }

    /// Redis' time in µs at monotonic time ``now`` (seconds; default the monotonic clock).
    #[pyo3(signature = (now=None))]
    fn now_us(&self, py: Python<'_>, now: Option<f64>) -> PyResult<u64> {
        let now = now.unwrap_or_else(monotonic_secs);
        self.inner.with(py, |s| s.now_us(now))
    }

    /// Seconds to add to the monotonic clock for Redis' (set at each sync).
    #[getter]
    fn offset(&self, py: Python<'_>) -> PyResult<f64> {
        self.inner.with(py, |s| s.offset)
    }

    #[setter]
    fn set_offset(&self, py: Python<'_>, offset: f64) -> PyResult<()> {
        self.inner.with(py, |s| s.offset = offset)
    }

    /// Redis is unreachable: decisions are the local limiter's, plans answer ``None``.
    #[getter]
    fn degraded(&self, py: Python<'_>) -> PyResult<bool> {
        self.inner.with(py, |s| s.degraded)
    }

    #[setter]
    fn set_degraded(&self, py: Python<'_>, degraded: bool) -> PyResult<()> {
        self.inner.with(py, |s| s.degraded = degraded)
    }
}

impl ClockState {
    #[inline]
    fn now_us(&mut self, mono: f64) -> u64 {
        // as Python's int((clock() + offset) * 1e6): truncation (the value is positive)
        let now = ((mono + self.offset) * 1e6).max(0.0) as u64;
        self.last_us = self.last_us.max(now);
        self.last_us
    }
}

#[inline]
fn monotonic_secs() -> f64 {
    clock::monotonic_ns() as f64 / 1e9
}

/// `(window index, offset, current count before, remaining, reset µs)` of one charged counter.
type ChargedTuple = (i64, u64, u64, u64, u64);

/// Charge ``cost`` to every counter at Redis time ``t_us`` if each leaves room (all or none):
/// ``(binding, [(window index, offset, current count before, remaining, reset µs)])`` — one tuple
/// per counter, ``binding`` the index of the one a ``RateLimit`` header advertises (least
/// remaining, on a tie the latest reset) — or ``None`` with nothing charged. The counters must be
/// distinct and at least one (``ValueError`` otherwise).
#[pyfunction]
fn hybrid_charge(
    py: Python<'_>,
    counters: Vec<Py<HybridCounter>>,
    cost: i64,
    t_us: u64,
) -> PyResult<Option<(usize, Vec<ChargedTuple>)>> {
    if counters.is_empty() {
        return Err(PyValueError::new_err("counters must not be empty"));
    }
    distinct(py, &counters)?;
    let mut out = Vec::with_capacity(counters.len());
    if !charge(py, &counters, cost_arg(cost)?, t_us, &mut out)? {
        return Ok(None);
    }
    let chosen = binding(&out).unwrap_or(0);
    let tuples = out
        .iter()
        .map(|c| (c.idx, c.e, c.cur, c.remaining, c.reset));
    Ok(Some((chosen, tuples.collect())))
}

fn distinct(py: Python<'_>, counters: &[Py<HybridCounter>]) -> PyResult<()> {
    for (i, c) in counters.iter().enumerate() {
        if counters[..i].iter().any(|o| o.is(c.bind(py))) {
            return Err(PyValueError::new_err("a counter is listed twice"));
        }
    }
    Ok(())
}

/// Borrow every counter (distinct: checked by the callers) and [`charge_all`].
fn charge(
    py: Python<'_>,
    counters: &[Py<HybridCounter>],
    cost: u64,
    t_us: u64,
    out: &mut Vec<Charged>,
) -> PyResult<bool> {
    let mut guards: Vec<GilRefMut<'_, hybrid::HybridCounter>> = Vec::with_capacity(counters.len());
    for c in counters {
        guards.push(c.get().inner.borrow_mut(py)?);
    }
    let mut refs: Vec<&mut hybrid::HybridCounter> = guards.iter_mut().map(|g| &mut **g).collect();
    Ok(charge_all(&mut refs, cost, t_us, out))
}

/// Hybrid counters prepared for one tuple of checks, charged many times: ``charge(now=None)``
/// decides at Redis time (``clock``'s estimate at monotonic ``now``) and charges as
/// ``hybrid_charge`` does; allowed → the response fields (``[]`` without ``fields``) and one more
/// in ``tally``; denied, or Redis unreachable (``clock.degraded``) → ``None``, nothing charged.
/// ``fields`` as for ``ChargePlan``. ``HybridPlan(counters, cost, clock, fields=None, tally=None)``.
#[pyclass(module = "pyproxy._core", name = "HybridPlan", frozen)]
pub struct HybridPlan {
    counters: Vec<Py<HybridCounter>>,
    cost: u64,
    clock: Py<HybridClock>,
    output: PlanOutput,
}

#[pymethods]
impl HybridPlan {
    #[new]
    #[pyo3(signature = (counters, cost, clock, fields=None, tally=None))]
    fn new(
        py: Python<'_>,
        counters: Vec<Py<HybridCounter>>,
        cost: i64,
        clock: Py<HybridClock>,
        fields: Option<&Bound<'_, PyTuple>>,
        tally: Option<Py<Tally>>,
    ) -> PyResult<Self> {
        if counters.is_empty() {
            return Err(PyValueError::new_err("counters must not be empty"));
        }
        distinct(py, &counters)?;
        Ok(HybridPlan {
            cost: cost_arg(cost)?,
            output: PlanOutput::new(py, fields, counters.len(), tally)?,
            counters,
            clock,
        })
    }

    #[pyo3(signature = (now=None))]
    fn charge<'py>(
        &self,
        py: Python<'py>,
        now: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let t_us = {
            let mut clock = self.clock.get().inner.borrow_mut(py)?;
            if clock.degraded {
                return Ok(None);
            }
            clock.now_us(now.unwrap_or_else(monotonic_secs))
        };
        let mut out = Vec::with_capacity(self.counters.len());
        if !charge(py, &self.counters, self.cost, t_us, &mut out)? {
            return Ok(None);
        }
        let b = binding(&out).map(|i| (i, out[i].remaining, out[i].reset as f64 / 1e6));
        Ok(Some(self.output.allowed(py, b)?))
    }

    /// The count the allowed charges go to.
    #[getter]
    fn tally(&self, py: Python<'_>) -> Py<Tally> {
        self.output.tally(py)
    }

    fn __len__(&self) -> usize {
        self.counters.len()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HybridCounter>()?;
    m.add_class::<HybridClock>()?;
    m.add_class::<HybridPlan>()?;
    m.add_function(wrap_pyfunction!(hybrid_charge, m)?)?;
    Ok(())
}
