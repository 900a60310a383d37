//! What Android devices talk to: the agent API (`POST /android/v1/enroll`, `POST /android/v1/checkin`), which is
//! in the OpenAPI document so any device-policy app can implement it; the device-policy app itself when the box
//! serves it (`/android/dpc.apk`); and the QR code the enrollment page shows once the user has authenticated.

use std::path::PathBuf;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::access::ClientAddr;
use super::api::{ApiJson, blocking};
use super::{AppState, HttpError};
use crate::domain::{Actor, AndroidFacts, AndroidRefusal, CommandOutcome, Credentials, IdentityProblem, LinkProblem};
use crate::model::{CommandKind, Id, Ownership};

/// How often an agent checks in when nothing wakes it.
pub const CHECKIN_INTERVAL_SECONDS: u32 = 900;
/// Largest agent request body: a few facts and results.
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Most command results one check-in may report (a device has a few queued at most).
const MAX_RESULTS: usize = 50;

/// Where the device-policy app is kept when the admin uploads it (the box then serves it); cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Android {
    dir: Option<PathBuf>,
}

impl Android {
    pub fn new(dir: PathBuf) -> Android {
        Android { dir: Some(dir) }
    }

    /// The uploaded app's file, if uploads are possible (a daemon with a state directory).
    pub fn apk_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join("dpc.apk"))
    }
}

/// The agent's enrollment: the invite's token (the last part of the invite link, or `invite_token` from the
/// provisioning QR code's admin extras), the user's answer and what the device is.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// The passcode from the invite, when the admin asks for it.
    pub passcode: Option<String>,
    /// The user's own password, when the admin asks for it.
    pub password: Option<String>,
    #[serde(default)]
    pub device: AndroidFacts,
}

/// The device's identity and where to go next.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnrollResponse {
    pub device_id: Id,
    /// Send as `Authorization: Bearer <device_secret>` on every check-in. Shown once; keep it in the app's
    /// private storage.
    pub device_secret: String,
    pub checkin_url: String,
    pub checkin_interval_seconds: u32,
    /// SHA-256 of the appliance's CA certificate (hex), to trust the box's HTTPS certificate by.
    pub ca_sha256: String,
}

/// A check-in: results of the commands run since the last one, and the device's facts.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckinRequest {
    #[serde(default)]
    pub results: Vec<CommandResult>,
    pub device: Option<AndroidFacts>,
    /// The user removed the work profile or the app's device-admin rights: the device is no longer managed.
    #[serde(default)]
    pub removed: bool,
}

/// What became of one command.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    pub id: Id,
    pub outcome: CommandOutcome,
    /// What went wrong (for `failed`); the admin sees it.
    pub detail: Option<String>,
}

/// What the agent should do now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckinResponse {
    pub commands: Vec<AgentCommand>,
    pub checkin_interval_seconds: u32,
}

/// One command for the agent; report its outcome with its `id` at the next check-in.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentCommand {
    pub id: Id,
    #[serde(rename = "type")]
    pub kind: AgentCommandKind,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentCommandKind {
    /// Send the device's facts with the next check-in.
    ReportFacts,
    /// Revoke MDM: remove the work profile (personal) or give up device ownership (corporate); the user's own
    /// data stays. Report `done` first, then remove.
    Unenroll,
    /// Factory reset (corporate devices only). Report `done` first, then wipe.
    Wipe,
}

/// Enrolls an Android device through its agent. Wrong answers count toward the invite's lock, as on the
/// enrollment page; a token enrolls one device.
#[utoipa::path(post, path = "/android/v1/enroll", tag = "android", request_body = EnrollRequest,
    security(()),
    responses(
        (status = 200, body = EnrollResponse),
        (status = 401, description = "wrong passcode or password (`wrong_answer`; the message says how many tries are left)"),
        (status = 404, description = "no invite has this token (`unknown_invite`)"),
        (status = 409, description = "the invite is for another platform (`not_android`), or the user must set a password first (`password_needed`)"),
        (status = 410, description = "the invite was used, expired or removed (`invite_used`, `invite_expired`, `invite_removed`)"),
        (status = 423, description = "too many wrong answers (`invite_locked`); the admin resends the invite"),
    ))]
pub async fn enroll(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> Result<Json<EnrollResponse>, HttpError> {
    let actor = Actor::device(client);
    let EnrollRequest { token, passcode, password, device } = body;
    if !device.reasonable() {
        return Err(too_long());
    }
    let ca = ca_der(&state);
    if ca.is_empty() {
        return Err(HttpError::unavailable("the appliance CA cannot be read; see the server log"));
    }
    let domain = state.enrollment.clone();
    let outcome = blocking(move || {
        let credentials = Credentials { passcode: passcode.as_deref(), password: password.as_deref() };
        domain.android_enroll(&actor, token.trim(), credentials, &device)
    })
    .await?;
    let enrolled = outcome.map_err(refusal)?;
    tracing::info!(device = %enrolled.device.id, "an Android device enrolled through its agent");
    Ok(Json(EnrollResponse {
        device_id: enrolled.device.id,
        device_secret: enrolled.secret,
        checkin_url: format!("{}/android/v1/checkin", state.naming.public_url()),
        checkin_interval_seconds: CHECKIN_INTERVAL_SECONDS,
        ca_sha256: crate::pki::sha256_hex(&ca),
    }))
}

fn refusal(refusal: AndroidRefusal) -> HttpError {
    match refusal {
        AndroidRefusal::Link(LinkProblem::Unknown) => {
            HttpError::new(StatusCode::NOT_FOUND, "unknown_invite", "no invite has this token; check the link")
        }
        AndroidRefusal::Link(LinkProblem::Used) => HttpError::new(
            StatusCode::GONE,
            "invite_used",
            "this invite has enrolled a device already; ask your IT team for a new one",
        ),
        AndroidRefusal::Link(LinkProblem::Expired) => {
            HttpError::new(StatusCode::GONE, "invite_expired", "this invite has expired; ask your IT team to resend it")
        }
        AndroidRefusal::Link(LinkProblem::Removed) => {
            HttpError::new(StatusCode::GONE, "invite_removed", "this invite was withdrawn; ask your IT team")
        }
        AndroidRefusal::Link(LinkProblem::Locked) => HttpError::new(
            StatusCode::LOCKED,
            "invite_locked",
            "too many wrong answers; ask your IT team to resend the invite",
        ),
        AndroidRefusal::NotAndroid(platform) => HttpError::new(
            StatusCode::CONFLICT,
            "not_android",
            format!("this invite is for {platform}; ask your IT team for an Android invite"),
        ),
        AndroidRefusal::Wrong { attempts_left } => HttpError::new(
            StatusCode::UNAUTHORIZED,
            "wrong_answer",
            format!("that is not right; {attempts_left} tries left"),
        ),
        AndroidRefusal::NoPassword => HttpError::new(
            StatusCode::CONFLICT,
            "password_needed",
            "set your password first: open the invite link in a browser and ask for the password link",
        ),
    }
}

/// A check-in by an enrolled agent: the results of the commands it ran, its facts; the answer holds the commands
/// queued for it. A device that was unenrolled or wiped, or enrolled again with a newer secret, is refused.
#[utoipa::path(post, path = "/android/v1/checkin", tag = "android", request_body = CheckinRequest,
    security(("device_secret" = [])),
    responses(
        (status = 200, body = CheckinResponse),
        (status = 401, description = "no device has this secret, or it enrolled again since (`unknown_device`, `superseded`)"),
        (status = 403, description = "the check-in speaks for another device: an Android ID or serial other than this device's, or a result for a command queued for another device (`other_device`); nothing is recorded"),
        (status = 410, description = "the device is no longer managed (`unmanaged`); the agent should stop checking in"),
    ))]
pub async fn checkin(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CheckinRequest>,
) -> Result<Json<CheckinResponse>, HttpError> {
    let actor = Actor::device(client);
    let secret = bearer(&headers).ok_or_else(|| {
        HttpError::new(StatusCode::UNAUTHORIZED, "unknown_device", "send the device secret as Authorization: Bearer")
    })?;
    let CheckinRequest { results, device: facts, removed } = body;
    if results.len() > MAX_RESULTS {
        return Err(HttpError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_results",
            format!("report at most {MAX_RESULTS} results a check-in"),
        ));
    }
    if facts.as_ref().is_some_and(|f| !f.reasonable())
        || results.iter().any(|r| r.detail.as_ref().is_some_and(|d| d.len() > 1000))
    {
        return Err(too_long());
    }
    let domain = state.enrollment.clone();
    let device = blocking(move || {
        let device = match domain.android_device(&secret)? {
            Ok(device) => device,
            Err(problem) => return Ok(Err(problem)),
        };
        if removed {
            domain.device_checked_out(&actor, &device.id)?;
            return Ok(Err(IdentityProblem::Unmanaged));
        }
        let results: Vec<_> = results.into_iter().map(|r| (r.id, r.outcome, r.detail.unwrap_or_default())).collect();
        domain.android_checkin(&actor, &device.id, &results, facts.as_ref())
    })
    .await?;
    let device = device.map_err(|problem| match problem {
        IdentityProblem::Unknown => {
            HttpError::new(StatusCode::UNAUTHORIZED, "unknown_device", "no device has this secret; enroll again")
        }
        IdentityProblem::Superseded => HttpError::new(
            StatusCode::UNAUTHORIZED,
            "superseded",
            "this device enrolled again since; this secret no longer works",
        ),
        IdentityProblem::Unmanaged => {
            HttpError::new(StatusCode::GONE, "unmanaged", "this device is no longer managed; stop checking in")
        }
        IdentityProblem::OtherDevice => HttpError::new(
            StatusCode::FORBIDDEN,
            "other_device",
            "this check-in speaks for another device (its facts or a command's result); nothing was recorded",
        ),
    })?;
    let commands = device
        .pending_commands
        .iter()
        .map(|command| AgentCommand {
            id: command.id,
            kind: match command.kind {
                CommandKind::DeviceInformation => AgentCommandKind::ReportFacts,
                CommandKind::RevokeMdm => AgentCommandKind::Unenroll,
                CommandKind::FactoryReset => AgentCommandKind::Wipe,
            },
        })
        .collect();
    Ok(Json(CheckinResponse { commands, checkin_interval_seconds: CHECKIN_INTERVAL_SECONDS }))
}

fn too_long() -> HttpError {
    HttpError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "too_long",
        format!("a device fact is longer than {} characters (or a detail than 1000)", AndroidFacts::MAX_CHARS),
    )
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| secret.trim().to_owned()).filter(|s| !s.is_empty())
}

fn ca_der(state: &AppState) -> Vec<u8> {
    super::enroll::ca_der(state).unwrap_or_default()
}

/// The device-policy app, when the admin uploaded it (devices download it while they are set up). Streamed from
/// the file, so many devices downloading at once cost no memory to speak of.
pub async fn apk(State(state): State<AppState>) -> Response {
    let Some(path) = state.android.apk_path() else { return StatusCode::NOT_FOUND.into_response() };
    let Ok(file) = tokio::fs::File::open(&path).await else { return StatusCode::NOT_FOUND.into_response() };
    let length = file.metadata().await.map(|m| m.len()).unwrap_or_default();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    (
        [
            (header::CONTENT_TYPE, "application/vnd.android.package-archive".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        body,
    )
        .into_response()
}

/// What the provisioning QR code (corporate devices, once an app is configured) or, otherwise, the agent's QR
/// code (the invite link) holds.
pub fn qr_content(
    state: &AppState,
    ownership: Ownership,
    token: &str,
    app: Option<&crate::domain::AndroidApp>,
) -> String {
    let public_url = state.naming.public_url();
    match app {
        Some(app) if ownership == Ownership::Corporate => {
            let ca = crate::pki::sha256_hex(&ca_der(state));
            app.provisioning_payload(&public_url, token, &ca).to_string()
        }
        _ => format!("{public_url}/e/{token}"),
    }
}

/// The enrollment page's QR code for an Android device, for a user who has authenticated on it.
pub async fn enroll_qr(State(state): State<AppState>, Path(token): Path<String>, headers: HeaderMap) -> Response {
    let invite = match super::enroll::open_authenticated(&state, &token, &headers).await {
        Ok(invite) => invite,
        Err(response) => return response,
    };
    let domain = state.enrollment.clone();
    let app = blocking(move || domain.android_app()).await.ok().flatten();
    let content = qr_content(&state, invite.ownership, &token, app.as_ref());
    match crate::mail::qr::png(&content) {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "no-store")], png).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
