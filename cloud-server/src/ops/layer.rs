//! The request layer in front of every gRPC service: admission on the request head, before
//! any body byte is read.
//!
//! - Health checks pass without a slot, so probes answer however loaded the server is.
//! - The caller is identified from its `authorization` header (cached lookups; misses run
//!   under a bounded pool). An authenticated principal gets its own quota of unary calls and
//!   of open response streams; calls without a valid credential share one small pool. One
//!   client, authenticated or not, therefore cannot take every slot.
//! - Then a global slot, shed at once with RESOURCE_EXHAUSTED when full (no queue, so memory
//!   stays bounded).
//! - A single-message request body must arrive within the body timeout, and a unary call
//!   must finish within the request timeout (DEADLINE_EXCEEDED), so slow-body clients
//!   release what they hold.
//! - A streaming response keeps its quota (or anonymous-pool permit) until the stream ends,
//!   but gives the global slot back when its head is sent, so long watches do not starve
//!   unary calls.
//!
//! Metrics are recorded per known method; unknown paths share the label `unknown`.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use super::methods::{Kind, MethodTable, HEALTH_CHECK, UNKNOWN};
use super::metrics::{code_label, Metrics};
use super::net::NetLimits;

/// What the layer needs from the server: where to record, and who is calling.
pub trait MetricsSink: Send + Sync + std::fmt::Debug + 'static {
    fn metrics(&self) -> &Metrics;

    /// The principal a request head's credential names (`None`: no valid credential). The
    /// default knows nobody, so every call is anonymous.
    fn identify(&self, _headers: &http::HeaderMap) -> BoxFuture<'static, Option<Uuid>> {
        Box::pin(async { None })
    }
}

/// Builds [`OpsService`]s.
#[derive(Clone, Debug)]
pub struct OpsLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    global: Arc<Semaphore>,
    limit: usize,
    anonymous: Arc<Semaphore>,
    lookups: Arc<Semaphore>,
    /// Per principal: [unary calls in flight, open response streams]. An entry is removed
    /// when both reach zero, so the map is bounded by the principals currently calling.
    quotas: Mutex<HashMap<Uuid, [usize; 2]>>,
    net: NetLimits,
    methods: &'static MethodTable,
    sink: Arc<dyn MetricsSink>,
}

impl OpsLayer {
    /// `limit` global slots; quotas, pools and timeouts from `net`.
    pub fn new(limit: usize, sink: Arc<dyn MetricsSink>, net: NetLimits) -> Self {
        let anon = net.max_anonymous_requests.max(1);
        OpsLayer {
            shared: Arc::new(Shared {
                global: Arc::new(Semaphore::new(limit.max(1))),
                limit: limit.max(1),
                anonymous: Arc::new(Semaphore::new(anon)),
                lookups: Arc::new(Semaphore::new(anon)),
                quotas: Mutex::new(HashMap::new()),
                net,
                methods: MethodTable::cloud(),
                sink,
            }),
        }
    }
}

impl<S> tower::Layer<S> for OpsLayer {
    type Service = OpsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OpsService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct OpsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What an admitted call holds for its life (a stream's until the stream ends); released
/// on drop.
#[allow(dead_code)]
enum Hold {
    Principal(QuotaGuard),
    Anonymous(OwnedSemaphorePermit),
}

struct QuotaGuard {
    shared: Arc<Shared>,
    id: Uuid,
    idx: usize,
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        let mut q = self.shared.quotas.lock().expect("quota lock");
        if let Some(c) = q.get_mut(&self.id) {
            c[self.idx] = c[self.idx].saturating_sub(1);
            if c == &[0, 0] {
                q.remove(&self.id);
            }
        }
    }
}

impl Shared {
    fn take_quota(self: &Arc<Self>, id: Uuid, stream: bool) -> Result<QuotaGuard, usize> {
        let (idx, max) = if stream {
            (1, self.net.max_streams_per_principal.max(1))
        } else {
            (0, self.net.max_unary_per_principal.max(1))
        };
        let mut q = self.quotas.lock().expect("quota lock");
        let c = q.entry(id).or_insert([0, 0]);
        if c[idx] >= max {
            if c == &[0, 0] {
                q.remove(&id);
            }
            return Err(max);
        }
        c[idx] += 1;
        Ok(QuotaGuard {
            shared: self.clone(),
            id,
            idx,
        })
    }

    fn reject<RB>(&self, method: &'static str, msg: String) -> http::Response<Held<RB>> {
        let m = self.sink.metrics();
        Metrics::inc(&m.shed_total);
        m.observe(method, "8", Duration::ZERO);
        tonic::Status::resource_exhausted(msg).into_http()
    }
}

type Req = http::Request<tonic::body::Body>;

impl<S, RB> tower::Service<Req> for OpsService<S>
where
    S: tower::Service<Req, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError> + Send,
    RB: Send + 'static,
{
    type Response = http::Response<Held<RB>>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let shared = self.shared.clone();
        let (label, kind) = match shared.methods.get(req.uri().path()) {
            Some(m) => (m.path, m.kind),
            None => (UNKNOWN, Kind::Unary),
        };
        // Standard tower idiom: use the clone that was driven to readiness.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if label == HEALTH_CHECK {
            return Box::pin(async move {
                let start = Instant::now();
                let res = inner.call(req).await.map_err(Into::into)?;
                shared
                    .sink
                    .metrics()
                    .observe(label, status_of(&res), start.elapsed());
                Ok(res.map(|b| Held::new(b, None)))
            });
        }
        let identify = req
            .headers()
            .contains_key("authorization")
            .then(|| shared.sink.identify(req.headers()));
        Box::pin(async move {
            let start = Instant::now();
            let principal = match identify {
                Some(lookup) => {
                    // A full pool is waited on for a bounded time (a fleet reconnecting at
                    // once misses the cache together), then the call is shed. A waiting call
                    // holds no slot, only its HTTP/2 stream (bounded per connection).
                    let wait = shared.net.credential_lookup_wait();
                    let permit = match shared.lookups.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) if wait.is_zero() => None,
                        Err(_) => {
                            tokio::time::timeout(wait, shared.lookups.clone().acquire_owned())
                                .await
                                .ok()
                                .and_then(Result::ok)
                        }
                    };
                    let Some(_lookup) = permit else {
                        return Ok(shared.reject(
                            label,
                            "server overloaded: too many credential lookups in flight, retry with backoff".into(),
                        ));
                    };
                    lookup.await
                }
                None => None,
            };
            let stream = kind.streaming_response();
            let hold = match principal {
                Some(id) => match shared.take_quota(id, stream) {
                    Ok(g) => Hold::Principal(g),
                    Err(max) => {
                        let what = if stream {
                            "open streams"
                        } else {
                            "calls in flight"
                        };
                        return Ok(shared.reject(
                            label,
                            format!("per-caller quota: more than {max} {what} for this credential, retry with backoff"),
                        ));
                    }
                },
                None => match shared.anonymous.clone().try_acquire_owned() {
                    Ok(p) => Hold::Anonymous(p),
                    Err(_) => {
                        let n = shared.net.max_anonymous_requests;
                        return Ok(shared.reject(
                            label,
                            format!("server overloaded: more than {n} calls without a valid credential in flight, retry with backoff"),
                        ));
                    }
                },
            };
            let Ok(permit) = shared.global.clone().try_acquire_owned() else {
                let limit = shared.limit;
                return Ok(shared.reject(
                    label,
                    format!(
                        "server overloaded: more than {limit} requests in flight, retry with backoff"
                    ),
                ));
            };
            // The guard owns the slot: a caller that drops this future mid-call (client gone,
            // deadline layer) still releases the permit and the in-flight gauge.
            let slot = InFlight::enter(shared.sink.clone(), permit);
            let req = if kind.unary_request() {
                let t = shared.net.body_timeout();
                req.map(|b| tonic::body::Body::new(TimedBody::new(b, t)))
            } else {
                req
            };
            let fut = inner.call(req);
            let res: Result<http::Response<Held<RB>>, tower::BoxError> = if kind == Kind::Unary {
                let t = shared.net.request_timeout();
                match tokio::time::timeout(t, fut).await {
                    Ok(r) => r.map(|r| r.map(|b| Held::new(b, None))).map_err(Into::into),
                    Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                        "the call took longer than the server's request timeout of {t:?}"
                    ))
                    .into_http()),
                }
            } else {
                let r = fut.await;
                // Uploads hold their quota until answered; streams until the stream ends.
                let keep = if stream { Some(hold) } else { None };
                r.map(|r| r.map(|b| Held::new(b, keep))).map_err(Into::into)
            };
            drop(slot);
            let code = match &res {
                Ok(r) => status_of(r),
                Err(_) => "2",
            };
            shared.sink.metrics().observe(label, code, start.elapsed());
            res
        })
    }
}

/// The status-code label of a response head (`0` when the status follows in trailers).
fn status_of<B>(r: &http::Response<B>) -> &'static str {
    r.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(code_label)
        .unwrap_or("0")
}

/// One admitted request: holds its concurrency permit and counts in the in-flight gauge until
/// dropped, however the request's future ends.
struct InFlight {
    sink: Arc<dyn MetricsSink>,
    _permit: OwnedSemaphorePermit,
}

impl InFlight {
    fn enter(sink: Arc<dyn MetricsSink>, permit: OwnedSemaphorePermit) -> Self {
        sink.metrics()
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight {
            sink,
            _permit: permit,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.sink
            .metrics()
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A request body that fails with DEADLINE_EXCEEDED if it has not ended within its timeout.
struct TimedBody {
    inner: tonic::body::Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    ended: bool,
}

impl TimedBody {
    fn new(inner: tonic::body::Body, timeout: Duration) -> Self {
        TimedBody {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            ended: false,
        }
    }
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(f) = Pin::new(&mut this.inner).poll_frame(cx) {
            if f.is_none() {
                this.ended = true;
            }
            return Poll::Ready(f);
        }
        if !this.ended && this.sleep.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(tonic::Status::deadline_exceeded(format!(
                "the request message did not arrive within the server's body timeout of {:?}",
                this.timeout
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// A response body that keeps what its call holds (a stream's quota) until it ends or is
/// dropped. `Default` is the empty body of a trailers-only status response.
pub struct Held<B> {
    inner: Option<Pin<Box<B>>>,
    hold: Option<Hold>,
}

impl<B> Held<B> {
    fn new(inner: B, hold: Option<Hold>) -> Self {
        Held {
            inner: Some(Box::pin(inner)),
            hold,
        }
    }
}

impl<B> Default for Held<B> {
    fn default() -> Self {
        Held {
            inner: None,
            hold: None,
        }
    }
}

impl<B> std::fmt::Debug for Held<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("open", &self.inner.is_some())
            .field("holds", &self.hold.is_some())
            .finish()
    }
}

impl<B> http_body::Body for Held<B>
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
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                this.inner = None;
                this.hold = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(f)) => Poll::Ready(Some(f.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tower::{Layer, Service};

    /// Callers are identified by an `authorization: <uuid>` header.
    #[derive(Debug, Default)]
    struct Sink(Metrics);
    impl MetricsSink for Sink {
        fn metrics(&self) -> &Metrics {
            &self.0
        }
        fn identify(&self, h: &http::HeaderMap) -> BoxFuture<'static, Option<Uuid>> {
            let id = h
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok());
            Box::pin(async move { id })
        }
    }

    /// A handler that never answers, as a stuck database call would.
    #[derive(Clone)]
    struct Never;
    impl tower::Service<Req> for Never {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = futures::future::Pending<Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Req) -> Self::Future {
            futures::future::pending()
        }
    }

    /// A handler that answers at once with an open-ended response stream.
    #[derive(Clone)]
    struct Streams;
    impl tower::Service<Req> for Streams {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = futures::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Req) -> Self::Future {
            let body = http_body_util_pending();
            futures::future::ready(Ok(http::Response::new(body)))
        }
    }

    fn http_body_util_pending() -> tonic::body::Body {
        struct Pending;
        impl http_body::Body for Pending {
            type Data = bytes::Bytes;
            type Error = tonic::Status;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
                Poll::Pending
            }
        }
        tonic::body::Body::new(Pending)
    }

    fn req(path: &str, who: Option<Uuid>) -> Req {
        let mut b = http::Request::builder().uri(path);
        if let Some(id) = who {
            b = b.header("authorization", id.to_string());
        }
        b.body(tonic::body::Body::empty()).unwrap()
    }

    fn code<B>(r: &http::Response<B>) -> Option<tonic::Code> {
        r.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(tonic::Code::from)
    }

    const UNARY: &str = "/adaptivenet.v1.DeviceService/Report";
    const WATCH: &str = "/adaptivenet.v1.DashboardService/WatchFleet";

    fn limits(anon: usize, unary: usize, streams: usize) -> NetLimits {
        NetLimits {
            max_anonymous_requests: anon,
            max_unary_per_principal: unary,
            max_streams_per_principal: streams,
            ..NetLimits::default()
        }
    }

    #[tokio::test]
    async fn dropped_request_releases_its_slot_and_gauge() {
        let sink = Arc::new(Sink::default());
        let layer = OpsLayer::new(2, sink.clone(), NetLimits::default());
        let mut svc = layer.layer(Never);
        // Two requests occupy both slots; a third is shed.
        let mut a = svc.call(req(UNARY, None));
        let mut b = svc.call(req(UNARY, None));
        for f in [&mut a, &mut b] {
            assert!(futures::poll!(f.as_mut()).is_pending());
        }
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 2);
        let shed = svc.call(req(UNARY, None)).await.unwrap();
        assert_eq!(code(&shed), Some(tonic::Code::ResourceExhausted));
        // The callers give up (client cancelled, deadline): slots and gauge come back.
        drop(a);
        drop(b);
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 0);
        let mut c = svc.call(req(UNARY, None));
        assert!(futures::poll!(c.as_mut()).is_pending());
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn anonymous_callers_share_a_pool_and_cannot_starve_principals_or_health() {
        let sink = Arc::new(Sink::default());
        let layer = OpsLayer::new(100, sink.clone(), limits(3, 2, 2));
        let mut svc = layer.layer(Never);
        let mut held: Vec<_> = (0..3).map(|_| svc.call(req(UNARY, None))).collect();
        for f in held.iter_mut() {
            assert!(futures::poll!(f.as_mut()).is_pending());
        }
        let r = svc.call(req(UNARY, None)).await.unwrap();
        assert_eq!(code(&r), Some(tonic::Code::ResourceExhausted));
        // An authenticated caller still gets in, up to its own quota.
        let alice = Uuid::new_v4();
        let mut a1 = svc.call(req(UNARY, Some(alice)));
        let mut a2 = svc.call(req(UNARY, Some(alice)));
        assert!(futures::poll!(a1.as_mut()).is_pending());
        assert!(futures::poll!(a2.as_mut()).is_pending());
        let r = svc.call(req(UNARY, Some(alice))).await.unwrap();
        assert_eq!(code(&r), Some(tonic::Code::ResourceExhausted));
        let mut bob = svc.call(req(UNARY, Some(Uuid::new_v4())));
        assert!(futures::poll!(bob.as_mut()).is_pending());
        // Health needs no slot at all.
        let mut h = svc.call(req(HEALTH_CHECK, None));
        assert!(
            futures::poll!(h.as_mut()).is_pending(),
            "reached the handler"
        );
        drop((a1, a2));
        assert!(layer.shared.quotas.lock().unwrap().get(&alice).is_none());
    }

    #[tokio::test]
    async fn a_stream_holds_its_quota_until_the_body_ends() {
        let sink = Arc::new(Sink::default());
        let layer = OpsLayer::new(100, sink.clone(), limits(1, 10, 2));
        let mut svc = layer.layer(Streams);
        let me = Uuid::new_v4();
        let s1 = svc.call(req(WATCH, Some(me))).await.unwrap();
        let s2 = svc.call(req(WATCH, Some(me))).await.unwrap();
        assert_eq!(code(&s1), None);
        // The global slot came back with the head; the stream quota did not.
        assert_eq!(sink.0.in_flight.load(Ordering::Relaxed), 0);
        let r = svc.call(req(WATCH, Some(me))).await.unwrap();
        assert_eq!(code(&r), Some(tonic::Code::ResourceExhausted));
        // Unary calls of the same principal have their own quota.
        let u = svc.call(req(UNARY, Some(me))).await.unwrap();
        assert_eq!(code(&u), None);
        drop(s1);
        let s3 = svc.call(req(WATCH, Some(me))).await.unwrap();
        assert_eq!(code(&s3), None);
        drop((s2, s3, u));
        assert!(layer.shared.quotas.lock().unwrap().is_empty());
    }

    /// Identifies like [`Sink`] but each lookup takes `delay` (a slow database).
    #[derive(Debug, Default)]
    struct SlowSink(Metrics, Duration);
    impl MetricsSink for SlowSink {
        fn metrics(&self) -> &Metrics {
            &self.0
        }
        fn identify(&self, h: &http::HeaderMap) -> BoxFuture<'static, Option<Uuid>> {
            let id = h
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok());
            let delay = self.1;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                id
            })
        }
    }

    #[tokio::test]
    async fn a_full_lookup_pool_is_waited_on_for_a_bounded_time() {
        // One lookup at a time, each 400 ms: a second caller waits for the first's lookup
        // (400 ms < 600 ms), a third would wait 800 ms.
        let sink = Arc::new(SlowSink(Metrics::default(), Duration::from_millis(400)));
        let net = NetLimits {
            max_anonymous_requests: 1,
            credential_lookup_wait_ms: 600,
            ..NetLimits::default()
        };
        let layer = OpsLayer::new(100, sink.clone(), net);
        let mut svc = layer.layer(Streams);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = svc.call(req(UNARY, Some(a)));
        let second = svc.call(req(UNARY, Some(b)));
        let (r1, r2) = tokio::join!(first, second);
        assert_eq!(code(&r1.unwrap()), None);
        assert_eq!(code(&r2.unwrap()), None, "waited for the pool, then served");
        // Three callers: the third is shed when its wait runs out.
        let calls: Vec<_> = (0..3)
            .map(|_| svc.call(req(UNARY, Some(Uuid::new_v4()))))
            .collect();
        let codes: Vec<_> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| code(&r.unwrap()))
            .collect();
        assert_eq!(
            codes,
            vec![None, None, Some(tonic::Code::ResourceExhausted)],
            "{codes:?}"
        );
        // Without a wait, a full pool sheds at once (the previous behaviour).
        let net = NetLimits {
            max_anonymous_requests: 1,
            credential_lookup_wait_ms: 0,
            ..NetLimits::default()
        };
        let mut svc = OpsLayer::new(100, sink, net).layer(Streams);
        let (r1, r2) = tokio::join!(svc.call(req(UNARY, Some(a))), svc.call(req(UNARY, Some(b))));
        assert_eq!(code(&r1.unwrap()), None);
        assert_eq!(code(&r2.unwrap()), Some(tonic::Code::ResourceExhausted));
    }

    #[tokio::test]
    async fn unknown_paths_share_one_label() {
        let sink = Arc::new(Sink::default());
        let layer = OpsLayer::new(100, sink.clone(), NetLimits::default());
        let mut svc = layer.layer(Streams);
        for i in 0..200 {
            let _ = svc
                .call(req(&format!("/x{i}/\"y{i}"), Some(Uuid::new_v4())))
                .await
                .unwrap();
        }
        let text = sink.0.render();
        assert!(
            text.contains("method=\"unknown\",code=\"0\"} 200"),
            "{text}"
        );
        assert!(!text.contains("x1"), "{text}");
        assert!(text.len() < 4096, "{} bytes", text.len());
    }
}
