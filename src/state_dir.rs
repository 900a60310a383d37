//! The state directory: created private, checked writable, and locked so only one enrolld uses it at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "enrolld.lock";

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
        let write_pid = |lock: &mut File| -> io::Result<()> {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(lock, "{}", std::process::id())?;
            lock.sync_all()
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
        let first = StateDir::open(dir.path()).unwrap();
        let message = StateDir::open(dir.path()).unwrap_err().to_string();
        assert!(message.contains("in use by another running enrolld"), "{message}");
        assert!(message.contains(&format!("pid {}", std::process::id())), "{message}");
        drop(first);
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
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key.pem");
        write_private(&path, b"secret", 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }
}
