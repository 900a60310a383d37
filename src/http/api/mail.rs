//! `/api/v1/mail`: the relay's state and the outbox counts, the relay settings, a test mail, and the invite templates (read, save with a
//! render check, reset, preview).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiJson, ApiPath, SignedInAdmin, blocking};
use crate::config::{SmtpConfig, SmtpSecurity};
use crate::domain::{Attempt, OutboxCounts};
use crate::http::{AppState, HttpError};
use crate::mail::{MailError, RelaySource, TemplateSource};
use crate::model::Platform;

impl From<MailError> for HttpError {
    fn from(error: MailError) -> Self {
        let message = error.to_string();
        match error {
            MailError::Template(_) => HttpError {
                field: Some("source"),
                ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "template_invalid", message)
            },
            MailError::NotConfigured => HttpError::new(StatusCode::CONFLICT, "mail_not_configured", message),
            MailError::Message(_) => {
                HttpError { field: Some("to"), ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message) }
            }
            MailError::Domain(domain) => domain.into(),
            MailError::CaFile { .. } => HttpError {
                field: Some("ca_pem"),
                ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
            },
            MailError::Relay(_) | MailError::Qr(_) => {
                HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "mail", message)
            }
        }
    }
}

/// The relay enrolld sends through, if any.
#[derive(Debug, Serialize, ToSchema)]
pub struct RelayView {
    pub host: String,
    pub port: u16,
    /// `none`, `starttls` or `tls`.
    pub security: String,
    pub from: String,
    pub username: Option<String>,
}

/// Where mail stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct MailStatus {
    /// Absent until a relay is configured or saved; messages wait in the outbox meanwhile.
    pub relay: Option<RelayView>,
    /// Whether the relay settings come from the configuration or were saved through this API.
    pub relay_source: RelaySource,
    pub outbox: OutboxCounts,
}

/// The relay in use and how many messages are queued, deferred, sent and failed.
#[utoipa::path(get, path = "/api/v1/mail", tag = "mail", responses((status = 200, body = MailStatus)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<MailStatus>, HttpError> {
    Ok(Json(mail_status(&state).await?))
}

/// The relay in use, where its settings came from, and the outbox counts.
async fn mail_status(state: &AppState) -> Result<MailStatus, HttpError> {
    let domain = state.enrollment.clone();
    let outbox = blocking(move || domain.outbox_counts()).await?;
    Ok(MailStatus { relay: relay_view(state), relay_source: state.mail.relay_source(), outbox })
}

fn relay_view(state: &AppState) -> Option<RelayView> {
    state.mail.relay().map(|relay| {
        let settings = relay.settings();
        RelayView {
            host: settings.host.clone(),
            port: settings.port,
            security: settings.security.as_str().to_owned(),
            from: settings.from_address.clone(),
            username: settings.username.clone(),
        }
    })
}

/// The relay settings an admin saves.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RelaySettings {
    pub host: String,
    /// Default: 587 for `starttls`, 465 for `tls`, 25 for `none`.
    #[serde(default, deserialize_with = "port")]
    pub port: Option<u16>,
    /// `starttls` (default), `tls` or `none`.
    pub security: Option<SmtpSecurity>,
    pub username: Option<String>,
    /// Needed with `username`. Kept in the appliance's database, which only enrolld can read.
    pub password: Option<String>,
    /// The sender address, one the relay lets enrolld send as.
    pub from_address: String,
    pub from_name: Option<String>,
    pub reply_to: Option<String>,
    /// The name given in EHLO; default: the appliance's name.
    pub helo_name: Option<String>,
    /// An extra CA to trust for a relay whose certificate an internal CA issued: PEM certificates
    /// (`-----BEGIN CERTIFICATE-----`) that parse, checked when the relay uses TLS.
    pub ca_pem: Option<String>,
}

/// Reads the relay's port as a whole number (`587` or `587.0`) up to 65535.
fn port<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u16>, D::Error> {
    use serde::de::Error as _;
    crate::domain::optional_whole_number(deserializer)?
        .map(|port| u16::try_from(port).map_err(|_| D::Error::custom(format!("port: {port} is beyond 65535"))))
        .transpose()
}

/// Sends through this relay from now on (and after restarts), in place of the configuration's `smtp_*` settings.
/// The settings are checked (addresses, the CA) before they are saved; send a test mail to check the relay itself.
#[utoipa::path(put, path = "/api/v1/mail/relay", tag = "mail", request_body = RelaySettings,
    responses((status = 200, body = MailStatus), (status = 422)))]
pub async fn save_relay(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(request): ApiJson<RelaySettings>,
) -> Result<Json<MailStatus>, HttpError> {
    let settings = checked_relay(&state, request)?;
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    blocking(move || mail.save_relay(&domain, &admin.actor, &settings).map_err(HttpError::from)).await?;
    Ok(Json(mail_status(&state).await?))
}

/// Relay settings as an admin gave them, checked (host, addresses, sign-in) and completed with defaults; the
/// admin pages save through this too.
pub(crate) fn checked_relay(state: &AppState, request: RelaySettings) -> Result<SmtpConfig, HttpError> {
    let invalid = |field: &'static str, message: String| HttpError {
        field: Some(field),
        ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    };
    let host = request.host.trim().to_owned();
    if host.is_empty() || host.contains([' ', '/', ':']) {
        return Err(invalid("host", "give the relay's name or address, such as mail.example.com".into()));
    }
    let address = |field: &'static str, text: &str| {
        text.trim()
            .parse::<lettre::Address>()
            .map(|a| a.to_string())
            .map_err(|e| invalid(field, format!("{text:?} is not an email address: {e}")))
    };
    let from_address = address("from_address", &request.from_address)?;
    let reply_to =
        request.reply_to.as_deref().filter(|r| !r.trim().is_empty()).map(|r| address("reply_to", r)).transpose()?;
    let username = request.username.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty());
    let password = request.password.filter(|p| !p.is_empty());
    if username.is_some() != password.is_some() {
        return Err(invalid("password", "give both a username and a password, or neither".into()));
    }
    let security = request.security.unwrap_or(SmtpSecurity::StartTls);
    let helo_name = request
        .helo_name
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| state.naming.names().mdns_name());
    let settings = SmtpConfig {
        host,
        port: request.port.filter(|p| *p != 0).unwrap_or(security.default_port()),
        security,
        username,
        password,
        from_address,
        from_name: request.from_name.map(|n| n.trim().to_owned()).unwrap_or_else(|| "Device enrollment".into()),
        reply_to,
        helo_name,
        ca_file: None,
        ca_pem: request.ca_pem.filter(|p| !p.trim().is_empty()),
    };
    Ok(settings)
}

/// Forgets the relay saved through the API; the configuration's `smtp_*` settings apply again (or none).
#[utoipa::path(delete, path = "/api/v1/mail/relay", tag = "mail", responses((status = 200, body = MailStatus)))]
pub async fn reset_relay(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
) -> Result<Json<MailStatus>, HttpError> {
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    blocking(move || mail.reset_relay(&domain, &admin.actor).map_err(HttpError::from)).await?;
    Ok(Json(mail_status(&state).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TestMailRequest {
    /// Where to send the test message.
    pub to: String,
}

/// What the relay said to a test message.
#[derive(Debug, Serialize, ToSchema)]
pub struct TestMailResult {
    /// Whether the relay accepted the message.
    pub sent: bool,
    /// `temporary`, `unreachable` or `permanent` when it did not.
    pub failure: Option<String>,
    /// The relay's reply, or the error, with advice a person can act on.
    pub reply: String,
}

/// Sends a short test message through the relay now (not through the outbox) and answers with the relay's reply.
#[utoipa::path(post, path = "/api/v1/mail/test", tag = "mail", request_body = TestMailRequest,
    responses((status = 200, body = TestMailResult), (status = 409, description = "no relay configured"), (status = 422)))]
pub async fn send_test(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(request): ApiJson<TestMailRequest>,
) -> Result<Json<TestMailResult>, HttpError> {
    let attempt = state.mail.send_test(request.to.trim()).await?;
    let (sent, failure, reply) = match attempt {
        Attempt::Sent(reply) => (true, None, reply),
        Attempt::Temporary(reply) => (false, Some("temporary".to_owned()), reply),
        Attempt::Unreachable(reply) => (false, Some("unreachable".to_owned()), reply),
        Attempt::Permanent(reply) => (false, Some("permanent".to_owned()), reply),
    };
    let domain = state.enrollment.clone();
    let detail = format!("to {}: {reply}", request.to.trim());
    blocking(move || domain.record(&admin.actor, "mail.test", None, &detail)).await?;
    Ok(Json(TestMailResult { sent, failure, reply }))
}

/// The invite templates: subject, plain-text body and HTML body, each with its default.
#[utoipa::path(get, path = "/api/v1/mail/templates", tag = "mail", responses((status = 200, body = Vec<TemplateSource>)))]
pub async fn templates(State(state): State<AppState>) -> Result<Json<Vec<TemplateSource>>, HttpError> {
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    Ok(Json(blocking(move || mail.template_sources(&domain).map_err(HttpError::from)).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TemplateUpdate {
    /// minijinja source. Variables: user_name, organisation, link, passcode, expires, expires_at, platform,
    /// platform_name, ownership, qr_code (an `<img src>` for the inline QR code), subject (in the bodies).
    pub source: String,
}

/// Saves an admin's version of a template. It is rendered first with sample data for every platform; a syntax
/// error or an unknown variable is refused (422) with the line and reason, and nothing changes.
#[utoipa::path(put, path = "/api/v1/mail/templates/{name}", tag = "mail", params(("name" = String, Path)),
    request_body = TemplateUpdate, responses((status = 200, body = TemplateSource), (status = 422)))]
pub async fn save_template(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(name): ApiPath<String>,
    ApiJson(update): ApiJson<TemplateUpdate>,
) -> Result<Json<TemplateSource>, HttpError> {
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    Ok(Json(
        blocking(move || {
            mail.save_template(&domain, &admin.actor, &name, &update.source)?;
            one_template(&mail, &domain, &name)
        })
        .await?,
    ))
}

/// Goes back to the built-in template.
#[utoipa::path(delete, path = "/api/v1/mail/templates/{name}", tag = "mail", params(("name" = String, Path)),
    responses((status = 200, body = TemplateSource), (status = 422)))]
pub async fn reset_template(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<TemplateSource>, HttpError> {
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    Ok(Json(
        blocking(move || {
            mail.reset_template(&domain, &admin.actor, &name)?;
            one_template(&mail, &domain, &name)
        })
        .await?,
    ))
}

fn one_template(
    mail: &crate::mail::Mail,
    domain: &crate::domain::Enrollment,
    name: &str,
) -> Result<TemplateSource, HttpError> {
    mail.template_sources(domain)?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, "not_found", format!("no template {name}")))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PreviewRequest {
    /// The platform whose steps to show (default `ios`).
    pub platform: Option<Platform>,
    /// Unsaved sources to try, by template name, in place of the saved ones.
    #[serde(default)]
    pub drafts: BTreeMap<String, String>,
}

/// A rendered invite mail.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Renders the invite mail with sample data (and any drafts), as a user on that platform would receive it.
#[utoipa::path(post, path = "/api/v1/mail/preview", tag = "mail", request_body = PreviewRequest,
    responses((status = 200, body = Preview), (status = 422)))]
pub async fn preview(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PreviewRequest>,
) -> Result<Json<Preview>, HttpError> {
    let (mail, domain) = (state.mail.clone(), state.enrollment.clone());
    let platform = request.platform.unwrap_or(Platform::Ios);
    let rendered = blocking(move || mail.preview(&domain, &request.drafts, platform).map_err(HttpError::from)).await?;
    Ok(Json(Preview { subject: rendered.subject, text: rendered.text, html: rendered.html }))
}
