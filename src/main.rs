//! The `enrolld` command: parses the command line, sets up logging, binds the sockets and hands over to the library.
//!
//! Exit codes: 0 success; 1 a failure while running (or an unhealthy `healthcheck`); 2 a configuration or start-up
//! problem, reported as one line naming what to fix.

use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use enrolld::config::{Config, ConfigArgs, Layers, TlsSource};
use enrolld::domain::Attempt;
use enrolld::pki::ServerCertificate;
use enrolld::state_dir::StateDir;
use enrolld::{Environment, Listeners};

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
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(&args),
        Command::Healthcheck { config, timeout_secs } => healthcheck(&config, Duration::from_secs(timeout_secs)),
        Command::CheckConfig(args) => check_config(&args),
        Command::SendTestMail { config, to } => send_test_mail(&config, &to),
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
        let shutdown = shutdown_signal();
        enrolld::run(config, state_dir, listeners, shutdown, Environment::system()).await
    });
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
