//! The shipped Grafana dashboard (`deploy/grafana/adaptivenet.json`) and Prometheus alert rules
//! (`deploy/prometheus/alerts.yml`) name only metrics a real server exports: a server that has
//! run a job, enrolled a device, taken a report and served a blob is scraped, and every
//! `adaptivenet_*` name in every expression must be a series of that scrape.
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adaptivenet_cloud::domain::Role;
use adaptivenet_cloud::error::CloudError;
use adaptivenet_cloud::jobs::{JobContext, JobOutput, JobRunner};
use adaptivenet_proto::v1 as pb;
use common::*;
use futures::future::BoxFuture;

/// A job body that writes a real supernet artifact into the job's blob store at once.
struct ArtifactRunner;

impl JobRunner for ArtifactRunner {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<JobOutput, CloudError>> {
        Box::pin(async move {
            ctx.progress.send("stage0", 1.0);
            Ok(JobOutput {
                manifest_json: store_supernet_artifact(&ctx.blobs, 11).await,
            })
        })
    }
}

fn deploy_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `adaptivenet_*` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("adaptivenet_") {
        let start = i + off;
        let boundary =
            start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Every `expr` string anywhere in a dashboard.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[derive(serde::Deserialize)]
struct Rules {
    groups: Vec<Group>,
}
#[derive(serde::Deserialize)]
struct Group {
    rules: Vec<Rule>,
}
#[derive(serde::Deserialize)]
struct Rule {
    alert: String,
    expr: String,
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// `name{labels} value` lines of an exposition: the value of the first series `prefix` starts.
fn value(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {prefix} in\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    let Some(h) = Harness::start(
        Db::Sqlite,
        |c| {
            c.metrics_refresh = Duration::from_millis(50);
            c.min_group_devices = 1;
        },
        Some(Arc::new(ArtifactRunner)),
    )
    .await
    else {
        return;
    };
    let dev = h.token(Role::Developer).await;

    // A job: upload, a dataset, elastify (the worker runs it), the supernet it registered.
    let oracle = job_oracle(&h, &dev, "o", 20).await;
    let dataset = job_dataset(&h, &dev).await;
    let job = h
        .developer()
        .start_elastification(authed(
            pb::StartElastificationRequest {
                oracle_id: oracle.id.clone(),
                dataset_id: dataset,
                params_json: "{\"seed\":1}".into(),
                ..Default::default()
            },
            &dev,
        ))
        .await
        .expect("start")
        .into_inner();
    let mut supernet = String::new();
    for _ in 0..200 {
        let j = h
            .developer()
            .get_job(authed(
                pb::GetJobRequest {
                    job_id: job.id.clone(),
                },
                &dev,
            ))
            .await
            .expect("job")
            .into_inner();
        if j.state == pb::JobState::Succeeded as i32 {
            supernet = j.supernet_id;
            break;
        }
        assert_ne!(j.state, pb::JobState::Failed as i32, "{j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!supernet.is_empty(), "the job did not succeed in time");

    // A device: enrolled into a fleet the supernet is published to, reports, downloads a blob.
    let (fleet, _device, cred) = h.enrolled_device("f").await;
    h.developer()
        .publish_supernet(authed(
            pb::PublishSupernetRequest {
                supernet_id: supernet.clone(),
                fleet_id: fleet,
                label: "stable".into(),
            },
            &dev,
        ))
        .await
        .expect("publish");
    h.device()
        .report(authed(
            pb::ReportRequest {
                supernet_id: supernet.clone(),
                active_subnet: "0000".into(),
                latency_p50_ms: 5.0,
                latency_p95_ms: 6.0,
                latency_budget_ms: 10.0,
                quality_estimate: 0.9,
                quality_sample_count: 500,
                device_class: pb::DeviceClass::CpuSmall as i32,
                ..Default::default()
            },
            &cred,
        ))
        .await
        .expect("report");
    let manifest = h
        .device()
        .get_manifest(authed(
            pb::GetManifestRequest {
                supernet_id: supernet.clone(),
            },
            &cred,
        ))
        .await
        .expect("manifest")
        .into_inner();
    let blob = manifest.blobs.first().expect("a module blob");
    let mut chunks = h
        .device()
        .download_blob(authed(
            pb::DownloadBlobRequest {
                sha256: blob.sha256.clone(),
                offset: 0,
                chunk_size: 0,
            },
            &cred,
        ))
        .await
        .expect("download")
        .into_inner();
    while chunks.message().await.expect("chunk").is_some() {}

    // Let the census refresher count them, then scrape.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let maddr = h
        .handle
        .as_ref()
        .expect("running")
        .metrics_addr
        .expect("metrics");
    let scrape = http_get(maddr, "/metrics").await;
    let series: BTreeSet<String> = scrape
        .lines()
        .filter(|l| l.starts_with("adaptivenet_"))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();

    // The work shows in the numbers the dashboard and alerts read.
    assert_eq!(
        value(&scrape, "adaptivenet_devices{status=\"online\"} "),
        1.0
    );
    assert_eq!(
        value(&scrape, "adaptivenet_jobs{state=\"succeeded\"} "),
        1.0
    );
    assert_eq!(value(&scrape, "adaptivenet_jobs{state=\"queued\"} "), 0.0);
    assert_eq!(value(&scrape, "adaptivenet_reports_total "), 1.0);
    assert!(value(&scrape, "adaptivenet_blob_bytes_sent_total ") >= blob.size_bytes as f64);
    assert_eq!(
        value(
            &scrape,
            "adaptivenet_job_run_duration_seconds_count{kind=\"elastify\",outcome=\"succeeded\"} "
        ),
        1.0
    );
    assert!(value(&scrape, "adaptivenet_census_timestamp_seconds ") > 1.7e9);

    let dashboard: serde_json::Value =
        serde_json::from_str(&deploy_file("grafana/adaptivenet.json")).expect("dashboard JSON");
    let mut dash_exprs = Vec::new();
    exprs(&dashboard, &mut dash_exprs);
    let rules: Rules =
        serde_norway::from_str(&deploy_file("prometheus/alerts.yml")).expect("alert rules YAML");
    let rules: Vec<Rule> = rules.groups.into_iter().flat_map(|g| g.rules).collect();

    let mut used = BTreeSet::new();
    for e in dash_exprs.iter().chain(rules.iter().map(|r| &r.expr)) {
        let names = metric_names(e);
        assert!(
            !names.is_empty(),
            "an expression names no adaptivenet metric: {e}"
        );
        for n in names {
            assert!(
                series.contains(&n),
                "{n} (in `{e}`) is not exported; /metrics has {series:?}"
            );
            used.insert(n);
        }
    }
    // What the dashboard is for: request rates and latencies, shedding, the job queue and
    // durations, devices, reports, blob bytes, database errors.
    for n in [
        "adaptivenet_grpc_requests_total",
        "adaptivenet_grpc_request_duration_ms_bucket",
        "adaptivenet_grpc_shed_total",
        "adaptivenet_jobs",
        "adaptivenet_job_run_duration_seconds_bucket",
        "adaptivenet_devices",
        "adaptivenet_reports_total",
        "adaptivenet_blob_bytes_sent_total",
        "adaptivenet_db_errors_total",
    ] {
        assert!(used.contains(n), "nothing shows {n}");
    }
    let alerts: Vec<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for a in [
        "AdaptivenetDevicesStale",
        "AdaptivenetJobsFailed",
        "AdaptivenetLoadShedding",
        "AdaptivenetDatabaseErrors",
    ] {
        assert!(alerts.contains(&a), "missing alert {a}: {alerts:?}");
    }
    h.finish().await;
}

#[test]
fn metric_names_are_found_whole() {
    let n = metric_names(
        "histogram_quantile(0.5, sum by (le) (rate(adaptivenet_grpc_request_duration_ms_bucket[5m]))) / xadaptivenet_no",
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        vec!["adaptivenet_grpc_request_duration_ms_bucket".to_string()]
    );
}
