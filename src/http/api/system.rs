//! `/api/v1/dashboard`, `/api/v1/audit` and `/api/v1/openapi.json`.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiQuery, blocking};
use crate::domain::{DashboardCounts, Paged};
use crate::http::{AppState, HttpError};
use crate::model::AuditEvent;

/// Counts of pending, expired, enrolled, unmanaged and staged, plus users and queued messages.
#[utoipa::path(get, path = "/api/v1/dashboard", tag = "system", responses((status = 200, body = DashboardCounts)))]
pub async fn dashboard(State(state): State<AppState>) -> Result<Json<DashboardCounts>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.dashboard()).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    #[param(pattern = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$")]
    #[serde(default, deserialize_with = "crate::domain::page_cursor")]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    #[serde(default, deserialize_with = "crate::domain::page_limit")]
    pub limit: Option<usize>,
}

/// The audit log, newest first: every admin action and enrollment event, with time, actor and client address.
#[utoipa::path(get, path = "/api/v1/audit", tag = "system", params(AuditQuery), responses((status = 200, body = Paged<AuditEvent>)))]
pub async fn audit(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Paged<AuditEvent>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.audit_log(query.cursor.as_deref(), query.limit.unwrap_or(50))).await?))
}

/// This document: the OpenAPI 3.1 description of the admin API, generated from the code that serves it.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system", responses((status = 200, description = "OpenAPI 3.1 JSON")))]
pub async fn openapi_document(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.openapi.get().cloned().unwrap_or_default())
}

/// Where an upgrade of the appliance stands: the version it runs, and the last bundle uploaded and what the
/// installer made of it.
#[utoipa::path(get, path = "/api/v1/system/upgrade", tag = "system",
    responses((status = 200, body = crate::upgrade::UpgradeStatus)))]
pub async fn upgrade_status(State(state): State<AppState>) -> Json<crate::upgrade::UpgradeStatus> {
    Json(upgrade_view(&state))
}

pub(crate) fn upgrade_view(state: &AppState) -> crate::upgrade::UpgradeStatus {
    match &state.upgrades {
        Some(upgrades) => upgrades.status(),
        None => crate::upgrade::UpgradeStatus {
            running: None,
            state: crate::upgrade::UpgradeState::Idle,
            version: None,
            message: None,
            at: None,
        },
    }
}

/// Install an upgrade bundle on the appliance (`enrolld-<arch>.update`, made with its image; the request body).
/// The box checks that it is for this box, keeps it and hands it to its installer, which verifies the bundle's
/// signature and checksums, writes the other root slot and restarts the box into it; the database stays and is
/// migrated by the new version. Poll `GET /api/v1/system/upgrade` for how it went.
#[utoipa::path(put, path = "/api/v1/system/upgrade", tag = "system",
    request_body(content = String, content_type = "application/octet-stream", description = "The upgrade bundle"),
    responses((status = 202, body = crate::upgrade::UpgradeStatus, description = "handed to the installer"),
        (status = 409, description = "not the appliance image, or an upgrade is under way"),
        (status = 413, description = "larger than any bundle"),
        (status = 422, description = "not a bundle for this box"),
        (status = 507, description = "the box has no room for it")))]
pub async fn upload_upgrade(
    State(state): State<AppState>,
    axum::Extension(admin): axum::Extension<crate::http::api::SignedInAdmin>,
    mut body: axum::body::Body,
) -> Result<(axum::http::StatusCode, Json<crate::upgrade::UpgradeStatus>), HttpError> {
    use http_body_util::BodyExt;
    let mut receiver = UpgradeReceiver::begin(&state).await?;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    receiver.write(data).await?;
                }
            }
            Err(error) => return Err(receiver.broken_off(&error)),
        }
    }
    receiver.finish(&state, &admin.actor).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(upgrade_view(&state))))
}

/// An upload on its way into the upgrade directory; shared with the Settings page. Dropped without `finish`, the
/// partial file stays until the next upload replaces it.
pub(crate) struct UpgradeReceiver {
    upgrades: std::sync::Arc<crate::upgrade::Upgrades>,
    upload: Option<crate::upgrade::Upload>,
}

impl UpgradeReceiver {
    pub(crate) async fn begin(state: &AppState) -> Result<UpgradeReceiver, HttpError> {
        use crate::upgrade::UpgradeError;
        let upgrades = state.upgrades.clone().ok_or_else(|| upgrade_error(UpgradeError::NotAppliance))?;
        let background = upgrades.clone();
        let upload = blocking_upgrade(move || background.begin()).await?;
        Ok(UpgradeReceiver { upgrades, upload: Some(upload) })
    }

    pub(crate) async fn write(&mut self, chunk: axum::body::Bytes) -> Result<(), HttpError> {
        let Some(mut upload) = self.upload.take() else {
            return Err(HttpError::unavailable("the upload could not be kept; upload the bundle again"));
        };
        let (upload, written) = tokio::task::spawn_blocking(move || {
            let written = upload.write(&chunk);
            (upload, written)
        })
        .await
        .map_err(|_| HttpError::unavailable("the upload could not be kept; upload the bundle again"))?;
        match written {
            Ok(()) => {
                self.upload = Some(upload);
                Ok(())
            }
            Err(error) => {
                upload.discard();
                Err(upgrade_error(error))
            }
        }
    }

    /// The client's upload broke off: the partial file goes.
    pub(crate) fn broken_off(mut self, error: &dyn std::fmt::Display) -> HttpError {
        if let Some(upload) = self.upload.take() {
            upload.discard();
        }
        HttpError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "upload_failed",
            format!("the upload broke off ({error}); upload the bundle again"),
        )
    }

    /// Checks the complete upload and hands it to the installer, with an audit entry.
    pub(crate) async fn finish(
        mut self,
        state: &AppState,
        actor: &crate::domain::Actor,
    ) -> Result<crate::upgrade::Release, HttpError> {
        let upload =
            self.upload.take().ok_or_else(|| HttpError::unavailable("the upload could not be kept; try again"))?;
        let (upgrades, by) = (self.upgrades.clone(), actor.name.clone());
        let release = blocking_upgrade(move || upgrades.submit(upload, &by)).await?;
        let (domain, actor, version) = (state.enrollment.clone(), actor.clone(), release.version.clone());
        let detail = format!("an upgrade to {version} was handed to the installer");
        blocking(move || domain.record(&actor, "upgrade.uploaded", Some(version), &detail)).await?;
        tracing::info!(version = %release.version, "an upgrade bundle was uploaded; the installer takes it from here");
        Ok(release)
    }
}

async fn blocking_upgrade<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::upgrade::UpgradeError> + Send + 'static,
) -> Result<T, HttpError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(upgrade_error),
        Err(_) => Err(HttpError::unavailable("the upload could not be kept; try again")),
    }
}

fn upgrade_error(error: crate::upgrade::UpgradeError) -> HttpError {
    use crate::upgrade::UpgradeError;
    use axum::http::StatusCode;
    let (status, code) = match &error {
        UpgradeError::NotAppliance => (StatusCode::CONFLICT, "not_appliance"),
        UpgradeError::Busy(_) => (StatusCode::CONFLICT, "upgrade_under_way"),
        UpgradeError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        UpgradeError::NotABundle(_) => (StatusCode::UNPROCESSABLE_ENTITY, "not_a_bundle"),
        UpgradeError::WrongArch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_architecture"),
        UpgradeError::SameVersion(_) => (StatusCode::UNPROCESSABLE_ENTITY, "same_version"),
        UpgradeError::Io(_) => (StatusCode::INSUFFICIENT_STORAGE, "not_kept"),
    };
    HttpError { field: Some("file"), ..HttpError::new(status, code, error.to_string()) }
}
