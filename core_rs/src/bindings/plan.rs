//! What the prepared plans of both limiters share (`ChargePlan` over the shared table,
//! `HybridPlan` over hybrid counters): the response fields an allowed charge answers, and the
//! `Tally` of allowed charges.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use super::keys::wrong_type;

/// A count several plans (``ChargePlan``, ``HybridPlan``) add their allowed charges to (one per
/// limiter: its statistics then hold whatever plans it handed out, however long they live).
/// Thread-safe.
#[pyclass(module = "pyproxy._core", name = "Tally", frozen)]
#[derive(Default)]
pub struct Tally {
    count: AtomicU64,
}

#[pymethods]
impl Tally {
    #[new]
    fn new() -> Self {
        Tally::default()
    }

    /// The count.
    #[getter]
    fn value(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn __repr__(&self) -> String {
        format!("Tally({})", self.value())
    }
}

impl Tally {
    #[inline]
    pub(super) fn add_one(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// What every plan does with an allowed charge: count it in its tally and answer the response
/// fields (the plan's ``fields`` and ``tally`` arguments).
pub(super) struct PlanOutput {
    fields: Option<PlanFields>,
    tally: Py<Tally>,
}

impl PlanOutput {
    /// From the ``fields`` (one state prefix per each of ``n`` checks) and ``tally`` arguments; a
    /// tally of the plan's own when none is given.
    pub(super) fn new(
        py: Python<'_>,
        fields: Option<&Bound<'_, PyTuple>>,
        n: usize,
        tally: Option<Py<Tally>>,
    ) -> PyResult<Self> {
        let fields = fields.map(|f| PlanFields::parse(f, n)).transpose()?;
        let tally = match tally {
            Some(t) => t,
            None => Py::new(py, Tally::default())?,
        };
        Ok(PlanOutput { fields, tally })
    }

    /// An allowed charge: counted, and its answer — the fields for ``binding``
    /// ``(check index, remaining, reset seconds)``, or ``[]`` when the plan writes none.
    pub(super) fn allowed<'py>(
        &self,
        py: Python<'py>,
        binding: Option<(usize, u64, f64)>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.tally.get().add_one();
        match (&self.fields, binding) {
            (Some(f), Some((index, remaining, reset))) => f.answer(py, index, remaining, reset),
            _ => Ok(PyList::empty(py)),
        }
    }

    pub(super) fn tally(&self, py: Python<'_>) -> Py<Tally> {
        self.tally.clone_ref(py)
    }
}

/// What an allowed charge of a plan puts in the response: the ``RateLimit-Policy`` field as it
/// is, and the ``RateLimit`` field naming the binding check.
struct PlanFields {
    policy: Py<PyTuple>,
    state_name: Py<PyBytes>,
    prefixes: Vec<Box<[u8]>>,
}

impl PlanFields {
    /// ``fields`` argument ``(policy_field, state_name, state_prefixes)``, one prefix per check.
    fn parse(f: &Bound<'_, PyTuple>, n: usize) -> PyResult<Self> {
        let (policy, state_name, prefixes): (Bound<'_, PyTuple>, Bound<'_, PyBytes>, Vec<Vec<u8>>) =
            f.extract().map_err(|_| {
                wrong_type(
                    "fields",
                    "(policy_field: tuple[bytes, bytes], state_name: bytes, state_prefixes: list[bytes])",
                    f.as_any(),
                )
            })?;
        let pair_of_bytes = policy.len() == 2 && policy.iter().all(|x| x.cast::<PyBytes>().is_ok());
        if !pair_of_bytes {
            return Err(wrong_type(
                "policy_field",
                "a (bytes, bytes) pair",
                policy.as_any(),
            ));
        }
        if prefixes.len() != n {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "state_prefixes must have one entry per check ({n}), got {}",
                prefixes.len()
            )));
        }
        Ok(PlanFields {
            policy: policy.unbind(),
            state_name: state_name.unbind(),
            prefixes: prefixes.into_iter().map(Vec::into_boxed_slice).collect(),
        })
    }

    /// ``[policy_field, (state_name, prefix + b"<remaining>;t=<seconds>")]`` for check ``index``:
    /// the seconds rounded up as the Python side's ``_whole_seconds`` does (the same float
    /// operations, so the same digits).
    fn answer<'py>(
        &self,
        py: Python<'py>,
        index: usize,
        remaining: u64,
        reset_secs: f64,
    ) -> PyResult<Bound<'py, PyList>> {
        let prefix = &self.prefixes[index];
        let mut value = Vec::with_capacity(prefix.len() + 24);
        value.extend_from_slice(prefix);
        let secs = (reset_secs - 1e-9).ceil().max(0.0) as u64;
        // Writing into a Vec cannot fail.
        let _ = write!(value, "{remaining};t={secs}");
        let state = PyTuple::new(
            py,
            [
                self.state_name.bind(py).clone().into_any(),
                PyBytes::new(py, &value).into_any(),
            ],
        )?;
        PyList::new(
            py,
            [self.policy.bind(py).clone().into_any(), state.into_any()],
        )
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tally>()?;
    Ok(())
}
