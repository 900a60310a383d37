//! `/api/v1/users` and `/api/v1/groups`, with "invite a group".

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiJson, ApiPath, ApiQuery, SignedInAdmin, blocking, no_content};
use crate::domain::{GroupInvitePlan, GroupInviteResult, NewGroup, NewUser, Paged, UserChoiceForDevices, UserPatch};
use crate::http::{AppState, HttpError};
use crate::model::{Group, Id, User};

/// Paging and search for lists.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Text to look for.
    pub q: Option<String>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$")]
    #[serde(default, deserialize_with = "crate::domain::page_cursor")]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    #[serde(default, deserialize_with = "crate::domain::page_limit")]
    pub limit: Option<usize>,
}

/// Users, oldest first; `q` searches names and emails.
#[utoipa::path(get, path = "/api/v1/users", tag = "users", params(ListQuery), responses((status = 200, body = Paged<User>)))]
pub async fn users(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Paged<User>>, HttpError> {
    let domain = state.enrollment.clone();
    let page =
        blocking(move || domain.users(query.q.as_deref(), query.cursor.as_deref(), query.limit.unwrap_or(50))).await?;
    Ok(Json(page))
}

/// Create a user (emails are unique, whatever their case).
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = User), (status = 404, description = "a group in `groups` does not exist"),
        (status = 409, description = "email taken"), (status = 422)))]
pub async fn create_user(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<(StatusCode, Json<User>), HttpError> {
    let domain = state.enrollment.clone();
    let user = blocking(move || domain.create_user(&admin.actor, &body)).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", params(("id" = Id, Path)),
    responses((status = 200, body = User), (status = 404)))]
pub async fn user(State(state): State<AppState>, ApiPath(id): ApiPath<Id>) -> Result<Json<User>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.user(&id)).await?))
}

/// Change a user; absent fields stay, `null` clears phone or domain.
#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "users", params(("id" = Id, Path)), request_body = UserPatch,
    responses((status = 200, body = User), (status = 404), (status = 409), (status = 422)))]
pub async fn update_user(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<UserPatch>,
) -> Result<Json<User>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.update_user(&admin.actor, &id, &body)).await?))
}

/// What to do with the user's managed devices.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteUserQuery {
    /// Required when the user has managed devices: `unassign` keeps them managed without a user, `revoke_mdm`
    /// takes them out of management.
    #[param(inline)]
    pub managed_devices: Option<UserChoiceForDevices>,
}

/// Delete a user; their open invites are removed.
#[utoipa::path(delete, path = "/api/v1/users/{id}", tag = "users", params(("id" = Id, Path), DeleteUserQuery),
    responses((status = 204), (status = 404), (status = 409, description = "the user has managed devices and no choice was given")))]
pub async fn delete_user(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiQuery(query): ApiQuery<DeleteUserQuery>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    blocking(move || domain.delete_user(&admin.actor, &id, query.managed_devices)).await?;
    Ok(no_content())
}

/// Groups, oldest first.
#[utoipa::path(get, path = "/api/v1/groups", tag = "groups", params(ListQuery), responses((status = 200, body = Paged<Group>)))]
pub async fn groups(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Paged<Group>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.groups(query.cursor.as_deref(), query.limit.unwrap_or(50))).await?))
}

#[utoipa::path(post, path = "/api/v1/groups", tag = "groups", request_body = NewGroup,
    responses((status = 201, body = Group), (status = 409), (status = 422)))]
pub async fn create_group(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<NewGroup>,
) -> Result<(StatusCode, Json<Group>), HttpError> {
    let domain = state.enrollment.clone();
    let group = blocking(move || domain.create_group(&admin.actor, &body)).await?;
    Ok((StatusCode::CREATED, Json(group)))
}

#[utoipa::path(get, path = "/api/v1/groups/{id}", tag = "groups", params(("id" = Id, Path)),
    responses((status = 200, body = Group), (status = 404)))]
pub async fn group(State(state): State<AppState>, ApiPath(id): ApiPath<Id>) -> Result<Json<Group>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.group(&id)).await?))
}

/// Rename a group or change its description.
#[utoipa::path(put, path = "/api/v1/groups/{id}", tag = "groups", params(("id" = Id, Path)), request_body = NewGroup,
    responses((status = 200, body = Group), (status = 404), (status = 409)))]
pub async fn update_group(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<NewGroup>,
) -> Result<Json<Group>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.update_group(&admin.actor, &id, &body)).await?))
}

/// Delete a group; its invites, devices and members carry on without it.
#[utoipa::path(delete, path = "/api/v1/groups/{id}", tag = "groups", params(("id" = Id, Path)),
    responses((status = 204), (status = 404)))]
pub async fn delete_group(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    blocking(move || domain.delete_group(&admin.actor, &id)).await?;
    Ok(no_content())
}

/// Invite the group's members who were never invited, or who were invited but have not enrolled. With
/// `dry_run: true` it only says how many invites it would create.
#[utoipa::path(post, path = "/api/v1/groups/{id}/invite", tag = "groups", params(("id" = Id, Path)),
    request_body = GroupInvitePlan, responses((status = 200, body = GroupInviteResult), (status = 404)))]
pub async fn invite_group(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
    ApiJson(body): ApiJson<GroupInvitePlan>,
) -> Result<Json<GroupInviteResult>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.invite_group(&admin.actor, &id, &body)).await?))
}
