//! The control socket, `<state_dir>/control.sock` (mode 0600, made by `serve`, removed on shutdown): how
//! `enrolld backup` gets a backup out of a running daemon, which holds the database. Only root and the user enrolld
//! runs as may use it (the file's mode, and the peer's credentials checked on every connection).
//!
//! One request per connection, a line of JSON: `{"command": "backup", "passphrase": "…"}`. The answer is a line
//! of JSON, `{"ok": true, "bytes": N, "file_name": "…"}` followed by the N bytes of the backup, or
//! `{"ok": false, "error": "…"}`. Once the client has saved the file it sends `{"saved": true}`, and the backup is
//! recorded (dashboard, audit log) as made through the command line.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::backup::{self, Passphrase};
use crate::clock::Clock;
use crate::domain::{Actor, Enrollment};
use crate::naming::Naming;

/// The longest request line read.
const MAX_REQUEST: u64 = 4096;
/// How long a client may take to send its request, and to confirm it saved the file.
const CLIENT_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    command: String,
    passphrase: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    saved: bool,
}

/// What the daemon's side needs: the store and state directory to back up, and where to record it.
#[derive(Clone, Debug)]
pub struct Control {
    pub enrollment: Enrollment,
    pub state_dir: Arc<PathBuf>,
    pub naming: Naming,
    pub clock: Arc<dyn Clock>,
    /// Key derivation takes 64 MiB; it shares the password-hashing slots with sign-ins.
    pub slots: Arc<tokio::sync::Semaphore>,
}

/// Binds the control socket at `path` (a stale one from a crash is removed first: the caller holds the state
/// directory's lock) and makes it 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers on `listener` until `shutdown`, then removes the socket file.
pub async fn run(listener: UnixListener, path: PathBuf, control: Control, shutdown: CancellationToken) {
    let owner = std::fs::metadata(&path).map(|m| m.uid()).ok();
    let mut clients = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting on the control socket failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let control = control.clone();
        let shutdown = shutdown.clone();
        clients.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = serve_client(stream, owner, control) => {}
            }
        });
    }
    drop(listener);
    if let Err(error) = std::fs::remove_file(&path) {
        tracing::warn!(%error, path = %path.display(), "cannot remove the control socket");
    }
    clients.abort_all();
    while clients.join_next().await.is_some() {}
}

async fn serve_client(stream: UnixStream, owner: Option<u32>, control: Control) {
    let uid = match stream.peer_cred() {
        Ok(credentials) => credentials.uid(),
        Err(error) => {
            tracing::warn!(%error, "the control socket cannot tell who connected; refused");
            return;
        }
    };
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    if uid != 0 && Some(uid) != owner {
        tracing::warn!(uid, "refused a control connection from another user");
        let _ = send(&mut writer, &refusal("only root or the user enrolld runs as may use this socket")).await;
        return;
    }
    let mut line = String::new();
    let read = tokio::time::timeout(CLIENT_PATIENCE, (&mut reader).take(MAX_REQUEST).read_line(&mut line)).await;
    let request: Request = match read.ok().and_then(Result::ok).and_then(|_| serde_json::from_str(&line).ok()) {
        Some(request) => request,
        None => {
            let _ = send(&mut writer, &refusal("send one line of JSON: {\"command\": \"backup\", \"passphrase\": …}"))
                .await;
            return;
        }
    };
    if request.command != "backup" {
        let _ =
            send(&mut writer, &refusal(&format!("unknown command {:?}; the one command is backup", request.command)))
                .await;
        return;
    }
    let passphrase = match Passphrase::new(&request.passphrase) {
        Ok(passphrase) => passphrase,
        Err(error) => {
            let _ = send(&mut writer, &refusal(&error.to_string())).await;
            return;
        }
    };
    let made = {
        let Ok(_slot) = control.slots.clone().acquire_owned().await else { return };
        let control = control.clone();
        tokio::task::spawn_blocking(move || {
            let source = backup::Source {
                store: control.enrollment.store(),
                state_dir: &control.state_dir,
                host: &control.naming.hostname(),
                now: control.clock.now(),
            };
            backup::to_temporary_file(&source, &passphrase, &control.state_dir, &backup::Options::default())
        })
        .await
    };
    let (file, written) = match made {
        Ok(Ok(made)) => made,
        Ok(Err(error)) => {
            tracing::error!(%error, "a backup for the command line failed");
            let _ = send(&mut writer, &refusal(&error.to_string())).await;
            return;
        }
        Err(_) => return,
    };
    let answer = Answer {
        ok: true,
        bytes: Some(written.bytes),
        file_name: Some(backup::file_name(&written.header.host, written.header.created_at)),
        error: None,
    };
    let mut file = tokio::fs::File::from_std(file);
    let sent = async {
        send(&mut writer, &answer).await?;
        tokio::io::copy(&mut file, &mut writer).await?;
        writer.flush().await
    };
    if let Err(error) = sent.await {
        tracing::warn!(%error, "the command line stopped reading the backup");
        return;
    }
    let mut line = String::new();
    let confirmed = tokio::time::timeout(CLIENT_PATIENCE, (&mut reader).take(MAX_REQUEST).read_line(&mut line)).await;
    let saved = confirmed.ok().and_then(Result::ok).and_then(|_| serde_json::from_str::<Saved>(&line).ok());
    if !saved.is_some_and(|s| s.saved) {
        tracing::warn!("the command line did not confirm it saved the backup; not recorded as made");
        return;
    }
    let actor = Actor { name: if uid == 0 { "root".into() } else { format!("uid {uid}") }, client: None };
    let domain = control.enrollment.clone();
    let recorded = tokio::task::spawn_blocking(move || {
        domain.record_backup(&actor, "command line", written.bytes, written.header.created_at)
    })
    .await;
    match recorded {
        Ok(Ok(())) => tracing::info!(bytes = written.bytes, "backup made through the command line"),
        Ok(Err(error)) => tracing::error!(%error, "cannot record the backup"),
        Err(_) => {}
    }
}

fn refusal(error: &str) -> Answer {
    Answer { ok: false, bytes: None, file_name: None, error: Some(error.to_owned()) }
}

async fn send(writer: &mut (impl tokio::io::AsyncWrite + Unpin), answer: &Answer) -> io::Result<()> {
    let mut line = serde_json::to_vec(answer).unwrap_or_default();
    line.push(b'\n');
    writer.write_all(&line).await
}

/// Why the command line did not get a backup from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the running enrolld at {path} ({source}); run this as root or as the user enrolld runs as")]
    Connect { path: PathBuf, source: io::Error },
    #[error("the running enrolld refused: {0}")]
    Refused(String),
    #[error("the running enrolld stopped sending after {got} of {bytes} bytes; try again")]
    Short { got: u64, bytes: u64 },
    #[error("talking to the running enrolld: {0}")]
    Io(#[from] io::Error),
}

/// The command line's side: asks the daemon behind `socket` for a backup and writes it to `out`; then `save`
/// gets `out` back (to sync the file and rename it into place), and once it succeeded the daemon is told the file
/// is saved. Returns the backup's size.
pub fn request_backup<W: Write>(
    socket: &Path,
    passphrase: &str,
    mut out: W,
    save: impl FnOnce(W) -> io::Result<()>,
) -> Result<u64, ControlError> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|source| ControlError::Connect { path: socket.to_owned(), source })?;
    let mut writer = stream.try_clone()?;
    let request = Request { command: "backup".into(), passphrase: passphrase.into() };
    let mut line = serde_json::to_vec(&request).unwrap_or_default();
    line.push(b'\n');
    writer.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader.by_ref().take(MAX_REQUEST).read_line(&mut answer)?;
    let answer: Answer = serde_json::from_str(&answer)
        .map_err(|_| ControlError::Refused("it answered something that is not a control answer".into()))?;
    let bytes = match (answer.ok, answer.bytes) {
        (true, Some(bytes)) => bytes,
        _ => return Err(ControlError::Refused(answer.error.unwrap_or_else(|| "no reason given".into()))),
    };
    let got = io::copy(&mut reader.by_ref().take(bytes), &mut out)?;
    if got != bytes {
        return Err(ControlError::Short { got, bytes });
    }
    out.flush()?;
    save(out)?;
    let mut saved = serde_json::to_vec(&Saved { saved: true }).unwrap_or_default();
    saved.push(b'\n');
    writer.write_all(&saved)?;
    // The daemon records the backup and closes the connection; wait for that so the record is there on return.
    let _ = reader.read_to_end(&mut Vec::new());
    Ok(bytes)
}
