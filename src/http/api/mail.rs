//! `/api/v1/mail`: the relay's state and the outbox counts, a test mail, and the invite templates (read, save with a
//! render check, reset, preview).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiJson, ApiPath, SignedInAdmin, blocking};
use crate::domain::{Attempt, OutboxCounts};
use crate::http::{AppState, HttpError};
use crate::mail::{MailError, TemplateSource};
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
            MailError::CaFile { .. } | MailError::Relay(_) | MailError::Qr(_) => {
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
    /// Absent until `smtp_host` is configured; messages wait in the outbox meanwhile.
    pub relay: Option<RelayView>,
    pub outbox: OutboxCounts,
}

/// The relay in use and how many messages are queued, deferred, sent and failed.
#[utoipa::path(get, path = "/api/v1/mail", tag = "mail", responses((status = 200, body = MailStatus)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<MailStatus>, HttpError> {
    let domain = state.enrollment.clone();
    let outbox = blocking(move || domain.outbox_counts()).await?;
    let relay = state.mail.relay().map(|relay| {
        let settings = relay.settings();
        RelayView {
            host: settings.host.clone(),
            port: settings.port,
            security: settings.security.as_str().to_owned(),
            from: settings.from_address.clone(),
            username: settings.username.clone(),
        }
    });
    Ok(Json(MailStatus { relay, outbox }))
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
