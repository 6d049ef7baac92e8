//! Network limits against hostile or broken clients, as one set of `serve` flags.
//!
//! Each knob protects a resource a client could otherwise hold without bound: request slots
//! (per-principal quotas, the anonymous pool), time (body, request and upload idle timeouts),
//! and connections (HTTP/2 keepalive, connection age, streams per connection, header size).
//! The defaults suit a fleet of thousands of agents behind a handful of API replicas.
use std::time::Duration;

/// The network limits of `cloud-server serve` (flattened into its flags).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct NetLimits {
    /// Unary calls (including client-streaming uploads) one authenticated principal may have
    /// in flight; more are refused with RESOURCE_EXHAUSTED, so one token or device cannot
    /// take the server's request slots.
    #[arg(long, default_value_t = 128)]
    pub max_unary_per_principal: usize,
    /// Open server-streaming calls (DownloadBlob, WatchJob, WatchFleet) per authenticated
    /// principal, counted for the stream's whole life.
    #[arg(long, default_value_t = 32)]
    pub max_streams_per_principal: usize,
    /// Calls without a valid credential (enrollment, reflection, rejected tokens) share this
    /// pool, held for the call's whole life; credential lookups that miss the cache are
    /// bounded by a second pool of the same size.
    #[arg(long, default_value_t = 64)]
    pub max_anonymous_requests: usize,
    /// How long a call whose credential lookup finds that pool full waits for a place in it
    /// before RESOURCE_EXHAUSTED, milliseconds. A fleet reconnecting after a restart misses
    /// the (per-process) credential cache all at once: 10,000 agents within 5 s outran the
    /// pool on PostgreSQL when full meant refused (`benches/fleet.rs`, cadence scenario).
    #[arg(long, default_value_t = 5_000)]
    pub credential_lookup_wait_ms: u64,
    /// A call whose request message has not fully arrived within this many milliseconds of
    /// its headers fails with DEADLINE_EXCEEDED (slow-body clients cannot hold a slot).
    /// Client-streaming uploads use `--upload-idle-timeout-ms` instead.
    #[arg(long, default_value_t = 10_000)]
    pub body_timeout_ms: u64,
    /// Longest a unary call may take from headers to response (DEADLINE_EXCEEDED after).
    #[arg(long, default_value_t = 60_000)]
    pub request_timeout_ms: u64,
    /// An upload stream that delivers no message for this many milliseconds fails with
    /// DEADLINE_EXCEEDED and stores nothing.
    #[arg(long, default_value_t = 30_000)]
    pub upload_idle_timeout_ms: u64,
    /// Interval of HTTP/2 keepalive pings on idle connections, seconds (0: off).
    #[arg(long, default_value_t = 30)]
    pub http2_keepalive_secs: u64,
    /// A connection whose keepalive ping is not answered within this many seconds is closed.
    #[arg(long, default_value_t = 10)]
    pub http2_keepalive_timeout_secs: u64,
    /// Connections are asked to close (GOAWAY) after this many seconds, so load rebalances
    /// across replicas and no connection lives forever (0: no limit). Downloads resume and
    /// watches reconnect.
    #[arg(long, default_value_t = 3600)]
    pub max_connection_age_secs: u64,
    /// Grace period after the GOAWAY of `--max-connection-age-secs` before in-flight calls
    /// on the old connection are cut, seconds.
    #[arg(long, default_value_t = 300)]
    pub max_connection_age_grace_secs: u64,
    /// Concurrent HTTP/2 streams one connection may open (tonic sets no limit by default).
    #[arg(long, default_value_t = 128)]
    pub max_streams_per_connection: u32,
    /// Largest accepted request header block (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE), bytes.
    #[arg(long, default_value_t = 16 << 10)]
    pub max_header_bytes: u32,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            max_unary_per_principal: 128,
            max_streams_per_principal: 32,
            max_anonymous_requests: 64,
            credential_lookup_wait_ms: 5_000,
            body_timeout_ms: 10_000,
            request_timeout_ms: 60_000,
            upload_idle_timeout_ms: 30_000,
            http2_keepalive_secs: 30,
            http2_keepalive_timeout_secs: 10,
            max_connection_age_secs: 3600,
            max_connection_age_grace_secs: 300,
            max_streams_per_connection: 128,
            max_header_bytes: 16 << 10,
        }
    }
}

impl NetLimits {
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms.max(1))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn credential_lookup_wait(&self) -> Duration {
        Duration::from_millis(self.credential_lookup_wait_ms)
    }

    pub fn upload_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.upload_idle_timeout_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        net: NetLimits,
    }

    #[test]
    fn flag_defaults_match_default() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(cli.net, NetLimits::default());
        let cli = Cli::parse_from(["x", "--upload-idle-timeout-ms", "250"]);
        assert_eq!(cli.net.upload_idle_timeout(), Duration::from_millis(250));
    }
}
