//! pyproxy's compiled core.
//!
//! Two layers (as polars splits `polars-*` from `polars-python`):
//! - algorithm modules ([`cache`], [`ring`], [`window`], [`shared_window`], [`hybrid`]) are plain Rust, never
//!   touch `pyo3`, and are tested with `cargo test` and benchmarked with criterion;
//! - [`bindings`] (feature `python`) is the thin PyO3 layer that becomes the `pyproxy._core` module.

pub mod cache;
pub mod clock;
pub mod error;
pub mod hybrid;
pub mod ring;
pub mod shared_window;
pub mod window;

#[cfg(feature = "python")]
mod bindings;
