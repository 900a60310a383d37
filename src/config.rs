//! Configuration in layers: built-in defaults, then the TOML file, then `ENROLLD_*` variables, then flags.
//!
//! Every key is listed once in [`KEYS`]; the file, the environment and the flags are all read against that list,
//! so an unknown key or a bad value is reported with the layer it came from and what to write instead.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

/// Where the configuration file is looked for when `--config` is not given; used only if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/enrolld/enrolld.toml";
/// The state directory when neither the configuration nor systemd's `STATE_DIRECTORY` names one.
pub const DEFAULT_STATE_DIR: &str = "./enrolld-data";
/// Prefix of the environment variables that configure enrolld.
pub const ENV_PREFIX: &str = "ENROLLD_";

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The box's name on the LAN, without `.local`.
    pub hostname: String,
    /// Names and addresses the TLS certificate carries besides the ones enrolld finds itself.
    pub extra_sans: Vec<SubjectName>,
    pub https_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub mdns: bool,
    pub tls: TlsSource,
    /// A `tracing` filter directive such as `info` or `enrolld=debug,info`.
    pub log_level: String,
    /// How often the HTTPS certificate is checked against the clock and the box's addresses.
    pub cert_check_interval: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// Largest CSV file an admin may upload.
    pub import_max_bytes: usize,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub shutdown_grace: Duration,
    /// Time limits and caps for client connections; `max_connections` is further bounded by the open-file limit
    /// at start.
    pub connections: ConnectionLimits,
    /// The first admin's username, created at first start.
    pub admin_user: String,
    /// The first admin's password (from `ENROLLD_ADMIN_PASSWORD` or `admin_password_file`); without it, the first
    /// visit asks for the setup code enrolld logs.
    pub admin_password: Option<String>,
    /// How long an invite link is valid after it is sent.
    pub invite_validity: Duration,
    /// How long an admin session or token lasts.
    pub session_ttl: Duration,
    /// How users authenticate on the enrollment page, until an admin saves another choice.
    pub enroll_auth: crate::model::EnrollAuth,
    /// Where to keep a text for the box's console (the address to open, the setup code, a clock problem), in the
    /// form agetty shows above the login prompt; `None` for no such file.
    pub console_file: Option<PathBuf>,
    /// What the clock must be before enrolld makes keys, issues certificates or computes expiries.
    pub clock_check: crate::clock::ClockCheck,
    /// How invites and other messages are sent.
    pub mail: MailConfig,
    /// Apple's push service: where MDM pushes go.
    pub apns: ApnsConfig,
    /// What the appliance image runs (`VERSION=`, `ARCH=`, written by image/build); upgrades from the admin pages are
    /// offered only when it exists.
    pub release_file: PathBuf,
}

/// Where Apple MDM pushes go. Apple's production gateway unless a test (or a proxy) says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsConfig {
    /// `https://host[:port]`, without a path.
    pub url: String,
    /// A CA (PEM) to trust for the gateway besides the public roots.
    pub ca_file: Option<PathBuf>,
}

/// How enrolld sends mail: the office's SMTP relay and the outbox's pace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailConfig {
    /// The organisation's name as invites show it.
    pub organisation: String,
    /// The base of enrollment links as set, such as `https://enroll.example.com`; see [`Config::public_url`].
    pub public_url: Option<String>,
    /// The relay; `None` until `smtp_host` is set (messages wait in the outbox meanwhile).
    pub smtp: Option<SmtpConfig>,
    /// Connections (and so messages in flight) to the relay at once.
    pub max_connections: usize,
    /// Messages a second at most, so a long queue does not flood the relay.
    pub max_per_second: u32,
    /// The wait after a first temporary failure; it doubles with each further one, up to an hour.
    pub retry_first: Duration,
    /// How long after it was queued a message is given up.
    pub retry_horizon: Duration,
    /// The SMS gateway, if any; without one, SMS jobs fail with a reply saying so.
    pub sms: Option<SmsGateway>,
    /// Days before a pending invite expires that a reminder goes; 0 for none.
    pub reminder_days: u32,
    /// Who is told by mail when a device enrolls.
    pub confirmation_to: Vec<String>,
    /// Whether the user is told too.
    pub confirmation_to_user: bool,
}

/// How text messages are sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmsGateway {
    /// An HTTP API: one request per message.
    Http(HttpGateway),
    /// Mail to `<digits>@<domain>` through the SMTP relay (many carriers and SMS providers offer this).
    Email { domain: String },
}

/// A generic HTTP SMS API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HttpGateway {
    /// `http://` or `https://` URL.
    pub url: String,
    /// `POST` (default), `PUT` or `GET`.
    pub method: String,
    /// Extra headers, such as `Authorization: Bearer …`, as (name, value).
    pub headers: Vec<(String, String)>,
    /// The request body, a minijinja template over `to`, `text` and their `_json` and `_url` encodings.
    pub body: String,
    /// Text the response body must contain for the message to count as sent (besides a 2xx status).
    pub success_contains: Option<String>,
}

impl HttpGateway {
    /// A request body: `template` over the number and the text, raw (`to`, `text`), as JSON strings (`to_json`,
    /// `text_json`, quotes included) and form-encoded (`to_url`, `text_url`). Undefined variables are errors.
    pub fn render_body(template: &str, to: &str, text: &str) -> Result<String, minijinja::Error> {
        let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let url = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let values = minijinja::Value::from_pairs([
            ("to", to.to_owned()),
            ("text", text.to_owned()),
            ("to_json", json(to)),
            ("text_json", json(text)),
            ("to_url", url(to)),
            ("text_url", url(text)),
        ]);
        env.render_str(template, values)
    }
}

/// The office's SMTP relay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sender address, such as `it@example.com`.
    pub from_address: String,
    pub from_name: String,
    pub reply_to: Option<String>,
    /// The name enrolld gives in EHLO.
    pub helo_name: String,
    /// An extra CA (PEM) to trust for the relay's certificate, besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// The same as PEM text, when the settings came through the admin API (used before `ca_file`).
    #[serde(default)]
    pub ca_pem: Option<String>,
}

/// How the connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP (port 25 on a trusted LAN).
    None,
    /// STARTTLS, required (port 587).
    StartTls,
    /// TLS from the first byte, "SMTPS" (port 465).
    Tls,
}

impl SmtpSecurity {
    pub fn as_str(self) -> &'static str {
        match self {
            SmtpSecurity::None => "none",
            SmtpSecurity::StartTls => "starttls",
            SmtpSecurity::Tls => "tls",
        }
    }
    /// The usual port for this kind of connection.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::None => 25,
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Tls => 465,
        }
    }
}

/// A name a certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectName {
    Dns(String),
    Ip(IpAddr),
}

impl fmt::Display for SubjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectName::Dns(name) => f.write_str(name),
            SubjectName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Where the HTTPS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Issued by the appliance's own CA and renewed by enrolld.
    SelfIssued,
    /// Supplied by the admin as PEM files (certificate chain and private key).
    Files { cert: PathBuf, key: PathBuf },
}

impl Config {
    /// The `.local` name the box announces over mDNS.
    pub fn mdns_name(&self) -> String {
        format!("{}.local", self.hostname)
    }

    /// The base of enrollment links: `public_url` if set, else the `.local` name with the HTTPS port the daemon
    /// actually listens on (left out when it is 443).
    pub fn public_url(&self, https_port: Option<u16>) -> String {
        match (&self.mail.public_url, https_port) {
            (Some(url), _) => url.clone(),
            (None, Some(443) | None) => format!("https://{}", self.mdns_name()),
            (None, Some(port)) => format!("https://{}:{port}", self.mdns_name()),
        }
    }
}

/// The flags that override configuration, shared by every subcommand that reads it.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// Configuration file (TOML). Default: /etc/enrolld/enrolld.toml, if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where enrolld keeps its database, CA and certificates.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address for HTTPS, such as [::]:443, or `off`.
    #[arg(long, value_name = "ADDR")]
    pub https_listen: Option<String>,
    /// Address for plain HTTP (redirects to HTTPS; serves /healthz and /ca.crt), or `off`.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// The box's name on the LAN; it is reachable as NAME.local.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Another DNS name or IP address for the TLS certificate (repeatable).
    #[arg(long = "extra-san", value_name = "NAME")]
    pub extra_san: Vec<String>,
    /// Do not announce the box over mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Use this PEM certificate chain instead of the self-issued one (needs --tls-key).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// A file holding the first admin's password (used at first start only).
    #[arg(long, value_name = "FILE")]
    pub admin_password_file: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a directive such as `enrolld=debug,info`.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Keep the address to open and the setup code in FILE, for the box's console (agetty's issue format).
    #[arg(long, value_name = "FILE")]
    pub console_file: Option<PathBuf>,
    /// What the clock must be before enrolld issues certificates: plausible, or synchronised (NTP or a hardware
    /// clock).
    #[arg(long, value_name = "CHECK")]
    pub clock_check: Option<String>,
}

/// Why the configuration cannot be used. Each message is one line that names the key, the value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given with --config or ENROLLD_CONFIG")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML at line {line}: {message}; fix that line")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("unknown key `{key}` {origin}; remove it or use one of: {known}")]
    UnknownKey { key: String, origin: Origin, known: String },
    #[error("invalid value {value} for `{key}` {origin}: {reason}")]
    Invalid { key: &'static str, value: String, origin: Origin, reason: String },
    #[error("{0}")]
    Conflict(String),
}

/// Which layer a setting came from, for error messages and `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File { path: PathBuf, line: Option<usize> },
    Env(String),
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("(built-in default)"),
            Origin::File { path, line: Some(line) } => write!(f, "in {} line {line}", path.display()),
            Origin::File { path, line: None } => write!(f, "in {}", path.display()),
            Origin::Env(var) => write!(f, "from environment variable {var}"),
            Origin::Flag(flag) => write!(f, "from {flag}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Bool,
    Integer,
    List,
}

struct Key {
    name: &'static str,
    kind: Kind,
    flag: &'static str,
}

/// Where the appliance image says what it is.
pub const DEFAULT_RELEASE_FILE: &str = "/etc/enrolld-release";

/// How long a connection may take at each step, and how many may be open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// To finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// To send a request's header (HTTP/1.1; hyper counts the wait for the next request on a kept-alive
    /// connection as part of it).
    pub header_read_timeout: Duration,
    /// With no request in flight, before the connection is closed (HTTP/1.1 and HTTP/2).
    pub idle_timeout: Duration,
    /// Open connections, every listener together (those still in their TLS handshake included).
    pub max_connections: usize,
    /// Open connections from one client address (an IPv6 client: its /64).
    pub max_per_address: usize,
}

/// Apple's production push gateway.
pub const APNS_PRODUCTION: &str = "https://api.push.apple.com";

/// Every configuration key. The environment variable is `ENROLLD_` + the name in capitals.
const KEYS: &[Key] = &[
    Key { name: "state_dir", kind: Kind::Text, flag: "--state-dir" },
    Key { name: "hostname", kind: Kind::Text, flag: "--hostname" },
    Key { name: "extra_sans", kind: Kind::List, flag: "--extra-san" },
    Key { name: "https_listen", kind: Kind::Text, flag: "--https-listen" },
    Key { name: "http_listen", kind: Kind::Text, flag: "--http-listen" },
    Key { name: "mdns", kind: Kind::Bool, flag: "--no-mdns" },
    Key { name: "tls_cert", kind: Kind::Text, flag: "--tls-cert" },
    Key { name: "tls_key", kind: Kind::Text, flag: "--tls-key" },
    Key { name: "log_level", kind: Kind::Text, flag: "--log-level" },
    Key { name: "console_file", kind: Kind::Text, flag: "--console-file" },
    Key { name: "clock_check", kind: Kind::Text, flag: "--clock-check" },
    Key { name: "cert_check_interval_secs", kind: Kind::Integer, flag: "" },
    Key { name: "request_timeout_secs", kind: Kind::Integer, flag: "" },
    Key { name: "max_body_bytes", kind: Kind::Integer, flag: "" },
    Key { name: "import_max_bytes", kind: Kind::Integer, flag: "" },
    Key { name: "shutdown_grace_secs", kind: Kind::Integer, flag: "" },
    Key { name: "tls_handshake_timeout_secs", kind: Kind::Integer, flag: "" },
    Key { name: "header_read_timeout_secs", kind: Kind::Integer, flag: "" },
    Key { name: "idle_timeout_secs", kind: Kind::Integer, flag: "" },
    Key { name: "max_connections", kind: Kind::Integer, flag: "" },
    Key { name: "max_connections_per_address", kind: Kind::Integer, flag: "" },
    Key { name: "admin_user", kind: Kind::Text, flag: "" },
    Key { name: "admin_password", kind: Kind::Text, flag: "" },
    Key { name: "admin_password_file", kind: Kind::Text, flag: "--admin-password-file" },
    Key { name: "invite_validity_days", kind: Kind::Integer, flag: "" },
    Key { name: "session_ttl_hours", kind: Kind::Integer, flag: "" },
    Key { name: "enroll_auth", kind: Kind::Text, flag: "" },
    Key { name: "organisation", kind: Kind::Text, flag: "" },
    Key { name: "public_url", kind: Kind::Text, flag: "" },
    Key { name: "smtp_host", kind: Kind::Text, flag: "" },
    Key { name: "smtp_port", kind: Kind::Integer, flag: "" },
    Key { name: "smtp_security", kind: Kind::Text, flag: "" },
    Key { name: "smtp_username", kind: Kind::Text, flag: "" },
    Key { name: "smtp_password", kind: Kind::Text, flag: "" },
    Key { name: "smtp_password_file", kind: Kind::Text, flag: "" },
    Key { name: "smtp_ca_file", kind: Kind::Text, flag: "" },
    Key { name: "smtp_helo_name", kind: Kind::Text, flag: "" },
    Key { name: "mail_from", kind: Kind::Text, flag: "" },
    Key { name: "mail_from_name", kind: Kind::Text, flag: "" },
    Key { name: "mail_reply_to", kind: Kind::Text, flag: "" },
    Key { name: "mail_max_connections", kind: Kind::Integer, flag: "" },
    Key { name: "mail_max_per_second", kind: Kind::Integer, flag: "" },
    Key { name: "mail_retry_first_secs", kind: Kind::Integer, flag: "" },
    Key { name: "mail_retry_hours", kind: Kind::Integer, flag: "" },
    Key { name: "invite_reminder_days", kind: Kind::Integer, flag: "" },
    Key { name: "confirmation_to", kind: Kind::List, flag: "" },
    Key { name: "confirmation_to_user", kind: Kind::Bool, flag: "" },
    Key { name: "sms_gateway", kind: Kind::Text, flag: "" },
    Key { name: "sms_http_url", kind: Kind::Text, flag: "" },
    Key { name: "sms_http_method", kind: Kind::Text, flag: "" },
    Key { name: "sms_http_headers", kind: Kind::List, flag: "" },
    Key { name: "sms_http_body", kind: Kind::Text, flag: "" },
    Key { name: "sms_http_success_contains", kind: Kind::Text, flag: "" },
    Key { name: "sms_email_domain", kind: Kind::Text, flag: "" },
    Key { name: "apns_url", kind: Kind::Text, flag: "" },
    Key { name: "apns_ca_file", kind: Kind::Text, flag: "" },
    Key { name: "release_file", kind: Kind::Text, flag: "" },
];

/// Environment variables that are not configuration keys but are still ours: the configuration file, the backup
/// passphrase, and for tests only, where to look for the clock's synchronisation markers instead of `/`
/// (`daemon::TEST_CLOCK_ROOT_ENV`).
const OTHER_ENV: &[&str] = &["ENROLLD_CONFIG", "ENROLLD_BACKUP_PASSPHRASE", "ENROLLD_TEST_CLOCK_ROOT"];

#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Text(String),
    Bool(bool),
    Integer(i64),
    List(Vec<String>),
}

impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Text(text) => write!(f, "{text:?}"),
            Raw::Bool(value) => write!(f, "{value}"),
            Raw::Integer(value) => write!(f, "{value}"),
            Raw::List(items) => write!(f, "{items:?}"),
        }
    }
}

/// The settings gathered from every layer, each with the layer it came from.
#[derive(Debug, Default)]
pub struct Layers {
    settings: BTreeMap<&'static str, (Raw, Origin)>,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
}

impl Layers {
    /// Reads the file, the environment and the flags. `env` is the process environment (passed in for tests).
    pub fn gather(
        args: &ConfigArgs,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Layers, ConfigError> {
        let mut ours = BTreeMap::new();
        for (key, value) in env {
            let Some(key) = key.to_str().filter(|k| k.starts_with(ENV_PREFIX)).map(str::to_owned) else { continue };
            let value = value.into_string().map_err(|value| ConfigError::Invalid {
                key: "environment",
                value: value.to_string_lossy().into_owned(),
                origin: Origin::Env(key.clone()),
                reason: "it is not valid UTF-8; set it again with plain text".into(),
            })?;
            ours.insert(key, value);
        }
        let env = ours;
        let mut layers = Layers::default();

        let file = match (&args.config, env.get("ENROLLD_CONFIG")) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(path)) => Some(PathBuf::from(path)),
            (None, None) => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            layers.read_file(&path, &text)?;
            layers.file = Some(path);
        }
        layers.read_env(&env)?;
        layers.read_flags(args)?;
        Ok(layers)
    }

    fn read_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.to_owned(),
            line: error.span().map_or(1, |span| line_of_offset(text, span.start)),
            message: error.message().trim().to_owned(),
        })?;
        for (name, value) in table {
            let line = line_of_key(text, &name);
            let origin = Origin::File { path: path.to_owned(), line };
            let Some(key) = find_key(&name) else {
                return Err(ConfigError::UnknownKey { key: name, origin, known: known_keys() });
            };
            let raw = raw_from_toml(key, value, &origin)?;
            self.settings.insert(key.name, (raw, origin));
        }
        Ok(())
    }

    fn read_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for (var, value) in env {
            if OTHER_ENV.contains(&var.as_str()) {
                continue;
            }
            let name = var[ENV_PREFIX.len()..].to_ascii_lowercase();
            let origin = Origin::Env(var.clone());
            let Some(key) = find_key(&name) else {
                return Err(ConfigError::UnknownKey {
                    key: var.clone(),
                    origin,
                    known: KEYS
                        .iter()
                        .map(|k| format!("{ENV_PREFIX}{}", k.name.to_ascii_uppercase()))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            let raw = raw_from_text(key, value, &origin)?;
            self.settings.insert(key.name, (raw, origin));
        }
        Ok(())
    }

    fn read_flags(&mut self, args: &ConfigArgs) -> Result<(), ConfigError> {
        let mut set = |name: &'static str, raw: Raw| {
            let flag = find_key(name).map_or("", |key| key.flag);
            self.settings.insert(name, (raw, Origin::Flag(flag)));
        };
        let path_text = |path: &PathBuf| Raw::Text(path.to_string_lossy().into_owned());
        if let Some(dir) = &args.state_dir {
            set("state_dir", path_text(dir));
        }
        if let Some(addr) = &args.https_listen {
            set("https_listen", Raw::Text(addr.clone()));
        }
        if let Some(addr) = &args.http_listen {
            set("http_listen", Raw::Text(addr.clone()));
        }
        if let Some(name) = &args.hostname {
            set("hostname", Raw::Text(name.clone()));
        }
        if !args.extra_san.is_empty() {
            set("extra_sans", Raw::List(args.extra_san.clone()));
        }
        if args.no_mdns {
            set("mdns", Raw::Bool(false));
        }
        if let Some(path) = &args.tls_cert {
            set("tls_cert", path_text(path));
        }
        if let Some(path) = &args.tls_key {
            set("tls_key", path_text(path));
        }
        if let Some(level) = &args.log_level {
            set("log_level", Raw::Text(level.clone()));
        }
        if let Some(path) = &args.admin_password_file {
            set("admin_password_file", path_text(path));
        }
        if let Some(path) = &args.console_file {
            set("console_file", path_text(path));
        }
        if let Some(check) = &args.clock_check {
            set("clock_check", Raw::Text(check.clone()));
        }
        Ok(())
    }

    /// Every key with its effective value and origin, for `check-config`.
    pub fn describe(&self, config: &Config) -> Vec<(String, String, String)> {
        let value_of = |name: &str| -> String {
            match name {
                "state_dir" => config.state_dir.display().to_string(),
                "hostname" => config.hostname.clone(),
                "extra_sans" => config.extra_sans.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                "https_listen" => listen_text(config.https_listen),
                "http_listen" => listen_text(config.http_listen),
                "mdns" => config.mdns.to_string(),
                "tls_cert" | "tls_key" => match &config.tls {
                    TlsSource::SelfIssued => "(self-issued)".to_owned(),
                    TlsSource::Files { cert, key } => {
                        if name == "tls_cert" {
                            cert.display().to_string()
                        } else {
                            key.display().to_string()
                        }
                    }
                },
                "log_level" => config.log_level.clone(),
                "console_file" => config.console_file.as_ref().map_or("(none)".into(), |p| p.display().to_string()),
                "clock_check" => config.clock_check.as_str().to_owned(),
                "cert_check_interval_secs" => config.cert_check_interval.as_secs().to_string(),
                "request_timeout_secs" => config.request_timeout.as_secs().to_string(),
                "max_body_bytes" => config.max_body_bytes.to_string(),
                "import_max_bytes" => config.import_max_bytes.to_string(),
                "shutdown_grace_secs" => config.shutdown_grace.as_secs().to_string(),
                "tls_handshake_timeout_secs" => config.connections.handshake_timeout.as_secs().to_string(),
                "header_read_timeout_secs" => config.connections.header_read_timeout.as_secs().to_string(),
                "idle_timeout_secs" => config.connections.idle_timeout.as_secs().to_string(),
                "max_connections" => config.connections.max_connections.to_string(),
                "max_connections_per_address" => config.connections.max_per_address.to_string(),
                "admin_user" => config.admin_user.clone(),
                "admin_password" | "admin_password_file" => {
                    if config.admin_password.is_some() {
                        "(set)".to_owned()
                    } else {
                        "(not set)".to_owned()
                    }
                }
                "invite_validity_days" => (config.invite_validity.as_secs() / 86_400).to_string(),
                "session_ttl_hours" => (config.session_ttl.as_secs() / 3_600).to_string(),
                "organisation" => config.mail.organisation.clone(),
                "enroll_auth" => config.enroll_auth.to_string(),
                "apns_url" => config.apns.url.clone(),
                "apns_ca_file" => {
                    config.apns.ca_file.as_ref().map_or("(public roots only)".into(), |p| p.display().to_string())
                }
                "release_file" => config.release_file.display().to_string(),
                "public_url" => config.public_url(config.https_listen.map(|a| a.port())),
                "mail_max_connections" => config.mail.max_connections.to_string(),
                "mail_max_per_second" => config.mail.max_per_second.to_string(),
                "mail_retry_first_secs" => config.mail.retry_first.as_secs().to_string(),
                "mail_retry_hours" => (config.mail.retry_horizon.as_secs() / 3_600).to_string(),
                "invite_reminder_days" => config.mail.reminder_days.to_string(),
                "confirmation_to" => config.mail.confirmation_to.join(", "),
                "confirmation_to_user" => config.mail.confirmation_to_user.to_string(),
                sms_key if sms_key.starts_with("sms_") => match (&config.mail.sms, sms_key) {
                    (None, "sms_gateway") => "off".to_owned(),
                    (None, _) => "(not used)".to_owned(),
                    (Some(SmsGateway::Email { .. }), "sms_gateway") => "email".to_owned(),
                    (Some(SmsGateway::Email { domain }), "sms_email_domain") => domain.clone(),
                    (Some(SmsGateway::Email { .. }), _) => "(not used)".to_owned(),
                    (Some(SmsGateway::Http(_)), "sms_gateway") => "http".to_owned(),
                    (Some(SmsGateway::Http(http)), "sms_http_url") => http.url.clone(),
                    (Some(SmsGateway::Http(http)), "sms_http_method") => http.method.clone(),
                    (Some(SmsGateway::Http(http)), "sms_http_headers") => {
                        http.headers.iter().map(|(name, _)| format!("{name}: (hidden)")).collect::<Vec<_>>().join(", ")
                    }
                    (Some(SmsGateway::Http(http)), "sms_http_body") => http.body.clone(),
                    (Some(SmsGateway::Http(http)), "sms_http_success_contains") => {
                        http.success_contains.clone().unwrap_or_else(|| "(any 2xx answer)".into())
                    }
                    (Some(SmsGateway::Http(_)), _) => "(not used)".to_owned(),
                },
                smtp_key if smtp_key.starts_with("smtp_") || smtp_key.starts_with("mail_") => {
                    let Some(smtp) = &config.mail.smtp else { return "(not set: mail waits in the outbox)".to_owned() };
                    match smtp_key {
                        "smtp_host" => smtp.host.clone(),
                        "smtp_port" => smtp.port.to_string(),
                        "smtp_security" => smtp.security.as_str().to_owned(),
                        "smtp_username" => smtp.username.clone().unwrap_or_else(|| "(none)".into()),
                        "smtp_password" | "smtp_password_file" => {
                            if smtp.password.is_some() {
                                "(set)".into()
                            } else {
                                "(not set)".into()
                            }
                        }
                        "smtp_ca_file" => {
                            smtp.ca_file.as_ref().map_or("(public roots only)".into(), |p| p.display().to_string())
                        }
                        "smtp_helo_name" => smtp.helo_name.clone(),
                        "mail_from" => smtp.from_address.clone(),
                        "mail_from_name" => smtp.from_name.clone(),
                        "mail_reply_to" => smtp.reply_to.clone().unwrap_or_else(|| "(none)".into()),
                        _ => String::new(),
                    }
                }
                _ => String::new(),
            }
        };
        KEYS.iter()
            .map(|key| {
                let origin = self.settings.get(key.name).map_or(Origin::Default, |(_, o)| o.clone());
                (key.name.to_owned(), value_of(key.name), origin.to_string())
            })
            .collect()
    }

    /// Validates the gathered settings into a [`Config`]. `systemd_state_dir` is `$STATE_DIRECTORY`, if set.
    pub fn resolve(&self, systemd_state_dir: Option<&str>) -> Result<Config, ConfigError> {
        let default_state_dir = systemd_state_dir
            .and_then(|dirs| dirs.split(':').next())
            .filter(|dir| !dir.is_empty())
            .unwrap_or(DEFAULT_STATE_DIR);
        let state_dir = PathBuf::from(self.text("state_dir").unwrap_or(default_state_dir));
        if state_dir.as_os_str().is_empty() {
            return Err(self.invalid("state_dir", "it is empty; name a directory enrolld may write to"));
        }

        // DNS names compare case-insensitively and certificates store them lower-cased.
        let hostname = self.text("hostname").unwrap_or("enroll").to_ascii_lowercase();
        validate_hostname(&hostname).map_err(|reason| self.invalid("hostname", &reason))?;

        let mut extra_sans = Vec::new();
        for item in self.list("extra_sans") {
            let name = parse_subject_name(item).map_err(|reason| self.invalid("extra_sans", &reason))?;
            extra_sans.push(name);
        }

        let https_listen = self.listen("https_listen", "[::]:8443")?;
        let http_listen = self.listen("http_listen", "[::]:8080")?;
        match (https_listen, http_listen) {
            (None, None) => {
                return Err(ConfigError::Conflict(
                    "https_listen and http_listen are both off, so enrolld would serve nothing; turn one on".into(),
                ));
            }
            (Some(a), Some(b))
                if a.port() != 0
                    && a.port() == b.port()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()) =>
            {
                return Err(ConfigError::Conflict(format!(
                    "https_listen {a} and http_listen {b} use the same port; give plain HTTP another port (such as 80 or 8080)"
                )));
            }
            _ => {}
        }

        let tls = match (self.text("tls_cert"), self.text("tls_key")) {
            (None, None) => TlsSource::SelfIssued,
            (Some(cert), Some(key)) => TlsSource::Files { cert: cert.into(), key: key.into() },
            (Some(_), None) => {
                return Err(ConfigError::Conflict(
                    "tls_cert is set but tls_key is not; give both (--tls-cert and --tls-key) or neither".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Conflict(
                    "tls_key is set but tls_cert is not; give both (--tls-cert and --tls-key) or neither".into(),
                ));
            }
        };

        let log_level = self.text("log_level").unwrap_or("info").to_owned();
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
            return Err(self.invalid(
                "log_level",
                &format!("{error}; use error, warn, info, debug or trace, or a directive such as enrolld=debug,info"),
            ));
        }

        let admin_password = match (self.text("admin_password"), self.text("admin_password_file")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "admin_password and admin_password_file are both set; keep one".into(),
                ));
            }
            (Some(password), None) => Some(password.to_owned()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    self.invalid(
                        "admin_password_file",
                        &format!("cannot read it ({error}); check the path and permissions"),
                    )
                })?;
                Some(text.trim_end_matches(['\n', '\r']).to_owned())
            }
            (None, None) => None,
        };
        if admin_password.as_ref().is_some_and(|p| p.chars().count() < crate::domain::auth::MIN_PASSWORD_CHARS) {
            let key = if self.text("admin_password").is_some() { "admin_password" } else { "admin_password_file" };
            return Err(ConfigError::Invalid {
                key,
                value: "(hidden)".into(),
                origin: self.get(key).map_or(Origin::Default, |(_, o)| o.clone()),
                reason: format!("the password is shorter than {} characters", crate::domain::auth::MIN_PASSWORD_CHARS),
            });
        }

        let console_file = self.text("console_file").map(str::trim).filter(|p| !p.is_empty()).map(PathBuf::from);
        let clock_check = match self.text("clock_check") {
            None => crate::clock::ClockCheck::Plausible,
            Some(text) => text.parse().map_err(|reason: String| {
                self.invalid(
                    "clock_check",
                    &format!("{reason} (synchronised waits for NTP or a hardware clock, for boards without one)"),
                )
            })?,
        };

        let mail = self.mail(&hostname)?;
        let validity_days = self.integer("invite_validity_days", 7, 1..=90)?;
        if u64::from(mail.reminder_days) >= validity_days {
            return Err(self.invalid(
                "invite_reminder_days",
                &format!("a reminder {} days before expiry would go before the invite; use fewer days than invite_validity_days ({validity_days}), or 0 for none", mail.reminder_days),
            ));
        }

        Ok(Config {
            state_dir,
            hostname,
            extra_sans,
            https_listen,
            http_listen,
            mdns: self.bool("mdns").unwrap_or(true),
            tls,
            log_level,
            cert_check_interval: Duration::from_secs(self.integer("cert_check_interval_secs", 60, 1..=86_400)?),
            request_timeout: Duration::from_secs(self.integer("request_timeout_secs", 30, 1..=3_600)?),
            max_body_bytes: usize::try_from(self.integer("max_body_bytes", 1 << 20, 1024..=1 << 30)?)
                .unwrap_or(usize::MAX),
            import_max_bytes: usize::try_from(self.integer("import_max_bytes", 20 << 20, 1024..=1 << 30)?)
                .unwrap_or(usize::MAX),
            // Bounded so shutdown (grace, mDNS goodbyes, flush) ends well inside systemd's TimeoutStopSec=30.
            shutdown_grace: Duration::from_secs(self.integer("shutdown_grace_secs", 10, 0..=20)?),
            connections: ConnectionLimits {
                handshake_timeout: Duration::from_secs(self.integer("tls_handshake_timeout_secs", 10, 1..=120)?),
                header_read_timeout: Duration::from_secs(self.integer("header_read_timeout_secs", 15, 1..=300)?),
                idle_timeout: Duration::from_secs(self.integer("idle_timeout_secs", 60, 1..=3_600)?),
                max_connections: usize::try_from(self.integer("max_connections", 4_096, 16..=1 << 20)?)
                    .unwrap_or(usize::MAX),
                max_per_address: usize::try_from(self.integer("max_connections_per_address", 256, 1..=1 << 20)?)
                    .unwrap_or(usize::MAX),
            },
            admin_user: self.text("admin_user").unwrap_or("admin").trim().to_lowercase(),
            admin_password,
            invite_validity: Duration::from_secs(self.integer("invite_validity_days", 7, 1..=90)? * 86_400),
            session_ttl: Duration::from_secs(self.integer("session_ttl_hours", 12, 1..=720)? * 3_600),
            enroll_auth: match self.text("enroll_auth") {
                None => crate::model::EnrollAuth::Passcode,
                Some(text) => text.parse().map_err(|reason: String| {
                    self.invalid(
                        "enroll_auth",
                        &format!("{reason}: passcode (the invite's), password (the user's own) or both"),
                    )
                })?,
            },
            console_file,
            clock_check,
            mail,
            apns: self.apns()?,
            release_file: PathBuf::from(self.text("release_file").unwrap_or(DEFAULT_RELEASE_FILE)),
        })
    }

    fn apns(&self) -> Result<ApnsConfig, ConfigError> {
        let url = self.text("apns_url").unwrap_or(APNS_PRODUCTION).trim().trim_end_matches('/').to_owned();
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            self.invalid("apns_url", "it must start with https:// (Apple's push service is HTTP/2 over TLS)")
        })?;
        if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
            return Err(
                self.invalid("apns_url", &format!("give the scheme, host and port only, such as {APNS_PRODUCTION}"))
            );
        }
        let ca_file = self.text("apns_ca_file").map(PathBuf::from);
        if let Some(path) = &ca_file
            && let Err(error) = std::fs::read(path)
        {
            return Err(self.invalid("apns_ca_file", &format!("cannot read it ({error}); give a PEM file")));
        }
        Ok(ApnsConfig { url, ca_file })
    }

    fn mail(&self, hostname: &str) -> Result<MailConfig, ConfigError> {
        let public_url = match self.text("public_url") {
            None => None,
            Some(url) => Some({
                let url = url.trim().trim_end_matches('/');
                let rest = url.strip_prefix("https://").ok_or_else(|| {
                    self.invalid("public_url", "it must start with https:// (devices only enroll over HTTPS)")
                })?;
                if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
                    return Err(
                        self.invalid("public_url", "give the scheme and host only, such as https://enroll.example.com")
                    );
                }
                url.to_owned()
            }),
        };
        let smtp = match self.text("smtp_host").map(str::trim).filter(|h| !h.is_empty()) {
            None => None,
            Some(host) => Some(self.smtp(host, hostname)?),
        };
        Ok(MailConfig {
            organisation: self.text("organisation").unwrap_or("").trim().to_owned(),
            public_url,
            smtp,
            max_connections: usize::try_from(self.integer("mail_max_connections", 4, 1..=64)?).unwrap_or(4),
            max_per_second: u32::try_from(self.integer("mail_max_per_second", 20, 1..=10_000)?).unwrap_or(20),
            retry_first: Duration::from_secs(self.integer("mail_retry_first_secs", 60, 1..=3_600)?),
            retry_horizon: Duration::from_secs(self.integer("mail_retry_hours", 48, 1..=720)? * 3_600),
            sms: self.sms()?,
            reminder_days: u32::try_from(self.integer("invite_reminder_days", 0, 0..=89)?).unwrap_or(0),
            confirmation_to: self.confirmation_to()?,
            confirmation_to_user: self.bool("confirmation_to_user").unwrap_or(false),
        })
    }

    fn confirmation_to(&self) -> Result<Vec<String>, ConfigError> {
        let mut addresses = Vec::new();
        for item in self.list("confirmation_to") {
            if item.parse::<lettre::Address>().is_err() {
                return Err(self.invalid("confirmation_to", &format!("{item:?} is not an email address")));
            }
            addresses.push(item.clone());
        }
        Ok(addresses)
    }

    fn sms(&self) -> Result<Option<SmsGateway>, ConfigError> {
        match self.text("sms_gateway").map(|g| g.trim().to_ascii_lowercase()).as_deref() {
            None | Some("off" | "") => Ok(None),
            Some("email") => {
                let domain = self.text("sms_email_domain").map(str::trim).unwrap_or_default().trim_start_matches('@');
                if domain.is_empty() || domain.contains(['@', ' ', '/']) {
                    return Err(self.invalid("sms_email_domain", "give the gateway's mail domain, such as sms.example.net (messages go to <number>@sms.example.net)"));
                }
                Ok(Some(SmsGateway::Email { domain: domain.to_owned() }))
            }
            Some("http") => {
                let url = self.text("sms_http_url").map(str::trim).unwrap_or_default();
                let authority = url.parse::<axum::http::Uri>().ok().and_then(|u| u.authority().cloned());
                if authority.is_some_and(|a| a.as_str().contains('@')) {
                    return Err(self.invalid(
                        "sms_http_url",
                        "put no credentials in the URL (they would travel in the Host header and show in logs); give them in sms_http_headers, such as \"Authorization: Bearer …\"",
                    ));
                }
                if !(url.starts_with("https://") || url.starts_with("http://"))
                    || url.parse::<axum::http::Uri>().is_err()
                {
                    return Err(self
                        .invalid("sms_http_url", "give the gateway's URL, such as https://sms.example.net/api/send"));
                }
                let method = self.text("sms_http_method").unwrap_or("POST").trim().to_ascii_uppercase();
                if !matches!(method.as_str(), "POST" | "PUT" | "GET") {
                    return Err(self.invalid("sms_http_method", "use POST, PUT or GET"));
                }
                let mut headers = Vec::new();
                for item in self.list("sms_http_headers") {
                    let Some((name, value)) = item.split_once(':') else {
                        return Err(self.invalid("sms_http_headers", "write each header as \"Name: value\""));
                    };
                    let (name, value) = (name.trim(), value.trim());
                    if axum::http::HeaderName::try_from(name).is_err()
                        || axum::http::HeaderValue::try_from(value).is_err()
                    {
                        return Err(self.invalid("sms_http_headers", &format!("{name:?} is not a valid header")));
                    }
                    headers.push((name.to_owned(), value.to_owned()));
                }
                let body = self
                    .text("sms_http_body")
                    .unwrap_or(r#"{"to": {{ to_json }}, "text": {{ text_json }}}"#)
                    .to_owned();
                if let Err(error) = HttpGateway::render_body(&body, "+12025550100", "sample text") {
                    return Err(self.invalid(
                        "sms_http_body",
                        &format!("{error}; the variables are to, text, to_json, text_json, to_url and text_url"),
                    ));
                }
                let success_contains =
                    self.text("sms_http_success_contains").map(str::to_owned).filter(|s| !s.is_empty());
                Ok(Some(SmsGateway::Http(HttpGateway { url: url.to_owned(), method, headers, body, success_contains })))
            }
            Some(_) => Err(self.invalid("sms_gateway", "use off, http or email")),
        }
    }

    fn smtp(&self, host: &str, hostname: &str) -> Result<SmtpConfig, ConfigError> {
        let security = match self.text("smtp_security").map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            None | Some("starttls") => SmtpSecurity::StartTls,
            Some("tls") => SmtpSecurity::Tls,
            Some("none") => SmtpSecurity::None,
            Some(_) => {
                return Err(self.invalid(
                    "smtp_security",
                    "use starttls (port 587), tls (port 465) or none (port 25, only on a network you trust)",
                ));
            }
        };
        let port = match self.integer("smtp_port", 0, 0..=65_535)? {
            0 => security.default_port(),
            port => u16::try_from(port).unwrap_or(security.default_port()),
        };
        let password = match (self.text("smtp_password"), self.text("smtp_password_file")) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "smtp_password and smtp_password_file are both set; keep one".into(),
                ));
            }
            (Some(password), None) => Some(password.to_owned()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| {
                        self.invalid(
                            "smtp_password_file",
                            &format!("cannot read it ({error}); check the path and permissions"),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let username = self.text("smtp_username").map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned);
        if password.is_some() != username.is_some() {
            return Err(ConfigError::Conflict(
                "smtp_username and the SMTP password (smtp_password or smtp_password_file) go together; set both or neither".into(),
            ));
        }
        let from_address =
            self.text("mail_from").map_or_else(|| format!("enrolld@{hostname}.local"), |f| f.trim().to_owned());
        if from_address.parse::<lettre::Address>().is_err() {
            return Err(self.invalid(
                "mail_from",
                "it is not an email address; give one the relay accepts as sender, such as it@example.com",
            ));
        }
        let reply_to = self.text("mail_reply_to").map(str::trim).filter(|r| !r.is_empty()).map(str::to_owned);
        if reply_to.as_deref().is_some_and(|r| r.parse::<lettre::Address>().is_err()) {
            return Err(self.invalid("mail_reply_to", "it is not an email address"));
        }
        let ca_file = self.text("smtp_ca_file").map(PathBuf::from);
        if let Some(path) = &ca_file
            && let Err(error) = std::fs::read(path)
        {
            return Err(self.invalid(
                "smtp_ca_file",
                &format!("cannot read it ({error}); give a PEM file of the CA that signed the relay's certificate"),
            ));
        }
        Ok(SmtpConfig {
            host: host.to_owned(),
            port,
            security,
            username,
            password,
            from_address,
            from_name: self
                .text("mail_from_name")
                .map_or_else(|| "Device enrollment".to_owned(), |n| n.trim().to_owned()),
            reply_to,
            helo_name: self.text("smtp_helo_name").map_or_else(|| format!("{hostname}.local"), |h| h.trim().to_owned()),
            ca_file,
            ca_pem: None,
        })
    }

    fn get(&self, name: &str) -> Option<&(Raw, Origin)> {
        self.settings.get(name)
    }

    fn text(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some((Raw::Text(text), _)) => Some(text.as_str()),
            _ => None,
        }
    }

    fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some((Raw::Bool(value), _)) => Some(*value),
            _ => None,
        }
    }

    fn list(&self, name: &str) -> &[String] {
        match self.get(name) {
            Some((Raw::List(items), _)) => items,
            _ => &[],
        }
    }

    fn integer(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let value = match self.get(name) {
            Some((Raw::Integer(value), _)) => u64::try_from(*value).unwrap_or(u64::MAX),
            _ => default,
        };
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(name, &format!("use a whole number from {} to {}", range.start(), range.end())))
        }
    }

    fn listen(&self, name: &'static str, default: &str) -> Result<Option<SocketAddr>, ConfigError> {
        let text = self.text(name).unwrap_or(default);
        parse_listen(text).map_err(|reason| self.invalid(name, &reason))
    }

    fn invalid(&self, name: &'static str, reason: &str) -> ConfigError {
        let (value, origin) = match self.get(name) {
            Some((raw, origin)) => (raw.to_string(), origin.clone()),
            None => ("(default)".to_owned(), Origin::Default),
        };
        ConfigError::Invalid { key: name, value, origin, reason: reason.to_owned() }
    }
}

fn listen_text(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
}

fn find_key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}

fn known_keys() -> String {
    KEYS.iter().map(|key| key.name).collect::<Vec<_>>().join(", ")
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            line.strip_prefix(key)
                .or_else(|| line.strip_prefix(&format!("\"{key}\"")))
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || line.trim_end() == format!("[{key}]")
        })
        .map(|index| index + 1)
}

fn type_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "a string in quotes",
        Kind::Bool => "true or false",
        Kind::Integer => "a whole number",
        Kind::List => "a list of strings such as [\"a\", \"b\"]",
    }
}

fn raw_from_toml(key: &Key, value: toml::Value, origin: &Origin) -> Result<Raw, ConfigError> {
    let shown = value.to_string();
    let raw = match (key.kind, value) {
        (Kind::Text, toml::Value::String(text)) => Some(Raw::Text(text)),
        (Kind::Bool, toml::Value::Boolean(value)) => Some(Raw::Bool(value)),
        (Kind::Integer, toml::Value::Integer(value)) => Some(Raw::Integer(value)),
        (Kind::List, toml::Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                toml::Value::String(text) => Some(text),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(Raw::List),
        _ => None,
    };
    raw.ok_or_else(|| ConfigError::Invalid {
        key: key.name,
        value: shown,
        origin: origin.clone(),
        reason: format!("expected {}", type_name(key.kind)),
    })
}

fn raw_from_text(key: &Key, text: &str, origin: &Origin) -> Result<Raw, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        key: key.name,
        value: format!("{text:?}"),
        origin: origin.clone(),
        reason: reason.to_owned(),
    };
    Ok(match key.kind {
        Kind::Text => Raw::Text(text.to_owned()),
        Kind::Bool => match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Raw::Bool(true),
            "0" | "false" | "no" | "off" => Raw::Bool(false),
            _ => return Err(invalid("expected true or false")),
        },
        Kind::Integer => Raw::Integer(text.trim().parse().map_err(|_| invalid("expected a whole number"))?),
        Kind::List => {
            Raw::List(text.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect())
        }
    })
}

/// Parses a listen address: `off`, `HOST:PORT`, `[V6]:PORT`, or a bare port meaning every address.
pub fn parse_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    if let Ok(port) = text.parse::<u16>() {
        return Ok(Some(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))));
    }
    text.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| "expected an address and port such as [::]:8443 or 0.0.0.0:443, a bare port, or off".to_owned())
}

/// Reads an SMS gateway from the configuration's own keys (`sms_gateway`, `sms_email_domain`, `sms_http_*`), as the
/// Settings page posts them, with the same checks; `sms_http_headers` holds one `Name: value` a line. Empty values
/// count as not given. A refusal names the key and says why.
pub fn sms_gateway_from(fields: &[(&str, &str)]) -> Result<Option<SmsGateway>, (&'static str, String)> {
    let mut settings = BTreeMap::new();
    for (name, value) in fields {
        let Some(key) = find_key(name).filter(|key| key.name.starts_with("sms_")) else { continue };
        let raw = if key.name == "sms_http_headers" {
            Raw::List(value.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
        } else if value.trim().is_empty() {
            continue;
        } else {
            Raw::Text((*value).to_owned())
        };
        settings.insert(key.name, (raw, Origin::Default));
    }
    Layers { settings, file: None }.sms().map_err(|error| match error {
        ConfigError::Invalid { key, reason, .. } => (key, reason),
        other => ("sms_gateway", other.to_string()),
    })
}

/// Checks that `name` is a single DNS label, as mDNS `.local` names are.
pub fn validate_hostname(name: &str) -> Result<(), String> {
    if name.ends_with(".local") {
        return Err(format!(
            "give the name without .local (use {:?}; the box is then reachable as {name})",
            name.trim_end_matches(".local")
        ));
    }
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if name.is_empty() || name.len() > 63 || !ok_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(
            "use 1 to 63 letters, digits and hyphens, not starting or ending with a hyphen, such as enroll".to_owned()
        );
    }
    Ok(())
}

/// Parses an extra certificate name: an IP address or a DNS name.
pub fn parse_subject_name(text: &str) -> Result<SubjectName, String> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SubjectName::Ip(ip));
    }
    let lowered = text.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if lowered.len() <= 253 && lowered.split('.').all(label_ok) {
        Ok(SubjectName::Dns(lowered))
    } else {
        Err(format!("{text:?} is neither an IP address nor a DNS name such as enroll.example.com"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))).collect()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enrolld.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_apply_without_any_layer() {
        let layers = Layers::gather(&ConfigArgs { config: None, ..Default::default() }, env(&[])).unwrap();
        let config = layers.resolve(None).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("./enrolld-data"));
        assert_eq!(config.https_listen, Some("[::]:8443".parse().unwrap()));
        assert_eq!(config.http_listen, Some("[::]:8080".parse().unwrap()));
        assert_eq!(config.hostname, "enroll");
        assert!(config.mdns);
        assert_eq!(config.tls, TlsSource::SelfIssued);
        assert_eq!(layers.resolve(Some("/var/lib/enrolld")).unwrap().state_dir, PathBuf::from("/var/lib/enrolld"));
    }

    #[test]
    fn each_layer_overrides_the_one_before() {
        let (_dir, path) = file("hostname = \"from-file\"\nhttps_listen = \"127.0.0.1:1\"\nhttp_listen = \"off\"\n");
        let args =
            ConfigArgs { config: Some(path.clone()), https_listen: Some("127.0.0.1:3".into()), ..Default::default() };
        let layers = Layers::gather(
            &args,
            env(&[("ENROLLD_HOSTNAME", "from-env"), ("ENROLLD_HTTPS_LISTEN", "127.0.0.1:2"), ("PATH", "/bin")]),
        )
        .unwrap();
        let config = layers.resolve(None).unwrap();
        assert_eq!(config.hostname, "from-env");
        assert_eq!(config.https_listen, Some("127.0.0.1:3".parse().unwrap()));
        assert_eq!(config.http_listen, None);
        let described = layers.describe(&config);
        let origin_of = |key: &str| described.iter().find(|(k, _, _)| k == key).unwrap().2.clone();
        assert_eq!(origin_of("hostname"), "from environment variable ENROLLD_HOSTNAME");
        assert_eq!(origin_of("https_listen"), "from --https-listen");
        assert_eq!(origin_of("http_listen"), format!("in {} line 3", path.display()));
        assert_eq!(origin_of("mdns"), "(built-in default)");
    }

    #[test]
    fn unknown_file_key_names_the_key_and_line() {
        let (_dir, path) = file("hostname = \"a\"\nhttps_lisen = \"[::]:443\"\n");
        let args = ConfigArgs { config: Some(path), ..Default::default() };
        let message = Layers::gather(&args, env(&[])).unwrap_err().to_string();
        assert!(message.contains("unknown key `https_lisen`"), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("https_listen"), "lists the known keys: {message}");
    }

    #[test]
    fn hostname_is_lower_cased_and_grace_is_bounded() {
        let layers = Layers::gather(&ConfigArgs::default(), env(&[("ENROLLD_HOSTNAME", "Enroll")])).unwrap();
        assert_eq!(layers.resolve(None).unwrap().hostname, "enroll");
        let layers = Layers::gather(&ConfigArgs::default(), env(&[("ENROLLD_SHUTDOWN_GRACE_SECS", "60")])).unwrap();
        assert!(layers.resolve(None).unwrap_err().to_string().contains("from 0 to 20"));
    }

    #[test]
    fn non_utf8_environment_values_are_refused() {
        use std::os::unix::ffi::OsStringExt;
        let vars = vec![(OsString::from("ENROLLD_HOSTNAME"), OsString::from_vec(vec![0x66, 0xff, 0x6f]))];
        let message = Layers::gather(&ConfigArgs::default(), vars).unwrap_err().to_string();
        assert!(message.contains("ENROLLD_HOSTNAME") && message.contains("not valid UTF-8"), "{message}");
    }

    #[test]
    fn unknown_environment_variable_is_refused() {
        let message = Layers::gather(&ConfigArgs::default(), env(&[("ENROLLD_HOSTNAM", "x")])).unwrap_err().to_string();
        assert!(message.contains("ENROLLD_HOSTNAM"), "{message}");
        assert!(message.contains("ENROLLD_HOSTNAME"), "{message}");
    }

    #[test]
    fn bad_values_name_key_value_and_origin() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("ENROLLD_HTTPS_LISTEN", "nonsense")], "https_listen"),
            (&[("ENROLLD_HOSTNAME", "bad_name")], "hostname"),
            (&[("ENROLLD_HOSTNAME", "enroll.local")], "without .local"),
            (&[("ENROLLD_MDNS", "maybe")], "true or false"),
            (&[("ENROLLD_EXTRA_SANS", "ok.example, not a name")], "extra_sans"),
            (&[("ENROLLD_LOG_LEVEL", "loud=?")], "log_level"),
            (&[("ENROLLD_REQUEST_TIMEOUT_SECS", "0")], "from 1 to 3600"),
            (&[("ENROLLD_HTTPS_LISTEN", "off"), ("ENROLLD_HTTP_LISTEN", "off")], "both off"),
            (&[("ENROLLD_HTTPS_LISTEN", "8000"), ("ENROLLD_HTTP_LISTEN", "[::]:8000")], "same port"),
            (&[("ENROLLD_TLS_CERT", "/x.pem")], "tls_key is not"),
            (&[("ENROLLD_SMTP_HOST", "mail.example.com"), ("ENROLLD_SMTP_SECURITY", "ssl")], "use starttls"),
            (&[("ENROLLD_SMTP_HOST", "mail.example.com"), ("ENROLLD_SMTP_USERNAME", "it")], "go together"),
            (&[("ENROLLD_SMTP_HOST", "mail.example.com"), ("ENROLLD_MAIL_FROM", "it at example")], "mail_from"),
            (&[("ENROLLD_PUBLIC_URL", "http://enroll.example.com")], "must start with https://"),
            (
                &[("ENROLLD_SMS_GATEWAY", "http"), ("ENROLLD_SMS_HTTP_URL", "https://u:k@gw.example/send")],
                "no credentials",
            ),
            (
                &[
                    ("ENROLLD_SMS_GATEWAY", "http"),
                    ("ENROLLD_SMS_HTTP_URL", "https://gw.example/"),
                    ("ENROLLD_SMS_HTTP_BODY", "{{ txt }}"),
                ],
                "sms_http_body",
            ),
            (&[("ENROLLD_SMS_GATEWAY", "email")], "sms_email_domain"),
            (&[("ENROLLD_CONFIRMATION_TO", "helpdesk")], "confirmation_to"),
            (&[("ENROLLD_INVITE_REMINDER_DAYS", "7")], "fewer days than invite_validity_days"),
            (&[("ENROLLD_CLOCK_CHECK", "ntp")], "use plausible or synchronised"),
        ];
        for (vars, expected) in cases {
            let result = Layers::gather(&ConfigArgs::default(), env(vars)).and_then(|layers| layers.resolve(None));
            let message = result.unwrap_err().to_string();
            assert!(message.contains(expected), "{vars:?}: {message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }

    #[test]
    fn wrong_toml_type_and_syntax_are_reported_with_lines() {
        let (_dir, path) = file("mdns = \"yes\"\n");
        let message =
            Layers::gather(&ConfigArgs { config: Some(path), ..Default::default() }, env(&[])).unwrap_err().to_string();
        assert!(
            message.contains("`mdns`") && message.contains("true or false") && message.contains("line 1"),
            "{message}"
        );

        let (_dir, path) = file("hostname = \"a\"\nhttp_listen = [\n");
        let message =
            Layers::gather(&ConfigArgs { config: Some(path), ..Default::default() }, env(&[])).unwrap_err().to_string();
        assert!(message.contains("not valid TOML at line"), "{message}");
    }

    #[test]
    fn the_example_file_documents_every_key_with_its_default() {
        let text = include_str!("../enrolld.example.toml");
        for key in KEYS {
            assert!(
                text.contains(&format!("\n{} = ", key.name)) || text.contains(&format!("# {} = ", key.name)),
                "{}",
                key.name
            );
            if !key.flag.is_empty() {
                assert!(text.contains(key.flag), "the example names the flag {}", key.flag);
            }
        }
        let mut layers = Layers::default();
        layers.read_file(Path::new("enrolld.example.toml"), text).unwrap();
        assert_eq!(layers.resolve(None).unwrap(), Layers::default().resolve(None).unwrap());
    }

    #[test]
    fn the_appliance_config_binds_the_standard_ports() {
        let mut layers = Layers::default();
        layers.read_file(Path::new("systemd/enrolld.toml"), include_str!("../systemd/enrolld.toml")).unwrap();
        let config = layers.resolve(Some("/var/lib/enrolld")).unwrap();
        assert_eq!(config.https_listen, Some("[::]:443".parse().unwrap()));
        assert_eq!(config.http_listen, Some("[::]:80".parse().unwrap()));
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/enrolld"));
        assert_eq!(config.console_file, Some(PathBuf::from("/run/enrolld/console.issue")));
        assert_eq!(config.clock_check, crate::clock::ClockCheck::Synchronised);
    }

    #[test]
    fn the_settings_page_sms_gateway_is_checked_as_the_file_is() {
        assert_eq!(sms_gateway_from(&[("sms_gateway", "off"), ("sms_http_url", "x")]), Ok(None));
        assert_eq!(
            sms_gateway_from(&[("sms_gateway", "email"), ("sms_email_domain", "@sms.example.net")]),
            Ok(Some(SmsGateway::Email { domain: "sms.example.net".into() }))
        );
        let http = sms_gateway_from(&[
            ("sms_gateway", "http"),
            ("sms_http_url", "https://sms.example.net/send"),
            ("sms_http_method", ""),
            ("sms_http_headers", "Authorization: Bearer abc\n\nX-Account: 7\n"),
        ]);
        let Ok(Some(SmsGateway::Http(http))) = http else { panic!("{http:?}") };
        assert_eq!((http.method.as_str(), http.headers.len()), ("POST", 2));
        assert_eq!(
            sms_gateway_from(&[("sms_gateway", "http"), ("sms_http_url", "ftp://x")]).unwrap_err().0,
            "sms_http_url"
        );
        let refused = sms_gateway_from(&[
            ("sms_gateway", "http"),
            ("sms_http_url", "https://sms.example.net/send"),
            ("sms_http_body", "{{ nope }}"),
        ]);
        assert_eq!(refused.unwrap_err().0, "sms_http_body");
    }

    #[test]
    fn listen_addresses_and_names_parse() {
        assert_eq!(parse_listen("off").unwrap(), None);
        assert_eq!(parse_listen("443").unwrap(), Some("[::]:443".parse().unwrap()));
        assert_eq!(parse_listen("0.0.0.0:80").unwrap(), Some("0.0.0.0:80".parse().unwrap()));
        let ephemeral = [("ENROLLD_HTTPS_LISTEN", "127.0.0.1:0"), ("ENROLLD_HTTP_LISTEN", "127.0.0.1:0")];
        let layers = Layers::gather(&ConfigArgs::default(), env(&ephemeral)).unwrap();
        assert!(layers.resolve(None).is_ok(), "two ephemeral ports do not clash");
        assert!(parse_listen("localhost:80").is_err());
        assert_eq!(parse_subject_name("Box.Example.COM.").unwrap(), SubjectName::Dns("box.example.com".into()));
        assert_eq!(parse_subject_name("fd00::7").unwrap(), SubjectName::Ip("fd00::7".parse().unwrap()));
    }
}
