//! Connections open at once, counted in all and by a key (a listener's
//! connections by source address, its opaque TCP by destination), so that a
//! connection past a limit is refused before it takes any more than a file
//! descriptor.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Which limit a refused connection would have passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Past {
    Total,
    PerKey,
}

/// Open connections keyed by `K`: by source address unless said otherwise.
pub struct OpenConnections<K: Hash + Eq + Copy = IpAddr>(Arc<Mutex<Counts<K>>>);

impl<K: Hash + Eq + Copy> Clone for OpenConnections<K> {
    fn clone(&self) -> Self {
        OpenConnections(self.0.clone())
    }
}

impl<K: Hash + Eq + Copy> Default for OpenConnections<K> {
    fn default() -> Self {
        OpenConnections(Arc::new(Mutex::new(Counts { total: 0, by_key: HashMap::new() })))
    }
}

struct Counts<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

impl<K: Hash + Eq + Copy> OpenConnections<K> {
    /// Counts a new connection under `key` until the returned value is
    /// dropped, or says which limit it would pass.
    pub fn admit(&self, key: K, max: usize, max_per_key: usize) -> Result<Admitted<K>, Past> {
        let mut counts = self.0.lock().expect("connection counts lock");
        if counts.total >= max {
            return Err(Past::Total);
        }
        let under_key = counts.by_key.entry(key).or_default();
        if *under_key >= max_per_key {
            return Err(Past::PerKey);
        }
        *under_key += 1;
        counts.total += 1;
        Ok(Admitted { open: self.clone(), key })
    }
}

/// One counted connection.
pub struct Admitted<K: Hash + Eq + Copy = IpAddr> {
    open: OpenConnections<K>,
    key: K,
}

impl<K: Hash + Eq + Copy> Drop for Admitted<K> {
    fn drop(&mut self) {
        let mut counts = self.open.0.lock().expect("connection counts lock");
        counts.total -= 1;
        if let Some(under_key) = counts.by_key.get_mut(&self.key) {
            *under_key -= 1;
            if *under_key == 0 {
                counts.by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_until_dropped_in_all_and_by_source() {
        let open: OpenConnections = OpenConnections::default();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = open.admit(a, 3, 2).unwrap();
        let _second = open.admit(a, 3, 2).unwrap();
        assert_eq!(open.admit(a, 3, 2).err(), Some(Past::PerKey));
        let _third = open.admit(b, 3, 2).unwrap();
        assert_eq!(open.admit(b, 3, 2).err(), Some(Past::Total));
        drop(first);
        assert!(open.admit(a, 3, 2).is_ok(), "a dropped connection gives its place back");
    }
}
