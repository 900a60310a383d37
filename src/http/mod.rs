//! HTTP: the HTTPS application router, the plain-HTTP router that redirects to it, the middleware every route gets
//! (request timeout, body-size limit, tracing, `nosniff`), and the shared [`AppState`].

pub(crate) mod admin;
pub mod android;
pub mod api;
mod enroll;
mod error;
pub mod mdm;
mod ops;
pub mod serve;
pub mod windows;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::routing::get;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::HttpError;

use crate::clock::Clock;
use crate::domain::Enrollment;
use crate::domain::auth::Auth;
use crate::store::Store;
use crate::tls::ServingCertificate;

/// Everything a handler may use; every field is a cheap handle.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    /// The appliance CA in PEM, served at `/ca.crt`.
    pub ca_pem: Arc<str>,
    pub clock: Arc<dyn Clock>,
    pub enrollment: Enrollment,
    pub auth: Auth,
    /// The API's OpenAPI document, described when the router is built.
    pub openapi: Arc<api::OpenApiDocument>,
    /// Password hashing runs at most this many at a time (each argon2 check takes 19 MiB), whatever floods in.
    pub password_checks: Arc<tokio::sync::Semaphore>,
    /// Background jobs (CSV imports); the daemon waits for them on shutdown.
    pub jobs: tokio_util::task::TaskTracker,
    /// The daemon's shutdown signal, which background jobs watch.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Largest CSV upload; set from [`Limits`] by [`https_router`].
    pub import_max_bytes: usize,
    /// The mail relay and invite templates, shared with the outbox worker.
    pub mail: crate::mail::Mail,
    /// The organisation's name, the host name and the base of links, as an admin last saved them.
    pub naming: crate::naming::Naming,
    /// Passcodes accepted on the enrollment pages, for a few minutes.
    pub enroll_sessions: enroll::EnrollSessions,
    /// Apple device management: the SCEP CA, profile signing, pushes.
    pub mdm: mdm::Mdm,
    /// Windows: failed sign-ins, slowed down per email and client address.
    pub windows: windows::Throttle,
    /// Android: where the uploaded device-policy app is kept.
    pub android: android::Android,
    /// Asks for a new HTTPS certificate now (Settings → regenerate).
    pub tls_renewer: crate::tls::Renewer,
    /// The admin pages' templates, parsed once.
    pub admin_templates: Arc<minijinja::Environment<'static>>,
    /// The state directory (its `pki/` and `android/` go into backups; a restore is unpacked in it); `None` in
    /// tests that need neither.
    pub state_dir: Option<Arc<std::path::PathBuf>>,
    /// Cancelled to make the daemon run again in-process, after a backup was restored on the setup page.
    pub restart: tokio_util::sync::CancellationToken,
    /// One restore at a time.
    pub restoring: Arc<tokio::sync::Mutex<()>>,
    /// Upgrade bundles uploaded for the appliance's installer; `None` where there is no state directory.
    pub upgrades: Option<Arc<crate::upgrade::Upgrades>>,
    /// Whether the clock is synchronised, and its last jump (for `/healthz` and the dashboard).
    pub clock_status: crate::clock::ClockStatus,
    /// Where the setup page tells the first admin to find the setup code ("in the terminal where enrolld was
    /// started", …), decided at start.
    pub setup_code_place: &'static str,
}

impl AppState {
    /// The state for a box with these parts; `mail` is the relay and templates in use (tests pass
    /// [`crate::mail::Mail::unconfigured`]). The fields the daemon alone has are set by it afterwards.
    pub fn new(
        store: Store,
        ca_pem: Arc<str>,
        clock: Arc<dyn Clock>,
        enrollment: Enrollment,
        auth: Auth,
        mail: crate::mail::Mail,
    ) -> Self {
        AppState {
            store,
            ca_pem,
            clock,
            enrollment,
            auth,
            openapi: Arc::default(),
            password_checks: Arc::new(tokio::sync::Semaphore::new(2)),
            mail,
            naming: crate::naming::Naming::fixed(),
            enroll_sessions: enroll::EnrollSessions::default(),
            mdm: mdm::Mdm::default(),
            android: android::Android::default(),
            windows: windows::Throttle::default(),
            tls_renewer: crate::tls::Renewer::default(),
            admin_templates: Arc::new(admin::templates()),
            clock_status: crate::clock::ClockStatus::new(crate::clock::ClockState::Plausible),
            setup_code_place: crate::console::Launch::Other.setup_code_place(false),
            jobs: tokio_util::task::TaskTracker::new(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            import_max_bytes: 20 << 20,
            state_dir: None,
            restart: tokio_util::sync::CancellationToken::new(),
            restoring: Arc::default(),
            upgrades: None,
        }
    }
}

/// Limits applied to every route.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub request_timeout: Duration,
    /// Largest JSON body.
    pub max_body_bytes: usize,
    /// Largest CSV upload (the import route streams and counts it itself).
    pub import_max_bytes: usize,
}

/// The routes both listeners serve as they are: health and the CA certificate.
fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/ca.crt", get(ops::ca_certificate))
        .merge(enroll::ca_profile_route())
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub(crate) fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// What devices open over HTTPS: the invite pages and the CA profile.
fn device_routes() -> Router<AppState> {
    enroll::routes().merge(mdm::routes()).merge(windows::routes()).merge(admin::routes())
}

/// The application served over HTTPS.
pub fn https_router(mut state: AppState, limits: Limits) -> Router {
    state.import_max_bytes = limits.import_max_bytes;
    let api::Routers { api, uploads, openapi } = api::router(state.clone());
    state.openapi.describe(openapi);
    let routes = open_routes().merge(device_routes()).merge(api).fallback(ops::not_found);
    let store = state.store.clone();
    // A backup uploaded on the setup page, and an upgrade bundle, may be hundreds of MiB and take minutes: their
    // own limits.
    let restore = layered(admin::restore::routes(), None, admin::restore::MAX_BYTES, admin::restore::TIMEOUT, &store);
    let upgrade_limit = usize::try_from(crate::upgrade::MAX_BYTES).unwrap_or(usize::MAX).saturating_add(1 << 20);
    let uploads = layered(uploads.merge(admin::upgrade_routes()), None, upgrade_limit, UPLOAD_TIMEOUT, &store);
    with_middleware(routes, limits, &store).merge(restore).merge(uploads).with_state(state)
}

/// How long an upgrade bundle's upload may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where plain-HTTP requests are sent: HTTPS on `port`, to the host the client asked for if the certificate carries
/// that name (so the browser will accept it), otherwise to the `.local` name in use.
#[derive(Clone, Debug)]
pub struct RedirectTarget {
    pub port: u16,
    pub naming: crate::naming::Naming,
    pub serving: Arc<ServingCertificate>,
}

/// The plain-HTTP router: `/healthz` and `/ca.crt` as they are (a device must fetch the CA before it can trust
/// HTTPS), everything else redirected to HTTPS.
pub fn http_redirect_router(state: AppState, limits: Limits, target: RedirectTarget) -> Router {
    let redirect = move |request: axum::extract::Request| {
        let target = target.clone();
        async move { ops::redirect_to_https(&request, &target) }
    };
    let store = state.store.clone();
    with_middleware(open_routes().fallback(redirect), limits, &store).with_state(state)
}

/// What plain HTTP serves while enrolld waits for the clock (nothing else runs yet): `/healthz` answering 503
/// `waiting_for_clock`, and a page saying why for everything else. `clock` follows the latest check.
pub fn waiting_router(clock: tokio::sync::watch::Receiver<crate::clock::ClockState>, limits: Limits) -> Router {
    // Without the tracing layer: its every 503 would be logged as a failure, once per health probe.
    Router::new()
        .route("/healthz", get(ops::healthz_waiting))
        .fallback(ops::waiting_page)
        .layer(
            ServiceBuilder::new()
                .layer(SetResponseHeaderLayer::overriding(
                    HeaderName::from_static("x-content-type-options"),
                    HeaderValue::from_static("nosniff"),
                ))
                .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
                .layer(RequestBodyLimitLayer::new(limits.max_body_bytes)),
        )
        .with_state(clock)
}

fn with_middleware(router: Router<AppState>, limits: Limits, store: &Store) -> Router<AppState> {
    // Extractors (JSON) stop at max_body_bytes; the hard limit on any body leaves room for the largest CSV upload,
    // which the import route counts and refuses itself with a JSON answer.
    let hard_limit = limits.max_body_bytes.max(limits.import_max_bytes.saturating_add(64 << 10));
    layered(router, Some(limits.max_body_bytes), hard_limit, limits.request_timeout, store)
}

/// The middleware every route gets: tracing, `nosniff`, the request timeout, the body limits (`extractor_limit`
/// for JSON and forms, `None` for routes that stream their body and count it themselves) and durable answers.
fn layered(
    router: Router<AppState>,
    extractor_limit: Option<usize>,
    hard_limit: usize,
    timeout: Duration,
    store: &Store,
) -> Router<AppState> {
    let extractor_limit = match extractor_limit {
        Some(limit) => DefaultBodyLimit::max(limit),
        None => DefaultBodyLimit::disable(),
    };
    router.layer(extractor_limit).layer(axum::middleware::from_fn_with_state(store.clone(), durable)).layer(
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(SetResponseHeaderLayer::overriding(
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ))
            .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
            .layer(axum::middleware::from_fn_with_state(hard_limit, declared_size))
            .layer(RequestBodyLimitLayer::new(hard_limit)),
    )
}

/// A body declared (`Content-Length`) larger than `limit` is refused before a byte of it is read, with the JSON
/// error every other refusal has (the body limit layer behind this one would answer in plain text). A body that
/// declares no length is counted as it arrives by that layer and the extractors.
async fn declared_size(
    axum::extract::State(limit): axum::extract::State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(length) if length > u64::try_from(limit).unwrap_or(u64::MAX) => HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is {length} bytes; at most {limit} are accepted here"),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

/// A change is answered only once it is on disk: a power cut must not lose what the admin or the device was already
/// told had happened. So every request that may change something waits, before its answer goes out, for
/// [`Store::flush_committed`] (`fdatasync` on the database's log), which covers its own commit; concurrent requests
/// share one sync, and a request that committed nothing, or only a coalesced last-contact time, waits for none.
/// Reads go straight through.
async fn durable(
    axum::extract::State(store): axum::extract::State<Store>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::Method;
    use axum::response::IntoResponse;
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let response = next.run(request).await;
    if !changes {
        return response;
    }
    match tokio::task::spawn_blocking(move || store.flush_committed()).await {
        Ok(Ok(_)) => response,
        Ok(Err(error)) => {
            tracing::error!(%error, "the store could not be flushed; the change may not survive a power cut");
            HttpError::unavailable(format!("the change could not be written to disk: {error}")).into_response()
        }
        Err(error) => {
            HttpError::unavailable(format!("the change could not be written to disk: {error}")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, header};
    use tower::ServiceExt;

    fn state() -> AppState {
        api::tests::state_with(Store::open_temporary().unwrap(), Arc::new(crate::clock::SystemClock))
    }

    fn limits() -> Limits {
        Limits { request_timeout: Duration::from_secs(5), max_body_bytes: 4096, import_max_bytes: 8192 }
    }

    async fn body_text(response: axum::response::Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn healthz_reports_ok_and_schema() {
        let response = https_router(state(), limits())
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        let json: serde_json::Value = serde_json::from_str(&body_text(response).await).unwrap();
        assert_eq!(json["status"], "ok");
        assert_eq!(json["schema"], crate::store::SCHEMA_VERSION);
        assert_eq!(json["clock"], "plausible");
    }

    #[tokio::test]
    async fn the_setup_page_says_where_the_code_is_for_how_enrolld_was_started() {
        use crate::console::Launch;
        for (launch, console, expected) in [
            (Launch::Systemd, true, "on the box's screen or serial console, and in its log (journalctl -u enrolld)"),
            (Launch::Terminal, false, "in the terminal where enrolld was started"),
        ] {
            let mut state = state();
            state.setup_code_place = launch.setup_code_place(console);
            let expected = expected.replace('\'', "&#x27;");
            let request = Request::get("/admin/setup").body(Body::empty()).unwrap();
            let response = https_router(state.clone(), limits()).oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let page = body_text(response).await;
            assert!(page.contains(&format!("Enter the setup code shown {expected}, and")), "{page}");
            assert!(launch != Launch::Terminal || !page.contains("journalctl"), "{page}");

            let form = "code=WRONG-CODE-0000&username=admin&password=long+enough+pw&confirm=long+enough+pw";
            let request = Request::post("/admin/setup")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(form))
                .unwrap();
            let page = body_text(https_router(state, limits()).oneshot(request).await.unwrap()).await;
            assert!(page.contains(&format!("copy it as shown {expected}.")), "{page}");
        }
    }

    #[tokio::test]
    async fn while_waiting_for_the_clock_healthz_is_503_and_pages_say_why() {
        use crate::clock::ClockState;
        let (report, clock) = tokio::sync::watch::channel(ClockState::Unsynchronised);
        let router = waiting_router(clock, limits());
        let response = router.clone().oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let json: serde_json::Value = serde_json::from_str(&body_text(response).await).unwrap();
        assert_eq!(json["status"], "waiting_for_clock");
        assert_eq!(json["clock"], "unsynchronised");
        assert!(json["message"].as_str().unwrap().contains("UDP port 123"), "{json}");

        let now = time::OffsetDateTime::from_unix_timestamp(0).unwrap();
        report.send_replace(ClockState::Unset { now });
        let response = router.oneshot(Request::get("/admin/setup").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"));
        let page = body_text(response).await;
        assert!(page.contains("1970-01-01 00:00 UTC: it has not been set"), "{page}");
        assert!(page.contains("http-equiv=\"refresh\""), "the page reloads itself: {page}");
    }

    #[tokio::test]
    async fn ca_is_served_as_pem_with_the_x509_type() {
        let response = https_router(state(), limits())
            .oneshot(Request::get("/ca.crt").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/x-x509-ca-cert");
        assert!(body_text(response).await.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    fn target(port: u16) -> RedirectTarget {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (ca, _) = crate::pki::CertificateAuthority::load_or_create(dir.path(), "enroll", now).unwrap();
        let names = crate::pki::wanted_names("enroll", &[], &["fd00::2".parse().unwrap()]);
        let cert = ca.issue_server("enroll.local", &names, now).unwrap();
        let serving = Arc::new(ServingCertificate::new(&cert).unwrap());
        RedirectTarget { port, naming: crate::naming::Naming::fixed(), serving }
    }

    #[tokio::test]
    async fn plain_http_redirects_everything_else_to_https() {
        let router = http_redirect_router(state(), limits(), target(8443));
        let request = Request::get("/admin?tab=pending").header(header::HOST, "enroll.local:8080").body(Body::empty());
        let response = router.clone().oneshot(request.unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(response.headers()[header::LOCATION], "https://enroll.local:8443/admin?tab=pending");

        let request = Request::get("/").header(header::HOST, "[fd00::2]:80").body(Body::empty()).unwrap();
        let response = http_redirect_router(state(), limits(), target(443)).oneshot(request).await.unwrap();
        assert_eq!(response.headers()[header::LOCATION], "https://[fd00::2]/");

        // A Host the certificate does not carry is not followed anywhere else.
        let request = Request::get("/x").header(header::HOST, "evil.example:8080").body(Body::empty()).unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers()[header::LOCATION], "https://enroll.local:8443/x");

        let response = router.oneshot(Request::get("/healthz").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "healthz is not redirected");
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused_with_413() {
        let request = Request::post("/healthz")
            .header(header::CONTENT_LENGTH, "100000")
            .body(Body::from(vec![b'x'; 100_000]))
            .unwrap();
        let response = https_router(state(), limits()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let json: serde_json::Value = serde_json::from_str(&body_text(response).await).unwrap();
        assert_eq!(json["error"], "too_large", "the JSON error, not the limit layer's plain text");
    }

    #[tokio::test]
    async fn unknown_paths_get_a_json_404() {
        let response =
            https_router(state(), limits()).oneshot(Request::get("/nope").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let json: serde_json::Value = serde_json::from_str(&body_text(response).await).unwrap();
        assert_eq!(json["error"], "not_found");
    }
}
