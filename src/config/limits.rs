//! Bounds on what callers and peers can make the sidecar hold: connections,
//! streams, header and window sizes, and how long a connection may take to
//! say something. Read when a connection is accepted, so a reload applies to
//! the connections that follow.

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::duration;

/// The `limits` section of the config. A field not written takes its default.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections open at once on each listener; more are closed as they are accepted.
    pub max_connections: usize,
    /// Connections open at once from one IP address on the inbound listener.
    /// Not applied outbound: every connection there comes from the pod itself.
    pub max_connections_per_source: usize,
    /// Opaque TCP connections forwarded at once by each listener. Below
    /// `max_connections`, so that the app's own TCP (a database pool) always
    /// leaves room for its gRPC connections.
    pub max_opaque_connections: usize,
    /// Opaque TCP connections forwarded at once to one destination (outbound:
    /// where the app dialled; inbound: an app port), so that one destination
    /// cannot take every place of `max_opaque_connections`.
    pub max_opaque_connections_per_destination: usize,
    /// An opaque TCP connection that carries no byte either way for this long is closed.
    #[serde(deserialize_with = "duration::deserialize")]
    pub opaque_idle_timeout: Duration,
    /// Once one side of an opaque TCP connection has finished sending, the
    /// other must send or close within this long, or both are closed.
    #[serde(deserialize_with = "duration::deserialize")]
    pub opaque_half_closed_timeout: Duration,
    /// Inbound: from the TCP connection to the end of the TLS handshake.
    #[serde(deserialize_with = "duration::deserialize")]
    pub tls_handshake_timeout: Duration,
    /// From the connection (and its TLS handshake) to the HTTP/2 preface.
    #[serde(deserialize_with = "duration::deserialize")]
    pub first_frame_timeout: Duration,
    /// Streams one connection may carry at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// clients queue beyond it, and a stream over it is refused (REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// The largest request head or trailers taken, counted as HTTP/2 does
    /// (SETTINGS_MAX_HEADER_LIST_SIZE); a larger head is answered with HTTP 431.
    pub max_header_list_size: ByteSize,
    /// Each stream's flow-control window, in both directions: the most of one
    /// call's data the sidecar holds while its reader does not read. A
    /// connection's window is never the limit, so that one stream left unread
    /// cannot stall the connection's other calls.
    pub stream_window: ByteSize,
    /// A ping this often on every connection, which must be answered within
    /// `keepalive_timeout`, or the connection is closed.
    #[serde(deserialize_with = "duration::deserialize")]
    pub keepalive_interval: Duration,
    #[serde(deserialize_with = "duration::deserialize")]
    pub keepalive_timeout: Duration,
    /// A connection from a caller that carries no call for this long is closed (GOAWAY).
    #[serde(deserialize_with = "duration::deserialize")]
    pub idle_timeout: Duration,
    /// Resident memory above which new calls are refused with
    /// RESOURCE_EXHAUSTED until it falls back. Unset: 90% of the container's
    /// memory limit, if it has one; `0`: never.
    pub memory_budget: Option<ByteSize>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_connections_per_source: 1_000,
            max_opaque_connections: 8_000,
            max_opaque_connections_per_destination: 4_000,
            opaque_idle_timeout: Duration::from_secs(3600),
            opaque_half_closed_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            first_frame_timeout: Duration::from_secs(10),
            max_concurrent_streams: 10_000,
            max_header_list_size: ByteSize::kib(64),
            stream_window: ByteSize::mib(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(600),
            memory_budget: None,
        }
    }
}

/// HTTP/2 windows are 31-bit.
const MAX_WINDOW: u64 = (1 << 31) - 1;

impl LimitsConfig {
    /// Checks what serde cannot. Each error is (field path, problem).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let at = |field: &str| format!("limits.{field}");
        if self.max_connections == 0 {
            return Err((at("max_connections"), "must be at least 1".into()));
        }
        for (field, value) in [
            ("max_connections_per_source", self.max_connections_per_source),
            ("max_opaque_connections", self.max_opaque_connections),
            ("max_opaque_connections_per_destination", self.max_opaque_connections_per_destination),
        ] {
            if value == 0 {
                return Err((at(field), "must be at least 1".into()));
            }
        }
        if self.max_concurrent_streams == 0 {
            return Err((at("max_concurrent_streams"), "must be at least 1".into()));
        }
        if self.max_header_list_size.as_u64() < 1024 || self.max_header_list_size.as_u64() > u64::from(u32::MAX) {
            return Err((at("max_header_list_size"), "must be from 1KiB to 4GiB".into()));
        }
        if self.stream_window.as_u64() < 65_535 || self.stream_window.as_u64() > MAX_WINDOW {
            return Err((at("stream_window"), "must be from 64KiB (65535 bytes) to 2GiB minus one byte".into()));
        }
        for (field, value) in [
            ("tls_handshake_timeout", self.tls_handshake_timeout),
            ("first_frame_timeout", self.first_frame_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("idle_timeout", self.idle_timeout),
            ("opaque_idle_timeout", self.opaque_idle_timeout),
            ("opaque_half_closed_timeout", self.opaque_half_closed_timeout),
        ] {
            if value.is_zero() {
                return Err((at(field), "must be more than 0s".into()));
            }
        }
        Ok(())
    }

    pub fn stream_window(&self) -> u32 {
        self.stream_window.as_u64() as u32
    }

    pub fn max_header_list_size(&self) -> u32 {
        self.max_header_list_size.as_u64() as u32
    }
}

/// The window of every connection the sidecar serves or opens: as large as
/// HTTP/2 allows, so that streams' windows alone bound what is buffered.
pub const CONNECTION_WINDOW: u32 = MAX_WINDOW as u32;
