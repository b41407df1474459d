//! The crate's one error type. The binding layer maps it to Python exceptions in exactly one place
//! (`bindings::errors`).

use std::fmt;

/// Everything the algorithm modules can refuse.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An argument outside its domain (negative size, zero limit, NaN duration...).
    /// Maps to `ValueError`.
    InvalidArgument(String),
    /// A lookup on an empty structure (e.g. a ring with no nodes). Maps to `LookupError`.
    Empty(String),
    /// The operating system refused a resource (e.g. a shared-memory mapping). Maps to `OSError`.
    System(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(msg) | Error::Empty(msg) | Error::System(msg) => {
                f.write_str(msg)
            }
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Build an [`Error::InvalidArgument`]; kept out of line so callers' hot paths stay small.
#[cold]
#[inline(never)]
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Validate a duration given in seconds as `f64`: finite and `> 0` (or `>= 0` when `allow_zero`).
pub fn check_seconds(name: &str, value: f64, allow_zero: bool) -> Result<f64> {
    let ok = value.is_finite() && (value > 0.0 || (allow_zero && value == 0.0));
    if ok {
        Ok(value)
    } else {
        Err(invalid(format!(
            "{name} must be a finite number of seconds {}, got {value}",
            if allow_zero { ">= 0" } else { "> 0" }
        )))
    }
}
