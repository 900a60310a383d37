//! Backup and restore against the real binary: `enrolld backup` asks the running daemon (over its control socket)
//! while an admin goes on creating invites; the file comes back with `enrolld restore` into a new state directory
//! and, on another fresh box, through the setup page (which restarts the daemon in-process). Each new box has the
//! same CA byte for byte, the same users, invites and devices, an Android device's secret still checks in, and the
//! admin signs in with the old password, but no session comes back. A wrong passphrase and a cut copy change
//! nothing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::Method;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};

use crate::common::{Daemon, PASSWORD, api, browse, fetch_bytes, get_plain, run, stderr};

const PASSPHRASE: &str = "the office safe, second shelf";

struct Admin {
    addr: std::net::SocketAddr,
    ca: CertificateDer<'static>,
    token: String,
}

impl Admin {
    async fn sign_in(daemon: &Daemon, ca: &CertificateDer<'static>) -> Admin {
        let login = json!({"username": "admin", "password": PASSWORD});
        let (status, signed_in) = api(daemon.https, ca, Method::POST, "/api/v1/login", None, Some(login)).await;
        assert_eq!(status, 200, "{signed_in}");
        Admin { addr: daemon.https, ca: ca.clone(), token: signed_in["token"].as_str().unwrap().to_owned() }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        api(self.addr, &self.ca, method, path, Some(&self.token), body).await
    }

    /// A user and a pending invite for them.
    async fn invite(&self, email: &str) -> Value {
        let (status, user) =
            self.call(Method::POST, "/api/v1/users", Some(json!({"name": email, "email": email}))).await;
        assert_eq!(status, 201, "{user}");
        let body = json!({"user_id": user["id"], "platform": "ios", "ownership": "corporate", "channels": "email"});
        let (status, created) = self.call(Method::POST, "/api/v1/invites", Some(body)).await;
        assert_eq!(status, 201, "{created}");
        created
    }

    /// Every email of a user and every invite id (pending ones), from the lists as an admin pages through them.
    async fn records(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let (_, users) = self.call(Method::GET, "/api/v1/users?limit=500", None).await;
        let emails = users["items"].as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap().to_owned());
        let (_, invites) = self.call(Method::GET, "/api/v1/invites?status=pending&limit=500", None).await;
        let ids = invites["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned());
        (emails.collect(), ids.collect())
    }
}

async fn ca_of(daemon: &Daemon) -> (String, CertificateDer<'static>) {
    let pem = get_plain(daemon.http, "enroll.local", "/ca.crt").await.body;
    let der = crate::common::parse_pem_certs(&pem).remove(0);
    (pem, der)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_a_running_box_restores_on_new_boxes_where_devices_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let passphrase_file = dir.path().join("passphrase");
    std::fs::write(&passphrase_file, format!("{PASSPHRASE}\n")).unwrap();
    let passphrase_arg = passphrase_file.to_str().unwrap();
    let old_state = dir.path().join("old");
    let old = Daemon::spawn(&old_state, &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    old.wait_healthy();
    let (old_ca_pem, ca) = ca_of(&old).await;
    let admin = Admin::sign_in(&old, &ca).await;

    // Records in several tables: users and invites, and an Android device enrolled through its agent.
    for n in 0..3 {
        admin.invite(&format!("before{n}@example.com")).await;
    }
    let (_, ann) =
        admin.call(Method::POST, "/api/v1/users", Some(json!({"name": "Ann", "email": "ann@example.com"}))).await;
    let body = json!({"user_id": ann["id"], "platform": "android", "ownership": "personal", "channels": "email"});
    let (status, by_myself) = admin.call(Method::POST, "/api/v1/invites/by-myself", Some(body)).await;
    assert_eq!(status, 201, "{by_myself}");
    let facts = json!({"serial": "R5CT0001", "model": "Pixel 8"});
    let enroll = json!({"token": by_myself["link_token"], "passcode": by_myself["passcode"], "device": facts});
    let (status, enrolled) = api(old.https, &ca, Method::POST, "/android/v1/enroll", None, Some(enroll)).await;
    assert_eq!(status, 200, "{enrolled}");
    let secret = enrolled["device_secret"].as_str().unwrap().to_owned();
    let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
    let (before_users, before_invites) = admin.records().await;

    // The backup, through the running daemon, while invites keep being made.
    let control = old_state.join("control.sock");
    assert_eq!(
        std::fs::metadata(&control).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap(),
        0o600
    );
    let busy = Arc::new(AtomicBool::new(true));
    let writer = {
        let (busy, admin) =
            (busy.clone(), Admin { addr: admin.addr, ca: admin.ca.clone(), token: admin.token.clone() });
        tokio::spawn(async move {
            let mut made = 0;
            while busy.load(Ordering::Relaxed) {
                admin.invite(&format!("during{made}@example.com")).await;
                made += 1;
            }
            made
        })
    };
    let backup_file = dir.path().join("box.enrolld");
    let out = backup_file.to_str().unwrap().to_owned();
    let state_arg = old_state.to_str().unwrap().to_owned();
    let pass = passphrase_arg.to_owned();
    let made = tokio::task::spawn_blocking(move || {
        run(&["backup", "--state-dir", &state_arg, "--out", &out, "--passphrase-file", &pass], &[])
    })
    .await
    .unwrap();
    busy.store(false, Ordering::Relaxed);
    let during = writer.await.unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    let said = String::from_utf8_lossy(&made.stdout).into_owned();
    assert!(said.contains("by the running enrolld"), "{said}");
    assert!(during > 0, "invites were being made while the backup ran");
    let bytes = std::fs::read(&backup_file).unwrap();
    assert!(bytes.starts_with(b"ENROLLD-BACKUP 1\n"));
    assert_eq!(
        std::fs::metadata(&backup_file)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap(),
        0o600
    );
    // The dashboard knows (the command line confirmed it saved the file).
    let cookie = format!("__Host-enrolld_session={}", admin.token);
    let page = browse(old.https, &ca, Method::GET, "/admin", &[("cookie", cookie.as_str())], None).await;
    assert!(page.body.contains("Last backup: "), "{}", page.body);
    // And through the API, whose download is recorded once the whole file went out.
    let auth = format!("Bearer {}", admin.token);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let body = json!({"passphrase": PASSPHRASE}).to_string().into_bytes();
    let (status, answer, downloaded) =
        fetch_bytes(old.https, &ca, Method::POST, "/api/v1/backup", &headers, body).await;
    assert_eq!(status, 200);
    assert!(
        answer["content-disposition"].to_str().unwrap().starts_with("attachment; filename=\"enrolld-backup-enroll-")
    );
    assert!(downloaded.starts_with(b"ENROLLD-BACKUP 1\n") && downloaded.len() > 4096);
    let mut audit = Value::Null;
    for _ in 0..100 {
        audit = admin.call(Method::GET, "/api/v1/audit?limit=500", None).await.1;
        if audit.to_string().contains("through the api") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let audit = audit.to_string();
    assert!(audit.contains("through the command line") && audit.contains("through the api"), "{audit}");
    assert!(!audit.contains(PASSPHRASE), "never the passphrase");
    let (status, _) = old.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(!control.exists(), "the socket goes with the daemon");

    // A wrong passphrase, a cut copy, a directory in use: each refused, and the target stays as it was.
    let new_state = dir.path().join("new");
    let new_arg = new_state.to_str().unwrap().to_owned();
    let restore = |file: &str, env: &[(&str, &str)]| {
        let mut args = vec!["restore", file, "--state-dir", &new_arg];
        if env.is_empty() {
            args.extend(["--passphrase-file", passphrase_arg]);
        }
        run(&args, env)
    };
    let refused = restore(backup_file.to_str().unwrap(), &[("ENROLLD_BACKUP_PASSPHRASE", "not the passphrase")]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("the passphrase is wrong"), "{}", stderr(&refused));
    let cut = dir.path().join("cut.enrolld");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let refused = restore(cut.to_str().unwrap(), &[]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("the file is truncated (ends at byte"), "{}", stderr(&refused));
    assert!(!new_state.exists(), "nothing was made or changed");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().contains("restoring")), "{leftovers:?}");
    let refused = run(
        &[
            "restore",
            backup_file.to_str().unwrap(),
            "--state-dir",
            old_state.to_str().unwrap(),
            "--passphrase-file",
            passphrase_arg,
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("is not empty") && stderr(&refused).contains("--replace"),
        "{}",
        stderr(&refused)
    );

    let restored = restore(backup_file.to_str().unwrap(), &[]);
    assert!(restored.status.success(), "{}", stderr(&restored));
    let said = String::from_utf8_lossy(&restored.stdout).into_owned();
    assert!(said.contains("restored ") && said.contains(" devices"), "{said}");

    // The new box: same CA, same records, devices keep working, the old password signs in, no old session does.
    let new = Daemon::start(&new_state, &[]);
    let (new_ca_pem, _) = ca_of(&new).await;
    assert_eq!(new_ca_pem, old_ca_pem, "the same CA, byte for byte");
    check_restored(&new, &ca, &admin.token, &secret, &device_id, &before_users, &before_invites).await;
    assert_eq!(new.terminate().0.code(), Some(0));

    // Another fresh box, restored from its setup page: the daemon restarts into the backup by itself.
    let fresh_state = dir.path().join("fresh");
    let fresh = Daemon::spawn(&fresh_state, &[], &[]);
    fresh.wait_healthy();
    let log = fresh.wait_for_log("setup code");
    let code = log.split("setup code ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let (_, fresh_ca) = ca_of(&fresh).await;
    assert_ne!(fresh_ca, ca, "a fresh box has a CA of its own");
    let mut form = Vec::new();
    for (name, value) in [("code", code.as_str()), ("passphrase", PASSPHRASE)] {
        form.extend_from_slice(
            format!("--B0undary\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    form.extend_from_slice(
        b"--B0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"box.enrolld\"\r\n\r\n",
    );
    form.extend_from_slice(&bytes);
    form.extend_from_slice(b"\r\n--B0undary--\r\n");
    let headers = [("content-type", "multipart/form-data; boundary=B0undary")];
    let (status, _, page) =
        fetch_bytes(fresh.https, &fresh_ca, Method::POST, "/admin/setup/restore", &headers, form).await;
    let page = String::from_utf8_lossy(&page);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Restored ") && page.contains("restarting"), "{page}");
    // The same process runs again on the same ports once the restored contents are in place.
    fresh.wait_for_log("the restored backup is in place");
    fresh.wait_healthy();
    let (restored_ca_pem, _) = ca_of(&fresh).await;
    assert_eq!(restored_ca_pem, old_ca_pem, "the setup page's restore brings the same CA");
    check_restored(&fresh, &ca, &admin.token, &secret, &device_id, &before_users, &before_invites).await;
    assert!(
        fresh_state
            .read_dir()
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("before-restore-"))
    );
    assert_eq!(fresh.terminate().0.code(), Some(0), "one process all along, stopped cleanly");
}

/// What a restored box must have: the records from before the backup, counts that agree with the records (the
/// snapshot was one instant, counters included), the Android device checking in with its old secret, the admin's
/// old password, and none of the old sessions.
async fn check_restored(
    daemon: &Daemon,
    ca: &CertificateDer<'static>,
    old_token: &str,
    secret: &str,
    device_id: &str,
    before_users: &BTreeSet<String>,
    before_invites: &BTreeSet<String>,
) {
    let (status, _) = api(daemon.https, ca, Method::GET, "/api/v1/dashboard", Some(old_token), None).await;
    assert_eq!(status, 401, "sessions do not come back");
    let admin = Admin::sign_in(daemon, ca).await;
    let (users, invites) = admin.records().await;
    assert!(users.is_superset(before_users), "{users:?}");
    assert!(invites.is_superset(before_invites), "{invites:?}");
    let (_, counts) = admin.call(Method::GET, "/api/v1/dashboard", None).await;
    assert_eq!(counts["pending"].as_u64(), Some(invites.len() as u64), "{counts}");
    assert_eq!(counts["users"].as_u64(), Some(users.len() as u64), "{counts}");
    assert_eq!(counts["enrolled"].as_u64(), Some(1), "{counts}");
    let (status, device) = admin.call(Method::GET, &format!("/api/v1/devices/{device_id}"), None).await;
    assert_eq!((status, device["serial"].as_str()), (200, Some("R5CT0001")), "{device}");
    let (status, checkin) =
        api(daemon.https, ca, Method::POST, "/android/v1/checkin", Some(secret), Some(json!({}))).await;
    assert_eq!(status, 200, "the device's secret still works: {checkin}");
}
