//! A local test CA and server certificates.
//!
//! Every HTTPS endpoint of the test bed (the ADO + Entra simulator, the node harness' helpers) presents a
//! certificate issued by a [`TestCa`] made at run time; clients trust it through `SSL_CERT_FILE` (Rust
//! `rustls-native-certs`, Python `ssl`) or `REQUESTS_CA_BUNDLE` (Python `requests`), pointed at the file
//! written by [`TestCa::write_pem`]. Nothing here is ever committed: keys live only in memory and in the
//! files a test asks for.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Errors of the test CA. Each names what failed; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("test CA: generating a key pair failed: {0}")]
    KeyGen(#[source] rcgen::Error),
    #[error(
        "test CA: building the certificate for {what} failed (check the subject names are valid DNS names or IP addresses): {source}"
    )]
    Cert {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("test CA: writing the CA certificate to {path} failed: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("test CA: building the rustls server configuration failed: {0}")]
    Rustls(#[source] rustls::Error),
}

impl CaError {
    /// Stable label for metrics and test assertions.
    pub fn metric_label(&self) -> &'static str {
        match self {
            CaError::KeyGen(_) => "keygen",
            CaError::Cert { .. } => "cert",
            CaError::Write { .. } => "write",
            CaError::Rustls(_) => "rustls",
        }
    }
}

/// A self-signed certificate authority that lives for one test run.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A server certificate (leaf) issued by a [`TestCa`], with its private key.
#[derive(Clone)]
pub struct ServerCert {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key, PEM.
    pub key_pem: String,
    cert_der: rustls_pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
    ca_der: rustls_pki_types::CertificateDer<'static>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").finish_non_exhaustive()
    }
}

impl TestCa {
    /// Creates a new CA with a fresh ECDSA P-256 key.
    pub fn new() -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::KeyGen)?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|source| CaError::Cert {
                what: "the CA".into(),
                source,
            })?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "azp-testbed local test CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "azp-autoscaler test bed");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(|source| CaError::Cert {
            what: "the CA".into(),
            source,
        })?;
        let cert_pem = issuer.pem();
        Ok(TestCa { issuer, cert_pem })
    }

    /// The CA certificate, PEM (what clients must trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> rustls_pki_types::CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a server certificate valid for each of `names` (DNS names or IP addresses, e.g.
    /// `["127.0.0.1", "localhost"]`).
    pub fn server_cert(&self, names: &[&str]) -> Result<ServerCert, CaError> {
        let what = format!("server names {names:?}");
        let key = KeyPair::generate().map_err(CaError::KeyGen)?;
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans).map_err(|source| CaError::Cert {
            what: what.clone(),
            source,
        })?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Cert { what, source })?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
            ca_der: self.cert_der(),
        })
    }

    /// Writes the CA certificate (PEM) to `path`, for `SSL_CERT_FILE` / `REQUESTS_CA_BUNDLE`.
    pub fn write_pem(&self, path: &Path) -> Result<(), CaError> {
        std::fs::write(path, self.cert_pem.as_bytes()).map_err(|source| CaError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// A rustls root store that trusts only this CA (for in-process clients).
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        // A CA we just built is always a well-formed trust anchor.
        let _ = roots.add(self.cert_der());
        roots
    }
}

impl ServerCert {
    /// A rustls server configuration (aws-lc-rs provider, HTTP/1.1 and HTTP/2 by ALPN) presenting
    /// this certificate followed by its CA.
    pub fn rustls_server_config(&self) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(CaError::Rustls)?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone(), self.ca_der.clone()], key)
            .map_err(CaError::Rustls)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;

    #[test]
    fn server_cert_chains_to_the_ca_and_builds_a_rustls_config() {
        let ca = TestCa::new().expect("CA");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let leaf = ca.server_cert(&["127.0.0.1", "localhost"]).expect("leaf");
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
        leaf.rustls_server_config().expect("rustls config");
        // The leaf verifies against a root store holding only this CA.
        let roots = Arc::new(ca.root_store());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("verifier");
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let now = rustls_pki_types::UnixTime::now();
        verifier
            .verify_server_cert(&leaf.cert_der, &[], &name, &[], now)
            .expect("leaf must verify for 127.0.0.1");
        let other = rustls_pki_types::ServerName::try_from("example.org").expect("name");
        assert!(
            verifier
                .verify_server_cert(&leaf.cert_der, &[], &other, &[], now)
                .is_err(),
            "a name not in the SANs must be rejected"
        );
        // A different CA does not vouch for it.
        let stranger = TestCa::new().expect("CA");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(stranger.root_store()),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .expect("verifier");
        assert!(
            verifier
                .verify_server_cert(&leaf.cert_der, &[], &name, &[], now)
                .is_err()
        );
    }

    #[test]
    fn write_pem_writes_the_ca_certificate() {
        let ca = TestCa::new().expect("CA");
        let dir = std::env::temp_dir().join(format!("azp-testbed-ca-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ca.pem");
        ca.write_pem(&path).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), ca.cert_pem());
        let err = ca
            .write_pem(&dir.join("missing").join("ca.pem"))
            .expect_err("no such dir");
        assert_eq!(err.metric_label(), "write");
        std::fs::remove_dir_all(&dir).ok();
    }
}
