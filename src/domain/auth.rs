//! Admin accounts and sign-in: argon2id password hashes, the one-time setup code that lets the first admin claim an
//! unconfigured box, sessions and bearer tokens stored only as SHA-256 hashes, and growing delays after failed
//! logins, per account and client address together and per client address (so guesses from one address never
//! keep the admin out from another), under a ceiling of failures a minute for the whole box.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::Serialize;
use subtle::ConstantTimeEq;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;
use utoipa::ToSchema;

use super::{Actor, DomainError, DomainResult, Enrollment, random_bytes, sha256_hex};
use crate::model::{Admin, Session};
use crate::store::{Scan, tree};

/// Failed attempts allowed before delays start.
const FREE_FAILURES: u32 = 3;
/// The longest delay a run of failures earns.
const MAX_DELAY: Duration = Duration::minutes(15);
/// Failed sign-ins a minute the whole box takes, from every address together, before it refuses every sign-in
/// until the minute has passed: a bound on guessing from many addresses at once (and on password hashing). One
/// address's own delays keep it far below this (about ten a minute).
pub const GLOBAL_FAILURES_PER_MINUTE: usize = 100;
/// Shortest admin password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("wrong username or password")]
    BadCredentials,
    #[error("too many failed sign-ins; try again in {retry_after_secs} s")]
    TooManyAttempts { retry_after_secs: u64 },
    #[error("this appliance is set up already; sign in instead")]
    AlreadySetUp,
    #[error("the setup code is wrong; copy it from where enrolld shows it: its log, or the box's console")]
    BadSetupCode,
    #[error("{0}")]
    WeakPassword(String),
    #[error(transparent)]
    Domain(#[from] DomainError),
}

impl From<crate::store::StoreError> for AuthError {
    fn from(error: crate::store::StoreError) -> Self {
        AuthError::Domain(error.into())
    }
}

/// A successful sign-in: the token (shown once) and the CSRF token browser forms must echo.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SignedIn {
    /// Send as `Authorization: Bearer <token>`; the browser gets it as an HttpOnly cookie instead.
    pub token: String,
    /// Send back in the `X-CSRF-Token` header (or `csrf_token` form field) with every change made through the
    /// session cookie.
    pub csrf_token: String,
    pub username: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A session as listed: never its token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionView {
    /// Use to revoke the session.
    pub id: String,
    pub username: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub client: Option<String>,
}

/// An admin account as listed: never its hash.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdminView {
    pub username: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: String,
}

/// Sign-in and admin accounts; cheap to clone.
#[derive(Clone, Debug)]
pub struct Auth {
    domain: Enrollment,
    session_ttl: Duration,
    limiter: Arc<Mutex<Limiter>>,
    /// The setup code while the box waits for its first admin (kept in the store, so the same code survives
    /// restarts), `None` once there is an admin: for the box's console to follow.
    setup: Arc<watch::Sender<Option<String>>>,
}

/// A hash to verify against when the username is unknown, so timing does not tell which usernames exist. Of
/// nothing in particular: verifying costs what the parameters say (those [`hash_password`] uses; a test keeps them
/// in step), and a constant costs nothing at start-up.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$D6VxBY9wqqjPQ1Baxpm1Mg$onbhFRCJpn6UzttilWd3531ywend9IUF6y995WXSFms";

impl Auth {
    pub fn new(domain: Enrollment, session_ttl: Duration) -> DomainResult<Auth> {
        Ok(Auth { domain, session_ttl, limiter: Arc::default(), setup: Arc::new(watch::Sender::new(None)) })
    }

    pub fn has_admin(&self) -> DomainResult<bool> {
        let scan = Scan { tree: tree::ADMINS, prefix: &[], after: None, newest_first: false };
        Ok(!self.domain.store().page::<Admin>(scan, 1, |_| true)?.items.is_empty())
    }

    /// At start-up: with no admin yet, creates `username` from `password` if one is configured, or else returns
    /// the setup code (for the log and the console): the one kept from an earlier start, or a new one. With an
    /// admin (however it came: setup, the configured password, a restored backup) any kept code is forgotten.
    pub fn bootstrap(&self, username: &str, password: Option<&str>) -> Result<Option<String>, AuthError> {
        if self.has_admin()? {
            self.domain.store().remove_setup_code()?;
            self.setup.send_replace(None);
            return Ok(None);
        }
        if let Some(password) = password {
            self.insert_admin(&Actor::system(), username, password, None)?;
            return Ok(None);
        }
        let code = self.domain.store().setup_code_or_insert(setup_code)?;
        self.setup.send_replace(Some(code.clone()));
        Ok(Some(code))
    }

    /// The setup code while the box waits for its first admin, then `None`; changes as that happens.
    pub fn setup_code_updates(&self) -> watch::Receiver<Option<String>> {
        self.setup.subscribe()
    }

    /// Whether the box still waits for its first admin.
    pub fn needs_setup(&self) -> DomainResult<bool> {
        Ok(!self.has_admin()?)
    }

    /// Claims an unconfigured box with the setup code enrolld showed at start: creates the first admin and signs
    /// them in. The code is spent in the transaction that creates the admin, so it claims the box once.
    pub fn setup(
        &self,
        code: &str,
        username: &str,
        password: &str,
        client: Option<String>,
    ) -> Result<SignedIn, AuthError> {
        let actor = Actor { name: truncate(username), client: client.clone() };
        let expected = self.check_setup_code(&actor, code)?;
        let admin = self.insert_admin(&actor, username, password, Some(&expected))?;
        self.start_session(&admin.username, client)
    }

    /// Checks the setup code of a box that has no admin yet, with the same slowing-down of repeated failures per
    /// client as sign-in; creating the first admin and restoring a backup on a fresh box both need it. Returns the
    /// code as stored, which the transaction creating the first admin spends.
    pub fn check_setup_code(&self, actor: &Actor, code: &str) -> Result<String, AuthError> {
        if self.has_admin()? {
            return Err(AuthError::AlreadySetUp);
        }
        let limit_key = format!("setup:{}", actor.client.as_deref().unwrap_or("-"));
        self.reserve_attempt(actor, &limit_key, None)?;
        let expected = self.domain.store().setup_code()?;
        let matches = expected.as_deref().is_some_and(|expected| {
            let given = normalize_setup_code(code);
            bool::from(given.as_bytes().ct_eq(normalize_setup_code(expected).as_bytes()))
        });
        let Some(expected) = expected.filter(|_| matches) else {
            self.domain.record(actor, "setup.failed", None, "wrong setup code")?;
            return Err(AuthError::BadSetupCode);
        };
        self.clear_failures(&limit_key, None);
        Ok(expected)
    }

    /// Checks a username and password; on success starts a session.
    pub fn login(&self, username: &str, password: &str, client: Option<String>) -> Result<SignedIn, AuthError> {
        let username = truncate(&username.trim().to_lowercase());
        // Delays are per account *from* an address (and per address across accounts), never per account alone:
        // an attacker's wrong guesses then cannot keep the admin out from their own address.
        let network = client.as_deref().map_or_else(|| "-".to_owned(), client_network);
        let account_key = format!("user:{username} client:{network}");
        let client_key = format!("client:{network}");
        let actor = Actor { name: username.clone(), client: client.clone() };
        // The attempt is counted before the password is checked, so parallel guesses cannot all slip through.
        self.reserve_attempt(&actor, &account_key, Some(&client_key))?;
        self.reserve_global(&actor)?;
        let admin = self.domain.store().get::<Admin>(username.as_bytes())?;
        let hash = admin.as_ref().map_or(DECOY_HASH, |a| a.password_hash.as_str());
        let verified = verify_password(password, hash) && admin.is_some();
        if !verified {
            self.domain.record(&actor, "login.failed", Some(username.clone()), "wrong username or password")?;
            return Err(AuthError::BadCredentials);
        }
        self.clear_failures(&account_key, Some(&client_key));
        self.refund_global();
        self.domain.record(&actor, "login", Some(username.clone()), "")?;
        self.start_session(&username, client)
    }

    fn start_session(&self, username: &str, client: Option<String>) -> Result<SignedIn, AuthError> {
        use base64::Engine as _;
        let encode = |bytes: [u8; 32]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let token = encode(random_bytes());
        let now = self.domain.now();
        let template = Session {
            token_hash: sha256_hex(token.as_bytes()),
            username: username.to_owned(),
            csrf_token: encode(random_bytes()),
            created_at: now,
            expires_at: now + self.session_ttl,
            client,
            generation: 0,
        };
        // The session takes the admin's current generation in the same transaction that stores it, so a password
        // change cannot slip in between.
        let session = self
            .domain
            .store()
            .transact(|tx| {
                let admin: Admin =
                    tx.get(username.as_bytes())?.ok_or_else(|| DomainError::not_found("admin", username))?;
                let session = Session { generation: admin.session_generation, ..template.clone() };
                tx.put(None, &session)?;
                Ok(session)
            })
            .map_err(DomainError::from)?;
        Ok(SignedIn {
            token,
            csrf_token: session.csrf_token,
            username: username.to_owned(),
            expires_at: session.expires_at,
        })
    }

    /// The live session a token belongs to. Expired sessions, and those of an admin who was deleted or changed
    /// password since, are deleted on sight.
    pub fn session(&self, token: &str) -> DomainResult<Option<Session>> {
        let key = sha256_hex(token.as_bytes());
        let Some(session) = self.domain.store().get::<Session>(key.as_bytes())? else { return Ok(None) };
        let admin = self.domain.store().get::<Admin>(session.username.as_bytes())?;
        let current = admin.is_some_and(|a| a.session_generation == session.generation);
        if !current || session.expires_at <= self.domain.now() {
            self.domain.store().transact::<_, DomainError>(|tx| tx.delete(&session))?;
            return Ok(None);
        }
        Ok(Some(session))
    }

    /// Ends the session a token belongs to.
    pub fn logout(&self, actor: &Actor, token: &str) -> DomainResult<()> {
        if let Some(session) = self.session(token)? {
            self.domain.store().transact::<_, DomainError>(|tx| tx.delete(&session))?;
            self.domain.record(actor, "logout", Some(session.username.clone()), "")?;
        }
        Ok(())
    }

    /// Every live session.
    pub fn sessions(&self) -> DomainResult<Vec<SessionView>> {
        let now = self.domain.now();
        Ok(self
            .all_sessions()?
            .into_iter()
            .filter(|s| s.expires_at > now)
            .map(|s| SessionView {
                id: s.public_id().to_owned(),
                username: s.username.clone(),
                created_at: s.created_at,
                expires_at: s.expires_at,
                client: s.client.clone(),
            })
            .collect())
    }

    fn all_sessions(&self) -> DomainResult<Vec<Session>> {
        Ok(self.domain.store().all(|_| true)?)
    }

    /// Revokes the session with the listed id.
    pub fn revoke(&self, actor: &Actor, id: &str) -> DomainResult<()> {
        let session = self
            .all_sessions()?
            .into_iter()
            .find(|s| s.public_id() == id)
            .ok_or_else(|| DomainError::not_found("session", id))?;
        self.domain.store().transact::<_, DomainError>(|tx| tx.delete(&session))?;
        self.domain.record(actor, "session.revoke", Some(session.username.clone()), id)
    }

    pub fn admins(&self) -> DomainResult<Vec<AdminView>> {
        Ok(self.domain.store().all::<Admin>(|_| true)?.into_iter().map(admin_view).collect())
    }

    pub fn create_admin(&self, actor: &Actor, username: &str, password: &str) -> Result<AdminView, AuthError> {
        Ok(admin_view(self.insert_admin(actor, username, password, None)?))
    }

    /// Creates an admin; the setup code, if any, goes in the same transaction. With `claim`, the setup code must
    /// still be that one when the transaction commits (two claims at once: one wins, the other is told the box is
    /// set up).
    fn insert_admin(
        &self,
        actor: &Actor,
        username: &str,
        password: &str,
        claim: Option<&str>,
    ) -> Result<Admin, AuthError> {
        let username = validate_username(username)?;
        check_password_strength(password)?;
        let admin = Admin {
            username: username.clone(),
            password_hash: hash_password(password)?,
            created_at: self.domain.now(),
            created_by: actor.name.clone(),
            session_generation: 0,
        };
        self.domain
            .store()
            .transact(|tx| {
                if let Some(claim) = claim
                    && tx.setup_code::<DomainError>()?.as_deref() != Some(claim)
                {
                    return Err(DomainError::conflict("already_set_up", "this appliance is set up already").into());
                }
                tx.remove_setup_code::<DomainError>()?;
                if tx.get::<Admin, DomainError>(admin.username.as_bytes())?.is_some() {
                    return Err(DomainError::conflict(
                        "admin_exists",
                        format!("an admin named {username} exists already"),
                    )
                    .into());
                }
                tx.put(None, &admin)?;
                self.domain.audit(tx, actor, "admin.create", Some(username.clone()), "")
            })
            .map_err(DomainError::from)
            .map_err(|error| match error {
                DomainError::Conflict { code: "already_set_up", .. } => AuthError::AlreadySetUp,
                other => other.into(),
            })?;
        self.setup.send_replace(None);
        Ok(admin)
    }

    /// Deletes an admin and their sessions; the last admin cannot be deleted.
    pub fn delete_admin(&self, actor: &Actor, username: &str) -> DomainResult<()> {
        let sessions: Vec<Session> = self.all_sessions()?.into_iter().filter(|s| s.username == username).collect();
        self.domain.store().transact(|tx| {
            let admin: Admin = tx.get(username.as_bytes())?.ok_or_else(|| DomainError::not_found("admin", username))?;
            // Counted inside the transaction, so two deletions at once cannot both pass.
            if tx.count("admins")? <= 1 {
                return Err(DomainError::conflict(
                    "last_admin",
                    "the last admin cannot be deleted; add another admin first",
                )
                .into());
            }
            for session in &sessions {
                tx.delete(session)?;
            }
            tx.delete(&admin)?;
            self.domain.audit(tx, actor, "admin.delete", Some(username.to_owned()), "")
        })?;
        Ok(())
    }

    /// Sets a new password for an admin; their other sessions are ended.
    pub fn change_password(&self, actor: &Actor, username: &str, password: &str) -> Result<(), AuthError> {
        check_password_strength(password)?;
        let hash = hash_password(password)?;
        let sessions: Vec<Session> = self.all_sessions()?.into_iter().filter(|s| s.username == username).collect();
        self.domain
            .store()
            .transact(|tx| {
                let old: Admin =
                    tx.get(username.as_bytes())?.ok_or_else(|| DomainError::not_found("admin", username))?;
                let changed = Admin {
                    password_hash: hash.clone(),
                    session_generation: old.session_generation.wrapping_add(1),
                    ..old.clone()
                };
                tx.put(Some(&old), &changed)?;
                for session in &sessions {
                    tx.delete(session)?;
                }
                self.domain.audit(tx, actor, "admin.password", Some(username.to_owned()), "other sessions ended")
            })
            .map_err(DomainError::from)?;
        Ok(())
    }

    /// Refuses the attempt while a delay is running; otherwise counts it (as a failure until it succeeds).
    /// The first refusal in each delay is written to the audit log.
    fn reserve_attempt(&self, actor: &Actor, account: &str, client: Option<&str>) -> Result<(), AuthError> {
        let now = self.domain.now();
        let keys: Vec<&str> = [Some(account), client].into_iter().flatten().collect();
        let refused = {
            let mut limiter = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
            let refused = limiter.blocked(&keys, now);
            if refused.is_none() {
                for key in &keys {
                    limiter.fail(key, now);
                }
            }
            refused
        };
        let detail = "sign-ins delayed after repeated failures";
        self.refuse_if(refused, now, actor, Some(actor.name.clone()), detail)
    }

    /// Counts a sign-in against the box's ceiling ([`GLOBAL_FAILURES_PER_MINUTE`]), or refuses it while the
    /// ceiling is reached. The first refusal of each minute is audited.
    fn reserve_global(&self, actor: &Actor) -> Result<(), AuthError> {
        let now = self.domain.now();
        let refused = {
            let mut limiter = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
            let global = &mut limiter.global;
            while global.failures.front().is_some_and(|at| *at <= now - Duration::MINUTE) {
                global.failures.pop_front();
            }
            match global.failures.front() {
                Some(oldest) if global.failures.len() >= GLOBAL_FAILURES_PER_MINUTE => {
                    let first = !global.reported;
                    global.reported = true;
                    Some((*oldest + Duration::MINUTE, first))
                }
                _ => {
                    global.failures.push_back(now);
                    global.reported = false;
                    None
                }
            }
        };
        let detail = "every sign-in refused for a while: too many failures from everywhere this minute";
        self.refuse_if(refused, now, actor, None, detail)
    }

    /// A limiter's verdict as the answer: a refusal until `until`, audited as `login.throttled` the first time.
    fn refuse_if(
        &self,
        refused: Option<(OffsetDateTime, bool)>,
        now: OffsetDateTime,
        actor: &Actor,
        subject: Option<String>,
        detail: &str,
    ) -> Result<(), AuthError> {
        let Some((until, first)) = refused else { return Ok(()) };
        if first {
            self.domain.record(actor, "login.throttled", subject, detail)?;
        }
        Err(AuthError::TooManyAttempts { retry_after_secs: (until - now).whole_seconds().max(1) as u64 })
    }

    /// A sign-in counted by [`Self::reserve_global`] succeeded: it was no failure.
    fn refund_global(&self) {
        let mut limiter = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
        limiter.global.failures.pop_back();
    }

    fn clear_failures(&self, account: &str, client: Option<&str>) {
        let mut limiter = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
        for key in [Some(account), client].into_iter().flatten() {
            limiter.entries.remove(key);
        }
    }
}

/// Most keys the limiter tracks; past this, keys that are not blocked are forgotten first.
const LIMITER_CAPACITY: usize = 10_000;

/// Attempts per key (account and client network, client network, setup client), with the time the key may try
/// again. After [`FREE_FAILURES`] the delay doubles with each failure, from 1 s up to [`MAX_DELAY`]; with 3 free
/// failures, the fourth earns 1 s, so a quick fifth try is the first one refused.
#[derive(Debug, Default)]
struct Limiter {
    entries: HashMap<String, Attempts>,
    global: GlobalFailures,
}

/// The box's failed sign-ins of the last minute (at most [`GLOBAL_FAILURES_PER_MINUTE`] kept).
#[derive(Debug, Default)]
struct GlobalFailures {
    failures: VecDeque<OffsetDateTime>,
    /// Whether a refusal while the ceiling is reached was already audited.
    reported: bool,
}

#[derive(Debug)]
struct Attempts {
    count: u32,
    until: OffsetDateTime,
    /// Whether a refusal during the current delay was already audited.
    reported: bool,
}

impl Limiter {
    fn fail(&mut self, key: &str, now: OffsetDateTime) {
        if self.entries.len() >= LIMITER_CAPACITY && !self.entries.contains_key(key) {
            // Bounded memory whatever a flood of addresses or usernames does: forget keys not blocked now, then,
            // if that is not enough, half of the rest.
            self.entries.retain(|_, a| a.until > now);
            if self.entries.len() >= LIMITER_CAPACITY {
                let drop: Vec<String> = self.entries.keys().take(LIMITER_CAPACITY / 2).cloned().collect();
                for key in drop {
                    self.entries.remove(&key);
                }
            }
        }
        let attempts = self.entries.entry(key.to_owned()).or_insert(Attempts { count: 0, until: now, reported: false });
        attempts.count += 1;
        if attempts.count > FREE_FAILURES {
            let exponent = (attempts.count - FREE_FAILURES - 1).min(20);
            attempts.until = now + Duration::seconds(1 << exponent).min(MAX_DELAY);
            attempts.reported = false;
        }
    }

    /// The latest time any of `keys` may try again, if that is still ahead, and whether this is the first refusal
    /// of a delay.
    fn blocked(&mut self, keys: &[&str], now: OffsetDateTime) -> Option<(OffsetDateTime, bool)> {
        let mut result: Option<(OffsetDateTime, bool)> = None;
        for key in keys {
            if let Some(attempts) = self.entries.get_mut(*key)
                && attempts.until > now
            {
                let first = !attempts.reported;
                attempts.reported = true;
                result = Some(match result {
                    Some((until, earlier)) => (until.max(attempts.until), earlier || first),
                    None => (attempts.until, first),
                });
            }
        }
        result
    }
}

/// Usernames become limiter keys and audit actors; a megabyte-long one must not.
fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The limiter counts a client by [`crate::addrs::client_network`]: IPv6 by its /64, so rotating addresses within it
/// does not reset the delay, and IPv4 by its address, also when a `[::]` listener saw it as `::ffff:a.b.c.d`.
fn client_network(client: &str) -> String {
    match client.parse::<std::net::IpAddr>().map(crate::addrs::client_network) {
        Ok(network @ std::net::IpAddr::V6(_)) => format!("{network}/64"),
        Ok(network) => network.to_string(),
        Err(_) => client.to_owned(),
    }
}

fn admin_view(admin: Admin) -> AdminView {
    AdminView { username: admin.username, created_at: admin.created_at, created_by: admin.created_by }
}

fn validate_username(username: &str) -> Result<String, AuthError> {
    let username = username.trim().to_lowercase();
    let ok = (1..=64).contains(&username.len())
        && username.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(username)
    } else {
        Err(DomainError::invalid("username", "use 1 to 64 letters, digits, '.', '_', '-' or '@'").into())
    }
}

fn check_password_strength(password: &str) -> Result<(), AuthError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(AuthError::WeakPassword(format!(
            "the password is too short: use at least {MIN_PASSWORD_CHARS} characters (a few unrelated words are easy to remember)"
        )));
    }
    if chars > 1024 {
        return Err(AuthError::WeakPassword("the password is longer than 1024 characters".into()));
    }
    Ok(())
}

/// argon2id with the crate's defaults (19 MiB, 2 passes), a random salt, in PHC string form.
pub fn hash_password(password: &str) -> DomainResult<String> {
    let hash: PasswordHash = Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &random_bytes::<16>())
        .map_err(|error| DomainError::invalid("password", format!("cannot hash the password: {error}")))?;
    Ok(hash.to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    Argon2::default().verify_password(password.as_bytes(), hash).is_ok()
}

/// A setup code such as `K7QM-2XWP-9RTA`: 12 characters from an alphabet without look-alikes (60 bits).
fn setup_code() -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZ";
    let raw = random_bytes::<12>();
    let chars: Vec<char> = raw.iter().map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char).collect();
    chars.chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join("-")
}

fn normalize_setup_code(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::domain;
    use super::*;

    #[test]
    fn clients_count_by_network_and_mapped_ipv4_by_its_own_address() {
        assert_eq!(client_network("::ffff:192.0.2.7"), "192.0.2.7");
        assert_ne!(client_network("::ffff:192.0.2.7"), client_network("::ffff:198.51.100.9"));
        assert_eq!(client_network("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(client_network("2001:db8:1:2:bbbb::9"), client_network("2001:db8:1:2:aaaa::1"));
        assert_eq!(client_network("198.51.100.9"), "198.51.100.9");
    }

    const PASSWORD: &str = "correct horse battery";

    fn auth() -> (Auth, crate::clock::ManualClock) {
        let (d, clock) = domain();
        (Auth::new(d, Duration::hours(12)).unwrap(), clock)
    }

    #[test]
    fn the_first_admin_comes_from_the_setup_code_once() {
        let (auth, _) = auth();
        let code = auth.bootstrap("admin", None).unwrap().expect("a setup code while there is no admin");
        assert!(matches!(auth.setup("WRONG-CODE-0000", "admin", PASSWORD, None), Err(AuthError::BadSetupCode)));
        let weak = auth.setup(&code, "admin", "short", None).unwrap_err();
        assert!(matches!(weak, AuthError::WeakPassword(_)), "{weak}");
        let signed_in = auth.setup(&code.to_lowercase(), "Admin", PASSWORD, Some("192.0.2.7".into())).unwrap();
        assert_eq!(signed_in.username, "admin");
        assert!(auth.session(&signed_in.token).unwrap().is_some());
        assert!(matches!(auth.setup(&code, "eve", PASSWORD, None), Err(AuthError::AlreadySetUp)));
        assert_eq!(auth.bootstrap("admin", None).unwrap(), None, "no code once an admin exists");
    }

    #[test]
    fn the_setup_code_is_kept_across_restarts_until_the_first_admin() {
        let (auth, _) = auth();
        let updates = auth.setup_code_updates();
        let code = auth.bootstrap("admin", None).unwrap().unwrap();
        assert_eq!(*updates.borrow(), Some(code.clone()), "the console is told the code");
        // A restart: a new Auth over the same store shows the same code, and the first one still works.
        let restarted = Auth::new(auth.domain.clone(), Duration::hours(12)).unwrap();
        assert_eq!(restarted.bootstrap("admin", None).unwrap(), Some(code.clone()));
        restarted.setup(&code, "admin", PASSWORD, None).unwrap();
        assert_eq!(auth.domain.store().setup_code().unwrap(), None, "spent with the admin's creation");
        assert_eq!(*restarted.setup_code_updates().borrow(), None, "the console is told it is gone");
        assert!(matches!(auth.setup(&code, "second", PASSWORD, None), Err(AuthError::AlreadySetUp)));
        assert_eq!(
            Auth::new(auth.domain.clone(), Duration::hours(12)).unwrap().bootstrap("admin", None).unwrap(),
            None
        );
    }

    #[test]
    fn a_configured_password_or_a_restored_admin_retires_the_code() {
        let (auth, _) = auth();
        auth.bootstrap("admin", None).unwrap().unwrap();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        assert_eq!(auth.domain.store().setup_code().unwrap(), None, "ENROLLD_ADMIN_PASSWORD made the admin");

        // A code left beside an admin (a backup restored over a box still waiting for setup) is forgotten.
        auth.domain.store().setup_code_or_insert(|| "AAAA-BBBB-CCCC".into()).unwrap();
        assert_eq!(auth.bootstrap("admin", None).unwrap(), None);
        assert_eq!(auth.domain.store().setup_code().unwrap(), None);
        assert!(matches!(auth.setup("AAAA-BBBB-CCCC", "eve", PASSWORD, None), Err(AuthError::AlreadySetUp)));
    }

    #[test]
    fn a_spent_code_claims_nothing_even_if_the_check_raced() {
        let (auth, _) = auth();
        let code = auth.bootstrap("admin", None).unwrap().unwrap();
        // As if a second claim had passed the code check just before the first one committed.
        auth.insert_admin(&Actor::system(), "first", PASSWORD, Some(&code)).unwrap();
        let second = auth.insert_admin(&Actor::system(), "second", PASSWORD, Some(&code));
        assert!(matches!(second, Err(AuthError::AlreadySetUp)), "{second:?}");
        assert_eq!(auth.admins().unwrap().len(), 1);
    }

    #[test]
    fn the_decoy_hash_costs_what_a_real_hash_costs() {
        let real = hash_password("anything at all").unwrap();
        let (real, decoy) = (PasswordHash::new(&real).unwrap(), PasswordHash::new(DECOY_HASH).unwrap());
        assert_eq!((real.algorithm, real.version), (decoy.algorithm, decoy.version));
        assert_eq!(real.params, decoy.params, "the same memory, passes and lanes");
        assert_eq!(real.hash.map(|h| h.len()), decoy.hash.map(|h| h.len()));
        assert!(!verify_password("anything at all", DECOY_HASH));
    }

    #[test]
    fn passwords_are_argon2id_and_tokens_are_stored_only_as_hashes() {
        let (auth, _) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        let admin = auth.domain.store().get::<Admin>(b"admin").unwrap().unwrap();
        assert!(admin.password_hash.starts_with("$argon2id$"), "{}", admin.password_hash);
        let signed_in = auth.login("admin", PASSWORD, None).unwrap();
        assert!(auth.domain.store().get::<Session>(signed_in.token.as_bytes()).unwrap().is_none());
        let stored = auth.domain.store().get::<Session>(sha256_hex(signed_in.token.as_bytes()).as_bytes()).unwrap();
        assert_eq!(stored.unwrap().username, "admin");
    }

    #[test]
    fn failed_logins_earn_growing_delays_per_account_and_client() {
        let (auth, clock) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        let from = || Some("198.51.100.9".to_owned());
        for _ in 0..FREE_FAILURES {
            assert!(matches!(auth.login("admin", "nope nope nope", from()), Err(AuthError::BadCredentials)));
        }
        assert!(matches!(auth.login("admin", "nope nope nope", from()), Err(AuthError::BadCredentials)));
        // The fifth try from that address waits, even with the right password.
        match auth.login("admin", PASSWORD, from()) {
            Err(AuthError::TooManyAttempts { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::seconds(2));
        assert!(matches!(auth.login("admin", "nope nope nope", from()), Err(AuthError::BadCredentials)));
        match auth.login("admin", PASSWORD, from()) {
            Err(AuthError::TooManyAttempts { retry_after_secs }) => assert_eq!(retry_after_secs, 2, "doubled"),
            other => panic!("{other:?}"),
        }
        // Meanwhile the admin signs in from elsewhere: one address's guesses do not lock the account.
        assert!(auth.login("admin", PASSWORD, Some("203.0.113.5".into())).is_ok());
        clock.advance(Duration::seconds(3));
        assert!(auth.login("admin", PASSWORD, from()).is_ok(), "the right password after the wait");
        let log = auth.domain.audit_log(None, 50).unwrap();
        assert_eq!(log.items.iter().filter(|e| e.action == "login.failed").count(), 5);
    }

    #[test]
    fn guesses_from_many_addresses_meet_the_ceiling_of_the_whole_box() {
        let (auth, clock) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        for n in 0..GLOBAL_FAILURES_PER_MINUTE {
            let from = Some(format!("198.51.{}.{}", n / 200, n % 200));
            assert!(matches!(auth.login("admin", "wrong wrong", from), Err(AuthError::BadCredentials)), "{n}");
        }
        match auth.login("admin", PASSWORD, Some("203.0.113.5".into())) {
            Err(AuthError::TooManyAttempts { retry_after_secs }) => assert_eq!(retry_after_secs, 60),
            other => panic!("{other:?}"),
        }
        clock.advance(Duration::seconds(61));
        assert!(auth.login("admin", PASSWORD, Some("203.0.113.5".into())).is_ok(), "once the minute has passed");
        let log = auth.domain.audit_log(None, 500).unwrap();
        assert_eq!(log.items.iter().filter(|e| e.action == "login.throttled").count(), 1);
    }

    #[test]
    fn a_password_change_ends_every_session_even_one_made_meanwhile() {
        let (auth, _) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        let before = auth.login("admin", PASSWORD, None).unwrap();
        auth.change_password(&Actor::system(), "admin", "a new long password").unwrap();
        assert!(auth.session(&before.token).unwrap().is_none());
        // A session stored under the old generation (as if its login raced the change) is refused too.
        let raced = Session {
            token_hash: sha256_hex(b"raced"),
            username: "admin".into(),
            csrf_token: String::new(),
            created_at: auth.domain.now(),
            expires_at: auth.domain.now() + Duration::hours(1),
            client: None,
            generation: 0,
        };
        auth.domain.store().transact::<_, DomainError>(|tx| tx.put(None, &raced)).unwrap();
        assert!(auth.session("raced").unwrap().is_none());
        assert!(auth.login("admin", "a new long password", None).is_ok());
    }

    #[test]
    fn the_limiter_stays_bounded_and_audits_one_refusal_per_delay() {
        let (auth, _) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        for n in 0..(LIMITER_CAPACITY + 500) {
            auth.limiter.lock().unwrap().fail(&format!("user:nobody{n}"), auth.domain.now());
        }
        assert!(auth.limiter.lock().unwrap().entries.len() <= LIMITER_CAPACITY);
        for _ in 0..4 {
            let _ = auth.login("admin", "wrong wrong", Some("2001:db8:1:2::7".into()));
        }
        // Another address in the same /64 is the same client.
        let other = auth.login("somebody", "x", Some("2001:db8:1:2::99".into()));
        assert!(matches!(other, Err(AuthError::TooManyAttempts { .. })), "{other:?}");
        for _ in 0..3 {
            let _ = auth.login("admin", PASSWORD, Some("2001:db8:1:2::7".into()));
        }
        let log = auth.domain.audit_log(None, 500).unwrap();
        assert_eq!(log.items.iter().filter(|e| e.action == "login.throttled" && e.actor == "admin").count(), 1);
        let long = "x".repeat(100_000);
        let _ = auth.login(&long, "x", None);
        let log = auth.domain.audit_log(None, 1).unwrap();
        assert_eq!(log.items[0].actor.len(), 64, "long usernames are cut before they are stored");
    }

    #[test]
    fn sessions_expire_and_can_be_listed_and_revoked() {
        let (auth, clock) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        let a = auth.login("admin", PASSWORD, None).unwrap();
        let b = auth.login("admin", PASSWORD, None).unwrap();
        let listed = auth.sessions().unwrap();
        assert_eq!(listed.len(), 2);
        let b_id = &sha256_hex(b.token.as_bytes())[..16];
        auth.revoke(&Actor::system(), b_id).unwrap();
        assert!(auth.session(&b.token).unwrap().is_none(), "revoked");
        assert!(auth.session(&a.token).unwrap().is_some());
        clock.advance(Duration::hours(13));
        assert!(auth.session(&a.token).unwrap().is_none(), "expired");
    }

    #[test]
    fn the_last_admin_stays() {
        let (auth, _) = auth();
        auth.bootstrap("admin", Some(PASSWORD)).unwrap();
        let actor = Actor::system();
        assert!(auth.delete_admin(&actor, "admin").is_err());
        auth.create_admin(&actor, "second", PASSWORD).unwrap();
        auth.delete_admin(&actor, "admin").unwrap();
        assert!(matches!(auth.login("admin", PASSWORD, None), Err(AuthError::BadCredentials)));
    }
}
