//! Subcommands that are more than wiring: `plan`.

pub mod plan;
