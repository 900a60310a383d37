//! The admin web pages in a real headless Chromium against the real binary: first-run setup with the code from the
//! log, sign-in, a user created, an invite whose mail arrives at the test SMTP server, the Pending list, resend and
//! remove, a CSV file with one bad row (its error shown, nothing imported), a bulk resend after a confirmation that
//! names how many, the Managed tab showing a device enrolled through the device-side protocol, and sign-out. Along
//! the way: a form post without the CSRF token is refused, and no page loads anything from outside the box.
//! Screenshots of each page are saved under `target/browser-screenshots/admin_ui/`.

use hyper::Method;
use serde_json::json;

use crate::apple_device::Device;
use crate::browser::Browser;
use crate::common::{Daemon, PASSWORD, fetch_bytes, free_port, get_plain, get_tls, parse_pem_certs};
use crate::mail::Sink;
use crate::mdm::{Apns, Appliance};

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_runs_the_appliance_from_the_browser() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let apns = Apns::start(dir.path()).await;
    let apns_url = format!("https://127.0.0.1:{}", apns.addr.port());
    let smtp_port = smtp_port.to_string();
    let daemon = Daemon::spawn(
        &dir.path().join("state"),
        &[],
        &[
            ("ENROLLD_SMTP_HOST", "127.0.0.1"),
            ("ENROLLD_SMTP_PORT", &smtp_port),
            ("ENROLLD_SMTP_SECURITY", "none"),
            ("ENROLLD_MAIL_FROM", "it@example.com"),
            ("ENROLLD_ORGANISATION", "Example Ltd"),
            ("ENROLLD_APNS_URL", &apns_url),
            ("ENROLLD_APNS_CA_FILE", apns.ca_file.to_str().unwrap()),
        ],
    );
    daemon.wait_healthy();
    let log = daemon.wait_for_log("setup code");
    let code = log.split("setup code ").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
    let ca_pem = get_plain(daemon.http, "enroll.local", "/ca.crt").await.body;
    let ca = parse_pem_certs(&ca_pem).remove(0);
    let origin = format!("https://enroll.local:{}", daemon.https.port());
    let b = Browser::start(&ca_pem, "admin_ui").await;
    let mut loaded = Vec::new();

    // First run: the box sends the browser to setup; the code from the log creates the admin.
    b.goto(&format!("{origin}/admin")).await;
    assert_eq!(b.url().await, format!("{origin}/admin/setup"));
    let setup = b.source().await;
    assert!(setup.contains("Or restore from a backup") && setup.contains("id=\"restore-file\""), "{setup}");
    b.screenshot("setup").await;
    b.fill("#code", "WRONG-CODE-0000").await;
    b.fill("#password", PASSWORD).await;
    b.fill("#confirm", PASSWORD).await;
    b.click("button[type=submit]").await;
    b.wait_for_text("That setup code is not right").await;
    b.fill("#code", &code).await;
    b.fill("#password", PASSWORD).await;
    b.fill("#confirm", PASSWORD).await;
    b.click("button[type=submit]").await;
    // Step 2: the names, how users authenticate, how long invites last; a bad host name refused next to its field.
    b.wait_for_text("Step 2 of 3").await;
    assert_eq!(b.url().await, format!("{origin}/admin/setup/appliance"));
    let step = b.source().await;
    assert!(step.contains("value=\"Example Ltd\"") && step.contains("value=\"enroll\""), "the configuration's names");
    b.fill("#organisation", "Example Group").await;
    b.fill("#hostname", "front desk").await;
    b.select("#auth", "passcode").await;
    b.fill("#validity_days", "7").await;
    b.click("form[action='/admin/setup/appliance'] button[type=submit]").await;
    let refused = b.wait_for_text("id=\"setup-error\"").await;
    assert!(
        refused.contains("letters, digits and hyphens") && refused.contains("value=\"Example Group\""),
        "{refused}"
    );
    b.screenshot("setup-appliance").await;
    b.fill("#hostname", "enroll").await;
    b.click("form[action='/admin/setup/appliance'] button[type=submit]").await;
    // Step 3: the relay (here from the configuration), with a test mail to hand; then the dashboard.
    let step = b.wait_for_text("Step 3 of 3").await;
    assert!(step.contains(&format!("Relay in use: 127.0.0.1:{smtp_port}")), "{step}");
    assert!(step.contains("enrolld · Example Group"), "the new name is in use at once");
    b.screenshot("setup-mail").await;
    loaded.extend(b.loaded().await);
    b.click("a.button.primary").await;
    b.wait_for_text("Outbox").await;
    b.goto(&format!("{origin}/admin/settings")).await;
    b.wait_for_text("How users prove who they are").await;
    b.screenshot("settings").await;
    loaded.extend(b.loaded().await);

    // Sign out, and in again.
    b.click(".logout button").await;
    b.wait_for_text("Sign in").await;
    b.goto(&format!("{origin}/admin")).await;
    assert_eq!(b.url().await, format!("{origin}/admin/login"), "signed out, the pages need a sign-in");
    b.fill("#password", "not the password").await;
    b.click("button[type=submit]").await;
    b.wait_for_text("The username or password is not right").await;
    b.screenshot("login").await;
    b.fill("#password", PASSWORD).await;
    b.click("button[type=submit]").await;
    let dashboard = b.wait_for_text("Outbox").await;
    assert!(dashboard.contains("not uploaded") && dashboard.contains("Download the CA certificate"), "{dashboard}");
    b.screenshot("dashboard").await;
    loaded.extend(b.loaded().await);

    // A user, then an invite for them by mail.
    b.goto(&format!("{origin}/admin/users")).await;
    b.fill("#u-name", "Ann Lee").await;
    // The browser checks the form first; this address passes its check and fails enrolld's.
    b.fill("#u-email", "ann.lee@example").await;
    b.click("form[method=post][action='/admin/users'] button[type=submit]").await;
    let refused = b.wait_for_text("role=\"alert\"").await;
    assert!(refused.contains("value=\"ann.lee@example\""), "the form keeps what was typed");
    b.fill("#u-email", "ann.lee@example.com").await;
    b.click("form[method=post][action='/admin/users'] button[type=submit]").await;
    b.wait_for_text("Ann Lee &lt;ann.lee@example.com&gt; was added").await;
    b.screenshot("users").await;

    b.goto(&format!("{origin}/admin/invite")).await;
    b.fill("#email", "ann.lee@example.com").await;
    b.select("#platform", "ios").await;
    // The mail as Ann would get it, before anything is sent: her name, the organisation, the iOS steps.
    b.click("button[name=preview]").await;
    let preview = b.wait_for_text("What ann.lee@example.com receives").await;
    assert!(preview.contains("Ann Lee") && preview.contains("Example Group"), "{preview}");
    assert!(
        preview.contains("Nothing was sent") && preview.contains("<option selected=\"\">ios</option>"),
        "{preview}"
    );
    assert!(sink.messages().is_empty(), "a preview sends nothing");
    b.screenshot("invite-preview").await;
    b.screenshot("invite").await;
    b.click("form[action='/admin/invite'] button[type=submit]").await;
    let pending = b.wait_for_text("The invite is on its way").await;
    assert!(pending.contains("<td>ann.lee@example.com</td>"), "{pending}");
    let first = sink.wait_for(1);
    let first = String::from_utf8_lossy(&first[0]).to_string();
    assert!(first.contains("ann.lee@example.com") && first.contains("/e/"), "{first}");
    b.screenshot("pending").await;
    loaded.extend(b.loaded().await);

    // Resend (a second mail, a new link), then remove.
    b.click("td.actions form[action$='/resend'] button").await;
    b.wait_for_text("The invite was sent again").await;
    let both = sink.wait_for(2);
    assert_ne!(first, String::from_utf8_lossy(&both[1]), "the resend carries a new link");
    b.click("td.actions form[action$='/remove'] button").await;
    let after = b.wait_for_text("The invite was removed").await;
    assert!(!after.contains("<td>ann.lee@example.com</td>"), "no longer pending");

    // A CSV file with one bad row: its line and reason shown, nothing imported.
    let csv = dir.path().join("people.csv");
    std::fs::write(
        &csv,
        "USER NAME,EMAIL ADDRESS,OWNED BY,GROUP NAME,PLATFORM TYPE,PHONE NUMBER\r\nBo Chen,bo.chen@example.com,Corporate,,iOS,\r\nCy Diaz,cy.diaz@example,Corporate,,Android,\r\nDee Ng,dee.ng@example.com,Personal,,Windows,\r\n",
    )
    .unwrap();
    b.goto(&format!("{origin}/admin/import")).await;
    b.attach("#file", &csv).await;
    b.screenshot("import-form").await;
    b.click("form[action='/admin/import'] button[type=submit]").await;
    let report = b.wait_for_text("rows with problems").await;
    assert!(
        report.contains("rejected") && report.contains("<td>3</td>") && report.contains("cy.diaz@example"),
        "{report}"
    );
    b.screenshot("import-report").await;
    b.goto(&format!("{origin}/admin/enrollment")).await;
    let pending = b.source().await;
    assert!(!pending.contains("bo.chen@example.com") && !pending.contains("dee.ng@example.com"), "nothing imported");

    // Bulk resend: three invites ticked, a confirmation naming three, then three mails.
    for name in ["eve", "fay", "gus"] {
        b.goto(&format!("{origin}/admin/invite")).await;
        b.fill("#email", &format!("{name}@example.com")).await;
        b.click("form[action='/admin/invite'] button[type=submit]").await;
        b.wait_for_text("The invite is on its way").await;
    }
    sink.wait_for(5);
    for name in ["eve", "fay", "gus"] {
        let tick = format!(
            "const row = [...document.querySelectorAll('tr')].find(r => r.textContent.includes('{name}@example.com')); row.querySelector('input[type=checkbox]').click();"
        );
        b.script(&tick, Vec::new()).await;
    }
    b.select("#action", "resend").await;
    b.click("#bulk button[type=submit]").await;
    b.wait_for_text("Resend 3 invites?").await;
    b.screenshot("bulk-confirm").await;
    b.click("button.primary").await;
    b.wait_for_text("Done; the results are in each row").await;
    sink.wait_for(8);

    // A device enrolled through the device-side protocol appears under Managed.
    daemon.wait_device_ca().await;
    let login = json!({"username": "admin", "password": PASSWORD});
    let (_, signed_in) = crate::common::api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    let appliance = Appliance { token: signed_in["token"].as_str().unwrap().to_owned(), daemon, ca: ca.clone() };
    let (cert, key) = apns.push_cert.clone();
    let upload = json!({"certificate_pem": cert, "private_key_pem": key});
    assert_eq!(appliance.api(Method::PUT, "/api/v1/apple/push-certificate", Some(upload)).await.0, 200);
    let (_, user) = appliance.api(Method::GET, "/api/v1/users?q=ann.lee", None).await;
    let body = json!({"user_id": user["items"][0]["id"], "platform": "ipados"});
    let (_, challenge, _) = appliance.invite_and_profile(body, "ipados").await;
    let mut device = Device::new();
    assert_eq!(appliance.scep(&mut device, &challenge).await.status, "0");
    assert_eq!(appliance.check_in(&device, "UDID-ANN", 9).await, (200, 200));
    b.goto(&format!("{origin}/admin/enrollment?tab=managed")).await;
    let managed = b.source().await;
    assert!(managed.contains("SER-UDID-ANN") && managed.contains("ann.lee@example.com"), "{managed}");
    assert!(managed.contains("Factory reset") && managed.contains("Revoke MDM"), "a corporate device can be erased");
    b.screenshot("managed").await;
    b.click("form[action$='/revoke'] button").await;
    let confirm = b.wait_for_text("Revoke device management?").await;
    assert!(confirm.contains("user's own data stay"), "the confirmation says what it does");
    b.screenshot("revoke-confirm").await;
    loaded.extend(b.loaded().await);

    // A form post without the page's CSRF token is refused, even with the session cookie.
    let session = b.cookies().await.into_iter().find(|c| c["name"] == "__Host-enrolld_session").unwrap();
    let cookie = format!("__Host-enrolld_session={}", session["value"].as_str().unwrap());
    assert_eq!(session["httpOnly"], true);
    let headers = [("cookie", cookie.as_str()), ("content-type", "application/x-www-form-urlencoded")];
    let form = b"email=mallory@example.com&platform=ios".to_vec();
    let (status, _, _) = fetch_bytes(appliance.daemon.https, &ca, Method::POST, "/admin/invite", &headers, form).await;
    assert_eq!(status, 403);
    let (_, found) = appliance.api(Method::GET, "/api/v1/users?q=mallory", None).await;
    assert_eq!(found["items"].as_array().unwrap().len(), 0, "the refused post changed nothing");
    let (_, page_headers, _) =
        fetch_bytes(appliance.daemon.https, &ca, Method::GET, "/admin", &[("cookie", cookie.as_str())], Vec::new())
            .await;
    assert!(page_headers["content-security-policy"].to_str().unwrap().starts_with("default-src 'none'"));
    assert_eq!(page_headers["x-frame-options"], "DENY");

    // Every page loaded only what the box serves.
    assert!(!loaded.is_empty(), "the stylesheet at least");
    assert!(loaded.iter().all(|url| url.starts_with(&origin) || url.starts_with("data:")), "{loaded:?}");

    b.click(".logout button").await;
    b.wait_for_text("Sign in").await;
    b.goto(&format!("{origin}/admin/enrollment")).await;
    assert_eq!(b.url().await, format!("{origin}/admin/login"));
    assert_eq!(appliance.daemon.terminate().0.code(), Some(0));
}

/// The pages behind daily work besides invites: the mail templates (a broken one refused with its line, a draft
/// previewed), the relay saved from the settings page and checked with a test mail that reaches the SMTP sink,
/// staged devices imported from CSV and invited to enroll, and the Pending page on a phone-sized screen.
#[tokio::test(flavor = "multi_thread")]
async fn templates_settings_and_staged_devices_from_the_browser() {
    let dir = tempfile::tempdir().unwrap();
    let smtp_port = free_port();
    let sink = Sink::start(smtp_port, &dir.path().join("mail"), None);
    let daemon = Daemon::spawn(&dir.path().join("state"), &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    daemon.wait_healthy();
    let ca_pem = get_plain(daemon.http, "enroll.local", "/ca.crt").await.body;
    let origin = format!("https://enroll.local:{}", daemon.https.port());
    let b = Browser::start(&ca_pem, "admin_ui_settings").await;
    b.goto(&format!("{origin}/admin/login")).await;
    b.fill("#password", PASSWORD).await;
    b.click("button[type=submit]").await;
    let dashboard = b.wait_for_text("Outbox").await;
    assert!(dashboard.contains("No backup yet"), "a box without a backup says so");

    // A backup from the Settings page: the passphrase typed twice, refused next to the form when they differ.
    b.goto(&format!("{origin}/admin/settings#backup")).await;
    b.fill("#backup-passphrase", "a passphrase worth keeping").await;
    b.fill("#backup-confirm", "a passphrase worth keepinh").await;
    b.click("form[action='/admin/settings/backup#backup'] button[type=submit]").await;
    let refused = b.wait_for_text("id=\"backup-error\"").await;
    assert!(refused.contains("The two passphrases are not the same."), "{refused}");
    b.screenshot("settings-backup").await;

    // Templates: a broken one is refused with its line and nothing is saved; a draft is previewed.
    b.goto(&format!("{origin}/admin/templates")).await;
    b.fill("#t-invite-subject-txt", "Enroll now, {{ user_name").await;
    b.click("#t-invite-subject-txt ~ button[value=save]").await;
    let refused = b.wait_for_text("role=\"alert\"").await;
    assert!(refused.contains("invite.subject.txt, line 1"), "{refused}");
    b.screenshot("template-refused").await;
    b.fill("#t-invite-subject-txt", "Enroll your device, {{ user_name }}").await;
    b.click("#t-invite-subject-txt ~ button[value=preview]").await;
    let preview = b.wait_for_text("<strong>Subject:</strong> Enroll your device, ").await;
    assert!(preview.contains("(built-in)"), "a preview saves nothing");
    b.click("#t-invite-subject-txt ~ button[value=save]").await;
    b.wait_for_text("Saved; new invites use it.").await;
    b.screenshot("templates").await;

    // The relay from the settings page: a bad host is refused next to the form (what was typed kept); then it is
    // saved and tested.
    b.goto(&format!("{origin}/admin/settings")).await;
    b.fill("#host", "mail example com").await;
    b.select("#security", "none").await;
    b.fill("#port", &smtp_port.to_string()).await;
    b.fill("#from_address", "it@example.com").await;
    b.click("form[action='/admin/settings/relay'] button[type=submit]").await;
    let refused = b.wait_for_text("id=\"relay-error\"").await;
    assert!(refused.contains("host: give the relay's name or address"), "{refused}");
    assert!(refused.contains("value=\"it@example.com\""), "the form keeps what was typed");
    b.fill("#host", "127.0.0.1").await;
    b.select("#security", "none").await;
    b.click("form[action='/admin/settings/relay'] button[type=submit]").await;
    b.wait_for_text("The relay is saved").await;
    b.fill("#to", "helpdesk@example.com").await;
    b.click("form[action='/admin/settings/test-mail'] button[type=submit]").await;
    b.wait_for_text("Sent. The relay answered: 250").await;
    let test = String::from_utf8_lossy(&sink.wait_for(1)[0]).to_string();
    assert!(test.contains("helpdesk@example.com"), "{test}");
    b.screenshot("settings-relay").await;

    // How long invites last and who hears of enrollments: a bad address refused next to its field, then saved.
    b.fill("#validity_days", "3").await;
    b.fill("#confirmation_to", "helpdesk@example.com\nnot an address").await;
    b.click("form[action='/admin/settings/policy'] button[type=submit]").await;
    let refused = b.wait_for_text("is not an email address").await;
    assert!(refused.contains("value=\"7\""), "nothing saved: the validity is still 7 days");
    b.fill("#validity_days", "3").await;
    b.fill("#confirmation_to", "helpdesk@example.com").await;
    b.click("form[action='/admin/settings/policy'] button[type=submit]").await;
    let saved = b.wait_for_text("Saved; new invites use it.").await;
    assert!(saved.contains("value=\"3\"") && saved.contains(">helpdesk@example.com</textarea>"), "{saved}");

    // A file over the 1 MiB JSON limit is still taken (the upload's limit is import_max_bytes): 15,000 rows, the last
    // one bad, so nothing is imported and that line is named.
    let big = dir.path().join("big.csv");
    let mut rows = String::from("USER NAME,EMAIL ADDRESS,OWNED BY,GROUP NAME,PLATFORM TYPE,PHONE NUMBER\r\n");
    for n in 0..15_000 {
        rows.push_str(&format!("Person Number {n:05},person.number.{n:05}@example.com,Corporate,Large Team,iOS,\r\n"));
    }
    rows.push_str("Last Person,last.person@example,Corporate,,iOS,\r\n");
    assert!(rows.len() > 1 << 20);
    std::fs::write(&big, rows).unwrap();
    b.goto(&format!("{origin}/admin/import")).await;
    b.attach("#file", &big).await;
    b.click("form[action='/admin/import'] button[type=submit]").await;
    let report = b.wait_for_text("rows with problems").await;
    assert!(report.contains("<td>15002</td>") && report.contains("last.person@example"), "{report}");

    // A new HTTPS certificate on request: the browser's next connection gets another serial from the same CA.
    let serial = |chain: &[rustls_pki_types::CertificateDer<'static>]| {
        x509_parser::parse_x509_certificate(&chain[0]).unwrap().1.raw_serial().to_vec()
    };
    let ca = parse_pem_certs(&ca_pem).remove(0);
    let name = rustls_pki_types::ServerName::try_from("enroll.local").unwrap();
    let before = get_tls(daemon.https, name.clone(), std::slice::from_ref(&ca), "/healthz").await.unwrap();
    b.goto(&format!("{origin}/admin/settings")).await;
    b.click("form[action='/admin/settings/renew-tls'] button").await;
    b.wait_for_text("A new HTTPS certificate is being issued").await;
    let mut renewed = false;
    for _ in 0..100 {
        let now = get_tls(daemon.https, name.clone(), std::slice::from_ref(&ca), "/healthz").await.unwrap();
        if serial(&now.peer_chain) != serial(&before.peer_chain) {
            renewed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(renewed, "a new certificate is served, trusted through the same CA");

    // The admin's own certificate (here one the test makes from the box's CA, so the browser goes on trusting
    // the box): a key that is not its own refused next to the field; then served until removed.
    let own_dir = dir.path().join("own");
    std::fs::create_dir_all(&own_dir).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (box_ca, _) =
        enrolld::pki::CertificateAuthority::load_or_create(&dir.path().join("state/pki"), "enroll", now).unwrap();
    let names = std::collections::BTreeSet::from([enrolld::config::SubjectName::Dns("enroll.local".into())]);
    let own = box_ca.issue_server("Example own certificate", &names, now).unwrap();
    own.save_issued(&own_dir).unwrap();
    let own_cert = std::fs::read_to_string(own_dir.join("server.crt")).unwrap();
    let own_serial = serial(&own.chain);
    let wrong_key = std::fs::read_to_string(dir.path().join("state/pki/ca.key")).unwrap();
    b.goto(&format!("{origin}/admin/settings")).await;
    b.fill("#tls_cert", &own_cert).await;
    b.fill("#tls_key", &wrong_key).await;
    b.click("form[action='/admin/settings/tls'] button[type=submit]").await;
    let refused = b.wait_for_text("id=\"tls-error\"").await;
    assert!(refused.contains("not the private key of the certificate"), "{refused}");
    b.fill("#tls_cert", &own_cert).await;
    b.fill("#tls_key", &std::fs::read_to_string(own_dir.join("server.key")).unwrap()).await;
    b.click("form[action='/admin/settings/tls'] button[type=submit]").await;
    b.wait_for_text("Your certificate (for enroll.local").await;
    let mut served = false;
    for _ in 0..100 {
        let now = get_tls(daemon.https, name.clone(), std::slice::from_ref(&ca), "/healthz").await.unwrap();
        if serial(&now.peer_chain) == own_serial {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(served, "the uploaded certificate is served");
    b.goto(&format!("{origin}/admin/settings")).await;
    b.click("form[action='/admin/settings/tls/remove'] button").await;
    b.wait_for_text("Your certificate is no longer used").await;
    let mut back = false;
    for _ in 0..100 {
        let now = get_tls(daemon.https, name.clone(), std::slice::from_ref(&ca), "/healthz").await.unwrap();
        if serial(&now.peer_chain) != own_serial {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(back, "the appliance's CA issues again");

    // The SMS gateway: an HTTP gateway without a usable URL refused next to the form; mail-to-SMS saved.
    b.select("#sms_gateway", "http").await;
    b.fill("#sms_http_url", "ftp://sms.example.net").await;
    b.click("form[action='/admin/settings/sms'] button[type=submit]").await;
    let refused = b.wait_for_text("id=\"sms-error\"").await;
    assert!(refused.contains("sms_http_url: give the gateway's URL"), "{refused}");
    b.select("#sms_gateway", "email").await;
    b.fill("#sms_email_domain", "sms.example.net").await;
    b.click("form[action='/admin/settings/sms'] button[type=submit]").await;
    let saved = b.wait_for_text("The SMS gateway is saved").await;
    assert!(saved.contains("value=\"sms.example.net\""), "{saved}");

    // The Android device-policy app: a plain-HTTP download location refused next to the form, then saved.
    b.goto(&format!("{origin}/admin/settings")).await;
    b.fill("#component_name", "com.example.dpc/.AdminReceiver").await;
    b.fill("#download_url", "http://apps.example.com/dpc.apk").await;
    b.fill("#checksum", "gJD2YwtOiWJHkSMkkIfLRlj-quNqG1fb6v100QmzM9w=").await;
    b.click("form[action='/admin/settings/android'] button[type=submit]").await;
    let refused = b.wait_for_text("id=\"android-error\"").await;
    assert!(refused.contains("download_url: Android downloads the app only over HTTPS"), "{refused}");
    assert!(refused.contains("value=\"com.example.dpc/.AdminReceiver\""), "what was typed is kept");
    b.fill("#download_url", "https://apps.example.com/dpc.apk").await;
    b.fill("#wifi_ssid", "Office").await;
    b.fill("#wifi_password", "correct horse").await;
    b.click("form[action='/admin/settings/android'] button[type=submit]").await;
    let saved = b.wait_for_text("The Android app is saved").await;
    assert!(
        saved.contains(
            "provisioned with com.example.dpc/.AdminReceiver, downloaded from https://apps.example.com/dpc.apk"
        ),
        "{saved}"
    );
    b.screenshot("settings-android").await;

    // Groups: a name another group has is refused on its row; a rename is saved.
    b.goto(&format!("{origin}/admin/users")).await;
    for group in ["Field", "Office"] {
        b.fill("#g-name", group).await;
        b.click("form[action='/admin/groups'] button[type=submit]").await;
        b.wait_for_text(&format!("The group {group} was added.")).await;
    }
    let office = b.script("return document.querySelector('input[value=Office]').id", vec![]).await;
    let office = format!("#{}", office.as_str().unwrap());
    b.fill(&office, "field").await;
    b.click(&format!("form:has({office}) button[type=submit]")).await;
    let refused = b.wait_for_text("class=\"error\" role=\"alert\"").await;
    assert!(refused.contains("exists already"), "{refused}");
    b.fill(&office, "Back Office").await;
    b.click(&format!("form:has({office}) button[type=submit]")).await;
    b.wait_for_text("The group is saved as Back Office.").await;
    b.screenshot("groups").await;

    // Staged devices from CSV, then one invited to enroll (its user gets the invite by mail).
    let csv = dir.path().join("staged.csv");
    std::fs::write(
        &csv,
        "SERIAL NUMBER,IMEI,PLATFORM TYPE,DEVICE NAME,USER NAME,EMAIL ADDRESS,GROUP NAME\r\nC02XK1JHJG5J,,macOS,Design MacBook,Andrew,andrew@example.com,Design\r\n",
    )
    .unwrap();
    b.goto(&format!("{origin}/admin/import")).await;
    b.attach("#file", &csv).await;
    b.select("#kind", "staged").await;
    b.click("form[action='/admin/import'] button[type=submit]").await;
    b.wait_for_text("1 staged devices created").await;
    b.goto(&format!("{origin}/admin/enrollment?tab=staged")).await;
    let staged = b.source().await;
    assert!(staged.contains("C02XK1JHJG5J") && staged.contains("Design MacBook"), "{staged}");
    b.screenshot("staged").await;
    b.click("form[action$='/reenroll'] button").await;
    let refused = b.wait_for_text("add the user first").await;
    assert!(refused.contains("andrew@example.com"), "{refused}");
    b.goto(&format!("{origin}/admin/users")).await;
    b.fill("#u-name", "Andrew").await;
    b.fill("#u-email", "andrew@example.com").await;
    b.click("form[method=post][action='/admin/users'] button[type=submit]").await;
    b.wait_for_text("was added").await;
    // Edited: a phone number that is not in international form is refused next to its field.
    b.click("td a[href^='/admin/users/']").await;
    b.wait_for_text("Edit Andrew").await;
    b.fill("#e-phone", "202-555-0100").await;
    b.click("form[action^='/admin/users/'] button[type=submit]").await;
    // The label says "international form" too, so wait for the error itself.
    let refused = b.wait_for_text("class=\"error\" role=\"alert\"").await;
    assert!(refused.contains("value=\"202-555-0100\""), "what was typed is kept: {refused}");
    b.fill("#e-phone", "+12025550100").await;
    b.fill("#e-name", "Andrew Kim").await;
    b.click("form[action^='/admin/users/'] button[type=submit]").await;
    b.wait_for_text("Andrew Kim &lt;andrew@example.com&gt; was saved.").await;
    b.goto(&format!("{origin}/admin/enrollment?tab=staged")).await;
    b.click("form[action$='/reenroll'] button").await;
    b.wait_for_text("The invite is on its way").await;
    let invite = String::from_utf8_lossy(&sink.wait_for(2)[1]).to_string();
    assert!(invite.contains("andrew@example.com") && invite.contains("Enroll your device, "), "the saved subject");
    let in_three_days = (time::OffsetDateTime::now_utc() + time::Duration::days(3)).date();
    let (day, month) = (in_three_days.day(), in_three_days.month());
    assert!(
        invite.contains(&format!("{day} {month}")) || invite.contains(&in_three_days.to_string()),
        "valid 3 days: {invite}"
    );

    // The Pending page on a phone-sized screen.
    b.resize(390, 844).await;
    b.goto(&format!("{origin}/admin/enrollment")).await;
    b.wait_for_text("andrew@example.com").await;
    b.screenshot("pending-phone").await;

    // Deleting the user, after a confirmation that says what happens to their invites and devices.
    b.resize(1280, 1000).await;
    b.goto(&format!("{origin}/admin/users")).await;
    b.click("td.actions form[action$='/delete'] button").await;
    let confirm = b.wait_for_text("Delete Andrew Kim &lt;andrew@example.com&gt;?").await;
    assert!(confirm.contains("Revoke MDM on their devices"), "{confirm}");
    b.screenshot("delete-user").await;
    b.click("button.danger").await;
    b.wait_for_text("The user was deleted.").await;
    b.goto(&format!("{origin}/admin/enrollment")).await;
    assert!(!b.source().await.contains("andrew@example.com"), "their pending invite went with them");

    // Renaming the box, after a confirmation that says what it means for links and devices: the new name is
    // served a certificate of its own, and the pages answer there.
    b.goto(&format!("{origin}/admin/settings")).await;
    b.fill("#organisation", "Example Group").await;
    b.fill("#hostname", "Front-Desk").await;
    b.click("form[action='/admin/settings/names'] button[type=submit]").await;
    let confirm = b.wait_for_text("Rename the box to front-desk.local?").await;
    assert!(confirm.contains("Links already sent, and Apple devices enrolled so far, use enroll.local"), "{confirm}");
    b.click("button.danger").await;
    b.wait_for_text("The box now announces itself as front-desk.local").await;
    let renamed = rustls_pki_types::ServerName::try_from("front-desk.local").unwrap();
    let mut trusted = false;
    for _ in 0..100 {
        if get_tls(daemon.https, renamed.clone(), std::slice::from_ref(&ca), "/healthz").await.is_ok() {
            trusted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(trusted, "the certificate names front-desk.local");
    let new_origin = format!("https://front-desk.local:{}", daemon.https.port());
    b.goto(&format!("{new_origin}/admin/login")).await;
    b.fill("#password", PASSWORD).await;
    b.click("button[type=submit]").await;
    let dashboard = b.wait_for_text("Outbox").await;
    assert!(dashboard.contains("enrolld · Example Group"), "{dashboard}");
    b.goto(&format!("{new_origin}/admin/settings")).await;
    assert!(b.source().await.contains("Devices reach it at https://front-desk.local:"), "new links use the new name");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}
