//! The enrollment domain's records: users, groups, invites, devices, staged devices, the audit log, delivery jobs,
//! admin accounts and sessions. Plain data (serde), shared by the store that keeps them and the domain that changes
//! them; the rules live in `domain`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

/// A record identifier: 6 bytes of creation time (milliseconds) then 10 random bytes, written as 32 hex digits.
/// Sorts by creation time and cannot be guessed.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(pub [u8; 16]);

impl Id {
    pub fn new(at: OffsetDateTime, random: [u8; 10]) -> Id {
        let millis = (at.unix_timestamp_nanos() / 1_000_000).clamp(0, (1 << 48) - 1) as u64;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6..].copy_from_slice(&random);
        Id(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Id> {
        Some(Id(bytes.try_into().ok()?))
    }

    /// The next id in sort order (the 128-bit number plus one).
    pub fn successor(&self) -> Id {
        Id(u128::from_be_bytes(self.0).wrapping_add(1).to_be_bytes())
    }
}

/// Hands out ids that increase strictly, even when several are made in the same millisecond (then each is the
/// previous one plus one), so records sort in the order they were made.
#[derive(Debug, Default)]
pub struct IdSequence {
    last: std::sync::Mutex<Option<Id>>,
}

impl IdSequence {
    pub fn next(&self, at: OffsetDateTime, random: [u8; 10]) -> Id {
        let fresh = Id::new(at, random);
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = match *last {
            Some(previous) if fresh <= previous => previous.successor(),
            _ => fresh,
        };
        *last = Some(id);
        id
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Id {
    type Err = ();
    fn from_str(text: &str) -> Result<Id, ()> {
        if text.len() != 32 || !text.is_ascii() {
            return Err(());
        }
        let mut bytes = [0u8; 16];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| ())?;
        }
        Ok(Id(bytes))
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Id, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(|()| serde::de::Error::custom("expected a 32-hex-digit id"))
    }
}

impl utoipa::PartialSchema for Id {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-f]{32}$"))
            .description(Some("Identifier: 32 hex digits, sortable by creation time"))
            .into()
    }
}

impl ToSchema for Id {}

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> Result<Self, String> {
                let lowered = text.trim().to_ascii_lowercase();
                $name::ALL.iter().copied().find(|v| v.as_str() == lowered).ok_or_else(|| {
                    let names: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                    format!("{text:?} is not one of {}", names.join(", "))
                })
            }
        }
    };
}

wire_enum!(
    /// The device platform an invite is for; `any` lets the enrollment page pick from the device.
    Platform { Ios = "ios", Ipados = "ipados", Macos = "macos", Android = "android", Windows = "windows", Any = "any" }
);
wire_enum!(
    /// Who owns the device: personal (BYOD) devices can never be factory-reset by the admin.
    Ownership { Personal = "personal", Corporate = "corporate", NotSet = "not_set" }
);
wire_enum!(
    /// How an invite reaches the user.
    Channels { Email = "email", Sms = "sms", Both = "both" }
);
wire_enum!(
    /// Where an invite stands. Only `pending` invites can enroll a device.
    InviteStatus { Pending = "pending", Expired = "expired", Enrolled = "enrolled", Removed = "removed" }
);
wire_enum!(
    /// Where an enrolled device stands.
    DeviceStatus { Enrolled = "enrolled", Unmanaged = "unmanaged", Deprovisioning = "deprovisioning", Wiped = "wiped" }
);
wire_enum!(
    /// A command waiting for the device's next check-in.
    CommandKind { DeviceInformation = "device_information", RevokeMdm = "revoke_mdm", FactoryReset = "factory_reset" }
);
wire_enum!(
    /// A delivery job's channel.
    JobChannel { Email = "email", Sms = "sms" }
);
wire_enum!(
    /// What a delivery job sends: the invite itself, a reminder before it expires, or the notice that a device
    /// enrolled.
    JobKind { Invite = "invite", Reminder = "reminder", Confirmation = "confirmation", Account = "account" }
);
wire_enum!(
    /// How the user proves who they are on the enrollment page: the invite's passcode, their own password, or both.
    EnrollAuth { Passcode = "passcode", Password = "password", Both = "both" }
);
wire_enum!(
    /// A delivery job's state; the mail worker moves it along.
    JobState { Queued = "queued", Sending = "sending", Sent = "sent", Deferred = "deferred", Failed = "failed", Stale = "stale" }
);

impl JobChannel {
    /// The channel's name in a sentence ("Email to …").
    pub fn label(self) -> &'static str {
        match self {
            JobChannel::Email => "Email",
            JobChannel::Sms => "SMS",
        }
    }
}

impl Channels {
    pub fn email(self) -> bool {
        matches!(self, Channels::Email | Channels::Both)
    }
    pub fn sms(self) -> bool {
        matches!(self, Channels::Sms | Channels::Both)
    }
}

/// A person who enrolls devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: Id,
    pub name: String,
    /// Lower-cased; unique.
    pub email: String,
    /// E.164, such as +12025550100.
    pub phone: Option<String>,
    pub domain: Option<String>,
    #[serde(default)]
    pub notes: String,
    /// Groups the user belongs to ("invite a group" invites these users); an invite with a group adds it.
    #[serde(default)]
    pub groups: Vec<Id>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The CSV import that created this record, if one did (an interrupted all-or-nothing import removes what it
    /// made by this mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<Id>,
}

/// A device group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Group {
    pub id: Id,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The CSV import that created this record, if one did (an interrupted all-or-nothing import removes what it
    /// made by this mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<Id>,
}

/// A line in an invite's history a person can read ("Queued for delivery by email", "Resent by admin").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Remark {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub text: String,
}

/// An invitation for one user to enroll one device. The link token and passcode are kept only as hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invite {
    pub id: Id,
    pub user_id: Id,
    pub platform: Platform,
    pub ownership: Ownership,
    pub group_id: Option<Id>,
    pub channels: Channels,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub status: InviteStatus,
    pub remarks: Vec<Remark>,
    /// SHA-256 of the link token, hex.
    pub token_hash: String,
    /// HMAC-SHA-256 of the passcode under the appliance's secret key, hex.
    pub passcode_hash: String,
    /// An admin's own test invite: shown on screen, never mailed.
    #[serde(default)]
    pub by_myself: bool,
    pub created_by: String,
    pub device_id: Option<Id>,
    /// Wrong passcodes entered since the last (re)send.
    #[serde(default)]
    pub failed_attempts: u32,
    #[serde(default)]
    pub locked: bool,
    /// Bumped on every resend, so a delivery job for an older send is recognised as stale.
    #[serde(default)]
    pub generation: u32,
    /// The CSV import that created this record, if one did (an interrupted all-or-nothing import removes what it
    /// made by this mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<Id>,
    /// Where the messages of the current send stand, one per channel; the mail worker keeps it up to date.
    #[serde(default)]
    pub delivery: Vec<DeliveryStatus>,
    /// When the user last asked the enrollment page for a password link (they are limited to one every few
    /// minutes).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub account_link_at: Option<OffsetDateTime>,
}

/// Where one message of an invite stands, as the admin sees it next to the invite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryStatus {
    pub job_id: Id,
    pub channel: JobChannel,
    /// Email address or phone number.
    pub to: String,
    pub state: JobState,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When the state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// For a deferred message: when it is tried again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The server's (or gateway's) last answer, such as `250 2.0.0 Ok: queued as 4F2A1` or
    /// `550 5.1.1 <a@example.com>: Recipient address rejected`.
    pub reply: Option<String>,
}

/// A command queued for a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PendingCommand {
    pub id: Id,
    pub kind: CommandKind,
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    pub queued_by: String,
    /// For erasing a Mac: the six-digit PIN that unlocks it afterwards (Intel Macs without a T2 chip ask for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Device {
    pub id: Id,
    pub platform: Platform,
    pub name: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub imei: Option<String>,
    /// UDID (Apple), Android ID or Windows DevId.
    pub hardware_id: Option<String>,
    pub os_version: Option<String>,
    pub user_id: Option<Id>,
    pub group_id: Option<Id>,
    pub ownership: Ownership,
    pub invite_id: Option<Id>,
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_contact: OffsetDateTime,
    pub status: DeviceStatus,
    #[serde(default)]
    pub pending_commands: Vec<PendingCommand>,
    /// SHA-256 of the identity certificate the device signs its messages with (Apple: issued over SCEP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The last thing that went wrong reaching the device (a push the push service refused, a command the device
    /// rejected), cleared when it next answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A Windows device's identity: the client certificate issued to it over MS-WSTEP, which authenticates its
/// OMA-DM sessions. The device is enrolled at its first session (as an Apple device at its first `TokenUpdate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowsIdentity {
    /// SHA-256 of the certificate, lower-case hex (the key).
    pub sha256: String,
    pub invite_id: Id,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Windows' own device id (`DeviceID` at enrollment, `DevId` in sessions).
    pub device_hwid: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
    /// Set at the first management session.
    pub device_id: Option<Id>,
}

/// An Android device's identity: the secret its agent was handed at enrollment, kept only as a hash. The agent
/// sends the secret with every check-in; a device that enrolls again gets a new one and the old one stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AndroidIdentity {
    /// SHA-256 of the secret, lower-case hex (the key).
    pub secret_hash: String,
    pub invite_id: Id,
    pub device_id: Id,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

/// A device identity issued over SCEP to an Apple device enrolling with an invite, and what the device has said
/// over check-in since. Keyed by the certificate's SHA-256; the device record points back with `identity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppleIdentity {
    pub sha256: String,
    /// Serial number of the certificate, lower-case hex.
    pub serial: String,
    pub invite_id: Id,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Set once the device has enrolled (its first `TokenUpdate`).
    pub device_id: Option<Id>,
    /// From `Authenticate` (stored as fields of the identity).
    #[serde(flatten)]
    pub facts: AppleFacts,
    /// From `TokenUpdate`: where to push.
    pub push: Option<ApplePush>,
    /// The device sent `CheckOut`; it is no longer managed under this identity.
    #[serde(default)]
    pub checked_out: bool,
}

/// What an Apple device says about itself in `Authenticate` (and in `DeviceInformation` answers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppleFacts {
    pub udid: Option<String>,
    pub serial_number: Option<String>,
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub os_version: Option<String>,
    pub build_version: Option<String>,
    pub device_name: Option<String>,
    pub imei: Option<String>,
    /// A User Enrollment's stand-in for the UDID (such devices do not tell their UDID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_id: Option<String>,
}

/// An Apple device's push address: the APNs device token (hex), the magic string the MDM push carries, and the
/// Topic of the push certificate it listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplePush {
    pub token: String,
    pub push_magic: String,
    pub topic: String,
    /// Base64 of the unlock token (clears a forgotten passcode); kept, never shown.
    pub unlock_token: Option<String>,
}

/// A user's own password for the enrollment page (a local account; a directory could answer instead). Kept apart
/// from [`User`], which the API shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserAccount {
    pub user_id: Id,
    /// argon2id, PHC string.
    pub password_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub set_at: OffsetDateTime,
}

/// A one-time link for a user to set their password. Keyed by the SHA-256 of its token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountLink {
    pub token_hash: String,
    pub user_id: Id,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A one-time SCEP challenge, handed out inside an invite's enrollment profile. Keyed by the SHA-256 of the
/// challenge; gone once used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScepChallenge {
    pub hash: String,
    pub invite_id: Id,
    /// The invite's send it was made for: a resend (new link) kills it.
    #[serde(default)]
    pub generation: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A device registered ahead of enrollment; an enrolling device with the same serial or IMEI takes its user and
/// group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StagedDevice {
    pub id: Id,
    pub serial: Option<String>,
    pub imei: Option<String>,
    pub name: Option<String>,
    pub platform: Platform,
    pub user_id: Option<Id>,
    pub email: Option<String>,
    pub group_id: Option<Id>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The CSV import that created this record, if one did (an interrupted all-or-nothing import removes what it
    /// made by this mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<Id>,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub id: Id,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The admin's username, `device`, or `system`.
    pub actor: String,
    /// The client's address, when a request caused it.
    pub client: Option<String>,
    /// What happened, such as `invite.resend` or `login.failed`.
    pub action: String,
    /// What it happened to, such as an invite id.
    pub target: Option<String>,
    pub detail: String,
}

/// A message waiting in the outbox. The link and passcode travel with it in clear until it is delivered (the
/// invite keeps only hashes), after which the mail worker clears them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryJob {
    pub id: Id,
    pub invite_id: Id,
    /// The invite generation this job delivers; an older one is stale.
    pub generation: u32,
    pub channel: JobChannel,
    /// Email address or phone number.
    pub to: String,
    pub state: JobState,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub link_token: Option<String>,
    pub passcode: Option<String>,
    /// The CSV import that made this job, so that delivery can wait until that import is done (a rolled-back
    /// import's messages must never go out).
    #[serde(default)]
    pub import: Option<Id>,
    /// Delivery attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// When a queued or deferred job is due; absent means at once.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The server's last answer.
    #[serde(default)]
    pub last_reply: Option<String>,
    /// When the job was sent, failed for good, or found stale.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// When the first delivery attempt was made; the retry horizon counts from it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub first_attempt_at: Option<OffsetDateTime>,
    #[serde(default = "invite_kind")]
    pub kind: JobKind,
    /// For a confirmation: the device that enrolled.
    #[serde(default)]
    pub device_id: Option<Id>,
}

fn invite_kind() -> JobKind {
    JobKind::Invite
}

impl DeliveryJob {
    /// When the mail worker should pick the job up, if it still has to.
    pub fn due_at(&self) -> Option<OffsetDateTime> {
        match self.state {
            JobState::Queued | JobState::Deferred => Some(self.next_attempt_at.unwrap_or(self.created_at)),
            // A job being sent is out of the queue; a restart puts it back (`requeue_in_flight`).
            JobState::Sending | JobState::Sent | JobState::Failed | JobState::Stale => None,
        }
    }

    /// The job as the admin sees it next to its invite.
    pub fn status(&self, at: OffsetDateTime) -> DeliveryStatus {
        DeliveryStatus {
            job_id: self.id,
            channel: self.channel,
            to: self.to.clone(),
            state: self.state,
            attempts: self.attempts,
            at,
            next_attempt_at: (self.state == JobState::Deferred).then_some(self.next_attempt_at).flatten(),
            reply: self.last_reply.clone(),
        }
    }
}

/// A setting an admin changed through the API (such as an invite template), in place of the built-in default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Setting {
    /// Dotted name, such as `template.invite.subject.txt`.
    pub name: String,
    pub value: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub updated_by: String,
}

/// An administrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Admin {
    pub username: String,
    /// argon2id, PHC string format.
    pub password_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: String,
    /// Sessions carry the generation they were made under; a password change bumps it, ending them all.
    #[serde(default)]
    pub session_generation: u32,
}

/// A signed-in admin: a browser session (cookie) or a bearer token for scripts. Stored under the token's hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// SHA-256 of the token, hex; the store key.
    pub token_hash: String,
    pub username: String,
    /// The CSRF token browser forms must echo.
    pub csrf_token: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub client: Option<String>,
    /// The admin's session generation when this session began.
    #[serde(default)]
    pub generation: u32,
}

impl Session {
    /// The public handle used to list and revoke a session: the first 16 hex digits of the token hash.
    pub fn public_id(&self) -> &str {
        &self.token_hash[..16.min(self.token_hash.len())]
    }
}

wire_enum!(
    /// Which CSV format an import reads.
    ImportKind { Invites = "invites", Staged = "staged" }
);
wire_enum!(
    /// `all`: a file with any invalid row imports nothing. `valid_only`: valid rows are imported, the rest reported.
    ImportMode { All = "all", ValidOnly = "valid_only" }
);
wire_enum!(
    /// Where an import job stands. Under way: `queued`, `validating` (pass 1), `importing` (pass 2), `rolling_back`
    /// (an all-or-nothing import a crash cut short, whose records are being removed after the restart). Final:
    /// `done`, `rejected` (nothing imported: problems listed), `rolled_back`, `interrupted` (a valid-only import
    /// a crash cut short: the rows up to its last line stay), `failed`.
    ImportState {
        Queued = "queued",
        Validating = "validating",
        Importing = "importing",
        Done = "done",
        Rejected = "rejected",
        RolledBack = "rolled_back",
        Interrupted = "interrupted",
        Failed = "failed",
        // Last: a binary encoding of the records (the store issue's) numbers the variants in this order.
        RollingBack = "rolling_back"
    }
);

impl ImportState {
    /// Whether the import is still under way (its records may still change), as opposed to final.
    pub fn under_way(self) -> bool {
        matches!(self, Self::Queued | Self::Validating | Self::Importing | Self::RollingBack)
    }
}

/// One problem with one row of an uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RowProblem {
    /// Line in the file (1 is the header).
    pub line: u64,
    /// The column's header, when the problem is in one cell.
    pub column: Option<String>,
    pub value: String,
    pub reason: String,
}

/// What an import did (or, when rejected, would have had to refuse).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImportReport {
    pub rows_read: u64,
    pub users_created: u64,
    pub users_matched: u64,
    pub invites_created: u64,
    pub staged_created: u64,
    /// Names of the groups the import created.
    pub groups_created: Vec<String>,
    /// Rows that already had a pending invite for the same user and platform (a file imported twice).
    pub already_pending: u64,
    pub rows_rejected: u64,
    /// The problems, in line order (the first 1,000; `rows_rejected` counts them all).
    pub problems: Vec<RowProblem>,
}

/// A CSV import job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Import {
    pub id: Id,
    pub kind: ImportKind,
    pub mode: ImportMode,
    pub state: ImportState,
    pub filename: Option<String>,
    pub bytes: u64,
    /// Rows checked or imported so far, of `rows_total` (known once the file has been read through).
    pub rows_done: u64,
    pub rows_total: u64,
    /// The last line of the file imported so far.
    #[serde(default)]
    pub last_line: u64,
    pub report: ImportReport,
    /// What happened, in a sentence.
    pub message: String,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}
