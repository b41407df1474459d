//! Python exceptions, declared once, and the one `From<Error> for PyErr`.

use pyo3::exceptions::{PyException, PyLookupError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

pyo3::create_exception!(
    pyproxy._core,
    PyproxyError,
    PyException,
    "Base class of every exception pyproxy raises of its own."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::InvalidArgument(msg) => PyValueError::new_err(msg),
            Error::Empty(msg) => PyLookupError::new_err(msg),
            Error::System(msg) => PyOSError::new_err(msg),
        }
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PyproxyError", m.py().get_type::<PyproxyError>())?;
    Ok(())
}
