//! The device-facing pages: `/e/{token}` (what an invite link opens: who and what it is for, the passcode form,
//! then the steps), the pages for links that cannot be used (with a 4xx status), and `/ca.mobileconfig` (the
//! appliance CA as an Apple profile). Plain HTML from one template, one stylesheet, no scripts, nothing external.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Form;
use axum::extract::FromRequest as _;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::{Environment, Value};
use serde::Deserialize;
use time::{Duration, OffsetDateTime};

use super::AppState;
use super::mdm::profile;
use crate::domain::{Actor, Credentials, LinkProblem, LinkRefusal, PasscodeCheck, random_bytes};
use crate::model::{EnrollAuth, Id, Invite, Ownership, Platform};

/// How long a passcode, once accepted, keeps the enrollment page open.
const SESSION_MINUTES: i64 = 15;
/// Enrollment sessions kept at most; the oldest go first beyond it.
const SESSION_CAPACITY: usize = 10_000;
const SESSION_COOKIE: &str = "enroll_session";
const PAGE: &str = include_str!("pages/enroll.html");
const STYLESHEET: &str = include_str!("pages/enroll.css");
/// No scripts, nothing from elsewhere, no framing; forms post only here.
const CSP: &str =
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Short-lived sessions that prove a device's user entered an invite's passcode, bound to that invite. Kept in
/// memory (a restart asks for the passcode again); the cookie holds a random token, this map only its hash.
#[derive(Clone, Debug, Default)]
pub struct EnrollSessions {
    inner: Arc<Mutex<HashMap<String, (Id, OffsetDateTime)>>>,
}

impl EnrollSessions {
    fn open(&self, invite: Id, now: OffsetDateTime) -> String {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        let mut sessions = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.retain(|_, (_, until)| *until > now);
        if sessions.len() >= SESSION_CAPACITY
            && let Some(oldest) = sessions.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions
            .insert(crate::domain::sha256_hex(token.as_bytes()), (invite, now + Duration::minutes(SESSION_MINUTES)));
        token
    }

    /// Whether `token` is a live session for `invite`.
    fn holds(&self, token: &str, invite: Id, now: OffsetDateTime) -> bool {
        let sessions = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions
            .get(&crate::domain::sha256_hex(token.as_bytes()))
            .is_some_and(|(id, until)| *id == invite && *until > now)
    }
}

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/e/{token}", get(page).post(passcode))
        .route("/e/{token}/profile", get(enrollment_profile))
        .route("/e/{token}/android.png", get(super::android::enroll_qr))
        .route("/android/dpc.apk", get(super::android::apk))
        .route("/e/{token}/account-link", post(request_account_link))
        .route("/account/{token}", get(account_page).post(set_password))
        .route("/enroll.css", get(stylesheet))
}

/// The CA profile, also served over plain HTTP: a device fetches it before it trusts the appliance's HTTPS.
pub fn ca_profile_route() -> axum::Router<AppState> {
    axum::Router::new().route("/ca.mobileconfig", get(ca_profile))
}

#[derive(Debug, Deserialize)]
pub struct PlatformChoice {
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
pub struct PasscodeForm {
    passcode: Option<String>,
    password: Option<String>,
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
pub struct PasswordForm {
    password: String,
    confirm: String,
}

async fn page(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(choice): Query<PlatformChoice>,
    headers: HeaderMap,
) -> Response {
    let (invite, authenticated) = match open_with_session(&state, &token, &headers).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    let platform = chosen_platform(&invite, choice.platform, &headers);
    render(&state, &token, StatusCode::OK, &invite, platform, authenticated, None)
}

async fn passcode(
    State(state): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let client = super::api::client_of(request.extensions());
    let Ok(Form(form)) = Form::<PasscodeForm>::from_request(request, &state).await else {
        return problem_page(
            &state,
            StatusCode::BAD_REQUEST,
            "This form could not be read",
            "Go back and enter the passcode again.",
        );
    };
    let invite = match open(&state, &token).await {
        Ok(invite) => invite,
        Err(response) => return response,
    };
    let platform = chosen_platform(&invite, form.platform, &headers);
    let domain = state.enrollment.clone();
    let id = invite.id;
    // A password check is argon2 (19 MiB, slow on purpose): at most a few at a time, whatever floods in. A
    // passcode alone needs no slot.
    let asks_password = !matches!(state.enrollment.enroll_auth(), Ok(EnrollAuth::Passcode));
    let _permit = match asks_password {
        true => match state.password_checks.clone().acquire_owned().await {
            Ok(permit) => Some(permit),
            Err(_) => {
                return problem_page(
                    &state,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Something went wrong",
                    "Try again in a minute.",
                );
            }
        },
        false => None,
    };
    let checked = in_store(&state, "checking a passcode", move || {
        let credentials = Credentials { passcode: form.passcode.as_deref(), password: form.password.as_deref() };
        domain.check_credentials(&Actor::device(client), &id, credentials)
    })
    .await;
    match checked {
        Err(page) => page,
        Ok(PasscodeCheck::Correct) => {
            let session = state.enroll_sessions.open(invite.id, state.clock.now());
            let mut response = render(&state, &token, StatusCode::OK, &invite, platform, true, None);
            let cookie = format!(
                "{SESSION_COOKIE}={session}; Path=/e/{token}; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
                SESSION_MINUTES * 60
            );
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Ok(PasscodeCheck::Wrong { attempts_left }) => {
            let what = match state.enrollment.enroll_auth() {
                Ok(EnrollAuth::Password) => "That password is not right.",
                Ok(EnrollAuth::Both) => "The passcode or the password is not right.",
                _ => "That passcode is not right.",
            };
            let wrong = format!(
                "{what} {attempts_left} {} left before this invite locks.",
                if attempts_left == 1 { "try" } else { "tries" }
            );
            render(&state, &token, StatusCode::UNAUTHORIZED, &invite, platform, false, Some(wrong))
        }
        Ok(PasscodeCheck::NoPassword) => {
            let wrong = "You have not set your password yet. Ask for a link to set it below, then come back here.";
            render(&state, &token, StatusCode::FORBIDDEN, &invite, platform, false, Some(wrong.into()))
        }
        Ok(PasscodeCheck::Locked) => link_problem(&state, LinkProblem::Locked),
    }
}

/// The invite a link opens, and whether this browser holds a live enrollment session for it.
async fn open_with_session(state: &AppState, token: &str, headers: &HeaderMap) -> Result<(Invite, bool), Response> {
    let invite = open(state, token).await?;
    let now = state.clock.now();
    let authenticated =
        super::cookie(headers, SESSION_COOKIE).is_some_and(|t| state.enroll_sessions.holds(&t, invite.id, now));
    Ok((invite, authenticated))
}

/// The invite a link opens for a browser that has authenticated on its page, or the page saying what to do.
pub(crate) async fn open_authenticated(state: &AppState, token: &str, headers: &HeaderMap) -> Result<Invite, Response> {
    match open_with_session(state, token, headers).await? {
        (invite, true) => Ok(invite),
        (_, false) => Err(problem_page(
            state,
            StatusCode::UNAUTHORIZED,
            "Enter the passcode first",
            "Open the link from your invite again and enter its passcode; the code is shown after that.",
        )),
    }
}

/// The invite a link opens, or the page saying why it cannot be used.
async fn open(state: &AppState, token: &str) -> Result<Invite, Response> {
    let domain = state.enrollment.clone();
    let token = token.to_owned();
    match in_store(state, "opening an invite link", move || domain.open_link(&token)).await? {
        Ok(invite) => Ok(invite),
        Err(problem) => Err(link_problem(state, problem)),
    }
}

/// Runs a domain call on the blocking pool. A store failure or a panicked task is logged (as `doing` failed)
/// and answered with a page asking to try again.
async fn in_store<T: Send + 'static>(
    state: &AppState,
    doing: &str,
    work: impl FnOnce() -> crate::domain::DomainResult<T> + Send + 'static,
) -> Result<T, Response> {
    let error = match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    tracing::error!(%error, "{doing} failed");
    Err(problem_page(state, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong", "Try again in a minute."))
}

/// Says which of the reasons it is, without saying anything about any other invite.
fn link_problem(state: &AppState, problem: LinkProblem) -> Response {
    let ask = "Ask your IT team to send the invite again; the new mail has a new link and passcode.";
    let (status, title, advice) = match problem {
        LinkProblem::Unknown => (
            StatusCode::NOT_FOUND,
            "This link is not valid",
            "Check that the whole link was opened (some mail apps break long links), or ask your IT team to send the invite again.",
        ),
        LinkProblem::Expired => (StatusCode::GONE, "This invite has expired", ask),
        LinkProblem::Removed => (StatusCode::GONE, "This invite was withdrawn", ask),
        LinkProblem::Used => (
            StatusCode::CONFLICT,
            "This invite was already used",
            "An invite enrolls one device. To enroll another, ask your IT team for a new invite.",
        ),
        LinkProblem::Locked => (
            StatusCode::LOCKED,
            "This invite is locked",
            "The passcode was entered wrongly too many times. Ask your IT team to send the invite again.",
        ),
    };
    problem_page(state, status, title, advice)
}

fn problem_page(state: &AppState, status: StatusCode, title: &str, advice: &str) -> Response {
    let values = Value::from_pairs([
        ("title", Value::from(title)),
        ("problem", Value::from(title)),
        ("advice", Value::from(advice)),
        ("organisation", Value::from(state.naming.organisation())),
    ]);
    html(status, render_page(values))
}

fn render(
    state: &AppState,
    token: &str,
    status: StatusCode,
    invite: &Invite,
    platform: Platform,
    authenticated: bool,
    wrong: Option<String>,
) -> Response {
    let user = state.enrollment.user(&invite.user_id).ok();
    let user_name = user.as_ref().map(|u| u.name.clone()).unwrap_or_default();
    let user_email = user.map(|u| u.email).unwrap_or_default();
    let platforms: Vec<Value> = if invite.platform == Platform::Any {
        [Platform::Ios, Platform::Ipados, Platform::Macos, Platform::Android, Platform::Windows]
            .iter()
            .map(|p| Value::from_pairs([("code", p.to_string()), ("name", platform_name(*p).to_owned())]))
            .collect()
    } else {
        Vec::new()
    };
    let apple = matches!(platform, Platform::Ios | Platform::Ipados | Platform::Macos);
    // Without the push certificate an Apple enrollment cannot work; say so rather than lead the user on.
    let push_missing = apple && matches!(state.enrollment.push_certificate(), Ok(None));
    let auth = state.enrollment.enroll_auth().unwrap_or(EnrollAuth::Passcode);
    let ask_password = matches!(auth, EnrollAuth::Password | EnrollAuth::Both);
    let needs_password = ask_password && !state.enrollment.has_password(&invite.user_id).unwrap_or(true);
    let windows_server = format!("{}/EnrollmentServer/Discovery.svc", state.naming.public_url());
    let android_app = if platform == Platform::Android { state.enrollment.android_app().ok().flatten() } else { None };
    let values = Value::from_pairs([
        ("title", Value::from(format!("Enroll your {}", device_words(platform)))),
        ("organisation", Value::from(state.naming.organisation())),
        ("user_name", Value::from(user_name)),
        ("platform", Value::from(platform.to_string())),
        ("platform_name", Value::from(platform_name(platform))),
        ("platform_field", Value::from(invite.platform == Platform::Any)),
        ("platforms", Value::from(platforms)),
        ("expires", Value::from(format!("{} UTC", crate::domain::minute(invite.expires_at)))),
        ("authenticated", Value::from(authenticated)),
        ("wrong", Value::from(wrong)),
        ("apple", Value::from(apple)),
        ("trust_steps", Value::from(trust_steps(platform))),
        ("steps", Value::from(enroll_steps(platform))),
        ("session_minutes", Value::from(SESSION_MINUTES)),
        ("push_missing", Value::from(push_missing)),
        ("ask_passcode", Value::from(matches!(auth, EnrollAuth::Passcode | EnrollAuth::Both))),
        ("ask_password", Value::from(ask_password)),
        ("needs_password", Value::from(needs_password)),
        ("account_link_url", Value::from(format!("/e/{token}/account-link"))),
        ("profile_url", Value::from(format!("/e/{token}/profile?platform={platform}"))),
        ("windows", Value::from(platform == Platform::Windows)),
        ("windows_link", Value::from(windows_link(&windows_server, &user_email))),
        ("windows_server", Value::from(windows_server)),
        ("android", Value::from(platform == Platform::Android)),
        ("android_qr_url", Value::from(format!("/e/{token}/android.png"))),
        ("android_provisioning", Value::from(android_app.is_some() && invite.ownership == Ownership::Corporate)),
        ("agent_url", Value::from(android_app.and_then(|app| app.agent_url))),
    ]);
    html(status, render_page(values))
}

/// The link that opens Windows' "Enroll only in device management" with the user's email and this server filled
/// in.
fn windows_link(discovery: &str, email: &str) -> String {
    let encode = |text: &str| form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    format!("ms-device-enrollment:?mode=mdm&username={}&servername={}", encode(email), encode(discovery))
}

fn render_page(values: Value) -> String {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    match env.template_from_named_str("enroll.html", PAGE).and_then(|t| t.render(values)) {
        Ok(page) => page,
        Err(error) => {
            tracing::error!(%error, "the enrollment page does not render");
            "<!DOCTYPE html><title>Error</title><p>This page cannot be shown; try again later.</p>".to_owned()
        }
    }
}

fn html(status: StatusCode, body: String) -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        // The link token is in the address; nothing may carry it elsewhere or keep the page.
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    (status, headers, body).into_response()
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")], STYLESHEET)
        .into_response()
}

/// The appliance CA as an Apple configuration profile holding only a `com.apple.security.root` payload, which
/// iOS and macOS install from Safari. Its identifier is stable for the appliance; its UUIDs are new each time.
async fn ca_profile(State(state): State<AppState>) -> Response {
    let Some(der) = ca_der(&state) else {
        return problem_page(
            &state,
            StatusCode::INTERNAL_SERVER_ERROR,
            "The certificate cannot be read",
            "Try again later.",
        );
    };
    let organisation = state.naming.organisation();
    let name = profile::display_name(&organisation);
    let profile = plist::Dictionary::from_iter([
        ("PayloadType", plist::Value::from("Configuration")),
        ("PayloadVersion", plist::Value::from(1)),
        ("PayloadIdentifier", plist::Value::from(profile::identifiers(&der).trust)),
        ("PayloadUUID", plist::Value::from(profile::uuid_v4())),
        ("PayloadDisplayName", plist::Value::from(format!("{name}: certificate"))),
        (
            "PayloadDescription",
            plist::Value::from("Lets this device trust the enrollment appliance on your organisation's network."),
        ),
        (
            "PayloadContent",
            plist::Value::Array(vec![plist::Value::Dictionary(profile::root_payload(&der, &organisation))]),
        ),
    ]);
    let mut body = Vec::new();
    if let Err(error) = plist::Value::Dictionary(profile).to_writer_xml(&mut body) {
        tracing::error!(%error, "writing the CA profile failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    mobileconfig(body, "enrolld-ca.mobileconfig")
}

pub(crate) fn ca_der(state: &AppState) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(state.ca_pem.as_bytes()).ok().map(|der| der.to_vec())
}

fn mobileconfig(body: Vec<u8>, file_name: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-apple-aspen-config".to_owned()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file_name}\"")),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        body,
    )
        .into_response()
}

/// The signed enrollment profile for an Apple device, once the passcode was accepted. Each download carries a new
/// one-time SCEP challenge bound to the invite.
async fn enrollment_profile(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Query(choice): Query<PlatformChoice>,
    headers: HeaderMap,
) -> Response {
    let (invite, authenticated) = match open_with_session(&state, &token, &headers).await {
        Ok(opened) => opened,
        Err(response) => return response,
    };
    if !authenticated {
        return problem_page(
            &state,
            StatusCode::UNAUTHORIZED,
            "Enter the passcode first",
            "Open the link from your invite again and enter its passcode; the profile can be downloaded after that.",
        );
    }
    let platform = chosen_platform(&invite, choice.platform, &headers);
    if !matches!(platform, Platform::Ios | Platform::Ipados | Platform::Macos) {
        return problem_page(
            &state,
            StatusCode::NOT_FOUND,
            "This profile is for Apple devices",
            "Go back to the enrollment page and follow the steps shown for your device.",
        );
    }
    let domain = state.enrollment.clone();
    let Ok(Some(push)) = in_store(&state, "reading the push certificate", move || domain.push_certificate()).await
    else {
        return problem_page(
            &state,
            StatusCode::CONFLICT,
            "Apple device management is not set up yet",
            "Your IT team has not uploaded the Apple push certificate, so this device cannot enroll now. Let them know; this link keeps working until it expires.",
        );
    };
    let domain = state.enrollment.clone();
    let id = invite.id;
    let challenge = match in_store(&state, "making a SCEP challenge", move || domain.scep_challenge(&id)).await {
        Ok(challenge) => challenge,
        Err(page) => return page,
    };
    let Some(ca) = ca_der(&state) else { return StatusCode::INTERNAL_SERVER_ERROR.into_response() };
    // The profile names the SCEP CA by its fingerprint, so it waits for that CA (made seconds after a first start).
    let Ok(scep) = state.mdm.scep() else {
        let mut page = problem_page(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "The appliance is still starting",
            "Its device certificates are being prepared. Wait a minute, then tap the download button again.",
        );
        page.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(super::mdm::RETRY_AFTER_SECS));
        return page;
    };
    let (organisation, public_url) = (state.naming.organisation(), state.naming.public_url());
    let profile = profile::EnrollmentProfile {
        ca_der: &ca,
        scep_ca_der: scep.ca_certificate(),
        organisation: &organisation,
        public_url: &public_url,
        topic: &push.topic,
        challenge: &challenge,
        invite: invite.id.to_string(),
        platform,
        ownership: invite.ownership,
    };
    let mut xml = Vec::new();
    if let Err(error) = profile.build().to_writer_xml(&mut xml) {
        tracing::error!(%error, "writing the enrollment profile failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let body = match state.mdm.sign_profile(&xml, state.clock.now()) {
        Some(Ok(signed)) => signed,
        Some(Err(error)) => {
            tracing::error!(%error, "signing the enrollment profile failed");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        None => xml,
    };
    tracing::info!(invite = %invite.id, "enrollment profile downloaded");
    mobileconfig(body, "enroll.mobileconfig")
}

/// The user asks for a password link from the enrollment page; it goes by mail to the invite's user.
async fn request_account_link(State(state): State<AppState>, Path(token): Path<String>, request: Request) -> Response {
    let client = super::api::client_of(request.extensions());
    let invite = match open(&state, &token).await {
        Ok(invite) => invite,
        Err(response) => return response,
    };
    let domain = state.enrollment.clone();
    let id = invite.id;
    let mailed =
        in_store(&state, "mailing a password link", move || domain.mail_account_link(&Actor::device(client), &id))
            .await;
    let email = state.enrollment.user(&invite.user_id).map(|u| masked(&u.email)).unwrap_or_default();
    match mailed {
        Err(page) => page,
        Ok(Ok(())) => problem_page(
            &state,
            StatusCode::OK,
            "Check your mail",
            &format!(
                "A link to set your password is on its way to {email}. It works once, for 24 hours. After that, open your invite link again."
            ),
        ),
        Ok(Err(LinkRefusal::TooSoon(again))) => problem_page(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "A link was sent a moment ago",
            &format!(
                "Check your mail at {email}. Another link can be asked for after {} UTC.",
                crate::domain::minute(again)
            ),
        ),
        Ok(Err(LinkRefusal::NotNeeded)) => problem_page(
            &state,
            StatusCode::CONFLICT,
            "No password is needed",
            "This page does not ask for a password of your own, or you have set one already. Open your invite link again.",
        ),
    }
}

/// `a***@example.com`: enough for the user to recognise the address, not enough to learn it.
fn masked(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => format!("{}***@{domain}", local.chars().next().unwrap_or('*')),
        None => "your address".into(),
    }
}

async fn account_page(State(state): State<AppState>, Path(token): Path<String>) -> Response {
    let domain = state.enrollment.clone();
    match in_store(&state, "opening a password link", move || domain.open_account_link(&token)).await {
        Err(page) => page,
        Ok(Ok(user)) => account_form(&state, StatusCode::OK, &user.name, None),
        Ok(Err(_)) => unusable_account_link(&state),
    }
}

async fn set_password(State(state): State<AppState>, Path(token): Path<String>, request: Request) -> Response {
    let Ok(Form(form)) = Form::<PasswordForm>::from_request(request, &state).await else {
        return problem_page(&state, StatusCode::BAD_REQUEST, "This form could not be read", "Go back and try again.");
    };
    let domain = state.enrollment.clone();
    let lookup = token.clone();
    let user = match in_store(&state, "opening a password link", move || domain.open_account_link(&lookup)).await {
        Err(page) => return page,
        Ok(Ok(user)) => user,
        Ok(Err(_)) => return unusable_account_link(&state),
    };
    if form.password != form.confirm {
        let error = "The two passwords are not the same; type them again.";
        return account_form(&state, StatusCode::UNPROCESSABLE_ENTITY, &user.name, Some(error.into()));
    }
    let Ok(_permit) = state.password_checks.clone().acquire_owned().await else {
        return problem_page(&state, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong", "Try again in a minute.");
    };
    let domain = state.enrollment.clone();
    match tokio::task::spawn_blocking(move || domain.set_account_password(&token, &form.password)).await {
        Ok(Ok(Ok(_))) => problem_page(
            &state,
            StatusCode::OK,
            "Your password is set",
            "Open the link in your invite mail again and enter this password when the page asks for it.",
        ),
        Ok(Ok(Err(_))) => unusable_account_link(&state),
        Ok(Err(crate::domain::DomainError::Invalid { message, .. })) => account_form(
            &state,
            StatusCode::UNPROCESSABLE_ENTITY,
            &user.name,
            Some(format!("That password is too short: {message}.")),
        ),
        Ok(Err(error)) => {
            tracing::error!(%error, "setting a password failed");
            problem_page(&state, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong", "Try again in a minute.")
        }
        Err(_) => {
            problem_page(&state, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong", "Try again in a minute.")
        }
    }
}

fn unusable_account_link(state: &AppState) -> Response {
    problem_page(
        state,
        StatusCode::GONE,
        "This link cannot be used",
        "It was already used, or it expired (a link works once, for 24 hours). Open your invite link and ask for a new one.",
    )
}

fn account_form(state: &AppState, status: StatusCode, user_name: &str, error: Option<String>) -> Response {
    let values = Value::from_pairs([
        ("title", Value::from("Set your password")),
        ("organisation", Value::from(state.naming.organisation())),
        ("account_form", Value::from(true)),
        ("user_name", Value::from(user_name)),
        ("min_chars", Value::from(crate::domain::auth::MIN_PASSWORD_CHARS)),
        ("wrong", Value::from(error)),
    ]);
    html(status, render_page(values))
}

fn chosen_platform(invite: &Invite, picked: Option<Platform>, headers: &HeaderMap) -> Platform {
    if invite.platform != Platform::Any {
        return invite.platform;
    }
    if let Some(platform) = picked.filter(|p| *p != Platform::Any) {
        return platform;
    }
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if agent.contains("iPad") {
        Platform::Ipados
    } else if agent.contains("iPhone") || agent.contains("iPod") {
        Platform::Ios
    } else if agent.contains("Android") {
        Platform::Android
    } else if agent.contains("Windows") {
        Platform::Windows
    } else if agent.contains("Macintosh") || agent.contains("Mac OS X") {
        Platform::Macos
    } else {
        Platform::Any
    }
}

pub(crate) fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Any => "any device",
        other => crate::csvfile::platform_text(other),
    }
}

fn device_words(platform: Platform) -> String {
    match platform {
        Platform::Ios => "iPhone".into(),
        Platform::Ipados => "iPad".into(),
        Platform::Macos => "Mac".into(),
        Platform::Android => "Android device".into(),
        Platform::Windows => "Windows PC".into(),
        Platform::Any => "device".into(),
    }
}

pub(crate) fn trust_steps(platform: Platform) -> Vec<&'static str> {
    match platform {
        Platform::Ios | Platform::Ipados => vec![
            "Tap the button above and allow the download.",
            "Settings › General › VPN & Device Management: tap the downloaded profile and install it.",
            "Settings › General › About › Certificate Trust Settings: turn on full trust for the certificate.",
        ],
        Platform::Macos => vec![
            "Click the button above; the profile downloads.",
            "System Settings › Privacy & Security › Profiles: double-click the profile and install it.",
        ],
        Platform::Android => vec![
            "Tap the button above and open the downloaded file.",
            "Name the certificate (for example \"Work\") and choose \"VPN and apps\" if asked.",
        ],
        Platform::Windows => vec![
            "Click the button above and open the downloaded file.",
            "Install Certificate › Local Machine › Place all certificates in: Trusted Root Certification Authorities.",
        ],
        Platform::Any => vec!["Pick the kind of device above to see its steps."],
    }
}

pub(crate) fn enroll_steps(platform: Platform) -> Vec<&'static str> {
    match platform {
        Platform::Ios | Platform::Ipados => vec![
            "Open this page in Safari (not in another browser or a mail app's preview).",
            "Enter the passcode from your invite.",
            "Trust the appliance's certificate, then install the enrollment profile under Settings › General › VPN & Device Management.",
        ],
        Platform::Macos => vec![
            "Open this page in Safari and enter the passcode from your invite.",
            "Install the enrollment profile under System Settings › Privacy & Security › Profiles.",
        ],
        Platform::Android => vec![
            "A company-owned device that is new or reset: on the first setup screen, tap six times and scan the QR code from your invite.",
            "Otherwise: install the device management agent, open this link in it (or scan the QR code) and enter the passcode.",
        ],
        Platform::Windows => vec![
            "Trust the appliance's certificate first (step 1).",
            "Then use the button above, or open Settings › Accounts › Access work or school › Enroll only in device management yourself: enter your email address, the server address shown there, and the passcode from your invite as the password.",
        ],
        Platform::Any => vec!["Pick the kind of device above; the steps for it appear here."],
    }
}
