//! Test bed for azp-autoscaler: see README.md beside Cargo.toml.

pub mod bed;
pub mod ca;
pub mod chart;
pub mod demo;
pub mod invariants;
pub mod node;
pub mod proxy;
pub mod sim;
pub mod standin;

/// Installs the process-wide rustls crypto provider (aws-lc-rs, the only one linked). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
