//! Workload identity: the certificate, key and trust bundle a sidecar presents
//! and verifies, and the SPIFFE IDs inside them. The files are read as
//! [`Credentials`]; the running [`Identity`] takes renewed credentials (a new
//! certificate, a rotated trust bundle) for new handshakes while live
//! connections keep theirs.

pub mod certs;
mod spiffe;
mod tls;
mod trust;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use x509_parser::extensions::GeneralName;

use crate::digest::Digest;
pub use spiffe::{ExpectedPeer, IdentityMismatch, SpiffeId};
pub use tls::ALPN_OPAQUE;

/// Where the workload's credentials are, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM certificate chain, leaf first; the leaf carries the SPIFFE ID.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that sign peers' certificates.
    pub trust_bundle: PathBuf,
}

impl IdentityConfig {
    /// The files, each with its config field.
    pub fn files(&self) -> [(&'static str, &Path); 3] {
        [("cert", &self.cert), ("key", &self.key), ("trust_bundle", &self.trust_bundle)]
    }

    /// The version of the files as they are now (see [`Credentials::version`]).
    pub fn version_on_disk(&self) -> String {
        version(self.files().map(|(field, path)| (field, std::fs::read(path).unwrap_or_default())))
    }
}

fn version(files: [(&str, Vec<u8>); 3]) -> String {
    let mut digest = Digest::default();
    for (field, bytes) in files {
        digest.add(field, &bytes);
    }
    digest.version()
}

/// Credentials as read from the files, checked: a certificate with a SPIFFE
/// ID, the key that matches it, and at least one trusted CA.
#[derive(Debug)]
pub struct Credentials {
    pub id: SpiffeId,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    /// A digest of the files' bytes (empty when built from PEM text).
    pub version: String,
}

impl Credentials {
    /// Reads the files the config names; errors name the field and the file.
    pub fn read(config: &IdentityConfig) -> Result<Credentials, String> {
        let [cert, key, bundle] = config.files().map(|(field, path)| {
            std::fs::read(path).map_err(|e| format!("identity.{field}: cannot read {}: {e}", path.display()))
        });
        let (cert, key, bundle) = (cert?, key?, bundle?);
        let credentials = Credentials::from_pem(&cert, &key, &bundle).map_err(|(field, problem)| {
            let path = config.files().into_iter().find(|(f, _)| *f == field).map(|(_, path)| path);
            format!("identity.{field} ({}): {problem}", path.map(|p| p.display().to_string()).unwrap_or_default())
        })?;
        Ok(Credentials { version: version([("cert", cert), ("key", key), ("trust_bundle", bundle)]), ..credentials })
    }

    /// Builds credentials from PEM text. Errors are (field, problem).
    pub fn from_pem(cert: &[u8], key: &[u8], bundle: &[u8]) -> Result<Credentials, (&'static str, String)> {
        let provider = provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| ("cert", format!("not PEM certificates: {e}")))?;
        let leaf = chain.first().ok_or(("cert", "holds no certificate".to_string()))?;
        let id = spiffe_id_of(leaf)
            .map_err(|why| ("cert", format!("{why}; issue it with `protomesh certs` or cert-manager's uris")))?;
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
        Ok(Credentials { id, key: Arc::new(certified), roots: Arc::new(roots), version: String::new() })
    }
}

/// The running workload's credentials, shared by every listener and client.
#[derive(Debug)]
pub struct Identity {
    /// The SPIFFE ID in this workload's own certificate; fixed for the process.
    pub id: SpiffeId,
    cert: Arc<tls::CurrentCert>,
    trust: Arc<trust::Trust>,
    provider: Arc<CryptoProvider>,
}

impl Identity {
    pub fn new(credentials: Credentials) -> Result<Identity, String> {
        let provider = provider();
        Ok(Identity {
            id: credentials.id,
            cert: Arc::new(tls::CurrentCert::new(credentials.key)),
            trust: Arc::new(trust::Trust::new(credentials.roots, &provider)?),
            provider,
        })
    }

    /// Takes renewed credentials for new handshakes: the certificate and key,
    /// and the trust bundle, whose new roots verify peers from the next
    /// handshake on. Credentials for another identity are refused: a
    /// workload's identity is fixed for the life of the process.
    pub fn renew(&self, renewed: Credentials) -> Result<(), String> {
        self.check(&renewed)?;
        self.trust.replace(renewed.roots, &self.provider)?;
        self.cert.replace(renewed.key);
        Ok(())
    }
}

impl Identity {
    /// Whether `renewed` may replace the running credentials: they must be
    /// for the same identity.
    pub fn check(&self, renewed: &Credentials) -> Result<(), String> {
        if renewed.id != self.id {
            return Err(format!(
                "identity.cert: the certificate is for {}, but this sidecar runs as {}; restart it to change identity",
                renewed.id, self.id
            ));
        }
        Ok(())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID of an X.509-SVID: its one URI SAN. A certificate with no
/// URI SAN, several, or one that is not a valid SPIFFE ID has none; the
/// error says which.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("an unreadable subjectAltName: {e}"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| &san.value.general_names)
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err("the certificate has no SPIFFE ID (a URI SAN spiffe://...)".into()),
        [uri] => SpiffeId::parse(uri),
        _ => Err(format!("the certificate has {} URI SANs; an X.509-SVID has exactly one", uris.len())),
    }
}
