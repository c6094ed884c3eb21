//! A development certificate authority: a CA and workload certificates whose
//! URI SAN is a SPIFFE ID, for the demo, tests and local use. Production
//! certificates come from cert-manager or any SPIFFE-aware CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::SpiffeId;

pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

/// A workload certificate and its key, PEM-encoded.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl DevCa {
    pub fn generate(name: &str) -> Result<DevCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params.clone(), key)?;
        let cert_pem = ca.pem();
        let key = KeyPair::from_pem(&key_pem)?;
        Ok(DevCa { issuer: Issuer::new(params, key), cert_pem, key_pem })
    }

    /// Loads a CA written earlier by [`DevCa::write`].
    pub fn read(cert_pem: String, key_pem: String) -> Result<DevCa, rcgen::Error> {
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(DevCa { issuer, cert_pem, key_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `id`, usable both as a TLS server and client certificate.
    pub fn issue(&self, id: &SpiffeId) -> Result<IssuedCert, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.distinguished_name = DistinguishedName::new();
        let workload = id.as_str().rsplit('/').next().unwrap_or(id.as_str());
        params.distinguished_name.push(DnType::CommonName, workload);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The files `protomesh certs` writes for one workload.
pub struct WorkloadFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes `ca.pem` and `ca-key.pem` into `dir` (reusing them if present) and a
/// certificate and key for each workload, named `<name>.pem` and `<name>-key.pem`.
pub fn write_dev_certs(
    dir: &Path,
    ca_name: &str,
    workloads: &[(String, SpiffeId)],
) -> Result<Vec<WorkloadFiles>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca = if ca_cert.exists() && ca_key.exists() {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
        DevCa::read(read(&ca_cert)?, read(&ca_key)?)
            .map_err(|e| format!("{}: not a usable CA: {e}", ca_cert.display()))?
    } else {
        let ca = DevCa::generate(ca_name).map_err(|e| e.to_string())?;
        write(&ca_cert, ca.cert_pem())?;
        write_private(&ca_key, &ca.key_pem)?;
        ca
    };
    workloads
        .iter()
        .map(|(name, id)| {
            let issued = ca.issue(id).map_err(|e| format!("{id}: {e}"))?;
            let files =
                WorkloadFiles { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}-key.pem")) };
            write(&files.cert, &issued.cert_pem)?;
            write_private(&files.key, &issued.key_pem)?;
            Ok(files)
        })
        .collect()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Credentials, spiffe_id_of};
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn issued_certificates_carry_the_spiffe_id_and_load_as_an_identity() {
        let ca = DevCa::generate("test CA").unwrap();
        let id = SpiffeId::parse("spiffe://td/ns/shop/sa/checkout").unwrap();
        let issued = ca.issue(&id).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(spiffe_id_of(&der), Ok(id.clone()));
        let credentials =
            Credentials::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes(), ca.cert_pem().as_bytes())
                .unwrap();
        assert_eq!(credentials.id, id);
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let ca = DevCa::generate("test CA").unwrap();
        let a = ca.issue(&SpiffeId::parse("spiffe://td/a").unwrap()).unwrap();
        let b = ca.issue(&SpiffeId::parse("spiffe://td/b").unwrap()).unwrap();
        let err =
            Credentials::from_pem(a.cert_pem.as_bytes(), b.key_pem.as_bytes(), ca.cert_pem().as_bytes()).unwrap_err();
        assert_eq!(err.0, "key");
    }

    #[test]
    fn writing_twice_reuses_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let id = SpiffeId::parse("spiffe://td/a").unwrap();
        write_dev_certs(dir.path(), "ca", &[("a".into(), id.clone())]).unwrap();
        let first = std::fs::read(dir.path().join("ca.pem")).unwrap();
        write_dev_certs(dir.path(), "ca", &[("b".into(), id)]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), first);
        assert!(dir.path().join("b-key.pem").exists());
    }
}
