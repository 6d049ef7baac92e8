//! Assembling and running the gRPC server: services behind the ops layer, health,
//! reflection, background tasks (stale-device sweeper, in-process workers) and the
//! graceful shutdown sequence.
//!
//! Shutdown: (1) health goes NOT_SERVING for every service, (2) the app's shutdown token is
//! cancelled, which ends watch and download streams (UNAVAILABLE, resumable) and stops
//! workers (their jobs go back to the queue), (3) after `drain_grace` the listener closes
//! and in-flight unary calls are awaited.
//!
//! Deadlines: tonic enforces a client's `grpc-timeout` only until the response head and
//! reports expiry as CANCELLED. [`DeadlineLayer`] answers DEADLINE_EXCEEDED instead (just
//! before tonic's own timer) and also ends a response stream that outlives the deadline
//! with DEADLINE_EXCEEDED trailers; the handler's future is dropped, so its work stops.
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use adaptivenet_proto::v1::admin_service_server::AdminServiceServer;
use adaptivenet_proto::v1::dashboard_service_server::DashboardServiceServer;
use adaptivenet_proto::v1::developer_service_server::DeveloperServiceServer;
use adaptivenet_proto::v1::device_service_server::DeviceServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::api::admin::AdminApi;
use crate::api::dashboard::DashboardApi;
use crate::api::developer::{DeveloperApi, MAX_CHUNK};
use crate::api::device::DeviceApi;
use crate::app::App;
use crate::auth::Principal;
use crate::domain::{now_ms, FleetEventKind};
use crate::error::{CloudError, Result};
use crate::jobs::{spawn_workers, JobRunner};
use crate::ops::layer::{MetricsSink, OpsLayer};
use crate::ops::metrics::Metrics;

/// Fully-qualified names of the services (as health reports them).
pub const SERVICE_NAMES: [&str; 4] = [
    "adaptivenet.v1.DeveloperService",
    "adaptivenet.v1.DeviceService",
    "adaptivenet.v1.DashboardService",
    "adaptivenet.v1.AdminService",
];

#[derive(Debug)]
struct AppMetrics(App);
impl MetricsSink for AppMetrics {
    fn metrics(&self) -> &Metrics {
        self.0.metrics()
    }

    /// The principal of a valid credential: an API token's id or a device's id. Invalid
    /// credentials are anonymous here; the handler answers UNAUTHENTICATED.
    fn identify(
        &self,
        headers: &http::HeaderMap,
    ) -> futures::future::BoxFuture<'static, Option<uuid::Uuid>> {
        let app = self.0.clone();
        let md = tonic::metadata::MetadataMap::from_headers(headers.clone());
        Box::pin(async move {
            match app.auth().authenticate(&md).await.ok()? {
                Principal::Api { token_id, .. } => Some(token_id),
                Principal::Device { device_id, .. } => Some(device_id),
            }
        })
    }
}

/// TLS material (PEM) for the gRPC listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Mutual TLS: CA certificate(s) that sign client certificates. When set, every client
    /// must present a certificate chaining to it, or the handshake fails. tonic's
    /// `client_auth_optional` would also let clients without one in, which would make the
    /// certificate no barrier at all, so mTLS is all or nothing per listener.
    pub client_ca_pem: Option<Vec<u8>>,
}

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    app: App,
    health: tonic_health::server::HealthReporter,
    close: CancellationToken,
    join: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Runs the shutdown sequence (see the module docs) and waits for the server to stop.
    pub async fn shutdown(self) -> Result<()> {
        for s in SERVICE_NAMES {
            self.health
                .set_service_status(s, ServingStatus::NotServing)
                .await;
        }
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.app.shutdown_token().cancel();
        tokio::time::sleep(self.app.config().drain_grace).await;
        self.close.cancel();
        let r = self.join.await;
        for b in self.background {
            let _ = b.await;
        }
        self.app.store().close().await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CloudError::Internal(format!("server: {e}"))),
            Err(e) => Err(CloudError::Internal(format!("server task: {e}"))),
        }
    }
}

/// Starts serving on `listener`; `runner` (if any) runs jobs in `config.workers`
/// in-process workers; `metrics_listener` (if any) serves Prometheus metrics.
pub async fn start(
    app: App,
    listener: TcpListener,
    runner: Option<Arc<dyn JobRunner>>,
    metrics_listener: Option<TcpListener>,
    tls: Option<TlsFiles>,
) -> Result<ServerHandle> {
    let addr = listener
        .local_addr()
        .map_err(|e| CloudError::io("listener", e))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    for s in SERVICE_NAMES {
        health.set_service_status(s, ServingStatus::Serving).await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    // Both reflection versions: grpcurl speaks v1, Python's grpc_reflection and older
    // tools only v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(adaptivenet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| CloudError::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| CloudError::Internal(format!("reflection v1alpha: {e}")))?;

    let msg_limit = MAX_CHUNK + (64 << 10);
    let net = app.config().net.clone();
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(secs(net.http2_keepalive_secs))
        .http2_keepalive_timeout(secs(net.http2_keepalive_timeout_secs))
        .max_concurrent_streams(net.max_streams_per_connection.max(1))
        .http2_max_header_list_size(net.max_header_bytes.max(1024));
    if let Some(age) = secs(net.max_connection_age_secs) {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(Duration::from_secs(net.max_connection_age_grace_secs));
    }
    #[cfg(feature = "tls")]
    if let Some(t) = tls {
        let identity = tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem);
        let mut cfg = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = t.client_ca_pem {
            cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(cfg)
            .map_err(|e| CloudError::invalid("tls", e.to_string()))?;
    }
    #[cfg(not(feature = "tls"))]
    if tls.is_some() {
        return Err(CloudError::invalid(
            "tls",
            "this build has no TLS support (cargo feature `tls`)",
        ));
    }
    // gRPC-Web (ops/web.rs): HTTP/1.1 only when an origin is configured. The gate and the
    // translation sit in front of the ops layer, so a translated call is admitted, limited,
    // timed and counted like a native one.
    let web = crate::ops::web::WebOrigins::parse(&app.config().grpc_web_origins)?;
    builder = builder.accept_http1(web.enabled());
    let router = builder
        .layer(crate::ops::web::WebGateLayer::new(web))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(OpsLayer::new(
            app.config().max_concurrent_requests,
            Arc::new(AppMetrics(app.clone())),
            net,
        ))
        .layer(DeadlineLayer)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(
            DeveloperServiceServer::new(DeveloperApi::new(app.clone()))
                .max_decoding_message_size(msg_limit),
        )
        .add_service(DeviceServiceServer::new(DeviceApi::new(app.clone())))
        .add_service(DashboardServiceServer::new(DashboardApi::new(app.clone())))
        .add_service(AdminServiceServer::new(AdminApi::new(app.clone())));
    let close = CancellationToken::new();
    let close2 = close.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let join = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, close2.cancelled_owned())
            .await
    });

    let stop = app.shutdown_token().clone();
    let mut background = vec![
        tokio::spawn(stale_sweeper(app.clone(), stop.clone())),
        tokio::spawn(census_refresher(app.clone(), stop.clone())),
        tokio::spawn(crate::rollout::engine::run(app.clone(), stop.clone())),
    ];
    if let Some(r) = runner {
        background.extend(spawn_workers(&app, r, app.config().workers, stop.clone()));
    }
    let metrics_addr = match metrics_listener {
        Some(l) => {
            let a = l.local_addr().ok();
            let m = app.clone();
            let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
                // Credential lookups reach the database batched: far fewer of these than
                // cache misses is what keeps a reconnecting fleet cheap.
                let name = "adaptivenet_credential_lookup_queries_total";
                format!(
                    "{}# TYPE {name} counter\n{name} {}\n",
                    m.metrics().render(),
                    m.store().credential_queries()
                )
            });
            background.push(tokio::spawn(crate::ops::metrics::serve_http(
                l,
                render,
                stop.clone(),
            )));
            a
        }
        None => None,
    };
    tracing::info!(%addr, "serving");
    Ok(ServerHandle {
        addr,
        metrics_addr,
        app,
        health,
        close,
        join,
        background,
    })
}

/// Marks devices that missed `stale_after_missed` heartbeats as stale, periodically.
async fn stale_sweeper(app: App, stop: CancellationToken) {
    let interval = app.config().heartbeat_interval;
    let window = interval * app.config().stale_after_missed;
    let mut tick = tokio::time::interval((interval / 2).max(std::time::Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = now_ms() - window.as_millis() as i64;
        match app.store().mark_stale(cutoff).await {
            Ok(list) => {
                for (device, fleet) in list {
                    app.emit_fleet(FleetEventKind::DeviceStale, fleet, Some(device), None);
                }
            }
            Err(e) => tracing::warn!(error = %e, "stale sweep failed"),
        }
    }
}

/// Refreshes the device and job gauges of `/metrics` every `metrics_refresh` (two small
/// queries; a scrape only reads the last result).
async fn census_refresher(app: App, stop: CancellationToken) {
    let mut tick =
        tokio::time::interval(app.config().metrics_refresh.max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match app.store().census().await {
            Ok(c) => app.metrics().set_census(c, (now_ms() / 1000).max(0) as u64),
            Err(e) => tracing::warn!(error = %e, "metrics census failed"),
        }
    }
}

/// Honours the client's `grpc-timeout` with DEADLINE_EXCEEDED; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService { inner }
    }
}

/// See [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for DeadlineService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<tower::BoxError>,
{
    type Response = http::Response<DeadlineBody<RB>>;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let timeout = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let fut = self.inner.call(req);
        let Some(timeout) = timeout else {
            return Box::pin(async move {
                let r = fut.await.map_err(Into::into)?;
                Ok(r.map(|b| DeadlineBody::new(b, None)))
            });
        };
        // tonic's own timer (outside this layer, same duration, started a moment earlier)
        // would answer CANCELLED: fire slightly before it.
        let margin = (timeout / 20).min(Duration::from_millis(5));
        let at = tokio::time::Instant::now() + timeout.saturating_sub(margin);
        Box::pin(async move {
            match tokio::time::timeout_at(at, fut).await {
                Ok(r) => {
                    let r = r.map_err(Into::into)?;
                    Ok(r.map(|b| DeadlineBody::new(b, Some(at))))
                }
                Err(_) => Ok(deadline_status(timeout).into_http()),
            }
        })
    }
}

fn deadline_status(timeout: Duration) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!(
        "the call's deadline (grpc-timeout {timeout:?}) expired on the server"
    ))
}

/// Parses a `grpc-timeout` value (`TimeoutValue TimeoutUnit`, at most 8 digits).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response body that ends with DEADLINE_EXCEEDED trailers when the deadline passes
/// mid-stream (the inner body is dropped with it). `Default` is the empty body of a
/// trailers-only status response.
pub struct DeadlineBody<B> {
    inner: Option<Pin<Box<B>>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Option<tokio::time::Instant>) -> Self {
        DeadlineBody {
            inner: Some(Box::pin(inner)),
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
    }
}

impl<B> Default for DeadlineBody<B> {
    fn default() -> Self {
        DeadlineBody {
            inner: None,
            sleep: None,
        }
    }
}

impl<B> std::fmt::Debug for DeadlineBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineBody")
            .field("open", &self.inner.is_some())
            .field("deadline", &self.sleep.as_ref().map(|s| s.deadline()))
            .finish()
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<tower::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(f) = inner.as_mut().poll_frame(cx) {
            if f.is_none() {
                this.inner = None;
            }
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                this.inner = None;
                this.sleep = None;
                let mut trailers = http::HeaderMap::new();
                let status = tonic::Status::deadline_exceeded(
                    "the call's deadline (grpc-timeout) expired while streaming",
                );
                if status.add_header(&mut trailers).is_err() {
                    return Poll::Ready(Some(Err("encoding deadline trailers".into())));
                }
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            None => true,
            Some(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            None => http_body::SizeHint::with_exact(0),
            Some(b) => b.size_hint(),
        }
    }
}
