//! The outbox worker: delivers due jobs through the relay at a bounded pace and concurrency, records each outcome,
//! and backs off as a whole while the relay is unreachable, so a long outage neither floods the relay when it
//! returns nor burns every job's retries; a change of the box's addresses (the network coming up) ends the pause.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::templates::{InviteContext, platform_name};
use super::{Mail, QR_CONTENT_ID, Relay};
use crate::addrs::AddressSource;
use crate::domain::{Attempt, Claimed, Enrollment, RetryPolicy};
use crate::model::{Id, JobChannel, JobKind, Platform};

/// How often an idle worker looks for new jobs.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How long in-flight messages get to finish at shutdown (the rest are queued again at the next start).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// How long a job whose claim failed waits before it is tried again.
const CLAIM_FAILED_WAIT: time::Duration = time::Duration::hours(1);
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
    /// SHA-256 of the appliance's CA (hex), for the Android provisioning QR code.
    pub ca_sha256: String,
    /// The box's addresses: when they change while the relay is unreachable (a box that started before its DHCP
    /// lease, a cable plugged in), the outbox tries again at once.
    pub addresses: Arc<dyn AddressSource>,
}

/// Delivers the outbox until `shutdown`.
pub async fn run(domain: Enrollment, settings: OutboxSettings, shutdown: CancellationToken) {
    let requeued = {
        let domain = domain.clone();
        in_store(move || domain.requeue_in_flight()).await
    };
    match requeued {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "messages that were being sent at the last stop are queued again"),
        Err(error) => tracing::error!(%error, "cannot queue interrupted messages again"),
    }
    if settings.mail.relay().is_none() {
        tracing::warn!("no mail relay is configured (smtp_host): invite mails wait in the outbox until one is");
    }
    let worker = Worker { domain, settings: Arc::new(settings) };
    worker.run(shutdown).await;
}

struct Worker {
    domain: Enrollment,
    settings: Arc<OutboxSettings>,
}

/// The relay's state as the worker sees it.
#[derive(Default)]
struct Outage {
    /// A message found the relay unreachable since the last one it took.
    down: bool,
    /// Pauses since the relay last answered.
    pauses: u32,
    /// The relay answered a message (accepted or refused it) since this was last looked at.
    answered: bool,
    /// The messages deferred for it, made due again when the relay answers after a pause or the box's network
    /// changes.
    deferred: Vec<Id>,
    /// The box's addresses when the latest messages were handed out: a pause ends when they change, also if they
    /// changed while those messages were failing.
    addresses_at_send: Vec<std::net::IpAddr>,
}

impl Worker {
    async fn run(&self, shutdown: CancellationToken) {
        let slots = self.settings.max_connections.max(1);
        let mut pace = tokio::time::interval(Duration::from_secs(1) / self.settings.max_per_second.max(1));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: JoinSet<(Id, Option<(JobChannel, Attempt)>)> = JoinSet::new();
        // Jobs handed to a task but perhaps not claimed yet: still in the due index, so not to be handed out again.
        let mut handed_out: HashSet<Id> = HashSet::new();
        let mut outage = Outage::default();
        loop {
            while let Some(done) = in_flight.try_join_next() {
                self.settle(done, &mut handed_out, &mut outage);
            }
            if std::mem::take(&mut outage.answered) {
                let deferred = std::mem::take(&mut outage.deferred);
                // The relay answered after a pause: what the outage deferred need not wait out its own backoff. (A
                // message refused while others went through keeps its own.)
                if std::mem::take(&mut outage.pauses) > 0 {
                    self.due_now(deferred).await;
                }
            }
            if outage.down {
                // The relay is unreachable: let the sends under way finish, pause, then probe with one message at a
                // time until it answers again.
                while let Some(done) = in_flight.join_next().await {
                    self.settle(done, &mut handed_out, &mut outage);
                }
                if outage.down {
                    // The pause grows with each failed probe, not with each message that failed together.
                    outage.pauses += 1;
                    let pause = self.settings.retry.backoff(outage.pauses).unsigned_abs().min(MAX_PAUSE);
                    tracing::warn!(pause_secs = pause.as_secs(), "the mail relay is unreachable; pausing the outbox");
                    let before = std::mem::take(&mut outage.addresses_at_send);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                        () = crate::addrs::changed_from(self.settings.addresses.as_ref(), &before) => {
                            tracing::info!("the box's network addresses changed; trying the mail relay again now");
                            self.due_now(std::mem::take(&mut outage.deferred)).await;
                        }
                    }
                    outage.down = false;
                    // Nothing due, or nothing sent (the job went stale, say): the next message probes again, and a
                    // failure then pauses one step longer.
                    outage.addresses_at_send = self.settings.addresses.addresses();
                    if let Some(id) = self.due(1).await.0.first().copied()
                        && let Some(outcome) = self.deliver(id).await
                    {
                        self.settle(Ok((id, Some(outcome))), &mut handed_out, &mut outage);
                    }
                    continue;
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            let free = slots - in_flight.len();
            let (due, next) = if free == 0 { (Vec::new(), None) } else { self.due(slots * 4 + handed_out.len()).await };
            let fresh: Vec<Id> = due.into_iter().filter(|id| !handed_out.contains(id)).take(free).collect();
            if fresh.is_empty() {
                // Nothing new to start: wait for a send to finish, the next due time, or a second for new work.
                let wait = next.map_or(IDLE_POLL, |at| (at - self.domain.now()).unsigned_abs().min(IDLE_POLL));
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                        self.settle(done, &mut handed_out, &mut outage);
                    }
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            outage.addresses_at_send = self.settings.addresses.addresses();
            for id in fresh {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = pace.tick() => {}
                }
                handed_out.insert(id);
                let worker = self.clone_parts();
                // Run in its own task, so a panic while delivering frees the job's slot here (the job itself, if
                // it was claimed, stays `sending` until the next start queues it again).
                in_flight.spawn(async move {
                    let outcome = tokio::spawn(async move { worker.deliver(id).await }).await;
                    if let Err(error) = &outcome {
                        tracing::error!(%error, job = %id, "delivering a message failed unexpectedly");
                    }
                    (id, outcome.ok().flatten())
                });
            }
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, async { while in_flight.join_next().await.is_some() {} }).await.is_err()
        {
            tracing::warn!("messages still being sent at shutdown are queued again at the next start");
        }
    }

    /// Books a finished send: the job is no longer handed out, and a refused connection (as opposed to a 4xx
    /// reply, which is the relay speaking) pauses the queue.
    fn settle(
        &self,
        done: Result<(Id, Option<(JobChannel, Attempt)>), tokio::task::JoinError>,
        handed_out: &mut HashSet<Id>,
        outage: &mut Outage,
    ) {
        match done {
            Ok((id, outcome)) => {
                handed_out.remove(&id);
                // Only the relay pauses the queue: an SMS gateway that is down holds up nothing else.
                match outcome {
                    Some((JobChannel::Email, Attempt::Unreachable(_))) => {
                        outage.down = true;
                        outage.deferred.push(id);
                    }
                    Some((JobChannel::Email, _)) => {
                        outage.down = false;
                        outage.answered = true;
                    }
                    _ => {}
                }
            }
            Err(error) => tracing::error!(%error, "a delivery task failed"),
        }
    }

    /// Makes the messages deferred by an outage due at once, now that the box's network changed.
    async fn due_now(&self, jobs: Vec<Id>) {
        for id in jobs {
            let domain = self.domain.clone();
            if let Err(error) = in_store(move || domain.postpone_job(&id, time::Duration::ZERO)).await {
                tracing::error!(%error, job = %id, "cannot make a deferred message due again");
            }
        }
    }

    fn clone_parts(&self) -> Worker {
        Worker { domain: self.domain.clone(), settings: self.settings.clone() }
    }

    async fn due(&self, limit: usize) -> (Vec<Id>, Option<time::OffsetDateTime>) {
        let domain = self.domain.clone();
        in_store(move || domain.due_jobs(domain.now(), limit)).await.unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read the outbox");
            (Vec::new(), None)
        })
    }

    /// Claims, renders, sends and records one job; the channel and the attempt's outcome, or `None` when there
    /// was nothing to send.
    async fn deliver(&self, id: Id) -> Option<(JobChannel, Attempt)> {
        let domain = self.domain.clone();
        // The relay in use for this message (an admin may change it at any time).
        let relay = self.settings.mail.relay();
        let has_relay = relay.is_some();
        let sms_needs_relay =
            matches!(self.settings.mail.sms().as_deref(), Some(crate::config::SmsGateway::Email { .. }));
        // Email (and SMS by email) waits for a relay; other SMS go ahead, to end with a clear reply when no gateway
        // is set.
        let can_send = move |channel| has_relay || (channel == JobChannel::Sms && !sms_needs_relay);
        let claimed = match tokio::task::spawn_blocking(move || domain.claim_job(&id, can_send)).await {
            Ok(Ok(Some(claimed))) => claimed,
            Ok(Ok(None)) => return None,
            Ok(Err(error)) => {
                tracing::error!(%error, job = %id, "cannot claim a delivery job; trying it again in an hour");
                let domain = self.domain.clone();
                if in_store(move || domain.postpone_job(&id, CLAIM_FAILED_WAIT)).await.is_err() {
                    tracing::error!(job = %id, "cannot put the delivery job back either");
                }
                return None;
            }
            Err(error) => {
                tracing::error!(%error, job = %id, "cannot claim a delivery job");
                return None;
            }
        };
        let sms = self.settings.mail.sms();
        let attempt = match (claimed.job.channel, relay.as_deref(), sms.as_deref()) {
            (JobChannel::Email, Some(relay), _) => match self.message(relay, &claimed) {
                Ok(message) => relay.send(message).await,
                Err(error) => Attempt::Permanent(error.to_string()),
            },
            (JobChannel::Email, None, _) => Attempt::Unreachable("no mail relay is configured".into()),
            (JobChannel::Sms, relay, Some(gateway)) => match self.invite_text(&claimed) {
                Some(text) => {
                    let message_id = format!("sms.{}.{}", claimed.job.invite_id, claimed.job.id);
                    super::sms::send(gateway, relay, &claimed.job.to, &text, &message_id).await
                }
                None => Attempt::Permanent("the job has no link left to send".into()),
            },
            (JobChannel::Sms, _, None) => Attempt::Permanent(
                "no SMS gateway is set (Settings → SMS gateway, or sms_gateway in the configuration), so the text message was not sent; set one, then resend the invite".into(),
            ),
        };
        let attempt = crate::domain::redact(&attempt, &claimed.job);
        match &attempt {
            Attempt::Sent(reply) => tracing::info!(job = %id, to = %claimed.job.to, %reply, "message sent"),
            Attempt::Temporary(reply) | Attempt::Unreachable(reply) => {
                tracing::warn!(job = %id, to = %claimed.job.to, %reply, "message deferred");
            }
            Attempt::Permanent(reply) => tracing::warn!(job = %id, to = %claimed.job.to, %reply, "message failed"),
        }
        let domain = self.domain.clone();
        let retry = self.settings.retry;
        let recorded = attempt.clone();
        if let Err(error) = in_store(move || domain.finish_job(&id, &recorded, &retry)).await {
            tracing::error!(%error, job = %id, "cannot record a delivery");
        }
        Some((claimed.job.channel, attempt))
    }

    /// What the invite templates (and the SMS text) are rendered from; `None` once the job's secrets are gone.
    fn invite_context(&self, claimed: &Claimed) -> Option<InviteContext> {
        let job = &claimed.job;
        let (token, passcode) = (job.link_token.as_ref()?, job.passcode.as_ref()?);
        let mail = &self.settings.mail;
        Some(InviteContext::new(
            &claimed.user.name,
            &mail.organisation(),
            format!("{}/e/{token}", mail.public_url()),
            passcode,
            claimed.invite.expires_at,
            claimed.invite.platform,
            claimed.invite.ownership,
            &format!("cid:{QR_CONTENT_ID}"),
        ))
    }

    /// What the invite's QR code holds: for a company-owned Android device, once the admin configured the
    /// device-policy app, the provisioning JSON the device's setup screen reads; otherwise the link.
    fn qr_content(&self, claimed: &Claimed, link: &str) -> String {
        let invite = &claimed.invite;
        if invite.platform != crate::model::Platform::Android || invite.ownership != crate::model::Ownership::Corporate
        {
            return link.to_owned();
        }
        let Some(token) = claimed.job.link_token.as_deref() else { return link.to_owned() };
        match self.domain.android_app() {
            Ok(Some(app)) => {
                app.provisioning_payload(&self.settings.mail.public_url(), token, &self.settings.ca_sha256).to_string()
            }
            Ok(None) => link.to_owned(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the Android app settings; the invite's QR code holds the link");
                link.to_owned()
            }
        }
    }

    fn invite_text(&self, claimed: &Claimed) -> Option<String> {
        self.invite_context(claimed).map(|context| super::sms::invite_text(&context))
    }

    fn message(&self, relay: &Relay, claimed: &Claimed) -> Result<lettre::Message, super::MailError> {
        let job = &claimed.job;
        let message_id = format!("{}.{}.{}", job.kind, job.invite_id, job.id);
        match job.kind {
            JobKind::Invite => {
                let context = self
                    .invite_context(claimed)
                    .ok_or_else(|| super::MailError::Message("the job has no link left to send".into()))?;
                let rendered = self.settings.mail.templates().render(&context)?;
                let qr = self.qr_content(claimed, &context.link);
                relay.invite_message(&job.to, &message_id, &rendered, &qr)
            }
            JobKind::Reminder => {
                let (subject, text) = reminder_text(&self.settings.mail.organisation(), claimed);
                relay.text_message(&job.to, &message_id, &subject, &text)
            }
            JobKind::Confirmation => {
                let (subject, text) = confirmation_text(claimed);
                relay.text_message(&job.to, &message_id, &subject, &text)
            }
            JobKind::Account => {
                let token = job
                    .link_token
                    .as_deref()
                    .ok_or_else(|| super::MailError::Message("the job has no link left to send".into()))?;
                let link = format!("{}/account/{token}", self.settings.mail.public_url());
                let (subject, text) = account_text(&self.settings.mail.organisation(), claimed, &link);
                relay.text_message(&job.to, &message_id, &subject, &text)
            }
        }
    }
}

/// Runs a domain call on the blocking pool; a store failure and a panicked task both come back as the error text.
async fn in_store<T: Send + 'static>(
    work: impl FnOnce() -> crate::domain::DomainResult<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
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

/// The one-time link for a user to set the password the enrollment page asks for.
fn account_text(organisation: &str, claimed: &Claimed, link: &str) -> (String, String) {
    let who = if organisation.is_empty() { "Device enrollment".to_owned() } else { organisation.to_owned() };
    let subject = format!("{who}: set your enrollment password");
    let text = format!(
        "Hello {},\n\nTo enroll your device, the enrollment page asks for a password of your own. Set it here (the link works once, for 24 hours):\n\n{link}\n\nThen open the link in your invite mail again. If you did not ask for this, ignore this mail.\n",
        claimed.user.name,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::admin;
    use crate::domain::{Actor, DeviceFacts, NewInvite, NewUser, Policy};
    use crate::model::{Channels, Ownership};

    /// A domain whose policy sends reminders two days ahead and notices to a helpdesk list, with one invite.
    fn invited() -> (Enrollment, crate::clock::ManualClock, Id) {
        let (d, clock) = crate::domain::testing::domain_with(Policy {
            reminder_before: Some(time::Duration::days(2)),
            confirmation_to: vec!["helpdesk@example.com".into()],
            ..Policy::default()
        });
        let id = email_invite(&d, "Ann Lee", "ann@example.com", Platform::Macos);
        (d, clock, id)
    }

    /// A new user and a personal invite for them by email.
    fn email_invite(d: &Enrollment, name: &str, email: &str, platform: Platform) -> Id {
        let new = NewUser { name: name.into(), email: email.into(), ..Default::default() };
        let user = d.create_user(&admin(), &new).unwrap();
        let new = NewInvite {
            user_id: user.id,
            platform,
            ownership: Ownership::Personal,
            group_id: None,
            channels: Channels::Email,
        };
        d.create_invite(&admin(), &new).unwrap().invite.id
    }

    fn claim_due(d: &Enrollment) -> Vec<Claimed> {
        d.due_jobs(d.now(), 10).unwrap().0.iter().filter_map(|id| d.claim_job(id, |_| true).unwrap()).collect()
    }

    /// A relay on the loopback that takes every message (enough SMTP for lettre), counting them, but turns away
    /// recipients whose address starts with `refused` as a relay that will not relay for them (454), at once:
    /// a message it takes is answered 200 ms after its data, so a refusal is always settled before a success of
    /// the same round.
    async fn accepting_relay(listener: tokio::net::TcpListener, taken: Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        while let Ok((stream, _)) = listener.accept().await {
            let taken = taken.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                write.write_all(b"220 relay ESMTP\r\n").await?;
                let mut in_data = false;
                while let Some(line) = lines.next_line().await? {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        b"250 2.0.0 queued\r\n"
                    } else {
                        match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                            Some("DATA") => {
                                in_data = true;
                                b"354 go ahead\r\n"
                            }
                            Some("QUIT") => b"221 bye\r\n",
                            Some("RCPT") if line.contains("<refused") => b"454 4.7.1 relay access denied\r\n",
                            _ => b"250 ok\r\n",
                        }
                    };
                    write.write_all(reply).await?;
                }
                std::io::Result::Ok(())
            });
        }
    }

    /// Email invites, one to each address, in a domain whose clock never moves.
    fn invites_to(d: &Enrollment, emails: &[String]) -> Vec<Id> {
        emails.iter().map(|email| email_invite(d, "A User", email, Platform::Ios)).collect()
    }

    /// The outbox's settings for a relay on the loopback at `port`, two connections, retries after a minute.
    fn settings_for(d: &Enrollment, port: u16, addresses: &crate::addrs::StaticAddresses) -> OutboxSettings {
        let relay = Relay::new(
            &crate::config::SmtpConfig {
                host: "127.0.0.1".into(),
                port,
                security: crate::config::SmtpSecurity::None,
                username: None,
                password: None,
                from_address: "it@example.com".into(),
                from_name: "IT".into(),
                reply_to: None,
                helo_name: "enroll.local".into(),
                ca_file: None,
                ca_pem: None,
            },
            2,
        )
        .unwrap();
        OutboxSettings {
            mail: Mail::new(d, Some(relay), None, 2, crate::naming::Naming::fixed()).unwrap(),
            max_connections: 2,
            max_per_second: 100,
            retry: RetryPolicy {
                first: std::time::Duration::from_secs(60),
                horizon: std::time::Duration::from_secs(86_400),
            },
            ca_sha256: String::new(),
            addresses: Arc::new(addresses.clone()),
        }
    }

    /// enrolld started before the box had its DHCP lease: the relay could not be reached, and the outbox paused for
    /// a minute or more. When the box's addresses change it tries again at once, and the messages the outage
    /// deferred go out with the rest, not after their own backoff (the clock here never moves, so only that brings
    /// them back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_network_coming_up_ends_the_pause_and_sends_what_the_outage_deferred() {
        let (d, _clock) = crate::domain::testing::domain_with(Policy::default());
        let invites = invites_to(&d, &(0..6).map(|n| format!("user{n}@example.com")).collect::<Vec<_>>());
        // A port nothing listens on yet: every connection is refused, as with no route.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addresses = crate::addrs::StaticAddresses::new([]);
        let settings = settings_for(&d, port, &addresses);
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(run(d.clone(), settings, shutdown.clone()));
        let states = |d: &Enrollment| -> Vec<crate::model::JobState> {
            invites.iter().flat_map(|id| d.deliveries(id).unwrap()).map(|job| job.state).collect()
        };
        // Both connections refused, the outbox pauses.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while states(&d).iter().filter(|state| **state == crate::model::JobState::Deferred).count() < 2 {
            assert!(std::time::Instant::now() < deadline, "no message was deferred: {:?}", states(&d));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // The lease arrives and the relay answers.
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(accepting_relay(listener, taken.clone()));
        addresses.set(["10.0.2.15".parse().unwrap()]);
        let deadline = std::time::Instant::now() + crate::addrs::ADDRESS_POLL * 5;
        while states(&d).iter().any(|state| *state != crate::model::JobState::Sent) {
            assert!(std::time::Instant::now() < deadline, "still waiting after the network came up: {:?}", states(&d));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), invites.len(), "each message once");
        shutdown.cancel();
        worker.await.unwrap();
    }

    /// A relay that turns one recipient away (counted as unreachable, since it is the relay's own setting) while it
    /// takes the others: that one message waits out its own backoff; the others' success does not send it again
    /// and again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_refused_while_others_go_through_keeps_its_own_backoff() {
        let (d, _clock) = crate::domain::testing::domain_with(Policy::default());
        let mut emails = vec!["refused@example.com".to_owned()];
        emails.extend((0..5).map(|n| format!("user{n}@example.com")));
        let invites = invites_to(&d, &emails);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(accepting_relay(listener, taken.clone()));
        let addresses = crate::addrs::StaticAddresses::new(["192.0.2.7".parse().unwrap()]);
        let shutdown = CancellationToken::new();
        let worker = tokio::spawn(run(d.clone(), settings_for(&d, port, &addresses), shutdown.clone()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while taken.load(std::sync::atomic::Ordering::SeqCst) < 5 {
            assert!(std::time::Instant::now() < deadline, "the others were not sent");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let refused = d.deliveries(&invites[0]).unwrap().remove(0);
        assert_eq!(refused.state, crate::model::JobState::Deferred);
        assert_eq!(refused.attempts, 1, "tried once, then left to its backoff: {refused:?}");
        shutdown.cancel();
        worker.await.unwrap();
    }

    #[test]
    fn the_reminder_names_the_expiry_and_the_earlier_mail_but_no_secrets() {
        let (d, clock, _) = invited();
        claim_due(&d);
        clock.advance(time::Duration::days(5) + time::Duration::minutes(1));
        let claimed = claim_due(&d).remove(0);
        assert_eq!(claimed.job.kind, JobKind::Reminder);
        let (subject, text) = reminder_text("Example Ltd", &claimed);
        let expires = crate::domain::minute(claimed.invite.expires_at);
        assert_eq!(subject, format!("Reminder: enroll your macOS device before {expires} UTC"));
        assert!(text.starts_with("Hello Ann Lee,") && text.contains(&format!("expires on {expires} UTC")), "{text}");
        assert!(text.contains(&format!("received on {}", claimed.invite.requested_at.date())), "{text}");
        assert!(text.contains("ask Example Ltd to send the invite again"), "{text}");
        assert!(!text.contains("/e/"), "no link in a reminder: {text}");
    }

    #[test]
    fn a_password_link_mail_carries_the_link_and_says_it_works_once() {
        let (d, _clock, id) = invited();
        claim_due(&d);
        d.set_enroll_auth(&admin(), Some(crate::model::EnrollAuth::Password)).unwrap();
        assert_eq!(d.mail_account_link(&Actor::device(None), &id).unwrap(), Ok(()));
        let claimed = claim_due(&d).remove(0);
        assert_eq!((claimed.job.kind, claimed.job.to.as_str()), (JobKind::Account, "ann@example.com"));
        let token = claimed.job.link_token.clone().unwrap();
        let link = format!("https://enroll.local/account/{token}");
        let (subject, text) = account_text("Example Ltd", &claimed, &link);
        assert_eq!(subject, "Example Ltd: set your enrollment password");
        assert!(text.starts_with("Hello Ann Lee,") && text.contains(&link) && text.contains("works once"), "{text}");
        assert!(d.open_account_link(&token).unwrap().is_ok());
    }

    #[test]
    fn the_enrollment_notice_names_user_device_platform_and_time() {
        let (d, _clock, id) = invited();
        claim_due(&d);
        let facts = DeviceFacts {
            name: Some("Ann's MacBook".into()),
            model: Some("MacBookAir10,1".into()),
            serial: Some("C02XK1ABCDEF".into()),
            ..Default::default()
        };
        let device = d.complete_enrollment(&Actor::device(None), &id, &facts).unwrap();
        let claimed = claim_due(&d).remove(0);
        assert_eq!((claimed.job.kind, claimed.job.to.as_str()), (JobKind::Confirmation, "helpdesk@example.com"));
        let (subject, text) = confirmation_text(&claimed);
        assert_eq!(subject, "Device enrolled: Ann Lee (macOS)");
        for line in [
            "User: Ann Lee <ann@example.com>",
            "Device: Ann's MacBook",
            "Model: MacBookAir10,1",
            "Serial number: C02XK1ABCDEF",
            "IMEI: (not reported)",
            "Platform: macOS",
            "Ownership: personal",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        assert!(text.contains(&format!("Enrolled: {} UTC", crate::domain::minute(device.enrolled_at))), "{text}");
    }
}
