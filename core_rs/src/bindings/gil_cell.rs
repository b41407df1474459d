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
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

pub(crate) struct GilCell<T> {
    value: UnsafeCell<T>,
    borrowed: Cell<bool>,
}

// SAFETY: every access goes through `borrow_mut`, which requires a `Python` token (the GIL is held), and the
// GIL is not released while the borrow lasts (module rule above), so no two threads touch `value` or
// `borrowed` at once. `T: Send` because the value may be used from whichever thread holds the GIL.
unsafe impl<T: Send> Sync for GilCell<T> {}

impl<T> GilCell<T> {
    pub(crate) fn new(value: T) -> Self {
        GilCell {
            value: UnsafeCell::new(value),
            borrowed: Cell::new(false),
        }
    }

    /// Exclusive access until the returned guard drops. The guard is `!Send`, so it cannot be moved
    /// into a closure that runs detached from the interpreter; Python code must not run while it
    /// lives (see the module doc). Several cells may be borrowed at once (`hit_all` does).
    #[inline]
    pub(crate) fn borrow_mut<'a>(&'a self, _py: Python<'a>) -> PyResult<GilRefMut<'a, T>> {
        if self.borrowed.replace(true) {
            return Err(reentered());
        }
        Ok(GilRefMut {
            cell: self,
            _not_send: PhantomData,
        })
    }

    /// Run `f` with exclusive access. `f` must not call Python code (see the module doc).
    #[inline]
    pub(crate) fn with<R>(&self, py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> PyResult<R> {
        let mut guard = self.borrow_mut(py)?;
        Ok(f(&mut guard))
    }
}

/// A live exclusive borrow of a [`GilCell`]; clears the borrow flag when dropped.
pub(crate) struct GilRefMut<'a, T> {
    cell: &'a GilCell<T>,
    _not_send: PhantomData<*mut ()>,
}

impl<T> Deref for GilRefMut<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this guard set the flag, so it is the only reference to `value`; the GIL keeps
        // other threads out while it lives (module doc).
        unsafe { &*self.cell.value.get() }
    }
}

impl<T> DerefMut for GilRefMut<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access through the guard.
        unsafe { &mut *self.cell.value.get() }
    }
}

impl<T> Drop for GilRefMut<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.cell.borrowed.set(false);
    }
}

#[cold]
#[inline(never)]
fn reentered() -> PyErr {
    PyRuntimeError::new_err(
        "structure re-entered while in use (a callback ran inside an operation)",
    )
}
