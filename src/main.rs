//! The `enrolld` command: parses the command line, sets up logging, binds the sockets and hands over to the library.
//!
//! Exit codes: 0 success; 1 a failure while running (or an unhealthy `healthcheck`, or a backup or restore that
//! failed on the way, such as a full disk); 2 a configuration or start-up problem, or bad input to `backup` and
//! `restore` (a short or wrong passphrase, a damaged or newer backup, a state directory in use or not empty),
//! reported as one line naming what to fix.

use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use enrolld::backup::{self, BackupError, Passphrase};
use enrolld::config::{Config, ConfigArgs, Layers, TlsSource};
use enrolld::domain::{Actor, Attempt};
use enrolld::pki::ServerCertificate;
use enrolld::state_dir::{StateDir, StateDirError};
use enrolld::{Environment, Listeners, Outcome};

#[derive(Debug, Parser)]
#[command(name = "enrolld", version, about = "On-premises device-enrollment appliance")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(ConfigArgs),
    /// Exit 0 if the daemon at the configured address answers /healthz, 1 with the reason otherwise.
    Healthcheck {
        #[command(flatten)]
        config: ConfigArgs,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
    /// Validate the configuration (file, environment, flags) and print it, without binding anything.
    CheckConfig(ConfigArgs),
    /// Send a test message through the configured SMTP relay now; prints the relay's reply, with advice when it
    /// refuses. Exit 0 if the relay accepted it, 1 if not, 2 if the mail settings are wrong or missing.
    SendTestMail {
        #[command(flatten)]
        config: ConfigArgs,
        /// The address to send the test message to.
        #[arg(long, value_name = "ADDR")]
        to: String,
    },
    /// Write a backup of the appliance to FILE: its database (all but sign-in sessions), its CA, keys and
    /// certificates, and the uploaded files, encrypted with a passphrase. While enrolld runs, it is asked over its
    /// control socket; otherwise the state directory is read directly.
    Backup {
        #[command(flatten)]
        config: ConfigArgs,
        /// The file to write (replaced if it exists).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A file holding the passphrase (at least 12 characters; one trailing newline is ignored); or set
        /// ENROLLD_BACKUP_PASSPHRASE. It cannot be recovered: keep it apart from the backup.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Restore a backup into the state directory (--state-dir). It is checked whole before anything is put in
    /// place; the directory must be new or empty, and no enrolld may be running on it.
    Restore {
        /// The backup file.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
        /// A file holding the passphrase the backup was made with; or set ENROLLD_BACKUP_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Restore over a state directory that holds something: its contents are moved to
        /// <dir>.before-restore-<time> beside it.
        #[arg(long)]
        replace: bool,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Healthcheck { config, timeout_secs } => healthcheck(&config, Duration::from_secs(timeout_secs)),
        Command::CheckConfig(args) => check_config(&args),
        Command::SendTestMail { config, to } => send_test_mail(&config, &to),
        Command::Backup { config, out, passphrase_file } => backup(&config, &out, passphrase_file.as_deref()),
        Command::Restore { file, config, passphrase_file, replace } => {
            restore(&file, &config, passphrase_file.as_deref(), replace)
        }
        Command::Version => {
            println!("enrolld {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn fail(message: impl Display, code: u8) -> ExitCode {
    eprintln!("enrolld: {message}");
    ExitCode::from(code)
}

fn load_config(args: &ConfigArgs) -> Result<(Layers, Config), ExitCode> {
    let layers = Layers::gather(args, std::env::vars_os()).map_err(|e| fail(e, 2))?;
    let systemd_state_dir = std::env::var("STATE_DIRECTORY").ok();
    let config = layers.resolve(systemd_state_dir.as_deref()).map_err(|e| fail(e, 2))?;
    Ok((layers, config))
}

fn serve(args: &ConfigArgs) -> ExitCode {
    let config = match load_config(args) {
        Ok((_, config)) => config,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log_level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let state_dir = match StateDir::open(&config.state_dir) {
        Ok(state_dir) => state_dir,
        Err(error) => return fail(error, 2),
    };
    let listeners = match Listeners::bind(&config) {
        Ok(listeners) => listeners,
        Err(error) => return fail(error, 2),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(format!("cannot start the async runtime: {error}"), 1),
    };
    let result = runtime.block_on(async {
        // Install the handlers before start-up work, so a signal that arrives early still stops enrolld cleanly.
        let signal = shutdown_signal();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            signal.await;
            stopping.cancel();
        });
        let mut bound = Some(listeners);
        loop {
            // After a restart the last run's listeners are closed: bind again (the state directory stays locked).
            let listeners = match bound.take() {
                Some(listeners) => listeners,
                None => Listeners::bind(&config)?,
            };
            let shutdown = stop.clone().cancelled_owned();
            match enrolld::run(config.clone(), &state_dir, listeners, shutdown, Environment::system()).await? {
                Outcome::Restart => continue,
                Outcome::Stopped => return Ok::<(), enrolld::DaemonError>(()),
            }
        }
    });
    drop(state_dir);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error, error.exit_code()),
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when it is first awaited.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => {
                tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received"),
                    _ = interrupt.recv() => tracing::info!("SIGINT received"),
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot install signal handlers; stop enrolld with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

fn healthcheck(args: &ConfigArgs, timeout: Duration) -> ExitCode {
    let config = match load_config(args) {
        Ok((_, config)) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(format!("cannot start the async runtime: {error}"), 1),
    };
    match runtime.block_on(enrolld::healthcheck::probe(&config, timeout)) {
        Ok(answer) => {
            println!("healthy: {answer}");
            ExitCode::SUCCESS
        }
        Err(reason) => fail(format!("unhealthy: {reason}"), 1),
    }
}

fn send_test_mail(args: &ConfigArgs, to: &str) -> ExitCode {
    let config = match load_config(args) {
        Ok((_, config)) => config,
        Err(code) => return code,
    };
    let Some(smtp) = &config.mail.smtp else {
        return fail(
            "no mail relay is configured; set smtp_host (and the other smtp_ settings, see enrolld.example.toml)",
            2,
        );
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(format!("cannot start the async runtime: {error}"), 1),
    };
    let public_url = config.public_url(config.https_listen.map(|a| a.port()));
    let sent = runtime.block_on(async {
        let relay = enrolld::mail::Relay::new(smtp, 1)?;
        relay.send_test(to, &public_url).await
    });
    let via = format!("{}:{} ({})", smtp.host, smtp.port, smtp.security.as_str());
    match sent {
        Ok(Attempt::Sent(reply)) => {
            println!("sent to {to} through {via}: {reply}");
            ExitCode::SUCCESS
        }
        Ok(Attempt::Temporary(reply)) => fail(format!("not sent through {via} (temporary failure): {reply}"), 1),
        Ok(Attempt::Unreachable(reply)) => fail(format!("not sent: {via} cannot be reached: {reply}"), 1),
        Ok(Attempt::Permanent(reply)) => fail(format!("not sent through {via}: {reply}"), 1),
        Err(error) => fail(error, 2),
    }
}

fn check_config(args: &ConfigArgs) -> ExitCode {
    let (layers, config) = match load_config(args) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if let TlsSource::Files { cert, key } = &config.tls
        && let Err(error) = ServerCertificate::load_files(cert, key)
    {
        return fail(format!("tls_cert/tls_key: {error}"), 2);
    }
    if config.state_dir.exists() && !config.state_dir.is_dir() {
        return fail(
            format!(
                "state_dir {} exists and is not a directory; choose another with --state-dir",
                config.state_dir.display()
            ),
            2,
        );
    }
    match &layers.file {
        Some(path) => println!("# configuration file: {}", path.display()),
        None => println!("# no configuration file; built-in defaults, environment and flags"),
    }
    for (key, value, origin) in layers.describe(&config) {
        println!("{key} = {value:?}  # {origin}");
    }
    println!("# configuration OK");
    ExitCode::SUCCESS
}

/// The passphrase from `--passphrase-file` (one trailing newline dropped) or `ENROLLD_BACKUP_PASSPHRASE`.
fn read_passphrase(file: Option<&Path>) -> Result<String, ExitCode> {
    match file {
        Some(path) => match fs::read_to_string(path) {
            Ok(text) => {
                let text = text.strip_suffix('\n').unwrap_or(&text);
                Ok(text.strip_suffix('\r').unwrap_or(text).to_owned())
            }
            Err(error) => Err(fail(format!("cannot read --passphrase-file {}: {error}", path.display()), 2)),
        },
        None => std::env::var("ENROLLD_BACKUP_PASSPHRASE").map_err(|_| {
            fail(
                "give the passphrase with --passphrase-file FILE or in ENROLLD_BACKUP_PASSPHRASE (a file keeps it out of the shell's history)",
                2,
            )
        }),
    }
}

/// Who runs this command, for the audit log: root, or the user id.
fn command_line_actor() -> Actor {
    let name = match fs::metadata("/proc/self").map(|m| m.uid()) {
        Ok(0) => "root".to_owned(),
        Ok(uid) => format!("uid {uid}"),
        Err(_) => "command line".to_owned(),
    };
    Actor { name, client: None }
}

/// The hidden file a backup is written to before it is renamed to `out`.
fn partial_of(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
    out.with_file_name(format!(".{name}.partial"))
}

fn create_private(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| format!("cannot write {}: {error}", path.display()))
}

/// Syncs the written file and renames it from `partial` to `out`.
fn put_in_place(file: &File, partial: &Path, out: &Path) -> io::Result<()> {
    file.sync_all()?;
    fs::rename(partial, out)
}

fn backup(args: &ConfigArgs, out: &Path, passphrase_file: Option<&Path>) -> ExitCode {
    let config = match load_config(args) {
        Ok((_, config)) => config,
        Err(code) => return code,
    };
    let text = match read_passphrase(passphrase_file) {
        Ok(text) => text,
        Err(code) => return code,
    };
    let passphrase = match Passphrase::new(&text) {
        Ok(passphrase) => passphrase,
        Err(error) => return fail(error, 2),
    };
    let dir = &config.state_dir;
    if !dir.join("db").is_dir() {
        return fail(
            format!(
                "{} holds no enrolld database; name the state directory with --state-dir (or --config)",
                dir.display()
            ),
            2,
        );
    }
    match StateDir::open(dir) {
        Err(StateDirError::Locked { .. }) => backup_through_daemon(dir, &text, out),
        Err(error) => fail(error, 2),
        Ok(state_dir) => backup_directly(&config, &state_dir, &passphrase, out),
    }
}

/// The daemon holds the database: it makes the backup, sent over its control socket. It is told once the file is
/// in place, and records it then.
fn backup_through_daemon(dir: &Path, passphrase: &str, out: &Path) -> ExitCode {
    let socket = enrolld::state_dir::control_socket(dir);
    let partial = partial_of(out);
    let file = match create_private(&partial) {
        Ok(file) => file,
        Err(error) => return fail(error, 1),
    };
    let received = enrolld::control::request_backup(&socket, passphrase, BufWriter::new(file), |writer| {
        let file = writer.into_inner().map_err(io::IntoInnerError::into_error)?;
        put_in_place(&file, &partial, out)
    });
    match received {
        Ok(bytes) => {
            println!(
                "backup written to {} ({bytes} bytes) by the running enrolld; keep the passphrase apart from it: it cannot be recovered",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = fs::remove_file(&partial);
            fail(error, 1)
        }
    }
}

/// No daemon runs: the state directory is read here (and locked meanwhile, so none starts).
fn backup_directly(config: &Config, state_dir: &StateDir, passphrase: &Passphrase, out: &Path) -> ExitCode {
    let store = match enrolld::store::Store::open(&state_dir.database()) {
        Ok(store) => store,
        Err(error) => return fail(error, 1),
    };
    let key = match enrolld::state_dir::secret_file(&state_dir.pki().join("passcode.key")) {
        Ok(key) => key,
        Err(error) => return fail(format!("{}: {error}", state_dir.pki().display()), 1),
    };
    let clock = std::sync::Arc::new(enrolld::clock::SystemClock);
    let domain = match enrolld::domain::Enrollment::new(store.clone(), clock, Default::default(), &key) {
        Ok(domain) => domain,
        Err(error) => return fail(error, 1),
    };
    let configured =
        enrolld::naming::Names { organisation: config.mail.organisation.clone(), hostname: config.hostname.clone() };
    let host = domain.saved_names(&configured).map(|names| names.hostname).unwrap_or(configured.hostname);
    let source = backup::Source {
        store: &store,
        state_dir: state_dir.path(),
        host: &host,
        now: time::OffsetDateTime::now_utc(),
    };
    let partial = partial_of(out);
    let written = create_private(&partial).and_then(|file| {
        let mut writer = BufWriter::new(file);
        let written = backup::write(&source, passphrase, &mut writer, &backup::Options::default())
            .map_err(|error| error.to_string())?;
        let file = writer.into_inner().map_err(|error| error.into_error()).and_then(|file| {
            put_in_place(&file, &partial, out)?;
            Ok(file)
        });
        file.map(|_| written).map_err(|error| format!("cannot write {}: {error}", out.display()))
    });
    let written = match written {
        Ok(written) => written,
        Err(error) => {
            let _ = fs::remove_file(&partial);
            return fail(error, 1);
        }
    };
    let recorded =
        domain.record_backup(&command_line_actor(), "command line", written.bytes, written.header.created_at);
    if let Err(error) = recorded.map_err(|e| e.to_string()).and_then(|()| store.flush().map_err(|e| e.to_string())) {
        eprintln!("enrolld: the backup is written, but recording it for the dashboard failed: {error}");
    }
    let count = |table| written.trailer.count(table);
    println!(
        "backup written to {} ({} bytes): {} users, {} invites, {} devices, the CA {}; keep the passphrase apart from it: it cannot be recovered",
        out.display(),
        written.bytes,
        count("users"),
        count("invites"),
        count("devices"),
        written.header.ca_sha256
    );
    ExitCode::SUCCESS
}

fn restore(file: &Path, args: &ConfigArgs, passphrase_file: Option<&Path>, replace: bool) -> ExitCode {
    let config = match load_config(args) {
        Ok((_, config)) => config,
        Err(code) => return code,
    };
    let input = match File::open(file) {
        Ok(input) => io::BufReader::with_capacity(1 << 16, input),
        Err(error) => return fail(format!("cannot read {}: {error}", file.display()), 2),
    };
    // The header first: a backup this build cannot read is refused before anything is asked or touched.
    let opened = match backup::open(input) {
        Ok(opened) => opened,
        Err(error) => return fail(format!("{}: {error}", file.display()), 2),
    };
    let passphrase = match read_passphrase(passphrase_file) {
        Ok(text) => Passphrase::given(&text),
        Err(code) => return code,
    };
    let dir = config.state_dir.clone();
    match enrolld::state_dir::holder(&dir) {
        Ok(None) => {}
        Ok(Some(pid)) => {
            let pid = if pid.is_empty() { String::new() } else { format!(" (pid {pid})") };
            return fail(format!("{} is in use by a running enrolld{pid}; stop it first", dir.display()), 2);
        }
        Err(error) => return fail(format!("cannot read {}: {error}", dir.display()), 2),
    }
    let held = match enrolld::state_dir::contents(&dir) {
        Ok(held) => held,
        Err(error) => return fail(format!("cannot read {}: {error}", dir.display()), 2),
    };
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "enrolld-data".into());
    let parent = match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => parent.to_owned(),
        None => PathBuf::from("."),
    };
    let stamp = enrolld::state_dir::stamp(time::OffsetDateTime::now_utc());
    let aside = parent.join(format!("{name}.before-restore-{stamp}"));
    if !held.is_empty() && !replace {
        return fail(
            format!(
                "{} is not empty (it holds {}); restore into a new directory, or give --replace to move its contents to {}",
                dir.display(),
                held.join(", "),
                aside.display()
            ),
            2,
        );
    }
    // Everything is decrypted and checked beside DIR first; DIR is not made, locked or changed until then.
    let staging = parent.join(format!(".{name}.restoring-{}", std::process::id()));
    if staging.exists()
        && let Err(error) = fs::remove_dir_all(&staging)
    {
        return fail(format!("cannot remove {}: {error}", staging.display()), 1);
    }
    let restored = match opened.restore(&passphrase, &staging) {
        Ok(restored) => restored,
        Err(error) => {
            let code = if matches!(error, BackupError::WrongPassphrase) || error.is_bad_file() { 2 } else { 1 };
            return fail(format!("{}: {error}; nothing was changed in {}", file.display(), dir.display()), code);
        }
    };
    let state_dir = match StateDir::open(&dir) {
        Ok(state_dir) => state_dir,
        Err(error) => {
            let _ = fs::remove_dir_all(&staging);
            return fail(error, 2);
        }
    };
    if let Err(error) = enrolld::state_dir::install_restored(state_dir.path(), &staging, &aside) {
        return fail(
            format!(
                "putting the restored files in place failed: {error}; the restored files are in {}, the previous ones in {}",
                staging.display(),
                aside.display()
            ),
            1,
        );
    }
    // Root restoring into the directory of the service's user (systemd's DynamicUser, say): the files are the user's.
    if let Err(error) = enrolld::state_dir::give_to_owner(state_dir.path()) {
        eprintln!(
            "enrolld: the restored files could not be given to the owner of {} ({error}); chown them before starting enrolld",
            dir.display()
        );
    }
    let header = &restored.header;
    let count = |table| restored.trailer.count(table);
    println!(
        "restored {} users, {} invites, {} devices and {} admins into {}, with the CA {} (a backup of {} made {}); sign in with the backup's admin accounts",
        count("users"),
        count("invites"),
        count("devices"),
        count("admins"),
        dir.display(),
        header.ca_sha256,
        header.host,
        header.created_at
    );
    if aside.exists() {
        println!("what {} held before is in {}", dir.display(), aside.display());
    }
    ExitCode::SUCCESS
}
