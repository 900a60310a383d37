//! Restoring a backup on the setup page of a fresh box (no admin yet): guarded by the same setup code as creating
//! the first admin, with the same slowing-down of wrong codes. The upload is kept in the state directory, checked
//! whole and unpacked into `restore-pending.partial/`, renamed `restore-pending/` once everything checked out; then
//! the daemon restarts in-process and puts it in place of what the fresh box had.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;

use super::{blocking, forbidden, render, same_origin, sign_in_problem};
use crate::backup::{self, Passphrase};
use crate::domain::Actor;
use crate::http::AppState;
use crate::http::api::access::ClientAddr;

/// The largest backup the page takes.
pub const MAX_BYTES: usize = 4 << 30;
/// How long an upload, its check and unpacking may take.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// The longest text field (the setup code, the passphrase) read.
const MAX_TEXT_FIELD: usize = 4096;
/// Where the upload is kept while it is checked.
const UPLOAD: &str = "restore-upload.partial";

/// The route, without the body limit and timeout of the others (the caller gives it its own).
pub fn routes() -> Router<AppState> {
    Router::new().route("/admin/setup/restore", post(restore))
}

/// The setup page again, with why the restore was refused.
fn refused(state: &AppState, status: StatusCode, problem: &str) -> Response {
    let values = minijinja::context! { title => "Set up enrolld", restore_problem => problem };
    render(state, None, status, "setup.html", values)
}

async fn restore(
    State(state): State<AppState>,
    headers: HeaderMap,
    ClientAddr(client): ClientAddr,
    mut multipart: Multipart,
) -> Response {
    if !same_origin(&headers) {
        return forbidden(&state);
    }
    let Some(dir) = state.state_dir.clone() else {
        return refused(&state, StatusCode::SERVICE_UNAVAILABLE, "Restoring is not available here.");
    };
    let Ok(_one_at_a_time) = state.restoring.clone().try_lock_owned() else {
        return refused(&state, StatusCode::CONFLICT, "A restore is already under way; wait for it to finish.");
    };
    let auth = state.auth.clone();
    if !matches!(blocking(move || auth.needs_setup()).await, Ok(true)) {
        return Redirect::to("/admin/login").into_response();
    }

    // The fields come in the page's order: the code and passphrase before the file, so a wrong code is refused
    // before a byte of the file is stored.
    let mut texts = Vec::new();
    let file = loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break None,
            Err(error) => return refused(&state, StatusCode::BAD_REQUEST, &error.body_text()),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            break Some(field);
        }
        // Read by the chunk and bounded: nobody has signed in, and a field must not fill the memory.
        let mut text = Vec::new();
        let mut field = field;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) if text.len() + chunk.len() <= MAX_TEXT_FIELD => text.extend_from_slice(&chunk),
                Ok(None) => break,
                _ => return refused(&state, StatusCode::BAD_REQUEST, "The form could not be read; try again."),
            }
        }
        texts.push((name, String::from_utf8_lossy(&text).into_owned()));
    };
    let text = |name: &str| texts.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let (code, passphrase) = (text("code"), text("passphrase"));
    let actor = Actor { name: "setup".into(), client };
    let auth = state.auth.clone();
    match tokio::task::spawn_blocking(move || auth.check_setup_code(&actor, &code)).await {
        Ok(Ok(_)) => {}
        Ok(Err(crate::domain::auth::AuthError::AlreadySetUp)) => return Redirect::to("/admin/login").into_response(),
        Ok(Err(error)) => {
            return refused(&state, StatusCode::UNPROCESSABLE_ENTITY, &sign_in_problem(&state, error, "restore"));
        }
        Err(_) => return refused(&state, StatusCode::SERVICE_UNAVAILABLE, "Something went wrong; try again."),
    }
    let Some(mut field) = file else {
        return refused(&state, StatusCode::UNPROCESSABLE_ENTITY, "Choose the backup file (.enrolld).");
    };

    let upload = dir.join(UPLOAD);
    let stored = async {
        let mut out = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(out.write(true).create(true).truncate(true), 0o600);
        let mut out = out.open(&upload).map_err(|e| format!("The upload cannot be stored: {e}."))?;
        let mut size = 0usize;
        while let Some(chunk) = field.chunk().await.map_err(|e| e.body_text())? {
            size += chunk.len();
            if size > MAX_BYTES {
                return Err(format!(
                    "The file is larger than {} GiB; use enrolld restore on the box.",
                    MAX_BYTES >> 30
                ));
            }
            out.write_all(&chunk).map_err(|e| format!("The upload cannot be stored: {e}."))?;
        }
        Ok(size)
    };
    if let Err(problem) = stored.await {
        let _ = std::fs::remove_file(&upload);
        return refused(&state, StatusCode::UNPROCESSABLE_ENTITY, &problem);
    }
    let (upload_path, dir_path) = (upload.clone(), dir.to_path_buf());
    let unpacked = tokio::task::spawn_blocking(move || unpack(&upload_path, &dir_path, &passphrase)).await;
    let _ = std::fs::remove_file(&upload);
    let restored = match unpacked {
        Ok(Ok(restored)) => restored,
        Ok(Err(error)) => {
            tracing::warn!(%error, "a backup uploaded on the setup page was refused");
            let status = if error.is_bad_file() || matches!(error, backup::BackupError::WrongPassphrase) {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return refused(&state, status, &format!("Nothing was restored: {error}."));
        }
        Err(_) => return refused(&state, StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong; try again."),
    };
    let (header, trailer) = (&restored.header, &restored.trailer);
    tracing::warn!(
        host = %header.host,
        made = %header.created_at,
        users = trailer.count("users"),
        invites = trailer.count("invites"),
        devices = trailer.count("devices"),
        "a backup was restored on the setup page; restarting to load it"
    );
    let values = minijinja::context! {
        title => "Restored",
        users => trailer.count("users"),
        invites => trailer.count("invites"),
        devices => trailer.count("devices"),
        admins => trailer.count("admins"),
        host => header.host.clone(),
        made => crate::domain::minute(header.created_at),
        ca => header.ca_sha256.clone(),
    };
    let page = render(&state, None, StatusCode::OK, "restored.html", values);
    // The page is complete: the running requests (this one) finish while the daemon stops, then it starts again
    // on the restored contents.
    state.restart.cancel();
    page
}

/// Checks the uploaded backup whole and unpacks it for the next start.
fn unpack(upload: &Path, dir: &Path, passphrase: &str) -> Result<backup::Restored, backup::BackupError> {
    let file = |path: &Path| {
        let path = path.to_owned();
        move |source| backup::BackupError::File { path, source }
    };
    let input = std::io::BufReader::with_capacity(1 << 16, std::fs::File::open(upload).map_err(file(upload))?);
    let opened = backup::open(input)?;
    let (unpacking, pending): (PathBuf, PathBuf) =
        (crate::state_dir::restore_unpacking(dir), crate::state_dir::restore_pending(dir));
    for stale in [&unpacking, &pending] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(file(stale))?;
        }
    }
    let restored = opened.restore(&Passphrase::given(passphrase), &unpacking)?;
    std::fs::rename(&unpacking, &pending).map_err(file(&pending))?;
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, header};
    use tower::ServiceExt as _;

    use super::*;
    use crate::clock::{Clock as _, SystemClock};
    use crate::domain::NewUser;
    use crate::state_dir::StateDir;
    use crate::store::Store;

    const PASSPHRASE: &str = "the old box's passphrase";

    /// A backup of another box: its own CA, two users and its admin.
    fn backup_of_another_box(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        crate::pki::CertificateAuthority::load_or_create(&dir.join("pki"), "old", SystemClock.now()).unwrap();
        let state = crate::http::api::tests::state_with(Store::open(&dir.join("db")).unwrap(), Arc::new(SystemClock));
        state.auth.bootstrap("olda", Some("the old admin's password")).unwrap();
        for email in ["ann@example.com", "bo@example.com"] {
            let user = NewUser { name: email.into(), email: email.into(), ..Default::default() };
            state.enrollment.create_user(&Actor::system(), &user).unwrap();
        }
        let source = backup::Source { store: &state.store, state_dir: dir, host: "old", now: SystemClock.now() };
        let mut bytes = Vec::new();
        backup::write(&source, &Passphrase::new(PASSPHRASE).unwrap(), &mut bytes, &backup::Options::default()).unwrap();
        (bytes, std::fs::read(dir.join("pki/ca.crt")).unwrap())
    }

    fn form(code: &str, passphrase: &str, file: &[u8]) -> Request<Body> {
        let mut body = Vec::new();
        for (name, value) in [("code", code), ("passphrase", passphrase)] {
            body.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
            );
        }
        body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.enrolld\"\r\n");
        body.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(file);
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        Request::post("/admin/setup/restore")
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XyZ")
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_fresh_box_restores_a_backup_from_its_setup_page_then_restarts_into_it() {
        let old = tempfile::tempdir().unwrap();
        let (backup, old_ca) = backup_of_another_box(old.path());

        let fresh = tempfile::tempdir().unwrap();
        crate::pki::CertificateAuthority::load_or_create(&fresh.path().join("pki"), "enroll", SystemClock.now())
            .unwrap();
        let mut state =
            crate::http::api::tests::state_with(Store::open(&fresh.path().join("db")).unwrap(), Arc::new(SystemClock));
        state.state_dir = Some(Arc::new(fresh.path().to_owned()));
        let code = state.auth.bootstrap("admin", None).unwrap().unwrap();
        let limits = crate::http::Limits {
            request_timeout: Duration::from_secs(5),
            max_body_bytes: 1024,
            import_max_bytes: 1024,
        };
        let router = crate::http::https_router(state.clone(), limits);
        let send = |request: Request<Body>| {
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await.unwrap();
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let nothing_unpacked = || {
            let dir = fresh.path();
            !crate::state_dir::restore_pending(dir).exists()
                && !crate::state_dir::restore_unpacking(dir).exists()
                && !dir.join(UPLOAD).exists()
        };

        let (_, page) = send(Request::get("/admin/setup").body(Body::empty()).unwrap()).await;
        assert!(page.contains("action=\"/admin/setup/restore\""), "the setup page offers it");
        let (status, page) = send(form(&"X".repeat(100_000), PASSPHRASE, &backup)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "a field larger than a setup code is not read whole: {page}");
        let (status, page) = send(form("WRONG-CODE-0000", PASSPHRASE, &backup)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(page.contains("setup code is not right"), "{page}");
        let (status, page) = send(form(&code, "not the passphrase", &backup)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(page.contains("Nothing was restored: the passphrase is wrong"), "{page}");
        let (status, page) = send(form(&code, PASSPHRASE, &backup[..backup.len() - 100])).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(page.contains("the file is truncated"), "{page}");
        assert!(nothing_unpacked() && !state.restart.is_cancelled(), "a refused backup changes nothing");

        // Larger than the other routes' body limit (1 KiB here): this route has its own.
        assert!(backup.len() > 4096);
        let (status, page) = send(form(&code, PASSPHRASE, &backup)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page.contains("Restored 2 users, 0 invites, 0 devices and 1 admin accounts"), "{page}");
        assert!(page.contains("restarting") && page.contains("href=\"/admin/login\""), "{page}");
        assert!(state.restart.is_cancelled(), "the daemon is asked to run again");
        assert!(crate::state_dir::restore_pending(fresh.path()).join("db").is_dir());

        // What the next start does first: the restored contents in place, the fresh box's aside.
        let state_dir = StateDir::open(fresh.path()).unwrap();
        let aside = state_dir.install_pending_restore("20260101-000000").unwrap().unwrap();
        assert_eq!(std::fs::read(fresh.path().join("pki/ca.crt")).unwrap(), old_ca, "the old box's CA");
        assert!(aside.join("db").is_dir() && aside.join("pki/ca.key").is_file());
        let store = Store::open_when_free(&fresh.path().join("db"), Duration::from_secs(10)).unwrap();
        assert_eq!(store.count("users").unwrap(), 2);
        assert!(store.get::<crate::model::Admin>(b"olda").unwrap().is_some(), "the backup's admin");
    }
}
