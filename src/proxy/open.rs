//! The connections open on one listener, counted in all and by source
//! address, so that a listener can refuse a connection past its limits
//! before it takes any more than a file descriptor.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Which limit a refused connection would have passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Past {
    Total,
    PerSource,
}

#[derive(Clone, Default)]
pub struct OpenConnections(Arc<Mutex<Counts>>);

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl OpenConnections {
    /// Counts a new connection from `source` until the returned value is
    /// dropped, or says which limit it would pass.
    pub fn admit(&self, source: IpAddr, max: usize, max_per_source: usize) -> Result<Admitted, Past> {
        let mut counts = self.0.lock().expect("connection counts lock");
        if counts.total >= max {
            return Err(Past::Total);
        }
        let from_source = counts.by_source.entry(source).or_default();
        if *from_source >= max_per_source {
            return Err(Past::PerSource);
        }
        *from_source += 1;
        counts.total += 1;
        Ok(Admitted { open: self.clone(), source })
    }
}

/// One counted connection.
pub struct Admitted {
    open: OpenConnections,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.open.0.lock().expect("connection counts lock");
        counts.total -= 1;
        if let Some(from_source) = counts.by_source.get_mut(&self.source) {
            *from_source -= 1;
            if *from_source == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_counted_until_dropped_in_all_and_by_source() {
        let open = OpenConnections::default();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = open.admit(a, 3, 2).unwrap();
        let _second = open.admit(a, 3, 2).unwrap();
        assert_eq!(open.admit(a, 3, 2).err(), Some(Past::PerSource));
        let _third = open.admit(b, 3, 2).unwrap();
        assert_eq!(open.admit(b, 3, 2).err(), Some(Past::Total));
        drop(first);
        assert!(open.admit(a, 3, 2).is_ok(), "a dropped connection gives its place back");
    }
}
