//! The request layer in front of every gRPC service: a global concurrency limit that sheds
//! excess requests at once with RESOURCE_EXHAUSTED (no queue, so memory stays bounded), and
//! per-method request metrics. Streaming responses release their slot when the response
//! head is sent, so long watches do not starve unary calls.
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use super::metrics::Metrics;

/// Builds [`OpsService`]s.
#[derive(Clone, Debug)]
pub struct OpsLayer {
    sem: Arc<Semaphore>,
    metrics: Arc<dyn MetricsSink>,
    limit: usize,
}

/// Where the layer records (the App's metrics).
pub trait MetricsSink: Send + Sync + std::fmt::Debug + 'static {
    fn metrics(&self) -> &Metrics;
}

impl OpsLayer {
    pub fn new(limit: usize, metrics: Arc<dyn MetricsSink>) -> Self {
        OpsLayer {
            sem: Arc::new(Semaphore::new(limit.max(1))),
            metrics,
            limit: limit.max(1),
        }
    }
}

impl<S> tower::Layer<S> for OpsLayer {
    type Service = OpsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OpsService {
            inner,
            sem: self.sem.clone(),
            metrics: self.metrics.clone(),
            limit: self.limit,
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct OpsService<S> {
    inner: S,
    sem: Arc<Semaphore>,
    metrics: Arc<dyn MetricsSink>,
    limit: usize,
}

impl<S, B, RB> tower::Service<http::Request<B>> for OpsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError> + Send,
    B: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let metrics = self.metrics.clone();
        let permit = match self.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let m = metrics.metrics();
                Metrics::inc(&m.shed_total);
                m.observe(&method, "8", std::time::Duration::ZERO);
                let limit = self.limit;
                return Box::pin(async move {
                    Err(Box::new(tonic::Status::resource_exhausted(format!(
                        "server overloaded: more than {limit} requests in flight, retry with backoff"
                    ))) as tower::BoxError)
                });
            }
        };
        // Standard tower idiom: use the clone that was driven to readiness.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let m = metrics.metrics();
            m.in_flight
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let start = Instant::now();
            let res = inner.call(req).await.map_err(Into::into);
            m.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_string(),
                Err(_) => "2".to_string(),
            };
            m.observe(&method, &code, start.elapsed());
            res
        })
    }
}
