//! `/api/v1/apple/push-certificate`: the Apple MDM push certificate, uploaded as PEM, shown with its Topic and
//! expiry (and a warning in its last 30 days).

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{ApiJson, SignedInAdmin, blocking};
use crate::domain::StoredPushCertificate;
use crate::http::{AppState, HttpError};
use crate::pki::push::{PushCertError, PushCertificate};

/// Days before expiry from which the certificate is flagged.
const WARN_DAYS: i64 = 30;

/// The push certificate in use (its private key is never shown).
#[derive(Debug, Serialize, ToSchema)]
pub struct PushCertificateView {
    /// The APNs Topic enrollment profiles carry.
    pub topic: String,
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Whole days until it expires (negative once it has).
    pub days_left: i64,
    /// What to do, in its last 30 days or once expired.
    pub warning: Option<String>,
    pub sha256: String,
    #[serde(with = "time::serde::rfc3339")]
    pub uploaded_at: OffsetDateTime,
    pub uploaded_by: String,
}

impl PushCertificateView {
    fn new(stored: StoredPushCertificate, now: OffsetDateTime) -> PushCertificateView {
        let days_left = (stored.not_after - now).whole_days();
        let renew = "renew it in Apple's Push Certificates Portal with the same Apple ID and upload it here";
        let warning = if stored.not_after <= now {
            Some(format!("expired on {}: Apple devices receive no commands; {renew}", stored.not_after.date()))
        } else if days_left < WARN_DAYS {
            Some(format!("expires in {days_left} days, on {}; {renew}", stored.not_after.date()))
        } else {
            None
        };
        PushCertificateView {
            topic: stored.topic,
            subject: stored.subject,
            not_before: stored.not_before,
            not_after: stored.not_after,
            days_left,
            warning,
            sha256: stored.sha256,
            uploaded_at: stored.uploaded_at,
            uploaded_by: stored.uploaded_by,
        }
    }
}

/// The push certificate in use, or 404 when none was uploaded yet (Apple invites cannot enroll until one is).
#[utoipa::path(get, path = "/api/v1/apple/push-certificate", tag = "apple",
    responses((status = 200, body = PushCertificateView), (status = 404)))]
pub async fn push_certificate(State(state): State<AppState>) -> Result<Json<PushCertificateView>, HttpError> {
    let domain = state.enrollment.clone();
    let now = state.clock.now();
    match blocking(move || domain.push_certificate()).await? {
        Some(stored) => Ok(Json(PushCertificateView::new(stored, now))),
        None => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "no_push_certificate",
            "no push certificate was uploaded; get the MDM push certificate from Apple's Push Certificates Portal and upload it with its private key",
        )),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PushCertificateUpload {
    /// The certificate from Apple's Push Certificates Portal, PEM.
    pub certificate_pem: String,
    /// The private key the certificate request was made with, PEM (PKCS#8, or PKCS#1 RSA).
    pub private_key_pem: String,
}

/// Uploads (or renews) the push certificate. It must be an MDM push certificate (Topic `com.apple.mgmt.…`), not
/// expired, with its own private key; a renewal must keep the Topic (409 otherwise).
#[utoipa::path(put, path = "/api/v1/apple/push-certificate", tag = "apple", request_body = PushCertificateUpload,
    responses((status = 200, body = PushCertificateView), (status = 409), (status = 422)))]
pub async fn upload_push_certificate(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(upload): ApiJson<PushCertificateUpload>,
) -> Result<Json<PushCertificateView>, HttpError> {
    let now = state.clock.now();
    let push = PushCertificate::from_pem(&upload.certificate_pem, &upload.private_key_pem, now).map_err(|error| {
        let field = match error {
            PushCertError::KeyUnreadable(_) | PushCertError::KeyMismatch => "private_key_pem",
            _ => "certificate_pem",
        };
        HttpError {
            field: Some(field),
            ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_push_certificate", error.to_string())
        }
    })?;
    let domain = state.enrollment.clone();
    let stored = blocking(move || {
        domain.save_push_certificate(&admin.actor, &push, &upload.certificate_pem, &upload.private_key_pem)
    })
    .await?;
    Ok(Json(PushCertificateView::new(stored, now)))
}
