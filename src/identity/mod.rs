//! Workload identity: the certificate, key and trust bundle a sidecar presents
//! and verifies, and the SPIFFE IDs inside them.

pub mod certs;
mod reload;
mod spiffe;
mod tls;
mod verifier;

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

pub use spiffe::SpiffeId;
pub use verifier::IdentityMismatch;

use crate::config::IdentityConfig;

/// This workload's credentials, loaded once and shared by every listener and client.
#[derive(Debug)]
pub struct Identity {
    /// The SPIFFE ID in this workload's own certificate.
    pub id: SpiffeId,
    cert: Arc<tls::CurrentCert>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl Identity {
    /// Loads the PEM files named by the config; errors name the file and field.
    pub fn load(config: &IdentityConfig) -> Result<Identity, String> {
        let read = |field: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("identity.{field}: cannot read {}: {e}", path.display()))
        };
        let cert = read("cert", &config.cert)?;
        let key = read("key", &config.key)?;
        let bundle = read("trust_bundle", &config.trust_bundle)?;
        Identity::from_pem(&cert, &key, &bundle).map_err(|(field, problem)| {
            let path = match field {
                "cert" => &config.cert,
                "key" => &config.key,
                _ => &config.trust_bundle,
            };
            format!("identity.{field} ({}): {problem}", path.display())
        })
    }

    /// Builds an identity from PEM text. Errors are (field, problem).
    pub fn from_pem(cert: &[u8], key: &[u8], bundle: &[u8]) -> Result<Identity, (&'static str, String)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| ("cert", format!("not PEM certificates: {e}")))?;
        let leaf = chain.first().ok_or(("cert", "holds no certificate".to_string()))?;
        let id = spiffe_id_of(leaf).ok_or((
            "cert",
            "the certificate has no SPIFFE ID (a URI SAN spiffe://...); issue it with `protomesh certs` or cert-manager's uris".to_string(),
        ))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| ("key", format!("not a PEM private key: {e}")))?;
        let signing_key =
            provider.key_provider.load_private_key(key).map_err(|e| ("key", format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing_key);
        certified.keys_match().map_err(|e| ("key", format!("does not match the certificate: {e}")))?;

        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(bundle) {
            let ca = ca.map_err(|e| ("trust_bundle", format!("not PEM certificates: {e}")))?;
            roots.add(ca).map_err(|e| ("trust_bundle", format!("unusable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(("trust_bundle", "holds no CA certificate".to_string()));
        }
        Ok(Identity { id, cert: Arc::new(tls::CurrentCert::new(certified)), roots: Arc::new(roots), provider })
    }
}

/// The SPIFFE ID in a certificate's URI SAN, if it has one.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => SpiffeId::parse(uri).ok(),
        _ => None,
    })
}
