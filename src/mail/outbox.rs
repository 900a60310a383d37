//! The outbox worker: delivers due jobs through the relay at a bounded pace and concurrency, records each outcome,
//! and backs off as a whole while the relay is unreachable, so a long outage neither floods the relay when it
//! returns nor burns every job's retries.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::templates::InviteContext;
use super::{Mail, QR_CONTENT_ID, Relay};
use crate::domain::{Attempt, Claimed, Enrollment, RetryPolicy};
use crate::model::{Id, JobChannel, JobKind, Platform};

/// How often an idle worker looks for new jobs.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long in-flight messages get to finish at shutdown (the rest are queued again at the next start).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// The longest pause while the relay is unreachable.
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// What the worker needs besides the domain.
#[derive(Clone)]
pub struct OutboxSettings {
    /// The relay (jobs wait while there is none) and the templates.
    pub mail: Mail,
    pub max_connections: usize,
    pub max_per_second: u32,
    pub retry: RetryPolicy,
}

/// Delivers the outbox until `shutdown`.
pub async fn run(domain: Enrollment, settings: OutboxSettings, shutdown: CancellationToken) {
    let requeued = {
        let domain = domain.clone();
        tokio::task::spawn_blocking(move || domain.requeue_in_flight()).await
    };
    match requeued {
        Ok(Ok(0)) => {}
        Ok(Ok(count)) => tracing::info!(count, "messages that were being sent at the last stop are queued again"),
        Ok(Err(error)) => tracing::error!(%error, "cannot queue interrupted messages again"),
        Err(error) => tracing::error!(%error, "cannot queue interrupted messages again"),
    }
    let relay = settings.mail.relay().cloned();
    if relay.is_none() {
        tracing::warn!("no mail relay is configured (smtp_host): invite mails wait in the outbox until one is");
        if settings.mail.sms().is_none() {
            shutdown.cancelled().await;
            return;
        }
    }
    let worker = Worker { domain, settings: Arc::new(settings), relay };
    worker.run(shutdown).await;
}

struct Worker {
    domain: Enrollment,
    settings: Arc<OutboxSettings>,
    relay: Option<Relay>,
}

impl Worker {
    async fn run(&self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.max_connections));
        let mut pace = tokio::time::interval(Duration::from_secs(1) / self.settings.max_per_second.max(1));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight = JoinSet::new();
        let mut failures_in_a_row = 0u32;
        'work: while !shutdown.is_cancelled() {
            // Outcomes of finished sends: an unreachable relay pauses everything; anything else resets the count.
            while let Some(done) = in_flight.try_join_next() {
                match done {
                    Ok(Some(Attempt::Temporary(reply))) if !reply.starts_with('4') => failures_in_a_row += 1,
                    Ok(_) => failures_in_a_row = 0,
                    Err(error) => tracing::error!(%error, "a delivery task failed"),
                }
            }
            if failures_in_a_row > 0 {
                let pause = self.settings.retry.backoff(failures_in_a_row).unsigned_abs().min(MAX_PAUSE);
                tracing::warn!(pause_secs = pause.as_secs(), "the mail relay is unreachable; pausing the outbox");
                // Let the in-flight sends finish first, so their outcomes count before the next probe.
                while let Some(done) = in_flight.join_next().await {
                    if let Ok(Some(Attempt::Sent(_))) = done {
                        failures_in_a_row = 0;
                    }
                }
                if failures_in_a_row > 0 {
                    tokio::select! {
                        () = shutdown.cancelled() => break 'work,
                        () = tokio::time::sleep(pause) => {}
                    }
                    // One probe at a time until the relay answers again.
                    let permit = slots.clone().acquire_owned().await;
                    let Ok(permit) = permit else { break };
                    let (due, _) = self.due(1).await;
                    match due.first() {
                        Some(id) => {
                            let outcome = self.deliver(*id).await;
                            drop(permit);
                            match outcome {
                                Some(Attempt::Temporary(reply)) if !reply.starts_with('4') => failures_in_a_row += 1,
                                _ => failures_in_a_row = 0,
                            }
                        }
                        None => failures_in_a_row = 0,
                    }
                    continue;
                }
            }

            let (due, next) = self.due(self.settings.max_connections * 4).await;
            if due.is_empty() {
                let wait = next
                    .map(|at| (at - self.domain.now()).unsigned_abs())
                    .map_or(IDLE_POLL, |until| until.min(IDLE_POLL));
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            for id in due {
                tokio::select! {
                    () = shutdown.cancelled() => break 'work,
                    _ = pace.tick() => {}
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break 'work };
                let worker = self.clone_parts();
                in_flight.spawn(async move {
                    let outcome = worker.deliver(id).await;
                    drop(permit);
                    outcome
                });
            }
            // Wait for this round to settle before looking again, so no job is handed out twice.
            while let Some(done) = in_flight.join_next().await {
                match done {
                    Ok(Some(Attempt::Temporary(reply))) if !reply.starts_with('4') => failures_in_a_row += 1,
                    Ok(Some(_)) => failures_in_a_row = 0,
                    Ok(None) => {}
                    Err(error) => tracing::error!(%error, "a delivery task failed"),
                }
            }
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, async { while in_flight.join_next().await.is_some() {} }).await.is_err()
        {
            tracing::warn!("messages still being sent at shutdown are queued again at the next start");
        }
    }

    fn clone_parts(&self) -> Worker {
        Worker { domain: self.domain.clone(), settings: self.settings.clone(), relay: self.relay.clone() }
    }

    async fn due(&self, limit: usize) -> (Vec<Id>, Option<time::OffsetDateTime>) {
        let domain = self.domain.clone();
        match tokio::task::spawn_blocking(move || domain.due_jobs(domain.now(), limit)).await {
            Ok(Ok(due)) => due,
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot read the outbox");
                (Vec::new(), None)
            }
            Err(error) => {
                tracing::error!(%error, "cannot read the outbox");
                (Vec::new(), None)
            }
        }
    }

    /// Claims, renders, sends and records one job; the attempt's outcome, or `None` when there was nothing to send.
    async fn deliver(&self, id: Id) -> Option<Attempt> {
        let domain = self.domain.clone();
        let has_relay = self.relay.is_some();
        // Email waits for a relay; SMS always goes ahead, to end with a clear reply when no gateway is set.
        let can_send = move |channel| channel == JobChannel::Sms || has_relay;
        let claimed = match tokio::task::spawn_blocking(move || domain.claim_job(&id, can_send)).await {
            Ok(Ok(Some(claimed))) => claimed,
            Ok(Ok(None)) => return None,
            Ok(Err(error)) => {
                tracing::error!(%error, job = %id, "cannot claim a delivery job");
                return None;
            }
            Err(error) => {
                tracing::error!(%error, job = %id, "cannot claim a delivery job");
                return None;
            }
        };
        let attempt = match (claimed.job.channel, &self.relay, self.settings.mail.sms()) {
            (JobChannel::Email, Some(relay), _) => match self.message(relay, &claimed) {
                Ok(message) => relay.send(message).await,
                Err(error) => Attempt::Permanent(error.to_string()),
            },
            (JobChannel::Email, None, _) => Attempt::Temporary("no mail relay is configured".into()),
            (JobChannel::Sms, relay, Some(gateway)) => match self.invite_text(&claimed) {
                Some(text) => {
                    let message_id = format!("sms.{}.{}", claimed.job.invite_id, claimed.job.id);
                    super::sms::send(gateway, relay.as_ref(), &claimed.job.to, &text, &message_id).await
                }
                None => Attempt::Permanent("the job has no link left to send".into()),
            },
            (JobChannel::Sms, _, None) => Attempt::Permanent(
                "no SMS gateway is configured (sms_gateway), so the text message was not sent".into(),
            ),
        };
        match &attempt {
            Attempt::Sent(reply) => tracing::info!(job = %id, to = %claimed.job.to, %reply, "message sent"),
            Attempt::Temporary(reply) => tracing::warn!(job = %id, to = %claimed.job.to, %reply, "message deferred"),
            Attempt::Permanent(reply) => tracing::warn!(job = %id, to = %claimed.job.to, %reply, "message failed"),
        }
        let domain = self.domain.clone();
        let retry = self.settings.retry;
        let recorded = attempt.clone();
        match tokio::task::spawn_blocking(move || domain.finish_job(&id, &recorded, &retry)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, job = %id, "cannot record a delivery"),
            Err(error) => tracing::error!(%error, job = %id, "cannot record a delivery"),
        }
        Some(attempt)
    }

    fn invite_text(&self, claimed: &Claimed) -> Option<String> {
        let job = &claimed.job;
        let (token, passcode) = (job.link_token.as_ref()?, job.passcode.as_ref()?);
        let mail = &self.settings.mail;
        let context = InviteContext::new(
            &claimed.user.name,
            &mail.organisation,
            format!("{}/e/{token}", mail.public_url),
            passcode,
            claimed.invite.expires_at,
            claimed.invite.platform,
            claimed.invite.ownership,
            "",
        );
        Some(super::sms::invite_text(&context))
    }

    fn message(&self, relay: &Relay, claimed: &Claimed) -> Result<lettre::Message, super::MailError> {
        let job = &claimed.job;
        let message_id = format!("{}.{}.{}", job.kind, job.invite_id, job.id);
        match job.kind {
            JobKind::Invite => self.invite_message(relay, claimed),
            JobKind::Reminder => {
                let (subject, text) = reminder_text(&self.settings.mail.organisation, claimed);
                relay.text_message(&job.to, &message_id, &subject, &text)
            }
            JobKind::Confirmation => {
                let (subject, text) = confirmation_text(claimed);
                relay.text_message(&job.to, &message_id, &subject, &text)
            }
        }
    }

    fn invite_message(&self, relay: &Relay, claimed: &Claimed) -> Result<lettre::Message, super::MailError> {
        let job = &claimed.job;
        let (Some(token), Some(passcode)) = (&job.link_token, &job.passcode) else {
            return Err(super::MailError::Message("the job has no link left to send".into()));
        };
        let mail = &self.settings.mail;
        let link = format!("{}/e/{token}", mail.public_url);
        let context = InviteContext::new(
            &claimed.user.name,
            &mail.organisation,
            link.clone(),
            passcode,
            claimed.invite.expires_at,
            claimed.invite.platform,
            claimed.invite.ownership,
            &format!("cid:{QR_CONTENT_ID}"),
        );
        let rendered = mail.templates().render(&context)?;
        relay.invite_message(&job.to, &format!("invite.{}.{}", job.invite_id, job.id), &rendered, &link)
    }
}

fn platform_name(platform: Platform) -> &'static str {
    match platform {
        Platform::Any => "any",
        other => crate::csvfile::platform_text(other),
    }
}

/// A reminder that an invite expires soon. It carries no link or passcode (they are not kept in the outbox for
/// days), so it points to the invite mail and says what to do without it.
fn reminder_text(organisation: &str, claimed: &Claimed) -> (String, String) {
    let invite = &claimed.invite;
    let device = match invite.platform {
        Platform::Any => "a device".to_owned(),
        platform => format!("your {} device", platform_name(platform)),
    };
    let expires = crate::domain::minute(invite.expires_at);
    let who = if organisation.is_empty() { "your IT team" } else { organisation };
    let subject = format!("Reminder: enroll {device} before {} UTC", expires);
    let text = format!(
        "Hello {},\n\nYour invite to enroll {device} in device management expires on {expires} UTC.\n\nOpen the link in the invite mail you received on {} and enter its passcode. If you cannot find that mail, ask {who} to send the invite again.\n",
        claimed.user.name,
        invite.requested_at.date(),
    );
    (subject, text)
}

/// The notice that a device enrolled, for the distribution list (and the user, if so configured).
fn confirmation_text(claimed: &Claimed) -> (String, String) {
    let (user, invite) = (&claimed.user, &claimed.invite);
    let device = claimed.device.as_ref();
    let platform = platform_name(device.map_or(invite.platform, |d| d.platform));
    let field = |value: Option<&String>| value.cloned().unwrap_or_else(|| "(not reported)".into());
    let subject = format!("Device enrolled: {} ({platform})", user.name);
    let enrolled = device.map_or(invite.requested_at, |d| d.enrolled_at);
    let text = format!(
        "A device enrolled in device management.\n\nUser: {} <{}>\nDevice: {}\nModel: {}\nSerial number: {}\nIMEI: {}\nPlatform: {platform}\nOwnership: {}\nEnrolled: {} UTC\n",
        user.name,
        user.email,
        field(device.and_then(|d| d.name.as_ref())),
        field(device.and_then(|d| d.model.as_ref())),
        field(device.and_then(|d| d.serial.as_ref())),
        field(device.and_then(|d| d.imei.as_ref())),
        invite.ownership,
        crate::domain::minute(enrolled),
    );
    (subject, text)
}
