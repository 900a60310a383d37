//! The daemon's life: bind, open the store, wait for a clock it can trust, load the CA and certificate, start every
//! task under one shutdown signal, tell systemd and the box's console, and on the way out stop accepting, let
//! requests finish, withdraw mDNS and flush the store. A backup restored on the setup page ends a run with
//! [`Outcome::Restart`]: `main` binds again and runs once more on the same (still locked) state directory, where the
//! restored contents are put in place first.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::addrs::{AddressSource, SystemAddresses};
use crate::clock::{
    self, CLOCK_ADVICE, Clock, ClockCheck, ClockState, ClockStatus, JumpDetector, SyncMarkers, SystemClock,
};
use crate::config::Config;
use crate::console::{Console, Launch, Screen};
use crate::domain::RetryPolicy;
use crate::domain::auth::{Auth, AuthError};
use crate::domain::{DomainError, Enrollment, Policy};
use crate::http::{self, AppState, Limits};
use crate::mail::outbox::OutboxSettings;
use crate::mail::{self, Mail, MailError, Relay};
use crate::mdns::Announcement;
use crate::naming::{Names, Naming};
use crate::pki::scep::{DeviceCa, DeviceCaCreation};
use crate::pki::{CertificateAuthority, PkiError};
use crate::state_dir::{StateDir, StateDirError};
use crate::store::{Store, StoreError};
use crate::tls::{self, CertificateKeeper, TlsError};

/// Why the daemon did not start (exit code 2) or stopped abnormally (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{key}: cannot listen on {addr}: {advice}")]
    Bind { key: &'static str, addr: SocketAddr, advice: String },
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("creating the first admin from the configuration: {0}")]
    Admin(#[from] AuthError),
    #[error(transparent)]
    Mail(#[from] MailError),
    #[error("the Apple push client: {0}")]
    Push(String),
    #[error("the {task} task stopped unexpectedly; enrolld is shutting down (see the log above for why)")]
    TaskEnded { task: &'static str },
    #[error("flushing the database on shutdown failed: {0}")]
    Flush(StoreError),
    #[error(
        "putting the restored backup in place (restore-pending/ in the state directory): {0}; move it away to start with the current contents"
    )]
    Restore(io::Error),
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Shut down as asked (SIGTERM, SIGINT).
    Stopped,
    /// A restored backup waits in `restore-pending/`: run again to load it.
    Restart,
}

impl DaemonError {
    /// 2 for anything that stopped start-up (configuration, ports, state directory), 1 for a failure while
    /// running, which systemd may restart. A clock that is not set yet is not a failure: enrolld waits for it.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::TaskEnded { .. } | DaemonError::Flush(_) => 1,
            _ => 2,
        }
    }
}

/// The sockets `main` bound before handing over.
#[derive(Debug)]
pub struct Listeners {
    pub https: Option<std::net::TcpListener>,
    pub http: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds every configured listener, with a message naming the port and the fix when one cannot be bound.
    pub fn bind(config: &Config) -> Result<Listeners, DaemonError> {
        Ok(Listeners {
            https: config.https_listen.map(|addr| bind_one("https_listen", addr)).transpose()?,
            http: config.http_listen.map(|addr| bind_one("http_listen", addr)).transpose()?,
        })
    }
}

fn bind_one(key: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, DaemonError> {
    match bind_socket(addr) {
        Ok(listener) => Ok(listener),
        // A host with IPv6 switched off cannot bind [::]; every IPv4 address is the closest match.
        Err(error) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && error.raw_os_error() == Some(97) => {
            tracing::warn!(%addr, "IPv6 is not available; listening on IPv4 only");
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            bind_socket(v4).map_err(|error| bind_error(key, v4, &error))
        }
        Err(error) => Err(bind_error(key, addr, &error)),
    }
}

fn bind_socket(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Serve IPv4 too on a [::] listener, whatever the host's default.
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn bind_error(key: &'static str, addr: SocketAddr, error: &io::Error) -> DaemonError {
    let flag = key.replace('_', "-");
    let port = addr.port();
    let advice = match error.kind() {
        io::ErrorKind::AddrInUse => format!(
            "port {port} is already in use by another program (`ss -ltnp 'sport = :{port}'` shows which); stop it or choose another port with --{flag}"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "port {port} needs privilege; run with CAP_NET_BIND_SERVICE (the systemd unit grants it) or choose a port from 1024 up with --{flag}"
        ),
        io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this machine; use [::] for every address or one the machine has, with --{flag}",
            addr.ip()
        ),
        _ => format!("{error}; choose another address with --{flag}"),
    };
    DaemonError::Bind { key, addr, advice }
}

/// The outside world the daemon reads: the clock, the box's addresses, what the system says about its clock, and
/// how enrolld was started. Tests substitute their own.
#[derive(Debug, Clone)]
pub struct Environment {
    pub clock: Arc<dyn Clock>,
    pub addresses: Arc<dyn AddressSource>,
    /// The files that say whether the clock was synchronised.
    pub sync_markers: SyncMarkers,
    /// How enrolld was started: where its log, and so the setup code, goes.
    pub launch: Launch,
}

/// For tests only: a directory that stands in for `/` where enrolld looks for the clock's synchronisation
/// markers (`run/systemd/timesync/synchronized`, `sys/class/rtc/rtc0/hctosys`), so a test can say when the clock
/// is synchronised.
pub const TEST_CLOCK_ROOT_ENV: &str = "ENROLLD_TEST_CLOCK_ROOT";

impl Environment {
    /// The real machine: the wall clock, the interfaces' addresses, the system's markers, the process's own
    /// environment.
    pub fn system() -> Environment {
        let sync_markers = match std::env::var_os(TEST_CLOCK_ROOT_ENV) {
            Some(root) => SyncMarkers::under(std::path::Path::new(&root)),
            None => SyncMarkers::default(),
        };
        Environment {
            clock: Arc::new(SystemClock),
            addresses: Arc::new(SystemAddresses::default()),
            sync_markers,
            launch: Launch::detect(),
        }
    }
}

/// How often an untrusted clock is looked at again.
const CLOCK_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the clock-watch task compares the wall clock with the monotonic clock.
const CLOCK_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// The latest time seen is written to the store every this many watches (a minute).
const LATEST_TIME_EVERY: u32 = 12;

/// Runs the daemon until `shutdown` completes (or a task fails, or a restored backup asks for a restart).
pub async fn run(
    config: Config,
    state_dir: &StateDir,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    env: Environment,
) -> Result<Outcome, DaemonError> {
    let mut phases = Phases::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // The stamp only names where replaced contents go; the clock may not be trusted yet.
    if let Some(aside) =
        state_dir.install_pending_restore(&crate::state_dir::stamp(env.clock.now())).map_err(DaemonError::Restore)?
    {
        tracing::warn!(
            previous = %aside.display(),
            "the restored backup is in place; the contents it replaced were moved aside"
        );
    }
    // After a restart in-process, the last run's database handle lets go of its lock a moment after it is dropped.
    let store = Store::open_when_free(&state_dir.database(), std::time::Duration::from_secs(10))?;
    phases.mark("store");
    let https_port = listeners.https.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
    let http_port = listeners.http.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
    let configured = Names { organisation: config.mail.organisation.clone(), hostname: config.hostname.clone() };
    let names = crate::domain::saved_names_in(&store, &configured)?;
    let console = Arc::new(Console::new(
        config.console_file.clone(),
        Screen {
            organisation: names.organisation.clone(),
            hostname: names.hostname.clone(),
            mdns: config.mdns,
            https_port,
            http_port,
            ..Screen::default()
        },
    ));
    // However run ends (shutdown, a failed start), the console says enrolld stopped.
    let _stopped = MarkStopped(console.clone());
    let limits = Limits {
        request_timeout: config.request_timeout,
        max_body_bytes: config.max_body_bytes,
        import_max_bytes: config.import_max_bytes,
    };
    // Client connections may not use up the open files the store and certificates need.
    let file_limit = crate::open_files::raise_limit();
    let max_connections = crate::open_files::connection_cap(config.connections.max_connections, file_limit);
    tracing::info!(
        max_connections,
        per_address = config.connections.max_per_address,
        file_limit = file_limit.map_or_else(|| "unknown".to_owned(), |limit| limit.to_string()),
        "connection limits"
    );
    let connections =
        http::serve::Connections::new(http::serve::ConnectionLimits { max_connections, ..config.connections });

    // Nothing that depends on the time (keys, certificates, expiries, audit times) happens before the clock is
    // trusted.
    let clock_state = match wait_for_clock(
        &config,
        &env,
        &store,
        listeners.http.as_ref(),
        &console,
        (limits, &connections),
        shutdown.as_mut(),
    )
    .await?
    {
        Some(state) => state,
        None => {
            store.flush().map_err(DaemonError::Flush)?;
            tracing::info!("stopped");
            return Ok(Outcome::Stopped);
        }
    };
    store.record_time_seen(env.clock.now().unix_timestamp())?;
    let clock_status = ClockStatus::new(clock_state);
    phases.mark("clock");

    let (ca, created) = CertificateAuthority::load_or_create(&state_dir.pki(), &config.hostname, env.clock.now())?;
    if created {
        tracing::info!(subject = %ca.info().subject, sha256 = %ca.info().sha256, "created the appliance CA");
    }
    let ca = Arc::new(ca);
    phases.mark("ca");
    let policy = Policy {
        invite_validity: time::Duration::try_from(config.invite_validity).unwrap_or(time::Duration::days(7)),
        reminder_before: (config.mail.reminder_days > 0)
            .then(|| time::Duration::days(i64::from(config.mail.reminder_days))),
        confirmation_to: config.mail.confirmation_to.clone(),
        confirmation_to_user: config.mail.confirmation_to_user,
        enroll_auth: config.enroll_auth,
        ..Policy::default()
    };
    let passcode_key = crate::state_dir::secret_file(&state_dir.pki().join("passcode.key"))
        .map_err(|error| StateDirError::Unusable { dir: state_dir.pki(), reason: format!("passcode.key: {error}") })?;
    let enrollment = Enrollment::new(store.clone(), env.clock.clone(), policy, &passcode_key)?
        .with_spool_dir(state_dir.path().join("imports"));
    for import in enrollment.recover_imports()? {
        tracing::warn!(import = %import.id, state = %import.state, "{}", import.message);
    }
    let naming = Naming::new(enrollment.saved_names(&configured)?, config.mail.public_url.clone(), https_port);
    phases.mark("domain");
    let keeper = CertificateKeeper::start(
        &config,
        ca.clone(),
        store.clone(),
        env.addresses.clone(),
        state_dir.pki(),
        env.clock.clone(),
        naming.clone(),
    )?;
    phases.mark("certificates");
    let session_ttl = time::Duration::try_from(config.session_ttl).unwrap_or(time::Duration::hours(12));
    let auth = Auth::new(enrollment.clone(), session_ttl)?;
    let setup_code = auth.bootstrap(&config.admin_user, config.admin_password.as_deref())?;
    console.update(|screen| screen.setup_code = setup_code.clone());
    phases.mark("admin");
    let token = CancellationToken::new();
    let relay = config.mail.smtp.as_ref().map(|smtp| Relay::new(smtp, config.mail.max_connections)).transpose()?;
    let mail = Mail::new(&enrollment, relay, config.mail.sms.clone(), config.mail.max_connections, naming.clone())?;
    let mut state = AppState::new(
        store.clone(),
        ca.cert_pem().into(),
        env.clock.clone(),
        enrollment.clone(),
        auth.clone(),
        mail.clone(),
    );
    state.shutdown = token.clone();
    state.state_dir = Some(Arc::new(state_dir.path().to_owned()));
    let restart = state.restart.clone();
    state.naming = naming.clone();
    state.clock_status = clock_status.clone();
    state.setup_code_place = env.launch.setup_code_place(config.console_file.is_some());
    let pusher = crate::push::Pusher::new(&config.apns).map_err(|e| DaemonError::Push(e.to_string()))?;
    let serving = listeners.https.is_some().then(|| keeper.serving());
    // The device-identity CA (RSA, under the appliance CA) issues Apple identities over SCEP and Windows client
    // certificates. Loaded now if it exists; on a first start it is made after READY (RSA key generation takes
    // seconds on a small board), and until then HTTPS asks for no client certificate and the routes that need it
    // answer 503 with Retry-After.
    let (device_ca, device_ca_creation) = DeviceCa::open(&state_dir.pki(), ca.clone(), env.clock.now())?;
    state.mdm = http::mdm::Mdm::new(ca.clone(), device_ca.clone(), Some(keeper.profile_signer()), serving, pusher);
    state.tls_renewer = keeper.renewer();
    state.android = http::android::Android::new(state_dir.path().join("android"));
    let upgrades = crate::upgrade::Upgrades::new(state_dir.path(), &config.release_file, crate::upgrade::MAX_BYTES);
    if let Some(release) = upgrades.running() {
        tracing::info!(version = %release.version, arch = %release.arch, "running from the appliance image");
    }
    state.upgrades = Some(Arc::new(upgrades));
    phases.mark("services");
    let mut tasks = Tasks::default();

    let https_addr = match listeners.https {
        Some(listener) => {
            let listener = tokio_listener(listener, "https_listen")?;
            let addr = listener.local_addr().ok();
            let tls = tls::server_config(keeper.serving(), Some(device_ca.clone()))?;
            let app = http::https_router(state.clone(), limits);
            let serving =
                http::serve::serve(listener, Some(tls), app, token.clone(), config.shutdown_grace, connections.clone());
            tasks.spawn("https", serving);
            addr
        }
        None => None,
    };
    let http_addr = match listeners.http {
        Some(listener) => {
            let listener = tokio_listener(listener, "http_listen")?;
            let addr = listener.local_addr().ok();
            let app = match https_addr {
                Some(https) => {
                    let target =
                        http::RedirectTarget { port: https.port(), naming: naming.clone(), serving: keeper.serving() };
                    http::http_redirect_router(state.clone(), limits, target)
                }
                None => {
                    tracing::warn!(
                        "HTTPS is off: serving everything over plain HTTP; use this only behind a TLS proxy"
                    );
                    http::https_router(state.clone(), limits)
                }
            };
            let serving =
                http::serve::serve(listener, None, app, token.clone(), config.shutdown_grace, connections.clone());
            tasks.spawn("http", serving);
            addr
        }
        None => None,
    };
    phases.mark("listeners");
    let control_path = state_dir.control_socket();
    match crate::control::bind(&control_path) {
        Ok(listener) => {
            let control = crate::control::Control {
                enrollment: enrollment.clone(),
                state_dir: Arc::new(state_dir.path().to_owned()),
                naming: naming.clone(),
                clock: env.clock.clone(),
                slots: state.password_checks.clone(),
            };
            tasks.spawn("control", crate::control::run(listener, control_path, control, token.clone()));
        }
        Err(error) => tracing::warn!(
            %error,
            path = %control_path.display(),
            "cannot make the control socket; `enrolld backup` will not reach this daemon (a shorter --state-dir path helps if it is longer than 100 characters)"
        ),
    }
    let renewer = keeper.renewer();
    tasks.spawn("tls-keeper", keeper.run(config.cert_check_interval, token.clone()));
    let sweep_now = Arc::new(tokio::sync::Notify::new());
    tasks.spawn("invite-sweeper", sweep_invites(enrollment.clone(), sweep_now.clone(), token.clone()));
    let watcher = ClockWatcher {
        clock: env.clock.clone(),
        markers: env.sync_markers.clone(),
        check: config.clock_check,
        store: store.clone(),
        status: clock_status,
        renewer,
        sweep_now,
    };
    tasks.spawn("clock-watch", watcher.run(token.clone()));
    tasks.spawn(
        "console",
        follow_console(console.clone(), naming.subscribe(), auth.setup_code_updates(), token.clone()),
    );
    let outbox = OutboxSettings {
        mail: mail.clone(),
        max_connections: config.mail.max_connections,
        max_per_second: config.mail.max_per_second,
        retry: RetryPolicy { first: config.mail.retry_first, horizon: config.mail.retry_horizon },
        ca_sha256: ca.info().sha256.clone(),
        addresses: env.addresses.clone(),
    };
    tasks.spawn("outbox", mail::outbox::run(enrollment, outbox, token.clone()));

    let web = https_addr.map(|a| (a.port(), true)).or(http_addr.map(|a| (a.port(), false)));
    if let Some((port, https)) = web.filter(|_| config.mdns) {
        let what = Announcement { hostname: naming.hostname(), port, https, ca_sha256: ca.info().sha256.clone() };
        tasks.spawn("mdns", crate::mdns::run(what, naming.subscribe(), token.clone()));
    }

    phases.mark("tasks");
    notify_systemd(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("serving")]);
    if let Some(creation) = device_ca_creation {
        // Not one of the named tasks: it ends by design once the CA is made.
        tokio::spawn(make_device_ca(creation, token.clone()));
    }
    // What an import cut short made is removed now that enrolld answers; a background job, so shutdown waits for it
    // (it stops between batches).
    state.jobs.spawn(finish_rollbacks(state.enrollment.clone(), token.clone()));
    let ready_ms = phases.total_ms();
    let since_exec_ms = phases.since_exec_ms();
    tracing::info!(ready_ms, since_exec_ms, phases = %phases, "{}", banner(&config, &naming.names(), https_addr, http_addr, &env.addresses.addresses()));
    if let Some(code) = setup_code {
        tracing::warn!(
            "enrolld has no admin yet: open the page above and enter the setup code {code} to create one (or restart with ENROLLD_ADMIN_PASSWORD set)"
        );
    }

    let (failed, outcome) = tokio::select! {
        () = shutdown.as_mut() => (None, Outcome::Stopped),
        () = restart.cancelled() => (None, Outcome::Restart),
        name = tasks.first_to_end() => (Some(name), Outcome::Stopped),
    };
    if outcome == Outcome::Restart {
        tracing::info!("restarting to load the restored backup");
        // systemd 253 and later want the monotonic time with RELOADING=1; READY=1 follows when the next run is up.
        let mut states = vec![
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::Status("restarting to load a restored backup"),
        ];
        states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
        notify_systemd(&states);
    } else {
        tracing::info!("shutting down");
        notify_systemd(&[sd_notify::NotifyState::Stopping]);
    }
    token.cancel();
    tasks.join_all().await;
    // Import jobs stop at their next batch once the token is cancelled; what they leave is finished at the next
    // start (rolled back, or recorded as interrupted).
    state.jobs.close();
    if tokio::time::timeout(config.shutdown_grace.max(std::time::Duration::from_secs(1)), state.jobs.wait())
        .await
        .is_err()
    {
        tracing::warn!("an import did not stop in time; the next start finishes it");
    }
    if let Err(error) = store.record_time_seen(env.clock.now().unix_timestamp()) {
        tracing::warn!(%error, "recording the time at shutdown failed");
    }
    let flushed = store.flush();
    match (failed, flushed) {
        (Some(task), flushed) => {
            if let Err(error) = flushed {
                tracing::error!(%error, "flushing the database failed");
            }
            Err(DaemonError::TaskEnded { task })
        }
        (None, Err(error)) => Err(DaemonError::Flush(error)),
        (None, Ok(_)) if outcome == Outcome::Restart => Ok(Outcome::Restart),
        (None, Ok(_)) => {
            tracing::info!("stopped");
            Ok(Outcome::Stopped)
        }
    }
}

/// Marks the console text stopped when dropped.
struct MarkStopped(Arc<Console>);

impl Drop for MarkStopped {
    fn drop(&mut self) {
        self.0.update(|screen| screen.stopped = true);
    }
}

/// Judges the clock and, while it cannot be trusted, waits: systemd is told enrolld is up but waiting, plain HTTP
/// answers `/healthz` with 503 and every other page with why (HTTPS accepts nothing yet; connections wait in the
/// listen backlog), the console says what to do, and the clock is looked at again every 2 s. Returns the trusted
/// state, or `None` if `shutdown` came first.
async fn wait_for_clock(
    config: &Config,
    env: &Environment,
    store: &Store,
    http: Option<&std::net::TcpListener>,
    console: &Console,
    (limits, connections): (Limits, &http::serve::Connections),
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<ClockState>, DaemonError> {
    let latest = store.latest_time_seen()?.and_then(|unix| time::OffsetDateTime::from_unix_timestamp(unix).ok());
    let judge = || clock::judge(config.clock_check, env.clock.now(), latest, env.sync_markers.read());
    let mut state = judge();
    if state.trusted() {
        return Ok(Some(state));
    }
    let tell = |state: &ClockState| {
        tracing::warn!(
            clock = state.as_str(),
            "{}. enrolld makes no keys or certificates until it is right, and looks again every {} s. {CLOCK_ADVICE}.",
            state.describe(),
            CLOCK_RECHECK.as_secs()
        );
        notify_systemd(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("waiting for the clock: {}", state.describe())),
        ]);
        console.update(|screen| screen.clock_problem = Some(state.describe()));
    };
    tell(&state);
    let (report, reports) = tokio::sync::watch::channel(state);
    let token = CancellationToken::new();
    let server = match http {
        Some(listener) => {
            let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
            // A second handle on the same socket: the waiting page serves on it, then drops it, and the listener
            // itself goes on to serve normally without a moment of refused connections.
            let clone = listener.try_clone().map_err(|error| bind_error("http_listen", addr, &error))?;
            let listener = tokio_listener(clone, "http_listen")?;
            let app = http::waiting_router(reports, limits);
            let grace = std::time::Duration::from_secs(1);
            Some(tokio::spawn(http::serve::serve(listener, None, app, token.clone(), grace, connections.clone())))
        }
        None => None,
    };
    let trusted = loop {
        tokio::select! {
            () = shutdown.as_mut() => break None,
            () = tokio::time::sleep(CLOCK_RECHECK) => {}
        }
        let now = judge();
        if now.trusted() {
            break Some(now);
        }
        if now.as_str() != state.as_str() {
            tell(&now);
        }
        report.send_replace(now);
        state = now;
    };
    token.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    if let Some(state) = &trusted {
        tracing::info!(clock = state.as_str(), "{}; starting", state.describe());
        notify_systemd(&[sd_notify::NotifyState::Status("starting")]);
        console.update(|screen| screen.clock_problem = None);
    }
    Ok(trusted)
}

/// Watches the clock while enrolld runs: a step of more than a minute is logged, shown on the dashboard, and has
/// the certificate keeper check its certificate and the invite sweeper run at once; the latest time seen goes to
/// the store once a minute; and the synchronisation state follows the system's markers.
struct ClockWatcher {
    clock: Arc<dyn Clock>,
    markers: SyncMarkers,
    check: ClockCheck,
    store: Store,
    status: ClockStatus,
    renewer: tls::Renewer,
    sweep_now: Arc<tokio::sync::Notify>,
}

impl ClockWatcher {
    async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(CLOCK_WATCH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut detector = JumpDetector::new(self.clock.now(), std::time::Instant::now());
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = self.clock.now();
            if let Some(jump) = detector.sample(now, std::time::Instant::now()) {
                tracing::warn!(
                    "the clock jumped {}; checking the HTTPS certificate and invite expiry again",
                    jump.describe()
                );
                self.status.jumped(jump);
                self.renewer.check_now();
                self.sweep_now.notify_one();
            }
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(LATEST_TIME_EVERY) {
                if let Err(error) = self.store.record_time_seen(now.unix_timestamp()) {
                    tracing::warn!(%error, "recording the time failed");
                }
                // Once trusted, the clock stays trusted (a jump is checked, not waited for); what is shown follows
                // the markers, such as NTP's first answer after a start on a plausible clock.
                let verdict = clock::judge(self.check, now, None, self.markers.read());
                if verdict.trusted() && verdict != self.status.report().state {
                    tracing::info!(clock = verdict.as_str(), "{}", verdict.describe());
                    self.status.set_state(verdict);
                }
            }
        }
    }
}

/// Where start-up time goes, phase by phase: logged with the ready line, so a slow board's first start can be read
/// from its journal.
struct Phases {
    started: std::time::Instant,
    last: std::time::Instant,
    marks: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn new() -> Phases {
        let now = std::time::Instant::now();
        Phases { started: now, last: now, marks: Vec::new() }
    }

    /// Ends the phase called `name` now.
    fn mark(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        self.marks.push((name, now - self.last));
        self.last = now;
    }

    fn total_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }

    /// Milliseconds since the process started (the kernel's count, in its clock ticks): what came before `run`,
    /// loading the binary, the configuration and the state directory's lock among it. `None` off Linux.
    fn since_exec_ms(&self) -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces; starttime is field 22.
        let started_ticks: u64 = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
        let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
        // USER_HZ is 100 on every Linux architecture enrolld is built for.
        let started_ms = started_ticks.checked_mul(10)?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let now_ms = (uptime * 1000.0) as u64;
        now_ms.checked_sub(started_ms)
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, took)) in self.marks.iter().enumerate() {
            write!(f, "{}{name} {} ms", if i == 0 { "" } else { ", " }, took.as_millis())?;
        }
        Ok(())
    }
}

/// Removes what all-or-nothing imports cut short by a crash made (`recover_imports` marked them `rolling_back`
/// before READY), on the blocking pool, until `shutdown`; an import that fails to roll back, or is stopped, is taken
/// up again at the next start.
async fn finish_rollbacks(enrollment: Enrollment, shutdown: CancellationToken) {
    let removing = move || {
        let stop = || shutdown.is_cancelled();
        enrollment.finish_rollbacks(&stop, &mut |import| tracing::info!(import = %import.id, "{}", import.message))
    };
    match tokio::task::spawn_blocking(removing).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::error!(%error, "rolling back an import cut short failed; it is tried again at the next start")
        }
        Err(error) => tracing::error!(%error, "rolling back an import cut short failed unexpectedly"),
    }
}

/// Makes the device-identity CA off the path to READY (RSA key generation on the blocking pool), trying again
/// every minute if that fails (a full disk, say); the pending handle answers for it meanwhile.
async fn make_device_ca(creation: DeviceCaCreation, shutdown: CancellationToken) {
    let creation = Arc::new(creation);
    loop {
        let started = std::time::Instant::now();
        let job = creation.clone();
        match tokio::task::spawn_blocking(move || job.run()).await {
            Ok(Ok(())) => {
                let took_ms = started.elapsed().as_millis();
                tracing::info!(took_ms, "the device-identity CA is ready: SCEP and Windows enrollment can issue");
                return;
            }
            Ok(Err(error)) => tracing::error!(%error, "making the device-identity CA failed; trying again in a minute"),
            Err(error) => tracing::error!(%error, "making the device-identity CA failed; trying again in a minute"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}

/// Keeps the console's text in step with the names an admin saves and the setup code (gone once the first admin
/// exists).
async fn follow_console(
    console: Arc<Console>,
    mut names: tokio::sync::watch::Receiver<Names>,
    mut setup_code: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Ok(()) = names.changed() => {}
            Ok(()) = setup_code.changed() => {}
        }
        let (names, code) = (names.borrow_and_update().clone(), setup_code.borrow_and_update().clone());
        console.update(|screen| {
            screen.organisation = names.organisation;
            screen.hostname = names.hostname;
            screen.setup_code = code;
        });
    }
}

fn tokio_listener(listener: std::net::TcpListener, key: &'static str) -> Result<tokio::net::TcpListener, DaemonError> {
    let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    listener.set_nonblocking(true).map_err(|error| bind_error(key, addr, &error))?;
    tokio::net::TcpListener::from_std(listener).map_err(|error| bind_error(key, addr, &error))
}

/// Marks invites expired as their time runs out (listing and counting also sweep, so this keeps remarks and the
/// audit log timely); every minute, and at once when `now` is notified (the clock jumped).
async fn sweep_invites(enrollment: Enrollment, now: Arc<tokio::sync::Notify>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            () = now.notified() => {}
        }
        let domain = enrollment.clone();
        match tokio::task::spawn_blocking(move || domain.sweep_expired()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(expired)) => tracing::info!(expired, "invites expired"),
            Ok(Err(error)) => tracing::error!(%error, "expiring invites failed; trying again in a minute"),
            Err(error) => tracing::error!(%error, "the invite sweeper panicked; trying again in a minute"),
        }
        // One-time secrets that expired unused (password links, SCEP challenges) are removed.
        let domain = enrollment.clone();
        let swept = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::domain::DomainError>(domain.sweep_account_links()? + domain.sweep_scep_challenges()?)
        })
        .await;
        if let Ok(Err(error)) = swept {
            tracing::error!(%error, "removing expired one-time links failed; trying again in a minute");
        }
    }
}

/// The daemon's long-running tasks, by name, so the log says which one stopped.
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    fn name(&self, id: Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("unnamed")
    }

    /// Waits for whichever task ends first (none should before shutdown) and returns its name.
    async fn first_to_end(&mut self) -> &'static str {
        match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) => self.name(id),
            Some(Err(error)) => self.name(error.id()),
            None => std::future::pending().await,
        }
    }

    /// Waits for every task to finish after the shutdown signal.
    async fn join_all(&mut self) {
        while let Some(result) = self.set.join_next_with_id().await {
            match result {
                Ok((id, ())) => tracing::debug!(task = self.name(id), "stopped"),
                Err(error) => tracing::error!(task = self.name(error.id()), %error, "task failed"),
            }
        }
    }
}

fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// One line that tells the admin where to go.
fn banner(
    config: &Config,
    names: &Names,
    https: Option<SocketAddr>,
    http: Option<SocketAddr>,
    addresses: &[std::net::IpAddr],
) -> String {
    let url = |scheme: &str, host: &str, port: u16, default: u16| {
        if port == default { format!("{scheme}://{host}/") } else { format!("{scheme}://{host}:{port}/") }
    };
    let (scheme, port, default) = match (https, http) {
        (Some(a), _) => ("https", a.port(), 443),
        (None, Some(a)) => ("http", a.port(), 80),
        (None, None) => ("https", 0, 443),
    };
    let mut line =
        format!("enrolld {} ready: open {}", env!("CARGO_PKG_VERSION"), url(scheme, &names.mdns_name(), port, default));
    let others: Vec<String> = addresses
        .iter()
        .map(|ip| match ip {
            std::net::IpAddr::V4(v4) => url(scheme, &v4.to_string(), port, default),
            std::net::IpAddr::V6(v6) => url(scheme, &format!("[{v6}]"), port, default),
        })
        .collect();
    if !others.is_empty() {
        line.push_str(&format!(" (or {})", others.join(", ")));
    }
    if let Some(http) = http {
        line.push_str(&format!("; CA certificate: {}ca.crt", url("http", &names.mdns_name(), http.port(), 80)));
    }
    if !config.mdns {
        line.push_str("; mDNS is off, so use an address");
    }
    line
}
