//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod generate;
pub mod init;
pub mod inspect;
pub mod run;
pub mod train;
