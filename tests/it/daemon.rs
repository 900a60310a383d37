//! The daemon as a black box: its CA over plain HTTP, HTTPS that a client trusting only that CA accepts by name and
//! by address, the same identity after a restart, a clean SIGTERM, and the operational subcommands.

use std::net::IpAddr;
use std::time::Duration;

use rustls_pki_types::ServerName;

use crate::common::{self, Daemon, get_plain, get_tls, parse_pem_certs, run, stderr};

#[tokio::test(flavor = "multi_thread")]
async fn https_with_its_own_ca_and_the_same_identity_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);

    let ca = get_plain(daemon.http, "enroll.local", "/ca.crt").await;
    assert_eq!(ca.status, 200);
    assert_eq!(ca.headers["content-type"], "application/x-x509-ca-cert");
    let roots = parse_pem_certs(&ca.body);
    assert_eq!(roots.len(), 1);

    let by_name = ServerName::try_from("enroll.local").unwrap();
    let fetched = get_tls(daemon.https, by_name.clone(), &roots, "/healthz").await.unwrap();
    assert_eq!(fetched.status, 200);
    assert!(fetched.body.contains("\"status\":\"ok\""), "{}", fetched.body);
    let leaf = fetched.peer_chain[0].clone();
    assert_eq!(fetched.peer_chain[1], roots[0], "the chain carries the CA");

    let by_address = ServerName::IpAddress("127.0.0.1".parse::<IpAddr>().unwrap().into());
    assert_eq!(get_tls(daemon.https, by_address, &roots, "/ca.crt").await.unwrap().status, 200);

    // Verification is real: a name the certificate does not carry is refused, and so is any other CA.
    let wrong_name = ServerName::try_from("intranet.example.com").unwrap();
    let refused = get_tls(daemon.https, wrong_name, &roots, "/healthz").await.err().unwrap();
    assert!(refused.contains("not valid for name \"intranet.example.com\""), "{refused}");
    let other_ca = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.der().clone();
    assert!(get_tls(daemon.https, by_name.clone(), &[other_ca], "/healthz").await.is_err());

    // Plain HTTP redirects everything but /healthz and /ca.crt to HTTPS on the same host.
    let redirected = get_plain(daemon.http, "enroll.local", "/admin").await;
    assert_eq!(redirected.status, 307);
    assert_eq!(redirected.headers["location"], format!("https://enroll.local:{}/admin", daemon.https.port()));

    daemon.wait_for_log("ready: open https://enroll.local:");
    let (status, took) = daemon.terminate();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");

    let daemon = Daemon::start(&state, &[]);
    let again = get_plain(daemon.http, "enroll.local", "/ca.crt").await;
    assert_eq!(parse_pem_certs(&again.body), roots, "same CA after restart");
    let fetched = get_tls(daemon.https, by_name, &roots, "/healthz").await.unwrap();
    assert_eq!(fetched.peer_chain[0], leaf, "same server certificate after restart");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_an_admin_supplied_certificate_instead() {
    let dir = tempfile::tempdir().unwrap();
    let issued = rcgen::generate_simple_self_signed(vec!["mdm.example.com".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, issued.cert.pem()).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();

    let args = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let daemon = Daemon::start(&dir.path().join("state"), &args);
    let name = ServerName::try_from("mdm.example.com").unwrap();
    let fetched = get_tls(daemon.https, name, &[issued.cert.der().clone()], "/healthz").await.unwrap();
    assert_eq!(fetched.status, 200);
    assert_eq!(fetched.peer_chain[0], *issued.cert.der());
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[test]
fn healthcheck_says_why_when_nothing_answers() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port().to_string();
    let state = dir.path().to_str().unwrap();
    let out = run(&["healthcheck", "--state-dir", state, "--http-listen", &format!("127.0.0.1:{port}")], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is enrolld running?"), "{}", stderr(&out));
}

#[test]
fn check_config_shows_each_value_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("enrolld.toml");
    std::fs::write(&file, "hostname = \"mdm\"\nhttps_listen = \"[::]:443\"\n").unwrap();
    let out = run(
        &["check-config", "--config", file.to_str().unwrap(), "--http-listen", "off"],
        &[("ENROLLD_EXTRA_SANS", "mdm.example.com, 10.1.2.3")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("hostname = \"mdm\"  # in {} line 1", file.display())), "{text}");
    assert!(text.contains("http_listen = \"off\"  # from --http-listen"), "{text}");
    assert!(text.contains("extra_sans = \"mdm.example.com, 10.1.2.3\"  # from environment variable"), "{text}");
    assert!(text.contains("mdns = \"true\"  # (built-in default)"), "{text}");
    assert!(text.contains("configuration OK"), "{text}");
    assert!(!dir.path().join("enrolld-data").exists(), "check-config creates nothing");
}

#[test]
fn version_prints_the_crate_version() {
    let out = run(&["version"], &[]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("enrolld {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn systemd_is_told_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let daemon = Daemon::spawn(&dir.path().join("state"), &[], &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    let mut buffer = [0u8; 512];
    let received = socket.recv(&mut buffer).unwrap();
    let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(message.contains("READY=1"), "{message}");
    daemon.wait_healthy();
    let pid = daemon.pid();
    common::signal(pid, nix::sys::signal::Signal::SIGTERM);
    let received = socket.recv(&mut buffer).unwrap();
    assert!(String::from_utf8_lossy(&buffer[..received]).contains("STOPPING=1"));
    assert_eq!(daemon.wait_exit().0.code(), Some(0));
}
