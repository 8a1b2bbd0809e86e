//! Test bed for azp-autoscaler: see README.md beside Cargo.toml.

pub mod ca;
pub mod node;
pub mod sim;
pub mod standin;
