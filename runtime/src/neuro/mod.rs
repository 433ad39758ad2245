//! The neuromorphic chip simulator: runs a spike program event-driven in integer arithmetic,
//! bit-exact with the CPU backend's integer mode, and reports what the chip would spend.
//!
//! - [`sim`]: the simulator (also an [`Executor`](crate::Executor), so sessions and
//!   generation run on the simulated chip);
//! - [`report`]: per layer, core and chip counts, energy and time;
//! - [`plot`]: the event raster and per-layer activity as PNG;
//! - [`cost`]: operation counts of management-core and host work.

pub mod cost;
pub mod plot;
pub mod report;
pub mod sim;

pub use report::SimReport;
pub use sim::{ChipSimulator, SimError};

impl crate::Executor for ChipSimulator {
    fn graph(&self) -> &sparkc_ir::Graph {
        self.signature()
    }

    /// The weights live in the program; `params` is not used.
    fn execute(
        &mut self,
        inputs: &std::collections::BTreeMap<String, sparkc_ir::Tensor>,
        _params: &std::collections::BTreeMap<String, sparkc_ir::Tensor>,
    ) -> Result<std::collections::BTreeMap<String, sparkc_ir::Tensor>, crate::RuntimeError> {
        self.run(inputs).map_err(|e| crate::RuntimeError::Usage(format!("simulated chip: {e}")))
    }
}
