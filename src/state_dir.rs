//! The state directory: created private, checked writable, and locked so only one enrolld uses it at a time; and
//! putting a restored backup in place of its contents, with the old ones moved aside.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "enrolld.lock";
/// The unix socket `enrolld backup` asks a running daemon through.
const CONTROL_SOCKET: &str = "control.sock";
/// A restored backup, verified and complete, waiting to be put in place at the next start.
const RESTORE_PENDING: &str = "restore-pending";
/// Where a restore is unpacked while it is verified (renamed to [`RESTORE_PENDING`] once it all checked out).
const RESTORE_UNPACKING: &str = "restore-pending.partial";
/// The contents a restore replaced are moved into `before-restore-<time>/`.
const BEFORE_RESTORE: &str = "before-restore-";
/// The journal of an install in progress, inside the directory being installed: where the old contents go and the
/// names being brought in, so an install cut short (a crash, a power cut) finishes the same way when run again.
const INSTALL_JOURNAL: &str = ".install";

/// An open, locked state directory. The lock is released when this is dropped (or the process ends).
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Holding the file keeps the advisory lock.
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state directory {dir} cannot be used: {reason}; choose another with --state-dir or make it writable for this user"
    )]
    Unusable { dir: PathBuf, reason: String },
    #[error(
        "state directory {dir} is in use by another running enrolld{holder}; stop that one first, or give this one its own --state-dir"
    )]
    Locked { dir: PathBuf, holder: String },
}

impl StateDir {
    /// Creates the directory if needed (mode 0700), verifies it is writable and takes its lock.
    pub fn open(path: &Path) -> Result<StateDir, StateDirError> {
        let unusable = |reason: String| StateDirError::Unusable { dir: path.to_owned(), reason };
        if path.exists() && !path.is_dir() {
            return Err(unusable("it exists and is not a directory".into()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| unusable(format!("cannot create it ({e})")))?;
        // It holds the CA key and every invite: private, even if it was made by hand with looser permissions.
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| unusable(format!("cannot make it private (chmod 0700: {e})")))?;
        let probe = path.join(".write-probe");
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|e| unusable(format!("cannot write in it ({e})")))?;

        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode_0600()
            .open(&lock_path)
            .map_err(|e| unusable(format!("cannot write {} ({e})", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                return Err(StateDirError::Locked { dir: path.to_owned(), holder });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(unusable(format!("cannot lock {} ({e})", lock_path.display())));
            }
        }
        // The pid only names the holder in another process's error; the lock itself dies with the process, so
        // nothing here needs to reach the disk (a sync would cost a journal commit on every start).
        let write_pid = |lock: &mut File| -> io::Result<()> {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(lock, "{}", std::process::id())
        };
        write_pid(&mut lock).map_err(|e| unusable(format!("cannot write {} ({e})", lock_path.display())))?;
        Ok(StateDir { path: path.to_owned(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the sled database lives.
    pub fn database(&self) -> PathBuf {
        self.path.join("db")
    }

    /// Where the CA and TLS keys and certificates live.
    pub fn pki(&self) -> PathBuf {
        self.path.join("pki")
    }

    /// The unix socket the running daemon answers `enrolld backup` on.
    pub fn control_socket(&self) -> PathBuf {
        control_socket(&self.path)
    }

    /// Where a backup uploaded on the setup page is unpacked and checked.
    pub fn restore_unpacking(&self) -> PathBuf {
        restore_unpacking(&self.path)
    }

    /// Where a checked backup waits for the next start.
    pub fn restore_pending(&self) -> PathBuf {
        restore_pending(&self.path)
    }

    /// Puts a complete `restore-pending/` in place of the directory's contents, the old ones moved into
    /// `before-restore-<stamp>/`; returns that directory, or `None` when no restore was waiting. A half-unpacked
    /// `restore-pending.partial/` (cut short before it was checked) is removed.
    pub fn install_pending_restore(&self, stamp: &str) -> io::Result<Option<PathBuf>> {
        let unpacking = self.restore_unpacking();
        if unpacking.exists() {
            fs::remove_dir_all(&unpacking)?;
        }
        let pending = self.restore_pending();
        if !pending.is_dir() {
            return Ok(None);
        }
        let aside = self.path.join(format!("{BEFORE_RESTORE}{stamp}"));
        install_restored(&self.path, &pending, &aside).map(Some)
    }
}

/// A time as the names of moved-aside directories carry it: `yyyymmdd-hhmmss`, UTC.
pub fn stamp(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Where a backup is unpacked and checked in the state directory at `dir`.
pub fn restore_unpacking(dir: &Path) -> PathBuf {
    dir.join(RESTORE_UNPACKING)
}

/// Where a checked backup waits for the next start, in the state directory at `dir`.
pub fn restore_pending(dir: &Path) -> PathBuf {
    dir.join(RESTORE_PENDING)
}

/// Gives the owner of `dir` everything in it (but the contents moved aside by restores) that belongs to someone
/// else, as when root restores a backup into the directory of the service's own user. Links are changed themselves,
/// never followed.
pub fn give_to_owner(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = fs::metadata(dir)?;
    let (uid, gid) = (owner.uid(), owner.gid());
    let mut pending = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(BEFORE_RESTORE) {
            pending.push(entry.path());
        }
    }
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path)?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Whether a running enrolld holds the state directory at `dir`: `Some` with its pid (or an empty string), found
/// without creating or changing anything.
pub fn holder(dir: &Path) -> io::Result<Option<String>> {
    let mut lock = match File::open(dir.join(LOCK_FILE)) {
        Ok(lock) => lock,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    match lock.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            Ok(Some(pid.trim().to_owned()))
        }
        Err(fs::TryLockError::Error(error)) => Err(error),
    }
}

/// The control socket of the state directory at `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

/// What a state directory holds besides its lock (and the bookkeeping of restores): empty for a new directory.
pub fn contents(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !kept_through_restore(&name) {
                    names.push(name);
                }
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    names.sort();
    Ok(names)
}

/// Entries a restore leaves where they are: the lock (held by whoever restores), the socket, and restores' own
/// directories.
fn kept_through_restore(name: &str) -> bool {
    name == LOCK_FILE
        || name == CONTROL_SOCKET
        || name == RESTORE_PENDING
        || name == RESTORE_UNPACKING
        || name.starts_with(BEFORE_RESTORE)
}

/// Moves the contents of `state` (all but its lock and restores' own directories) into `aside`, made only if there
/// is something to move, then the contents of `staged` into `state`, and removes `staged`. Every step is a rename
/// within one file system. A journal in `staged` makes it safe to run again after an interruption: what was already
/// brought in stays, what is old still goes aside.
pub fn install_restored(state: &Path, staged: &Path, aside: &Path) -> io::Result<PathBuf> {
    let journal_path = staged.join(INSTALL_JOURNAL);
    let (aside, names) = match fs::read_to_string(&journal_path) {
        Ok(text) => {
            let mut lines = text.lines();
            let aside = PathBuf::from(lines.next().unwrap_or_default());
            (aside, lines.map(str::to_owned).collect::<Vec<_>>())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let mut names = Vec::new();
            for entry in fs::read_dir(staged)? {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            let mut journal = aside.to_string_lossy().into_owned();
            for name in &names {
                journal.push('\n');
                journal.push_str(name);
            }
            write_private(&journal_path, journal.as_bytes(), 0o600)?;
            (aside.to_owned(), names)
        }
        Err(error) => return Err(error),
    };
    if aside.as_os_str().is_empty() || aside.starts_with(staged) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged", journal_path.display())));
    }
    let mut old = Vec::new();
    for entry in fs::read_dir(state)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let brought_in = names.contains(&name) && !staged.join(&name).exists();
        if kept_through_restore(&name) || path == staged || path == aside || brought_in {
            continue;
        }
        old.push(name);
    }
    if !old.is_empty() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&aside)?;
        for name in &old {
            fs::rename(state.join(name), aside.join(name))?;
        }
    }
    for name in &names {
        let from = staged.join(name);
        if from.exists() {
            fs::rename(&from, state.join(name))?;
        }
    }
    fs::remove_file(&journal_path)?;
    fs::remove_dir(staged)?;
    File::open(state)?.sync_all()?;
    if aside.is_dir() {
        File::open(&aside)?.sync_all()?;
    }
    Ok(aside)
}

trait OpenOptionsExt0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl OpenOptionsExt0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// A 256-bit secret kept in a 0600 file (created with fresh random bytes on first use).
pub fn secret_file(path: &Path) -> io::Result<[u8; 32]> {
    match fs::read(path) {
        Ok(bytes) => bytes.as_slice().try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not 32 bytes; restore it from a backup", path.display()),
            )
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| io::Error::other("the system random number generator failed"))?;
            write_private(path, &secret, 0o600)?;
            Ok(secret)
        }
        Err(error) => Err(error),
    }
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename) with the given permission bits.
pub fn write_private(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode_0600().open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(holder(dir.path()).unwrap(), None);
        let first = StateDir::open(dir.path()).unwrap();
        assert_eq!(holder(dir.path()).unwrap(), Some(std::process::id().to_string()));
        let message = StateDir::open(dir.path()).unwrap_err().to_string();
        assert!(message.contains("in use by another running enrolld"), "{message}");
        assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
        drop(first);
        assert_eq!(holder(dir.path()).unwrap(), None);
        StateDir::open(dir.path()).unwrap();
    }

    #[test]
    fn an_existing_directory_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        let _open = StateDir::open(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_file_in_the_way_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        fs::write(&file, b"x").unwrap();
        let message = StateDir::open(&file).unwrap_err().to_string();
        assert!(message.contains("not a directory") && message.contains("--state-dir"), "{message}");
    }

    #[test]
    fn a_secret_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let first = secret_file(&path).unwrap();
        assert_eq!(secret_file(&path).unwrap(), first);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, b"short").unwrap();
        assert!(secret_file(&path).unwrap_err().to_string().contains("restore it from a backup"));
    }

    #[test]
    fn a_pending_restore_replaces_the_contents_and_the_old_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert_eq!(state.install_pending_restore("20260101-000000").unwrap(), None, "nothing waiting");
        fs::create_dir_all(dir.path().join("db")).unwrap();
        fs::write(dir.path().join("db/old"), b"old").unwrap();
        fs::create_dir_all(dir.path().join("imports")).unwrap();
        fs::create_dir_all(state.restore_pending().join("db")).unwrap();
        fs::write(state.restore_pending().join("db/new"), b"new").unwrap();
        fs::create_dir_all(state.restore_pending().join("pki")).unwrap();
        fs::create_dir_all(state.restore_unpacking()).unwrap();
        assert_eq!(contents(dir.path()).unwrap(), ["db", "imports"]);

        let aside = state.install_pending_restore("20260101-000000").unwrap().unwrap();
        assert_eq!(aside, dir.path().join("before-restore-20260101-000000"));
        assert_eq!(fs::read(dir.path().join("db/new")).unwrap(), b"new");
        assert!(dir.path().join("pki").is_dir() && !dir.path().join("imports").exists());
        assert_eq!(fs::read(aside.join("db/old")).unwrap(), b"old");
        assert!(aside.join("imports").is_dir());
        assert!(!state.restore_pending().exists() && !state.restore_unpacking().exists());
        assert!(dir.path().join(LOCK_FILE).exists(), "the lock stays");
    }

    #[test]
    fn restored_files_are_given_to_the_directorys_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("pki")).unwrap();
        fs::write(dir.path().join("pki/ca.key"), b"key").unwrap();
        fs::create_dir_all(dir.path().join("before-restore-1")).unwrap();
        let me = fs::metadata(dir.path()).unwrap().uid();
        give_to_owner(dir.path()).unwrap();
        assert_eq!(fs::metadata(dir.path().join("pki/ca.key")).unwrap().uid(), me, "nothing to change");
        if me != 0 {
            return; // Only root can give files away; the rest needs it.
        }
        std::os::unix::fs::chown(dir.path(), Some(4321), Some(4321)).unwrap();
        give_to_owner(dir.path()).unwrap();
        assert_eq!(fs::metadata(dir.path().join("pki")).unwrap().uid(), 4321);
        assert_eq!(fs::metadata(dir.path().join("pki/ca.key")).unwrap().gid(), 4321);
        assert_eq!(fs::metadata(dir.path().join("before-restore-1")).unwrap().uid(), 0, "the old contents stay");
    }

    #[test]
    fn an_install_cut_short_finishes_when_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let (state, staged, aside) = (dir.path().join("state"), dir.path().join("staged"), dir.path().join("aside"));
        for (path, text) in
            [("state/db", "old db"), ("state/pki", "old pki"), ("staged/db", "new db"), ("staged/pki", "new pki")]
        {
            fs::create_dir_all(dir.path().join(path).parent().unwrap()).unwrap();
            fs::write(dir.path().join(path), text).unwrap();
        }
        // As if a first run wrote its journal, moved the old db aside and brought the new one in, then stopped.
        write_private(&staged.join(INSTALL_JOURNAL), format!("{}\ndb\npki", aside.display()).as_bytes(), 0o600)
            .unwrap();
        fs::create_dir(&aside).unwrap();
        fs::rename(state.join("db"), aside.join("db")).unwrap();
        fs::rename(staged.join("db"), state.join("db")).unwrap();

        install_restored(&state, &staged, &dir.path().join("another")).unwrap();
        assert_eq!(fs::read_to_string(state.join("db")).unwrap(), "new db", "what was brought in stays");
        assert_eq!(fs::read_to_string(state.join("pki")).unwrap(), "new pki");
        assert_eq!(fs::read_to_string(aside.join("db")).unwrap(), "old db");
        assert_eq!(fs::read_to_string(aside.join("pki")).unwrap(), "old pki", "the journal's aside is used");
        assert!(!staged.exists() && !dir.path().join("another").exists());
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key.pem");
        write_private(&path, b"secret", 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }
}
