//! IR passes.
