//! How a user proves who they are on the enrollment page: the invite's passcode, their own password, or both, as
//! the admin sets it. Passwords are answered by a [`Directory`]: today the local accounts users set up through a
//! one-time link (argon2id hashes in the store); a directory service (LDAP, say) can implement the same trait later
//! without the pages or the lockout changing. Wrong answers of either kind count toward the invite's one limit.

use std::str::FromStr as _;
use std::sync::Arc;

use base64::Engine as _;
use serde::Serialize;
use time::{Duration, OffsetDateTime};
use utoipa::ToSchema;

use super::auth::{MIN_PASSWORD_CHARS, hash_password, verify_password};
use super::invites::PasscodeCheck;
use super::{Actor, DomainError, DomainResult, Enrollment, random_bytes, sha256_hex};
use crate::model::{AccountLink, EnrollAuth, Id, Invite, JobChannel, JobKind, Remark, Setting, User, UserAccount};
use crate::store::Store;

/// The setting that overrides `enroll_auth` from the configuration.
pub const ENROLL_AUTH_SETTING: &str = "enroll.auth";
/// How long a password link works.
const LINK_LIFETIME: Duration = Duration::hours(24);
/// A user asks for a password link at most this often per invite.
const LINK_INTERVAL: Duration = Duration::minutes(5);

/// Where users' passwords are checked.
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// Whether the user has a password this directory can check (a local account that was set up).
    fn has_password(&self, user: &User) -> DomainResult<bool>;
    /// Whether `password` is the user's. Comparison is the hash's own (constant time).
    fn check_password(&self, user: &User, password: &str) -> DomainResult<bool>;
}

/// Local accounts: a password the user set through a one-time link, kept as an argon2id hash.
#[derive(Debug, Clone)]
pub struct LocalAccounts {
    store: Store,
}

impl LocalAccounts {
    pub fn shared(store: Store) -> Arc<dyn Directory> {
        Arc::new(LocalAccounts { store })
    }
}

impl Directory for LocalAccounts {
    fn has_password(&self, user: &User) -> DomainResult<bool> {
        Ok(self.store.get::<UserAccount>(user.id.as_bytes())?.is_some())
    }

    fn check_password(&self, user: &User, password: &str) -> DomainResult<bool> {
        Ok(self
            .store
            .get::<UserAccount>(user.id.as_bytes())?
            .is_some_and(|account| verify_password(password, &account.password_hash)))
    }
}

/// What the user typed on the enrollment page.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    pub passcode: Option<&'a str>,
    pub password: Option<&'a str>,
}

/// A one-time password link, made for a user.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedAccountLink {
    /// The path to open on the appliance: `/account/<token>`.
    pub path: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Why the enrollment page mails no password link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// One was sent a moment ago; another may be asked for at this time.
    TooSoon(OffsetDateTime),
    /// No password is asked for, or the user has one already.
    NotNeeded,
}

/// An answer judged but not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Judged {
    Answer(bool),
    Locked,
    NoPassword,
}

/// Why a password link cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountLinkProblem {
    /// Never made, already used, or expired.
    Unusable,
}

impl Enrollment {
    /// How users authenticate now: the admin's saved choice, or the configuration's.
    pub fn enroll_auth(&self) -> DomainResult<EnrollAuth> {
        Ok(self
            .store
            .get::<Setting>(ENROLL_AUTH_SETTING.as_bytes())?
            .and_then(|s| EnrollAuth::from_str(&s.value).ok())
            .unwrap_or(self.policy().enroll_auth))
    }

    /// Saves (or, with `None`, forgets) the admin's choice of how users authenticate.
    pub fn set_enroll_auth(&self, actor: &Actor, auth: Option<EnrollAuth>) -> DomainResult<EnrollAuth> {
        match auth {
            Some(auth) => {
                self.save_setting(actor, ENROLL_AUTH_SETTING, auth.as_str())?;
            }
            None => self.reset_setting(actor, ENROLL_AUTH_SETTING)?,
        }
        self.enroll_auth()
    }

    /// Whether the user can answer a password question (has a local account, or the directory knows them).
    pub fn has_password(&self, user_id: &Id) -> DomainResult<bool> {
        let user = self.user(user_id)?;
        self.directory.has_password(&user)
    }

    /// Checks what the user typed against what the admin asks for. Every wrong answer counts toward the invite's
    /// limit; a user asked for a password who has none yet gets [`PasscodeCheck::NoPassword`] (after a correct
    /// passcode, when both are asked for), which does not count.
    pub fn check_credentials(
        &self,
        actor: &Actor,
        invite_id: &Id,
        credentials: Credentials<'_>,
    ) -> DomainResult<PasscodeCheck> {
        self.check_credentials_with(actor, invite_id, credentials, self.enroll_auth()?)
    }

    pub(super) fn check_credentials_with(
        &self,
        actor: &Actor,
        invite_id: &Id,
        credentials: Credentials<'_>,
        auth: EnrollAuth,
    ) -> DomainResult<PasscodeCheck> {
        match self.judge_credentials(invite_id, credentials, auth)? {
            Judged::Locked => Ok(PasscodeCheck::Locked),
            Judged::NoPassword => Ok(PasscodeCheck::NoPassword),
            Judged::Answer(right) => self.record_attempt(actor, invite_id, right, auth),
        }
    }

    /// Whether the answer is right, without counting it (callers that hold no secret link, such as Windows'
    /// email sign-in, throttle by other means so a stranger cannot lock a user's invite).
    pub(super) fn judge_credentials(
        &self,
        invite_id: &Id,
        credentials: Credentials<'_>,
        auth: EnrollAuth,
    ) -> DomainResult<Judged> {
        let invite: Invite =
            self.store.get(invite_id.as_bytes())?.ok_or_else(|| DomainError::not_found("invite", invite_id))?;
        if invite.locked {
            return Ok(Judged::Locked);
        }
        let wants_passcode = matches!(auth, EnrollAuth::Passcode | EnrollAuth::Both);
        let wants_password = matches!(auth, EnrollAuth::Password | EnrollAuth::Both);
        let passcode_right = !wants_passcode || {
            let attempted = self.passcode_hash(invite_id, credentials.passcode.unwrap_or_default().trim());
            bool::from(subtle::ConstantTimeEq::ct_eq(attempted.as_bytes(), invite.passcode_hash.as_bytes()))
        };
        if wants_password {
            let user = self.user(&invite.user_id)?;
            if !self.directory.has_password(&user)? {
                return Ok(if passcode_right { Judged::NoPassword } else { Judged::Answer(false) });
            }
            // The password is checked whatever the passcode was, so the time taken does not tell which was wrong.
            let password_right = self.directory.check_password(&user, credentials.password.unwrap_or_default())?;
            return Ok(Judged::Answer(passcode_right && password_right));
        }
        Ok(Judged::Answer(passcode_right))
    }

    /// A new one-time link for a user to set their password; the admin hands it over.
    pub fn account_link(&self, actor: &Actor, user_id: &Id) -> DomainResult<CreatedAccountLink> {
        self.made_account_link(actor, user_id, None)?
            .map_err(|_| DomainError::conflict("too_soon", "a link was made a moment ago; try again shortly"))
    }

    /// The user asked on the enrollment page: a password link goes by mail to the invite's user, only while a
    /// password is asked for and the user has none, and at most one every five minutes per invite (checked in the
    /// transaction that queues it, so parallel requests cannot all pass).
    pub fn mail_account_link(&self, actor: &Actor, invite_id: &Id) -> DomainResult<Result<(), LinkRefusal>> {
        let invite: Invite =
            self.store.get(invite_id.as_bytes())?.ok_or_else(|| DomainError::not_found("invite", invite_id))?;
        if matches!(self.enroll_auth()?, EnrollAuth::Passcode) || self.has_password(&invite.user_id)? {
            return Ok(Err(LinkRefusal::NotNeeded));
        }
        self.make_account_link(actor, &invite.user_id, Some(invite_id))
    }

    fn make_account_link(
        &self,
        actor: &Actor,
        user_id: &Id,
        invite_id: Option<&Id>,
    ) -> DomainResult<Result<(), LinkRefusal>> {
        self.made_account_link(actor, user_id, invite_id).map(|made| made.map(|_| ()))
    }

    fn made_account_link(
        &self,
        actor: &Actor,
        user_id: &Id,
        invite_id: Option<&Id>,
    ) -> DomainResult<Result<CreatedAccountLink, LinkRefusal>> {
        let now = self.now();
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<24>());
        let link = AccountLink {
            token_hash: sha256_hex(token.as_bytes()),
            user_id: *user_id,
            created_at: now,
            expires_at: now + LINK_LIFETIME,
        };
        self.transact(|tx| {
            let user: User = tx.get_id(user_id)?.ok_or_else(|| DomainError::not_found("user", user_id))?;
            if let Some(invite_id) = invite_id {
                let invite: Invite =
                    tx.get_id(invite_id)?.ok_or_else(|| DomainError::not_found("invite", invite_id))?;
                if let Some(last) = invite.account_link_at.filter(|at| *at + LINK_INTERVAL > now) {
                    return Ok(Err(LinkRefusal::TooSoon(last + LINK_INTERVAL)));
                }
                let job = crate::model::DeliveryJob {
                    link_token: Some(token.clone()),
                    ..self.queued_job(&invite, JobKind::Account, JobChannel::Email, user.email.clone())
                };
                tx.put(None, &job)?;
                let mut noted = invite.clone();
                noted.account_link_at = Some(now);
                noted.remarks.push(Remark { at: now, text: format!("{} asked for a password link", user.name) });
                tx.put(Some(&invite), &noted)?;
            }
            tx.put(None, &link)?;
            let how = if invite_id.is_some() { "mailed to the user" } else { "handed to an admin" };
            self.audit(
                tx,
                actor,
                "account.link",
                Some(user_id.to_string()),
                format!("password link for {}, {how}", user.email),
            )?;
            Ok(Ok(CreatedAccountLink { path: format!("/account/{token}"), expires_at: link.expires_at }))
        })
    }

    /// Every password link of a user, used or not (setting or resetting a password ends them all).
    fn links_of(&self, user_id: &Id) -> DomainResult<Vec<AccountLink>> {
        Ok(self.store.all::<AccountLink>(|link| link.user_id == *user_id)?)
    }

    /// The user a password link is for, if it can still be used.
    pub fn open_account_link(&self, token: &str) -> DomainResult<Result<User, AccountLinkProblem>> {
        let now = self.now();
        let Some(link) = self.store.get::<AccountLink>(sha256_hex(token.as_bytes()).as_bytes())? else {
            return Ok(Err(AccountLinkProblem::Unusable));
        };
        if link.expires_at <= now {
            return Ok(Err(AccountLinkProblem::Unusable));
        }
        match self.store.get::<User>(link.user_id.as_bytes())? {
            Some(user) => Ok(Ok(user)),
            None => Ok(Err(AccountLinkProblem::Unusable)),
        }
    }

    /// Sets the user's password through a password link, which is then used up. A password shorter than the
    /// minimum is refused (the link stays usable).
    pub fn set_account_password(&self, token: &str, password: &str) -> DomainResult<Result<User, AccountLinkProblem>> {
        if password.chars().count() < MIN_PASSWORD_CHARS || password.chars().count() > 1024 {
            return Err(DomainError::invalid(
                "password",
                format!("use at least {MIN_PASSWORD_CHARS} characters (a few unrelated words are easy to remember)"),
            ));
        }
        // Hashing is slow on purpose; it happens before the transaction, which only checks and writes.
        let password_hash = hash_password(password)?;
        let now = self.now();
        let hash = sha256_hex(token.as_bytes());
        let siblings = match self.store.get::<AccountLink>(hash.as_bytes())? {
            Some(link) => self.links_of(&link.user_id)?,
            None => Vec::new(),
        };
        self.transact(|tx| {
            let Some(link) = tx.get::<AccountLink, _>(hash.as_bytes())? else {
                return Ok(Err(AccountLinkProblem::Unusable));
            };
            // This link is used up, and so is every other one the user was sent: one password, one way to set it.
            tx.delete(&link)?;
            for other in siblings.iter().filter(|other| other.token_hash != link.token_hash) {
                if tx.get::<AccountLink, _>(other.token_hash.as_bytes())?.is_some() {
                    tx.delete(other)?;
                }
            }
            if link.expires_at <= now {
                return Ok(Err(AccountLinkProblem::Unusable));
            }
            let Some(user) = tx.get_id::<User, _>(&link.user_id)? else {
                return Ok(Err(AccountLinkProblem::Unusable));
            };
            let old = tx.get::<UserAccount, _>(user.id.as_bytes())?;
            let account = UserAccount { user_id: user.id, password_hash: password_hash.clone(), set_at: now };
            tx.put(old.as_ref(), &account)?;
            let what = if old.is_some() { "changed" } else { "set" };
            self.audit(
                tx,
                &Actor::device(None),
                "account.password",
                Some(user.id.to_string()),
                format!("{} {what} their password", user.email),
            )?;
            Ok(Ok(user))
        })
    }

    /// Removes a user's password (an admin's reset): the user sets a new one through a new link.
    pub fn reset_account(&self, actor: &Actor, user_id: &Id) -> DomainResult<()> {
        let links = self.links_of(user_id)?;
        self.transact(|tx| {
            let user: User = tx.get_id(user_id)?.ok_or_else(|| DomainError::not_found("user", user_id))?;
            for link in &links {
                if tx.get::<AccountLink, _>(link.token_hash.as_bytes())?.is_some() {
                    tx.delete(link)?;
                }
            }
            if let Some(old) = tx.get::<UserAccount, _>(user_id.as_bytes())? {
                tx.delete(&old)?;
                self.audit(
                    tx,
                    actor,
                    "account.reset",
                    Some(user_id.to_string()),
                    format!("password of {} removed", user.email),
                )?;
            }
            Ok(())
        })
    }

    /// Password links that expired are removed (called by the invite sweeper).
    pub fn sweep_account_links(&self) -> DomainResult<usize> {
        let now = self.now();
        let expired = self.store.all::<AccountLink>(|link| link.expires_at <= now)?;
        for link in &expired {
            self.transact(|tx| {
                if tx.get::<AccountLink, _>(link.token_hash.as_bytes())?.is_some() {
                    tx.delete(link)?;
                }
                Ok(())
            })?;
        }
        Ok(expired.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::*;
    use crate::clock::Clock as _;
    use crate::model::{Channels, Ownership, Platform};

    const PASSWORD: &str = "correct horse battery";

    /// A user and an admin's own invite for them: the invite id and its passcode.
    fn invited(d: &Enrollment) -> (Id, Id, String) {
        let user = d
            .create_user(
                &admin(),
                &super::super::NewUser { name: "Ann".into(), email: "ann@example.com".into(), ..Default::default() },
            )
            .unwrap();
        let new = super::super::NewInvite {
            user_id: user.id,
            platform: Platform::Ios,
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Email,
        };
        let created = d.create_invite_by_myself(&admin(), &new).unwrap();
        (user.id, created.invite.id, created.passcode.unwrap())
    }

    fn token_of(link: &CreatedAccountLink) -> String {
        link.path.trim_start_matches("/account/").to_owned()
    }

    fn check(d: &Enrollment, invite: &Id, passcode: Option<&str>, password: Option<&str>) -> PasscodeCheck {
        d.check_credentials(&Actor::device(None), invite, Credentials { passcode, password }).unwrap()
    }

    #[test]
    fn a_password_is_set_once_through_its_link_and_then_asked_for() {
        let (d, clock) = domain();
        let (user, invite, passcode) = invited(&d);
        assert_eq!(d.set_enroll_auth(&admin(), Some(EnrollAuth::Password)).unwrap(), EnrollAuth::Password);
        assert_eq!(check(&d, &invite, None, Some(PASSWORD)), PasscodeCheck::NoPassword, "no password set yet");
        assert_eq!(check(&d, &invite, Some(&passcode), None), PasscodeCheck::NoPassword, "the passcode is not asked");

        let link = d.account_link(&admin(), &user).unwrap();
        let token = token_of(&link);
        assert_eq!(link.expires_at, clock.now() + Duration::hours(24));
        assert!(d.set_account_password(&token, "short").unwrap_err().to_string().contains("at least 10"));
        assert_eq!(d.open_account_link(&token).unwrap().unwrap().id, user, "a refused password leaves the link usable");
        d.set_account_password(&token, PASSWORD).unwrap().unwrap();
        assert_eq!(d.set_account_password(&token, "another long one").unwrap(), Err(AccountLinkProblem::Unusable));
        assert!(d.has_password(&user).unwrap());
        let account: UserAccount = d.store.get(user.as_bytes()).unwrap().unwrap();
        assert!(account.password_hash.starts_with("$argon2id$") && !account.password_hash.contains(PASSWORD));

        assert_eq!(check(&d, &invite, None, Some(PASSWORD)), PasscodeCheck::Correct);
        assert_eq!(check(&d, &invite, None, Some("wrong password")), PasscodeCheck::Wrong { attempts_left: 4 });

        d.reset_account(&admin(), &user).unwrap();
        assert_eq!(check(&d, &invite, None, Some(PASSWORD)), PasscodeCheck::NoPassword);
        let late = d.account_link(&admin(), &user).unwrap();
        clock.advance(Duration::hours(25));
        assert_eq!(d.open_account_link(&token_of(&late)).unwrap(), Err(AccountLinkProblem::Unusable));
        assert_eq!(d.sweep_account_links().unwrap(), 1);
    }

    #[test]
    fn with_both_every_wrong_answer_counts_toward_one_lock() {
        let (d, _) = domain();
        let (user, invite, passcode) = invited(&d);
        d.set_enroll_auth(&admin(), Some(EnrollAuth::Both)).unwrap();
        let token = token_of(&d.account_link(&admin(), &user).unwrap());
        d.set_account_password(&token, PASSWORD).unwrap().unwrap();

        assert_eq!(check(&d, &invite, Some(&passcode), Some(PASSWORD)), PasscodeCheck::Correct);
        assert_eq!(check(&d, &invite, Some(&passcode), None), PasscodeCheck::Wrong { attempts_left: 4 });
        assert_eq!(check(&d, &invite, None, Some(PASSWORD)), PasscodeCheck::Wrong { attempts_left: 3 });
        assert_eq!(check(&d, &invite, Some("000000"), Some(PASSWORD)), PasscodeCheck::Wrong { attempts_left: 2 });
        check(&d, &invite, Some(&passcode), Some("nope nope nope"));
        assert_eq!(check(&d, &invite, Some(&passcode), Some("nope")), PasscodeCheck::Locked);
        assert_eq!(check(&d, &invite, Some(&passcode), Some(PASSWORD)), PasscodeCheck::Locked, "locked stays locked");
        let locked: Invite = d.store.get(invite.as_bytes()).unwrap().unwrap();
        assert!(locked.remarks.last().unwrap().text.contains("5 wrong passcodes or passwords"), "{:?}", locked.remarks);

        // Back to the configuration's choice (the passcode alone).
        assert_eq!(d.set_enroll_auth(&admin(), None).unwrap(), EnrollAuth::Passcode);
    }

    #[test]
    fn a_user_asks_for_a_link_by_mail_at_most_every_five_minutes() {
        let (d, clock) = domain();
        let (user, invite, _) = invited(&d);
        let ask = || d.mail_account_link(&Actor::device(None), &invite).unwrap();
        assert_eq!(ask(), Err(LinkRefusal::NotNeeded), "the passcode alone is asked for");
        d.set_enroll_auth(&admin(), Some(EnrollAuth::Password)).unwrap();
        assert_eq!(ask(), Ok(()));
        let job = d.deliveries(&invite).unwrap().into_iter().find(|j| j.kind == JobKind::Account).unwrap();
        assert_eq!(job.to, "ann@example.com");
        let token = job.link_token.unwrap();
        assert!(d.open_account_link(&token).unwrap().is_ok(), "the mailed link opens");
        let again = d.mail_account_link(&Actor::device(None), &invite).unwrap();
        assert_eq!(again, Err(LinkRefusal::TooSoon(clock.now() + Duration::minutes(5))));
        clock.advance(Duration::minutes(6));
        assert_eq!(ask(), Ok(()));
        let mailed: Vec<String> = d
            .deliveries(&invite)
            .unwrap()
            .into_iter()
            .filter(|j| j.kind == JobKind::Account)
            .filter_map(|j| j.link_token)
            .collect();
        assert_eq!(mailed.len(), 2);
        // Setting the password with one link ends the other too.
        d.set_account_password(&mailed[1], PASSWORD).unwrap().unwrap();
        assert_eq!(d.open_account_link(&mailed[0]).unwrap(), Err(AccountLinkProblem::Unusable));
        assert_eq!(ask(), Err(LinkRefusal::NotNeeded), "the user has a password now");
        assert!(d.has_password(&user).unwrap());
    }
}
