//! The admin web pages under `/admin`: server-rendered HTML (minijinja templates compiled in), one stylesheet, no
//! scripts, nothing loaded from outside the box. Every action is a plain form post carrying the session's CSRF
//! token; every page needs a signed-in admin (the same session as the API, in its HttpOnly cookie), except
//! sign-in and first-run setup. Pages answer with a strict Content-Security-Policy, `X-Frame-Options: DENY` and
//! `no-store`.

mod enrollment;
mod forms;
pub mod restore;
mod settings;

pub use settings::upgrade_routes;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::{Environment, Value};
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::api::access::{ClientAddr, SESSION_COOKIE};
use crate::domain::Actor;
use crate::domain::auth::AuthError;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const STYLESHEET: &str = include_str!("templates/admin.css");
const TEMPLATES: &[(&str, &str)] = &[
    ("layout.html", include_str!("templates/layout.html")),
    ("login.html", include_str!("templates/login.html")),
    ("setup.html", include_str!("templates/setup.html")),
    ("setup_appliance.html", include_str!("templates/setup_appliance.html")),
    ("setup_mail.html", include_str!("templates/setup_mail.html")),
    ("relay_form.html", include_str!("templates/relay_form.html")),
    ("dashboard.html", include_str!("templates/dashboard.html")),
    ("enrollment.html", include_str!("templates/enrollment.html")),
    ("confirm.html", include_str!("templates/confirm.html")),
    ("message.html", include_str!("templates/message.html")),
    ("invite.html", include_str!("templates/invite.html")),
    ("import.html", include_str!("templates/import.html")),
    ("users.html", include_str!("templates/users.html")),
    ("user.html", include_str!("templates/user.html")),
    ("audit.html", include_str!("templates/audit.html")),
    ("settings.html", include_str!("templates/settings.html")),
    ("templates.html", include_str!("templates/templates.html")),
    ("restored.html", include_str!("templates/restored.html")),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(dashboard))
        .route("/admin/admin.css", get(stylesheet))
        .route("/admin/login", get(login_page).post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/setup", get(setup_page).post(setup))
        .merge(enrollment::routes())
        .merge(forms::routes())
        .merge(settings::routes())
}

/// A signed-in admin, from the session cookie.
#[derive(Debug, Clone)]
pub struct Admin {
    pub actor: Actor,
    pub username: String,
    csrf: String,
    token: String,
}

/// The admin behind this request, or a redirect to sign in (or to first-run setup on a box without admins).
async fn admin_of(state: &AppState, headers: &HeaderMap, client: Option<String>) -> Result<Admin, Response> {
    let auth = state.auth.clone();
    let token = super::cookie(headers, SESSION_COOKIE);
    let found = tokio::task::spawn_blocking(move || -> crate::domain::DomainResult<_> {
        let session = match &token {
            Some(token) => auth.session(token)?,
            None => None,
        };
        Ok((session.zip(token), auth.needs_setup()?))
    })
    .await;
    match found {
        Ok(Ok((Some((session, token)), _))) => Ok(Admin {
            actor: Actor { name: session.username.clone(), client },
            username: session.username,
            csrf: session.csrf_token,
            token,
        }),
        Ok(Ok((None, true))) => Err(Redirect::to("/admin/setup").into_response()),
        Ok(Ok((None, false))) => Err(Redirect::to("/admin/login").into_response()),
        _ => {
            Err(message(state, None, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong", "Try again in a minute."))
        }
    }
}

/// A page request from a signed-in admin; anyone else is sent to sign in (or to first-run setup).
pub struct SignedIn(pub Admin);

impl axum::extract::FromRequestParts<AppState> for SignedIn {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Response> {
        let client = super::api::client_of(&parts.extensions);
        admin_of(state, &parts.headers, client).await.map(SignedIn)
    }
}

/// A form post from a signed-in admin, checked: same origin, and the session's CSRF token among its fields.
pub struct Posted {
    pub admin: Admin,
    pub fields: Fields,
}

impl axum::extract::FromRequest<AppState> for Posted {
    type Rejection = Response;
    async fn from_request(request: axum::extract::Request, state: &AppState) -> Result<Self, Response> {
        let headers = request.headers().clone();
        let client = super::api::client_of(request.extensions());
        let body = Bytes::from_request(request, state).await.map_err(IntoResponse::into_response)?;
        let fields = Fields::parse(&body);
        let admin = change(state, &headers, client, &fields).await?;
        Ok(Posted { admin, fields })
    }
}

/// A urlencoded form, with repeated fields (checkboxes) kept.
#[derive(Debug, Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn parse(body: &[u8]) -> Fields {
        Fields(form_urlencoded::parse(body).into_owned().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.trim().is_empty())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect()
    }
}

/// A change from a signed-in admin: the session, a same-origin request, and the session's CSRF token in the
/// form. Anything else gets a 403 page and changes nothing.
async fn change(
    state: &AppState,
    headers: &HeaderMap,
    client: Option<String>,
    fields: &Fields,
) -> Result<Admin, Response> {
    if !same_origin(headers) {
        return Err(forbidden(state));
    }
    let admin = admin_of(state, headers, client).await?;
    match verify_form(state, headers, &admin, fields) {
        Some(refused) => Err(refused),
        None => Ok(admin),
    }
}

/// A form post of `admin`'s must come from this site and carry the session's CSRF token; the refusal if not.
pub fn verify_form(state: &AppState, headers: &HeaderMap, admin: &Admin, fields: &Fields) -> Option<Response> {
    let given = fields.get("csrf").unwrap_or_default();
    let good = same_origin(headers) && bool::from(given.as_bytes().ct_eq(admin.csrf.as_bytes()));
    (!good).then(|| forbidden(state))
}

fn forbidden(state: &AppState) -> Response {
    message(
        state,
        None,
        StatusCode::FORBIDDEN,
        "This form has expired",
        "The page was open too long or came from somewhere else. Go back, reload the page and try again.",
    )
}

/// Browsers say where a form post came from; one from another site is refused (the CSRF token refuses it too).
/// Without `Sec-Fetch-Site` (older browsers), the `Origin` must be this host's.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) => host.is_some_and(|host| origin == format!("https://{host}")),
        None => true,
    }
}

/// The admin pages' templates (the router keeps them in [`AppState`]). Each is parsed when a page first needs it,
/// then kept: parsing all of them took a tenth of enrolld's start on a small board, before any admin had asked for
/// a page. The tests parse every one.
pub fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    // Optional values (a form's earlier input, an error) may be absent: absent reads as empty.
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env.set_loader(|name| Ok(TEMPLATES.iter().find(|(n, _)| *n == name).map(|(_, source)| *source)));
    env.add_filter("minute", |text: String| text.get(..16).map(|t| t.replace('T', " ")).unwrap_or(text));
    env
}

/// Renders a page: the template with the common values (the admin, the CSRF token, the organisation).
pub fn render(state: &AppState, admin: Option<&Admin>, status: StatusCode, template: &str, values: Value) -> Response {
    let common = Value::from_pairs([
        ("admin", Value::from(admin.map(|a| a.username.clone()))),
        ("csrf", Value::from(admin.map(|a| a.csrf.clone()))),
        ("organisation", Value::from(state.naming.organisation())),
    ]);
    let context = minijinja::context! { ..common, ..values };
    let body = match state.admin_templates.get_template(template).and_then(|t| t.render(context)) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, template, "an admin page does not render");
            return (StatusCode::INTERNAL_SERVER_ERROR, "This page cannot be shown; see the server log.")
                .into_response();
        }
    };
    html(status, body)
}

fn html(status: StatusCode, body: String) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    (status, headers, body).into_response()
}

/// Any serialisable record as a template value.
pub fn ser<T: serde::Serialize>(value: &T) -> Value {
    Value::from(minijinja::value::Serde(value))
}

/// A page with one message (a result, a refusal, an error).
pub fn message(state: &AppState, admin: Option<&Admin>, status: StatusCode, title: &str, text: &str) -> Response {
    render(state, admin, status, "message.html", Value::from_pairs([("title", title), ("text", text)]))
}

/// Runs a domain call on the blocking pool; a failure becomes its message, for the page to show.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::domain::DomainResult<T> + Send + 'static,
) -> Result<T, crate::domain::DomainError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => Err(crate::domain::DomainError::invalid("request", format!("the request failed: {error}"))),
    }
}

/// The page for a domain failure: a refusal with its reason (422/404/409), or a store problem.
pub fn failure(state: &AppState, admin: &Admin, error: crate::domain::DomainError) -> Response {
    use crate::domain::DomainError;
    let (status, title) = match &error {
        DomainError::NotFound { .. } => (StatusCode::NOT_FOUND, "Not found"),
        DomainError::Conflict { .. } => (StatusCode::CONFLICT, "That cannot be done now"),
        DomainError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "Please check the form"),
        _ => {
            tracing::error!(%error, "an admin page failed");
            (StatusCode::SERVICE_UNAVAILABLE, "Something went wrong")
        }
    };
    message(state, Some(admin), status, title, &error.to_string())
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], STYLESHEET)
        .into_response()
}

fn with_session_cookie(state: &AppState, token: &str, expires_at: time::OffsetDateTime, target: &str) -> Response {
    let max_age = (expires_at - state.clock.now()).whole_seconds().max(0);
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}");
    let mut response = Redirect::to(target).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// One of the few password-hashing slots (argon2 takes 19 MiB a check), or the page saying to try again.
async fn password_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, Response> {
    state.password_checks.clone().acquire_owned().await.map_err(|_| {
        message(state, None, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong", "Try again in a minute.")
    })
}

/// What the sign-in and setup pages say when they refuse; a failure of the appliance itself is logged, not shown.
fn sign_in_problem(state: &AppState, error: AuthError, doing: &str) -> String {
    match error {
        AuthError::TooManyAttempts { retry_after_secs } => {
            format!("Too many failed attempts. Wait {} seconds and try again.", retry_after_secs.max(1))
        }
        AuthError::BadCredentials => "The username or password is not right.".to_owned(),
        AuthError::BadSetupCode => {
            format!("That setup code is not right; copy it as shown {}.", state.setup_code_place)
        }
        AuthError::WeakPassword(reason) => reason,
        AuthError::AlreadySetUp => "This appliance is set up already; sign in instead.".to_owned(),
        AuthError::Domain(error) => {
            tracing::error!(%error, "{doing} failed");
            "Something went wrong; try again.".to_owned()
        }
    }
}

async fn login_page(State(state): State<AppState>, headers: HeaderMap, ClientAddr(client): ClientAddr) -> Response {
    match admin_of(&state, &headers, client).await {
        Ok(_) => Redirect::to("/admin").into_response(),
        Err(response) if response.headers().get(header::LOCATION).is_some_and(|l| l == "/admin/setup") => response,
        Err(_) => render(&state, None, StatusCode::OK, "login.html", Value::from(())),
    }
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    ClientAddr(client): ClientAddr,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return forbidden(&state);
    }
    let fields = Fields::parse(&body);
    let username = fields.get("username").unwrap_or_default().to_owned();
    let password = fields.get("password").unwrap_or_default().to_owned();
    let _permit = match password_slot(&state).await {
        Ok(permit) => permit,
        Err(response) => return response,
    };
    let auth = state.auth.clone();
    let name = username.clone();
    let outcome = tokio::task::spawn_blocking(move || auth.login(&name, &password, client)).await;
    // Throttled, the page answers as the API does: 429 with Retry-After.
    let mut retry_after = None;
    let problem = match outcome {
        Ok(Ok(signed_in)) => return with_session_cookie(&state, &signed_in.token, signed_in.expires_at, "/admin"),
        Ok(Err(error)) => {
            if let AuthError::TooManyAttempts { retry_after_secs } = error {
                retry_after = Some(retry_after_secs.max(1));
            }
            sign_in_problem(&state, error, "signing in")
        }
        Err(_) => "Something went wrong; try again.".to_owned(),
    };
    let values = Value::from_pairs([("problem", Value::from(problem)), ("username", Value::from(username))]);
    let status = if retry_after.is_some() { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::UNAUTHORIZED };
    let mut response = render(&state, None, status, "login.html", values);
    if let Some(secs) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

async fn logout(State(state): State<AppState>, Posted { admin, .. }: Posted) -> Response {
    let auth = state.auth.clone();
    let (actor, token) = (admin.actor.clone(), admin.token.clone());
    if let Err(error) = blocking(move || auth.logout(&actor, &token)).await {
        return failure(&state, &admin, error);
    }
    let mut response = Redirect::to("/admin/login").into_response();
    let expired = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&expired) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn setup_page(State(state): State<AppState>) -> Response {
    let auth = state.auth.clone();
    match blocking(move || auth.needs_setup()).await {
        Ok(true) => {
            let values = Value::from_pairs([("title", "Set up enrolld"), ("code_place", state.setup_code_place)]);
            render(&state, None, StatusCode::OK, "setup.html", values)
        }
        _ => Redirect::to("/admin/login").into_response(),
    }
}

async fn setup(
    State(state): State<AppState>,
    headers: HeaderMap,
    ClientAddr(client): ClientAddr,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return forbidden(&state);
    }
    let fields = Fields::parse(&body);
    let code = fields.get("code").unwrap_or_default().to_owned();
    let username = fields.get("username").unwrap_or("admin").trim().to_lowercase();
    let password = fields.get("password").unwrap_or_default().to_owned();
    if Some(password.as_str()) != fields.get("confirm") {
        let values = Value::from_pairs([
            ("title", "Set up enrolld"),
            ("problem", "The two passwords are not the same."),
            ("code_place", state.setup_code_place),
        ]);
        return render(&state, None, StatusCode::UNPROCESSABLE_ENTITY, "setup.html", values);
    }
    let _permit = match password_slot(&state).await {
        Ok(permit) => permit,
        Err(response) => return response,
    };
    let auth = state.auth.clone();
    let outcome = tokio::task::spawn_blocking(move || auth.setup(&code, &username, &password, client)).await;
    let problem = match outcome {
        Ok(Ok(signed_in)) => {
            return with_session_cookie(&state, &signed_in.token, signed_in.expires_at, "/admin/setup/appliance");
        }
        Ok(Err(AuthError::AlreadySetUp)) => return Redirect::to("/admin/login").into_response(),
        Ok(Err(error)) => sign_in_problem(&state, error, "setup"),
        Err(_) => "Something went wrong; try again.".to_owned(),
    };
    let values = Value::from_pairs([
        ("title", Value::from("Set up enrolld")),
        ("problem", Value::from(problem)),
        ("code_place", Value::from(state.setup_code_place)),
    ]);
    render(&state, None, StatusCode::UNPROCESSABLE_ENTITY, "setup.html", values)
}

/// The last backup as the pages show it: when (to the minute, UTC), how big, and how it was made.
pub fn last_backup_view(last: &crate::domain::LastBackup) -> Value {
    let size = match last.bytes {
        bytes if bytes >= 1 << 20 => format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20)),
        bytes if bytes >= 1 << 10 => format!("{:.0} KiB", bytes as f64 / f64::from(1 << 10)),
        bytes => format!("{bytes} bytes"),
    };
    minijinja::context! { at => crate::domain::minute(last.at), size => size, how => last.how.clone(), by => last.by.clone() }
}

async fn dashboard(State(state): State<AppState>, SignedIn(admin): SignedIn) -> Response {
    let domain = state.enrollment.clone();
    let gathered = blocking(move || {
        Ok((
            domain.dashboard()?,
            domain.outbox_counts()?,
            domain.push_certificate()?,
            domain.outbox_last_error()?,
            domain.last_backup()?,
        ))
    })
    .await;
    let (counts, outbox, push, last_error, last_backup) = match gathered {
        Ok(gathered) => gathered,
        Err(error) => return failure(&state, &admin, error),
    };
    let now = state.clock.now();
    let days = |at: time::OffsetDateTime| (at - now).whole_days();
    let push = push.map(|p| {
        Value::from_pairs([
            ("topic", Value::from(p.topic)),
            ("not_after", Value::from(p.not_after.date().to_string())),
            ("days_left", Value::from(days(p.not_after))),
        ])
    });
    let tls = state.mdm.serving_info().map(|info| {
        Value::from_pairs([
            ("subject", Value::from(info.subject)),
            ("not_after", Value::from(info.not_after.date().to_string())),
            ("days_left", Value::from(days(info.not_after))),
        ])
    });
    let clock = state.clock_status.report();
    let clock = Value::from_pairs([
        ("state", Value::from(clock.state.describe())),
        ("jump", Value::from(clock.last_jump.map(|jump| jump.describe()))),
    ]);
    let values = Value::from_pairs([
        ("title", Value::from("Dashboard")),
        ("clock", clock),
        ("counts", ser(&counts)),
        ("outbox", ser(&outbox)),
        ("relay", Value::from(state.mail.relay().is_some())),
        ("last_error", Value::from(last_error.map(|(at, text)| format!("{} UTC: {text}", crate::domain::minute(at))))),
        ("push", Value::from(push)),
        ("tls", Value::from(tls)),
        ("last_backup", Value::from(last_backup.map(|last| last_backup_view(&last)))),
    ]);
    render(&state, Some(&admin), StatusCode::OK, "dashboard.html", values)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_admin_template_parses_and_an_unknown_name_is_an_error() {
        let env = super::templates();
        for (name, _) in super::TEMPLATES {
            if let Err(error) = env.get_template(name) {
                panic!("{name} does not parse: {error:#}");
            }
        }
        assert!(env.get_template("nowhere.html").is_err());
    }
}
