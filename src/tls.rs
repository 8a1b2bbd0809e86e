//! Trust for every HTTPS client of the product.
//!
//! The system's roots, plus extra CAs from `SSL_CERT_FILE` (a PEM bundle) and `SSL_CERT_DIR` (a folder of
//! PEM files, or several folders separated by `:`): Azure DevOps Server behind a corporate CA, or tests with
//! a local CA. There is deliberately no way to switch verification off.

use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Errors while assembling the trust store.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA bundle {path} (from {var}): {source}; fix the path or unset {var}")]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA bundle {path} (from {var}) holds no PEM certificate; it must contain `-----BEGIN CERTIFICATE-----` blocks"
    )]
    Empty { var: &'static str, path: PathBuf },
    #[error("cannot build an HTTPS client: {0}")]
    Client(String),
}

impl TlsError {
    /// A stable, low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "tls_ca_unreadable",
            TlsError::Empty { .. } => "tls_ca_empty",
            TlsError::Client(_) => "tls_client",
        }
    }
}

/// The process-wide crypto provider. Call once at start of every binary (idempotent).
///
/// The product links exactly one provider (aws-lc-rs); installing it explicitly makes that a fact rather
/// than a feature-resolution accident.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Extra CA certificates named by `SSL_CERT_FILE` / `SSL_CERT_DIR` (none when both are unset).
pub fn extra_roots() -> Result<Vec<CertificateDer<'static>>, TlsError> {
    extra_roots_from(
        std::env::var_os("SSL_CERT_FILE").map(PathBuf::from),
        std::env::var_os("SSL_CERT_DIR"),
    )
}

fn extra_roots_from(
    file: Option<PathBuf>,
    dirs: Option<std::ffi::OsString>,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut roots = Vec::new();
    if let Some(path) = file.filter(|p| !p.as_os_str().is_empty()) {
        let certs = read_pem("SSL_CERT_FILE", &path)?;
        if certs.is_empty() {
            return Err(TlsError::Empty {
                var: "SSL_CERT_FILE",
                path,
            });
        }
        roots.extend(certs);
    }
    if let Some(dirs) = dirs {
        for dir in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
            let entries = std::fs::read_dir(&dir).map_err(|source| TlsError::Read {
                var: "SSL_CERT_DIR",
                path: dir.clone(),
                source,
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            for path in files {
                // Hash-named links and non-PEM files are common in such folders: take what parses.
                roots.extend(read_pem("SSL_CERT_DIR", &path).unwrap_or_default());
            }
        }
    }
    Ok(roots)
}

fn read_pem(var: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        var,
        path: path.to_owned(),
        source,
    })?;
    Ok(CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect())
}

/// A reqwest client builder that trusts the system roots plus the extra CAs. Every HTTPS client of the
/// product starts from here.
pub fn http_client_builder() -> Result<reqwest::ClientBuilder, TlsError> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("azp-autoscaler/", env!("CARGO_PKG_VERSION")));
    let extra = extra_roots()?;
    if !extra.is_empty() {
        let certs = extra
            .iter()
            .map(|der| reqwest::Certificate::from_der(der.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Client(e.to_string()))?;
        builder = builder.tls_certs_merge(certs);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_means_no_extra_roots() {
        assert!(extra_roots_from(None, None).unwrap().is_empty());
    }

    #[test]
    fn unreadable_file_names_the_variable_and_path() {
        let err = extra_roots_from(Some("/nonexistent/ca.pem".into()), None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("SSL_CERT_FILE") && msg.contains("/nonexistent/ca.pem"),
            "{msg}"
        );
        assert_eq!(err.metric_label(), "tls_ca_unreadable");
    }

    #[test]
    fn file_without_certificates_is_an_error() {
        let dir = std::env::temp_dir().join(format!("azp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = extra_roots_from(Some(path), None).unwrap_err();
        assert_eq!(err.metric_label(), "tls_ca_empty");
    }
}
