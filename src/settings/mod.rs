//! Settings: the command line, env vars and pod annotations, resolved into one typed
//! [`config::Config`] with the source of every value.
//!
//! Pure apart from the passwd lookup `config.rs` is given. `source.rs` is the leaf the others
//! share (where a value came from, the error naming it); `cli.rs` is the option table and
//! parser, `annotations.rs` reads the sidecar annotations, `config.rs` resolves them all.

pub mod annotations;
pub mod cli;
pub mod config;
pub mod source;
