//! The fixture: start the built binary, wait for `healthcheck`, stop it with SIGTERM; and small HTTP/TLS clients.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_enrolld");

/// The admin password every test appliance is started with.
pub const PASSWORD: &str = "staple battery horse";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct ports nobody listens on right now: taken together, since two sockets bound and closed one after the
/// other can be given the same port.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    std::array::from_fn(|n| held[n].local_addr().unwrap().port())
}

/// Runs `enrolld ARGS` to completion with no inherited `ENROLLD_*` variables.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().unwrap()
}

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("ENROLLD_") || key == "NOTIFY_SOCKET" {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A running `enrolld serve`, stopped with SIGTERM when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub state_dir: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on loopback with mDNS off and waits until `healthcheck` passes.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Daemon {
        let daemon = Self::spawn(state_dir, extra, &[]);
        daemon.wait_healthy();
        daemon
    }

    pub fn spawn(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::spawn_limited(state_dir, extra, env, None)
    }

    /// As [`Daemon::spawn`], with the daemon's open-file limit (soft and hard) set to `file_limit` (by `prlimit`,
    /// which then runs enrolld in its own process).
    pub fn spawn_limited(state_dir: &Path, extra: &[&str], env: &[(&str, &str)], file_limit: Option<u64>) -> Daemon {
        let [https, http] = free_ports::<2>().map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let log = state_dir.with_extension(format!("{}.log", https.port()));
        let state = state_dir.to_str().unwrap();
        let (https_arg, http_arg) = (https.to_string(), http.to_string());
        let mut args =
            vec!["serve", "--state-dir", state, "--https-listen", &https_arg, "--http-listen", &http_arg, "--no-mdns"];
        args.extend_from_slice(extra);
        let mut command = command(&args, env);
        if let Some(limit) = file_limit {
            let plain = command;
            command = Command::new("prlimit");
            command.arg(format!("--nofile={limit}:{limit}")).arg("--").arg(plain.get_program()).args(plain.get_args());
            for (key, value) in plain.get_envs() {
                match value {
                    Some(value) => command.env(key, value),
                    None => command.env_remove(key),
                };
            }
        }
        let child = command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        Daemon { child: Some(child), https, http, state_dir: state_dir.to_owned(), log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon's log holds `text` (the log is written just after the listeners start serving).
    pub fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "{text:?} never appeared in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Polls `enrolld healthcheck` (as an admin's monitoring would) until it passes.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (https, http) = (self.https.to_string(), self.http.to_string());
        let state = self.state_dir.to_str().unwrap();
        loop {
            let out =
                run(&["healthcheck", "--state-dir", state, "--https-listen", &https, "--http-listen", &http], &[]);
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "daemon never became healthy: {}\nlog:\n{}", stderr(&out), self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the device-identity CA is ready (on a first start it is made after the daemon is ready):
    /// SCEP GetCACert answers 200, and HTTPS asks for client certificates.
    pub async fn wait_device_ca(&self) {
        let ca = parse_pem_certs(&get_plain(self.http, "enroll.local", "/ca.crt").await.body).remove(0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = "/scep?operation=GetCACert";
            let (status, _, _) = fetch_bytes(self.https, &ca, hyper::Method::GET, path, &[], Vec::new()).await;
            if status == 200 {
                return;
            }
            assert_eq!(status, 503, "GetCACert answered neither 200 nor 503");
            assert!(Instant::now() < deadline, "the device-identity CA was never made:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit, returning the status and how long it took.
    pub fn terminate(mut self) -> (ExitStatus, Duration) {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = wait_with_deadline(&mut child, Duration::from_secs(30));
        (status, started.elapsed())
    }

    /// Waits for the process to exit by itself (a start-up failure).
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = wait_with_deadline(&mut child, Duration::from_secs(30));
        (status, self.log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

pub fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(stderr) = child.stderr.as_mut() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("process did not exit within {limit:?}; killed. {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A response as the tests see it.
pub struct Fetched {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
    /// The server's certificate chain, for TLS fetches.
    pub peer_chain: Vec<CertificateDer<'static>>,
}

/// `GET path` over plain HTTP.
pub async fn get_plain(addr: SocketAddr, host: &str, path: &str) -> Fetched {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut fetched = send(stream, host, hyper::Method::GET, path, None, None).await;
    fetched.peer_chain = Vec::new();
    fetched
}

/// `GET path` over TLS to `addr`, verifying the server as `server_name` against `roots` only.
pub async fn get_tls(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    roots: &[CertificateDer<'static>],
    path: &str,
) -> Result<Fetched, String> {
    let config = client_config(roots);
    let stream = TcpStream::connect(addr).await.unwrap();
    let host = match &server_name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => String::new(),
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, stream)
        .await
        .map_err(|e| e.to_string())?;
    let chain =
        tls.get_ref().1.peer_certificates().unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
    let mut fetched = send(tls, &host, hyper::Method::GET, path, None, None).await;
    fetched.peer_chain = chain;
    Ok(fetched)
}

/// A TLS client (ring provider) that trusts only `roots`.
pub fn client_config(roots: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth()
}

/// A JSON API call over TLS to `https://enroll.local` at `addr`, trusting only `ca`.
pub async fn api(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: hyper::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let config = client_config(std::slice::from_ref(ca));
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("enroll.local").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap();
    let fetched = send(tls, "enroll.local", method, path, bearer, body).await;
    (fetched.status, serde_json::from_str(&fetched.body).unwrap_or(serde_json::Value::Null))
}

async fn send<S>(
    stream: S,
    host: &str,
    method: hyper::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<serde_json::Value>,
) -> Fetched
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, host);
    if let Some(token) = bearer {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(json) => {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(json.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let request = request.body(body).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Fetched { status, headers, body: String::from_utf8_lossy(&body).into_owned(), peer_chain: Vec::new() }
}

/// A browser-like request over TLS to `https://enroll.local` at `addr`: extra headers (a cookie, a User-Agent)
/// and an optional form body.
pub async fn browse(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> Fetched {
    let mut headers = headers.to_vec();
    if form.is_some() {
        headers.push(("content-type", "application/x-www-form-urlencoded"));
    }
    let body = form.unwrap_or_default().as_bytes().to_vec();
    let (status, headers, body) = fetch_bytes(addr, ca, method, path, &headers, body).await;
    Fetched { status, headers, body: String::from_utf8_lossy(&body).into_owned(), peer_chain: Vec::new() }
}

/// A request over TLS to `https://enroll.local` at `addr` with a byte body and headers, answered in bytes (for
/// profiles, SCEP and plists).
pub async fn fetch_bytes(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    let config = client_config(std::slice::from_ref(ca));
    let stream = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("enroll.local").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, "enroll.local");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from(body))).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

pub fn parse_pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}
