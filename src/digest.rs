//! The version of a set of input files: a SHA-256 over each file's name and
//! bytes, shown as its first 12 hex digits. Equal versions mean the same
//! bytes were read, so a reload can tell that nothing changed.

use sha2::{Digest as _, Sha256};

#[derive(Default)]
pub struct Digest(Sha256);

impl Digest {
    /// Adds one input, named so that moving bytes between files changes the version.
    pub fn add(&mut self, name: &str, bytes: &[u8]) {
        for part in [name.as_bytes(), bytes] {
            self.0.update((part.len() as u64).to_be_bytes());
            self.0.update(part);
        }
    }

    pub fn version(self) -> String {
        self.0.finalize()[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(inputs: &[(&str, &[u8])]) -> String {
        let mut digest = Digest::default();
        for (name, bytes) in inputs {
            digest.add(name, bytes);
        }
        digest.version()
    }

    #[test]
    fn the_same_inputs_give_the_same_version_and_any_change_another() {
        let base = version(&[("a", b"xy"), ("b", b"z")]);
        assert_eq!(base.len(), 12);
        assert_eq!(base, version(&[("a", b"xy"), ("b", b"z")]));
        assert_ne!(base, version(&[("a", b"x"), ("b", b"yz")]), "bytes moved between files");
        assert_ne!(base, version(&[("a", b"xy"), ("c", b"z")]), "a file renamed");
    }
}
