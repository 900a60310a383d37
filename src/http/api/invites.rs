//! `/api/v1/invites`: list with filters and cursors, create, resend, remove, "enroll additional device",
//! "by myself", and bulk resend/remove.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::{ApiJson, ApiPath, ApiQuery, SignedInAdmin, blocking};
use crate::domain::{
    AdditionalInvite, BulkOutcome, BulkSelection, CreatedInvite, InviteQuery, InviteView, NewInvite, Paged,
};
use crate::http::{AppState, HttpError};
use crate::model::Id;

/// Invites, newest requested first, filtered by status, platform, group, user and text.
#[utoipa::path(get, path = "/api/v1/invites", tag = "invites", params(InviteQuery),
    responses((status = 200, body = Paged<InviteView>), (status = 422)))]
pub async fn invites(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<InviteQuery>,
) -> Result<Json<Paged<InviteView>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.invites(&query)).await?))
}

/// Invite a user to enroll one device; delivery is queued in the same transaction.
#[utoipa::path(post, path = "/api/v1/invites", tag = "invites", request_body = NewInvite,
    responses((status = 201, body = CreatedInvite), (status = 404), (status = 422)))]
pub async fn create_invite(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<NewInvite>,
) -> Result<(StatusCode, Json<CreatedInvite>), HttpError> {
    let domain = state.enrollment.clone();
    let created = blocking(move || domain.create_invite(&admin.actor, &body)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/api/v1/invites/{id}", tag = "invites", params(("id" = Id, Path)),
    responses((status = 200, body = InviteView), (status = 404)))]
pub async fn invite(State(state): State<AppState>, ApiPath(id): ApiPath<Id>) -> Result<Json<InviteView>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.invite(&id)).await?))
}

/// New link and passcode (the old ones stop working at once), validity restarted, delivery queued again.
#[utoipa::path(post, path = "/api/v1/invites/{id}/resend", tag = "invites", params(("id" = Id, Path)),
    responses((status = 200, body = CreatedInvite), (status = 404), (status = 409)))]
pub async fn resend(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
) -> Result<Json<CreatedInvite>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.resend_invite(&admin.actor, &id)).await?))
}

/// Cancel an invite; its link answers "removed" from then on.
#[utoipa::path(post, path = "/api/v1/invites/{id}/remove", tag = "invites", params(("id" = Id, Path)),
    responses((status = 200, body = InviteView), (status = 404), (status = 409)))]
pub async fn remove(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
) -> Result<Json<InviteView>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.remove_invite(&admin.actor, &id)).await?))
}

/// Enroll an additional device: a new invite for the same user; the existing invites stay valid.
#[utoipa::path(post, path = "/api/v1/invites/{id}/additional", tag = "invites", params(("id" = Id, Path)),
    request_body = AdditionalInvite, responses((status = 201, body = CreatedInvite), (status = 404)))]
pub async fn additional(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<AdditionalInvite>,
) -> Result<(StatusCode, Json<CreatedInvite>), HttpError> {
    let domain = state.enrollment.clone();
    let created = blocking(move || domain.additional_invite(&admin.actor, &id, &body)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// An invite for the admin's own test device: the link token and passcode come back in the answer, nothing is
/// sent.
#[utoipa::path(post, path = "/api/v1/invites/by-myself", tag = "invites", request_body = NewInvite,
    responses((status = 201, body = CreatedInvite), (status = 404, description = "no such user or group")))]
pub async fn by_myself(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<NewInvite>,
) -> Result<(StatusCode, Json<CreatedInvite>), HttpError> {
    let domain = state.enrollment.clone();
    let created = blocking(move || domain.create_invite_by_myself(&admin.actor, &body)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Resend every selected invite (by ids or by filter), with a result per invite.
#[utoipa::path(post, path = "/api/v1/invites/bulk/resend", tag = "invites", request_body = BulkSelection,
    responses((status = 200, body = Vec<BulkOutcome>), (status = 422)))]
pub async fn bulk_resend(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<BulkSelection>,
) -> Result<Json<Vec<BulkOutcome>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.bulk_resend(&admin.actor, &body)).await?))
}

/// Remove every selected invite (by ids or by filter), with a result per invite.
#[utoipa::path(post, path = "/api/v1/invites/bulk/remove", tag = "invites", request_body = BulkSelection,
    responses((status = 200, body = Vec<BulkOutcome>), (status = 422)))]
pub async fn bulk_remove(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<BulkSelection>,
) -> Result<Json<Vec<BulkOutcome>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.bulk_remove(&admin.actor, &body)).await?))
}
