//! `POST /api/v1/backup`: a backup of the appliance, encrypted with the admin's passphrase and streamed as a file;
//! [`download`] is shared with the Settings page's download.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::io::{AsyncRead, ReadBuf};
use utoipa::ToSchema;

use super::{ApiJson, SignedInAdmin};
use crate::backup::{self, Passphrase};
use crate::domain::Actor;
use crate::http::{AppState, HttpError};

/// The passphrase the backup is encrypted with.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// At least 12 characters. It cannot be recovered: without it the backup cannot be read.
    #[schema(min_length = 12)]
    pub passphrase: String,
}

/// A backup of the appliance as one file: the database (every table but sign-in sessions), the CA, the keys and
/// certificates, and the uploaded files, all encrypted with the passphrase (argon2id, ChaCha20-Poly1305). Restore
/// it with `enrolld restore` or on the setup page of a new box.
#[utoipa::path(post, path = "/api/v1/backup", tag = "system", request_body = BackupRequest,
    responses(
        (status = 200, description = "the backup file, as an attachment named enrolld-backup-<host>-<yyyymmdd-hhmm>.enrolld",
            content_type = "application/octet-stream"),
        (status = 422, description = "the passphrase is too short")))]
pub async fn backup(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedInAdmin>,
    ApiJson(body): ApiJson<BackupRequest>,
) -> Result<Response, HttpError> {
    download(&state, admin.actor, "api", &body.passphrase).await
}

/// Makes a backup into an unnamed file in the state directory (the store's snapshot is quick there, whatever the
/// client's pace), then streams it as an attachment. Once the whole file has been handed over, it is recorded as the
/// last backup and in the audit log (`backup.downloaded`, with `how`).
pub(crate) async fn download(
    state: &AppState,
    actor: Actor,
    how: &'static str,
    passphrase: &str,
) -> Result<Response, HttpError> {
    let passphrase = Passphrase::new(passphrase).map_err(|error| HttpError {
        field: Some("passphrase"),
        ..HttpError::new(StatusCode::UNPROCESSABLE_ENTITY, "weak_passphrase", error.to_string())
    })?;
    let Some(dir) = state.state_dir.clone() else {
        return Err(HttpError::unavailable("backups are not available here (no state directory)"));
    };
    // Deriving the key takes 64 MiB, like a password check: it waits for one of the same few slots.
    let _slot = state
        .password_checks
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| HttpError::unavailable("enrolld is shutting down; try again in a moment"))?;
    let (store, host, now) = (state.store.clone(), state.naming.hostname(), state.clock.now());
    let made = super::blocking(move || {
        let source = backup::Source { store: &store, state_dir: &dir, host: &host, now };
        backup::to_temporary_file(&source, &passphrase, &dir, &backup::Options::default()).map_err(|error| {
            tracing::error!(%error, "making a backup failed");
            HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "backup_failed", error.to_string())
        })
    })
    .await?;
    let (file, written) = made;
    let name = backup::file_name(&written.header.host, written.header.created_at);
    tracing::info!(admin = %actor.name, bytes = written.bytes, how, "backup made");
    let domain = state.enrollment.clone();
    let (bytes, made_at) = (written.bytes, written.header.created_at);
    let record = move || {
        tokio::task::spawn_blocking(move || {
            if let Err(error) = domain.record_backup(&actor, how, bytes, made_at) {
                tracing::error!(%error, "cannot record the backup");
            }
        });
    };
    let body = WhenRead { inner: tokio::fs::File::from_std(file), left: bytes, at_end: Some(Box::new(record)) };
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// A reader that calls `at_end` once, when its last byte (of `left`) has been read; not if the client goes away
/// before. Counted, not at end of file: hyper stops polling a body once it has sent Content-Length bytes.
struct WhenRead<R> {
    inner: R,
    left: u64,
    at_end: Option<Box<dyn FnOnce() + Send>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for WhenRead<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.left = self.left.saturating_sub(read);
        if self.left == 0
            && let Some(at_end) = self.at_end.take()
        {
            at_end();
        }
        polled
    }
}
