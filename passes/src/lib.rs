//! IR passes and analyses. A pass is a function from IR to IR plus a report; an analysis reads
//! the IR and reports.

pub mod autodiff;
pub mod cost;
pub mod prune;
pub mod center_fold;
pub mod quantize;
pub mod recompute;
pub mod scan_fusion;
pub mod users;
