//! Signing in and out, first-run setup, sessions and admin accounts, and [`require_admin`]: the layer in front of
//! every protected route (bearer token or session cookie; changes made through the cookie need the CSRF token).

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::{ApiJson, ApiPath, SignedInAdmin, blocking, client_of, no_content};
use crate::domain::Actor;
use crate::domain::auth::{AdminView, SessionView, SignedIn};
use crate::http::{AppState, HttpError};

/// The browser session cookie (HttpOnly, Secure, SameSite=Strict).
/// `__Host-`: the browser takes it only from this host, over HTTPS, for `/`, so no other site can plant one.
pub const SESSION_COOKIE: &str = "__Host-enrolld_session";
/// The header a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The client's address, if the connection told us.
pub struct ClientAddr(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_of(&parts.extensions)))
    }
}

/// Lets a request through only with a live session, and only with the CSRF token when the session came from the
/// cookie and the request changes something.
pub async fn require_admin(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| token.trim().to_owned());
    let (token, via_cookie) = match (bearer, crate::http::cookie(request.headers(), SESSION_COOKIE)) {
        (Some(token), _) => (token, false),
        (None, Some(token)) => (token, true),
        (None, None) => {
            return unauthorized("sign in first: POST /api/v1/login, then send the token as a bearer token");
        }
    };
    let auth = state.auth.clone();
    let lookup = token.clone();
    let session = match blocking(move || auth.session(&lookup)).await {
        Ok(Some(session)) => session,
        Ok(None) => return unauthorized("the session expired or was revoked; sign in again"),
        Err(error) => return error.into_response(),
    };
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if via_cookie && !safe {
        let given = request.headers().get(CSRF_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if !bool::from(given.ct_eq(session.csrf_token.as_bytes())) {
            return HttpError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "this change came without the page's CSRF token; reload the page and try again",
            )
            .into_response();
        }
    }
    let actor = Actor { name: session.username.clone(), client: client_of(request.extensions()) };
    request.extensions_mut().insert(SignedInAdmin { actor, session, token });
    next.run(request).await
}

/// Waits for one of the few password-hashing slots.
async fn password_slot(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, HttpError> {
    state
        .password_checks
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| HttpError::unavailable("enrolld is shutting down; try again in a moment"))
}

fn unauthorized(message: &str) -> Response {
    let mut response = HttpError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Answers a sign-in with the token in the body and the same token as the browser's session cookie.
fn signed_in_response(state: &AppState, signed_in: SignedIn) -> Response {
    let max_age = (signed_in.expires_at - state.clock.now()).whole_seconds().max(0);
    let cookie =
        format!("{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}", signed_in.token);
    let mut response = Json(signed_in).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// A username and password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// Sign in. Returns a bearer token and sets the session cookie. Failed attempts are slowed down per account and
/// client address together and per client address, never per account alone, under a ceiling for the whole box.
#[utoipa::path(post, path = "/api/v1/login", tag = "access", request_body = Credentials, security(()),
    responses((status = 200, body = SignedIn), (status = 401, description = "wrong username or password"),
        (status = 429, description = "too many failed attempts; see Retry-After")))]
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Response, HttpError> {
    let auth = state.auth.clone();
    let _slot = password_slot(&state).await?;
    let signed_in = blocking(move || auth.login(&body.username, &body.password, client)).await?;
    Ok(signed_in_response(&state, signed_in))
}

/// Whether the appliance still waits for its first admin.
#[derive(Debug, Serialize, ToSchema)]
pub struct SetupStatus {
    pub needs_setup: bool,
}

/// Whether first-run setup is still open.
#[utoipa::path(get, path = "/api/v1/setup", tag = "access", security(()), responses((status = 200, body = SetupStatus)))]
pub async fn setup_status(State(state): State<AppState>) -> Result<Json<SetupStatus>, HttpError> {
    let auth = state.auth.clone();
    let needs_setup = blocking(move || auth.needs_setup()).await?;
    Ok(Json(SetupStatus { needs_setup }))
}

/// The first admin's account, claimed with the setup code enrolld shows at start (its log, the box's console).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    pub setup_code: String,
    /// 1 to 64 letters, digits, `.`, `_`, `-` or `@`.
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub username: String,
    /// 10 to 1024 characters.
    #[schema(min_length = 10, max_length = 1024)]
    pub password: String,
}

/// A new admin's username and password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAdmin {
    /// 1 to 64 letters, digits, `.`, `_`, `-` or `@`.
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub username: String,
    /// 10 to 1024 characters.
    #[schema(min_length = 10, max_length = 1024)]
    pub password: String,
}

/// Claim an unconfigured appliance: creates the first admin and signs them in.
#[utoipa::path(post, path = "/api/v1/setup", tag = "access", request_body = SetupRequest, security(()),
    responses((status = 200, body = SignedIn), (status = 403, description = "wrong setup code"),
        (status = 409, description = "already set up")))]
pub async fn setup(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(body): ApiJson<SetupRequest>,
) -> Result<Response, HttpError> {
    let auth = state.auth.clone();
    let _slot = password_slot(&state).await?;
    let signed_in = blocking(move || auth.setup(&body.setup_code, &body.username, &body.password, client)).await?;
    Ok(signed_in_response(&state, signed_in))
}

/// Sign out: ends this session and clears the cookie.
#[utoipa::path(post, path = "/api/v1/logout", tag = "access", responses((status = 204)))]
pub async fn logout(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
) -> Result<Response, HttpError> {
    let auth = state.auth.clone();
    blocking(move || auth.logout(&admin.actor, &admin.token)).await?;
    let mut response = no_content();
    let cleared = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&cleared) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// Every live session (browser sessions and script tokens).
#[utoipa::path(get, path = "/api/v1/sessions", tag = "access", responses((status = 200, body = Vec<SessionView>)))]
pub async fn sessions(State(state): State<AppState>) -> Result<Json<Vec<SessionView>>, HttpError> {
    let auth = state.auth.clone();
    Ok(Json(blocking(move || auth.sessions()).await?))
}

/// Revoke a session or token; it stops working at once.
#[utoipa::path(delete, path = "/api/v1/sessions/{id}", tag = "access", params(("id" = String, Path)),
    responses((status = 204), (status = 404)))]
pub async fn revoke_session(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, HttpError> {
    let auth = state.auth.clone();
    blocking(move || auth.revoke(&admin.actor, &id)).await?;
    Ok(no_content())
}

/// Admin accounts.
#[utoipa::path(get, path = "/api/v1/admins", tag = "access", responses((status = 200, body = Vec<AdminView>)))]
pub async fn admins(State(state): State<AppState>) -> Result<Json<Vec<AdminView>>, HttpError> {
    let auth = state.auth.clone();
    Ok(Json(blocking(move || auth.admins()).await?))
}

/// Add an admin.
#[utoipa::path(post, path = "/api/v1/admins", tag = "access", request_body = NewAdmin,
    responses((status = 201, body = AdminView), (status = 409), (status = 422)))]
pub async fn create_admin(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<NewAdmin>,
) -> Result<(StatusCode, Json<AdminView>), HttpError> {
    let auth = state.auth.clone();
    let _slot = password_slot(&state).await?;
    let created = blocking(move || auth.create_admin(&admin.actor, &body.username, &body.password)).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Delete an admin and end their sessions; the last admin stays.
#[utoipa::path(delete, path = "/api/v1/admins/{username}", tag = "access", params(("username" = String, Path)),
    responses((status = 204), (status = 404), (status = 409)))]
pub async fn delete_admin(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(username): ApiPath<String>,
) -> Result<Response, HttpError> {
    let auth = state.auth.clone();
    blocking(move || auth.delete_admin(&admin.actor, &username)).await?;
    Ok(no_content())
}

/// A new password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPassword {
    /// 10 to 1024 characters.
    #[schema(min_length = 10, max_length = 1024)]
    pub password: String,
}

/// Set an admin's password; their sessions end.
#[utoipa::path(post, path = "/api/v1/admins/{username}/password", tag = "access", params(("username" = String, Path)),
    request_body = NewPassword, responses((status = 204), (status = 404), (status = 422)))]
pub async fn set_admin_password(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiPath(username): ApiPath<String>,
    ApiJson(body): ApiJson<NewPassword>,
) -> Result<Response, HttpError> {
    let auth = state.auth.clone();
    let _slot = password_slot(&state).await?;
    blocking(move || auth.change_password(&admin.actor, &username, &body.password)).await?;
    Ok(no_content())
}
