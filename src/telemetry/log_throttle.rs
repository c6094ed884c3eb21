//! Warnings a peer can cause at will (a refused handshake, a connection
//! from where none may come) are logged once per source and reason per
//! interval, the next line saying how many were not logged; the counters
//! carry every one. Without it, a client refused thousands of times a second
//! would fill the log, and the disk under it.
//!
//! Hand written: the tracing crates rate-limit by call site, not by the
//! source that caused the line.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one source's warning of one kind may be logged.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Sources remembered at once; past this (a flood from many addresses),
/// new sources share one entry, logged as `::`.
const MAX_SOURCES: usize = 1024;

#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    seen: Mutex<HashMap<(IpAddr, &'static str), Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Occurrences in this window not logged.
    unlogged: u64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        LogThrottle::every(LOG_EVERY)
    }
}

impl LogThrottle {
    pub fn every(every: Duration) -> Self {
        LogThrottle { every, seen: Mutex::new(HashMap::new()) }
    }

    /// Notes one occurrence of `reason` caused by `source`. `Some(n)`: log it
    /// now, saying that `n` like it since the last line were not logged;
    /// `None`: the line of this interval stands for it.
    pub fn note(&self, source: IpAddr, reason: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("log throttle lock");
        if seen.len() >= MAX_SOURCES && !seen.contains_key(&(source, reason)) {
            seen.retain(|_, window| now.duration_since(window.started) < self.every);
        }
        let source = if seen.len() >= MAX_SOURCES { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { source };
        match seen.get_mut(&(source, reason)) {
            Some(window) if now.duration_since(window.started) < self.every => {
                window.unlogged += 1;
                None
            }
            Some(window) => {
                let unlogged = std::mem::replace(window, Window { started: now, unlogged: 0 }).unlogged;
                Some(unlogged)
            }
            None => {
                seen.insert((source, reason), Window { started: now, unlogged: 0 });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_source_and_reason_per_interval_counting_the_rest() {
        let throttle = LogThrottle::every(Duration::from_millis(50));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        assert_eq!(throttle.note(a, "plaintext"), Some(0));
        for _ in 0..99 {
            assert_eq!(throttle.note(a, "plaintext"), None);
        }
        assert_eq!(throttle.note(a, "handshake"), Some(0), "another reason has its own line");
        assert_eq!(throttle.note(b, "plaintext"), Some(0), "another source has its own line");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.note(a, "plaintext"), Some(99), "the next line counts what was not logged");
        assert_eq!(throttle.note(a, "plaintext"), None);
    }

    #[test]
    fn a_flood_from_many_sources_is_remembered_in_bounded_room() {
        let throttle = LogThrottle::every(Duration::from_secs(60));
        let logged = (0..10_000u32).filter(|i| throttle.note(IpAddr::from(i.to_be_bytes()), "plaintext").is_some());
        assert_eq!(logged.count(), MAX_SOURCES + 1, "past the room, new sources share one line");
        assert!(throttle.seen.lock().unwrap().len() <= MAX_SOURCES + 1);
    }
}
