//! `/api/v1/devices` (managed devices and their actions) and `/api/v1/staged` (devices registered ahead).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::ToSchema;

use super::users::ListQuery;
use super::{ApiJson, ApiPath, ApiQuery, SignedInAdmin, blocking, no_content};
use crate::domain::{
    AdditionalInvite, CreatedInvite, DeprovisionKind, DeviceQuery, NewStaged, Paged, StagedAssignment,
};
use crate::http::{AppState, HttpError};
use crate::model::{Device, Id, StagedDevice};

/// Managed devices, most recently enrolled first.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(DeviceQuery), responses((status = 200, body = Paged<Device>)))]
pub async fn devices(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DeviceQuery>,
) -> Result<Json<Paged<Device>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.devices(&query)).await?))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = Id, Path)),
    responses((status = 200, body = Device), (status = 404)))]
pub async fn device(State(state): State<AppState>, ApiPath(id): ApiPath<Id>) -> Result<Json<Device>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.device(&id)).await?))
}

/// The user to give a device to.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reassignment {
    pub user_id: Id,
}

/// Give a device to another user.
#[utoipa::path(post, path = "/api/v1/devices/{id}/reassign", tag = "devices", params(("id" = Id, Path)),
    request_body = Reassignment, responses((status = 200, body = Device), (status = 404)))]
pub async fn reassign(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<Reassignment>,
) -> Result<Json<Device>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.reassign_device(&admin.actor, &id, &body.user_id)).await?))
}

/// How to take a device out of management.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deprovision {
    pub kind: DeprovisionKind,
}

/// Queue revoke-MDM (the profile goes, the data stays) or factory reset (corporate devices only).
#[utoipa::path(post, path = "/api/v1/devices/{id}/deprovision", tag = "devices", params(("id" = Id, Path)),
    request_body = Deprovision,
    responses((status = 200, body = Device), (status = 404), (status = 409, description = "factory reset of a personal device, or a device no longer managed")))]
pub async fn deprovision(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<Deprovision>,
) -> Result<Json<Device>, HttpError> {
    let domain = state.enrollment.clone();
    let device = blocking(move || domain.deprovision_device(&admin.actor, &id, body.kind)).await?;
    // An Apple device fetches the command when pushed; others pick it up at their next check-in.
    state.mdm.wake(&state, device.id);
    Ok(Json(device))
}

/// Enroll an additional device for this device's user.
#[utoipa::path(post, path = "/api/v1/devices/{id}/additional-invite", tag = "devices", params(("id" = Id, Path)),
    request_body = AdditionalInvite, responses((status = 201, body = CreatedInvite), (status = 404), (status = 422)))]
pub async fn additional_invite(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<AdditionalInvite>,
) -> Result<(StatusCode, Json<CreatedInvite>), HttpError> {
    let domain = state.enrollment.clone();
    let created = blocking(move || domain.additional_invite_for_device(&admin.actor, &id, &body)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Staged devices, oldest first.
#[utoipa::path(get, path = "/api/v1/staged", tag = "staged", params(ListQuery), responses((status = 200, body = Paged<StagedDevice>)))]
pub async fn staged(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Paged<StagedDevice>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.staged(query.cursor.as_deref(), query.limit.unwrap_or(50))).await?))
}

/// Register a device by serial number and/or IMEI before it enrolls.
#[utoipa::path(post, path = "/api/v1/staged", tag = "staged", request_body = NewStaged,
    responses((status = 201, body = StagedDevice), (status = 404, description = "no such user or group"), (status = 409), (status = 422)))]
pub async fn create_staged(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<NewStaged>,
) -> Result<(StatusCode, Json<StagedDevice>), HttpError> {
    let domain = state.enrollment.clone();
    let staged = blocking(move || domain.create_staged(&admin.actor, &body)).await?;
    Ok((StatusCode::CREATED, Json(staged)))
}

#[utoipa::path(delete, path = "/api/v1/staged/{id}", tag = "staged", params(("id" = Id, Path)),
    responses((status = 204), (status = 404)))]
pub async fn remove_staged(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    blocking(move || domain.remove_staged(&admin.actor, &id)).await?;
    Ok(no_content())
}

/// Assign staged devices to a user and/or group, all or none.
#[utoipa::path(post, path = "/api/v1/staged/assign", tag = "staged", request_body = StagedAssignment,
    responses((status = 200, body = Vec<StagedDevice>), (status = 404), (status = 422)))]
pub async fn assign_staged(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<StagedAssignment>,
) -> Result<Json<Vec<StagedDevice>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.assign_staged(&admin.actor, &body)).await?))
}

/// Re-enroll: a new invite for the staged device's user.
#[utoipa::path(post, path = "/api/v1/staged/{id}/reenroll", tag = "staged", params(("id" = Id, Path)),
    request_body = AdditionalInvite, responses((status = 201, body = CreatedInvite), (status = 404), (status = 422)))]
pub async fn reenroll_staged(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<AdditionalInvite>,
) -> Result<(StatusCode, Json<CreatedInvite>), HttpError> {
    let domain = state.enrollment.clone();
    let created = blocking(move || domain.reenroll_staged(&admin.actor, &id, &body)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}
