//! Invites and their state machine.
//!
//! ```text
//!            resend (new link, old one dead)
//!          ┌──────────┐
//!          ▼          │
//!   ──► pending ──────┴──► enrolled      (a device completed enrollment; terminal)
//!        │  ▲  │
//! expiry │  │  │ remove
//!        ▼  │  ▼
//!     expired ─► removed                 (terminal: the link answers "removed")
//!           resend
//! ```
//!
//! Only a pending, unexpired, unlocked invite opens for a device. The link token and passcode are generated here,
//! stored only as hashes, and travel in clear only inside the delivery job written in the same transaction (or, for
//! an admin's own "by myself" invite, in the one answer to the admin).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::{
    Actor, DomainError, DomainResult, Enrollment, Paged, TxResult, clamp_limit, decode_cursor, encode_cursor,
    random_bytes, sha256_hex,
};
use crate::model::{
    Channels, DeliveryJob, Group, Id, Invite, InviteStatus, JobChannel, JobKind, JobState, Ownership, Platform, Remark,
    User,
};
use crate::store::{Scan, Tx, invite_status_byte, time_key, tree};

/// An invite to create.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInvite {
    pub user_id: Id,
    pub platform: Platform,
    #[serde(default = "default_ownership")]
    pub ownership: Ownership,
    pub group_id: Option<Id>,
    #[serde(default = "default_channels")]
    pub channels: Channels,
}

fn default_ownership() -> Ownership {
    Ownership::Corporate
}

fn default_channels() -> Channels {
    Channels::Email
}

/// An invite as the admin sees it, with its user's and group's names.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct InviteView {
    pub id: Id,
    pub user_id: Id,
    pub user_name: String,
    pub email: String,
    pub platform: Platform,
    pub ownership: Ownership,
    pub group_id: Option<Id>,
    pub group_name: Option<String>,
    pub channels: Channels,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub status: InviteStatus,
    pub remarks: Vec<Remark>,
    pub by_myself: bool,
    pub created_by: String,
    pub device_id: Option<Id>,
    /// Locked after too many wrong passcodes; a resend unlocks it.
    pub locked: bool,
    /// Where the messages of the current send stand (queued, sending, sent, deferred until …, failed), one per
    /// channel, with the server's last reply.
    pub delivery: Vec<crate::model::DeliveryStatus>,
}

/// A new (or resent) invite; the link token and passcode appear only for an admin's own "by myself" invite.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CreatedInvite {
    pub invite: InviteView,
    /// The secret part of the enrollment link (`/e/{link_token}`).
    pub link_token: Option<String>,
    pub passcode: Option<String>,
}

/// Filters for listing invites.
#[derive(Debug, Clone, Default, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct InviteQuery {
    pub status: Option<InviteStatus>,
    pub platform: Option<Platform>,
    pub group_id: Option<Id>,
    pub user_id: Option<Id>,
    /// Text to find in the user's name or email.
    pub q: Option<String>,
    /// `newest` (default) or `oldest` first, by requested time.
    #[param(pattern = "^(newest|oldest)$")]
    pub order: Option<String>,
    #[param(pattern = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$")]
    #[serde(default, deserialize_with = "crate::domain::page_cursor")]
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    #[serde(default, deserialize_with = "crate::domain::page_limit")]
    pub limit: Option<usize>,
}

/// Overrides for an invite made from an existing invite, device or staged device; absent fields are taken from it.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdditionalInvite {
    pub platform: Option<Platform>,
    pub ownership: Option<Ownership>,
    pub group_id: Option<Id>,
    pub channels: Option<Channels>,
}

impl AdditionalInvite {
    pub(crate) fn apply(&self, defaults: NewInvite) -> NewInvite {
        NewInvite {
            user_id: defaults.user_id,
            platform: self.platform.unwrap_or(defaults.platform),
            ownership: self.ownership.unwrap_or(defaults.ownership),
            group_id: self.group_id.or(defaults.group_id),
            channels: self.channels.unwrap_or(defaults.channels),
        }
    }
}

/// Which invites a bulk action applies to: listed ids, or everything a filter matches.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkSelection {
    pub ids: Option<Vec<Id>>,
    pub filter: Option<InviteQuery>,
}

/// The result of a bulk action for one invite.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BulkOutcome {
    pub id: Id,
    pub ok: bool,
    /// Why it was not done.
    pub error: Option<String>,
}

/// Which of a group's users "invite a group" invites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupInviteMode {
    /// Members who have never had an invite.
    NeverInvited,
    /// Members who were invited but have not enrolled a device.
    InvitedNotEnrolled,
}

/// An "invite a group" request; with `dry_run` it only counts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupInvitePlan {
    pub mode: GroupInviteMode,
    pub platform: Platform,
    #[serde(default = "default_ownership")]
    pub ownership: Ownership,
    #[serde(default = "default_channels")]
    pub channels: Channels,
    #[serde(default)]
    pub dry_run: bool,
}

/// What "invite a group" did (or would do).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GroupInviteResult {
    pub users: usize,
    pub invites_created: usize,
    pub dry_run: bool,
    /// Users that could not be invited, with the reason.
    pub skipped: Vec<BulkOutcome>,
}

/// Why an enrollment link does not open. The page says which, and nothing about other invites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkProblem {
    Unknown,
    Expired,
    Removed,
    Used,
    Locked,
}

/// The outcome of a passcode check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasscodeCheck {
    Correct,
    Wrong {
        attempts_left: u32,
    },
    Locked,
    /// A password is asked for and the user has none yet: they set one through a password link first.
    NoPassword,
}

/// Where a new invite comes from: an admin's own test invite, the words its first remark starts with, and the CSV
/// import that made it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InviteOrigin<'a> {
    pub by_myself: bool,
    pub verb: &'a str,
    pub import: Option<Id>,
}

/// Fresh secrets for an invite: the link token and the passcode, in clear. Made outside a transaction, because a
/// transaction's closure may run more than once and must write the same values each time.
pub(crate) struct Secrets {
    token: String,
    passcode: String,
}

pub(crate) fn new_secrets() -> Secrets {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>());
    let passcode = format!("{:08}", u64::from_be_bytes(random_bytes::<8>()) % 100_000_000);
    Secrets { token, passcode }
}

/// Hashes a link token for lookup.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

impl Enrollment {
    pub(super) fn passcode_hash(&self, invite_id: &Id, passcode: &str) -> String {
        let tag = ring::hmac::sign(&self.passcode_key, &[invite_id.as_bytes(), passcode.as_bytes()].concat());
        crate::pki::sha256_hex(tag.as_ref())
    }

    /// The delivery jobs for one send of `invite` to `user`.
    fn jobs_for(&self, invite: &Invite, user: &User, secrets: &Secrets, import: Option<Id>) -> Vec<DeliveryJob> {
        let mut jobs = Vec::new();
        if invite.by_myself {
            return jobs;
        }
        let mut add = |channel, to: &str| {
            jobs.push(DeliveryJob {
                link_token: Some(secrets.token.clone()),
                passcode: Some(secrets.passcode.clone()),
                import,
                ..self.queued_job(invite, JobKind::Invite, channel, to.to_owned())
            });
        };
        if invite.channels.email() {
            add(JobChannel::Email, &user.email);
        }
        if let (true, Some(phone)) = (invite.channels.sms(), &user.phone) {
            add(JobChannel::Sms, phone);
        }
        // The reminder carries no link or passcode: they are not kept for days in the outbox.
        if let Some(before) = self.policy().reminder_before
            && invite.channels.email()
            && invite.expires_at - before > self.now()
        {
            jobs.push(DeliveryJob {
                import,
                next_attempt_at: Some(invite.expires_at - before),
                ..self.queued_job(invite, JobKind::Reminder, JobChannel::Email, user.email.clone())
            });
        }
        jobs
    }

    pub(crate) fn delivery_remark(jobs: &[DeliveryJob]) -> String {
        let sends = jobs.iter().filter(|j| j.kind == JobKind::Invite);
        match sends.map(|j| j.channel.as_str()).collect::<Vec<_>>().as_slice() {
            [] => "Shown to the admin; not sent".to_owned(),
            channels => {
                let reminder = jobs.iter().find(|j| j.kind == JobKind::Reminder).and_then(|j| j.next_attempt_at);
                let reminder = reminder.map(|at| format!(", with a reminder on {} UTC", super::minute(at)));
                format!("Queued for delivery by {}{}", channels.join(" and "), reminder.unwrap_or_default())
            }
        }
    }

    /// Creates an invite for a user and queues its delivery, all in one transaction.
    pub fn create_invite(&self, actor: &Actor, new: &NewInvite) -> DomainResult<CreatedInvite> {
        self.create_invite_inner(actor, new, false)
    }

    /// An invite for the admin's own test device: its link and passcode are returned, nothing is sent.
    pub fn create_invite_by_myself(&self, actor: &Actor, new: &NewInvite) -> DomainResult<CreatedInvite> {
        self.create_invite_inner(actor, new, true)
    }

    fn create_invite_inner(&self, actor: &Actor, new: &NewInvite, by_myself: bool) -> DomainResult<CreatedInvite> {
        let secrets = new_secrets();
        let invite = self.transact(|tx| {
            let origin = InviteOrigin { by_myself, verb: "Invited", import: None };
            let (invite, jobs) = self.insert_invite(tx, actor, new, &origin, &secrets)?;
            let user = tx.get_id::<User, _>(&invite.user_id)?.map(|u| u.email).unwrap_or_default();
            let detail = format!("{} for {user} ({})", invite.platform, Self::delivery_remark(&jobs));
            let action = if by_myself { "invite.by_myself" } else { "invite.create" };
            self.audit(tx, actor, action, Some(invite.id.to_string()), detail)?;
            Ok(invite)
        })?;
        Ok(CreatedInvite {
            invite: self.view(&invite)?,
            link_token: by_myself.then(|| secrets.token.clone()),
            passcode: by_myself.then(|| secrets.passcode.clone()),
        })
    }

    /// Writes a new invite with its delivery jobs (and the user's membership of its group) inside `tx`; shared by
    /// single, group and CSV invites. The caller writes the audit entry.
    pub(crate) fn insert_invite(
        &self,
        tx: &Tx<'_>,
        actor: &Actor,
        new: &NewInvite,
        origin: &InviteOrigin<'_>,
        secrets: &Secrets,
    ) -> TxResult<(Invite, Vec<DeliveryJob>)> {
        let InviteOrigin { by_myself, verb, import } = *origin;
        let old_user: User = tx.get_id(&new.user_id)?.ok_or_else(|| DomainError::not_found("user", new.user_id))?;
        if let Some(group) = &new.group_id {
            tx.get_id::<Group, _>(group)?.ok_or_else(|| DomainError::not_found("group", group))?;
        }
        if new.channels.sms() && old_user.phone.is_none() && !by_myself {
            return Err(DomainError::invalid(
                "channels",
                format!("{} has no phone number for SMS; add one to the user or send by email", old_user.name),
            )
            .into());
        }
        let now = self.now();
        let id = self.new_id();
        let mut invite = Invite {
            id,
            user_id: new.user_id,
            platform: new.platform,
            ownership: new.ownership,
            group_id: new.group_id,
            channels: if by_myself { Channels::Email } else { new.channels },
            requested_at: now,
            expires_at: now + self.policy().invite_validity,
            status: InviteStatus::Pending,
            remarks: Vec::new(),
            token_hash: token_hash(&secrets.token),
            passcode_hash: self.passcode_hash(&id, &secrets.passcode),
            by_myself,
            created_by: actor.name.clone(),
            device_id: None,
            failed_attempts: 0,
            locked: false,
            generation: 0,
            import,
            delivery: Vec::new(),
            account_link_at: None,
        };
        let jobs = self.jobs_for(&invite, &old_user, secrets, import);
        invite.delivery = jobs.iter().filter(|job| job.kind == JobKind::Invite).map(|job| job.status(now)).collect();
        invite
            .remarks
            .push(Remark { at: now, text: format!("{verb} by {}: {}", actor.name, Self::delivery_remark(&jobs)) });
        tx.put(None, &invite)?;
        for job in &jobs {
            tx.put(None, job)?;
        }
        if let Some(group) = new.group_id
            && !old_user.groups.contains(&group)
        {
            let mut user = old_user.clone();
            user.groups.push(group);
            tx.put(Some(&old_user), &user)?;
        }
        Ok((invite, jobs))
    }

    pub fn invite(&self, id: &Id) -> DomainResult<InviteView> {
        let invite = self.store.get::<Invite>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("invite", id))?;
        self.view(&invite)
    }

    fn view(&self, invite: &Invite) -> DomainResult<InviteView> {
        let mut names = NameCache::default();
        names.view(self, invite)
    }

    /// A new link and passcode for a pending or expired invite: the old link stops working at once, the validity
    /// starts again, delivery is queued again and any lock is lifted.
    pub fn resend_invite(&self, actor: &Actor, id: &Id) -> DomainResult<CreatedInvite> {
        let secrets = new_secrets();
        let earlier = self.store.keys_under(tree::OUTBOX_BY_INVITE, id.as_bytes())?;
        let invite = self.transact(|tx| self.resend_in(tx, actor, id, &secrets, &earlier))?;
        Ok(CreatedInvite {
            link_token: invite.by_myself.then(|| secrets.token.clone()),
            passcode: invite.by_myself.then(|| secrets.passcode.clone()),
            invite: self.view(&invite)?,
        })
    }

    /// Retires the delivery jobs of earlier sends: marked stale and their clear-text link and passcode dropped, so
    /// a dead link is never mailed and the secrets do not linger.
    pub(super) fn retire_jobs(&self, tx: &Tx<'_>, keys: &[Vec<u8>]) -> TxResult<()> {
        for key in keys {
            if let Some(old) = tx.get::<DeliveryJob, _>(key)?
                && matches!(old.state, JobState::Queued | JobState::Deferred | JobState::Sending)
            {
                let job = DeliveryJob {
                    state: JobState::Stale,
                    link_token: None,
                    passcode: None,
                    finished_at: Some(self.now()),
                    ..old.clone()
                };
                tx.put(Some(&old), &job)?;
            }
        }
        Ok(())
    }

    /// Reads an invite an admin may still resend or remove (pending or expired); an enrolled or removed one is
    /// refused with the given advice.
    fn changeable_invite(&self, tx: &Tx<'_>, id: &Id, if_used: &str, if_removed: &str) -> TxResult<Invite> {
        let invite: Invite = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("invite", id))?;
        match invite.status {
            InviteStatus::Pending | InviteStatus::Expired => Ok(invite),
            InviteStatus::Enrolled => Err(DomainError::conflict("invite_used", if_used).into()),
            InviteStatus::Removed => Err(DomainError::conflict("invite_removed", if_removed).into()),
        }
    }

    fn resend_in(
        &self,
        tx: &Tx<'_>,
        actor: &Actor,
        id: &Id,
        secrets: &Secrets,
        earlier: &[Vec<u8>],
    ) -> TxResult<Invite> {
        let old = self.changeable_invite(
            tx,
            id,
            "this invite already enrolled a device; use \"enroll additional device\" for another",
            "this invite was removed; create a new one",
        )?;
        let user: User = tx.get_id(&old.user_id)?.ok_or_else(|| DomainError::not_found("user", old.user_id))?;
        let now = self.now();
        let mut invite = old.clone();
        invite.status = InviteStatus::Pending;
        invite.requested_at = now;
        invite.expires_at = now + self.policy().invite_validity;
        invite.token_hash = token_hash(&secrets.token);
        invite.passcode_hash = self.passcode_hash(id, &secrets.passcode);
        invite.generation += 1;
        invite.failed_attempts = 0;
        invite.locked = false;
        let jobs = self.jobs_for(&invite, &user, secrets, None);
        invite.delivery = jobs.iter().filter(|job| job.kind == JobKind::Invite).map(|job| job.status(now)).collect();
        invite.remarks.push(Remark {
            at: now,
            text: format!(
                "Resent by {}: new link and passcode, the old ones no longer work. {}",
                actor.name,
                Self::delivery_remark(&jobs)
            ),
        });
        self.retire_jobs(tx, earlier)?;
        tx.put(Some(&old), &invite)?;
        for job in &jobs {
            tx.put(None, job)?;
        }
        self.audit(
            tx,
            actor,
            "invite.resend",
            Some(id.to_string()),
            format!("{} for {}", invite.platform, user.email),
        )?;
        Ok(invite)
    }

    /// Cancels an invite; its link answers "removed" from then on.
    pub fn remove_invite(&self, actor: &Actor, id: &Id) -> DomainResult<InviteView> {
        let earlier = self.store.keys_under(tree::OUTBOX_BY_INVITE, id.as_bytes())?;
        let invite = self.transact(|tx| self.remove_in(tx, actor, id, &earlier))?;
        self.view(&invite)
    }

    fn remove_in(&self, tx: &Tx<'_>, actor: &Actor, id: &Id, earlier: &[Vec<u8>]) -> TxResult<Invite> {
        let old = self.changeable_invite(
            tx,
            id,
            "this invite already enrolled a device; deprovision the device instead",
            "this invite was removed already",
        )?;
        let mut invite = old.clone();
        invite.status = InviteStatus::Removed;
        invite.remarks.push(Remark { at: self.now(), text: format!("Removed by {}", actor.name) });
        self.retire_jobs(tx, earlier)?;
        tx.put(Some(&old), &invite)?;
        self.audit(tx, actor, "invite.remove", Some(id.to_string()), invite.platform.to_string())?;
        Ok(invite)
    }

    /// "Enroll additional device": a new invite for the same user as invite `id`, with its platform, ownership,
    /// group and channels unless `extra` says otherwise; the existing invites stay valid.
    pub fn additional_invite(&self, actor: &Actor, id: &Id, extra: &AdditionalInvite) -> DomainResult<CreatedInvite> {
        let source = self.store.get::<Invite>(id.as_bytes())?.ok_or_else(|| DomainError::not_found("invite", id))?;
        let defaults = NewInvite {
            user_id: source.user_id,
            platform: source.platform,
            ownership: source.ownership,
            group_id: source.group_id,
            channels: source.channels,
        };
        self.create_invite(actor, &extra.apply(defaults))
    }

    /// Resends every selected invite, each in its own transaction, reporting each result.
    pub fn bulk_resend(&self, actor: &Actor, selection: &BulkSelection) -> DomainResult<Vec<BulkOutcome>> {
        let ids = self.select(selection)?;
        Ok(ids
            .into_iter()
            .map(|id| {
                let secrets = new_secrets();
                let result = self
                    .store
                    .keys_under(tree::OUTBOX_BY_INVITE, id.as_bytes())
                    .map_err(DomainError::from)
                    .and_then(|earlier| self.transact(|tx| self.resend_in(tx, actor, &id, &secrets, &earlier)));
                outcome(id, result)
            })
            .collect())
    }

    /// Removes every selected invite, each in its own transaction, reporting each result.
    pub fn bulk_remove(&self, actor: &Actor, selection: &BulkSelection) -> DomainResult<Vec<BulkOutcome>> {
        let ids = self.select(selection)?;
        Ok(ids
            .into_iter()
            .map(|id| {
                let result = self
                    .store
                    .keys_under(tree::OUTBOX_BY_INVITE, id.as_bytes())
                    .map_err(DomainError::from)
                    .and_then(|earlier| self.transact(|tx| self.remove_in(tx, actor, &id, &earlier)));
                outcome(id, result)
            })
            .collect())
    }

    fn select(&self, selection: &BulkSelection) -> DomainResult<Vec<Id>> {
        match (&selection.ids, &selection.filter) {
            (Some(ids), None) if !ids.is_empty() => {
                if ids.len() > 10_000 {
                    return Err(DomainError::invalid("ids", "select at most 10,000 invites at once, or use a filter"));
                }
                Ok(ids.clone())
            }
            (None, Some(filter)) => {
                let mut ids = Vec::new();
                let mut query = InviteQuery { cursor: None, limit: Some(500), ..filter.clone() };
                self.sweep_expired()?;
                loop {
                    let page = self.invites_as_stored(&query)?;
                    ids.extend(page.items.iter().map(|view| view.id));
                    match page.next_cursor {
                        Some(cursor) => query.cursor = Some(cursor),
                        None => break,
                    }
                }
                Ok(ids)
            }
            _ => Err(DomainError::invalid("ids", "give either a non-empty list of ids or a filter")),
        }
    }

    /// Lists invites with filters, newest (or oldest) requested first.
    pub fn invites(&self, query: &InviteQuery) -> DomainResult<Paged<InviteView>> {
        self.sweep_expired()?;
        self.invites_as_stored(query)
    }

    /// One page of invites without sweeping expired ones first: for callers that page through a whole listing
    /// and sweep once before it.
    pub(crate) fn invites_as_stored(&self, query: &InviteQuery) -> DomainResult<Paged<InviteView>> {
        let after = decode_cursor(query.cursor.as_deref())?;
        let newest_first = match query.order.as_deref() {
            None | Some("newest") => true,
            Some("oldest") => false,
            Some(other) => return Err(DomainError::invalid("order", format!("{other:?} is not newest or oldest"))),
        };
        // The narrowest index for the filters given; the filter below still checks every condition.
        let (index, prefix): (usize, Vec<u8>) = match (query.user_id, query.group_id, query.status, query.platform) {
            (Some(user), ..) => (tree::INVITES_BY_USER, user.0.to_vec()),
            (None, Some(group), ..) => (tree::INVITES_BY_GROUP, group.0.to_vec()),
            (None, None, Some(status), Some(platform)) => {
                (tree::INVITES_BY_STATUS_PLATFORM, vec![invite_status_byte(status), platform as u8])
            }
            (None, None, Some(status), None) => (tree::INVITES_BY_STATUS, vec![invite_status_byte(status)]),
            (None, None, None, Some(platform)) => (tree::INVITES_BY_PLATFORM, vec![platform as u8]),
            (None, None, None, None) => (tree::INVITES_BY_TIME, Vec::new()),
        };
        let scan = Scan { tree: index, prefix: &prefix, after: after.as_deref(), newest_first };
        let needle = query.q.as_deref().map(str::to_lowercase).filter(|q| !q.trim().is_empty());
        let mut names = NameCache::default();
        let page = self.store.page(scan, clamp_limit(query.limit.unwrap_or(50)), |invite: &Invite| {
            query.status.is_none_or(|s| s == invite.status)
                && query.user_id.is_none_or(|u| u == invite.user_id)
                && query.platform.is_none_or(|p| p == invite.platform)
                && query.group_id.is_none_or(|g| Some(g) == invite.group_id)
                && needle.as_ref().is_none_or(|needle| names.user_matches(self, &invite.user_id, needle))
        })?;
        let items = page.items.iter().map(|invite| names.view(self, invite)).collect::<DomainResult<Vec<_>>>()?;
        Ok(Paged { items, next_cursor: page.next.as_deref().map(encode_cursor) })
    }

    /// Marks every pending invite whose time is up as expired. Runs periodically and before listing or counting.
    pub fn sweep_expired(&self) -> DomainResult<usize> {
        let now = self.now();
        let upper = time_key(now + time::Duration::milliseconds(1));
        let due = self.store.keys_before(tree::INVITES_BY_EXPIRY, &upper)?;
        let mut expired = 0;
        for chunk in due.chunks(256) {
            expired += self.transact(|tx| {
                let mut done = 0;
                for key in chunk {
                    let Some(old) = tx.get::<Invite, _>(key)? else { continue };
                    if old.status == InviteStatus::Pending && old.expires_at <= now {
                        let mut invite = old.clone();
                        invite.status = InviteStatus::Expired;
                        invite.remarks.push(Remark {
                            at: now,
                            text: "Expired: the link was not used in time; resend to send a new one".into(),
                        });
                        tx.put(Some(&old), &invite)?;
                        self.audit(tx, &Actor::system(), "invite.expire", Some(invite.id.to_string()), String::new())?;
                        done += 1;
                    }
                }
                Ok(done)
            })?;
        }
        Ok(expired)
    }

    /// Invites the members of a group (see [`GroupInviteMode`]); with `dry_run` it only says how many.
    pub fn invite_group(
        &self,
        actor: &Actor,
        group_id: &Id,
        plan: &GroupInvitePlan,
    ) -> DomainResult<GroupInviteResult> {
        self.group(group_id)?;
        let mut chosen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.users(None, cursor.as_deref(), 500)?;
            for user in page.items.into_iter().filter(|u| u.groups.contains(group_id)) {
                let invites: Vec<Invite> = self
                    .store
                    .keys_under(tree::INVITES_BY_USER, user.id.as_bytes())?
                    .iter()
                    .filter_map(|key| self.store.get::<Invite>(key).transpose())
                    .collect::<Result<_, _>>()?;
                let wanted = match plan.mode {
                    GroupInviteMode::NeverInvited => invites.is_empty(),
                    GroupInviteMode::InvitedNotEnrolled => {
                        !invites.is_empty() && invites.iter().all(|i| i.status != InviteStatus::Enrolled)
                    }
                };
                if wanted {
                    chosen.push(user);
                }
            }
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut result =
            GroupInviteResult { users: chosen.len(), invites_created: 0, dry_run: plan.dry_run, skipped: Vec::new() };
        if plan.dry_run {
            return Ok(result);
        }
        for user in chosen {
            let new = NewInvite {
                user_id: user.id,
                platform: plan.platform,
                ownership: plan.ownership,
                group_id: Some(*group_id),
                channels: plan.channels,
            };
            match self.create_invite(actor, &new) {
                Ok(_) => result.invites_created += 1,
                Err(error) => {
                    result.skipped.push(BulkOutcome { id: user.id, ok: false, error: Some(error.to_string()) })
                }
            }
        }
        Ok(result)
    }

    /// Finds the invite behind an enrollment link, or says why it does not open.
    pub fn open_link(&self, token: &str) -> DomainResult<Result<Invite, LinkProblem>> {
        let Some(key) = self.store.lookup(tree::INVITES_BY_TOKEN, token_hash(token).as_bytes())? else {
            return Ok(Err(LinkProblem::Unknown));
        };
        let Some(invite) = self.store.get::<Invite>(&key)? else { return Ok(Err(LinkProblem::Unknown)) };
        Ok(link_state(&invite, self.now()))
    }

    /// Checks a passcode for an invite in constant time; wrong ones count toward the lock.
    pub fn check_passcode(&self, actor: &Actor, invite_id: &Id, passcode: &str) -> DomainResult<PasscodeCheck> {
        let credentials = super::accounts::Credentials { passcode: Some(passcode), password: None };
        self.check_credentials_with(actor, invite_id, credentials, crate::model::EnrollAuth::Passcode)
    }

    /// Counts an answer on the enrollment page: a right one opens it, a wrong one counts toward the invite's limit,
    /// and the last allowed wrong one locks the invite (with a remark saying why).
    pub(super) fn record_attempt(
        &self,
        actor: &Actor,
        invite_id: &Id,
        right: bool,
        auth: crate::model::EnrollAuth,
    ) -> DomainResult<PasscodeCheck> {
        let limit = self.policy().passcode_attempts;
        let now = self.now();
        let wrong = match auth {
            crate::model::EnrollAuth::Passcode => "wrong passcodes",
            crate::model::EnrollAuth::Password => "wrong passwords",
            crate::model::EnrollAuth::Both => "wrong passcodes or passwords",
        };
        self.transact(|tx| {
            let old: Invite = tx.get_id(invite_id)?.ok_or_else(|| DomainError::not_found("invite", invite_id))?;
            if old.locked {
                return Ok(PasscodeCheck::Locked);
            }
            if right {
                return Ok(PasscodeCheck::Correct);
            }
            let mut invite = old.clone();
            invite.failed_attempts += 1;
            let check = if invite.failed_attempts >= limit {
                invite.locked = true;
                invite.remarks.push(Remark {
                    at: now,
                    text: format!("Locked after {limit} {wrong}; resend the invite to unlock it with a new passcode"),
                });
                self.audit(tx, actor, "invite.locked", Some(invite_id.to_string()), format!("{limit} {wrong}"))?;
                PasscodeCheck::Locked
            } else {
                PasscodeCheck::Wrong { attempts_left: limit - invite.failed_attempts }
            };
            tx.put(Some(&old), &invite)?;
            Ok(check)
        })
    }
}

/// Whether an invite opens now, and if not, why.
pub fn link_state(invite: &Invite, now: OffsetDateTime) -> Result<Invite, LinkProblem> {
    match invite.status {
        InviteStatus::Removed => Err(LinkProblem::Removed),
        InviteStatus::Enrolled => Err(LinkProblem::Used),
        InviteStatus::Expired => Err(LinkProblem::Expired),
        InviteStatus::Pending if invite.expires_at <= now => Err(LinkProblem::Expired),
        InviteStatus::Pending if invite.locked => Err(LinkProblem::Locked),
        InviteStatus::Pending => Ok(invite.clone()),
    }
}

fn outcome<T>(id: Id, result: DomainResult<T>) -> BulkOutcome {
    match result {
        Ok(_) => BulkOutcome { id, ok: true, error: None },
        Err(error) => BulkOutcome { id, ok: false, error: Some(error.to_string()) },
    }
}

/// Looks a record up once, then answers from `map`.
fn cached<'a, R: crate::store::Record>(
    map: &'a mut HashMap<Id, Option<R>>,
    domain: &Enrollment,
    id: &Id,
) -> DomainResult<Option<&'a R>> {
    let slot = match map.entry(*id) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => entry.insert(domain.store.get::<R>(id.as_bytes())?),
    };
    Ok(slot.as_ref())
}

/// Users and groups looked up once per listing.
#[derive(Default)]
struct NameCache {
    users: HashMap<Id, Option<User>>,
    groups: HashMap<Id, Option<Group>>,
}

impl NameCache {
    fn user(&mut self, domain: &Enrollment, id: &Id) -> DomainResult<Option<&User>> {
        cached(&mut self.users, domain, id)
    }

    fn user_matches(&mut self, domain: &Enrollment, id: &Id, needle: &str) -> bool {
        matches!(self.user(domain, id), Ok(Some(user)) if user.name.to_lowercase().contains(needle) || user.email.contains(needle))
    }

    fn view(&mut self, domain: &Enrollment, invite: &Invite) -> DomainResult<InviteView> {
        let (user_name, email) = match self.user(domain, &invite.user_id)? {
            Some(user) => (user.name.clone(), user.email.clone()),
            None => ("(deleted user)".to_owned(), String::new()),
        };
        let group_name = match invite.group_id {
            Some(id) => cached(&mut self.groups, domain, &id)?.map(|g| g.name.clone()),
            None => None,
        };
        let status = match link_state(invite, domain.now()) {
            Err(LinkProblem::Expired) if invite.status == InviteStatus::Pending => InviteStatus::Expired,
            _ => invite.status,
        };
        Ok(InviteView {
            id: invite.id,
            user_id: invite.user_id,
            user_name,
            email,
            platform: invite.platform,
            ownership: invite.ownership,
            group_id: invite.group_id,
            group_name,
            channels: invite.channels,
            requested_at: invite.requested_at,
            expires_at: invite.expires_at,
            status,
            remarks: invite.remarks.clone(),
            by_myself: invite.by_myself,
            created_by: invite.created_by.clone(),
            device_id: invite.device_id,
            locked: invite.locked,
            delivery: invite.delivery.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain};
    use super::super::{DeviceFacts, NewGroup, NewUser};
    use super::*;
    use crate::model::DeliveryJob;
    use time::Duration;

    fn user(d: &Enrollment, email: &str) -> User {
        let new = NewUser {
            name: email.into(),
            email: email.into(),
            phone: Some("+12025550100".into()),
            ..Default::default()
        };
        d.create_user(&admin(), &new).unwrap()
    }

    fn invite_for(d: &Enrollment, user: &User, channels: Channels) -> CreatedInvite {
        let new = NewInvite {
            user_id: user.id,
            platform: Platform::Ios,
            ownership: Ownership::Corporate,
            group_id: None,
            channels,
        };
        d.create_invite(&admin(), &new).unwrap()
    }

    fn jobs(d: &Enrollment) -> Vec<DeliveryJob> {
        let scan = Scan { tree: tree::OUTBOX, prefix: &[], after: None, newest_first: false };
        d.store.page(scan, 1000, |_: &DeliveryJob| true).unwrap().items
    }

    /// The link token only the delivery job knows (as the mail worker will read it).
    fn token_of(d: &Enrollment, invite: &Id) -> String {
        latest_job(d, invite).link_token.unwrap()
    }

    fn passcode_of(d: &Enrollment, invite: &Id) -> String {
        latest_job(d, invite).passcode.unwrap()
    }

    fn latest_job(d: &Enrollment, invite: &Id) -> DeliveryJob {
        jobs(d).into_iter().filter(|j| j.invite_id == *invite).max_by_key(|j| j.generation).unwrap()
    }

    #[test]
    fn an_invite_and_its_delivery_jobs_are_written_together() {
        let (d, _) = domain();
        let ann = user(&d, "ann@example.com");
        let created = invite_for(&d, &ann, Channels::Both);
        assert_eq!(created.invite.status, InviteStatus::Pending);
        assert!(created.link_token.is_none() && created.passcode.is_none(), "secrets only go to the user");
        let jobs = jobs(&d);
        assert_eq!(
            jobs.iter().map(|j| (j.channel, j.to.as_str())).collect::<Vec<_>>(),
            [(JobChannel::Email, "ann@example.com"), (JobChannel::Sms, "+12025550100")]
        );
        let stored = d.store.get::<Invite>(created.invite.id.as_bytes()).unwrap().unwrap();
        let token = jobs[0].link_token.clone().unwrap();
        assert_eq!(stored.token_hash, token_hash(&token), "only the hash is kept on the invite");
        assert!(!stored.passcode_hash.contains(jobs[0].passcode.as_deref().unwrap()));
        assert_eq!(d.open_link(&token).unwrap().unwrap().id, stored.id);
        assert_eq!(created.invite.expires_at - created.invite.requested_at, Duration::days(7));
        assert!(created.invite.remarks[0].text.contains("Queued for delivery by email and sms"));

        // Refused part-way (SMS to a user without a phone): neither the invite nor any job is left behind.
        let no_phone = d
            .create_user(&admin(), &NewUser { name: "Bo".into(), email: "bo@example.com".into(), ..Default::default() })
            .unwrap();
        let new = NewInvite {
            user_id: no_phone.id,
            platform: Platform::Ios,
            ownership: Ownership::Corporate,
            group_id: None,
            channels: Channels::Both,
        };
        let refused = d.create_invite(&admin(), &new).unwrap_err();
        assert!(matches!(refused, DomainError::Invalid { field: "channels", .. }), "{refused}");
        assert_eq!(self::jobs(&d).len(), 2);
        assert_eq!(d.dashboard().unwrap().pending, 1);
    }

    #[test]
    fn resend_kills_the_old_link_and_restarts_the_clock() {
        let (d, clock) = domain();
        let ann = user(&d, "ann@example.com");
        let id = invite_for(&d, &ann, Channels::Email).invite.id;
        let old_token = token_of(&d, &id);
        clock.advance(Duration::days(3));
        let resent = d.resend_invite(&admin(), &id).unwrap();
        assert_eq!(d.open_link(&old_token).unwrap().unwrap_err(), LinkProblem::Unknown, "the old link is dead");
        let new_token = token_of(&d, &id);
        assert_ne!(new_token, old_token);
        assert_eq!(d.open_link(&new_token).unwrap().unwrap().generation, 1);
        assert_eq!(resent.invite.expires_at, d.now() + Duration::days(7));
        let all = jobs(&d);
        assert_eq!(all.len(), 2, "delivery queued again");
        let old_job = all.iter().find(|j| j.generation == 0).unwrap();
        assert_eq!(old_job.state, JobState::Stale, "the old link is never mailed");
        assert_eq!((old_job.link_token.as_deref(), old_job.passcode.as_deref()), (None, None), "its secrets are gone");
        assert_eq!(d.dashboard().unwrap().queued_messages, 1);
        d.remove_invite(&admin(), &id).unwrap();
        assert_eq!(d.dashboard().unwrap().queued_messages, 0, "a removed invite sends nothing");
    }

    #[test]
    fn expiry_follows_the_clock_and_a_resend_revives_it() {
        let (d, clock) = domain();
        let ann = user(&d, "ann@example.com");
        let id = invite_for(&d, &ann, Channels::Email).invite.id;
        let token = token_of(&d, &id);
        clock.advance(Duration::days(7) - Duration::seconds(1));
        assert!(d.open_link(&token).unwrap().is_ok());
        assert_eq!(d.sweep_expired().unwrap(), 0);
        clock.advance(Duration::seconds(1));
        assert_eq!(d.open_link(&token).unwrap().unwrap_err(), LinkProblem::Expired, "expired even before the sweep");
        assert_eq!(d.dashboard().unwrap().expired, 1);
        assert_eq!(d.invite(&id).unwrap().status, InviteStatus::Expired);
        let error = d.complete_enrollment(&Actor::device(None), &id, &DeviceFacts::default()).unwrap_err();
        assert!(matches!(error, DomainError::Conflict { code: "invite_not_open", .. }));
        d.resend_invite(&admin(), &id).unwrap();
        let counts = d.dashboard().unwrap();
        assert_eq!((counts.pending, counts.expired), (1, 0));
    }

    #[test]
    fn the_state_machine_refuses_illegal_moves() {
        let (d, _) = domain();
        let ann = user(&d, "ann@example.com");
        let removed = invite_for(&d, &ann, Channels::Email).invite.id;
        let token = token_of(&d, &removed);
        d.remove_invite(&admin(), &removed).unwrap();
        assert_eq!(d.open_link(&token).unwrap().unwrap_err(), LinkProblem::Removed);
        assert!(matches!(
            d.resend_invite(&admin(), &removed),
            Err(DomainError::Conflict { code: "invite_removed", .. })
        ));
        assert!(matches!(d.remove_invite(&admin(), &removed), Err(DomainError::Conflict { .. })));

        let used = invite_for(&d, &ann, Channels::Email).invite.id;
        let token = token_of(&d, &used);
        d.complete_enrollment(&Actor::device(None), &used, &DeviceFacts::default()).unwrap();
        assert_eq!(d.open_link(&token).unwrap().unwrap_err(), LinkProblem::Used);
        assert!(matches!(d.resend_invite(&admin(), &used), Err(DomainError::Conflict { code: "invite_used", .. })));
        assert!(matches!(d.remove_invite(&admin(), &used), Err(DomainError::Conflict { code: "invite_used", .. })));
        let again = d.complete_enrollment(&Actor::device(None), &used, &DeviceFacts::default()).unwrap_err();
        assert!(matches!(again, DomainError::Conflict { code: "invite_not_open", .. }), "one invite, one device");
    }

    #[test]
    fn wrong_passcodes_lock_the_invite_until_it_is_resent() {
        let (d, _) = domain();
        let ann = user(&d, "ann@example.com");
        let id = invite_for(&d, &ann, Channels::Email).invite.id;
        let passcode = passcode_of(&d, &id);
        let device = Actor::device(Some("192.0.2.50".into()));
        assert_eq!(d.check_passcode(&device, &id, &passcode).unwrap(), PasscodeCheck::Correct);
        for left in (1..5).rev() {
            assert_eq!(
                d.check_passcode(&device, &id, "00000000x").unwrap(),
                PasscodeCheck::Wrong { attempts_left: left }
            );
        }
        assert_eq!(d.check_passcode(&device, &id, "00000000x").unwrap(), PasscodeCheck::Locked);
        assert_eq!(d.check_passcode(&device, &id, &passcode).unwrap(), PasscodeCheck::Locked, "even the right one");
        let view = d.invite(&id).unwrap();
        assert!(view.locked && view.remarks.last().unwrap().text.contains("Locked after 5 wrong passcodes"));
        d.resend_invite(&admin(), &id).unwrap();
        let fresh = passcode_of(&d, &id);
        assert_eq!(
            d.check_passcode(&device, &id, &passcode).unwrap(),
            PasscodeCheck::Wrong { attempts_left: 4 },
            "old passcode dead"
        );
        assert_eq!(d.check_passcode(&device, &id, &fresh).unwrap(), PasscodeCheck::Correct);
    }

    #[test]
    fn bulk_actions_report_each_invite() {
        let (d, _) = domain();
        let ann = user(&d, "ann@example.com");
        let a = invite_for(&d, &ann, Channels::Email).invite.id;
        let b = invite_for(&d, &ann, Channels::Email).invite.id;
        d.remove_invite(&admin(), &b).unwrap();
        let missing = Id([9; 16]);
        let results = d.bulk_resend(&admin(), &BulkSelection { ids: Some(vec![a, b, missing]), filter: None }).unwrap();
        assert_eq!(results.iter().map(|r| r.ok).collect::<Vec<_>>(), [true, false, false]);
        assert!(results[1].error.as_deref().unwrap().contains("removed"));

        let filter = InviteQuery { status: Some(InviteStatus::Pending), ..Default::default() };
        let removed = d.bulk_remove(&admin(), &BulkSelection { ids: None, filter: Some(filter) }).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(d.dashboard().unwrap().pending, 0);
    }

    #[test]
    fn inviting_a_group_counts_first_then_invites_the_chosen_members() {
        let (d, _) = domain();
        let sales = d.create_group(&admin(), &NewGroup { name: "Sales".into(), description: String::new() }).unwrap();
        for email in ["a@example.com", "b@example.com", "c@example.com"] {
            let new = NewUser { name: email.into(), email: email.into(), groups: vec![sales.id], ..Default::default() };
            d.create_user(&admin(), &new).unwrap();
        }
        let outsider = user(&d, "z@example.com");
        let b = d.user_by_email("b@example.com").unwrap().unwrap();
        invite_for(&d, &b, Channels::Email);
        invite_for(&d, &outsider, Channels::Email);
        let plan = |mode, dry_run| GroupInvitePlan {
            mode,
            platform: Platform::Android,
            ownership: Ownership::Personal,
            channels: Channels::Email,
            dry_run,
        };
        let preview = d.invite_group(&admin(), &sales.id, &plan(GroupInviteMode::NeverInvited, true)).unwrap();
        assert_eq!((preview.users, preview.invites_created), (2, 0));
        assert_eq!(d.dashboard().unwrap().pending, 2, "a dry run creates nothing");
        let done = d.invite_group(&admin(), &sales.id, &plan(GroupInviteMode::NeverInvited, false)).unwrap();
        assert_eq!(done.invites_created, 2);
        let second = d.invite_group(&admin(), &sales.id, &plan(GroupInviteMode::InvitedNotEnrolled, true)).unwrap();
        assert_eq!(second.users, 3, "now every member was invited and none enrolled");
    }

    #[test]
    fn paging_over_ten_thousand_invites_sees_each_once_in_order() {
        let (d, clock) = domain();
        let ann = user(&d, "ann@example.com");
        let bob = user(&d, "bob@example.com");
        for n in 0..10_000 {
            clock.advance(Duration::milliseconds(10));
            let (who, platform) = if n % 4 == 0 { (&bob, Platform::Android) } else { (&ann, Platform::Ios) };
            let new = NewInvite {
                user_id: who.id,
                platform,
                ownership: Ownership::Corporate,
                group_id: None,
                channels: Channels::Email,
            };
            d.create_invite(&admin(), &new).unwrap();
        }
        assert_eq!(d.dashboard().unwrap().pending, 10_000);
        let mut seen = Vec::new();
        let mut query = InviteQuery { status: Some(InviteStatus::Pending), limit: Some(500), ..Default::default() };
        loop {
            let page = d.invites(&query).unwrap();
            seen.extend(page.items.iter().map(|v| (v.requested_at, v.id)));
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        assert_eq!(seen.len(), 10_000);
        assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first, no repeats");

        let androids = InviteQuery {
            platform: Some(Platform::Android),
            q: Some("BOB@".into()),
            limit: Some(100),
            ..Default::default()
        };
        let page = d.invites(&androids).unwrap();
        assert_eq!(page.items.len(), 100);
        assert!(page.items.iter().all(|v| v.platform == Platform::Android && v.email == "bob@example.com"));
        let oldest =
            d.invites(&InviteQuery { order: Some("oldest".into()), limit: Some(1), ..Default::default() }).unwrap();
        assert_eq!(oldest.items[0].id, seen.last().unwrap().1);
    }
}
