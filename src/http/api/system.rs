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
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
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
