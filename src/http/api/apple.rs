//! `/api/v1/apple/push-certificate`: the Apple MDM push certificate, uploaded as PEM or PKCS#12, shown with its Topic and
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
use crate::pki::push::{self, PushCertError, PushCertificate};

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

/// The push certificate with its key: either as two PEM texts, or as the PKCS#12 file (`.p12`) Keychain Access
/// exports, base64-encoded, with its password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushCertificateUpload {
    /// The certificate from Apple's Push Certificates Portal, PEM.
    pub certificate_pem: Option<String>,
    /// The private key the certificate request was made with, PEM (PKCS#8, or PKCS#1 RSA).
    pub private_key_pem: Option<String>,
    /// The certificate and its key as a PKCS#12 file, base64.
    pub pkcs12_base64: Option<String>,
    /// The PKCS#12 file's password.
    pub pkcs12_password: Option<String>,
}

fn invalid(field: &'static str, message: String) -> HttpError {
    HttpError {
        field: Some(field),
        ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_push_certificate", message)
    }
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
    let from_pkcs12 = upload.pkcs12_base64.is_some();
    let (certificate_pem, private_key_pem) = match upload {
        PushCertificateUpload {
            certificate_pem: Some(cert), private_key_pem: Some(key), pkcs12_base64: None, ..
        } => (cert, key),
        PushCertificateUpload {
            certificate_pem: None,
            private_key_pem: None,
            pkcs12_base64: Some(p12),
            pkcs12_password,
        } => {
            use base64::Engine as _;
            let der = base64::engine::general_purpose::STANDARD
                .decode(p12.split_ascii_whitespace().collect::<String>())
                .map_err(|e| invalid("pkcs12_base64", format!("it is not base64 ({e})")))?;
            push::pem_from_pkcs12(&der, pkcs12_password.as_deref().unwrap_or_default())
                .map_err(|e| invalid("pkcs12_base64", e.to_string()))?
        }
        _ => {
            return Err(invalid(
                "certificate_pem",
                "give either certificate_pem with private_key_pem, or pkcs12_base64 (with pkcs12_password)".into(),
            ));
        }
    };
    let push = PushCertificate::from_pem(&certificate_pem, &private_key_pem, now).map_err(|error| {
        let field = match error {
            _ if from_pkcs12 => "pkcs12_base64",
            PushCertError::KeyUnreadable(_) | PushCertError::KeyMismatch => "private_key_pem",
            _ => "certificate_pem",
        };
        invalid(field, error.to_string())
    })?;
    let domain = state.enrollment.clone();
    let stored =
        blocking(move || domain.save_push_certificate(&admin.actor, &push, &certificate_pem, &private_key_pem)).await?;
    Ok(Json(PushCertificateView::new(stored, now)))
}
