//! Outgoing mail: the SMTP relay connection (lettre over rustls, pooled), invite messages with their inline QR
//! code, the outbox worker that delivers queued jobs, and advice for a relay that refuses.

pub mod outbox;
pub mod qr;
pub mod templates;

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::config::{SmtpConfig, SmtpSecurity};
use crate::domain::Attempt;
use templates::Rendered;

/// The Content-ID of the QR code image in invite mails.
pub const QR_CONTENT_ID: &str = "enroll-qr";
/// How long one SMTP conversation step may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error("the invite template does not render: {0}")]
    Template(#[from] templates::TemplateError),
}

/// A connection pool to the office's SMTP relay.
#[derive(Clone)]
pub struct Relay {
    transport: AsyncSmtpTransport<Tokio1Executor>,
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
            if let Some(path) = &settings.ca_file {
                let ca_error = |reason: String| MailError::CaFile { path: path.display().to_string(), reason };
                let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
                let ca = Certificate::from_pem(&pem).map_err(|e| ca_error(format!("not a PEM certificate ({e})")))?;
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
        Ok(Relay { transport: builder.build(), from, reply_to, id_domain, settings: settings.clone() })
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

    /// Hands a message to the relay and says what came of it.
    pub async fn send(&self, message: Message) -> Attempt {
        match self.transport.send(message).await {
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
    if error.is_permanent() {
        Attempt::Permanent(text)
    } else if error.is_transient() || error.is_timeout() || !error.is_response() {
        Attempt::Temporary(text)
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
