//! Android enrollment against the real binary. No Android device can run here, so the device side is played from
//! the published interfaces: the provisioning QR code is read as a device's setup screen reads it (Android
//! Enterprise's `android.app.extra.PROVISIONING_*` keys, the URL-safe base64 SHA-256 that `DevicePolicyManager`
//! documents), and the agent is a client of enrolld's own documented agent API (`/android/v1/*` in the OpenAPI
//! document).

use std::process::Command;

use hyper::Method;
use serde_json::{Value, json};

use crate::common::{Daemon, PASSWORD, api, browse, fetch_bytes, free_port, get_plain, parse_pem_certs};
use crate::mail::{Sink, decode_qr};

struct Box {
    daemon: Daemon,
    ca: rustls_pki_types::CertificateDer<'static>,
    token: String,
}

impl Box {
    async fn start(state: &std::path::Path, smtp_port: u16) -> Box {
        let smtp_port = smtp_port.to_string();
        let daemon = Daemon::spawn(
            state,
            &[],
            &[
                ("ENROLLD_ADMIN_PASSWORD", PASSWORD),
                ("ENROLLD_SMTP_HOST", "127.0.0.1"),
                ("ENROLLD_SMTP_PORT", &smtp_port),
                ("ENROLLD_SMTP_SECURITY", "none"),
                ("ENROLLD_MAIL_FROM", "it@example.com"),
                ("ENROLLD_CONFIRMATION_TO", "helpdesk@example.com"),
            ],
        );
        daemon.wait_healthy();
        let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
        let login = json!({"username": "admin", "password": PASSWORD});
        let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
        Box { token: signed_in["token"].as_str().unwrap().to_owned(), daemon, ca }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        api(self.daemon.https, &self.ca, method, path, Some(&self.token), body).await
    }

    /// The agent's call: JSON in and out, with the device secret when it has one.
    async fn agent(&self, path: &str, secret: Option<&str>, body: Value) -> (u16, Value) {
        api(self.daemon.https, &self.ca, Method::POST, path, secret, Some(body)).await
    }

    async fn raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let (status, _, body) =
            fetch_bytes(self.daemon.https, &self.ca, Method::POST, path, &[("content-type", content_type)], body).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn user_and_invite(&self, email: &str, ownership: &str, by_myself: bool) -> Value {
        let (_, user) =
            self.admin(Method::POST, "/api/v1/users", Some(json!({"name": "Ann Lee", "email": email}))).await;
        let body = json!({"user_id": user["id"], "platform": "android", "ownership": ownership, "channels": "email"});
        let path = if by_myself { "/api/v1/invites/by-myself" } else { "/api/v1/invites" };
        let (status, created) = self.admin(Method::POST, path, Some(body)).await;
        assert_eq!(status, 201, "{created}");
        created
    }
}

/// A company-owned device: the admin uploads the device-policy app (a plain-HTTP location refused first); the
/// invite mail's QR code is the provisioning JSON, checked key by key and its checksum against the file as
/// OpenSSL hashes it; the agent enrolls with the token from its admin extras (a wrong passcode refused, the token
/// then refused a second time), malformed bodies get clean 4xx answers, and check-ins carry the facts, then the
/// factory reset the admin queues, until the device is wiped.
#[tokio::test(flavor = "multi_thread")]
async fn a_company_device_is_provisioned_by_qr_code_and_its_agent_is_wiped() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let b = Box::start(&dir.path().join("state"), smtp_port).await;

    let plain = json!({
        "component_name": "com.example.dpc/.AdminReceiver",
        "download_url": "http://apps.example.com/dpc.apk",
        "checksum_kind": "signature",
        "checksum": "gJD2YwtOiWJHkSMkkIfLRlj-quNqG1fb6v100QmzM9w=",
    });
    let (status, refused) = b.admin(Method::PUT, "/api/v1/settings/android", Some(plain)).await;
    assert_eq!((status, refused["field"].as_str()), (422, Some("download_url")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("refuses a plain-HTTP location"), "{refused}");

    // A real APK is a zip archive; this one is made by Python's zipfile, and hashed by OpenSSL.
    let apk = dir.path().join("dpc.apk");
    let made = Command::new("python3")
        .args(["-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1], 'w'); z.writestr('AndroidManifest.xml', 'x' * 4096); z.close()"])
        .arg(&apk)
        .status()
        .unwrap();
    assert!(made.success());
    let openssl = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl dgst -sha256 -binary '{}' | openssl base64 -A | tr '+/' '-_'", apk.display()))
        .output()
        .unwrap();
    let expected_checksum = String::from_utf8(openssl.stdout).unwrap().trim().to_owned();
    let bytes = std::fs::read(&apk).unwrap();
    let auth = format!("Bearer {}", b.token);
    let upload_path = "/api/v1/settings/android/apk?component_name=com.example.dpc/.AdminReceiver";
    let headers = [("authorization", auth.as_str()), ("content-type", "application/vnd.android.package-archive")];
    let (status, _, body) =
        fetch_bytes(b.daemon.https, &b.ca, Method::PUT, upload_path, &headers, b"not a zip".to_vec()).await;
    assert_eq!(status, 422, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = fetch_bytes(b.daemon.https, &b.ca, Method::PUT, upload_path, &headers, bytes.clone()).await;
    let app: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{app}");
    assert_eq!(app["checksum"], expected_checksum.as_str());
    let (status, _, served) =
        fetch_bytes(b.daemon.https, &b.ca, Method::GET, "/android/dpc.apk", &[], Vec::new()).await;
    assert_eq!((status, served == bytes), (200, true), "the box serves the uploaded app as it is");

    // The invite mail's QR code, as the setup screen reads it.
    let created = b.user_and_invite("ann@example.com", "corporate", false).await;
    let mail = sink.wait_for(1).remove(0);
    let mail = mailparse::parse_mail(&mail).unwrap();
    let text = mail.subparts[0].get_body().unwrap();
    let passcode = text.lines().find_map(|l| l.strip_prefix("Passcode: ")).unwrap().to_owned();
    let image = &mail.subparts[1].subparts[1];
    let qr: Value = serde_json::from_str(&decode_qr(&image.get_body_raw().unwrap())).unwrap();
    let extra = |key: &str| qr[format!("android.app.extra.{key}")].clone();
    let origin = format!("https://enroll.local:{}", b.daemon.https.port());
    assert_eq!(extra("PROVISIONING_DEVICE_ADMIN_COMPONENT_NAME"), "com.example.dpc/.AdminReceiver");
    assert_eq!(extra("PROVISIONING_DEVICE_ADMIN_PACKAGE_DOWNLOAD_LOCATION"), format!("{origin}/android/dpc.apk"));
    assert_eq!(extra("PROVISIONING_DEVICE_ADMIN_PACKAGE_CHECKSUM"), expected_checksum.as_str());
    let bundle = extra("PROVISIONING_ADMIN_EXTRAS_BUNDLE");
    assert_eq!(bundle["enroll_url"], format!("{origin}/android/v1/enroll"));
    let ca_sha256 = ring_sha256_hex(&b.ca);
    assert_eq!(bundle["ca_sha256"], ca_sha256.as_str());
    let token = bundle["invite_token"].as_str().unwrap().to_owned();
    assert_eq!(qr.as_object().unwrap().len(), 4, "no keys a device would not expect: {qr}");

    // Malformed bodies: each a clean 4xx in the API's error format, and none uses up the invite.
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("application/json", br#"{"token": "#.to_vec(), 400),
        ("application/json", br#"{"token": 7}"#.to_vec(), 422),
        ("application/json", br#"{"token": "x", "extra": true}"#.to_vec(), 422),
        ("text/plain", br#"{"token": "x"}"#.to_vec(), 415),
        ("application/json", format!(r#"{{"token": "{}"}}"#, "x".repeat(100_000)).into_bytes(), 413),
    ];
    for (content_type, body, expected) in cases {
        let (status, answer) = b.raw("/android/v1/enroll", content_type, body).await;
        assert_eq!(status, expected, "{answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }

    let facts = json!({"serial": "R5CT1234", "manufacturer": "Google", "model": "Pixel 8", "os_version": "15",
        "android_id": "9774d56d682e549c"});
    let wrong = json!({"token": token, "passcode": "00000000", "device": facts});
    let (status, answer) = b.agent("/android/v1/enroll", None, wrong).await;
    assert_eq!((status, answer["error"].as_str()), (401, Some("wrong_answer")), "{answer}");
    let right = json!({"token": token, "passcode": passcode, "device": facts});
    let (status, enrolled) = b.agent("/android/v1/enroll", None, right.clone()).await;
    assert_eq!(status, 200, "{enrolled}");
    assert_eq!(enrolled["ca_sha256"], ca_sha256.as_str());
    assert_eq!(enrolled["checkin_url"], format!("{origin}/android/v1/checkin"));
    let (status, again) = b.agent("/android/v1/enroll", None, right).await;
    assert_eq!((status, again["error"].as_str()), (410, Some("invite_used")), "a token enrolls one device");
    let secret = enrolled["device_secret"].as_str().unwrap().to_owned();
    let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
    // The help desk hears of it, as for Apple devices.
    let notice = sink.wait_for(2).remove(1);
    let notice = mailparse::parse_mail(&notice).unwrap();
    let text = notice.get_body().unwrap();
    assert_eq!(
        mailparse::MailHeaderMap::get_first_value(notice.headers.as_slice(), "X-Sink-Rcpt").as_deref(),
        Some("helpdesk@example.com")
    );
    assert!(
        text.contains("Model: Google Pixel 8")
            && text.contains("Serial number: R5CT1234")
            && text.contains("Platform: Android"),
        "{text}"
    );
    let (_, invite) =
        b.admin(Method::GET, &format!("/api/v1/invites/{}", created["invite"]["id"].as_str().unwrap()), None).await;
    assert_eq!(invite["status"], "enrolled");

    // Check-ins: a secret that is not the device's is refused; the device's gets the request for facts first.
    let (status, _) = b.agent("/android/v1/checkin", Some("not-the-secret"), json!({})).await;
    assert_eq!(status, 401);
    let (status, first) = b.agent("/android/v1/checkin", Some(&secret), json!({})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["commands"][0]["type"], "report_facts");
    let facts_id = first["commands"][0]["id"].clone();
    let report = json!({"results": [{"id": facts_id, "outcome": "done"}], "device": {"name": "Ann's Pixel"}});
    let (_, second) = b.agent("/android/v1/checkin", Some(&secret), report).await;
    assert_eq!(second["commands"], json!([]), "{second}");
    let (_, device) = b.admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None).await;
    assert_eq!(device["status"], "enrolled");
    assert_eq!(device["platform"], "android");
    assert_eq!(device["model"], "Google Pixel 8");
    assert_eq!(device["name"], "Ann's Pixel");
    assert_eq!(device["serial"], "R5CT1234");

    // A factory reset: queued by the admin, fetched, reported done; the device is wiped and checks in no more.
    let reset = json!({"kind": "factory_reset"});
    let (status, _) = b.admin(Method::POST, &format!("/api/v1/devices/{device_id}/deprovision"), Some(reset)).await;
    assert_eq!(status, 200);
    let (_, third) = b.agent("/android/v1/checkin", Some(&secret), json!({})).await;
    assert_eq!(third["commands"][0]["type"], "wipe", "{third}");
    let done = json!({"results": [{"id": third["commands"][0]["id"], "outcome": "done"}]});
    let (status, _) = b.agent("/android/v1/checkin", Some(&secret), done).await;
    assert_eq!(status, 200);
    let (_, device) = b.admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None).await;
    assert_eq!(device["status"], "wiped");
    let (status, gone) = b.agent("/android/v1/checkin", Some(&secret), json!({})).await;
    assert_eq!((status, gone["error"].as_str()), (410, Some("unmanaged")));
    let (_, audit) = b.admin(Method::GET, "/api/v1/audit?limit=100", None).await;
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(actions.contains(&"device.enroll") && actions.contains(&"device.command"), "{actions:?}");
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// A personal device: the enrollment page shows the agent's QR code (the link) only after the passcode; a staged
/// record with the device's serial hands over its group; revoking MDM reaches the agent as `unenroll`; and a work
/// profile the user removed makes the device Unmanaged.
#[tokio::test(flavor = "multi_thread")]
async fn a_personal_device_enrolls_through_the_agent_and_is_unenrolled() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let _sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let b = Box::start(&dir.path().join("state"), smtp_port).await;
    let (_, group) = b.admin(Method::POST, "/api/v1/groups", Some(json!({"name": "Field"}))).await;
    let staged = json!({"serial": "PERSONAL-1", "platform": "android", "group_id": group["id"]});
    assert_eq!(b.admin(Method::POST, "/api/v1/staged", Some(staged)).await.0, 201);

    let created = b.user_and_invite("bo@example.com", "personal", true).await;
    let token = created["link_token"].as_str().unwrap().to_owned();
    let passcode = created["passcode"].as_str().unwrap().to_owned();
    let qr_path = format!("/e/{token}/android.png");
    let (status, _, _) = fetch_bytes(b.daemon.https, &b.ca, Method::GET, &qr_path, &[], Vec::new()).await;
    assert_eq!(status, 401, "no code before the passcode");
    let page =
        browse(b.daemon.https, &b.ca, Method::POST, &format!("/e/{token}"), &[], Some(&format!("passcode={passcode}")))
            .await;
    let shown = page.body.replace("&#x2f;", "/");
    assert!(shown.contains(&qr_path) && shown.contains("Install the management app"), "{shown}");
    let cookie = page.headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let (status, _, png) =
        fetch_bytes(b.daemon.https, &b.ca, Method::GET, &qr_path, &[("cookie", &cookie)], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(decode_qr(&png), format!("https://enroll.local:{}/e/{token}", b.daemon.https.port()));

    let body = json!({"token": token, "passcode": passcode, "device": {"serial": "personal-1", "model": "Galaxy S24"}});
    let (status, enrolled) = b.agent("/android/v1/enroll", None, body).await;
    assert_eq!(status, 200, "{enrolled}");
    let secret = enrolled["device_secret"].as_str().unwrap().to_owned();
    let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
    let (_, device) = b.admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None).await;
    assert_eq!((device["group_id"].clone(), device["ownership"].as_str()), (group["id"].clone(), Some("personal")));

    let wipe = json!({"kind": "factory_reset"});
    let (status, _) = b.admin(Method::POST, &format!("/api/v1/devices/{device_id}/deprovision"), Some(wipe)).await;
    assert_eq!(status, 409, "never a factory reset for a personal device");
    let revoke = json!({"kind": "revoke_mdm"});
    assert_eq!(b.admin(Method::POST, &format!("/api/v1/devices/{device_id}/deprovision"), Some(revoke)).await.0, 200);
    let (_, checkin) = b.agent("/android/v1/checkin", Some(&secret), json!({})).await;
    let kinds: Vec<&str> = checkin["commands"].as_array().unwrap().iter().filter_map(|c| c["type"].as_str()).collect();
    assert!(kinds.contains(&"unenroll"), "{checkin}");
    let (status, _) = b.agent("/android/v1/checkin", Some(&secret), json!({"removed": true})).await;
    assert_eq!(status, 410, "the agent is told to stop");
    let (_, device) = b.admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None).await;
    assert_eq!(device["status"], "unmanaged");
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

fn ring_sha256_hex(der: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// A device speaks only for itself: an agent's secret cannot report another device's command results or facts.
/// Each attempt is refused with 403 (`other_device`) before anything is written, and audited.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_speak_for_another_device() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let _sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let b = Box::start(&dir.path().join("state"), smtp_port).await;
    let mut agents = Vec::new();
    for (email, serial, android_id, imei) in [
        ("al@example.com", "SER-AL", "aaaaaaaaaaaaaaaa", "352099001761481"),
        ("bea@example.com", "SER-BEA", "bbbbbbbbbbbbbbbb", "490154203237518"),
    ] {
        let created = b.user_and_invite(email, "corporate", true).await;
        let facts = json!({"serial": serial, "model": "Pixel 8", "android_id": android_id, "imei": imei});
        let body = json!({"token": created["link_token"], "passcode": created["passcode"], "device": facts});
        let (status, enrolled) = b.agent("/android/v1/enroll", None, body).await;
        assert_eq!(status, 200, "{enrolled}");
        agents.push((
            enrolled["device_secret"].as_str().unwrap().to_owned(),
            enrolled["device_id"].as_str().unwrap().to_owned(),
        ));
    }
    let ((al_secret, al_id), (_, bea_id)) = (&agents[0], &agents[1]);
    let (_, bea_before) = b.admin(Method::GET, &format!("/api/v1/devices/{bea_id}"), None).await;
    let bea_command = bea_before["pending_commands"][0]["id"].clone();
    assert!(bea_command.is_string(), "{bea_before}");

    let attempts = [
        json!({"results": [{"id": bea_command, "outcome": "done"}]}),
        json!({"device": {"android_id": "bbbbbbbbbbbbbbbb", "name": "not Bea's"}}),
        json!({"device": {"serial": "SER-BEA"}}),
        json!({"device": {"imei": "490154203237518"}}),
    ];
    for attempt in attempts {
        let (status, answer) = b.agent("/android/v1/checkin", Some(al_secret), attempt.clone()).await;
        assert_eq!((status, answer["error"].as_str()), (403, Some("other_device")), "{attempt}: {answer}");
    }
    let (_, bea_after) = b.admin(Method::GET, &format!("/api/v1/devices/{bea_id}"), None).await;
    assert_eq!(bea_after["pending_commands"], bea_before["pending_commands"], "Bea's command is still hers");
    let (_, al) = b.admin(Method::GET, &format!("/api/v1/devices/{al_id}"), None).await;
    assert_ne!(al["name"], "not Bea's");
    let (_, audit) = b.admin(Method::GET, "/api/v1/audit?limit=100", None).await;
    let refusals: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().filter(|e| e["action"] == "device.refused").collect();
    assert_eq!(refusals.len(), 4, "{audit}");
    assert!(refusals.iter().all(|e| e["target"] == al_id.as_str()), "{refusals:?}");

    // Al speaking for Al still works, and a result for a command queued nowhere is simply ignored.
    let own = json!({"results": [{"id": al["pending_commands"][0]["id"], "outcome": "done"}],
        "device": {"android_id": "AAAAAAAAAAAAAAAA", "serial": "SER-AL", "imei": "352099001761481"}});
    let (status, answer) = b.agent("/android/v1/checkin", Some(al_secret), own.clone()).await;
    assert_eq!((status, answer["commands"].clone()), (200, json!([])), "{answer}");
    assert_eq!(b.agent("/android/v1/checkin", Some(al_secret), own).await.0, 200, "an answer sent twice");
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}
