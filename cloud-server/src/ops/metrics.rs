//! Prometheus metrics, kept in-process with atomics and rendered in the text format on
//! `GET /metrics` (no metrics framework: the set is small and fixed). Request labels are
//! `&'static str` from the method table (`ops::methods`) and the closed set of status codes,
//! so no client input ever becomes a label: the exposition stays bounded and valid.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const BUCKETS_MS: [f64; 12] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 30000.0,
];

/// Job run durations, seconds: a few seconds (tiny tests) to hours (real training).
const BUCKETS_JOB_S: [f64; 12] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The labels the census gauges always show (0 until counted), so dashboards and alert
/// rules find every series from the first scrape on.
const DEVICE_STATUSES: [&str; 3] = ["online", "stale", "revoked"];
const JOB_STATES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS_MS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64; BUCKETS_MS.len()], v: f64) {
        for (i, b) in buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    pub in_flight: AtomicU64,
    pub shed_total: AtomicU64,
    pub oracle_uploads_total: AtomicU64,
    pub reports_total: AtomicU64,
    pub enrollments_total: AtomicU64,
    pub blob_bytes_sent_total: AtomicU64,
    pub jobs_finished_total: AtomicU64,
    /// Database reads of the shared WatchJob poller (one per watched job per tick, however
    /// many clients watch it).
    pub job_watch_polls_total: AtomicU64,
    /// Run time of each job attempt in this process's workers, by (kind, outcome).
    job_runs: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// The last census (devices per status, jobs per state) and when it was taken.
    census: Mutex<(crate::store::Census, u64)>,
}

/// The status-code label of a `grpc-status` value: `"0"`..`"16"`, anything else `"2"`
/// (UNKNOWN).
pub fn code_label(v: &str) -> &'static str {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    v.parse::<usize>()
        .ok()
        .and_then(|i| CODES.get(i).copied())
        .unwrap_or("2")
}

impl Metrics {
    /// Records one finished request: `method` is a known method's path or
    /// [`super::methods::UNKNOWN`], `code` a [`code_label`].
    pub fn observe(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((method, code))
            .or_default() += 1;
        let ms = elapsed.as_secs_f64() * 1e3;
        let mut lat = self.latency.lock().expect("metrics lock");
        lat.entry(method).or_default().observe(&BUCKETS_MS, ms);
    }

    /// Records one job attempt that ended in this process: `kind` and `outcome`
    /// (`succeeded`, `failed`, `cancelled`, `released`) are the domain's fixed names.
    pub fn observe_job(&self, kind: &'static str, outcome: &'static str, elapsed: Duration) {
        self.job_runs
            .lock()
            .expect("metrics lock")
            .entry((kind, outcome))
            .or_default()
            .observe(&BUCKETS_JOB_S, elapsed.as_secs_f64());
    }

    /// Replaces the census the gauges show; `at_unix_s` is exported so a stalled refresher
    /// is visible.
    pub fn set_census(&self, census: crate::store::Census, at_unix_s: u64) {
        *self.census.lock().expect("metrics lock") = (census, at_unix_s);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "# TYPE adaptivenet_grpc_requests_total counter");
        for ((m, c), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                s,
                "adaptivenet_grpc_requests_total{{method=\"{m}\",code=\"{c}\"}} {n}"
            );
        }
        let _ = writeln!(s, "# TYPE adaptivenet_grpc_request_duration_ms histogram");
        for (m, h) in self.latency.lock().expect("metrics lock").iter() {
            for (i, b) in BUCKETS_MS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "adaptivenet_grpc_request_duration_ms_bucket{{method=\"{m}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                s,
                "adaptivenet_grpc_request_duration_ms_bucket{{method=\"{m}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                s,
                "adaptivenet_grpc_request_duration_ms_sum{{method=\"{m}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                s,
                "adaptivenet_grpc_request_duration_ms_count{{method=\"{m}\"}} {}",
                h.count
            );
        }
        let gauges = [
            ("adaptivenet_grpc_in_flight", "gauge", &self.in_flight),
            ("adaptivenet_grpc_shed_total", "counter", &self.shed_total),
            (
                "adaptivenet_oracle_uploads_total",
                "counter",
                &self.oracle_uploads_total,
            ),
            ("adaptivenet_reports_total", "counter", &self.reports_total),
            (
                "adaptivenet_enrollments_total",
                "counter",
                &self.enrollments_total,
            ),
            (
                "adaptivenet_blob_bytes_sent_total",
                "counter",
                &self.blob_bytes_sent_total,
            ),
            (
                "adaptivenet_jobs_finished_total",
                "counter",
                &self.jobs_finished_total,
            ),
            (
                "adaptivenet_job_watch_polls_total",
                "counter",
                &self.job_watch_polls_total,
            ),
        ];
        for (name, kind, v) in gauges {
            let _ = writeln!(
                s,
                "# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# TYPE adaptivenet_db_errors_total counter\nadaptivenet_db_errors_total {}",
            crate::error::db_errors_total()
        );
        self.render_jobs(&mut s);
        let guard = self.census.lock().expect("metrics lock");
        let (census, at) = &*guard;
        // Only processes that count (`serve`) export the census; a worker has none.
        if *at == 0 {
            return s;
        }
        let count = |list: &[(&str, u64)], label: &str| {
            list.iter()
                .filter(|(l, _)| *l == label)
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        let _ = writeln!(s, "# TYPE adaptivenet_devices gauge");
        for st in DEVICE_STATUSES {
            let n = count(&census.devices, st);
            let _ = writeln!(s, "adaptivenet_devices{{status=\"{st}\"}} {n}");
        }
        let _ = writeln!(s, "# TYPE adaptivenet_jobs gauge");
        for st in JOB_STATES {
            let n = count(&census.jobs, st);
            let _ = writeln!(s, "adaptivenet_jobs{{state=\"{st}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# TYPE adaptivenet_census_timestamp_seconds gauge\nadaptivenet_census_timestamp_seconds {at}"
        );
        s
    }

    fn render_jobs(&self, s: &mut String) {
        use std::fmt::Write;
        let name = "adaptivenet_job_run_duration_seconds";
        let _ = writeln!(s, "# TYPE {name} histogram");
        for ((k, o), h) in self.job_runs.lock().expect("metrics lock").iter() {
            let l = format!("kind=\"{k}\",outcome=\"{o}\"");
            for (i, b) in BUCKETS_JOB_S.iter().enumerate() {
                let _ = writeln!(s, "{name}_bucket{{{l},le=\"{b}\"}} {}", h.counts[i]);
            }
            let _ = writeln!(s, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(s, "{name}_sum{{{l}}} {}", h.sum);
            let _ = writeln!(s, "{name}_count{{{l}}} {}", h.count);
        }
    }
}

/// Serves `GET /metrics` (Prometheus) and `GET /healthz` over plain HTTP/1.1 until `stop`.
/// Deliberately minimal: one request per connection, bounded request size.
pub async fn serve_http(
    listener: TcpListener,
    metrics: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    stop: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // A request line may arrive in several segments: read up to the end of the
            // headers (or a full buffer) before answering, within one 5 s budget.
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let read_head = async {
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read_head)
                .await
                .is_err()
                || n == 0
            {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", metrics())
            } else if req.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_labels_are_closed() {
        assert_eq!(code_label("0"), "0");
        assert_eq!(code_label("16"), "16");
        assert_eq!(code_label("17"), "2");
        assert_eq!(code_label("\"}"), "2");
    }
}
