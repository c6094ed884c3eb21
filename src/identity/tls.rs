//! rustls configurations for both directions: TLS 1.3 only, ALPN h2, client
//! certificates required inbound, SPIFFE identity checked outbound. The
//! certificate presented (here) and the roots trusted (`trust`) are read at
//! each handshake, so renewed credentials apply to new connections without
//! rebuilding any configuration.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use super::trust::{CurrentClientVerifier, SpiffeServerVerifier};
use super::{ExpectedPeer, Identity};

/// The certificate presented on both sides.
#[derive(Debug)]
pub(super) struct CurrentCert(ArcSwap<CertifiedKey>);

impl CurrentCert {
    pub(super) fn new(key: Arc<CertifiedKey>) -> CurrentCert {
        CurrentCert(ArcSwap::new(key))
    }

    /// Presents `key` from the next handshake on.
    pub(super) fn replace(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

const ALPN_H2: &[u8] = b"h2";
/// Opaque TCP between sidecars: after the handshake, the app's bytes as they are.
pub const ALPN_OPAQUE: &[u8] = b"protomesh-opaque/1";

impl Identity {
    /// Inbound: a client certificate signed by the trust bundle is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(CurrentClientVerifier(self.trust.clone())))
            .with_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_OPAQUE.to_vec()];
        Ok(Arc::new(config))
    }

    /// Outbound HTTP/2 to peers that must present `expected`.
    pub fn client_config(&self, expected: ExpectedPeer) -> Result<Arc<ClientConfig>, String> {
        self.client_config_for(expected, ALPN_H2)
    }

    /// Outbound opaque TCP to peers that must present `expected`.
    pub fn opaque_client_config(&self, expected: ExpectedPeer) -> Result<Arc<ClientConfig>, String> {
        self.client_config_for(expected, ALPN_OPAQUE)
    }

    fn client_config_for(&self, expected: ExpectedPeer, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
        let verifier = SpiffeServerVerifier::new(self.trust.clone(), expected, &self.provider);
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.cert.clone());
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    }
}
