//! The admin JSON API under `/api/v1`.
//!
//! Every route is registered through utoipa-axum's `routes!`, which adds the handler to the router and its
//! description to the OpenAPI document in one step, so `/api/v1/openapi.json` cannot drift from what is served.
//! All routes but sign-in and first-run setup sit behind [`require_admin`], applied as a layer to the whole
//! protected router rather than per handler.

pub(crate) mod access;
mod accounts;
pub(crate) mod android;
mod apple;
pub(crate) mod backup;
mod devices;
pub(crate) mod imports;
mod invites;
pub(crate) mod mail;
pub(crate) mod system;
mod users;

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, middleware};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use access::{SESSION_COOKIE, require_admin};

use super::{AppState, HttpError};
use crate::domain::auth::AuthError;
use crate::domain::{Actor, DomainError};
use crate::model::Session;

/// The API's routes and its OpenAPI document.
pub struct Routers {
    /// Every route but uploads, under the common body limit.
    pub api: Router<AppState>,
    /// Routes that take large uploads (upgrade bundles), which the caller gives their own limits.
    pub uploads: Router<AppState>,
    /// The routes' description, from which the document is served.
    pub openapi: utoipa::openapi::OpenApi,
}

/// The OpenAPI document: the routes' description, kept as the router is built, and the JSON served, with what
/// utoipa's types cannot hold (see [`refine_schemas`]), made from it on first request: turning the description into
/// JSON and walking it was about a fifth of `daemon::run` before READY (perf, on the host).
#[derive(Default)]
pub struct OpenApiDocument {
    described: OnceLock<utoipa::openapi::OpenApi>,
    served: OnceLock<serde_json::Value>,
}

impl std::fmt::Debug for OpenApiDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenApiDocument").field("served", &self.served.get().is_some()).finish_non_exhaustive()
    }
}

impl OpenApiDocument {
    /// Keeps the description of the routes being served (the first one given, as the router is built once).
    pub fn describe(&self, described: utoipa::openapi::OpenApi) {
        let _ = self.described.set(described);
    }

    /// The document as served; `None` before a router was built.
    pub fn get(&self) -> Option<&serde_json::Value> {
        let described = self.described.get()?;
        Some(self.served.get_or_init(|| declare_common_answers(described)))
    }
}

/// The API's routes and its OpenAPI document.
pub fn router(state: AppState) -> Routers {
    let protected = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(access::logout))
        .routes(routes!(access::sessions))
        .routes(routes!(access::revoke_session))
        .routes(routes!(access::admins, access::create_admin))
        .routes(routes!(access::delete_admin))
        .routes(routes!(access::set_admin_password))
        .routes(routes!(users::users, users::create_user))
        .routes(routes!(users::user, users::update_user, users::delete_user))
        .routes(routes!(users::groups, users::create_group))
        .routes(routes!(users::group, users::update_group, users::delete_group))
        .routes(routes!(users::invite_group))
        .routes(routes!(invites::invites, invites::create_invite))
        .routes(routes!(invites::invite))
        .routes(routes!(invites::resend))
        .routes(routes!(invites::remove))
        .routes(routes!(invites::additional))
        .routes(routes!(invites::by_myself))
        .routes(routes!(invites::bulk_resend))
        .routes(routes!(invites::bulk_remove))
        .routes(routes!(devices::devices))
        .routes(routes!(devices::device))
        .routes(routes!(devices::reassign))
        .routes(routes!(devices::deprovision))
        .routes(routes!(devices::additional_invite))
        .routes(routes!(devices::staged, devices::create_staged))
        .routes(routes!(devices::remove_staged))
        .routes(routes!(devices::assign_staged))
        .routes(routes!(devices::reenroll_staged))
        .routes(routes!(android::app, android::save_app, android::remove_app))
        .routes(routes!(android::upload_apk))
        .routes(routes!(imports::upload, imports::imports))
        .routes(routes!(imports::import))
        .routes(routes!(imports::sample))
        .routes(routes!(imports::export_invites))
        .routes(routes!(imports::export_staged))
        .routes(routes!(imports::export_devices))
        .routes(routes!(apple::push_certificate, apple::upload_push_certificate))
        .routes(routes!(accounts::enroll_auth, accounts::save_enroll_auth, accounts::reset_enroll_auth))
        .routes(routes!(accounts::account_link))
        .routes(routes!(accounts::reset_account))
        .routes(routes!(mail::status))
        .routes(routes!(mail::save_relay, mail::reset_relay))
        .routes(routes!(mail::send_test))
        .routes(routes!(mail::templates))
        .routes(routes!(mail::save_template, mail::reset_template))
        .routes(routes!(mail::preview))
        .routes(routes!(system::dashboard))
        .routes(routes!(backup::backup))
        .routes(routes!(system::audit))
        .routes(routes!(system::openapi_document))
        .routes(routes!(system::upgrade_status))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let (uploads, uploads_doc) = OpenApiRouter::new()
        .routes(routes!(system::upload_upgrade))
        .route_layer(middleware::from_fn_with_state(state, require_admin))
        .split_for_parts();
    let public = OpenApiRouter::new()
        .routes(routes!(access::login))
        .routes(routes!(access::setup_status, access::setup))
        .routes(routes!(crate::http::android::enroll))
        .routes(routes!(crate::http::android::checkin))
        .layer(axum::extract::DefaultBodyLimit::max(crate::http::android::MAX_BODY_BYTES));
    let (api, mut openapi) = protected.merge(public).split_for_parts();
    openapi.merge(uploads_doc);
    Routers { api, uploads, openapi }
}

/// Adds to every operation the answers the shared layers and extractors give, which the handlers' own
/// declarations leave out: 401 (and 403 for a change without the CSRF header) from [`require_admin`], 400, 413,
/// 415 and 422 from [`ApiJson`], 404 from [`ApiPath`], 422 from [`ApiQuery`]; each with the [`HttpError`] body.
fn declare_common_answers(openapi: &utoipa::openapi::OpenApi) -> serde_json::Value {
    let Ok(mut document) = serde_json::to_value(openapi) else { return serde_json::Value::Null };
    let error = serde_json::json!({
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "a stable code such as `not_found`"},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "the field the problem concerns"}
        }
    });
    if let Some(schemas) = document.pointer_mut("/components/schemas").and_then(|v| v.as_object_mut()) {
        schemas.insert("Error".into(), error);
    }
    refine_schemas(&mut document);
    let Some(paths) = document.get_mut("paths").and_then(|v| v.as_object_mut()) else { return document };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for (method, operation) in item.iter_mut() {
            if !matches!(method.as_str(), "get" | "put" | "post" | "delete" | "patch") {
                continue;
            }
            let public = PUBLIC_ROUTES.contains(&(method.as_str(), path.as_str()));
            let parameters_in = |place: &str| {
                operation["parameters"].as_array().is_some_and(|all| all.iter().any(|p| p["in"] == place))
            };
            let (in_path, in_query) = (parameters_in("path"), parameters_in("query"));
            let json_body = operation.pointer("/requestBody/content/application~1json").is_some();
            let mut answers: Vec<(&str, &str)> = Vec::new();
            if !public {
                answers.push(("401", "not signed in, or the session expired or was revoked"));
                if method != "get" {
                    answers.push(("403", "a change sent with the session cookie but without its X-CSRF-Token"));
                }
            }
            if json_body {
                answers.extend([
                    ("400", "the body is not JSON"),
                    ("413", "the body is larger than the limit"),
                    ("415", "the body is not sent as application/json"),
                    ("422", "a field is missing or invalid (`field` names it)"),
                ]);
            }
            if in_path {
                answers.push(("404", "no such record"));
            }
            if in_query {
                answers.push(("422", "a query parameter is invalid"));
            }
            let Some(responses) = operation.get_mut("responses").and_then(|v| v.as_object_mut()) else { continue };
            for (status, description) in answers {
                responses.entry(status).or_insert_with(|| {
                    serde_json::json!({
                        "description": description,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                    })
                });
            }
        }
    }
    document
}

/// Adds to the request schemas the rules utoipa's types cannot carry (see [`schema_refinements`]), and names the
/// mail templates' path parameter by the parts there are.
fn refine_schemas(document: &mut serde_json::Value) {
    use serde_json::json;
    let Some(schemas) = document.pointer_mut("/components/schemas").and_then(|v| v.as_object_mut()) else { return };
    // A name that matches nothing is skipped here; `every_refinement_names_what_is_there` fails on it.
    for (name, extra) in schema_refinements() {
        let (Some(schema), Some(extra)) = (schemas.get_mut(name).and_then(|s| s.as_object_mut()), extra.as_object())
        else {
            continue;
        };
        for (key, value) in extra {
            if key == "properties" {
                let Some(properties) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) else { continue };
                for (property, rules) in value.as_object().into_iter().flatten() {
                    let Some(target) = properties.get_mut(property).and_then(|t| t.as_object_mut()) else { continue };
                    for (rule, rule_value) in rules.as_object().into_iter().flatten() {
                        target.insert(rule.clone(), rule_value.clone());
                    }
                }
            } else {
                schema.insert(key.clone(), value.clone());
            }
        }
    }
    // Files sent as the body are bytes of their media type, not JSON values (utoipa describes `Vec<u8>` as an array
    // of integers): no schema. A CSV upload is any bytes: an empty or broken file makes a job whose report says what
    // is wrong, so no body is refused for its content.
    for file in [
        "/paths/~1api~1v1~1imports/post/requestBody/content/text~1csv",
        "/paths/~1api~1v1~1settings~1android~1apk/put/requestBody/content/application~1vnd.android.package-archive",
    ] {
        if let Some(content) = document.pointer_mut(file).and_then(|v| v.as_object_mut()) {
            content.remove("schema");
        }
    }
    // A template is named by one of its parts.
    let Some(template) =
        document.pointer_mut("/paths/~1api~1v1~1mail~1templates~1{name}").and_then(|v| v.as_object_mut())
    else {
        return;
    };
    for operation in template.values_mut() {
        for parameter in operation.get_mut("parameters").and_then(|p| p.as_array_mut()).into_iter().flatten() {
            if parameter["in"] == "path" && parameter["name"] == "name" {
                parameter["schema"] = json!({"type": "string", "enum": crate::mail::templates::PARTS});
            }
        }
    }
}

/// One line of text, as the domain's `required_text` takes it: no control characters (Unicode Cc), and not only
/// white space.
const LINE: &str = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$";
/// An optional line (`optional_field`): blank is none, anything else is a [`LINE`].
const OPTIONAL_LINE: &str = r"^[^\x00-\x1f\x7f-\x9f]*$";
/// Text over several lines (`multi_line_text`): line breaks and tabs are its only control characters.
const LINES: &str = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$";
/// A phone number in international form (`normalize_phone`): `+`, 8 to 15 digits not starting with 0, spaces,
/// dots, dashes and parentheses between them; blank is none.
const PHONE: &str = r"^\s*(?:[ .()\u00a0-]*\+[ .()\u00a0-]*[1-9](?:[ .()\u00a0-]*[0-9]){7,14}[ .()\u00a0-]*)?\s*$";
/// An IMEI (`validate_imei`): 15 digits, spaces and dashes between them ignored; blank is none. Its check digit is
/// beyond a pattern: the `imei` format names it.
const IMEI: &str = r"^\s*(?:(?:[ -]*[0-9]){15}[ -]*)?\s*$";
/// A TCP port, 0 to 65535, as a URL carries it.
const PORT: &str = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})";
/// A listing's cursor: URL-safe base64 without padding, as the query parameters describe it.
const CURSOR: &str = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$";
/// An email address as `normalize_email` takes it (the pattern `NewUser` carries); its lengths count bytes, which
/// only the `mailbox` format can say.
const EMAIL: &str = r"^\s*(?=\S{1,254}\s*$)[^\s@,;\x00-\x1f\x7f-\x9f]{1,64}@[^\s@,;.\x00-\x1f\x7f-\x9f]+(?:\.[^\s@,;.\x00-\x1f\x7f-\x9f]+)+\s*$";

/// The rules utoipa's types cannot carry, by schema name: which of several optional fields must be given
/// (`anyOf`/`oneOf` of `required` lists), and the shapes the handlers check (patterns, enums), so that every body
/// the description allows is one the server accepts. `properties` add rules to the schema's own properties; any
/// other key is set on the schema. A rule no pattern can state is named by a `format` of its own (`ssid`, `imei`,
/// `mailbox`, `x509-pem`) and spelled out in the property's description.
fn schema_refinements() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let serial = json!({"type": "string", "pattern": LINE, "maxLength": 64});
    let identifier = "[A-Za-z_][A-Za-z0-9_]*";
    let user = json!({"properties": {
        "name": {"pattern": LINE, "maxLength": 200},
        "email": {"format": "mailbox"},
        "notes": {"pattern": LINES},
        "domain": {"pattern": OPTIONAL_LINE, "maxLength": 200},
        "phone": {"pattern": PHONE}
    }});
    vec![
        // A non-empty list of ids (at most 10,000), or a filter: one, not both.
        (
            "BulkSelection",
            json!({"oneOf": [
                {"required": ["ids"], "properties": {
                    "ids": {"type": "array", "minItems": 1, "maxItems": 10000}, "filter": {"type": "null"}}},
                {"required": ["filter"], "properties": {"filter": {"type": "object"}, "ids": {"type": "null"}}}
            ]}),
        ),
        // A serial number (at most 64 characters) or an IMEI (15 digits with a valid check digit), or both.
        (
            "NewStaged",
            json!({
                "properties": {
                    "serial": {"pattern": OPTIONAL_LINE, "maxLength": 64},
                    "imei": {"pattern": IMEI, "format": "imei",
                        "description": "15 digits with a valid (Luhn) check digit; spaces and dashes are ignored"},
                    "name": {"pattern": OPTIONAL_LINE, "maxLength": 200},
                    "email": {"pattern": format!("^\\s*$|{EMAIL}"), "format": "mailbox"}
                },
                "anyOf": [
                    {"required": ["serial"], "properties": {"serial": serial}},
                    {"required": ["imei"], "properties": {"imei": {"type": "string", "pattern": "[0-9]", "format": "imei"}}}
                ]
            }),
        ),
        // A user, a group, or both.
        (
            "StagedAssignment",
            json!({"anyOf": [
                {"required": ["user_id"], "properties": {"user_id": {"$ref": "#/components/schemas/Id"}}},
                {"required": ["group_id"], "properties": {"group_id": {"$ref": "#/components/schemas/Id"}}}
            ]}),
        ),
        // Two PEM texts, or a PKCS#12 file with its password.
        (
            "PushCertificateUpload",
            json!({"oneOf": [
                {"required": ["certificate_pem", "private_key_pem"], "properties": {
                    "certificate_pem": {"type": "string", "pattern": "-----BEGIN CERTIFICATE-----"},
                    "private_key_pem": {"type": "string", "pattern": "-----BEGIN (RSA )?PRIVATE KEY-----"},
                    "pkcs12_base64": {"type": "null"}}},
                {"required": ["pkcs12_base64"], "properties": {
                    "pkcs12_base64": {"type": "string", "contentEncoding": "base64"},
                    "certificate_pem": {"type": "null"}, "private_key_pem": {"type": "null"}}}
            ]}),
        ),
        // A filter in a body (bulk actions) pages as the listing does.
        (
            "InviteQuery",
            json!({"properties": {
                "limit": {"minimum": 1, "maximum": 500},
                "order": {"enum": ["newest", "oldest", null]},
                "cursor": {"pattern": CURSOR}
            }}),
        ),
        // A host name or address (the port 0 meaning the security's default); a username and password together or
        // neither.
        (
            "RelaySettings",
            json!({
                "properties": {
                    "port": {"maximum": 65535},
                    "host": {"pattern": "^\\s*[A-Za-z0-9.-]+\\s*$"},
                    "from_address": {"format": "email", "pattern": "^[A-Za-z0-9._+-]{1,64}@[A-Za-z0-9-]{1,63}(\\.[A-Za-z0-9-]{1,63})+$"},
                    "reply_to": {"pattern": "^([A-Za-z0-9._+-]{1,64}@[A-Za-z0-9-]{1,63}(\\.[A-Za-z0-9-]{1,63})+)?$"},
                    "from_name": {"pattern": OPTIONAL_LINE},
                    "helo_name": {"pattern": OPTIONAL_LINE},
                    "username": {"pattern": OPTIONAL_LINE},
                    "password": {"pattern": OPTIONAL_LINE},
                    // A certificate rustls reads, which only the format can say.
                    "ca_pem": {"format": "x509-pem", "pattern": LINES}
                },
                "anyOf": [
                    {"required": ["username", "password"], "properties": {
                        "username": {"type": "string", "pattern": "\\S"}, "password": {"type": "string", "minLength": 1}}},
                    {"properties": {
                        "username": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^\\s*$"}]},
                        "password": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 0}]}}}
                ]
            }),
        ),
        // The receiver as package/class, the download over HTTPS, the SHA-256 as base64url or hex.
        (
            "AndroidApp",
            json!({"properties": {
                "component_name": {"pattern": format!("^{identifier}(\\.{identifier})+/\\.*{identifier}(\\.{identifier})*$")},
                "download_url": {"pattern": format!("^https://[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*(:{PORT})?(/[A-Za-z0-9._~-]*)*$")},
                "checksum": {"pattern": "^([0-9A-Fa-f]{64}|[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?)$"},
                "agent_url": {"pattern": "^(https://[A-Za-z0-9./_~-]*)?$"}
            }}),
        ),
        (
            "ProvisioningWifi",
            json!({
                "properties": {
                    // At most 32 characters, and at most 32 bytes as UTF-8, which only the format can say.
                "ssid": {"minLength": 1, "maxLength": 32, "pattern": LINE, "format": "ssid"},
                    "security": {"enum": ["NONE", "WPA", "WEP"]},
                    "password": {"pattern": OPTIONAL_LINE}
                },
                "anyOf": [
                    {"properties": {"security": {"const": "NONE"}}},
                    {"required": ["password"], "properties": {"password": {"type": "string", "minLength": 1}}}
                ]
            }),
        ),
        // Names, notes and descriptions without control characters; a phone number in international form. A new
        // user and a change to one are checked alike.
        ("NewUser", user.clone()),
        ("UserPatch", user),
        (
            "NewGroup",
            json!({"properties": {"name": {"pattern": LINE, "maxLength": 100}, "description": {"pattern": LINES}}}),
        ),
        // A template's text may run over lines; no other control characters.
        ("TemplateUpdate", json!({"properties": {"source": {"pattern": LINES}}})),
        // Drafts only of the templates there are.
        (
            "PreviewRequest",
            json!({"properties": {"drafts": {"propertyNames": {"enum": crate::mail::templates::PARTS}}}}),
        ),
    ]
}

/// Routes that answer without a signed-in admin.
pub const PUBLIC_ROUTES: &[(&str, &str)] = &[
    ("post", "/api/v1/login"),
    ("get", "/api/v1/setup"),
    ("post", "/api/v1/setup"),
    ("post", "/android/v1/enroll"),
    ("post", "/android/v1/checkin"),
];

#[derive(OpenApi)]
#[openapi(
    info(
        title = "enrolld admin API",
        description = "Invite users to enroll devices, and track invites and devices. Sign in with POST /api/v1/login; send the token as `Authorization: Bearer <token>`, or use the session cookie with an `X-CSRF-Token` header on changes. The `android` routes are the device side, for a device-policy app (the agent): it enrolls with an invite's token and the user's answer, then checks in with the device secret it got."
    ),
    modifiers(&Security),
    security(("bearer" = []), ("session" = []))
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("session", SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(SESSION_COOKIE))));
        components.add_security_scheme(
            "device_secret",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The device_secret an Android agent got from POST /android/v1/enroll"))
                    .build(),
            ),
        );
    }
}

/// The signed-in admin, put in the request by [`require_admin`].
#[derive(Debug, Clone)]
pub struct SignedInAdmin {
    pub actor: Actor,
    pub session: Session,
    /// The token the request carried, for sign-out.
    pub token: String,
}

/// The client's address as text, when known (for the audit log and rate limits).
pub(crate) fn client_of(parts_extensions: &axum::http::Extensions) -> Option<String> {
    parts_extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip().to_string())
}

/// A JSON body whose problems are answered in the API's own error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<Self, HttpError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> HttpError {
    let (status, code) = match rejection {
        JsonRejection::MissingJsonContentType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "json_expected"),
        JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
        JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        _ => (StatusCode::BAD_REQUEST, "invalid_body"),
    };
    HttpError::new(status, code, rejection.body_text())
}

/// Path parameters, with a 404-style answer for ids that cannot exist.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|rejection: PathRejection| {
                HttpError::new(StatusCode::NOT_FOUND, "not_found", format!("no such record: {}", rejection.body_text()))
            })
    }
}

/// Query parameters, answered with a 422 naming the bad one.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|rejection: QueryRejection| {
                HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", rejection.body_text())
            })
    }
}

impl From<DomainError> for HttpError {
    fn from(error: DomainError) -> Self {
        match error {
            DomainError::NotFound { .. } => HttpError::new(StatusCode::NOT_FOUND, "not_found", error.to_string()),
            DomainError::Invalid { field, message } => {
                HttpError { field: Some(field), ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message) }
            }
            DomainError::Conflict { code, message } => HttpError::new(StatusCode::CONFLICT, code, message),
            DomainError::Store(store) => {
                tracing::error!(error = %store, "storage failure");
                HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", store.to_string())
            }
        }
    }
}

impl From<AuthError> for HttpError {
    fn from(error: AuthError) -> Self {
        let message = error.to_string();
        match error {
            AuthError::BadCredentials => HttpError::new(StatusCode::UNAUTHORIZED, "bad_credentials", message),
            AuthError::TooManyAttempts { retry_after_secs } => HttpError {
                retry_after: Some(retry_after_secs),
                ..HttpError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts", message)
            },
            AuthError::AlreadySetUp => HttpError::new(StatusCode::CONFLICT, "already_set_up", message),
            AuthError::BadSetupCode => HttpError::new(StatusCode::FORBIDDEN, "bad_setup_code", message),
            AuthError::WeakPassword(_) => HttpError {
                field: Some("password"),
                ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "weak_password", message)
            },
            AuthError::Domain(domain) => domain.into(),
        }
    }
}

/// Runs domain work (sled, argon2) on the blocking pool so it never stalls the async workers.
pub(crate) async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, HttpError>
where
    T: Send + 'static,
    E: Into<HttpError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Into::into),
        Err(error) => {
            tracing::error!(%error, "request work panicked");
            Err(HttpError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request failed unexpectedly; see the log",
            ))
        }
    }
}

/// `204 No Content`.
pub(crate) fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
pub(crate) mod tests;
