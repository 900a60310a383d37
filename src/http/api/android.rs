//! `/api/v1/settings/android`: the device-policy app company-owned Android devices are provisioned with (its
//! component name, where devices download it and its checksum, a Wi-Fi network, the agent's store link), and
//! `/api/v1/settings/android/apk` to upload the app so the box serves it and computes its checksum.

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;

use super::{ApiJson, SignedInAdmin, blocking, no_content};
use crate::domain::{Actor, AndroidApp, ChecksumKind, ProvisioningWifi, SERVED_APP_PATH, package_checksum};
use crate::http::{AppState, HttpError};

/// The app's settings, if configured.
#[utoipa::path(get, path = "/api/v1/settings/android", tag = "android",
    responses((status = 200, body = AndroidApp), (status = 404, description = "no app is configured")))]
pub async fn app(State(state): State<AppState>) -> Result<Json<AndroidApp>, HttpError> {
    let domain = state.enrollment.clone();
    blocking(move || domain.android_app()).await?.map(Json).ok_or_else(|| {
        HttpError::new(StatusCode::NOT_FOUND, "not_configured", "no Android device-policy app is configured")
    })
}

/// Saves the app's settings, checked: an https:// download location (devices refuse plain HTTP), a
/// `package/class` component name, a SHA-256 checksum (URL-safe base64, or hex as apksigner prints it).
#[utoipa::path(put, path = "/api/v1/settings/android", tag = "android", request_body = AndroidApp,
    responses((status = 200, body = AndroidApp), (status = 422)))]
pub async fn save_app(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(app): ApiJson<AndroidApp>,
) -> Result<Json<AndroidApp>, HttpError> {
    let domain = state.enrollment.clone();
    let saved = blocking(move || domain.save_android_app(&admin.actor, Some(app))).await?;
    saved.map(Json).ok_or_else(|| HttpError::unavailable("the settings were not saved; try again"))
}

/// Removes the app's settings (and an uploaded app): corporate invites then carry the plain link.
#[utoipa::path(delete, path = "/api/v1/settings/android", tag = "android", responses((status = 204)))]
pub async fn remove_app(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
) -> Result<axum::response::Response, HttpError> {
    let domain = state.enrollment.clone();
    blocking(move || domain.save_android_app(&admin.actor, None)).await?;
    if let Some(path) = state.android.apk_path() {
        let _ = tokio::fs::remove_file(path).await;
    }
    Ok(no_content())
}

/// Uploads the app (the APK file as the body) for the box to serve at `/android/dpc.apk`; its package checksum
/// is computed here. The component name comes from the settings saved before, or `?component_name=`.
#[utoipa::path(put, path = "/api/v1/settings/android/apk", tag = "android",
    params(("component_name" = Option<String>, Query, description = "package/class of the app's device-admin receiver")),
    request_body(content = Vec<u8>, content_type = "application/vnd.android.package-archive"),
    responses((status = 200, body = AndroidApp), (status = 422)))]
pub async fn upload_apk(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
    body: axum::body::Body,
) -> Result<Json<AndroidApp>, HttpError> {
    // Apps are larger than JSON bodies: the upload limit is the CSV files' (import_max_bytes).
    let limit = state.import_max_bytes;
    let bytes = match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the app is larger than {limit} bytes (import_max_bytes); raise it in the configuration"),
            ));
        }
    };
    let changes = AppChanges { component_name: query.get("component_name").cloned(), ..AppChanges::default() };
    let app = install_apk(&state, &admin.actor, bytes.to_vec(), changes).await?;
    Ok(Json(app))
}

/// What an upload changes besides the app itself; `None` keeps what was saved.
#[derive(Debug, Default)]
pub(crate) struct AppChanges {
    pub component_name: Option<String>,
    pub wifi: Option<Option<ProvisioningWifi>>,
    pub agent_url: Option<Option<String>>,
}

/// Keeps an uploaded app and saves the settings that point devices at it; shared with the Settings page.
pub(crate) async fn install_apk(
    state: &AppState,
    actor: &Actor,
    bytes: Vec<u8>,
    changes: AppChanges,
) -> Result<AndroidApp, HttpError> {
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(HttpError {
            field: Some("file"),
            ..HttpError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not_an_apk",
                "this is not an APK file (an APK is a zip archive); upload the app's .apk",
            )
        });
    }
    let Some(path) = state.android.apk_path() else {
        return Err(HttpError::unavailable("this server keeps no files; give the app's download URL instead"));
    };
    let domain = state.enrollment.clone();
    let saved = blocking(move || domain.android_app()).await?;
    let component_name = changes
        .component_name
        .filter(|c| !c.trim().is_empty())
        .or(saved.as_ref().map(|s| s.component_name.clone()))
        .unwrap_or_default();
    let app = AndroidApp {
        component_name,
        download_url: format!("{}{SERVED_APP_PATH}", state.naming.public_url()),
        checksum_kind: ChecksumKind::Package,
        checksum: package_checksum(&bytes),
        served_here: true,
        wifi: changes.wifi.unwrap_or_else(|| saved.as_ref().and_then(|s| s.wifi.clone())),
        agent_url: changes.agent_url.unwrap_or_else(|| saved.and_then(|s| s.agent_url)),
    };
    // Checked before the file is written, so a refused upload replaces nothing.
    let app = app.checked().map_err(HttpError::from)?;
    let (domain, actor) = (state.enrollment.clone(), actor.clone());
    blocking(move || {
        let write = || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::state_dir::write_private(&path, &bytes, 0o644)
        };
        write().map_err(|error| {
            tracing::error!(%error, path = %path.display(), "cannot keep the uploaded Android app");
            HttpError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "not_kept",
                format!("the app could not be kept ({error}); free some space on the box and upload it again"),
            )
        })
    })
    .await?;
    let saved = blocking(move || domain.save_android_app(&actor, Some(app))).await?;
    saved.ok_or_else(|| HttpError::unavailable("the settings were not saved; try again"))
}
