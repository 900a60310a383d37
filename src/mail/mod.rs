//! Outgoing mail: the SMTP relay connection (lettre over rustls, pooled), invite messages with their inline QR
//! code, the outbox worker that delivers queued jobs, and advice for a relay that refuses.

pub mod outbox;
pub mod qr;
pub mod sms;
pub mod templates;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{SmsGateway, SmtpConfig, SmtpSecurity};
use crate::domain::{Actor, Attempt, Enrollment};
use crate::naming::Naming;
use templates::{Rendered, Templates};

/// The Content-ID of the QR code image in invite mails.
pub const QR_CONTENT_ID: &str = "enroll-qr";
/// How long connecting to the relay may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one message's whole SMTP conversation may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the relay cannot be set up or a message cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("smtp_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("the mail relay settings are not usable: {0}")]
    Relay(String),
    #[error("the message cannot be built: {0}")]
    Message(String),
    #[error(transparent)]
    Qr(#[from] qr::QrError),
    #[error("the template does not render: {0}")]
    Template(#[from] templates::TemplateError),
    #[error("no mail relay is configured; save one (PUT /api/v1/mail/relay) or set smtp_host in the configuration")]
    NotConfigured,
    #[error(transparent)]
    Domain(#[from] crate::domain::DomainError),
}

/// Settings names under which saved templates are kept.
const TEMPLATE_SETTING: &str = "template.";
/// The setting holding relay settings saved through the API (JSON).
const RELAY_SETTING: &str = "mail.relay";
/// The setting that holds the SMS gateway saved through the Settings page (JSON; `null` for off).
const SMS_SETTING: &str = "mail.sms";

/// Where the relay settings in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RelaySource {
    /// The configuration file or environment (`smtp_*`).
    Configuration,
    /// Saved by an admin through the API; they win over the configuration until removed.
    Api,
}

/// A template as the API shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct TemplateSource {
    /// `invite.subject.txt`, `invite.body.txt` or `invite.body.html`.
    pub name: String,
    /// The source in use.
    pub source: String,
    /// The built-in default, to compare with or go back to.
    pub default_source: String,
    /// Whether an admin saved their own version.
    pub customised: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub updated_at: Option<time::OffsetDateTime>,
    pub updated_by: Option<String>,
}

/// The mail side as the API and the outbox worker share it: the relay and the invite templates in use (swapped
/// when an admin saves one). Cheap to clone.
#[derive(Clone)]
pub struct Mail {
    relay: Arc<ArcSwapOption<Relay>>,
    /// Where the relay settings in use came from.
    relay_source: Arc<ArcSwap<RelaySource>>,
    /// The relay from the configuration file, to go back to when the API's settings are removed.
    configured_relay: Option<Relay>,
    max_connections: usize,
    /// The SMS gateway in use: the one saved through the Settings page, else the configured one.
    sms: Arc<ArcSwapOption<SmsGateway>>,
    templates: Arc<ArcSwap<Templates>>,
    /// The organisation's name and the base of links, as they are when a message is made.
    naming: Naming,
}

impl std::fmt::Debug for Mail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mail")
            .field("relay", &self.relay().map(|r| (r.settings.host.clone(), r.settings.port)))
            .field("public_url", &self.naming.public_url())
            .finish_non_exhaustive()
    }
}

impl Mail {
    /// The relay (the one saved through the API, else the configured one, if any) and the templates saved in the
    /// store (or the defaults).
    pub fn new(
        domain: &Enrollment,
        relay: Option<Relay>,
        sms: Option<SmsGateway>,
        max_connections: usize,
        naming: Naming,
    ) -> Result<Mail, MailError> {
        let max_connections = relay.as_ref().map_or(max_connections, |r| r.max_connections);
        let (in_use, source) = match domain.settings(RELAY_SETTING)?.into_iter().find(|s| s.name == RELAY_SETTING) {
            Some(saved) => match serde_json::from_str::<SmtpConfig>(&saved.value)
                .map_err(|e| MailError::Relay(e.to_string()))
                .and_then(|settings| Relay::new(&settings, max_connections))
            {
                Ok(saved_relay) => (Some(saved_relay), RelaySource::Api),
                Err(error) => {
                    tracing::error!(%error, "the relay saved through the admin API is not usable; using the configuration's");
                    (relay.clone(), RelaySource::Configuration)
                }
            },
            None => (relay.clone(), RelaySource::Configuration),
        };
        let sms = match domain.settings(SMS_SETTING)?.into_iter().find(|s| s.name == SMS_SETTING) {
            Some(saved) => serde_json::from_str::<Option<SmsGateway>>(&saved.value).unwrap_or_else(|error| {
                tracing::error!(%error, "the SMS gateway saved through the Settings page is not readable; using the configuration's");
                sms
            }),
            None => sms,
        };
        let saved = Self::saved(domain)?;
        // Saved templates are checked again: a newer version may have changed what they can use.
        let templates = if saved.is_empty() {
            Templates::defaults()
        } else {
            Templates::new(&saved).unwrap_or_else(|error| {
                tracing::error!(%error, "a saved invite template no longer renders; using the defaults until it is fixed");
                Templates::defaults()
            })
        };
        Ok(Mail {
            relay: Arc::new(ArcSwapOption::from(in_use.map(Arc::new))),
            relay_source: Arc::new(ArcSwap::from_pointee(source)),
            configured_relay: relay,
            max_connections,
            sms: Arc::new(ArcSwapOption::from(sms.map(Arc::new))),
            templates: Arc::new(ArcSwap::from_pointee(templates)),
            naming,
        })
    }

    fn saved(domain: &Enrollment) -> Result<BTreeMap<String, String>, MailError> {
        Ok(domain
            .settings(TEMPLATE_SETTING)?
            .into_iter()
            .map(|s| (s.name.trim_start_matches(TEMPLATE_SETTING).to_owned(), s.value))
            .collect())
    }

    /// No relay and the default templates: for an API built without the daemon (tests).
    pub fn unconfigured() -> Mail {
        Mail {
            relay: Arc::new(ArcSwapOption::empty()),
            relay_source: Arc::new(ArcSwap::from_pointee(RelaySource::Configuration)),
            configured_relay: None,
            max_connections: 4,
            sms: Arc::new(ArcSwapOption::empty()),
            templates: Arc::new(ArcSwap::from_pointee(Templates::defaults())),
            naming: Naming::fixed(),
        }
    }

    /// The organisation's name now (an admin may change it at any time).
    pub fn organisation(&self) -> String {
        self.naming.organisation()
    }

    /// The base of links now (`https://enroll.local`).
    pub fn public_url(&self) -> String {
        self.naming.public_url()
    }

    /// The relay in use now (an admin may change it through the API at any time).
    pub fn relay(&self) -> Option<Arc<Relay>> {
        self.relay.load_full()
    }

    pub fn relay_source(&self) -> RelaySource {
        **self.relay_source.load()
    }

    /// Uses `settings` for the relay from now on (and after restarts), once they make a usable client.
    pub fn save_relay(&self, domain: &Enrollment, actor: &Actor, settings: &SmtpConfig) -> Result<(), MailError> {
        use crate::domain::{multi_line_text, no_control_characters};
        // A line break in a host, an address or a name would end up in an SMTP command or a mail header.
        no_control_characters("host", &settings.host)?;
        no_control_characters("from_address", &settings.from_address)?;
        no_control_characters("from_name", &settings.from_name)?;
        no_control_characters("helo_name", &settings.helo_name)?;
        for (field, value) in
            [("username", &settings.username), ("password", &settings.password), ("reply_to", &settings.reply_to)]
        {
            no_control_characters(field, value.as_deref().unwrap_or_default())?;
        }
        multi_line_text("ca_pem", settings.ca_pem.as_deref().unwrap_or_default())?;
        let relay = Relay::new(settings, self.max_connections)?;
        let json = serde_json::to_string(settings).map_err(|e| MailError::Relay(e.to_string()))?;
        domain.save_setting(actor, RELAY_SETTING, &json)?;
        self.relay.store(Some(Arc::new(relay)));
        self.relay_source.store(Arc::new(RelaySource::Api));
        // Mail that waited for a relay goes now rather than at its next look.
        let woken = domain.wake_waiting()?;
        if woken > 0 {
            tracing::info!(woken, "messages that waited for a mail relay are due now");
        }
        Ok(())
    }

    /// Forgets the relay saved through the API: the configuration file's applies again (or none).
    pub fn reset_relay(&self, domain: &Enrollment, actor: &Actor) -> Result<(), MailError> {
        domain.reset_setting(actor, RELAY_SETTING)?;
        self.relay.store(self.configured_relay.clone().map(Arc::new));
        self.relay_source.store(Arc::new(RelaySource::Configuration));
        Ok(())
    }

    /// The SMS gateway in use now, if any.
    pub fn sms(&self) -> Option<Arc<SmsGateway>> {
        self.sms.load_full()
    }

    /// Uses `gateway` for text messages from now on (and after restarts); `None` turns SMS off. Messages that
    /// waited for a gateway go now.
    pub fn save_sms(&self, domain: &Enrollment, actor: &Actor, gateway: Option<SmsGateway>) -> Result<(), MailError> {
        let json = serde_json::to_string(&gateway).map_err(|e| MailError::Relay(e.to_string()))?;
        domain.save_setting(actor, SMS_SETTING, &json)?;
        let on = gateway.is_some();
        self.sms.store(gateway.map(Arc::new));
        if on {
            domain.wake_waiting()?;
        }
        Ok(())
    }

    pub fn templates(&self) -> Arc<Templates> {
        self.templates.load_full()
    }

    /// Every invite template with its default and who changed it.
    pub fn template_sources(&self, domain: &Enrollment) -> Result<Vec<TemplateSource>, MailError> {
        let saved = domain.settings(TEMPLATE_SETTING)?;
        Ok(templates::PARTS
            .iter()
            .map(|name| {
                let default_source = Templates::default_source(name).unwrap_or_default().to_owned();
                let custom = saved.iter().find(|s| s.name == format!("{TEMPLATE_SETTING}{name}"));
                TemplateSource {
                    name: (*name).to_owned(),
                    source: custom.map_or_else(|| default_source.clone(), |s| s.value.clone()),
                    default_source,
                    customised: custom.is_some(),
                    updated_at: custom.map(|s| s.updated_at),
                    updated_by: custom.map(|s| s.updated_by.clone()),
                }
            })
            .collect())
    }

    /// Saves an admin's version of a template after rendering it, with the others in use, for every platform;
    /// a template that does not render is refused with its line and reason and nothing is saved.
    pub fn save_template(&self, domain: &Enrollment, actor: &Actor, name: &str, source: &str) -> Result<(), MailError> {
        crate::domain::multi_line_text("source", source)?;
        let mut saved = Self::saved(domain)?;
        saved.insert(name.to_owned(), source.to_owned());
        let templates = Templates::new(&saved)?;
        domain.save_setting(actor, &format!("{TEMPLATE_SETTING}{name}"), source)?;
        self.templates.store(Arc::new(templates));
        Ok(())
    }

    /// Goes back to the built-in template.
    pub fn reset_template(&self, domain: &Enrollment, actor: &Actor, name: &str) -> Result<(), MailError> {
        if !templates::PARTS.contains(&name) {
            return Err(MailError::Template(templates::TemplateError {
                part: name.to_owned(),
                line: 0,
                reason: format!("there is no such template; the templates are {}", templates::PARTS.join(", ")),
            }));
        }
        let mut saved = Self::saved(domain)?;
        saved.remove(name);
        let templates = Templates::new(&saved)?;
        domain.reset_setting(actor, &format!("{TEMPLATE_SETTING}{name}"))?;
        self.templates.store(Arc::new(templates));
        Ok(())
    }

    /// Renders the templates in use, with `drafts` (name → source) in place of some, for a platform, with sample
    /// data: what a user would receive.
    pub fn preview(
        &self,
        domain: &Enrollment,
        drafts: &BTreeMap<String, String>,
        platform: crate::model::Platform,
    ) -> Result<Rendered, MailError> {
        let mut sources = Self::saved(domain)?;
        sources.extend(drafts.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut context = templates::InviteContext::sample(platform);
        let organisation = self.organisation();
        if !organisation.is_empty() {
            context.organisation = organisation;
        }
        Ok(Templates::new(&sources)?.render(&context)?)
    }

    /// Sends a short test message to `to` and returns what the relay said (with advice when it refused).
    pub async fn send_test(&self, to: &str) -> Result<Attempt, MailError> {
        let relay = self.relay().ok_or(MailError::NotConfigured)?;
        relay.send_test(to, &self.public_url()).await
    }
}

/// A connection pool to the office's SMTP relay.
#[derive(Clone)]
pub struct Relay {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    max_connections: usize,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    /// The right-hand side of Message-IDs.
    id_domain: String,
    settings: SmtpConfig,
}

impl Relay {
    pub fn new(settings: &SmtpConfig, max_connections: usize) -> Result<Relay, MailError> {
        let tls = || -> Result<TlsParameters, MailError> {
            let mut builder = TlsParameters::builder(settings.host.clone());
            let pem = match (&settings.ca_pem, &settings.ca_file) {
                (Some(pem), _) => Some(("ca_pem".to_owned(), pem.as_bytes().to_vec())),
                (None, Some(path)) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| MailError::CaFile { path: path.display().to_string(), reason: e.to_string() })?;
                    Some((path.display().to_string(), pem))
                }
                (None, None) => None,
            };
            if let Some((path, pem)) = pem {
                use rustls_pki_types::pem::PemObject as _;
                let certificates = rustls_pki_types::CertificateDer::pem_slice_iter(&pem).filter(Result::is_ok).count();
                if certificates == 0 {
                    return Err(MailError::CaFile {
                        path,
                        reason: "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                    });
                }
                let ca = Certificate::from_pem(&pem)
                    .map_err(|e| MailError::CaFile { path, reason: format!("not a PEM certificate ({e})") })?;
                builder = builder.add_root_certificate(ca);
            }
            builder.build_rustls().map_err(|e| MailError::Relay(e.to_string()))
        };
        let tls = match settings.security {
            SmtpSecurity::None => Tls::None,
            SmtpSecurity::StartTls => Tls::Required(tls()?),
            SmtpSecurity::Tls => Tls::Wrapper(tls()?),
        };
        let pool = PoolConfig::new().max_size(u32::try_from(max_connections).unwrap_or(4)).min_idle(0);
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host.clone())
            .port(settings.port)
            .tls(tls)
            .hello_name(ClientId::Domain(settings.helo_name.clone()))
            .timeout(Some(SMTP_TIMEOUT))
            .pool_config(pool);
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        let address =
            |text: &str| text.parse::<lettre::Address>().map_err(|e| MailError::Relay(format!("{text}: {e}")));
        let from_address = address(&settings.from_address)?;
        let id_domain = from_address.domain().to_owned();
        let from = Mailbox::new(Some(settings.from_name.clone()).filter(|n| !n.is_empty()), from_address);
        let reply_to = settings.reply_to.as_deref().map(address).transpose()?.map(|a| Mailbox::new(None, a));
        Ok(Relay { transport: builder.build(), max_connections, from, reply_to, id_domain, settings: settings.clone() })
    }

    pub fn settings(&self) -> &SmtpConfig {
        &self.settings
    }

    /// An invite mail: `multipart/alternative` of the plain text and a `multipart/related` HTML part that carries
    /// the QR code of `link` as an inline PNG, referenced by `cid:`. `message_id` is stable for a delivery job, so
    /// a message sent twice (a crash between the relay's answer and recording it) is recognisable as one.
    pub fn invite_message(
        &self,
        to: &str,
        message_id: &str,
        mail: &Rendered,
        link: &str,
    ) -> Result<Message, MailError> {
        let to = to.parse::<lettre::Address>().map_err(|e| MailError::Message(format!("recipient {to}: {e}")))?;
        let qr = qr::png(link)?;
        let image = Attachment::new_inline(QR_CONTENT_ID.to_owned())
            .body(qr, ContentType::parse("image/png").map_err(|e| MailError::Message(e.to_string()))?);
        let body = MultiPart::alternative()
            .singlepart(SinglePart::plain(mail.text.clone()))
            .multipart(MultiPart::related().singlepart(SinglePart::html(mail.html.clone())).singlepart(image));
        self.builder(message_id)
            .to(Mailbox::new(None, to))
            .subject(mail.subject.clone())
            .multipart(body)
            .map_err(|e| MailError::Message(e.to_string()))
    }

    /// A plain-text message, for test mails and notices.
    pub fn text_message(&self, to: &str, message_id: &str, subject: &str, text: &str) -> Result<Message, MailError> {
        let to = to.parse::<lettre::Address>().map_err(|e| MailError::Message(format!("recipient {to}: {e}")))?;
        self.builder(message_id)
            .to(Mailbox::new(None, to))
            .subject(subject)
            .singlepart(SinglePart::plain(text.to_owned()))
            .map_err(|e| MailError::Message(e.to_string()))
    }

    fn builder(&self, message_id: &str) -> lettre::message::MessageBuilder {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .message_id(Some(format!("<{message_id}@{}>", self.id_domain)))
            .user_agent(concat!("enrolld/", env!("CARGO_PKG_VERSION")).to_owned());
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        builder
    }

    /// Sends a short test message to `to` now and returns what the relay said (with advice when it refused).
    pub async fn send_test(&self, to: &str, public_url: &str) -> Result<Attempt, MailError> {
        let id: String = crate::domain::random_bytes::<8>().iter().map(|b| format!("{b:02x}")).collect();
        let text = format!(
            "This is a test message from enrolld ({public_url}).\n\nIf you can read it, invites will reach your users through {}.\n",
            self.settings.host
        );
        let message = self.text_message(to, &format!("test.{id}"), "enrolld test message", &text)?;
        Ok(self.send(message).await)
    }

    /// Hands a message to the relay and says what came of it. lettre's own timeout covers only the connect, so the
    /// whole conversation is bounded here: a relay that accepts and then says nothing cannot hold a slot forever.
    pub async fn send(&self, message: Message) -> Attempt {
        let sent = match tokio::time::timeout(SEND_TIMEOUT, self.transport.send(message)).await {
            Ok(sent) => sent,
            Err(_) => {
                let (host, port) = (&self.settings.host, self.settings.port);
                let hint = if port == 465 && self.settings.security != SmtpSecurity::Tls {
                    "; port 465 expects TLS from the start: use smtp_security = \"tls\""
                } else {
                    ""
                };
                return Attempt::Unreachable(format!(
                    "{host}:{port} did not finish the SMTP conversation within {} s{hint}",
                    SEND_TIMEOUT.as_secs()
                ));
            }
        };
        match sent {
            Ok(response) => {
                let lines: Vec<&str> = response.message().collect();
                Attempt::Sent(format!("{} {}", response.code(), lines.join(" ")).trim().to_owned())
            }
            Err(error) => classify(&error, &self.settings),
        }
    }
}

/// Sorts a failed send into temporary (try again) and permanent (give up), with advice a person can act on.
fn classify(error: &lettre::transport::smtp::Error, settings: &SmtpConfig) -> Attempt {
    let advice = advice(error, settings);
    let text = match advice {
        Some(advice) => format!("{error} — {advice}"),
        None => error.to_string(),
    };
    // A refusal of the relay itself (sign-in, relaying, a peer that does not speak SMTP) is not about this message:
    // every other one would fail the same way, so it is retried and pauses the queue until the settings are fixed.
    let code = error.status().map(|c| c.to_string()).unwrap_or_default();
    let relay_refused = matches!(code.as_str(), "530" | "534" | "535" | "538" | "454")
        || (error.is_permanent() && error.to_string().to_lowercase().contains("relay access denied"));
    if relay_refused || error.is_response() {
        Attempt::Unreachable(text)
    } else if error.is_permanent() {
        Attempt::Permanent(text)
    } else if error.is_transient() {
        Attempt::Temporary(text)
    } else if error.is_timeout() || !error.is_response() {
        Attempt::Unreachable(text)
    } else {
        Attempt::Permanent(text)
    }
}

/// What to do about a relay's refusal, when the reply says enough to tell.
pub fn advice(error: &lettre::transport::smtp::Error, settings: &SmtpConfig) -> Option<String> {
    let text = error.to_string().to_lowercase();
    let source = std::error::Error::source(error).map(|s| s.to_string().to_lowercase()).unwrap_or_default();
    let host = &settings.host;
    let port = settings.port;
    let code = error.status().map(|c| c.to_string()).unwrap_or_default();
    if source.contains("failed to lookup")
        || source.contains("name or service not known")
        || source.contains("no address")
    {
        return Some(format!("the name {host} does not resolve; check smtp_host and the box's DNS server"));
    }
    if source.contains("connection refused") {
        return Some(format!("nothing accepts connections on {host} port {port}; check smtp_host and smtp_port"));
    }
    if error.is_tls() || text.contains("tls") || source.contains("certificate") {
        return Some(match settings.security {
            SmtpSecurity::Tls => format!(
                "TLS with {host}:{port} failed; port 587 (and 25) speak STARTTLS, not TLS from the start: use smtp_security = \"starttls\", or port 465 for \"tls\"; if the relay's certificate comes from an internal CA, give it in smtp_ca_file"
            ),
            _ => format!(
                "the TLS handshake with {host} failed; if the relay's certificate comes from an internal CA, give that CA in smtp_ca_file"
            ),
        });
    }
    if (error.is_timeout() || error.is_response()) && port == 465 && settings.security != SmtpSecurity::Tls {
        return Some(format!(
            "{host}:{port} did not answer like a plain SMTP server; port 465 expects TLS from the start: use smtp_security = \"tls\""
        ));
    }
    match code.as_str() {
        "535" | "534" | "530" => Some(
            "the relay refused the sign-in; check smtp_username and the password (some providers need an app password)"
                .to_owned(),
        ),
        "550" | "551" | "553" | "554" if text.contains("relay") => Some(format!(
            "the relay does not accept mail for other domains from this box; allow its address to relay, or sign in (smtp_username) as a user allowed to send as {}",
            settings.from_address
        )),
        "550" | "551" | "553" => {
            Some("the relay rejected the recipient; check the user's email address and resend".to_owned())
        }
        _ => None,
    }
}
