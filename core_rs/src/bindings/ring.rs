//! `HashRing` for Python: an `RwLock` around [`crate::ring::HashRing`] plus argument conversion.
//!
//! Each node keeps its name as a Python `str`, so a lookup returns a new reference instead of
//! building a string. Lookups keep the GIL (they are ~100 ns); `add`/`remove` and construction
//! release it while they hash, sort and merge points — taking the ring lock only after detaching,
//! so a thread holding the lock never waits for the GIL.

use parking_lot::RwLock;
use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyMapping, PyString, PyTuple};

use super::keys::{key_parts, wrong_type};
use crate::ring::{self, DEFAULT_VNODES};

type Ring = ring::HashRing<Py<PyString>>;

/// Consistent-hash ring of named nodes, with weights, virtual nodes and optional bounded loads.
///
/// ``nodes`` is an iterable of names (weight 1), of ``(name, weight)`` tuples, or a mapping
/// name → weight; a repeated name keeps its last weight. Each node gets
/// ``round(weight * vnodes)`` points (halves away from zero; weights are floats > 0 and must give
/// at least one point). Positions use MurmurHash64A with seed 0 (8-byte words little-endian): a
/// ``str`` key hashes as its UTF-8 bytes, so ``"a"`` and ``b"a"`` land on the same node, and
/// replica ``i`` of node ``name`` sits at ``hash(name.encode() + i.to_bytes(4, "little"))``. Equal
/// points are ordered by node name. Placement therefore depends only on the set of nodes and
/// weights — not insertion order, process or ``PYTHONHASHSEED`` — and removing (adding) a node
/// moves only the keys it owned (gains).
///
/// The default ``vnodes=1000`` keeps 10 equal nodes within ~5% of the mean load (160, the ketama
/// default, gives ~12%).
///
/// ``balance_factor`` (> 1.0) enables bounded loads for ``acquire``: a node whose in-flight load
/// has reached ``ceil(balance_factor * (total_load + 1) / n * points / mean_points)`` — with equal
/// weights ``ceil(balance_factor * (total_load + 1) / n)`` — is skipped, walking clockwise.
/// Thread-safe.
#[pyclass(module = "pyproxy._core", name = "HashRing", frozen)]
pub struct HashRing {
    inner: RwLock<Ring>,
}

/// A node name: a `str` (a subclass is copied to a plain `str`).
fn node_name<'py>(node: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyString>> {
    match node.cast_exact::<PyString>() {
        Ok(s) => Ok(s.clone()),
        Err(_) => match node.cast::<PyString>() {
            Ok(s) => Ok(PyString::new(node.py(), s.to_str()?)),
            Err(_) => Err(wrong_type("node", "str", node)),
        },
    }
}

#[cold]
#[inline(never)]
fn unknown(node: &Bound<'_, PyAny>) -> PyErr {
    PyKeyError::new_err(node.clone().unbind())
}

/// `n` for `get_n`: an int >= 0; larger than any ring is "all nodes".
fn count_arg(name: &str, value: &Bound<'_, PyAny>) -> PyResult<usize> {
    match value.extract::<i64>() {
        Ok(v) if v < 0 => Err(PyValueError::new_err(format!(
            "{name} must be >= 0, got {v}"
        ))),
        Ok(v) => Ok(usize::try_from(v).unwrap_or(usize::MAX)),
        Err(e) => match value.cast::<PyInt>() {
            // An int beyond i64: its sign decides.
            Ok(i) if i.lt(0)? => Err(PyValueError::new_err(format!(
                "{name} must be >= 0, got {i}"
            ))),
            Ok(_) => Ok(usize::MAX),
            Err(_) => Err(e),
        },
    }
}

fn vnodes_arg(vnodes: i64) -> PyResult<u32> {
    match u32::try_from(vnodes) {
        Ok(v) if (1..=ring::MAX_VNODES).contains(&v) => Ok(v),
        _ => Err(PyValueError::new_err(format!(
            "vnodes must be in 1..={}, got {vnodes}",
            ring::MAX_VNODES
        ))),
    }
}

/// The `(name, weight)` items of the constructor's `nodes` argument.
fn node_items<'py>(nodes: &Bound<'py, PyAny>) -> PyResult<Vec<(Bound<'py, PyString>, f64)>> {
    if nodes.is_instance_of::<PyString>() || nodes.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(PyTypeError::new_err(
            "nodes must be an iterable of names, of (name, weight) pairs, or a mapping; not a single str/bytes",
        ));
    }
    let mut out = Vec::new();
    if let Ok(d) = nodes.cast::<PyDict>() {
        for (k, v) in d.iter() {
            out.push((node_name(&k)?, v.extract::<f64>()?));
        }
        return Ok(out);
    }
    if let Ok(m) = nodes.cast::<PyMapping>() {
        for item in m.items()?.iter() {
            let (k, v): (Bound<'py, PyAny>, f64) = item.extract()?;
            out.push((node_name(&k)?, v));
        }
        return Ok(out);
    }
    let iter = nodes.try_iter().map_err(|_| {
        wrong_type(
            "nodes",
            "an iterable of names, of (name, weight) pairs, or a mapping",
            nodes,
        )
    })?;
    for item in iter {
        let item = item?;
        if item.is_instance_of::<PyString>() {
            out.push((node_name(&item)?, 1.0));
        } else if let Ok(t) = item.cast::<PyTuple>() {
            let (k, v): (Bound<'py, PyAny>, f64) = t.extract()?;
            out.push((node_name(&k)?, v));
        } else {
            return Err(wrong_type(
                "each node",
                "a str name or a (name, weight) tuple",
                &item,
            ));
        }
    }
    Ok(out)
}

impl HashRing {
    fn slot(&self, ring: &Ring, node: &Bound<'_, PyAny>) -> PyResult<ring::Slot> {
        let name = node_name(node)?;
        ring.slot_of(name.to_str()?).ok_or_else(|| unknown(node))
    }
}

#[pymethods]
impl HashRing {
    #[new]
    #[pyo3(
        signature = (nodes=None, *, vnodes=DEFAULT_VNODES as i64, balance_factor=None),
        text_signature = "(nodes=(), *, vnodes=1000, balance_factor=None)"
    )]
    fn new(
        py: Python<'_>,
        nodes: Option<&Bound<'_, PyAny>>,
        vnodes: i64,
        balance_factor: Option<f64>,
    ) -> PyResult<Self> {
        let vnodes = vnodes_arg(vnodes)?;
        let items = match nodes {
            Some(n) => node_items(n)?,
            None => Vec::new(),
        };
        let mut owned = Vec::with_capacity(items.len());
        for (name, weight) in items {
            owned.push((name.to_str()?.to_owned(), weight, name.unbind()));
        }
        // On error the names are dropped detached; PyO3's reference pool defers those decrefs.
        let ring = py.detach(|| Ring::with_nodes(vnodes, balance_factor, owned))?;
        Ok(HashRing {
            inner: RwLock::new(ring),
        })
    }

    /// Add ``node`` with ``weight`` (a float > 0; ``round(weight * vnodes)`` points, at least 1).
    /// Adding a node already on the ring changes its weight and keeps its load.
    #[pyo3(signature = (node, weight=1.0))]
    fn add(&self, py: Python<'_>, node: &Bound<'_, PyAny>, weight: f64) -> PyResult<()> {
        let name = node_name(node)?;
        let text = name.to_str()?;
        let data = name.clone().unbind();
        let old = py.detach(|| self.inner.write().add(text, weight, data))?;
        drop(old); // the previous name object, released with the GIL held
        Ok(())
    }

    /// Remove ``node`` (``KeyError`` if absent). Its keys move to the next nodes clockwise; its load
    /// counter is dropped, so a later ``release(node)`` raises ``KeyError`` (or, once the node is
    /// added again with load 0, ``ValueError``).
    fn remove(&self, py: Python<'_>, node: &Bound<'_, PyAny>) -> PyResult<()> {
        let name = node_name(node)?;
        let text = name.to_str()?;
        match py.detach(|| self.inner.write().remove(text)) {
            Some(_) => Ok(()),
            None => Err(unknown(node)),
        }
    }

    /// The node owning ``key`` (``str`` hashed as UTF-8, or ``bytes``). ``LookupError`` if empty.
    #[inline]
    fn get<'py>(&self, py: Python<'py>, key: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyString>> {
        let (_, k) = key_parts(key)?;
        let ring = self.inner.read();
        let slot = ring.get(k)?;
        Ok(ring.data(slot).clone_ref(py).into_bound(py))
    }

    /// Up to ``n`` distinct nodes in ring order from ``key``'s point: ``get(key)`` first, then the
    /// failover order. ``n`` at or above ``len(ring)`` returns every node. ``LookupError`` if empty.
    fn get_n<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        n: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyString>>> {
        let (_, k) = key_parts(key)?;
        let n = count_arg("n", n)?;
        let ring = self.inner.read();
        let slots = ring.get_n(k, n)?;
        Ok(slots
            .into_iter()
            .map(|s| ring.data(s).clone_ref(py).into_bound(py))
            .collect())
    }

    /// Pick a node for ``key`` and count one unit of in-flight load on it. With a
    /// ``balance_factor``, nodes at capacity are skipped clockwise; without, this is ``get`` plus
    /// counting. Pair every call with ``release(node)``. ``LookupError`` if empty.
    fn acquire<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyString>> {
        let (_, k) = key_parts(key)?;
        let mut ring = self.inner.write();
        let slot = ring.acquire(k)?;
        Ok(ring.data(slot).clone_ref(py).into_bound(py))
    }

    /// Give back one unit of load taken by ``acquire``. ``KeyError`` if ``node`` is not on the ring,
    /// ``ValueError`` if its load is already 0.
    fn release(&self, node: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut ring = self.inner.write();
        let slot = self.slot(&ring, node)?;
        ring.release(slot)?;
        Ok(())
    }

    /// In-flight load of ``node`` (``KeyError`` if absent).
    fn load(&self, node: &Bound<'_, PyAny>) -> PyResult<u64> {
        let ring = self.inner.read();
        let slot = self.slot(&ring, node)?;
        Ok(ring.load(slot))
    }

    /// ``{node: load}`` for every node, in name order.
    fn loads<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ring = self.inner.read();
        let d = PyDict::new(py);
        for (_, _, _, load, name) in ring.nodes() {
            d.set_item(name.bind(py), load)?;
        }
        Ok(d)
    }

    /// The 64-bit ring position of ``key``: MurmurHash64A, seed 0, of its bytes (``str`` as UTF-8).
    #[staticmethod]
    fn hash(key: &Bound<'_, PyAny>) -> PyResult<u64> {
        let (_, k) = key_parts(key)?;
        Ok(ring::hash64(k))
    }

    /// ``{node: weight}`` (weights as floats), in name order; a snapshot.
    #[getter]
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ring = self.inner.read();
        let d = PyDict::new(py);
        for (_, _, weight, _, name) in ring.nodes() {
            d.set_item(name.bind(py), weight)?;
        }
        Ok(d)
    }

    /// Virtual nodes (points) per unit of weight.
    #[getter]
    fn vnodes(&self) -> u32 {
        self.inner.read().vnodes()
    }

    /// The bounded-load factor, or ``None`` when ``acquire`` does not bound loads.
    #[getter]
    fn balance_factor(&self) -> Option<f64> {
        self.inner.read().balance_factor()
    }

    /// Total points on the ring (the sum of ``round(weight * vnodes)`` over nodes).
    #[getter]
    fn points(&self) -> usize {
        self.inner.read().point_count()
    }

    /// Number of nodes.
    fn __len__(&self) -> usize {
        self.inner.read().len()
    }

    /// ``True`` if ``node`` is a name on the ring (anything that is not a ``str`` is not).
    fn __contains__(&self, node: &Bound<'_, PyAny>) -> PyResult<bool> {
        match node.cast::<PyString>() {
            Ok(s) => Ok(self.inner.read().contains(s.to_str()?)),
            Err(_) => Ok(false),
        }
    }

    fn __repr__(&self) -> String {
        let ring = self.inner.read();
        format!(
            "HashRing(nodes={}, points={}, vnodes={}, balance_factor={})",
            ring.len(),
            ring.point_count(),
            ring.vnodes(),
            ring.balance_factor()
                .map_or("None".to_string(), |f| f.to_string())
        )
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<HashRing>()?;
    Ok(())
}
