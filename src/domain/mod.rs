//! The enrollment domain: users, groups, invites (and their state machine), devices, staged devices, the audit log
//! and the dashboard counts. It knows nothing of HTTP; it reads and changes records only through the store's typed
//! transactions, so every multi-record change (an invite and its delivery jobs and audit entry) lands whole or not
//! at all.

mod accounts;
mod android;
mod apple;
pub mod auth;
mod devices;
mod import;
mod invites;
mod mdm;
mod outbox;
mod settings;
mod users;
mod windows;

use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use utoipa::ToSchema;

pub use crate::model::AppleFacts;
pub use accounts::{
    AccountLinkProblem, CreatedAccountLink, Credentials, Directory, ENROLL_AUTH_SETTING, LinkRefusal, LocalAccounts,
};
pub use android::{
    AndroidApp, AndroidEnrolled, AndroidFacts, AndroidRefusal, ChecksumKind, CommandOutcome, ProvisioningWifi,
    SERVED_APP_PATH, normalise_checksum, package_checksum,
};
pub use apple::StoredPushCertificate;
pub use devices::{
    CommandFor, DeprovisionKind, DeviceFacts, DeviceQuery, IdentityProblem, NewStaged, StagedAssignment, StagedQuery,
};
pub use import::{ExportList, ImportRequest};
pub use invites::{
    AdditionalInvite, BulkOutcome, BulkSelection, CreatedInvite, GroupInviteMode, GroupInvitePlan, GroupInviteResult,
    InviteQuery, InviteView, LinkProblem, NewInvite, PasscodeCheck,
};
pub use mdm::{AppleClaim, ChallengeProblem};
pub use outbox::{Attempt, Claimed, OutboxCounts, RetryPolicy, redact};
pub use settings::{LastBackup, PolicyChange, saved_names_in};
pub use users::{NewGroup, NewUser, UserChoiceForDevices, UserPatch};
pub use windows::{DevInfo, WindowsFacts, WindowsRefusal};

use crate::clock::Clock;
use crate::model::{AuditEvent, Id, IdSequence};
use crate::store::{Page, Scan, Store, StoreError, TxError, TxFailure, tree};

/// Why a domain operation was refused. Each carries a message a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("no {what} with id {id}")]
    NotFound { what: &'static str, id: String },
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DomainError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        DomainError::Invalid { field, message: message.into() }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        DomainError::Conflict { code, message: message.into() }
    }
    pub fn not_found(what: &'static str, id: impl ToString) -> Self {
        DomainError::NotFound { what, id: id.to_string() }
    }
}

impl From<DomainError> for TxError<DomainError> {
    fn from(error: DomainError) -> Self {
        TxError::Abort(error)
    }
}

impl From<TxFailure<DomainError>> for DomainError {
    fn from(failure: TxFailure<DomainError>) -> Self {
        match failure {
            TxFailure::Abort(error) => error,
            TxFailure::Store(error) => DomainError::Store(error),
        }
    }
}

pub type DomainResult<T> = Result<T, DomainError>;
type TxResult<T> = Result<T, TxError<DomainError>>;

/// Who is acting: an admin's username (or `system`, `device`) and the client address, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub client: Option<String>,
}

impl Actor {
    pub fn system() -> Actor {
        Actor { name: "system".into(), client: None }
    }
    pub fn device(client: Option<String>) -> Actor {
        Actor { name: "device".into(), client }
    }
}

/// Settings the domain's rules depend on.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How long an invite link is valid after it is (re)sent.
    pub invite_validity: Duration,
    /// Wrong passcodes an invite tolerates before it locks.
    pub passcode_attempts: u32,
    /// A reminder mail goes this long before a pending invite expires; `None`: no reminders.
    pub reminder_before: Option<Duration>,
    /// Who is told by mail when a device enrolls (a distribution list, say).
    pub confirmation_to: Vec<String>,
    /// Whether the user is told too.
    pub confirmation_to_user: bool,
    /// How users authenticate on the enrollment page, unless an admin saved another choice.
    pub enroll_auth: crate::model::EnrollAuth,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            invite_validity: Duration::days(7),
            passcode_attempts: 5,
            reminder_before: None,
            confirmation_to: Vec::new(),
            confirmation_to_user: false,
            enroll_auth: crate::model::EnrollAuth::Passcode,
        }
    }
}

/// The domain service: cheap to clone, shared by every request.
#[derive(Clone, Debug)]
pub struct Enrollment {
    store: Store,
    clock: Arc<dyn Clock>,
    /// The rules; admins change some of them at run time (saved as settings, which win over the configuration).
    policy: Arc<arc_swap::ArcSwap<Policy>>,
    /// The key passcodes are hashed under (HMAC-SHA-256). It lives in a file beside the CA key, not in the
    /// database, so a copy of the database alone does not reveal passcodes.
    passcode_key: Arc<ring::hmac::Key>,
    ids: Arc<IdSequence>,
    /// Where CSV uploads wait while they are imported.
    spool_dir: Option<Arc<std::path::PathBuf>>,
    /// Imports run one at a time, so a file submitted twice at once is checked against the first's invites.
    import_lock: Arc<std::sync::Mutex<()>>,
    /// Where users' own passwords are checked (local accounts).
    directory: Arc<dyn Directory>,
}

/// One page of results for the API: the items and an opaque cursor for the next page.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Counts for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DashboardCounts {
    pub pending: u64,
    pub expired: u64,
    pub enrolled: u64,
    pub unmanaged: u64,
    pub staged: u64,
    pub users: u64,
    pub queued_messages: u64,
}

impl Enrollment {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        policy: Policy,
        passcode_key: &[u8; 32],
    ) -> DomainResult<Enrollment> {
        let passcode_key = Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, passcode_key));
        let enrollment = Enrollment {
            directory: LocalAccounts::shared(store.clone()),
            store,
            clock,
            policy: Arc::new(arc_swap::ArcSwap::from_pointee(policy)),
            passcode_key,
            ids: Arc::default(),
            spool_dir: None,
            import_lock: Arc::default(),
        };
        enrollment.apply_saved_policy()?;
        Ok(enrollment)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The rules in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    fn new_id(&self) -> Id {
        self.ids.next(self.now(), random_bytes())
    }

    /// Runs `change` in one store transaction, mapping failures to domain errors.
    fn transact<R>(&self, change: impl Fn(&crate::store::Tx<'_>) -> TxResult<R>) -> DomainResult<R> {
        Ok(self.store.transact(change)?)
    }

    /// Adds an audit entry inside a transaction.
    fn audit(
        &self,
        tx: &crate::store::Tx<'_>,
        actor: &Actor,
        action: &str,
        target: Option<String>,
        detail: impl Into<String>,
    ) -> TxResult<()> {
        let event = AuditEvent {
            id: self.new_id(),
            at: self.now(),
            actor: actor.name.clone(),
            client: actor.client.clone(),
            action: action.to_owned(),
            target,
            detail: detail.into(),
        };
        tx.put(None, &event)
    }

    /// Records an event outside any other change (a failed login, say).
    pub fn record(&self, actor: &Actor, action: &str, target: Option<String>, detail: &str) -> DomainResult<()> {
        self.transact(|tx| self.audit(tx, actor, action, target.clone(), detail))
    }

    /// The audit log, newest first.
    pub fn audit_log(&self, cursor: Option<&str>, limit: usize) -> DomainResult<Paged<AuditEvent>> {
        let after = decode_cursor(cursor)?;
        let scan = Scan { tree: tree::AUDIT, prefix: &[], after: after.as_deref(), newest_first: true };
        Ok(paged(self.store.page(scan, clamp_limit(limit), |_| true)?))
    }

    /// Counts for the dashboard (expired invites are swept first, so the counts are current).
    pub fn dashboard(&self) -> DomainResult<DashboardCounts> {
        self.sweep_expired()?;
        let count = |name: &str| self.store.count(name);
        Ok(DashboardCounts {
            pending: count("invites.pending")?,
            expired: count("invites.expired")?,
            enrolled: count("devices.enrolled")?,
            unmanaged: count("devices.unmanaged")?,
            staged: count("staged")?,
            users: count("users")?,
            queued_messages: count("outbox.queued")? + count("outbox.deferred")?,
        })
    }
}

/// A time to the minute, for remarks ("2026-11-22 14:05").
pub(crate) fn minute(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!("{} {:02}:{:02}", at.date(), at.hour(), at.minute())
}

/// Fills a buffer from the system's secure random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The kernel's CSPRNG does not fail once the system has booted; a failure here is unrecoverable anyway.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        panic!("the system random number generator failed");
    }
    bytes
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    crate::pki::sha256_hex(data)
}

pub(crate) fn clamp_limit(limit: usize) -> usize {
    limit.clamp(1, 500)
}

/// Reads a listing's optional page size, refusing one outside 1 to 500 instead of quietly changing it.
pub fn page_limit<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    use serde::de::Error as _;
    match optional_whole_number(deserializer)? {
        Some(limit) if !(1..=500).contains(&limit) => {
            Err(D::Error::custom(format!("limit: a page holds 1 to 500 items, not {limit}")))
        }
        limit => Ok(limit.and_then(|limit| usize::try_from(limit).ok())),
    }
}

/// Reads an optional whole number from 0 up as JSON Schema counts one: JSON does not tell `50` from `50.0` (and
/// some clients write every number with a fraction), so both are 50; `50.5`, `-1` and `"50"` in JSON are refused.
/// In a query string the number is its text, as before.
pub fn optional_whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    use serde::de::{Error, Unexpected, Visitor};
    struct Whole;
    impl Visitor<'_> for Whole {
        type Value = u64;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a whole number from 0 up")
        }
        fn visit_u64<E: Error>(self, value: u64) -> Result<u64, E> {
            Ok(value)
        }
        fn visit_i64<E: Error>(self, value: i64) -> Result<u64, E> {
            u64::try_from(value).map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
        }
        fn visit_f64<E: Error>(self, value: f64) -> Result<u64, E> {
            // 2^64 is the first float beyond u64; below it a float without a fraction is exactly a u64.
            if value.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&value) {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                Ok(value as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(value), &self))
            }
        }
    }
    struct Optional;
    impl<'de> Visitor<'de> for Optional {
        type Value = Option<u64>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a whole number from 0 up, or null")
        }
        fn visit_none<E: Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Option<u64>, D::Error> {
            deserializer.deserialize_u64(Whole).map(Some)
        }
    }
    deserializer.deserialize_option(Optional)
}

/// Reads a listing's optional cursor, refusing text that is not one (wherever the query is read, even by an
/// export that starts at the beginning anyway).
pub fn page_cursor<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    use base64::Engine as _;
    use serde::de::Error as _;
    let cursor = Option::<String>::deserialize(deserializer)?;
    match &cursor {
        Some(text) if !text.is_empty() && CURSOR.decode(text).is_err() => {
            Err(D::Error::custom("cursor: not one this server handed out; start again without it"))
        }
        _ => Ok(cursor),
    }
}

/// Cursors: URL-safe base64 without padding. Any such text is a position in a listing (the key to continue
/// after), so decoding accepts whatever the description's pattern allows, stray low bits included.
const CURSOR: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
);

pub(crate) fn encode_cursor(key: &[u8]) -> String {
    use base64::Engine as _;
    CURSOR.encode(key)
}

pub(crate) fn decode_cursor(cursor: Option<&str>) -> DomainResult<Option<Vec<u8>>> {
    use base64::Engine as _;
    cursor
        .filter(|c| !c.is_empty())
        .map(|c| {
            CURSOR.decode(c).map_err(|_| {
                DomainError::invalid("cursor", "the cursor is not one this server handed out; start again without it")
            })
        })
        .transpose()
}

pub(crate) fn paged<R>(page: Page<R>) -> Paged<R> {
    Paged { items: page.items, next_cursor: page.next.as_deref().map(encode_cursor) }
}

/// Checks an email address's shape and lower-cases it.
pub fn normalize_email(email: &str) -> DomainResult<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == ';')
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && local.len() <= 64 && !domain.contains('@') && domain.contains('.')
                && !domain.starts_with('.') && !domain.ends_with('.') && !domain.contains(".."));
    if valid {
        Ok(email)
    } else {
        Err(DomainError::invalid("email", format!("{email:?} is not an email address such as ann@example.com")))
    }
}

/// Normalises a phone number to E.164 (`+` and 8 to 15 digits); spaces, dashes, dots and brackets are dropped.
pub fn normalize_phone(phone: &str) -> DomainResult<String> {
    let kept: String = phone.chars().filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}')).collect();
    let digits = kept.strip_prefix('+').unwrap_or(&kept);
    let valid = kept.starts_with('+')
        && (8..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0');
    if valid {
        Ok(format!("+{digits}"))
    } else {
        Err(DomainError::invalid(
            "phone",
            format!("{phone:?} is not a phone number in international form, such as +1 202 555 0100"),
        ))
    }
}

/// Checks a 15-digit IMEI and its Luhn check digit.
pub fn validate_imei(imei: &str) -> DomainResult<String> {
    let digits: String = imei.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    if digits.len() != 15 || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(DomainError::invalid("imei", format!("{imei:?} is not an IMEI (15 digits)")));
    }
    let sum: u32 = digits
        .chars()
        .rev()
        .enumerate()
        .map(|(index, c)| {
            let digit = c.to_digit(10).unwrap_or(0);
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    if sum.is_multiple_of(10) {
        Ok(digits)
    } else {
        Err(DomainError::invalid("imei", format!("{imei:?} has a wrong check digit; check it for typos")))
    }
}

pub(crate) fn required_text(field: &'static str, value: &str, max: usize) -> DomainResult<String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(DomainError::invalid(field, format!("{field} is required")));
    }
    if value.chars().count() > max {
        return Err(DomainError::invalid(field, format!("{field} is longer than {max} characters")));
    }
    no_control_characters(field, value)?;
    Ok(value.to_owned())
}

/// An optional text field an admin enters (blank is none): checked as [`required_text`] checks.
pub(crate) fn optional_field(field: &'static str, value: Option<&str>, max: usize) -> DomainResult<Option<String>> {
    optional_text(value).map(|value| required_text(field, &value, max)).transpose()
}

/// Refuses control characters (Unicode Cc: NUL, line breaks, tabs, escapes, …) in a text field: no name, address
/// or group has them, and shown as they are they garble pages, mails and exports.
pub(crate) fn no_control_characters(field: &'static str, value: &str) -> DomainResult<()> {
    refuse_controls(field, value, |_| false)
}

/// A free text that may run over several lines (notes, a description): line breaks and tabs are its only control
/// characters.
pub(crate) fn multi_line_text(field: &'static str, value: &str) -> DomainResult<()> {
    refuse_controls(field, value, |c| matches!(c, '\n' | '\r' | '\t'))
}

/// Refuses the first control character that `allowed` does not let through, naming it.
fn refuse_controls(field: &'static str, value: &str, allowed: impl Fn(char) -> bool) -> DomainResult<()> {
    match value.chars().find(|c| c.is_control() && !allowed(*c)) {
        Some(c) => Err(DomainError::invalid(field, control_reason(field, c))),
        None => Ok(()),
    }
}

/// What is wrong with a value holding a control character, naming the field and the first such character.
pub fn control_character_reason(field: &str, value: &str) -> String {
    control_reason(field, value.chars().find(|c| c.is_control()).unwrap_or('\0'))
}

fn control_reason(field: &str, c: char) -> String {
    let code = u32::from(c);
    format!("{field} contains a control character (U+{code:04X}, such as a NUL or a line break); remove it")
}

/// The value with its control characters written out (`\u{0}`), safe to show in a report.
pub fn visible_controls(value: &str) -> String {
    value.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

pub(crate) fn optional_text(value: Option<&str>) -> Option<String> {
    value.map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::clock::ManualClock;

    pub fn start() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap()
    }

    pub fn domain() -> (Enrollment, ManualClock) {
        domain_with(Policy::default())
    }

    pub fn domain_with(policy: Policy) -> (Enrollment, ManualClock) {
        let clock = ManualClock::new(start());
        let enrollment =
            Enrollment::new(Store::open_temporary().unwrap(), Arc::new(clock.clone()), policy, &random_bytes())
                .unwrap();
        (enrollment, clock)
    }

    pub fn admin() -> Actor {
        Actor { name: "admin".into(), client: Some("192.0.2.10".into()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_size_is_a_whole_number_however_json_writes_it() {
        #[derive(Debug, serde::Deserialize)]
        struct Page {
            #[serde(default, deserialize_with = "page_limit")]
            limit: Option<usize>,
        }
        let limit = |json: &str| serde_json::from_str::<Page>(json).map(|page| page.limit).map_err(|e| e.to_string());
        assert_eq!(limit(r#"{"limit": 50}"#), Ok(Some(50)));
        assert_eq!(limit(r#"{"limit": 50.0}"#), Ok(Some(50)), "JSON Schema counts 50.0 as the integer 50");
        assert_eq!(limit(r#"{"limit": null}"#), Ok(None));
        assert_eq!(limit("{}"), Ok(None));
        for refused in [r#"{"limit": 50.5}"#, r#"{"limit": -1}"#, r#"{"limit": "50"}"#, r#"{"limit": 501.0}"#] {
            assert!(limit(refused).is_err(), "{refused}");
        }
        let query = |text: &str| {
            let uri: axum::http::Uri = format!("/list?{text}").parse().unwrap();
            axum::extract::Query::<Page>::try_from_uri(&uri).map(|page| page.0.limit).ok()
        };
        assert_eq!((query("limit=7"), query("limit=x"), query("")), (Some(Some(7)), None, Some(None)));
    }

    #[test]
    fn a_refused_control_character_is_the_one_named() {
        assert!(multi_line_text("note", "one\r\n\ttwo").is_ok());
        let error = multi_line_text("note", "one\ntwo\u{0}").unwrap_err().to_string();
        assert!(error.contains("U+0000") && !error.contains("U+000A"), "{error}");
        let error = no_control_characters("name", "Ann\u{1b}[2J").unwrap_err().to_string();
        assert!(error.contains("name contains a control character (U+001B"), "{error}");
    }

    #[test]
    fn emails_phones_and_imeis_are_checked_and_normalised() {
        assert_eq!(normalize_email(" Ann@Example.COM ").unwrap(), "ann@example.com");
        for bad in ["ann", "ann@", "@example.com", "ann@example", "a b@example.com", "ann@@example.com", "a@b..com"] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
        assert_eq!(normalize_phone("+1-202-555-0100").unwrap(), "+12025550100");
        assert_eq!(normalize_phone("+44 (20) 7946 0958").unwrap(), "+442079460958");
        assert!(normalize_phone("202-555-0100").unwrap_err().to_string().contains("international form"));
        assert!(normalize_phone("+1 202 555 0100 ext 9").is_err());
        assert_eq!(validate_imei("490154203237518").unwrap(), "490154203237518");
        assert!(validate_imei("490154203237519").unwrap_err().to_string().contains("check digit"));
        assert!(validate_imei("12345").is_err());
    }
}
