//! `/api/v1/imports` (CSV uploads run as jobs, with progress and a report), the sample files, and the CSV exports
//! of the Pending, Staged and Managed lists.

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa::IntoParams;

use super::users::ListQuery;
use super::{ApiPath, ApiQuery, SignedInAdmin, blocking};
use crate::csvfile::CsvKind;
use crate::domain::{DeviceQuery, ExportList, ImportRequest, InviteQuery, Paged, StagedQuery};
use crate::http::{AppState, HttpError};
use crate::model::{Id, Import, ImportKind, ImportMode};

/// The longest `wait=true` holds the request (the default request timeout is 30 s).
const WAIT_AT_MOST: std::time::Duration = std::time::Duration::from_secs(20);

/// Fails the import if the upload handler is dropped before the file is stored.
struct UploadGuard {
    domain: crate::domain::Enrollment,
    id: Id,
    armed: bool,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.domain.fail_import(&self.id, "the upload was cut off before the whole file arrived");
        }
    }
}

/// How to import an upload.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// `invites` or `staged`.
    pub kind: ImportKind,
    /// `all` (default): a file with any invalid row imports nothing. `valid_only`: import the valid rows.
    pub mode: Option<ImportMode>,
    /// The file's name, for the record.
    pub filename: Option<String>,
    /// Answer only when the import has finished (for scripts); otherwise answer at once and poll.
    #[serde(default)]
    pub wait: bool,
}

/// What a CSV file may be sent as: `text/csv`, and what browsers and tools label such files with.
const CSV_CONTENT_TYPES: [&str; 5] =
    ["text/csv", "text/plain", "application/csv", "application/vnd.ms-excel", "application/octet-stream"];

/// Upload a CSV file (the request body, `text/csv`) to import. The answer comes at once with the job (202); poll
/// `/api/v1/imports/{id}` for progress and the report, or pass `wait=true`.
#[utoipa::path(post, path = "/api/v1/imports", tag = "imports", params(UploadQuery),
    request_body(content = Option<String>, content_type = "text/csv",
        description = "The CSV file, any bytes: an empty or broken file makes a job whose report says what is wrong"),
    responses((status = 202, body = Import), (status = 200, body = Import, description = "with wait=true"),
        (status = 413, description = "larger than import_max_bytes"),
        (status = 415, description = "sent as something other than a CSV file (JSON, a form)")))]
pub async fn upload(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Import>), HttpError> {
    if let Some(content_type) = headers.get(axum::http::header::CONTENT_TYPE) {
        let essence = content_type.to_str().unwrap_or_default().split(';').next().unwrap_or_default().trim();
        if !CSV_CONTENT_TYPES.iter().any(|csv| essence.eq_ignore_ascii_case(csv)) {
            return Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "csv_expected",
                format!("send the CSV file as text/csv, not {essence:?}"),
            ));
        }
    }
    let request =
        ImportRequest { kind: query.kind, mode: query.mode.unwrap_or(ImportMode::All), filename: query.filename };
    let (import, job) = start_import(&state, &admin.actor, request, body).await?;
    let id = import.id;
    if query.wait {
        // Held at most this long, inside the request timeout; a longer import answers 202 and goes on.
        if let Ok(joined) = tokio::time::timeout(WAIT_AT_MOST, job).await {
            let finished = joined.map_err(|_| {
                HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the import stopped unexpectedly")
            })??;
            return Ok((StatusCode::OK, Json(finished)));
        }
        let domain = state.enrollment.clone();
        return Ok((StatusCode::ACCEPTED, Json(blocking(move || domain.import(&id)).await?)));
    }
    Ok((StatusCode::ACCEPTED, Json(import)))
}

/// Stores an uploaded CSV file (counting it against `import_max_bytes`) and starts its import as a background job.
/// Returns the job's record and a handle that ends with the finished import. The admin pages use it too.
pub(crate) async fn start_import(
    state: &AppState,
    actor: &crate::domain::Actor,
    request: ImportRequest,
    body: Body,
) -> Result<(Import, tokio::task::JoinHandle<crate::domain::DomainResult<Import>>), HttpError> {
    let limit = state.import_max_bytes as u64;
    let too_large = |size: String| {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the file is {size}; the limit is {} MiB (import_max_bytes); split it into smaller files",
                limit >> 20
            ),
        )
    };
    let declared = body.size_hint().exact();
    if let Some(declared) = declared.filter(|d| *d > limit) {
        return Err(too_large(format!("{declared} bytes")));
    }
    let domain = state.enrollment.clone();
    let creator = actor.clone();
    let import = blocking(move || domain.create_import(&creator, &request)).await?;
    let id = import.id;
    let domain = state.enrollment.clone();
    let path = blocking(move || domain.import_file(&id)).await?;

    // If the request ends before the file is stored (the client goes, the request times out), the import is
    // marked failed and its partial file deleted rather than left "waiting for the file".
    let mut guard = UploadGuard { domain: state.enrollment.clone(), id, armed: true };
    let mut written: u64 = 0;
    let spooled: Result<(), HttpError> = async {
        let io =
            |e: std::io::Error| HttpError::unavailable(format!("cannot store the upload: {e}; check free disk space"));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .await
            .map_err(io)?;
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                HttpError::new(StatusCode::BAD_REQUEST, "upload_failed", format!("the upload was cut off: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                written += data.len() as u64;
                if written > limit {
                    return Err(too_large(format!("more than {limit} bytes")));
                }
                file.write_all(&data).await.map_err(io)?;
            }
        }
        file.sync_all().await.map_err(io)
    }
    .await;
    guard.armed = false;
    if let Err(error) = spooled {
        let domain = state.enrollment.clone();
        let message = error.message.clone();
        blocking(move || domain.fail_import(&id, &message)).await?;
        return Err(error);
    }

    let domain = state.enrollment.clone();
    let stop = state.shutdown.clone();
    let actor = actor.clone();
    let job = state.jobs.spawn_blocking(move || {
        let run = std::panic::AssertUnwindSafe(|| domain.run_import(&actor, &id, written, &|| stop.is_cancelled()));
        let result = std::panic::catch_unwind(run).unwrap_or_else(|_| {
            Err(crate::domain::DomainError::invalid("file", "the import stopped unexpectedly; see the log"))
        });
        if let Err(error) = &result {
            tracing::error!(import = %id, %error, "import failed");
            let _ = domain.fail_import(&id, &format!("the import failed: {error}"));
        }
        result
    });
    Ok((import, job))
}

/// Imports, newest first.
#[utoipa::path(get, path = "/api/v1/imports", tag = "imports", params(ListQuery), responses((status = 200, body = Paged<Import>)))]
pub async fn imports(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Paged<Import>>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.imports(query.cursor.as_deref(), query.limit.unwrap_or(50))).await?))
}

/// One import: its state, progress (`rows_done` of `rows_total`) and report.
#[utoipa::path(get, path = "/api/v1/imports/{id}", tag = "imports", params(("id" = Id, Path)),
    responses((status = 200, body = Import), (status = 404)))]
pub async fn import(State(state): State<AppState>, ApiPath(id): ApiPath<Id>) -> Result<Json<Import>, HttpError> {
    let domain = state.enrollment.clone();
    Ok(Json(blocking(move || domain.import(&id)).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SampleQuery {
    /// `invites` or `staged`.
    pub kind: ImportKind,
}

/// A sample file to fill in.
#[utoipa::path(get, path = "/api/v1/imports/sample", tag = "imports", params(SampleQuery),
    responses((status = 200, content_type = "text/csv", body = String)))]
pub async fn sample(ApiQuery(query): ApiQuery<SampleQuery>) -> Response {
    let (kind, name) = match query.kind {
        ImportKind::Invites => (CsvKind::Invites, "enrolld-invites-sample.csv"),
        ImportKind::Staged => (CsvKind::Staged, "enrolld-staged-sample.csv"),
    };
    csv_response(kind.sample().as_bytes().to_vec(), name)
}

/// Invites as CSV (the invite file's columns plus status, times and the last remark), with the list's filters.
#[utoipa::path(get, path = "/api/v1/invites/export", tag = "invites", params(InviteQuery),
    responses((status = 200, content_type = "text/csv", body = String)))]
pub async fn export_invites(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<InviteQuery>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    let name = match query.status {
        Some(status) => format!("enrolld-invites-{status}.csv"),
        None => "enrolld-invites.csv".to_owned(),
    };
    let bytes = blocking(move || domain.export_csv(&ExportList::Invites(query))).await?;
    Ok(csv_response(bytes, &name))
}

/// Staged devices as CSV, in the staged file's columns (filtered as the Staged tab is).
#[utoipa::path(get, path = "/api/v1/staged/export", tag = "staged", params(StagedQuery),
    responses((status = 200, content_type = "text/csv", body = String)))]
pub async fn export_staged(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StagedQuery>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    let bytes = blocking(move || domain.export_csv(&ExportList::Staged(query))).await?;
    Ok(csv_response(bytes, "enrolld-staged.csv"))
}

/// Managed devices as CSV, newest first (filtered as the device list is; `cursor` and `limit` are ignored).
#[utoipa::path(get, path = "/api/v1/devices/export", tag = "devices", params(DeviceQuery),
    responses((status = 200, content_type = "text/csv", body = String)))]
pub async fn export_devices(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<DeviceQuery>,
) -> Result<Response, HttpError> {
    let domain = state.enrollment.clone();
    let name = match query.status {
        Some(status) => format!("enrolld-managed-{status}.csv"),
        None => "enrolld-managed.csv".to_owned(),
    };
    let bytes = blocking(move || domain.export_csv(&ExportList::Managed(query))).await?;
    Ok(csv_response(bytes, &name))
}

fn csv_response(bytes: Vec<u8>, filename: &str) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}
