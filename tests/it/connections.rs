//! Connections cannot exhaust the box: the real binary, held to 1,024 open files, under 2,000 idle TLS connections
//! from several loopback addresses, still answers `/healthz` and the API, and closes the idle connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::io::AsyncReadExt as _;

use crate::common::{Daemon, PASSWORD, api, client_config, get_plain, get_tls, parse_pem_certs};

const IDLE: usize = 2_000;
const FILE_LIMIT: u64 = 1_024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon's open descriptors and resident memory (KiB).
fn files_and_rss(pid: u32) -> (usize, u64) {
    let files = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (files, rss)
}

/// One idle client: connect from `source`, finish the TLS handshake, send nothing, and read until the server
/// closes. How long the connection stayed open after the handshake, or `None` if it never got that far.
async fn idle_client(
    source: IpAddr,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    attempted: Arc<AtomicUsize>,
) -> Option<Duration> {
    let attempt = Attempt(attempted);
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    let tcp = tokio::time::timeout(Duration::from_secs(30), socket.connect(addr)).await.ok()?.ok()?;
    let name = ServerName::try_from("enroll.local").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let mut tls = tokio::time::timeout(Duration::from_secs(30), handshake).await.ok()?.ok()?;
    let open = Instant::now();
    drop(attempt);
    let mut buffer = [0u8; 1024];
    // Bounded: a server that never closes fails the test below rather than hanging it.
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while matches!(tls.read(&mut buffer).await, Ok(n) if n > 0) {}
    })
    .await;
    Some(open.elapsed())
}

/// Counts a client whose connection attempt is over (through the handshake, or refused), however it ended.
struct Attempt(Arc<AtomicUsize>);

impl Drop for Attempt {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_leave_room_for_health_and_the_admin_and_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let idle_secs = IDLE_TIMEOUT.as_secs().to_string();
    let env = [
        ("ENROLLD_ADMIN_PASSWORD", PASSWORD),
        ("ENROLLD_IDLE_TIMEOUT_SECS", idle_secs.as_str()),
        ("ENROLLD_HEADER_READ_TIMEOUT_SECS", idle_secs.as_str()),
        ("ENROLLD_TLS_HANDSHAKE_TIMEOUT_SECS", "5"),
        // 250 from each of 8 addresses: the total cap, not the share per address, is what holds.
        ("ENROLLD_MAX_CONNECTIONS_PER_ADDRESS", "250"),
    ];
    let daemon = Daemon::spawn_limited(&dir.path().join("state"), &[], &env, Some(FILE_LIMIT));
    daemon.wait_healthy();
    let log = daemon.wait_for_log("connection limits");
    assert!(log.contains("max_connections=896"), "1,024 files leave 896 connections:\n{log}");
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (status, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    assert_eq!(status, 200, "{signed_in}");
    let token = signed_in["token"].as_str().unwrap().to_owned();
    let pid = daemon.pid();
    let (files_before, rss_before) = files_and_rss(pid);

    // The daemon's descriptors, sampled while the idle connections come and go.
    let done = Arc::new(AtomicBool::new(false));
    let most_files = Arc::new(AtomicUsize::new(0));
    let most_rss = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, most_files, most_rss) = (done.clone(), most_files.clone(), most_rss.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let (files, rss) = files_and_rss(pid);
                most_files.fetch_max(files, Ordering::Relaxed);
                most_rss.fetch_max(usize::try_from(rss).unwrap(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let config = Arc::new(client_config(std::slice::from_ref(&ca)));
    let opened = Instant::now();
    let attempted = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..IDLE {
        let source = IpAddr::from([127, 0, 0, 2 + u8::try_from(i / 250).unwrap()]);
        clients.spawn(idle_client(source, daemon.https, config.clone(), attempted.clone()));
    }
    // Once every client has had its go (the daemon holding as many as it will, idle), /healthz (both listeners)
    // and the API answer within a second.
    let deadline = Instant::now() + Duration::from_secs(60);
    while attempted.load(Ordering::Relaxed) < IDLE {
        assert!(Instant::now() < deadline, "the idle connections never got in:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opening = opened.elapsed();
    let settled = Instant::now();
    let (files_full, rss_full) = files_and_rss(pid);
    assert!(files_full > files_before + 500, "{files_full} descriptors open after the opening ({opening:?})");
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(get_plain(daemon.http, "enroll.local", "/healthz").await.status, 200);
        let plain = started.elapsed();
        let started = Instant::now();
        let name = ServerName::try_from("enroll.local").unwrap();
        let health = get_tls(daemon.https, name, std::slice::from_ref(&ca), "/healthz").await.unwrap();
        assert_eq!(health.status, 200);
        let tls = started.elapsed();
        let started = Instant::now();
        let (status, dashboard) = api(daemon.https, &ca, Method::GET, "/api/v1/dashboard", Some(&token), None).await;
        assert_eq!(status, 200, "{dashboard}");
        let admin = started.elapsed();
        eprintln!("with the idle connections open: /healthz {plain:?} (HTTP), {tls:?} (HTTPS), dashboard {admin:?}");
        for took in [plain, tls, admin] {
            assert!(took < Duration::from_secs(1), "{took:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every connection still open when the opening ended is closed by the daemon within the idle timeout (the
    // clients' own times are not used: during the opening they lag behind, busy with their handshakes).
    let mut served = 0;
    while let Some(open) = clients.join_next().await {
        served += usize::from(open.unwrap().is_some());
    }
    let all_closed = settled.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(served >= 896, "only {served} of {IDLE} connections finished their handshake");
    assert!(
        all_closed < IDLE_TIMEOUT + Duration::from_millis(1500),
        "the last closed {all_closed:?} after the opening"
    );
    let most_files = most_files.load(Ordering::Relaxed);
    assert!(most_files < usize::try_from(FILE_LIMIT).unwrap() - 64, "{most_files} descriptors open at most");
    let log = daemon.log();
    assert!(!log.contains("Too many open files"), "{log}");
    let (files_after, rss_after) = files_and_rss(pid);
    assert!(files_after <= files_before + 8, "{files_before} descriptors before, {files_after} after");
    eprintln!(
        "{IDLE} idle TLS connections at a {FILE_LIMIT} file limit: {served} served, opened in {opening:?}, all \
         closed {all_closed:?} after that; descriptors {files_before} → {files_full} (most {most_files}) → \
         {files_after}; RSS {rss_before} KiB → {rss_full} KiB (most {} KiB) → {rss_after} KiB",
        most_rss.load(Ordering::Relaxed)
    );
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

/// A body over the limit sent over HTTP/2 gets the 413 and its JSON error, seen by a stock client (curl) that is
/// still sending when the answer comes; declared larger than any route takes, and just over the JSON limit.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_over_http2_gets_the_json_413() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(&dir.path().join("state"), &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    daemon.wait_healthy();
    let ca_pem = get_plain(daemon.http, "enroll.local", "/ca.crt").await.body;
    let ca = parse_pem_certs(&ca_pem).remove(0);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    let token = signed_in["token"].as_str().unwrap().to_owned();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    for size in [3 << 20, 30 << 20] {
        let body = dir.path().join("body.json");
        std::fs::write(&body, vec![b' '; size]).unwrap();
        let resolve = format!("enroll.local:{}:127.0.0.1", daemon.https.port());
        let url = format!("https://enroll.local:{}/api/v1/users", daemon.https.port());
        let output = std::process::Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "30", "--resolve", &resolve, "--cacert"])
            .arg(&ca_file)
            .args(["-H", &format!("authorization: Bearer {token}"), "-H", "content-type: application/json"])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .args(["-w", "\n%{http_code} %{http_version}", &url])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{size} bytes: {out}{}", String::from_utf8_lossy(&output.stderr));
        let (json, status) = out.rsplit_once('\n').unwrap();
        assert_eq!(status, "413 2", "{size} bytes: {out}");
        let json: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(json["error"], "too_large", "{json}");
    }
}
