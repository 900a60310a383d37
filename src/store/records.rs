//! How each record is keyed and indexed: the [`Record`] impls that tell the store which index entries and counters a
//! record has, so that one `put` keeps all of them consistent.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::tree;
use crate::model::{
    AccountLink, Admin, AndroidIdentity, AppleIdentity, AuditEvent, DeliveryJob, Device, DeviceStatus, Group, Id,
    Invite, InviteStatus, JobKind, JobState, ScepChallenge, Session, Setting, StagedDevice, User, UserAccount,
    WindowsIdentity,
};

/// A certificate the appliance's CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial number in lower-case hex; also the record's key.
    pub serial: String,
    pub subject: String,
    /// Subject alternative names, DNS names and IP addresses as text.
    pub names: Vec<String>,
    /// Validity as Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub sha256: String,
    /// Why it was issued ("first start", "it expires on 2027-01-02", "names changed: +10.0.0.7").
    pub reason: String,
}

/// An index entry: in tree `tree`, `key` points at the record's primary key.
pub struct IndexEntry {
    pub tree: usize,
    pub key: Vec<u8>,
}

/// A kind of record the store keeps.
pub trait Record: Serialize + DeserializeOwned {
    /// The tree holding the records.
    const TREE: usize;
    /// The primary key.
    fn key(&self) -> Vec<u8>;
    /// Secondary index entries, each pointing at [`Record::key`].
    fn indexes(&self) -> Vec<IndexEntry> {
        Vec::new()
    }
    /// Counters this record adds one to (such as `invites.pending`).
    fn counters(&self) -> Vec<String> {
        Vec::new()
    }
}

fn entry(tree: usize, parts: &[&[u8]]) -> IndexEntry {
    IndexEntry { tree, key: parts.concat() }
}

/// Milliseconds since the epoch, big-endian, so keys sort by time.
pub fn time_key(at: time::OffsetDateTime) -> [u8; 8] {
    let millis = (at.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    millis.to_be_bytes()
}

pub fn invite_status_byte(status: InviteStatus) -> u8 {
    status as u8
}

pub fn device_status_byte(status: DeviceStatus) -> u8 {
    status as u8
}

/// Key of a hardware identifier in the device and staged indexes: `serial:C02XK`, `imei:35…`, `hwid:…`. IMEIs keep
/// only their digits (devices report them with spaces), serials drop spaces and dashes, all upper-cased.
pub fn hardware_key(kind: &str, value: &str) -> Vec<u8> {
    let canonical: String = match kind {
        "imei" => value.chars().filter(char::is_ascii_digit).collect(),
        "serial" => value.chars().filter(|c| !c.is_whitespace() && *c != '-').collect(),
        _ => value.trim().to_owned(),
    };
    format!("{kind}:{}", canonical.to_ascii_uppercase()).into_bytes()
}

impl Record for CertificateRecord {
    const TREE: usize = tree::CERTIFICATES;
    fn key(&self) -> Vec<u8> {
        self.serial.as_bytes().to_vec()
    }
}

impl Record for User {
    const TREE: usize = tree::USERS;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
    fn indexes(&self) -> Vec<IndexEntry> {
        vec![entry(tree::USERS_BY_EMAIL, &[self.email.as_bytes()])]
    }
    fn counters(&self) -> Vec<String> {
        vec!["users".into()]
    }
}

impl Record for Group {
    const TREE: usize = tree::GROUPS;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
    fn indexes(&self) -> Vec<IndexEntry> {
        vec![entry(tree::GROUPS_BY_NAME, &[self.name.to_lowercase().as_bytes()])]
    }
}

impl Record for Invite {
    const TREE: usize = tree::INVITES;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
    fn indexes(&self) -> Vec<IndexEntry> {
        let requested = time_key(self.requested_at);
        let mut entries = vec![
            entry(tree::INVITES_BY_TOKEN, &[self.token_hash.as_bytes()]),
            entry(tree::INVITES_BY_STATUS, &[&[invite_status_byte(self.status)], &requested, &self.id.0]),
            entry(tree::INVITES_BY_TIME, &[&requested, &self.id.0]),
            entry(tree::INVITES_BY_USER, &[&self.user_id.0, &self.id.0]),
        ];
        let platform = [self.platform as u8];
        entries.push(entry(tree::INVITES_BY_PLATFORM, &[&platform, &requested, &self.id.0]));
        let status = [invite_status_byte(self.status)];
        entries.push(entry(tree::INVITES_BY_STATUS_PLATFORM, &[&status, &platform, &requested, &self.id.0]));
        if let Some(group) = self.group_id {
            entries.push(entry(tree::INVITES_BY_GROUP, &[&group.0, &requested, &self.id.0]));
        }
        if self.status == InviteStatus::Pending {
            entries.push(entry(tree::INVITES_BY_EXPIRY, &[&time_key(self.expires_at), &self.id.0]));
        }
        entries
    }
    fn counters(&self) -> Vec<String> {
        vec![format!("invites.{}", self.status)]
    }
}

impl Record for Device {
    const TREE: usize = tree::DEVICES;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
    fn indexes(&self) -> Vec<IndexEntry> {
        let enrolled = time_key(self.enrolled_at);
        let mut entries = vec![
            entry(tree::DEVICES_BY_STATUS, &[&[device_status_byte(self.status)], &enrolled, &self.id.0]),
            entry(tree::DEVICES_BY_TIME, &[&enrolled, &self.id.0]),
        ];
        for (kind, value) in [("serial", &self.serial), ("imei", &self.imei), ("hwid", &self.hardware_id)] {
            if let Some(value) = value.as_deref().filter(|v| !v.trim().is_empty()) {
                entries.push(IndexEntry { tree: tree::DEVICES_BY_HARDWARE, key: hardware_key(kind, value) });
            }
        }
        if let Some(user) = self.user_id {
            entries.push(entry(tree::DEVICES_BY_USER, &[&user.0, &self.id.0]));
        }
        entries
    }
    fn counters(&self) -> Vec<String> {
        vec![format!("devices.{}", self.status)]
    }
}

impl Record for StagedDevice {
    const TREE: usize = tree::STAGED;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
    fn indexes(&self) -> Vec<IndexEntry> {
        let mut entries = Vec::new();
        for (kind, value) in [("serial", &self.serial), ("imei", &self.imei)] {
            if let Some(value) = value.as_deref().filter(|v| !v.trim().is_empty()) {
                entries.push(IndexEntry { tree: tree::STAGED_BY_HARDWARE, key: hardware_key(kind, value) });
            }
        }
        entries
    }
    fn counters(&self) -> Vec<String> {
        vec!["staged".into()]
    }
}

impl Record for AuditEvent {
    const TREE: usize = tree::AUDIT;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
}

impl Record for DeliveryJob {
    const TREE: usize = tree::OUTBOX;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
    fn indexes(&self) -> Vec<IndexEntry> {
        let mut entries = vec![entry(tree::OUTBOX_BY_INVITE, &[&self.invite_id.0, &self.id.0])];
        if let Some(due) = self.due_at() {
            entries.push(entry(tree::OUTBOX_DUE, &[&time_key(due), &self.id.0]));
        }
        entries
    }
    fn counters(&self) -> Vec<String> {
        // A reminder waits days for its time; it is scheduled, not queued, until then.
        if self.kind == JobKind::Reminder && self.state == JobState::Queued {
            return vec!["outbox.scheduled".into()];
        }
        vec![format!("outbox.{}", self.state)]
    }
}

impl Record for crate::model::Import {
    const TREE: usize = tree::IMPORTS;
    fn key(&self) -> Vec<u8> {
        self.id.0.to_vec()
    }
}

impl Record for Admin {
    const TREE: usize = tree::ADMINS;
    fn key(&self) -> Vec<u8> {
        self.username.as_bytes().to_vec()
    }
    fn counters(&self) -> Vec<String> {
        vec!["admins".into()]
    }
}

impl Record for Setting {
    const TREE: usize = tree::SETTINGS;
    fn key(&self) -> Vec<u8> {
        self.name.as_bytes().to_vec()
    }
}

impl Record for AppleIdentity {
    const TREE: usize = tree::APPLE_IDENTITIES;
    fn key(&self) -> Vec<u8> {
        self.sha256.as_bytes().to_vec()
    }
}

impl Record for AndroidIdentity {
    const TREE: usize = tree::ANDROID_IDENTITIES;
    fn key(&self) -> Vec<u8> {
        self.secret_hash.as_bytes().to_vec()
    }
}

impl Record for WindowsIdentity {
    const TREE: usize = tree::WINDOWS_IDENTITIES;
    fn key(&self) -> Vec<u8> {
        self.sha256.as_bytes().to_vec()
    }
}

impl Record for UserAccount {
    const TREE: usize = tree::USER_ACCOUNTS;
    fn key(&self) -> Vec<u8> {
        self.user_id.as_bytes().to_vec()
    }
}

impl Record for AccountLink {
    const TREE: usize = tree::ACCOUNT_LINKS;
    fn key(&self) -> Vec<u8> {
        self.token_hash.as_bytes().to_vec()
    }
}

impl Record for ScepChallenge {
    const TREE: usize = tree::SCEP_CHALLENGES;
    fn key(&self) -> Vec<u8> {
        self.hash.as_bytes().to_vec()
    }
}

impl Record for Session {
    const TREE: usize = tree::SESSIONS;
    fn key(&self) -> Vec<u8> {
        self.token_hash.as_bytes().to_vec()
    }
}

/// Decodes an index value (a primary key) into an [`Id`].
pub fn id_of(bytes: &[u8]) -> Option<Id> {
    Id::from_slice(bytes)
}
