//! Apple configuration profiles: the enrollment profile (`com.apple.security.root` with the appliance CA,
//! `com.apple.security.scep` with a one-time challenge and the SCEP CA's fingerprint, `com.apple.mdm`) and the CA-only trust profile. Payload
//! identifiers are stable for the appliance (derived from its CA), so a later profile replaces an earlier one and
//! `RemoveProfile` can name it; payload UUIDs are new in every profile. Keys follow Apple's schemas
//! (apple/device-management `mdm/profiles/`).

use plist::{Dictionary, Value};

use crate::domain::random_bytes;
use crate::model::{Ownership, Platform};

/// `AccessRights` (com.apple.mdm): every right, 8191.
const ALL_RIGHTS: i64 = 8191;
/// The "device erase" right (8); personal devices' profiles leave it out, so the device itself refuses an erase.
const ERASE_RIGHT: i64 = 8;

/// The appliance's stable payload identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifiers {
    pub enrollment: String,
    pub ca: String,
    pub scep: String,
    pub mdm: String,
    /// The CA-only trust profile's.
    pub trust: String,
}

/// The identifiers for the appliance whose CA is `ca_der`.
pub fn identifiers(ca_der: &[u8]) -> Identifiers {
    let base = format!("local.enrolld.{}", &crate::pki::sha256_hex(ca_der)[..16]);
    Identifiers {
        enrollment: format!("{base}.enrollment"),
        ca: format!("{base}.ca"),
        scep: format!("{base}.scep"),
        mdm: format!("{base}.mdm"),
        trust: base,
    }
}

/// A random (version 4) UUID in upper case, as Apple's profiles write them.
pub fn uuid_v4() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The name profiles show for the appliance.
pub fn display_name(organisation: &str) -> String {
    if organisation.is_empty() {
        "Device enrollment appliance".to_owned()
    } else {
        format!("{organisation} device enrollment")
    }
}

/// The `com.apple.security.root` payload holding the appliance CA.
pub fn root_payload(ca_der: &[u8], organisation: &str) -> Dictionary {
    Dictionary::from_iter([
        ("PayloadType", Value::from("com.apple.security.root")),
        ("PayloadVersion", Value::from(1)),
        ("PayloadIdentifier", Value::from(identifiers(ca_der).ca)),
        ("PayloadUUID", Value::from(uuid_v4())),
        ("PayloadDisplayName", Value::from(format!("{} CA", display_name(organisation)))),
        ("PayloadCertificateFileName", Value::from("enrolld-ca.cer")),
        ("PayloadContent", Value::Data(ca_der.to_vec())),
    ])
}

/// What an enrollment profile is made of.
#[derive(Debug, Clone)]
pub struct EnrollmentProfile<'a> {
    pub ca_der: &'a [u8],
    /// The SCEP CA (what `GetCACert` answers): the device checks that answer against its SHA-256 (`CAFingerprint`).
    pub scep_ca_der: &'a [u8],
    pub organisation: &'a str,
    /// `https://host[:port]`, where devices reach enrolld.
    pub public_url: &'a str,
    /// The push certificate's Topic.
    pub topic: &'a str,
    /// The one-time SCEP challenge.
    pub challenge: &'a str,
    /// Names the device in its identity's subject.
    pub invite: String,
    pub platform: Platform,
    pub ownership: Ownership,
}

impl EnrollmentProfile<'_> {
    /// The profile as a plist dictionary.
    pub fn build(&self) -> Value {
        let ids = identifiers(self.ca_der);
        let scep_uuid = uuid_v4();
        let mut subject = vec![Value::Array(vec![Value::Array(vec![
            Value::from("CN"),
            Value::from(format!("enrolld device {}", self.invite)),
        ])])];
        if !self.organisation.is_empty() {
            subject.push(Value::Array(vec![Value::Array(vec![Value::from("O"), Value::from(self.organisation)])]));
        }
        let scep = Dictionary::from_iter([
            ("PayloadType", Value::from("com.apple.security.scep")),
            ("PayloadVersion", Value::from(1)),
            ("PayloadIdentifier", Value::from(ids.scep)),
            ("PayloadUUID", Value::from(scep_uuid.clone())),
            ("PayloadDisplayName", Value::from("Device identity")),
            (
                "PayloadContent",
                Value::Dictionary(Dictionary::from_iter([
                    ("URL", Value::from(format!("{}/scep", self.public_url))),
                    ("Name", Value::from("enrolld")),
                    ("Subject", Value::Array(subject)),
                    ("Challenge", Value::from(self.challenge)),
                    (
                        "CAFingerprint",
                        Value::Data(ring::digest::digest(&ring::digest::SHA256, self.scep_ca_der).as_ref().to_vec()),
                    ),
                    ("Keysize", Value::from(2048)),
                    ("Key Type", Value::from("RSA")),
                    // Signing and encryption.
                    ("Key Usage", Value::from(5)),
                    ("Retries", Value::from(3)),
                    ("RetryDelay", Value::from(10)),
                ])),
            ),
        ]);
        let rights = match self.ownership {
            Ownership::Corporate => ALL_RIGHTS,
            _ => ALL_RIGHTS & !ERASE_RIGHT,
        };
        let mdm = Dictionary::from_iter([
            ("PayloadType", Value::from("com.apple.mdm")),
            ("PayloadVersion", Value::from(1)),
            ("PayloadIdentifier", Value::from(ids.mdm)),
            ("PayloadUUID", Value::from(uuid_v4())),
            ("PayloadDisplayName", Value::from("Device management")),
            ("IdentityCertificateUUID", Value::from(scep_uuid)),
            ("Topic", Value::from(self.topic)),
            ("ServerURL", Value::from(format!("{}/mdm/apple/server", self.public_url))),
            ("CheckInURL", Value::from(format!("{}/mdm/apple/checkin", self.public_url))),
            ("SignMessage", Value::from(true)),
            ("CheckOutWhenRemoved", Value::from(true)),
            ("AccessRights", Value::from(rights)),
            // No ServerCapabilities: without com.apple.mdm.per-user-connections, macOS opens no user channel,
            // which enrolld does not manage.
        ]);
        let name = display_name(self.organisation);
        let mut profile = Dictionary::from_iter([
            ("PayloadType", Value::from("Configuration")),
            ("PayloadVersion", Value::from(1)),
            ("PayloadIdentifier", Value::from(ids.enrollment)),
            ("PayloadUUID", Value::from(uuid_v4())),
            ("PayloadDisplayName", Value::from(format!("{name}: device management"))),
            (
                "PayloadDescription",
                Value::from(
                    "Enrolls this device in your organisation's device management: it trusts the appliance, receives its own identity certificate, and can be managed until you remove this profile.",
                ),
            ),
            ("PayloadRemovalDisallowed", Value::from(false)),
            (
                "PayloadContent",
                Value::Array(vec![
                    Value::Dictionary(root_payload(self.ca_der, self.organisation)),
                    Value::Dictionary(scep),
                    Value::Dictionary(mdm),
                ]),
            ),
        ]);
        if !self.organisation.is_empty() {
            profile.insert("PayloadOrganization".into(), Value::from(self.organisation));
        }
        if self.platform == Platform::Macos {
            profile.insert("PayloadScope".into(), Value::from("System"));
        }
        Value::Dictionary(profile)
    }
}
