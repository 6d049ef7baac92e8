//! The jobs view's live updates as server-sent events (`text/event-stream`).
//!
//! Fed by the same shared poller as `WatchJob` (`api::watch::JobWatches`): however many
//! consoles are open, each watched job is read once per tick. Every `RESCAN` the stream
//! looks for queued and running jobs it does not follow yet (jobs started after the page
//! was opened), and follows each until it ends. The page reads the stream with `fetch`, so
//! the token travels in the `authorization` header, never in a URL.
use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;

use super::{respond, Body};
use crate::api::management;
use crate::api::watch::JobWatches;
use crate::app::App;
use crate::auth::Access;
use crate::domain::{Job, JobState, Page};
use crate::error::Result;

/// How often the stream looks for jobs it does not follow yet.
const RESCAN: Duration = Duration::from_secs(2);
/// A comment line this often keeps proxies and the browser from closing an idle stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Answers `/api/jobs/events`: authorised like `ListJobs`, then an open event stream.
pub async fn jobs(app: &App, watches: &JobWatches, md: &MetadataMap) -> Result<Response<Body>> {
    management(app, md, Access::Read).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(feed(app.clone(), watches.clone(), tx));
    let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = respond(
        StatusCode::OK,
        "text/event-stream",
        BodyExt::boxed(StreamBody::new(frames)),
    );
    r.headers_mut()
        .insert("x-accel-buffering", "no".parse().expect("ascii"));
    Ok(r)
}

/// One `job` event: the fields the jobs view updates in place.
pub fn event(j: &Job) -> Bytes {
    let v = serde_json::json!({
        "id": j.id.to_string(),
        "state": j.state.as_str(),
        "stage": j.stage,
        "progress": j.progress,
        "attempts": j.attempts,
        "error": j.error,
    });
    Bytes::from(format!("event: job\ndata: {v}\n\n"))
}

async fn feed(app: App, watches: JobWatches, tx: mpsc::Sender<Bytes>) {
    let stop = app.shutdown_token().clone();
    let (jobs_tx, mut jobs_rx) = mpsc::channel::<Job>(64);
    let mut followed: HashSet<uuid::Uuid> = HashSet::new();
    let mut rescan = tokio::time::interval(RESCAN);
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.tick().await;
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = keepalive.tick() => Bytes::from_static(b": keepalive\n\n"),
            j = jobs_rx.recv() => match j {
                Some(j) => event(&j),
                None => return,
            },
            _ = rescan.tick() => {
                for j in active_jobs(&app).await {
                    if followed.insert(j.id) {
                        if tx.send(event(&j)).await.is_err() {
                            return;
                        }
                        tokio::spawn(forward(watches.subscribe(&app, j), jobs_tx.clone()));
                    }
                }
                continue;
            }
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

/// Queued and running jobs (a failed read is retried at the next rescan).
async fn active_jobs(app: &App) -> Vec<Job> {
    let mut out = Vec::new();
    for state in [JobState::Running, JobState::Queued] {
        match Page::new(1000, "") {
            Ok(page) => match app.store().list_jobs(page, Some(state)).await {
                Ok(list) => out.extend(list),
                Err(e) => tracing::debug!(error = %e, "console job rescan failed"),
            },
            Err(_) => return out,
        }
    }
    out
}

/// Forwards every state the shared poller sees of one job until it ends or the stream
/// closes.
async fn forward(mut rx: tokio::sync::watch::Receiver<Job>, out: mpsc::Sender<Job>) {
    loop {
        tokio::select! {
            _ = out.closed() => return,
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
                let j = rx.borrow_and_update().clone();
                let done = j.state.is_terminal();
                if out.send(j).await.is_err() || done {
                    return;
                }
            }
        }
    }
}
