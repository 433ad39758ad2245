//! One module per subcommand.

pub mod bench;
pub mod bench_cuda;
pub mod compile;
pub mod demo;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod nir;
pub mod run;
pub mod simulate;
pub mod train;
