//! The admin API through the real binary over HTTPS: an unconfigured box logs a setup code, the first admin claims
//! it with that code, and what they create survives a restart (after which no setup code is offered).

use hyper::Method;
use serde_json::json;

use crate::common::{Daemon, PASSWORD, api, get_plain, parse_pem_certs};

fn setup_code(log: &str) -> String {
    let line =
        log.lines().find(|l| l.contains("enter the setup code")).unwrap_or_else(|| panic!("no setup code in:\n{log}"));
    let after = line.split("setup code ").nth(1).unwrap();
    after.split_whitespace().next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_admin_claims_the_box_with_the_logged_code_and_the_data_persists() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let code = setup_code(&daemon.wait_for_log("enter the setup code"));
    assert_eq!(code.len(), 14, "XXXX-XXXX-XXXX: {code}");

    let (status, _) = api(daemon.https, &ca, Method::GET, "/api/v1/dashboard", None, None).await;
    assert_eq!(status, 401);
    let claim = json!({"setup_code": code, "username": "admin", "password": PASSWORD});
    let (status, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/setup", None, Some(claim.clone())).await;
    assert_eq!(status, 200, "{signed_in}");
    let token = signed_in["token"].as_str().unwrap().to_owned();

    let user = json!({"name": "Ann Lee", "email": "ann@example.com", "phone": "+1 202 555 0100"});
    let (status, user) = api(daemon.https, &ca, Method::POST, "/api/v1/users", Some(&token), Some(user)).await;
    assert_eq!(status, 201, "{user}");
    let invite = json!({"user_id": user["id"], "platform": "android", "channels": "both"});
    let (status, created) = api(daemon.https, &ca, Method::POST, "/api/v1/invites", Some(&token), Some(invite)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(daemon.terminate().0.code(), Some(0));

    let daemon = Daemon::start(&state, &[]);
    let log = daemon.wait_for_log("ready: open");
    assert!(!log.contains("setup code"), "no code once an admin exists:\n{log}");
    let (status, _) = api(daemon.https, &ca, Method::POST, "/api/v1/setup", None, Some(claim)).await;
    assert_eq!(status, 409);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (status, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    assert_eq!(status, 200);
    let token = signed_in["token"].as_str().unwrap();
    let (_, pending) = api(daemon.https, &ca, Method::GET, "/api/v1/invites?status=pending", Some(token), None).await;
    assert_eq!(pending["items"][0]["email"], "ann@example.com");
    assert_eq!(pending["items"][0]["channels"], "both");
    // No relay and no SMS gateway are configured: the mail waits in the outbox, the SMS ends saying why.
    let id = pending["items"][0]["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let invite = loop {
        let (_, invite) =
            api(daemon.https, &ca, Method::GET, &format!("/api/v1/invites/{id}"), Some(token), None).await;
        let sms = invite["delivery"].as_array().unwrap().iter().find(|d| d["channel"] == "sms").unwrap().clone();
        if sms["state"] == "failed" {
            assert!(sms["reply"].as_str().unwrap().contains("no SMS gateway is set"), "{sms}");
            break invite;
        }
        assert!(std::time::Instant::now() < deadline, "the SMS never ended: {invite}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let email = invite["delivery"].as_array().unwrap().iter().find(|d| d["channel"] == "email").unwrap();
    assert_eq!(email["state"], "queued");
    let (_, counts) = api(daemon.https, &ca, Method::GET, "/api/v1/dashboard", Some(token), None).await;
    assert_eq!((counts["pending"].as_u64(), counts["queued_messages"].as_u64()), (Some(1), Some(1)));
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_admin_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(&dir.path().join("state"), &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    daemon.wait_healthy();
    assert!(!daemon.wait_for_log("ready: open").contains("setup code"));
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (status, _) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    assert_eq!(status, 200);
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

/// A daemon on `state` with its first admin from the environment, its CA, and that admin's session token.
async fn admin_box(state: &std::path::Path) -> (Daemon, rustls::pki_types::CertificateDer<'static>, String) {
    let daemon = Daemon::spawn(state, &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    daemon.wait_healthy();
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let token = sign_in(&daemon, &ca).await;
    (daemon, ca, token)
}

/// Signs in as the first admin; the session's token.
async fn sign_in(daemon: &Daemon, ca: &rustls::pki_types::CertificateDer<'static>) -> String {
    let login = json!({"username": "admin", "password": PASSWORD});
    let (status, signed_in) = api(daemon.https, ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    assert_eq!(status, 200, "{signed_in}");
    signed_in["token"].as_str().unwrap().to_owned()
}

/// What the API acknowledged is on disk: the daemon killed (SIGKILL, no flush on the way out) right after the last
/// answer loses none of the users and invites it said it had created.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_api_acknowledged_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, ca, token) = admin_box(&state).await;
    let mut acknowledged = Vec::new();
    for n in 0..20 {
        let user = json!({"name": format!("User {n}"), "email": format!("user{n}@example.com")});
        let (status, user) = api(daemon.https, &ca, Method::POST, "/api/v1/users", Some(&token), Some(user)).await;
        assert_eq!(status, 201, "{user}");
        let invite = json!({"user_id": user["id"], "platform": "ios"});
        let (status, created) =
            api(daemon.https, &ca, Method::POST, "/api/v1/invites", Some(&token), Some(invite)).await;
        assert_eq!(status, 201, "{created}");
        acknowledged.push(created["invite"]["id"].as_str().unwrap().to_owned());
    }
    crate::common::signal(daemon.pid(), nix::sys::signal::Signal::SIGKILL);
    let (status, _) = daemon.wait_exit();
    assert_eq!(status.code(), None, "killed by the signal");

    let daemon = Daemon::start(&state, &[]);
    let token = &sign_in(&daemon, &ca).await;
    for id in &acknowledged {
        let (status, invite) =
            api(daemon.https, &ca, Method::GET, &format!("/api/v1/invites/{id}"), Some(token), None).await;
        assert_eq!(status, 200, "invite {id} was acknowledged and then lost: {invite}");
        assert!(!invite["delivery"].as_array().unwrap().is_empty(), "invite {id} lost its delivery job: {invite}");
    }
}

/// An all-or-nothing CSV import killed midway (SIGKILL): at the next start enrolld is ready without first removing
/// what the import made (it shows the import as rolling back meanwhile), and then none of it is left.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_killed_midway_is_removed_after_the_restart_not_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (daemon, ca, token) = admin_box(&state).await;
    let rows = 30_000;
    let mut csv = String::from("USER NAME,EMAIL ADDRESS,PLATFORM TYPE,OWNED BY\r\n");
    for n in 0..rows {
        csv.push_str(&format!("Person {n},person{n}@example.com,ios,Corporate\r\n"));
    }
    let bearer = format!("Bearer {token}");
    let headers = [("authorization", bearer.as_str()), ("content-type", "text/csv")];
    let path = "/api/v1/imports?kind=invites&filename=people.csv";
    let (status, _, body) =
        crate::common::fetch_bytes(daemon.https, &ca, Method::POST, path, &headers, csv.into_bytes()).await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let (_, import) =
            api(daemon.https, &ca, Method::GET, &format!("/api/v1/imports/{id}"), Some(&token), None).await;
        if import["state"] == "importing" && import["rows_done"].as_u64().unwrap_or(0) >= 500 {
            break;
        }
        assert!(import["state"] != "done", "the import finished before it could be cut: {import}");
        assert!(std::time::Instant::now() < deadline, "the import never got going: {import}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    crate::common::signal(daemon.pid(), nix::sys::signal::Signal::SIGKILL);
    assert_eq!(daemon.wait_exit().0.code(), None, "killed by the signal");

    let daemon = Daemon::start(&state, &[]);
    let token = &sign_in(&daemon, &ca).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    let import = loop {
        let (_, import) =
            api(daemon.https, &ca, Method::GET, &format!("/api/v1/imports/{id}"), Some(token), None).await;
        seen.push(import["state"].as_str().unwrap_or_default().to_owned());
        if import["state"] == "rolled_back" {
            break import;
        }
        assert_eq!(import["state"], "rolling_back", "{import}");
        assert!(std::time::Instant::now() < deadline, "never rolled back: {import}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(import["message"].as_str().unwrap().contains("was removed again"), "{import}");
    let (_, invites) = api(daemon.https, &ca, Method::GET, "/api/v1/invites", Some(token), None).await;
    assert_eq!(invites["items"].as_array().unwrap().len(), 0, "nothing of the import is left: {invites}");
    let (_, users) = api(daemon.https, &ca, Method::GET, "/api/v1/users", Some(token), None).await;
    assert_eq!(users["items"].as_array().unwrap().len(), 0, "{users}");
    // The state is committed just before the line is logged: wait for the line.
    let log = daemon.wait_for_log("was removed again");
    let ready = log.find("ready: open").unwrap();
    let removed = log.find("was removed again").unwrap();
    assert!(ready < removed, "enrolld was ready before the import was removed:\n{log}");
    assert_eq!(daemon.terminate().0.code(), Some(0), "states seen: {seen:?}");
}
