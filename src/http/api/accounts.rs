//! How users authenticate on the enrollment page (`/api/v1/settings/enroll-auth`), and users' own passwords: a
//! one-time link an admin hands over (`/api/v1/users/{id}/account-link`) and resetting one
//! (`/api/v1/users/{id}/account`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::{ApiJson, ApiPath, SignedInAdmin, blocking, no_content};
use crate::http::{AppState, HttpError};
use crate::model::{EnrollAuth, Id};

/// How users authenticate, and where that choice comes from.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollAuthView {
    /// `passcode` (the invite's), `password` (the user's own) or `both`.
    pub method: EnrollAuth,
    /// `saved` (an admin chose it here) or `configuration` (`enroll_auth`, or the default).
    #[serde(default)]
    pub source: String,
}

fn view(state: &AppState, method: EnrollAuth) -> Result<EnrollAuthView, HttpError> {
    let saved = state.enrollment.settings(crate::domain::ENROLL_AUTH_SETTING)?.into_iter().next().is_some();
    Ok(EnrollAuthView { method, source: if saved { "saved" } else { "configuration" }.into() })
}

/// How users authenticate on the enrollment page.
#[utoipa::path(get, path = "/api/v1/settings/enroll-auth", tag = "settings", responses((status = 200, body = EnrollAuthView)))]
pub async fn enroll_auth(State(state): State<AppState>) -> Result<Json<EnrollAuthView>, HttpError> {
    let domain = state.enrollment.clone();
    let method = blocking(move || domain.enroll_auth()).await?;
    Ok(Json(view(&state, method)?))
}

/// Choose how users authenticate; wins over the configuration until removed.
#[utoipa::path(put, path = "/api/v1/settings/enroll-auth", tag = "settings", request_body = EnrollAuthView,
    responses((status = 200, body = EnrollAuthView), (status = 422)))]
pub async fn save_enroll_auth(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<EnrollAuthView>,
) -> Result<Json<EnrollAuthView>, HttpError> {
    let domain = state.enrollment.clone();
    let method = blocking(move || domain.set_enroll_auth(&admin.actor, Some(body.method))).await?;
    Ok(Json(view(&state, method)?))
}

/// Forget the saved choice: the configuration's applies again.
#[utoipa::path(delete, path = "/api/v1/settings/enroll-auth", tag = "settings", responses((status = 200, body = EnrollAuthView)))]
pub async fn reset_enroll_auth(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
) -> Result<Json<EnrollAuthView>, HttpError> {
    let domain = state.enrollment.clone();
    let method = blocking(move || domain.set_enroll_auth(&admin.actor, None)).await?;
    Ok(Json(view(&state, method)?))
}

/// A one-time link for the user to set their password.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountLinkView {
    /// The whole link, to hand to the user; it works once, for 24 hours.
    pub url: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Make a one-time link for this user to set (or change) their enrollment password.
#[utoipa::path(post, path = "/api/v1/users/{id}/account-link", tag = "users", params(("id" = Id, Path)),
    responses((status = 201, body = AccountLinkView), (status = 404)))]
pub async fn account_link(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
) -> Result<(StatusCode, Json<AccountLinkView>), HttpError> {
    let domain = state.enrollment.clone();
    let created = blocking(move || domain.account_link(&admin.actor, &id)).await?;
    let url = format!("{}{}", state.naming.public_url(), created.path);
    Ok((StatusCode::CREATED, Json(AccountLinkView { url, expires_at: created.expires_at })))
}

/// Remove the user's password; they set a new one through a new link.
#[utoipa::path(delete, path = "/api/v1/users/{id}/account", tag = "users", params(("id" = Id, Path)),
    responses((status = 204), (status = 404)))]
pub async fn reset_account(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<Id>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    blocking(move || domain.reset_account(&admin.actor, &id)).await?;
    Ok(no_content())
}
