//! gRPC-Web for browsers and third-party dashboards (`serve --grpc-web-cors-origin ORIGIN`).
//!
//! Off unless an origin is configured: the listener then also speaks HTTP/1.1 (browsers reach
//! gRPC-Web over HTTP/1.1 or, with TLS, HTTP/2) and `tonic_web` translates calls. This gate
//! runs in front of the translation, on the request head:
//!
//! - only `DashboardService`, the read-only `DeveloperService` methods ([`READ_ONLY_DEVELOPER`])
//!   and the health check are reachable as gRPC-Web; every other path is PERMISSION_DENIED
//!   whatever the token, so no write method can be called from a browser page;
//! - a browser request (one with an `Origin` header) from an origin not configured is
//!   refused: the CORS preflight with 403, the call itself with PERMISSION_DENIED. Requests
//!   without `Origin` (not a browser) pass: CORS only protects browsers, the token protects
//!   the API;
//! - allowed origins get the CORS headers a browser needs to send `authorization` and read
//!   `grpc-status`.
//!
//! Behind the translation a gRPC-Web call is an ordinary gRPC request, so the ops layer
//! (admission, quotas, load shedding, body and call timeouts, metrics), the deadline layer and
//! the handlers' authentication apply to it unchanged. Native gRPC passes the gate untouched.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderValue};

use super::methods::HEALTH_CHECK;
use crate::error::{CloudError, Result};

/// The dashboard service: every method is a read.
const DASHBOARD_PREFIX: &str = "/adaptivenet.v1.DashboardService/";

/// The developer methods that only read (lists, gets and watches).
pub const READ_ONLY_DEVELOPER: [&str; 12] = [
    "/adaptivenet.v1.DeveloperService/ListOracles",
    "/adaptivenet.v1.DeveloperService/GetOracle",
    "/adaptivenet.v1.DeveloperService/ListDatasets",
    "/adaptivenet.v1.DeveloperService/GetDataset",
    "/adaptivenet.v1.DeveloperService/GetJob",
    "/adaptivenet.v1.DeveloperService/WatchJob",
    "/adaptivenet.v1.DeveloperService/ListJobs",
    "/adaptivenet.v1.DeveloperService/ListSupernets",
    "/adaptivenet.v1.DeveloperService/GetSupernet",
    "/adaptivenet.v1.DeveloperService/GetRollout",
    "/adaptivenet.v1.DeveloperService/ListRollouts",
    "/adaptivenet.v1.DeveloperService/WatchRollout",
];

/// Request headers a browser may send (answered to preflights).
const ALLOW_HEADERS: &str =
    "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, grpc-accept-encoding";
/// Response headers a browser script may read.
const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";
/// How long a browser may cache a preflight answer (seconds).
const PREFLIGHT_MAX_AGE: &str = "86400";

/// Whether a path may be called through gRPC-Web.
pub fn web_method_allowed(path: &str) -> bool {
    path.starts_with(DASHBOARD_PREFIX)
        || path == HEALTH_CHECK
        || READ_ONLY_DEVELOPER.contains(&path)
}

/// The configured origins: `*` (any) or exact `scheme://host[:port]` values.
#[derive(Debug, Clone, Default)]
pub struct WebOrigins {
    any: bool,
    exact: Vec<String>,
}

impl WebOrigins {
    /// Parses `--grpc-web-cors-origin` values; an origin with a path, query, credentials or
    /// another scheme than http/https is INVALID_ARGUMENT naming the flag.
    pub fn parse(values: &[String]) -> Result<Self> {
        let mut o = WebOrigins::default();
        for v in values {
            let v = v.trim();
            if v == "*" {
                o.any = true;
                continue;
            }
            let lower = v.trim_end_matches('/').to_ascii_lowercase();
            let rest = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"));
            let ok = rest.is_some_and(|r| {
                !r.is_empty()
                    && r.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            });
            if !ok {
                return Err(CloudError::invalid(
                    "--grpc-web-cors-origin",
                    format!("{v:?} is not an origin: give `*` or scheme://host[:port]"),
                ));
            }
            o.exact.push(lower);
        }
        Ok(o)
    }

    /// gRPC-Web is served only when at least one origin is configured.
    pub fn enabled(&self) -> bool {
        self.any || !self.exact.is_empty()
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any
            || origin
                .to_str()
                .is_ok_and(|o| self.exact.iter().any(|e| e.eq_ignore_ascii_case(o)))
    }
}

fn is_grpc_web(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web"))
}

/// Builds [`WebGate`]s.
#[derive(Debug, Clone)]
pub struct WebGateLayer {
    origins: Arc<WebOrigins>,
}

impl WebGateLayer {
    pub fn new(origins: WebOrigins) -> Self {
        WebGateLayer {
            origins: Arc::new(origins),
        }
    }
}

impl<S> tower::Layer<S> for WebGateLayer {
    type Service = WebGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        WebGate {
            inner,
            origins: self.origins.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct WebGate<S> {
    inner: S,
    origins: Arc<WebOrigins>,
}

type Body = tonic::body::Body;
type BoxFut<E> = Pin<Box<dyn Future<Output = std::result::Result<http::Response<Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for WebGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFut<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let origin = req.headers().get(header::ORIGIN).cloned();
        let allowed = match &origin {
            Some(o) => self.origins.enabled() && self.origins.allows(o),
            None => true,
        };
        if req.method() == http::Method::OPTIONS {
            if let Some(o) = origin.as_ref().filter(|_| {
                req.headers()
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
            }) {
                let post = req
                    .headers()
                    .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                    .is_some_and(|m| m == "POST");
                let res = preflight(allowed && post, o, &self.origins);
                return Box::pin(async move { Ok(res) });
            }
        }
        if !is_grpc_web(req.headers()) {
            let fut = self.inner.call(req);
            return Box::pin(fut);
        }
        let path = req.uri().path();
        let refusal = if !self.origins.enabled() {
            Some(tonic::Status::unimplemented(
                "gRPC-Web is not enabled on this server (serve --grpc-web-cors-origin)",
            ))
        } else if !allowed {
            Some(tonic::Status::permission_denied(
                "this origin may not call the API through gRPC-Web (serve --grpc-web-cors-origin)",
            ))
        } else if !web_method_allowed(path) {
            Some(tonic::Status::permission_denied(format!(
                "{} is not available through gRPC-Web: only DashboardService, the read-only \
                 DeveloperService methods and health are",
                super::methods::MethodTable::cloud()
                    .get(path)
                    .map_or(super::methods::UNKNOWN, |m| m.path)
            )))
        } else {
            None
        };
        let cors = origin.filter(|_| allowed).map(|o| self.origins.echo(&o));
        if let Some(status) = refusal {
            let mut res: http::Response<Body> = status.into_http();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc-web+proto"),
            );
            add_cors(&mut res, cors);
            return Box::pin(async move { Ok(res) });
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            add_cors(&mut res, cors);
            Ok(res)
        })
    }
}

impl WebOrigins {
    /// The `access-control-allow-origin` value for an allowed origin.
    fn echo(&self, origin: &HeaderValue) -> HeaderValue {
        if self.any {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }
}

fn add_cors(res: &mut http::Response<Body>, allow: Option<HeaderValue>) {
    let h = res.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(a) = allow {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, a);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
}

/// The answer to a CORS preflight: 204 with the allowed method and headers, or 403 without
/// any CORS header (the browser then refuses the call).
fn preflight(ok: bool, origin: &HeaderValue, origins: &WebOrigins) -> http::Response<Body> {
    let mut res = http::Response::new(Body::default());
    *res.status_mut() = if ok {
        http::StatusCode::NO_CONTENT
    } else {
        http::StatusCode::FORBIDDEN
    };
    let h = res.headers_mut();
    h.insert(
        header::VARY,
        HeaderValue::from_static(
            "origin, access-control-request-method, access-control-request-headers",
        ),
    );
    if ok {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origins.echo(origin));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE),
        );
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::methods::MethodTable;

    #[test]
    fn allowed_methods_exist_and_writes_are_not_allowed() {
        let t = MethodTable::cloud();
        for p in READ_ONLY_DEVELOPER {
            assert!(t.get(p).is_some(), "{p} is not a known method");
        }
        for p in [
            "/adaptivenet.v1.DeveloperService/UploadOracle",
            "/adaptivenet.v1.DeveloperService/DeleteOracle",
            "/adaptivenet.v1.DeveloperService/StartElastification",
            "/adaptivenet.v1.DeveloperService/CancelJob",
            "/adaptivenet.v1.DeveloperService/PublishSupernet",
            "/adaptivenet.v1.DeveloperService/SetDesiredState",
            "/adaptivenet.v1.DeveloperService/StartRollout",
            "/adaptivenet.v1.AdminService/CreateApiToken",
            "/adaptivenet.v1.DeviceService/Report",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(!web_method_allowed(p), "{p} must not be reachable");
        }
        assert!(web_method_allowed(
            "/adaptivenet.v1.DashboardService/GetFleetAggregates"
        ));
    }

    #[test]
    fn origins_parse_and_match_exactly() {
        let o = WebOrigins::parse(&["https://Dash.example.com/".into()]).expect("parse");
        assert!(o.enabled());
        assert!(o.allows(&HeaderValue::from_static("https://dash.example.com")));
        assert!(!o.allows(&HeaderValue::from_static("https://dash.example.com.evil")));
        assert!(!o.allows(&HeaderValue::from_static("http://dash.example.com")));
        assert!(!WebOrigins::parse(&[]).expect("empty").enabled());
        for bad in [
            "dash.example.com",
            "https://x/path",
            "ftp://x",
            "https://u@x",
        ] {
            let e = WebOrigins::parse(&[bad.into()]).expect_err(bad);
            assert!(e.to_string().contains("--grpc-web-cors-origin"), "{e}");
        }
    }
}
