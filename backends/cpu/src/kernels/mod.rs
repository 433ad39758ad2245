//! The CPU kernels, one family per file.

pub mod dense;
pub mod map;
pub mod reduce;
pub mod scan;
pub mod grad;
pub mod fixed;
