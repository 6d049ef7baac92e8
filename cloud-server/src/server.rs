//! Assembling and running the gRPC server: services behind the ops layer, health,
//! reflection, background tasks (stale-device sweeper, in-process workers) and the
//! graceful shutdown sequence.
//!
//! Shutdown: (1) health goes NOT_SERVING for every service, (2) the app's shutdown token is
//! cancelled, which ends watch and download streams (UNAVAILABLE, resumable) and stops
//! workers (their jobs go back to the queue), (3) after `drain_grace` the listener closes
//! and in-flight unary calls are awaited.
use std::net::SocketAddr;
use std::sync::Arc;

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
}

/// TLS material (PEM) for the gRPC listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(adaptivenet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CloudError::Internal(format!("reflection: {e}")))?;

    let msg_limit = MAX_CHUNK + (64 << 10);
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut builder = tonic::transport::Server::builder();
    #[cfg(feature = "tls")]
    if let Some(t) = tls {
        let identity = tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(|e| CloudError::invalid("tls", e.to_string()))?;
    }
    #[cfg(not(feature = "tls"))]
    if tls.is_some() {
        return Err(CloudError::invalid(
            "tls",
            "this build has no TLS support (cargo feature `tls`)",
        ));
    }
    let router = builder
        .layer(OpsLayer::new(
            app.config().max_concurrent_requests,
            Arc::new(AppMetrics(app.clone())),
        ))
        .add_service(health_svc)
        .add_service(reflection)
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
    let mut background = vec![tokio::spawn(stale_sweeper(app.clone(), stop.clone()))];
    if let Some(r) = runner {
        background.extend(spawn_workers(&app, r, app.config().workers, stop.clone()));
    }
    let metrics_addr = match metrics_listener {
        Some(l) => {
            let a = l.local_addr().ok();
            let m = app.clone();
            let render: Arc<dyn Fn() -> String + Send + Sync> =
                Arc::new(move || m.metrics().render());
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
