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
            // The guard owns the slot: a caller that drops this future mid-call (client gone,
            // deadline layer) still releases the permit and the in-flight gauge.
            let slot = InFlight::enter(metrics.clone(), permit);
            let start = Instant::now();
            let res = inner.call(req).await.map_err(Into::into);
            drop(slot);
            let m = metrics.metrics();
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

/// One admitted request: holds its concurrency permit and counts in the in-flight gauge until
/// dropped, however the request's future ends.
struct InFlight {
    metrics: Arc<dyn MetricsSink>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl InFlight {
    fn enter(metrics: Arc<dyn MetricsSink>, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        metrics
            .metrics()
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight {
            metrics,
            _permit: permit,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics
            .metrics()
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tower::{Layer, Service};

    #[derive(Debug, Default)]
    struct Sink(Metrics);
    impl MetricsSink for Sink {
        fn metrics(&self) -> &Metrics {
            &self.0
        }
    }

    /// A handler that never answers, as a stuck database call would.
    #[derive(Clone)]
    struct Never;
    impl tower::Service<http::Request<()>> for Never {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = futures::future::Pending<Result<http::Response<()>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            futures::future::pending()
        }
    }

    #[tokio::test]
    async fn dropped_request_releases_its_slot_and_gauge() {
        let sink = Arc::new(Sink::default());
        let layer = OpsLayer::new(2, sink.clone());
        let mut svc = layer.layer(Never);
        let req = || http::Request::builder().uri("/x/Y").body(()).unwrap();
        // Two requests occupy both slots; a third is shed.
        let mut a = svc.call(req());
        let mut b = svc.call(req());
        for f in [&mut a, &mut b] {
            assert!(futures::poll!(f.as_mut()).is_pending());
        }
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 2);
        let shed = svc
            .call(req())
            .await
            .expect_err("third request must be shed");
        let status = shed.downcast::<tonic::Status>().expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        // The callers give up (client cancelled, deadline): slots and gauge come back.
        drop(a);
        drop(b);
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 0);
        let mut c = svc.call(req());
        assert!(futures::poll!(c.as_mut()).is_pending());
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 1);
    }
}
