//! Identities: a peer's certificate (DER) and the SPIFFE ID in it, and the
//! SPIFFE IDs and method patterns written in config and contracts. The
//! input is tried as each; whatever parses is matched against the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::identity::{SpiffeId, spiffe_id_of};
use protomesh::policy::authz::{CallerPattern, MethodPattern};
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = spiffe_id_of(&CertificateDer::from(data)) {
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(&id), "a certificate's ID is a valid SPIFFE ID");
    }
    let Ok(text) = std::str::from_utf8(data) else { return };
    let id = SpiffeId::parse(text);
    if let Ok(id) = &id {
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(id), "IDs round-trip");
        assert!(id.as_str().len() <= 2048);
    }
    if let Ok(pattern) = CallerPattern::try_from(text.to_string())
        && let Ok(id) = &id
    {
        let _ = pattern.matches(id);
    }
    if let Ok(pattern) = MethodPattern::try_from(text.to_string()) {
        let (service, method) = text.split_once('/').unwrap_or((text, ""));
        let _ = pattern.matches(service, method);
    }
});
