//! The outbox as the mail worker sees it: which delivery jobs are due, claiming one, and recording what the mail
//! server (or SMS gateway) answered, on the job and on its invite, in one transaction each.
//!
//! A job moves `queued` → `sending` → `sent` | `deferred` (→ `sending` again) | `failed`. A job whose invite was
//! resent, removed, enrolled or expired since it was queued becomes `stale` and is never delivered. The link and
//! passcode travel in the job until it ends, and are wiped then.

use time::{Duration, OffsetDateTime};

use super::{DomainError, DomainResult, Enrollment, random_bytes};
use crate::model::{
    DeliveryJob, Device, Id, Import, ImportState, Invite, InviteStatus, JobChannel, JobKind, JobState, Remark, Setting,
    User,
};
use crate::store::{Tx, tree};

/// How long a job of a running CSV import waits before it is looked at again.
const IMPORT_RUNNING_WAIT: Duration = Duration::seconds(5);
/// How long a job waits when its channel cannot be used now.
const CHANNEL_UNAVAILABLE_WAIT: Duration = Duration::minutes(10);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::hours(1);

/// How many messages are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct OutboxCounts {
    pub queued: u64,
    pub sending: u64,
    pub deferred: u64,
    pub sent: u64,
    pub failed: u64,
    pub stale: u64,
}

/// A job the worker may now deliver, with what the message needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub job: DeliveryJob,
    pub invite: Invite,
    pub user: User,
    /// For a confirmation: the device that enrolled.
    pub device: Option<Device>,
}

/// What came of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Accepted; the server's reply (`250 2.0.0 Ok: queued as …`).
    Sent(String),
    /// A temporary failure the server reported (4xx, or a gateway's 429 or 5xx): try again later.
    Temporary(String),
    /// The server could not be reached (connection refused, timeout, TLS failure): try again later; the worker
    /// also pauses the queue, since every other message would fail the same way.
    Unreachable(String),
    /// A permanent failure (5xx, such as an unknown recipient): give up now.
    Permanent(String),
}

impl Attempt {
    /// What the server (or gateway) said.
    pub fn reply(&self) -> &str {
        match self {
            Attempt::Sent(reply)
            | Attempt::Temporary(reply)
            | Attempt::Unreachable(reply)
            | Attempt::Permanent(reply) => reply,
        }
    }
}

/// The attempt with the job's link token and passcode blanked out of the reply: some gateways echo the message
/// back, and replies are kept on the invite, shown in the API and logged.
pub fn redact(attempt: &Attempt, job: &DeliveryJob) -> Attempt {
    let mut reply = attempt.reply().to_owned();
    for secret in [&job.link_token, &job.passcode].into_iter().flatten().filter(|s| !s.is_empty()) {
        reply = reply.replace(secret.as_str(), "…");
    }
    match attempt {
        Attempt::Sent(_) => Attempt::Sent(reply),
        Attempt::Temporary(_) => Attempt::Temporary(reply),
        Attempt::Unreachable(_) => Attempt::Unreachable(reply),
        Attempt::Permanent(_) => Attempt::Permanent(reply),
    }
}

/// When temporary failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// The wait after the first failure; it doubles with each further one (with ±20% jitter), up to an hour.
    pub first: std::time::Duration,
    /// How long after a job was queued it is given up.
    pub horizon: std::time::Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { first: std::time::Duration::from_secs(60), horizon: std::time::Duration::from_secs(48 * 3600) }
    }
}

impl RetryPolicy {
    /// The wait after attempt number `attempts` failed.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let first = Duration::try_from(self.first).unwrap_or(MAX_BACKOFF);
        let doubled = first.saturating_mul(1i32 << attempts.saturating_sub(1).min(20));
        let wait = doubled.min(MAX_BACKOFF);
        // ±20% so that jobs deferred together do not all come back in the same second.
        let jitter = f64::from(u16::from_be_bytes(random_bytes::<2>())) / f64::from(u16::MAX) * 0.4 - 0.2;
        wait + wait * jitter
    }
}

impl Enrollment {
    /// Up to `limit` jobs due at `now`, soonest first, and when the next job after them falls due (if any).
    pub fn due_jobs(&self, now: OffsetDateTime, limit: usize) -> DomainResult<(Vec<Id>, Option<OffsetDateTime>)> {
        let now_key = crate::store::time_key(now);
        let mut due = Vec::new();
        for (key, value) in self.store.first_entries(tree::OUTBOX_DUE, limit + 1)? {
            let (Some(id), Some(due_key)) = (Id::from_slice(&value), key.get(..8)) else { continue };
            if due_key > &now_key[..] || due.len() == limit {
                let millis = u64::from_be_bytes(due_key.try_into().unwrap_or_default());
                let next = OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok();
                return Ok((due, next));
            }
            due.push(id);
        }
        Ok((due, None))
    }

    /// Moves a due job to `sending` and returns it with its invite and user. `None` when there is nothing to send
    /// now: the job is gone or not due, has gone stale (marked so: its invite was resent, removed, used or expired,
    /// or its user deleted), belongs to a CSV import still running or rolling back (looked at again shortly), or is on a channel
    /// `can_send` says no to, such as email with no relay configured (looked at again in ten minutes).
    pub fn claim_job(&self, id: &Id, can_send: impl Fn(JobChannel) -> bool) -> DomainResult<Option<Claimed>> {
        let now = self.now();
        self.transact(|tx| {
            let Some(old) = tx.get_id::<DeliveryJob, _>(id)? else { return Ok(None) };
            if !matches!(old.state, JobState::Queued | JobState::Deferred) || old.due_at().is_some_and(|at| at > now) {
                return Ok(None);
            }
            // Staleness first, so that a job that can never go out gives up its secrets whatever else holds it.
            let invite = tx.get_id::<Invite, _>(&old.invite_id)?;
            let current = invite.as_ref().filter(|invite| {
                let open = invite.status == InviteStatus::Pending && invite.expires_at > now;
                // A confirmation is about an invite that was used; the others need it still open.
                invite.generation == old.generation && (open || old.kind == JobKind::Confirmation)
            });
            let Some(invite) = current else {
                self.end_stale(tx, &old, now, invite.as_ref())?;
                return Ok(None);
            };
            let Some(user) = tx.get_id::<User, _>(&invite.user_id)? else {
                self.end_stale(tx, &old, now, None)?;
                return Ok(None);
            };
            if let Some(import) = old.import {
                match tx.get_id::<Import, _>(&import)?.map(|i| i.state) {
                    Some(state) if state.under_way() => {
                        let mut job = old.clone();
                        job.next_attempt_at = Some(now + IMPORT_RUNNING_WAIT);
                        tx.put(Some(&old), &job)?;
                        return Ok(None);
                    }
                    Some(ImportState::Done | ImportState::Interrupted) => {}
                    _ => {
                        self.end_stale(tx, &old, now, None)?;
                        return Ok(None);
                    }
                }
            }
            if !can_send(old.channel) {
                let mut job = old.clone();
                job.next_attempt_at = Some(now + CHANNEL_UNAVAILABLE_WAIT);
                tx.put(Some(&old), &job)?;
                return Ok(None);
            }
            let device = match old.device_id {
                Some(id) => tx.get_id::<Device, _>(&id)?,
                None => None,
            };
            let mut job = old.clone();
            job.state = JobState::Sending;
            job.attempts += 1;
            job.first_attempt_at.get_or_insert(now);
            tx.put(Some(&old), &job)?;
            let invite = self.update_delivery(tx, invite.clone(), &job, now, None)?;
            Ok(Some(Claimed { job, invite, user, device }))
        })
    }

    /// Puts a job back by `wait` after its claim failed (a damaged record, say), so that it cannot block the queue.
    pub fn postpone_job(&self, id: &Id, wait: Duration) -> DomainResult<()> {
        let now = self.now();
        self.transact(|tx| {
            if let Some(old) = tx.get_id::<DeliveryJob, _>(id)?
                && matches!(old.state, JobState::Queued | JobState::Deferred)
            {
                let mut job = old.clone();
                job.next_attempt_at = Some(now + wait);
                tx.put(Some(&old), &job)?;
            }
            Ok(())
        })
    }

    /// Records the outcome of delivering a claimed job on the job and its invite.
    pub fn finish_job(&self, id: &Id, attempt: &Attempt, retry: &RetryPolicy) -> DomainResult<DeliveryJob> {
        let now = self.now();
        self.transact(|tx| {
            let old: DeliveryJob = tx.get_id(id)?.ok_or_else(|| DomainError::not_found("delivery job", id))?;
            let attempt = redact(attempt, &old);
            if old.state != JobState::Sending {
                // Retired while it was being sent (its invite removed or resent): keep that, note what was said.
                let mut job = old.clone();
                job.last_reply = Some(attempt.reply().to_owned());
                tx.put(Some(&old), &job)?;
                return Ok(job);
            }
            let mut job = old.clone();
            let what = what(&job);
            let remark = match &attempt {
                Attempt::Sent(reply) => {
                    job.state = JobState::Sent;
                    job.last_reply = Some(reply.clone());
                    format!("{what} accepted by the server: {reply}")
                }
                Attempt::Temporary(reply) | Attempt::Unreachable(reply) => {
                    job.last_reply = Some(reply.clone());
                    let next = now + retry.backoff(job.attempts);
                    let horizon = Duration::try_from(retry.horizon).unwrap_or(Duration::MAX);
                    if next > job.first_attempt_at.unwrap_or(job.created_at) + horizon {
                        job.state = JobState::Failed;
                        format!(
                            "{what} failed: still not delivered after {} attempts over {} hours ({reply}); fix the mail settings and resend the invite",
                            job.attempts,
                            horizon.whole_hours()
                        )
                    } else {
                        job.state = JobState::Deferred;
                        job.next_attempt_at = Some(next);
                        format!("{what} deferred until {} UTC: {reply}", super::minute(next))
                    }
                }
                Attempt::Permanent(reply) => {
                    job.state = JobState::Failed;
                    job.last_reply = Some(reply.clone());
                    format!("{what} failed: {reply}")
                }
            };
            if job.state != JobState::Deferred {
                job.finished_at = Some(now);
                job.link_token = None;
                job.passcode = None;
            }
            tx.put(Some(&old), &job)?;
            // The dashboard shows the outbox's latest trouble, whichever message had it.
            if job.state != JobState::Sent {
                let last = tx.get::<Setting, _>(LAST_ERROR.as_bytes())?;
                let error = Setting {
                    name: LAST_ERROR.into(),
                    value: remark.clone(),
                    updated_at: now,
                    updated_by: "outbox".into(),
                };
                tx.put(last.as_ref(), &error)?;
            }
            if let Some(invite) = tx.get_id::<Invite, _>(&job.invite_id)?
                && invite.generation == job.generation
            {
                self.update_delivery(tx, invite, &job, now, Some(remark))?;
            }
            Ok(job)
        })
    }

    /// At start-up: jobs a stop or crash left in `sending` are queued again. Such a message may have reached the
    /// server already; its Message-ID is the same on the second send, so the duplicate is recognisable.
    pub fn requeue_in_flight(&self) -> DomainResult<usize> {
        let stuck = self.store.all::<DeliveryJob>(|job| job.state == JobState::Sending)?;
        for old in &stuck {
            self.transact(|tx| {
                let Some(current) = tx.get_id::<DeliveryJob, _>(&old.id)? else { return Ok(()) };
                if current.state == JobState::Sending {
                    let mut job = current.clone();
                    job.state = JobState::Queued;
                    tx.put(Some(&current), &job)?;
                    if let Some(invite) = tx.get_id::<Invite, _>(&job.invite_id)?
                        && invite.generation == job.generation
                    {
                        self.update_delivery(tx, invite, &job, self.now(), None)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(stuck.len())
    }

    /// Makes invite messages that were put back because their channel could not be used (no relay yet) due at
    /// once, for when a relay has just been set. Reminders keep their time. Returns how many.
    pub fn wake_waiting(&self) -> DomainResult<usize> {
        let now = self.now();
        let waiting = self.store.all::<DeliveryJob>(|job| {
            job.kind != JobKind::Reminder
                && job.state == JobState::Queued
                && job.attempts == 0
                && job.next_attempt_at.is_some_and(|at| at > now)
        })?;
        for chunk in waiting.chunks(500) {
            self.transact(|tx| {
                for stale_copy in chunk {
                    if let Some(old) = tx.get_id::<DeliveryJob, _>(&stale_copy.id)?
                        && old.state == JobState::Queued
                    {
                        let job = DeliveryJob { next_attempt_at: None, ..old.clone() };
                        tx.put(Some(&old), &job)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(waiting.len())
    }

    /// A new job of `kind` for `invite`, queued and due at once, with nothing of its own yet (no secrets, no
    /// import, no device): the callers add what their kind carries.
    pub(super) fn queued_job(&self, invite: &Invite, kind: JobKind, channel: JobChannel, to: String) -> DeliveryJob {
        DeliveryJob {
            id: self.new_id(),
            invite_id: invite.id,
            generation: invite.generation,
            channel,
            to,
            state: JobState::Queued,
            created_at: self.now(),
            link_token: None,
            passcode: None,
            import: None,
            attempts: 0,
            next_attempt_at: None,
            last_reply: None,
            finished_at: None,
            first_attempt_at: None,
            kind,
            device_id: None,
        }
    }

    /// The outbox's latest failure or deferral, in a sentence, and when it happened.
    pub fn outbox_last_error(&self) -> DomainResult<Option<(OffsetDateTime, String)>> {
        Ok(self.store.get::<Setting>(LAST_ERROR.as_bytes())?.map(|s| (s.updated_at, s.value)))
    }

    /// Messages by state, from the store's counters.
    pub fn outbox_counts(&self) -> DomainResult<OutboxCounts> {
        let count = |state: JobState| self.store.count(&format!("outbox.{state}"));
        Ok(OutboxCounts {
            queued: count(JobState::Queued)?,
            sending: count(JobState::Sending)?,
            deferred: count(JobState::Deferred)?,
            sent: count(JobState::Sent)?,
            failed: count(JobState::Failed)?,
            stale: count(JobState::Stale)?,
        })
    }

    /// Every delivery job of an invite, oldest first.
    pub fn deliveries(&self, invite_id: &Id) -> DomainResult<Vec<DeliveryJob>> {
        let mut jobs = Vec::new();
        for key in self.store.keys_under(tree::OUTBOX_BY_INVITE, invite_id.as_bytes())? {
            if let Some(job) = self.store.get::<DeliveryJob>(&key)? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    fn end_stale(&self, tx: &Tx<'_>, old: &DeliveryJob, now: OffsetDateTime, invite: Option<&Invite>) -> TxUnit {
        let mut job = old.clone();
        job.state = JobState::Stale;
        job.finished_at = Some(now);
        job.link_token = None;
        job.passcode = None;
        tx.put(Some(old), &job)?;
        // A reminder that is no longer needed (the device enrolled first, usually) leaves no remark.
        if let Some(invite) = invite.filter(|i| i.generation == job.generation && job.kind != JobKind::Reminder) {
            let why = match invite.status {
                InviteStatus::Pending => "the invite expired before it could be sent".to_owned(),
                status => format!("the invite is {status}"),
            };
            let remark = format!("{} to {} not sent: {why}", job.channel.label(), job.to);
            self.update_delivery(tx, invite.clone(), &job, now, Some(remark))?;
        }
        Ok(())
    }

    /// Puts the job's state on its invite (and a remark, if any) and returns the invite as written.
    fn update_delivery(
        &self,
        tx: &Tx<'_>,
        old: Invite,
        job: &DeliveryJob,
        now: OffsetDateTime,
        remark: Option<String>,
    ) -> super::TxResult<Invite> {
        let mut invite = old.clone();
        // The invite shows where its own messages stand; reminders and confirmations only leave remarks.
        if job.kind == JobKind::Invite {
            let status = job.status(now);
            match invite.delivery.iter_mut().find(|d| d.job_id == job.id) {
                Some(slot) => *slot = status,
                None => invite.delivery.push(status),
            }
        }
        if let Some(text) = remark {
            // A deferral replaces the previous deferral of the same message rather than piling up over 48 hours.
            let prefix = format!("{} deferred", what(job));
            if invite.remarks.last().is_some_and(|r| r.text.starts_with(&prefix)) {
                invite.remarks.pop();
            }
            invite.remarks.push(Remark { at: now, text });
        }
        tx.put(Some(&old), &invite)?;
        Ok(invite)
    }
}

type TxUnit = super::TxResult<()>;

/// Where the outbox's latest trouble is kept (a record in the settings tree, not an admin setting).
const LAST_ERROR: &str = "outbox.last_error";

/// The message in a sentence: "Email to a@example.com", "Reminder to …", "Enrollment notice to …".
fn what(job: &DeliveryJob) -> String {
    match job.kind {
        JobKind::Invite => format!("{} to {}", job.channel.label(), job.to),
        JobKind::Reminder => format!("Reminder to {}", job.to),
        JobKind::Confirmation => format!("Enrollment notice to {}", job.to),
        JobKind::Account => format!("Password setup link to {}", job.to),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{admin, domain, domain_with};
    use super::super::{Actor, NewInvite, NewUser};
    use super::*;
    use crate::model::{Channels, Ownership, Platform};

    fn invite(d: &Enrollment, email: &str) -> Id {
        let user = d.create_user(&admin(), &NewUser { name: email.into(), email: email.into(), ..Default::default() });
        let new = NewInvite {
            user_id: user.unwrap().id,
            platform: Platform::Android,
            ownership: Ownership::Personal,
            group_id: None,
            channels: Channels::Email,
        };
        d.create_invite(&admin(), &new).unwrap().invite.id
    }

    fn quick() -> RetryPolicy {
        RetryPolicy { first: std::time::Duration::from_secs(60), horizon: std::time::Duration::from_secs(3600) }
    }

    #[test]
    fn a_job_is_claimed_once_and_its_outcome_shows_on_the_invite() {
        let (d, _clock) = domain();
        let id = invite(&d, "ann@example.com");
        let (due, next) = d.due_jobs(d.now(), 10).unwrap();
        assert_eq!((due.len(), next), (1, None));
        let claimed = d.claim_job(&due[0], |_| true).unwrap().unwrap();
        assert_eq!((claimed.job.state, claimed.job.attempts), (JobState::Sending, 1));
        assert!(claimed.job.link_token.is_some() && claimed.job.passcode.is_some());
        assert!(d.claim_job(&due[0], |_| true).unwrap().is_none(), "a job being sent is not handed out again");
        assert!(d.due_jobs(d.now(), 10).unwrap().0.is_empty());

        let job = d.finish_job(&due[0], &Attempt::Sent("250 2.0.0 Ok: queued as X1".into()), &quick()).unwrap();
        assert_eq!((job.state, job.link_token, job.passcode), (JobState::Sent, None, None), "secrets are wiped");
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        assert_eq!(invite.delivery[0].state, JobState::Sent);
        assert_eq!(invite.delivery[0].reply.as_deref(), Some("250 2.0.0 Ok: queued as X1"));
        assert!(invite.remarks.last().unwrap().text.contains("accepted by the server: 250"));
    }

    #[test]
    fn temporary_failures_back_off_and_give_up_at_the_horizon() {
        let (d, clock) = domain();
        let id = invite(&d, "bea@example.com");
        let job_id = d.due_jobs(d.now(), 10).unwrap().0[0];
        let mut waits = Vec::new();
        loop {
            let Some(claimed) = d.claim_job(&job_id, |_| true).unwrap() else {
                clock.advance(time::Duration::seconds(1));
                continue;
            };
            let job = d.finish_job(&claimed.job.id, &Attempt::Temporary("421 busy".into()), &quick()).unwrap();
            if job.state == JobState::Failed {
                assert!(job.last_reply.as_deref() == Some("421 busy") && job.link_token.is_none());
                break;
            }
            let wait = job.next_attempt_at.unwrap() - d.now();
            waits.push(wait.whole_seconds());
            let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
            assert_eq!(invite.delivery[0].state, JobState::Deferred);
            assert_eq!(invite.remarks.iter().filter(|r| r.text.contains("deferred")).count(), 1, "one deferral remark");
            clock.advance(wait);
        }
        assert!((48..=72).contains(&waits[0]), "first wait about a minute: {waits:?}");
        assert!((96..=144).contains(&waits[1]), "then about twice that: {waits:?}");
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        assert_eq!(invite.delivery[0].state, JobState::Failed);
        assert!(invite.remarks.last().unwrap().text.contains("still not delivered after"), "{:?}", invite.remarks);
        let (at, last) = d.outbox_last_error().unwrap().expect("the dashboard's latest trouble");
        assert!(at == d.now() && last.contains("still not delivered after") && last.contains("421 busy"), "{last}");
    }

    #[test]
    fn a_resent_invite_never_goes_out_from_its_old_job_and_a_restart_requeues_what_was_in_flight() {
        let (d, _clock) = domain();
        let id = invite(&d, "cal@example.com");
        let old_job = d.due_jobs(d.now(), 10).unwrap().0[0];
        d.resend_invite(&admin(), &id).unwrap();
        assert!(d.claim_job(&old_job, |_| true).unwrap().is_none());
        let jobs = d.deliveries(&id).unwrap();
        assert_eq!(jobs.iter().map(|j| j.state).collect::<Vec<_>>(), [JobState::Stale, JobState::Queued]);

        let new_job = d.due_jobs(d.now(), 10).unwrap().0;
        assert_eq!(new_job, [jobs[1].id]);
        d.claim_job(&new_job[0], |_| true).unwrap().unwrap();
        assert_eq!(d.requeue_in_flight().unwrap(), 1);
        assert_eq!(d.due_jobs(d.now(), 10).unwrap().0, new_job, "queued again after a crash mid-send");
    }

    #[test]
    fn a_reminder_waits_until_days_before_expiry_and_carries_no_secrets() {
        let policy = super::super::Policy { reminder_before: Some(time::Duration::days(2)), ..Default::default() };
        let (d, clock) = domain_with(policy);
        let id = invite(&d, "eve@example.com");
        let jobs = d.deliveries(&id).unwrap();
        let reminder = jobs.iter().find(|j| j.kind == JobKind::Reminder).unwrap();
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        assert_eq!(reminder.next_attempt_at, Some(invite.expires_at - time::Duration::days(2)));
        assert_eq!((reminder.link_token.as_ref(), reminder.passcode.as_ref()), (None, None));
        assert_eq!(invite.delivery.len(), 1, "only the invite's own message shows on it");
        assert!(invite.remarks[0].text.contains("with a reminder on"), "{:?}", invite.remarks);
        assert_eq!(d.outbox_counts().unwrap(), OutboxCounts { queued: 1, ..Default::default() });
        assert_eq!(d.store.count("outbox.scheduled").unwrap(), 1);

        let (due, next) = d.due_jobs(d.now(), 10).unwrap();
        assert_eq!(due.len(), 1, "the invite mail only");
        let at = |t: Option<time::OffsetDateTime>| t.map(|t| t.unix_timestamp());
        assert_eq!(at(next), at(reminder.next_attempt_at), "and when the reminder falls due");
        d.claim_job(&due[0], |_| true).unwrap().unwrap();
        let (due, next) = d.due_jobs(d.now(), 10).unwrap();
        assert!(due.is_empty());
        assert_eq!(at(next), at(reminder.next_attempt_at));

        clock.advance(time::Duration::days(5) + time::Duration::minutes(1));
        let due = d.due_jobs(d.now(), 10).unwrap().0;
        assert_eq!(due, [reminder.id]);
        let claimed = d.claim_job(&due[0], |_| true).unwrap().unwrap();
        assert_eq!(claimed.job.kind, JobKind::Reminder);
        d.finish_job(&due[0], &Attempt::Sent("250 ok".into()), &quick()).unwrap();
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        assert!(invite.remarks.last().unwrap().text.starts_with("Reminder to eve@example.com accepted"));
    }

    #[test]
    fn a_resend_retires_the_old_reminder() {
        let policy = super::super::Policy { reminder_before: Some(time::Duration::days(1)), ..Default::default() };
        let (d, _clock) = domain_with(policy);
        let id = invite(&d, "fay@example.com");
        d.resend_invite(&admin(), &id).unwrap();
        let kinds: Vec<_> = d.deliveries(&id).unwrap().iter().map(|j| (j.kind, j.state)).collect();
        assert_eq!(
            kinds,
            [
                (JobKind::Invite, JobState::Stale),
                (JobKind::Reminder, JobState::Stale),
                (JobKind::Invite, JobState::Queued),
                (JobKind::Reminder, JobState::Queued)
            ]
        );
    }

    #[test]
    fn an_enrollment_queues_a_notice_to_the_list_and_the_user() {
        let policy = super::super::Policy {
            confirmation_to: vec!["helpdesk@example.com".into()],
            confirmation_to_user: true,
            ..Default::default()
        };
        let (d, _clock) = domain_with(policy);
        let id = invite(&d, "gus@example.com");
        let first = d.due_jobs(d.now(), 10).unwrap().0;
        d.claim_job(&first[0], |_| true).unwrap().unwrap();
        d.finish_job(&first[0], &Attempt::Sent("250 ok".into()), &quick()).unwrap();
        let facts = super::super::DeviceFacts { name: Some("Gus's Pixel".into()), ..Default::default() };
        let device = d.complete_enrollment(&Actor::device(None), &id, &facts).unwrap();

        let due = d.due_jobs(d.now(), 10).unwrap().0;
        let claimed: Vec<Claimed> = due.iter().map(|j| d.claim_job(j, |_| true).unwrap().unwrap()).collect();
        let to: Vec<&str> = claimed.iter().map(|c| c.job.to.as_str()).collect();
        assert_eq!(to, ["helpdesk@example.com", "gus@example.com"]);
        assert!(claimed.iter().all(|c| c.job.kind == JobKind::Confirmation));
        assert_eq!(claimed[0].device.as_ref().map(|d| d.id), Some(device.id));
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        assert_eq!(invite.delivery.len(), 1);
        assert_eq!(invite.delivery[0].state, JobState::Sent, "the invite's own delivery is untouched");
    }

    #[test]
    fn the_horizon_counts_from_the_first_attempt_so_a_late_reminder_is_retried() {
        let policy = super::super::Policy { reminder_before: Some(time::Duration::days(2)), ..Default::default() };
        let (d, clock) = domain_with(policy);
        let id = invite(&d, "hal@example.com");
        let reminder = d.deliveries(&id).unwrap().into_iter().find(|j| j.kind == JobKind::Reminder).unwrap();
        clock.advance(time::Duration::days(5) + time::Duration::minutes(1));
        d.claim_job(&reminder.id, |_| true).unwrap().unwrap();
        let job = d.finish_job(&reminder.id, &Attempt::Temporary("451 greylisted".into()), &quick()).unwrap();
        assert_eq!(job.state, JobState::Deferred, "five days after it was queued, but at its first attempt");
        assert!(job.first_attempt_at.is_some());
    }

    #[test]
    fn replies_that_echo_the_link_or_passcode_are_blanked() {
        let (d, _clock) = domain();
        let id = invite(&d, "ida@example.com");
        let claimed = claim_first(&d);
        let (token, passcode) = (claimed.job.link_token.clone().unwrap(), claimed.job.passcode.clone().unwrap());
        let echo = format!("HTTP 200: {{\"body\": \"enroll at https://e.local/e/{token} passcode {passcode}\"}}");
        let job = d.finish_job(&claimed.job.id, &Attempt::Sent(echo), &quick()).unwrap();
        let reply = job.last_reply.unwrap();
        assert!(!reply.contains(&token) && !reply.contains(&passcode) && reply.contains("/e/… passcode …"), "{reply}");
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        let remarks: String = invite.remarks.iter().map(|r| r.text.clone()).collect();
        assert!(!remarks.contains(&token) && !remarks.contains(&passcode));
        assert!(!invite.delivery[0].reply.as_deref().unwrap().contains(&passcode));
    }

    #[test]
    fn an_outcome_after_the_invite_was_removed_mid_send_keeps_the_job_retired() {
        let (d, _clock) = domain();
        let id = invite(&d, "jon@example.com");
        let claimed = claim_first(&d);
        d.remove_invite(&admin(), &id).unwrap();
        let job = d.finish_job(&claimed.job.id, &Attempt::Temporary("421 try later".into()), &quick()).unwrap();
        assert_eq!((job.state, job.last_reply.as_deref()), (JobState::Stale, Some("421 try later")));
        assert!(d.due_jobs(d.now(), 10).unwrap().0.is_empty(), "not back in the queue");
    }

    #[test]
    fn a_notice_whose_user_was_deleted_goes_stale_instead_of_blocking_the_queue() {
        let policy =
            super::super::Policy { confirmation_to: vec!["helpdesk@example.com".into()], ..Default::default() };
        let (d, _clock) = domain_with(policy);
        let id = invite(&d, "kim@example.com");
        let first = claim_first(&d);
        d.finish_job(&first.job.id, &Attempt::Sent("250 ok".into()), &quick()).unwrap();
        d.complete_enrollment(&Actor::device(None), &id, &Default::default()).unwrap();
        let invite: Invite = d.store.get(id.as_bytes()).unwrap().unwrap();
        let choice = Some(super::super::UserChoiceForDevices::Unassign);
        d.delete_user(&admin(), &invite.user_id, choice).unwrap();
        let notice = d.due_jobs(d.now(), 10).unwrap().0;
        assert_eq!(notice.len(), 1);
        assert!(d.claim_job(&notice[0], |_| true).unwrap().is_none());
        assert!(d.due_jobs(d.now(), 10).unwrap().0.is_empty());
    }

    fn claim_first(d: &Enrollment) -> Claimed {
        let due = d.due_jobs(d.now(), 10).unwrap().0;
        d.claim_job(&due[0], |_| true).unwrap().unwrap()
    }

    #[test]
    fn mail_put_back_for_want_of_a_relay_is_woken_when_one_is_set() {
        let (d, _clock) = domain();
        invite(&d, "lea@example.com");
        let job = d.due_jobs(d.now(), 10).unwrap().0[0];
        assert!(d.claim_job(&job, |_| false).unwrap().is_none(), "no relay: put back ten minutes");
        assert!(d.due_jobs(d.now(), 10).unwrap().0.is_empty());
        assert_eq!(d.wake_waiting().unwrap(), 1);
        assert_eq!(d.due_jobs(d.now(), 10).unwrap().0, [job]);
    }

    #[test]
    fn a_job_whose_invite_was_removed_becomes_stale() {
        let (d, _clock) = domain();
        let id = invite(&d, "dee@example.com");
        let job = d.due_jobs(d.now(), 10).unwrap().0[0];
        d.remove_invite(&admin(), &id).unwrap();
        assert!(d.claim_job(&job, |_| true).unwrap().is_none());
        assert!(d.due_jobs(d.now(), 10).unwrap().0.is_empty());
    }
}
