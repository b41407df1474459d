//! `SharedWindows` for Python: argument conversion around [`crate::shared_window::SharedWindows`].
//!
//! No cell and no lock here: the table is all atomics and synchronises itself across threads and
//! processes, so the pyclass is `frozen` and its methods take `&self`. The GIL is kept (a hit is
//! far below the cost of releasing it).

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::keys::{at_least, check_tuple, key_parts};
use super::plan::{PlanOutput, Tally};
use super::window::{cost_arg, decision_tuple, now_ns, retry_secs, scratch, with_parsed, INLINE};
use crate::clock;
use crate::error::check_seconds;
use crate::shared_window::{self, Check};

/// Sliding-window rate-limit counters in shared memory, for every worker process of a machine: at
/// most ``limit`` units per ``window`` seconds per key, counted once for all the processes.
///
/// **Create it before forking**: the table is an anonymous ``MAP_SHARED`` mapping, so processes
/// forked after it is made (``os.fork()``, a supervisor starting its workers) share it; a process
/// that creates its own has a table of its own.
///
/// Each key is counted exactly as ``SlidingWindow``'s counter mode (``exact=False``) counts it —
/// the same estimate, rounding, ``remaining`` and ``retry_after`` — and ``hit``/``hit_all`` return
/// the same tuples as ``SlidingWindow.hit`` and ``hit_all``. A counter is identified by
/// ``(window, key)`` (``str`` and ``bytes`` keys are distinct); ``limit`` is an argument of each
/// call, so levels sharing a window need distinct keys (prefix them), and a changed limit applies
/// to the counts already there. Hits are charged with one atomic compare-and-swap each, so the
/// limit holds whatever the number of processes and threads; a process killed mid-call leaves no
/// lock behind.
///
/// ``capacity`` is rounded up to a power of two (at least 16) slots of 32 bytes. A key takes a slot
/// from its first charge until two windows after its last; expired slots are reused, no sweeping.
/// A new key that finds no free slot near its home (the table is too full) is **allowed without
/// being counted** and ``overflows`` goes up: size the table at about twice the keys live at once.
/// Keys are kept as 128-bit hashes (random seeds per table): two keys share a counter only on a
/// full 128-bit collision.
///
/// ``now`` is seconds on ``time.monotonic()``'s clock (the default), the same clock in every
/// process; a ``now`` earlier than the window a key's counter has reached counts as that window's
/// start. Not picklable: a table belongs to the processes that inherit its mapping.
///
/// Bad input: a non-``str``/``bytes`` key or a non-number → ``TypeError``; ``limit`` outside
/// ``1..2**32-1``, ``window`` not finite or below 1 ns or above ~36 years, ``cost < 0``, ``now``
/// negative or not finite → ``ValueError``; integers beyond 64 bits → ``OverflowError``; the
/// mapping refused → ``OSError``.
#[pyclass(module = "pyproxy._core", name = "SharedWindows", frozen)]
pub struct SharedWindows {
    inner: shared_window::SharedWindows,
}

#[inline]
fn limit_arg(limit: i64) -> PyResult<u64> {
    at_least("limit", limit, 1)
}

#[inline]
fn window_ns(window: f64) -> PyResult<u64> {
    Ok(clock::secs_to_ns(check_seconds("window", window, false)?))
}

#[pymethods]
impl SharedWindows {
    #[new]
    fn new(capacity: i64) -> PyResult<Self> {
        let capacity = at_least("capacity", capacity, 1)?;
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        Ok(SharedWindows {
            inner: shared_window::SharedWindows::new(capacity)?,
        })
    }

    /// Charge ``cost`` to ``key`` under ``limit`` per ``window`` seconds if it fits; returns
    /// ``(allowed, remaining, retry_after)`` as ``SlidingWindow.hit`` does.
    #[pyo3(signature = (limit, window, key, cost=1, now=None))]
    #[inline]
    fn hit(
        &self,
        limit: i64,
        window: f64,
        key: &Bound<'_, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, u64, f64)> {
        let (kind, k) = key_parts(key)?;
        let d = self.inner.hit(
            kind as u64,
            limit_arg(limit)?,
            window_ns(window)?,
            k,
            cost_arg(cost)?,
            now_ns(now)?,
        )?;
        Ok(decision_tuple(d))
    }

    /// Check several ``(limit, window, key)`` triples (global, route, user...) and charge
    /// ``cost`` to all of them only if every one allows it.
    ///
    /// Returns ``(allowed, first_denied, retry_after, remaining)`` as ``hit_all`` does for
    /// ``SlidingWindow``s. All are decided first on the counts as they stand; then each is charged
    /// by its own compare-and-swap, and if another process took the room in between, the charges
    /// already made are taken back (the result then reports that triple). A triple listed twice is
    /// charged twice. ``checks`` is any iterable of 3-tuples (a list or tuple is fastest) and must
    /// not be empty (``ValueError``).
    #[pyo3(signature = (checks, cost=1, now=None))]
    fn hit_all<'py>(
        &self,
        checks: &Bound<'py, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, i64, f64, u64)> {
        let (d, _) = self.decide_all(checks, cost, now, false)?;
        Ok((
            d.allowed,
            d.first_denied.map_or(-1, |i| i as i64),
            retry_secs(d.retry_after),
            d.remaining,
        ))
    }

    /// ``hit_all``, and when it allows the request, which triple a ``RateLimit`` header
    /// advertises: returns ``(allowed, first_denied, retry_after, remaining, binding, reset)``,
    /// where ``binding`` is the index of the triple with the least ``remaining`` after the charge
    /// (on a tie, the one whose usage ages out last), ``remaining`` is its remaining, and
    /// ``reset`` the seconds until its usage has aged out entirely. Denied: ``binding`` is -1,
    /// ``reset`` 0.0 and the rest as ``hit_all`` gives them.
    #[pyo3(signature = (checks, cost=1, now=None))]
    fn hit_all_binding<'py>(
        &self,
        checks: &Bound<'py, PyAny>,
        cost: i64,
        now: Option<f64>,
    ) -> PyResult<(bool, i64, f64, u64, i64, f64)> {
        let (d, b) = self.decide_all(checks, cost, now, true)?;
        let (remaining, binding, reset) = b.map_or((d.remaining, -1, 0.0), |b| {
            (b.remaining, b.index as i64, clock::ns_to_secs(b.reset))
        });
        Ok((
            d.allowed,
            d.first_denied.map_or(-1, |i| i as i64),
            retry_secs(d.retry_after),
            remaining,
            binding,
            reset,
        ))
    }

    /// Number of slots (``capacity`` rounded up to a power of two, at least 16).
    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// New keys allowed without being counted because the table had no room near their home slot
    /// (alarm on it; the fix is a bigger table).
    #[getter]
    fn overflows(&self) -> u64 {
        self.inner.overflows()
    }

    /// Bytes of shared memory the table maps.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.region_bytes()
    }

    /// Keys that still count at ``now`` (a charge in their current or previous window); default
    /// the monotonic clock. Reads every slot.
    #[pyo3(signature = (now=None))]
    fn live(&self, now: Option<f64>) -> PyResult<usize> {
        Ok(self.inner.len(now_ns(now)?))
    }

    /// ``live()`` as of the monotonic clock.
    fn __len__(&self) -> usize {
        self.inner.len(clock::monotonic_ns())
    }

    fn __repr__(&self) -> String {
        format!(
            "SharedWindows(capacity={}, overflows={})",
            self.inner.capacity(),
            self.inner.overflows()
        )
    }
}

impl SharedWindows {
    /// Parse ``checks`` (borrowing the keys from their objects) and decide them.
    fn decide_all(
        &self,
        checks: &Bound<'_, PyAny>,
        cost: i64,
        now: Option<f64>,
        binding: bool,
    ) -> PyResult<(crate::window::AllDecision, Option<shared_window::Binding>)> {
        let cost = cost_arg(cost)?;
        let now = now_ns(now)?;
        with_parsed(checks, triple, |triples| {
            let (mut inline, mut heap) = ([NO_CHECK; INLINE], Vec::new());
            let list = scratch(&mut inline, &mut heap, triples.len(), NO_CHECK);
            for (c, t) in list.iter_mut().zip(triples) {
                let Some((limit, window, key)) = t else {
                    continue;
                };
                let (kind, k) = key_parts(key)?;
                *c = Check {
                    limiter: kind as u64,
                    limit: *limit,
                    window: *window,
                    key: k,
                };
            }
            if binding {
                Ok(self.inner.hit_all_binding(list, cost, now)?)
            } else {
                Ok((self.inner.hit_all(list, cost, now)?, None))
            }
        })
    }
}

/// What a scratch list of checks holds before it is filled.
const NO_CHECK: Check<'static> = Check {
    limiter: 0,
    limit: 0,
    window: 0,
    key: &[],
};

/// `(limit, window ns, key object)` of one `hit_all` check.
type Triple<'py> = (u64, u64, Bound<'py, PyAny>);

#[inline]
fn triple<'py>(item: &Bound<'py, PyAny>) -> PyResult<Triple<'py>> {
    let tuple = check_tuple(item, 3, "(limit, window, key)")?;
    let limit = limit_arg(tuple.get_item(0)?.extract()?)?;
    let window = window_ns(tuple.get_item(1)?.extract()?)?;
    Ok((limit, window, tuple.get_item(2)?))
}

/// A fixed set of ``hit_all`` triples on one table, prepared once and charged many times: the
/// usual request of a rate-limit policy (one tuple of checks per route and key), decided and
/// charged by one call that converts nothing.
///
/// ``ChargePlan(table, checks, cost=1, fields=None)``: ``checks`` as for ``hit_all`` (the keys are
/// copied), at least one; ``fields``, if given, is ``(policy_field, state_name, state_prefixes)``:
/// the ``(name, value)`` pair an allowed request's response carries as it is (``RateLimit-Policy``),
/// and the name and the start of the value, per check, of the field that states the binding
/// check's standing (``RateLimit``: ``state_prefixes[i] + b"<remaining>;t=<reset seconds>"``).
///
/// ``charge(now=None)`` decides and charges exactly as ``hit_all_binding`` does: allowed → a list
/// of the fields (empty without ``fields``); denied → ``None``, nothing charged. Each allowed
/// charge adds one to ``tally`` (a [`Tally`] several plans may share; a new one if not given).
/// Thread-safe.
#[pyclass(module = "pyproxy._core", name = "ChargePlan", frozen)]
pub struct ChargePlan {
    table: Py<SharedWindows>,
    checks: Vec<PlannedCheck>,
    cost: u64,
    output: PlanOutput,
}

/// One triple of a [`ChargePlan`], its key owned.
struct PlannedCheck {
    kind: u64,
    limit: u64,
    window: u64,
    key: Box<[u8]>,
}

#[pymethods]
impl ChargePlan {
    #[new]
    #[pyo3(signature = (table, checks, cost=1, fields=None, tally=None))]
    fn new(
        py: Python<'_>,
        table: Py<SharedWindows>,
        checks: &Bound<'_, PyAny>,
        cost: i64,
        fields: Option<&Bound<'_, PyTuple>>,
        tally: Option<Py<Tally>>,
    ) -> PyResult<Self> {
        let cost = cost_arg(cost)?;
        let planned = with_parsed(checks, triple, |triples| {
            let mut planned = Vec::with_capacity(triples.len());
            for (limit, window, key) in triples.iter().flatten() {
                let (kind, k) = key_parts(key)?;
                planned.push(PlannedCheck {
                    kind: kind as u64,
                    limit: *limit,
                    window: *window,
                    key: k.into(),
                });
            }
            Ok(planned)
        })?;
        if planned.is_empty() {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "checks must not be empty",
            ));
        }
        let output = PlanOutput::new(py, fields, planned.len(), tally)?;
        Ok(ChargePlan {
            table,
            checks: planned,
            cost,
            output,
        })
    }

    /// Decide and charge (see the class); ``now`` as for ``hit_all``.
    #[pyo3(signature = (now=None))]
    fn charge<'py>(
        &self,
        py: Python<'py>,
        now: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let now = now_ns(now)?;
        let (mut inline, mut heap) = ([NO_CHECK; INLINE], Vec::new());
        let list = scratch(&mut inline, &mut heap, self.checks.len(), NO_CHECK);
        for (c, p) in list.iter_mut().zip(&self.checks) {
            *c = Check {
                limiter: p.kind,
                limit: p.limit,
                window: p.window,
                key: &p.key,
            };
        }
        let (d, binding) = self
            .table
            .get()
            .inner
            .hit_all_binding(list, self.cost, now)?;
        if !d.allowed {
            return Ok(None);
        }
        // An allowed decision always names its binding check (there is at least one check).
        let binding = binding.map(|b| (b.index, b.remaining, clock::ns_to_secs(b.reset)));
        Ok(Some(self.output.allowed(py, binding)?))
    }

    /// The count the allowed charges go to.
    #[getter]
    fn tally(&self, py: Python<'_>) -> Py<Tally> {
        self.output.tally(py)
    }

    /// Number of checks.
    fn __len__(&self) -> usize {
        self.checks.len()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SharedWindows>()?;
    m.add_class::<ChargePlan>()?;
    Ok(())
}
