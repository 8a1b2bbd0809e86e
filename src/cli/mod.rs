//! Subcommands that are more than wiring: `plan`, `drain`.

pub mod drain;
pub mod plan;
