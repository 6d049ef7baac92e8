//! The operator console: a read-only web UI on `serve --web-listen ADDR` (off by default).
//!
//! Every asset is compiled into the binary (`assets/`: one HTML shell, one stylesheet, one
//! small script); nothing is fetched at run time, so the console works air-gapped and its
//! content-security policy can forbid every other origin. Each view is HTML rendered here
//! (`views`, `catalogue`), charts are inline SVG drawn here (`svg`), and the jobs view receives updates
//! as server-sent events (`events`) fed by the same shared poller as `WatchJob`.
//!
//! **Authorization is the dashboard's.** Every `/api/` request carries `authorization:
//! Bearer <token>` (a viewer token or better) and goes through the same `api::management*`
//! checks and the same functions as `DashboardService` (`api::dashboard::aggregates_for`,
//! `devices_for`: the k-floor, viewers' snapshots, no per-device latency for viewers).
//! Without a valid token the API answers 401 and the page shows only its sign-in form. Only
//! GET is served: the console performs no write actions.
mod catalogue;
mod events;
mod svg;
mod views;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

use crate::api::watch::JobWatches;
use crate::app::App;
use crate::domain::parse_id;
use crate::error::{CloudError, Result};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// Everything came from this binary: no other origin, no inline script or style.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

type Body = BoxBody<Bytes, Infallible>;

/// State shared by the console's requests.
struct Web {
    app: App,
    /// The jobs view's updates: one poller per process, like `WatchJob`'s.
    watches: JobWatches,
}

/// Serves the console on `listener` until the app's shutdown token fires.
pub async fn run(app: App, listener: TcpListener) {
    let stop = app.shutdown_token().clone();
    let web = Arc::new(Web {
        app,
        watches: JobWatches::default(),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "operator console");
    }
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let sock = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        let web = web.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let web = web.clone();
                async move { Ok::<_, Infallible>(handle(&web, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(sock), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn handle(web: &Web, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "the console is read-only\n");
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/" | "/index.html" => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
        p if p.starts_with("/api/") => api(web, &req, p)
            .await
            .unwrap_or_else(|e| error_response(&e)),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The console's read API: `session` (JSON), one HTML fragment per view, and the jobs'
/// event stream.
async fn api(web: &Web, req: &Request<Incoming>, path: &str) -> Result<Response<Body>> {
    let md = MetadataMap::from_headers(req.headers().clone());
    let fleet = query_fleet(req.uri().query())?;
    let app = &web.app;
    let page = match path {
        "/api/session" => {
            let body = views::session(app, &md).await?;
            return Ok(respond(
                StatusCode::OK,
                "application/json",
                Full::new(Bytes::from(body)).boxed(),
            ));
        }
        "/api/jobs/events" => return events::jobs(app, &web.watches, &md).await,
        "/api/views/overview" => views::overview(app, &md, fleet).await?,
        "/api/views/devices" => views::devices(app, &md, fleet).await?,
        "/api/views/supernets" => catalogue::supernets(app, &md, fleet).await?,
        "/api/views/jobs" => views::jobs(app, &md).await?,
        "/api/views/rollouts" => views::rollouts(app, &md, fleet).await?,
        _ => return Ok(text(StatusCode::NOT_FOUND, "no such view\n")),
    };
    Ok(respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        Full::new(Bytes::from(page)).boxed(),
    ))
}

/// `?fleet=<id>`: the optional fleet every fleet-level view narrows to.
fn query_fleet(q: Option<&str>) -> Result<Option<Uuid>> {
    for pair in q.unwrap_or_default().split('&') {
        if let Some(v) = pair.strip_prefix("fleet=") {
            return if v.is_empty() {
                Ok(None)
            } else {
                parse_id("fleet", v).map(Some)
            };
        }
    }
    Ok(None)
}

/// The HTTP status of a domain error: the gRPC code `CloudError::code` decides, mapped as
/// gRPC-HTTP gateways map it; the body is the message a gRPC client would see.
fn error_response(e: &CloudError) -> Response<Body> {
    use tonic::Code;
    let status = match e.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut r = text(status, &format!("{}\n", e.client_message()));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("ascii"));
    }
    r
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    respond(
        StatusCode::OK,
        content_type,
        Full::new(Bytes::from_static(body.as_bytes())).boxed(),
    )
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Full::new(Bytes::from(body.to_string())).boxed(),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type.parse().expect("ascii"));
    h.insert(header::CONTENT_SECURITY_POLICY, CSP.parse().expect("ascii"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("ascii"),
    );
    h.insert(
        header::REFERRER_POLICY,
        "no-referrer".parse().expect("ascii"),
    );
    // Views hold fleet data behind a token: never kept by a browser or proxy cache.
    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("ascii"));
    r
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn fleet_query_names_the_field() {
        assert_eq!(query_fleet(None).unwrap(), None);
        assert_eq!(query_fleet(Some("fleet=")).unwrap(), None);
        let id = Uuid::new_v4();
        assert_eq!(
            query_fleet(Some(&format!("x=1&fleet={id}"))).unwrap(),
            Some(id)
        );
        let e = query_fleet(Some("fleet=nope")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("fleet"), "{e}");
    }
}
