//! The PyO3 layer: `pyproxy._core`. Each submodule wraps one algorithm module and does argument
//! conversion only; no algorithm lives here.

use pyo3::prelude::*;

mod cache;
mod errors;
mod gil_cell;
mod hybrid;
mod keys;
mod plan;
mod ring;
mod shared_window;
mod window;

// `gil_used`: the structures use the GIL as their lock (`gil_cell.rs`), so a free-threaded
// interpreter must keep its GIL on for this module.
#[pymodule(gil_used = true)]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The wheel's Python code checks this against its own version at import (as polars does), so a
    // stale extension left in a source tree is caught instead of half-working.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    cache::register(m)?;
    ring::register(m)?;
    window::register(m)?;
    shared_window::register(m)?;
    plan::register(m)?;
    hybrid::register(m)?;
    Ok(())
}
