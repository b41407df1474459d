//! `GilCell`: interior mutability for a pyclass whose every access holds the GIL.
//!
//! Why not a mutex: an uncontended `parking_lot::Mutex` lock + unlock is two atomic read-modify-writes,
//! measured at ~6 ns of a 32 ns `LruCache.get` miss here — the difference between beating cachebox and
//! not. The GIL already serialises every call into this module (it is declared `gil_used`, so a
//! free-threaded interpreter re-enables the GIL when importing it), so a second lock buys nothing as
//! long as no Python code runs, and the GIL is never released, while the cell is borrowed. Callers
//! keep that rule: they convert arguments and call Python (timers, iterators, `__hash__`) before
//! [`GilCell::with`] and build Python containers after it; inside they only create `bytes`/`str`/`int`
//! objects, which never run Python code or release the GIL.
//!
//! A plain (non-atomic) flag turns any breach of that rule — re-entry on the same thread — into a
//! `RuntimeError` instead of aliased `&mut`.

use std::cell::{Cell, UnsafeCell};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

pub(crate) struct GilCell<T> {
    value: UnsafeCell<T>,
    borrowed: Cell<bool>,
}

// SAFETY: every access goes through `with`, which requires a `Python` token (the GIL is held), and the
// GIL is not released while the borrow lasts (module rule above), so no two threads touch `value` or
// `borrowed` at once. `T: Send` because the value may be used from whichever thread holds the GIL.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub(crate) fn new(value: T) -> Self {
        GilCell { value: UnsafeCell::new(value), borrowed: Cell::new(false) }
    }

    /// Run `f` with exclusive access. `f` must not call Python code (see the module doc).
    #[inline]
    pub(crate) fn with<R>(&self, _py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> PyResult<R> {
        if self.borrowed.replace(true) {
            return Err(reentered());
        }
        struct Release<'a>(&'a Cell<bool>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _release = Release(&self.borrowed);
        // SAFETY: the flag was clear, so no other `&mut` to `value` exists; the GIL (held, as `_py`
        // proves) keeps other threads out until `_release` clears the flag.
        Ok(f(unsafe { &mut *self.value.get() }))
    }
}

#[cold]
#[inline(never)]
fn reentered() -> PyErr {
    PyRuntimeError::new_err("structure re-entered while in use (a callback ran inside an operation)")
}
