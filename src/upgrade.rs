//! Upgrades on the appliance: what the box runs (the release file `image/build` writes, `/etc/enrolld-release`),
//! and the upgrade bundles an admin uploads.
//!
//! enrolld never installs anything itself: it runs as an unprivileged user and writes only in its state directory.
//! It checks that an upload is a bundle for this box (an uncompressed tar whose first member is the `manifest`),
//! keeps it as `upgrade/bundle.update` and leaves an `upgrade/request`; on the appliance a root service started by
//! that file (`enrolld-upgrade.path` → `enrolld-update --request`) verifies the bundle's signature and checksums,
//! installs it into the other root slot and restarts the box, writing how it went to `upgrade/status`, which enrolld
//! reads back for the admin.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The bundle as uploaded, while it arrives.
const PARTIAL: &str = "bundle.update.partial";
/// The bundle handed to the installer.
const BUNDLE: &str = "bundle.update";
/// Its presence starts the installer.
const REQUEST: &str = "request";
/// What the installer last did (`KEY=value` lines).
const STATUS: &str = "status";
/// A manifest larger than this is not one `image/build` wrote.
const MANIFEST_MAX: u64 = 4096;
/// The largest bundle taken (they are about 120 MB for amd64 and 160 MB for arm64).
pub const MAX_BYTES: u64 = 1 << 30;

/// What the box runs, from the release file; absent when enrolld does not run from the appliance image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Release {
    /// The image's version, such as `0.1.0-20261207120000`.
    pub version: String,
    /// `amd64` or `arm64`.
    pub arch: String,
}

impl Release {
    /// Reads `KEY=value` lines; `None` if the file is missing or names no version and architecture.
    pub fn read(path: &Path) -> Option<Release> {
        let text = fs::read_to_string(path).ok()?;
        let version = field(&text, "VERSION")?;
        let arch = field(&text, "ARCH")?;
        Some(Release { version, arch })
    }
}

fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Where an upgrade stands, as the admin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeState {
    /// Nothing uploaded.
    Idle,
    /// The box restarted into the version the installer put in place.
    Upgraded,
    /// A bundle is waiting for the installer.
    Waiting,
    /// The installer is writing the other slot.
    Installing,
    /// Installed; the box restarts into it.
    Installed,
    /// The installer refused the bundle or could not install it.
    Failed,
    /// Installed, but the box came back on the version it ran before: the new one did not start.
    RolledBack,
}

/// The upgrade section of the Settings page and `GET /api/v1/system/upgrade`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UpgradeStatus {
    /// What the box runs; `None` when this is not the appliance image (upgrade by replacing the binary).
    pub running: Option<Release>,
    pub state: UpgradeState,
    /// The version the last upload or installation was about.
    pub version: Option<String>,
    /// What the installer said, in a sentence.
    pub message: Option<String>,
    /// When the installer last wrote (Unix seconds).
    pub at: Option<i64>,
}

/// Why an upload was not taken.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "this enrolld does not run from the appliance image, so it cannot upgrade itself; replace the binary instead (the database migrates at the next start)"
    )]
    NotAppliance,
    #[error("an upgrade to {0} is already being installed; wait for the box to restart")]
    Busy(String),
    #[error("this is not an enrolld upgrade bundle ({0}); upload the .update file made with the image")]
    NotABundle(String),
    #[error("the bundle is for {bundle} boxes; this box is {running}: download the {running} bundle")]
    WrongArch { bundle: String, running: String },
    #[error("this box already runs {0}")]
    SameVersion(String),
    #[error("the bundle is larger than {0} bytes; it is not one made for this box")]
    TooLarge(u64),
    #[error("the bundle could not be kept ({0}); free some space on the box and upload it again")]
    Io(#[from] io::Error),
}

/// The upgrade directory of the state directory, and what the box runs.
#[derive(Debug, Clone)]
pub struct Upgrades {
    dir: PathBuf,
    running: Option<Release>,
    max_bytes: u64,
}

impl Upgrades {
    pub fn new(state_dir: &Path, release_file: &Path, max_bytes: u64) -> Upgrades {
        Upgrades { dir: state_dir.join("upgrade"), running: Release::read(release_file), max_bytes }
    }

    pub fn running(&self) -> Option<&Release> {
        self.running.as_ref()
    }

    /// The largest upload taken.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn status(&self) -> UpgradeStatus {
        let status = fs::read_to_string(self.dir.join(STATUS)).unwrap_or_default();
        let waiting = self.dir.join(REQUEST).exists();
        let version = field(&status, "version");
        let state = match field(&status, "state").as_deref() {
            _ if waiting => UpgradeState::Waiting,
            Some("installing") => UpgradeState::Installing,
            Some("failed") => UpgradeState::Failed,
            Some("installed") => match (&self.running, &version) {
                // Written just before the restart; once the box runs something else, the new version did not
                // start and the boot loader went back.
                (Some(running), Some(version)) if running.version == *version => UpgradeState::Upgraded,
                (Some(_), Some(_)) if self.booted_since(&status) => UpgradeState::RolledBack,
                _ => UpgradeState::Installed,
            },
            _ => UpgradeState::Idle,
        };
        let waiting_version = waiting.then(|| fs::read_to_string(self.dir.join(REQUEST)).ok()).flatten();
        UpgradeStatus {
            running: self.running.clone(),
            state,
            version: waiting_version.as_deref().and_then(|r| field(r, "version")).or(version),
            message: field(&status, "message"),
            at: field(&status, "time").and_then(|t| t.parse().ok()),
        }
    }

    /// Whether this enrolld started after the installer wrote its status (so a restart happened since).
    fn booted_since(&self, status: &str) -> bool {
        let written = field(status, "time").and_then(|t| t.parse::<i64>().ok());
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|now| i64::try_from(now.as_secs()).ok())
            .map(|now| now - uptime_secs().unwrap_or(0));
        matches!((written, started), (Some(written), Some(started)) if started > written)
    }

    /// Starts taking an upload: refused when this is not the appliance or an upgrade is under way.
    pub fn begin(&self) -> Result<Upload, UpgradeError> {
        if self.running.is_none() {
            return Err(UpgradeError::NotAppliance);
        }
        let status = self.status();
        if matches!(status.state, UpgradeState::Waiting | UpgradeState::Installing) {
            return Err(UpgradeError::Busy(status.version.unwrap_or_default()));
        }
        fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(PARTIAL);
        let file = File::create(&path)?;
        Ok(Upload { file, path, written: 0, max_bytes: self.max_bytes })
    }

    /// Checks a complete upload and hands it to the installer: the bundle must be for this box's architecture and
    /// not the version it runs (the installer checks the signature, the checksums, and that it is newer).
    pub fn submit(&self, upload: Upload, requested_by: &str) -> Result<Release, UpgradeError> {
        let Upload { file, path, .. } = upload;
        let checked = (|| {
            file.sync_all()?;
            drop(file);
            let manifest = read_manifest(&mut File::open(&path)?)?;
            let running = self.running.as_ref().ok_or(UpgradeError::NotAppliance)?;
            if manifest.arch != running.arch {
                return Err(UpgradeError::WrongArch { bundle: manifest.arch, running: running.arch.clone() });
            }
            if manifest.version == running.version {
                return Err(UpgradeError::SameVersion(manifest.version));
            }
            Ok(manifest)
        })();
        let manifest = match checked {
            Ok(manifest) => manifest,
            Err(error) => {
                let _ = fs::remove_file(&path);
                return Err(error);
            }
        };
        fs::rename(&path, self.dir.join(BUNDLE))?;
        let _ = fs::remove_file(self.dir.join(STATUS));
        let request = format!("version={}\nrequested_by={}\n", manifest.version, requested_by.replace('\n', " "));
        crate::state_dir::write_private(&self.dir.join(REQUEST), request.as_bytes(), 0o644)?;
        Ok(manifest)
    }
}

/// An upload being written to the state directory; counted against the limit.
#[derive(Debug)]
pub struct Upload {
    file: File,
    path: PathBuf,
    written: u64,
    max_bytes: u64,
}

impl Upload {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), UpgradeError> {
        self.written += chunk.len() as u64;
        if self.written > self.max_bytes {
            let _ = fs::remove_file(&self.path);
            return Err(UpgradeError::TooLarge(self.max_bytes));
        }
        self.file.write_all(chunk)?;
        Ok(())
    }

    /// Gives up on the upload (the client went away, or a write failed).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The bundle's first tar member, which must be its manifest: `FORMAT`, `VERSION` and `ARCH` lines.
fn read_manifest(file: &mut File) -> Result<Release, UpgradeError> {
    let not_a_bundle = |why: &str| UpgradeError::NotABundle(why.to_owned());
    let mut header = [0u8; 512];
    file.read_exact(&mut header).map_err(|_| not_a_bundle("it is shorter than one tar header"))?;
    if &header[257..262] != b"ustar" {
        return Err(not_a_bundle("it is not a tar archive"));
    }
    let name_end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
    if &header[..name_end] != b"manifest" || !matches!(header[156], b'0' | 0) {
        return Err(not_a_bundle("its first member is not the manifest"));
    }
    let size_text = String::from_utf8_lossy(&header[124..136]);
    let size = u64::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8)
        .map_err(|_| not_a_bundle("its manifest's size is unreadable"))?;
    if size > MANIFEST_MAX {
        return Err(not_a_bundle("its manifest is too large"));
    }
    let mut text = String::new();
    file.take(size).read_to_string(&mut text).map_err(|_| not_a_bundle("its manifest is not text"))?;
    if field(&text, "FORMAT").as_deref() != Some("1") {
        return Err(not_a_bundle("its format is not one this box knows; install the version in between first"));
    }
    let version = field(&text, "VERSION").ok_or_else(|| not_a_bundle("its manifest names no version"))?;
    let arch = field(&text, "ARCH").ok_or_else(|| not_a_bundle("its manifest names no architecture"))?;
    Ok(Release { version, arch })
}

fn uptime_secs() -> Option<i64> {
    let text = fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(seconds as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar archive as `tar -cf` writes it: ustar headers, members padded to 512 bytes, two zero blocks.
    fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            let mut header = [0u8; 512];
            header[..name.len()].copy_from_slice(name.as_bytes());
            header[100..108].copy_from_slice(b"0000644\0");
            header[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
            header[156] = b'0';
            header[257..263].copy_from_slice(b"ustar\0");
            out.extend_from_slice(&header);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn appliance(dir: &Path) -> Upgrades {
        let release = dir.join("release");
        fs::write(&release, "VERSION=0.1.0-1\nARCH=amd64\nKERNEL=6.1\n").unwrap();
        Upgrades::new(&dir.join("state"), &release, 1 << 20)
    }

    fn upload(upgrades: &Upgrades, bytes: &[u8]) -> Result<Release, UpgradeError> {
        let mut upload = upgrades.begin()?;
        upload.write(bytes)?;
        upgrades.submit(upload, "admin")
    }

    #[test]
    fn a_bundle_for_this_box_is_handed_to_the_installer() {
        let dir = tempfile::tempdir().unwrap();
        let upgrades = appliance(dir.path());
        assert_eq!(upgrades.status().state, UpgradeState::Idle);
        let bundle = tar(&[("manifest", b"FORMAT=1\nVERSION=0.1.0-2\nARCH=amd64\nCMDLINE=rw quiet\n"), ("root", b"x")]);
        let offered = upload(&upgrades, &bundle).unwrap();
        assert_eq!(offered.version, "0.1.0-2");
        assert_eq!(fs::read(dir.path().join("state/upgrade/bundle.update")).unwrap(), bundle);
        let status = upgrades.status();
        assert_eq!((status.state, status.version.as_deref()), (UpgradeState::Waiting, Some("0.1.0-2")));
        assert!(matches!(upload(&upgrades, &bundle), Err(UpgradeError::Busy(v)) if v == "0.1.0-2"));

        // The installer takes the request and reports.
        let upgrade = dir.path().join("state/upgrade");
        fs::remove_file(upgrade.join("request")).unwrap();
        fs::write(upgrade.join("status"), "state=failed\nversion=0.1.0-2\nmessage=not signed\ntime=1\n").unwrap();
        let status = upgrades.status();
        assert_eq!((status.state, status.message.as_deref()), (UpgradeState::Failed, Some("not signed")));
        fs::write(upgrade.join("status"), "state=installed\nversion=0.1.0-1\ntime=1\n").unwrap();
        assert_eq!(upgrades.status().state, UpgradeState::Upgraded, "running what was installed");
        fs::write(upgrade.join("status"), "state=installed\nversion=0.1.0-2\ntime=1\n").unwrap();
        assert_eq!(upgrades.status().state, UpgradeState::RolledBack, "restarted since, on the old version");
    }

    #[test]
    fn what_is_not_a_bundle_for_this_box_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let upgrades = appliance(dir.path());
        let cases: [(Vec<u8>, &str); 6] = [
            (b"PK\x03\x04 a zip file".to_vec(), "shorter than one tar header"),
            (vec![0u8; 2048], "not a tar archive"),
            (tar(&[("root.img.zst", b"x"), ("manifest", b"FORMAT=1")]), "first member is not the manifest"),
            (tar(&[("manifest", b"FORMAT=2\nVERSION=9\nARCH=amd64\n")]), "format is not one this box knows"),
            (tar(&[("manifest", b"FORMAT=1\nVERSION=0.2.0\nARCH=arm64\n")]), "for arm64 boxes; this box is amd64"),
            (tar(&[("manifest", b"FORMAT=1\nVERSION=0.1.0-1\nARCH=amd64\n")]), "already runs 0.1.0-1"),
        ];
        for (bytes, expected) in cases {
            let message = upload(&upgrades, &bytes).unwrap_err().to_string();
            assert!(message.contains(expected), "{expected}: {message}");
            let kept: Vec<_> = fs::read_dir(dir.path().join("state/upgrade")).unwrap().collect();
            assert!(kept.is_empty(), "{expected}: nothing is kept");
            assert_eq!(upgrades.status().state, UpgradeState::Idle);
        }
        let mut too_large = upgrades.begin().unwrap();
        assert!(matches!(too_large.write(&vec![0u8; (1 << 20) + 1]), Err(UpgradeError::TooLarge(_))));
        assert!(!dir.path().join("state/upgrade/bundle.update.partial").exists());
    }

    #[test]
    fn a_host_that_is_not_the_appliance_does_not_take_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let upgrades = Upgrades::new(dir.path(), &dir.path().join("no-release"), 1 << 20);
        assert_eq!(upgrades.status().running, None);
        assert!(matches!(upgrades.begin(), Err(UpgradeError::NotAppliance)));
    }
}
