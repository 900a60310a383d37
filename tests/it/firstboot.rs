//! A new box's first start as a black box: the console file with the address and the setup code (the same code
//! after a restart, gone after setup), and a clock that is not synchronised yet (nothing made or served over
//! HTTPS until it is).

use std::path::Path;
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;

use crate::common::{self, Daemon, PASSWORD, get_plain, get_tls, parse_pem_certs};

/// The setup code the daemon logged.
fn logged_code(daemon: &Daemon) -> String {
    let log = daemon.wait_for_log("enter the setup code ");
    let after = log.split("enter the setup code ").nth(1).unwrap();
    after.chars().take(14).collect()
}

/// Waits until the console file satisfies `wanted`, and returns it.
fn console_when(path: &Path, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if wanted(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "the console file never got there:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_setup_code_stays_the_same_across_restarts_and_leaves_the_console_with_setup() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let console = dir.path().join("console.issue");
    let args = ["--console-file", console.to_str().unwrap()];

    let daemon = Daemon::start(&state, &args);
    let code = logged_code(&daemon);
    let shown = console_when(&console, |text| text.contains("First-run setup code"));
    assert!(shown.contains(&format!("First-run setup code: {code}\n")), "{shown}");
    assert!(shown.contains(&format!("https://\\4:{}/", daemon.https.port())), "{shown}");
    assert_eq!(daemon.terminate().0.code(), Some(0));
    let stopped = std::fs::read_to_string(&console).unwrap();
    assert!(stopped.contains("(stopped)") && !stopped.contains(&code), "{stopped}");

    let daemon = Daemon::start(&state, &args);
    assert_eq!(logged_code(&daemon), code, "a restart keeps the code");
    console_when(&console, |text| text.contains(&code) && !text.contains("(stopped)"));

    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    // Started neither by systemd nor on a terminal, with a console file: the page names those two places.
    let page = common::browse(daemon.https, &ca, hyper::Method::GET, "/admin/setup", &[], None).await;
    let place = "shown on the box&#x27;s screen or serial console, and in enrolld&#x27;s log,";
    assert!(page.body.contains(place) && !page.body.contains("journalctl"), "{}", page.body);
    let claim = serde_json::json!({"setup_code": "WRONG-CODE-XXX", "username": "admin", "password": PASSWORD});
    let (status, _) = common::api(daemon.https, &ca, hyper::Method::POST, "/api/v1/setup", None, Some(claim)).await;
    assert_eq!(status, 403);
    let claim = serde_json::json!({"setup_code": code, "username": "admin", "password": PASSWORD});
    let (status, body) = common::api(daemon.https, &ca, hyper::Method::POST, "/api/v1/setup", None, Some(claim)).await;
    assert_eq!(status, 200, "{body}");
    let managed = console_when(&console, |text| !text.contains("setup code"));
    let admin_page = format!("Signed-in admins manage the box at https://\\4:{}/admin", daemon.https.port());
    assert!(managed.contains(&admin_page), "{managed}");
    assert_eq!(daemon.terminate().0.code(), Some(0));

    let daemon = Daemon::start(&state, &args);
    let log = daemon.wait_for_log("ready: open");
    assert!(!log.contains("setup code"), "no code once set up:\n{log}");
    assert!(!std::fs::read_to_string(&console).unwrap().contains(&code));
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unsynchronised_clock_holds_everything_back_until_ntp_sets_it() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let (state, root, console) = (dir.path().join("state"), dir.path().join("root"), dir.path().join("console"));
    std::fs::create_dir(&root).unwrap();
    let notify = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let daemon = Daemon::spawn(
        &state,
        &["--clock-check", "synchronised", "--console-file", console.to_str().unwrap()],
        &[("ENROLLD_TEST_CLOCK_ROOT", root.to_str().unwrap()), ("NOTIFY_SOCKET", notify.to_str().unwrap())],
    );

    // systemd hears that enrolld is up, and why it does not serve yet.
    let mut buffer = [0u8; 512];
    let received = socket.recv(&mut buffer).unwrap();
    let message = String::from_utf8_lossy(&buffer[..received]).into_owned();
    assert!(message.contains("READY=1") && message.contains("STATUS=waiting for the clock"), "{message}");

    let health = get_plain(daemon.http, "enroll.local", "/healthz").await;
    assert_eq!(health.status, 503, "{}", health.body);
    let json: serde_json::Value = serde_json::from_str(&health.body).unwrap();
    assert_eq!((json["status"].as_str(), json["clock"].as_str()), (Some("waiting_for_clock"), Some("unsynchronised")));
    let page = get_plain(daemon.http, "enroll.local", "/admin/setup").await;
    assert_eq!(page.status, 503);
    assert!(page.body.contains("waiting for the clock") && page.body.contains("UDP port 123"), "{}", page.body);
    let (https, http) = (daemon.https.to_string(), daemon.http.to_string());
    let check = common::run(&["healthcheck", "--https-listen", &https, "--http-listen", &http], &[]);
    assert_eq!(check.status.code(), Some(1), "monitoring sees it is not serving");
    assert!(common::stderr(&check).contains("waiting_for_clock"), "{}", common::stderr(&check));

    // HTTPS accepts nothing: a handshake gets no answer.
    let name = ServerName::try_from("enroll.local").unwrap();
    let any_ca = [rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.der().clone()];
    let attempt = tokio::time::timeout(Duration::from_secs(1), get_tls(daemon.https, name.clone(), &any_ca, "/"));
    assert!(attempt.await.is_err(), "HTTPS answered while the clock was not trusted");
    // Nothing that depends on the time was made.
    assert!(!state.join("pki").exists(), "keys made before the clock was trusted");
    let waiting = console_when(&console, |text| text.contains("Waiting for the clock"));
    assert!(waiting.contains("UDP port 123") && !waiting.contains("setup code:"), "{waiting}");

    let timesync = root.join("run/systemd/timesync");
    std::fs::create_dir_all(&timesync).unwrap();
    std::fs::write(timesync.join("synchronized"), "").unwrap();
    daemon.wait_healthy();
    assert!(state.join("pki/ca.key").exists(), "the CA is made once the clock is trusted");
    let health = get_plain(daemon.http, "enroll.local", "/healthz").await;
    let json: serde_json::Value = serde_json::from_str(&health.body).unwrap();
    assert_eq!((json["status"].as_str(), json["clock"].as_str()), (Some("ok"), Some("synchronised")));
    let roots = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body);
    assert_eq!(get_tls(daemon.https, name, &roots, "/healthz").await.unwrap().status, 200);
    let shown = console_when(&console, |text| text.contains("First-run setup code"));
    assert!(!shown.contains("Waiting for the clock"), "{shown}");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn scep_answers_at_once_right_after_a_first_start_then_works() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let started = Instant::now();
    loop {
        let path = "/scep?operation=GetCACert";
        let fetch = common::fetch_bytes(daemon.https, &ca, hyper::Method::GET, path, &[], Vec::new());
        let (status, headers, _) = tokio::time::timeout(Duration::from_secs(2), fetch).await.expect("SCEP hung");
        match status {
            200 => break,
            503 => assert!(headers.contains_key("retry-after"), "a 503 says when to come back"),
            other => panic!("GetCACert answered {other}"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the device-identity CA was never made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.join("pki/scep.key").exists());
    let log = daemon.log();
    assert!(log.contains("the device-identity CA is ready"), "{log}");
    // Made after READY: the banner comes first.
    assert!(log.find("ready: open") < log.find("the device-identity CA is ready"), "{log}");
    assert_eq!(daemon.terminate().0.code(), Some(0));

    // A restart loads it before serving: no 503.
    let daemon = Daemon::start(&state, &[]);
    let (status, _, _) =
        common::fetch_bytes(daemon.https, &ca, hyper::Method::GET, "/scep?operation=GetCACert", &[], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(daemon.terminate().0.code(), Some(0));
}
