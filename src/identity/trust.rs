//! The trust bundle and the two checks made with it. Inbound, a client
//! certificate must chain to the bundle. Outbound, the server's chain must
//! lead to the bundle and its leaf must carry the SPIFFE ID the route
//! expects; DNS names play no part, so a certificate from the right CA for
//! the wrong workload is refused before this sidecar presents its own. The
//! bundle is read at each handshake, so a rotated one applies to new
//! connections at once.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{ExpectedPeer, IdentityMismatch, spiffe_id_of};

/// The trust bundle: the roots that peers' chains must lead to, and the
/// client-certificate verifier built from them.
#[derive(Debug)]
pub(super) struct Trust {
    pub(super) roots: ArcSwap<RootCertStore>,
    clients: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl Trust {
    pub(super) fn new(roots: Arc<RootCertStore>, provider: &Arc<CryptoProvider>) -> Result<Trust, String> {
        let clients = client_verifier(roots.clone(), provider)?;
        Ok(Trust { roots: ArcSwap::new(roots), clients: ArcSwap::from_pointee(clients) })
    }

    /// Verifies peers against `roots` from the next handshake on.
    pub(super) fn replace(&self, roots: Arc<RootCertStore>, provider: &Arc<CryptoProvider>) -> Result<(), String> {
        let clients = client_verifier(roots.clone(), provider)?;
        self.clients.store(Arc::new(clients));
        self.roots.store(roots);
        Ok(())
    }
}

fn client_verifier(
    roots: Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("identity.trust_bundle: cannot verify clients with it: {e}"))
}

/// Inbound: a client certificate must chain to the current trust bundle.
#[derive(Debug)]
pub(super) struct CurrentClientVerifier(pub(super) Arc<Trust>);

impl ClientCertVerifier for CurrentClientVerifier {
    /// No hints: they would borrow from a bundle that may be replaced, and a
    /// sidecar has one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.clients.load().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.clients.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.clients.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clients.load().supported_verify_schemes()
    }
}

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<Trust>,
    expected: ExpectedPeer,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub(super) fn new(trust: Arc<Trust>, expected: ExpectedPeer, provider: &CryptoProvider) -> Self {
        SpiffeServerVerifier { trust, expected, algorithms: provider.signature_verification_algorithms }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let roots = self.trust.roots.load();
        verify_server_cert_signed_by_trust_anchor(&cert, &roots, intermediates, now, self.algorithms.all)?;
        let presented = spiffe_id_of(end_entity);
        if !presented.as_ref().is_ok_and(|id| self.expected.accepts(id)) {
            let mismatch = IdentityMismatch { expected: self.expected.clone(), presented };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(mismatch)))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
