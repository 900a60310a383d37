//! Invites delivered by the real binary through a real SMTP server (aiosmtpd, started by each test): the MIME
//! structure and headers, both bodies, the inline QR code decoded back to the link, STARTTLS against the relay's
//! own certificate, a 5xx recipient failing the message with the relay's reply, and a relay that is down across a
//! restart of enrolld, whose queue drains once it is back with nothing lost and nothing sent twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};

use crate::common::{Daemon, PASSWORD, api, free_port, get_plain, parse_pem_certs};

/// aiosmtpd in a child process, killed when dropped.
pub struct Sink {
    child: Child,
    dir: PathBuf,
}

impl Sink {
    pub fn start(port: u16, dir: &Path, tls: Option<(&Path, &Path)>) -> Sink {
        std::fs::create_dir_all(dir).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/smtp_sink.py");
        let mut command = Command::new("python3");
        command.arg(script).arg(port.to_string()).arg(dir);
        if let Some((cert, key)) = tls {
            command.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP sink did not start");
        Sink { child, dir: dir.to_owned() }
    }

    /// The messages received so far, oldest first.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    pub fn wait_for(&self, count: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let messages = self.messages();
            if messages.len() >= count {
                return messages;
            }
            assert!(Instant::now() < deadline, "{} of {count} messages arrived", messages.len());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mail_env(port: u16, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("ENROLLD_ADMIN_PASSWORD", PASSWORD.to_owned()),
        ("ENROLLD_SMTP_HOST", "127.0.0.1".to_owned()),
        ("ENROLLD_SMTP_PORT", port.to_string()),
        ("ENROLLD_SMTP_SECURITY", "none".to_owned()),
        ("ENROLLD_MAIL_FROM", "it@example.com".to_owned()),
        ("ENROLLD_MAIL_FROM_NAME", "Example IT".to_owned()),
        ("ENROLLD_ORGANISATION", "Example Ltd".to_owned()),
        ("ENROLLD_MAIL_RETRY_FIRST_SECS", "1".to_owned()),
    ];
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key, value.clone()));
    }
    env
}

fn start(state: &Path, env: &[(&'static str, String)]) -> Daemon {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = Daemon::spawn(state, &[], &env);
    daemon.wait_healthy();
    daemon
}

struct Admin {
    ca: CertificateDer<'static>,
    token: String,
}

impl Admin {
    async fn sign_in(daemon: &Daemon) -> Admin {
        let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
        let login = json!({"username": "admin", "password": PASSWORD});
        let (status, body) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
        assert_eq!(status, 200, "{body}");
        Admin { ca, token: body["token"].as_str().unwrap().to_owned() }
    }

    async fn call(&self, daemon: &Daemon, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        api(daemon.https, &self.ca, method, path, Some(&self.token), body).await
    }

    /// Creates a user and an email invite for them; returns the invite's id.
    async fn invite(&self, daemon: &Daemon, name: &str, email: &str, platform: &str) -> String {
        let (status, user) =
            self.call(daemon, Method::POST, "/api/v1/users", Some(json!({"name": name, "email": email}))).await;
        assert_eq!(status, 201, "{user}");
        let invite = json!({"user_id": user["id"], "platform": platform, "channels": "email"});
        let (status, created) = self.call(daemon, Method::POST, "/api/v1/invites", Some(invite)).await;
        assert_eq!(status, 201, "{created}");
        created["invite"]["id"].as_str().unwrap().to_owned()
    }

    /// Polls an invite until its first message reaches `state`.
    async fn wait_delivery(&self, daemon: &Daemon, invite: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, found) = self.call(daemon, Method::GET, &format!("/api/v1/invites/{invite}"), None).await;
            assert_eq!(status, 200, "{found}");
            if found["delivery"][0]["state"] == state {
                return found;
            }
            assert!(Instant::now() < deadline, "the message never became {state}: {found}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn header(mail: &mailparse::ParsedMail<'_>, name: &str) -> String {
    mailparse::MailHeaderMap::get_first_value(mail.headers.as_slice(), name).unwrap_or_default()
}

/// Decodes a QR code in a PNG image.
pub fn decode_qr(png_bytes: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(frame.color_type, png::ColorType::Grayscale);
    let (width, height) = (frame.width as usize, frame.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code in the image");
    grids[0].decode().unwrap().1
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invite_arrives_as_text_and_html_with_a_qr_code_that_scans_to_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let daemon = start(&dir.path().join("state"), &mail_env(smtp_port, &[]));
    let admin = Admin::sign_in(&daemon).await;
    let invite = admin.invite(&daemon, "Ann Lee", "ann@example.com", "ios").await;

    let raw = sink.wait_for(1).remove(0);
    let mail = mailparse::parse_mail(&raw).unwrap();
    assert_eq!(header(&mail, "X-Sink-Rcpt"), "ann@example.com");
    assert_eq!(header(&mail, "From"), "\"Example IT\" <it@example.com>");
    assert_eq!(header(&mail, "To"), "ann@example.com");
    assert_eq!(header(&mail, "Subject"), "Example Ltd: enroll your iOS device");
    let message_id = header(&mail, "Message-ID");
    assert!(message_id.starts_with(&format!("<invite.{invite}.")) && message_id.ends_with("@example.com>"));

    assert_eq!(mail.ctype.mimetype, "multipart/alternative");
    assert_eq!(mail.subparts.len(), 2);
    let text = &mail.subparts[0];
    assert_eq!(text.ctype.mimetype, "text/plain");
    let related = &mail.subparts[1];
    assert_eq!(related.ctype.mimetype, "multipart/related");
    let (html, image) = (&related.subparts[0], &related.subparts[1]);
    assert_eq!(html.ctype.mimetype, "text/html");
    assert_eq!(image.ctype.mimetype, "image/png");
    assert_eq!(header(image, "Content-ID"), "<enroll-qr>");
    assert!(header(image, "Content-Disposition").starts_with("inline"));

    let text = text.get_body().unwrap();
    let link_prefix = format!("https://enroll.local:{}/e/", daemon.https.port());
    let link = text.lines().find(|l| l.starts_with(&link_prefix)).unwrap_or_else(|| panic!("no link in:\n{text}"));
    assert!(text.contains("Settings > General > VPN & Device Management"), "{text}");
    let passcode = text.lines().find_map(|l| l.strip_prefix("Passcode: ")).unwrap();
    assert_eq!(passcode.len(), 8);
    // minijinja escapes `/` in HTML as `&#x2f;`, which browsers and mail clients read back as `/`.
    let html = html.get_body().unwrap().replace("&#x2f;", "/");
    assert!(html.contains(&format!("href=\"{link}\"")) && html.contains(r#"src="cid:enroll-qr""#), "{html}");
    assert!(html.contains(passcode));
    assert_eq!(decode_qr(&image.get_body_raw().unwrap()), link, "the QR code scans to the exact link");

    let found = admin.wait_delivery(&daemon, &invite, "sent").await;
    let reply = found["delivery"][0]["reply"].as_str().unwrap();
    assert!(reply.starts_with("250") && reply.contains("queued as SINK000001"), "{found}");
    let remark = found["remarks"].as_array().unwrap().last().unwrap()["text"].as_str().unwrap().to_owned();
    assert!(remark.contains("Email to ann@example.com accepted by the server: 250"), "{remark}");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_the_relay_refuses_fails_the_message_with_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let daemon = start(&dir.path().join("state"), &mail_env(smtp_port, &[]));
    let admin = Admin::sign_in(&daemon).await;
    let refused = admin.invite(&daemon, "Nobody", "reject-me@example.com", "android").await;
    let accepted = admin.invite(&daemon, "Bea", "bea@example.com", "android").await;

    let found = admin.wait_delivery(&daemon, &refused, "failed").await;
    let reply = found["delivery"][0]["reply"].as_str().unwrap();
    assert!(reply.contains("550") && reply.contains("User unknown"), "{found}");
    assert!(reply.contains("check the user's email address"), "advice: {reply}");
    assert_eq!(found["delivery"][0]["attempts"], 1, "a permanent failure is not retried");
    admin.wait_delivery(&daemon, &accepted, "sent").await;
    assert_eq!(sink.messages().len(), 1);
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_to_a_relay_with_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::NoCa;
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();

    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), Some((&cert_path, &key_path)));
    let env = mail_env(
        smtp_port,
        &[("ENROLLD_SMTP_SECURITY", "starttls".into()), ("ENROLLD_SMTP_CA_FILE", cert_path.display().to_string())],
    );
    let daemon = start(&dir.path().join("state"), &env);
    let admin = Admin::sign_in(&daemon).await;
    let invite = admin.invite(&daemon, "Cal", "cal@example.com", "windows").await;
    let raw = sink.wait_for(1).remove(0);
    let mail = mailparse::parse_mail(&raw).unwrap();
    assert_eq!(header(&mail, "X-Sink-Tls"), "yes", "the message went over STARTTLS");
    admin.wait_delivery(&daemon, &invite, "sent").await;
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_down_across_a_restart_gets_every_message_once_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let smtp_port = free_port();
    let env = mail_env(smtp_port, &[]);
    let daemon = start(&state, &env);
    let admin = Admin::sign_in(&daemon).await;
    let mut invites = Vec::new();
    for n in 0..12 {
        invites.push(admin.invite(&daemon, &format!("User {n}"), &format!("user{n}@example.com"), "macos").await);
    }
    let found = admin.wait_delivery(&daemon, &invites[0], "deferred").await;
    let reply = found["delivery"][0]["reply"].as_str().unwrap();
    assert!(reply.contains("check smtp_host and smtp_port"), "advice for a refused connection: {reply}");
    assert!(found["delivery"][0]["next_attempt_at"].is_string(), "{found}");
    assert_eq!(daemon.terminate().0.code(), Some(0));

    // The relay comes back while enrolld is stopped; enrolld starts again and the queue drains.
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let daemon = start(&state, &env);
    let admin = Admin::sign_in(&daemon).await;
    for invite in &invites {
        admin.wait_delivery(&daemon, invite, "sent").await;
    }
    let messages = sink.wait_for(invites.len());
    let recipients: BTreeSet<String> =
        messages.iter().map(|raw| header(&mailparse::parse_mail(raw).unwrap(), "X-Sink-Rcpt")).collect();
    assert_eq!((messages.len(), recipients.len()), (12, 12), "every message once: {recipients:?}");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_are_checked_when_saved_previewed_and_used_for_the_next_invite() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let daemon = start(&dir.path().join("state"), &mail_env(smtp_port, &[]));
    let admin = Admin::sign_in(&daemon).await;
    let path = "/api/v1/mail/templates/invite.subject.txt";

    let broken = json!({"source": "Hello {{ user_name }\n"});
    let (status, error) = admin.call(&daemon, Method::PUT, path, Some(broken)).await;
    assert_eq!(
        (status, error["error"].as_str(), error["field"].as_str()),
        (422, Some("template_invalid"), Some("source"))
    );
    assert!(error["message"].as_str().unwrap().contains("invite.subject.txt, line 1"), "{error}");
    let bell = json!({"source": "Hello {{ user_name }}\u{7}"});
    let (status, error) = admin.call(&daemon, Method::PUT, path, Some(bell)).await;
    assert_eq!((status, error["field"].as_str()), (422, Some("source")), "{error}");
    assert!(error["message"].as_str().unwrap().contains("U+0007"), "{error}");
    let unknown = json!({"source": "Hello {{ first_name }}"});
    let (status, error) = admin.call(&daemon, Method::PUT, path, Some(unknown)).await;
    assert_eq!(status, 422);
    assert!(error["message"].as_str().unwrap().contains("undefined"), "{error}");

    let draft = json!({"platform": "android", "drafts": {"invite.subject.txt": "Draft for {{ platform_name }}"}});
    let (status, preview) = admin.call(&daemon, Method::POST, "/api/v1/mail/preview", Some(draft)).await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["subject"], "Draft for Android");
    assert!(preview["text"].as_str().unwrap().contains("scan the QR code"));

    let good = json!({"source": "{{ organisation }} welcomes {{ user_name }}"});
    let (status, saved) = admin.call(&daemon, Method::PUT, path, Some(good)).await;
    assert_eq!((status, saved["customised"].as_bool()), (200, Some(true)), "{saved}");
    assert_eq!(saved["updated_by"], "admin");
    admin.invite(&daemon, "Dee Park", "dee@example.com", "android").await;
    let raw = sink.wait_for(1).remove(0);
    assert_eq!(header(&mailparse::parse_mail(&raw).unwrap(), "Subject"), "Example Ltd welcomes Dee Park");

    let (status, reset) = admin.call(&daemon, Method::DELETE, path, None).await;
    assert_eq!((status, reset["customised"].as_bool()), (200, Some(false)));
    assert_eq!(reset["source"], reset["default_source"]);

    let (status, sent) =
        admin.call(&daemon, Method::POST, "/api/v1/mail/test", Some(json!({"to": "admin@example.com"}))).await;
    assert_eq!((status, sent["sent"].as_bool()), (200, Some(true)), "{sent}");
    assert!(sent["reply"].as_str().unwrap().starts_with("250"));
    let raw = sink.wait_for(2).remove(1);
    assert_eq!(header(&mailparse::parse_mail(&raw).unwrap(), "Subject"), "enrolld test message");
    let (_, status_now) = admin.call(&daemon, Method::GET, "/api/v1/mail", None).await;
    assert_eq!(status_now["relay"]["port"], smtp_port);
    assert_eq!(status_now["outbox"]["sent"], 1);
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[test]
fn send_test_mail_reports_the_relays_answer_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let env = |port: u16| {
        vec![
            ("ENROLLD_SMTP_HOST", "127.0.0.1".to_owned()),
            ("ENROLLD_SMTP_PORT", port.to_string()),
            ("ENROLLD_SMTP_SECURITY", "none".to_owned()),
            ("ENROLLD_MAIL_FROM", "it@example.com".to_owned()),
        ]
    };
    let run = |env: &[(&str, String)], to: &str| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::common::run(&["send-test-mail", "--to", to], &env)
    };

    let out = run(&[], "ann@example.com");
    assert_eq!(out.status.code(), Some(2));
    assert!(crate::common::stderr(&out).contains("no mail relay is configured; set smtp_host"));

    let out = run(&env(smtp_port), "ann@example.com");
    assert_eq!(out.status.code(), Some(1), "nothing listens yet");
    assert!(
        crate::common::stderr(&out).contains("nothing accepts connections on 127.0.0.1"),
        "{}",
        crate::common::stderr(&out)
    );

    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let out = run(&env(smtp_port), "ann@example.com");
    assert_eq!(out.status.code(), Some(0), "{}", crate::common::stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sent to ann@example.com through 127.0.0.1") && stdout.contains("250"), "{stdout}");
    let out = run(&env(smtp_port), "reject-me@example.com");
    assert_eq!(out.status.code(), Some(1));
    assert!(crate::common::stderr(&out).contains("550"), "{}", crate::common::stderr(&out));
    assert_eq!(sink.messages().len(), 1);
}

/// The test SMS gateway (`sms_gateway.py`), killed when dropped.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn start(port: u16, log: &Path) -> Gateway {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/sms_gateway.py");
        let mut child =
            Command::new("python3").arg(script).arg(port.to_string()).arg(log).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the SMS gateway did not start");
        Gateway { child, log: log.to_owned() }
    }

    fn requests(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Admin {
    /// A user with a phone number and an invite by email and SMS; returns the invite's id.
    async fn invite_both(&self, daemon: &Daemon, email: &str, phone: &str) -> String {
        let user = json!({"name": email, "email": email, "phone": phone});
        let (status, user) = self.call(daemon, Method::POST, "/api/v1/users", Some(user)).await;
        assert_eq!(status, 201, "{user}");
        let invite = json!({"user_id": user["id"], "platform": "ios", "channels": "both"});
        let (status, created) = self.call(daemon, Method::POST, "/api/v1/invites", Some(invite)).await;
        assert_eq!(status, 201, "{created}");
        created["invite"]["id"].as_str().unwrap().to_owned()
    }

    /// Polls an invite until every message has ended (sent or failed); returns the invite.
    async fn wait_settled(&self, daemon: &Daemon, invite: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, found) = self.call(daemon, Method::GET, &format!("/api/v1/invites/{invite}"), None).await;
            let delivery = found["delivery"].as_array().unwrap();
            if delivery.len() == 2 && delivery.iter().all(|d| d["state"] == "sent" || d["state"] == "failed") {
                return found;
            }
            assert!(Instant::now() < deadline, "the messages never settled: {found}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn sms_of(found: &Value) -> &Value {
    found["delivery"].as_array().unwrap().iter().find(|d| d["channel"] == "sms").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sms_go_through_an_http_gateway_with_the_same_retries_and_remarks() {
    let dir = tempfile::tempdir().unwrap();
    let (smtp_port, sms_port) = (free_port(), free_port());
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let gateway = Gateway::start(sms_port, &dir.path().join("sms.log"));
    let env = mail_env(
        smtp_port,
        &[
            ("ENROLLD_SMS_GATEWAY", "http".into()),
            ("ENROLLD_SMS_HTTP_URL", format!("http://127.0.0.1:{sms_port}/api/send?account=office")),
            ("ENROLLD_SMS_HTTP_HEADERS", "Authorization: Bearer t0k3n".into()),
            ("ENROLLD_SMS_HTTP_SUCCESS_CONTAINS", "queued".into()),
        ],
    );
    let daemon = start(&dir.path().join("state"), &env);
    let admin = Admin::sign_in(&daemon).await;
    let ok = admin.invite_both(&daemon, "ann@example.com", "+1 202 555 0100").await;
    let flaky = admin.invite_both(&daemon, "bea@example.com", "+1 202 555 0503").await;
    let refused = admin.invite_both(&daemon, "cal@example.com", "+1 202 555 0400").await;

    let found = admin.wait_settled(&daemon, &ok).await;
    assert_eq!(sms_of(&found)["state"], "sent", "{found}");
    assert!(sms_of(&found)["reply"].as_str().unwrap().starts_with("HTTP 200"), "{found}");
    let found = admin.wait_settled(&daemon, &flaky).await;
    assert_eq!((sms_of(&found)["state"].as_str(), sms_of(&found)["attempts"].as_u64()), (Some("sent"), Some(2)));
    assert!(found["remarks"].as_array().unwrap().iter().any(|r| r["text"].as_str().unwrap().starts_with("SMS to")));
    let found = admin.wait_settled(&daemon, &refused).await;
    assert_eq!(sms_of(&found)["state"], "failed");
    assert!(
        sms_of(&found)["reply"].as_str().unwrap().contains("HTTP 400: {\"error\": \"invalid destination number\"}")
    );

    // The SMS carries the same link and passcode as the mail.
    let requests = gateway.requests();
    let to_ann = requests.iter().find(|r| r["body"].as_str().unwrap().contains("0100")).unwrap();
    assert_eq!(to_ann["path"], "/api/send?account=office");
    // hyper sends header names in lower case (HTTP/1.1 names are case-insensitive).
    assert_eq!(to_ann["headers"]["authorization"], "Bearer t0k3n");
    assert_eq!(to_ann["headers"]["content-type"], "application/json");
    let body: Value = serde_json::from_str(to_ann["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["to"], "+12025550100", "the number as stored, in E.164");
    let text = body["text"].as_str().unwrap();
    let mail = sink
        .messages()
        .into_iter()
        .find(|raw| header(&mailparse::parse_mail(raw).unwrap(), "X-Sink-Rcpt") == "ann@example.com")
        .unwrap();
    let mail_text = mailparse::parse_mail(&mail).unwrap().subparts[0].get_body().unwrap();
    let link = mail_text.lines().find(|l| l.contains("/e/")).unwrap();
    let passcode = mail_text.lines().find_map(|l| l.strip_prefix("Passcode: ")).unwrap();
    assert!(text.contains(link) && text.contains(passcode), "{text}");
    assert!(text.starts_with("Example Ltd: enroll your device at https://"), "{text}");
    // The gateway echoed the text back; the reply the invite keeps has the secrets blanked.
    let (_, found) = admin.call(&daemon, Method::GET, &format!("/api/v1/invites/{ok}"), None).await;
    let reply = sms_of(&found)["reply"].as_str().unwrap().to_owned();
    assert!(!reply.contains(passcode) && !reply.contains(&link[link.len() - 20..]) && reply.contains('…'), "{reply}");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sms_by_email_go_to_the_number_at_the_gateway_domain() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let env = mail_env(
        smtp_port,
        &[("ENROLLD_SMS_GATEWAY", "email".into()), ("ENROLLD_SMS_EMAIL_DOMAIN", "sms.example.net".into())],
    );
    let daemon = start(&dir.path().join("state"), &env);
    let admin = Admin::sign_in(&daemon).await;
    let invite = admin.invite_both(&daemon, "dee@example.com", "+1 (202) 555-0100").await;
    let found = admin.wait_settled(&daemon, &invite).await;
    assert_eq!(sms_of(&found)["state"], "sent", "{found}");
    let recipients: BTreeSet<String> =
        sink.wait_for(2).iter().map(|raw| header(&mailparse::parse_mail(raw).unwrap(), "X-Sink-Rcpt")).collect();
    assert_eq!(recipients, BTreeSet::from(["12025550100@sms.example.net".to_owned(), "dee@example.com".to_owned()]));
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_saved_through_the_api_delivers_what_waited_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let env = vec![("ENROLLD_ADMIN_PASSWORD", PASSWORD.to_owned())];
    let daemon = start(&state, &env);
    let admin = Admin::sign_in(&daemon).await;
    let (_, status) = admin.call(&daemon, Method::GET, "/api/v1/mail", None).await;
    assert!(status["relay"].is_null(), "{status}");
    let waiting = admin.invite(&daemon, "Ann Lee", "ann@example.com", "ios").await;

    let bad = json!({"host": "127.0.0.1", "from_address": "not an address"});
    let (code, error) = admin.call(&daemon, Method::PUT, "/api/v1/mail/relay", Some(bad)).await;
    assert_eq!((code, error["field"].as_str()), (422, Some("from_address")), "{error}");
    // A line break in a name would start a header of its own in every invite.
    let injected =
        json!({"host": "127.0.0.1", "from_address": "it@example.com", "from_name": "IT\r\nBcc: x@example.net"});
    let (code, error) = admin.call(&daemon, Method::PUT, "/api/v1/mail/relay", Some(injected)).await;
    assert_eq!((code, error["field"].as_str()), (422, Some("from_name")), "{error}");
    assert!(error["message"].as_str().unwrap().contains("U+000D"), "{error}");
    let bad_ca = json!({"host": "127.0.0.1", "from_address": "it@example.com", "ca_pem": "not PEM"});
    let (code, error) = admin.call(&daemon, Method::PUT, "/api/v1/mail/relay", Some(bad_ca)).await;
    assert_eq!((code, error["field"].as_str()), (422, Some("ca_pem")), "{error}");

    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let relay = json!({"host": "127.0.0.1", "port": smtp_port, "security": "none", "from_address": "it@example.com"});
    let (code, saved) = admin.call(&daemon, Method::PUT, "/api/v1/mail/relay", Some(relay)).await;
    assert_eq!((code, saved["relay_source"].as_str()), (200, Some("api")), "{saved}");
    assert_eq!(saved["relay"]["port"], smtp_port);
    // The invite that waited while no relay was set goes out at once.
    admin.wait_delivery(&daemon, &waiting, "sent").await;
    assert_eq!(daemon.terminate().0.code(), Some(0));

    let daemon = start(&state, &env);
    let admin = Admin::sign_in(&daemon).await;
    let after_restart = admin.invite(&daemon, "Bea", "bea@example.com", "android").await;
    admin.wait_delivery(&daemon, &after_restart, "sent").await;
    assert_eq!(sink.messages().len(), 2);
    let (code, reset) = admin.call(&daemon, Method::DELETE, "/api/v1/mail/relay", None).await;
    assert_eq!((code, reset["relay_source"].as_str()), (200, Some("configuration")));
    assert!(reset["relay"].is_null(), "{reset}");
    let (_, audit) = admin.call(&daemon, Method::GET, "/api/v1/audit", None).await;
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"setting.save") && actions.contains(&"setting.reset"), "{actions:?}");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}
