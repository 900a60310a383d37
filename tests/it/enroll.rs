//! The device-facing pages through the real binary: what an invite link opens, each state of a link that cannot be
//! used (with its 4xx status), the passcode with its per-invite limit, the enrollment session cookie, and the CA as
//! an Apple profile (parsed back with the plist crate).

use hyper::Method;
use serde_json::json;

use crate::common::{Daemon, PASSWORD, api, browse, get_plain, parse_pem_certs};

struct Box {
    daemon: Daemon,
    ca: rustls_pki_types::CertificateDer<'static>,
    token: String,
}

impl Box {
    async fn start(dir: &std::path::Path) -> Box {
        let daemon = Daemon::spawn(&dir.join("state"), &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
        daemon.wait_healthy();
        let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
        let login = json!({"username": "admin", "password": PASSWORD});
        let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
        let token = signed_in["token"].as_str().unwrap().to_owned();
        Box { daemon, ca, token }
    }

    /// An admin's own ("by myself") invite, whose link token and passcode the API returns.
    async fn invite(&self, name: &str, platform: &str) -> (String, String, String) {
        let user = json!({"name": name, "email": format!("{}@example.com", name.to_lowercase())});
        let (_, user) =
            api(self.daemon.https, &self.ca, Method::POST, "/api/v1/users", Some(&self.token), Some(user)).await;
        let invite = json!({"user_id": user["id"], "platform": platform});
        let path = "/api/v1/invites/by-myself";
        let (status, created) =
            api(self.daemon.https, &self.ca, Method::POST, path, Some(&self.token), Some(invite)).await;
        assert_eq!(status, 201, "{created}");
        (
            created["invite"]["id"].as_str().unwrap().to_owned(),
            created["link_token"].as_str().unwrap().to_owned(),
            created["passcode"].as_str().unwrap().to_owned(),
        )
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> crate::common::Fetched {
        browse(self.daemon.https, &self.ca, Method::GET, path, headers, None).await
    }

    async fn post(&self, path: &str, form: &str) -> crate::common::Fetched {
        browse(self.daemon.https, &self.ca, Method::POST, path, &[], Some(form)).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invite_link_asks_for_the_passcode_then_shows_the_steps() {
    let dir = tempfile::tempdir().unwrap();
    let b = Box::start(dir.path()).await;
    let (_, token, passcode) = b.invite("Ann", "ios").await;
    let path = format!("/e/{token}");

    let page = b.get(&path, &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Enroll your iPhone") && page.body.contains("<strong>Ann</strong>"), "{}", page.body);
    assert!(page.body.contains("Passcode from your invite") && page.body.contains("Open this page in Safari"));
    assert!(!page.body.contains("<script") && !page.body.contains("http://") && !page.body.contains("https://"));
    let header = |name: &str| page.headers.get(name).unwrap().to_str().unwrap().to_owned();
    assert!(header("content-security-policy").starts_with("default-src 'none'"));
    assert_eq!((header("x-frame-options"), header("referrer-policy")), ("DENY".into(), "no-referrer".into()));
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(b.get("/enroll.css", &[]).await.status, 200);

    let wrong = b.post(&path, "passcode=00000000").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("That passcode is not right. 4 tries left"), "{}", wrong.body);

    let right = b.post(&path, &format!("passcode={passcode}")).await;
    assert_eq!(right.status, 200);
    assert!(right.body.contains("Passcode accepted") && right.body.contains("/ca.mobileconfig"), "{}", right.body);
    assert!(right.body.contains("the push certificate is missing"), "no push certificate was uploaded");
    let cookie = right.headers.get("set-cookie").unwrap().to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", &format!("Path=/e/{token}")] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    let again = b.get(&path, &[("cookie", &session)]).await;
    assert!(again.body.contains("Passcode accepted"), "the session keeps the page open");
    let forged = b.get(&path, &[("cookie", "enroll_session=forged")]).await;
    assert!(forged.body.contains("Passcode from your invite"), "a made-up session opens nothing");

    // Once the push certificate is uploaded, the notice goes.
    let (cert, key) = crate::apple::push_certificate(crate::apple::TOPIC, 365);
    let upload = json!({"certificate_pem": cert, "private_key_pem": key});
    let push = "/api/v1/apple/push-certificate";
    let (status, _) = api(b.daemon.https, &b.ca, Method::PUT, push, Some(&b.token), Some(upload)).await;
    assert_eq!(status, 200);
    let ready = b.get(&path, &[("cookie", &session)]).await;
    assert!(ready.body.contains("Passcode accepted") && !ready.body.contains("push certificate is missing"));

    // The session is bound to its invite: it opens no other.
    let (_, other, _) = b.invite("Bea", "android").await;
    let elsewhere = b.get(&format!("/e/{other}"), &[("cookie", &session)]).await;
    assert!(!elsewhere.body.contains("push certificate"), "only Apple devices need it");
    assert!(
        elsewhere.body.contains("Passcode from your invite") && elsewhere.body.contains("Enroll your Android device")
    );
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn links_that_cannot_be_used_say_why_with_a_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let b = Box::start(dir.path()).await;

    let unknown = b.get("/e/not-a-real-token", &[]).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("This link is not valid"));

    let (_, token, _) = b.invite("Cal", "windows").await;
    let path = format!("/e/{token}");
    for attempt in 1..=4 {
        assert_eq!(b.post(&path, "passcode=11111111").await.status, 401, "attempt {attempt}");
    }
    let locked = b.post(&path, "passcode=11111111").await;
    assert_eq!(locked.status, 423);
    assert!(locked.body.contains("This invite is locked") && locked.body.contains("send the invite again"));
    assert_eq!(b.get(&path, &[]).await.status, 423, "and it stays locked");
    assert!(!locked.body.contains("Cal"), "a problem page names nobody");

    let (id, token, _) = b.invite("Dee", "macos").await;
    let path = format!("/api/v1/invites/{id}/remove");
    let (status, _) = api(b.daemon.https, &b.ca, Method::POST, &path, Some(&b.token), None).await;
    assert_eq!(status, 200);
    let removed = b.get(&format!("/e/{token}"), &[]).await;
    assert_eq!(removed.status, 410);
    assert!(removed.body.contains("This invite was withdrawn"));

    let bad_form = b.post(&format!("/e/{token}"), "passcode=1&platform=toaster").await;
    assert_eq!(bad_form.status, 400);
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_os_independent_link_follows_the_browser_and_the_users_choice() {
    let dir = tempfile::tempdir().unwrap();
    let b = Box::start(dir.path()).await;
    let (_, token, _) = b.invite("Eve", "any").await;
    let path = format!("/e/{token}");
    let iphone =
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148 Safari/604.1";
    let page = b.get(&path, &[("user-agent", iphone)]).await;
    assert!(page.body.contains("Enroll your iPhone") && page.body.contains("This link works for any device"));
    let chosen = b.get(&format!("{path}?platform=windows"), &[("user-agent", iphone)]).await;
    assert!(chosen.body.contains("Enroll your Windows PC") && chosen.body.contains("Access work or school"));
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_comes_as_an_apple_profile_over_http_and_https() {
    let dir = tempfile::tempdir().unwrap();
    let b = Box::start(dir.path()).await;
    let plain = get_plain(b.daemon.http, "enroll.local", "/ca.mobileconfig").await;
    let tls = b.get("/ca.mobileconfig", &[]).await;
    for fetched in [&plain, &tls] {
        assert_eq!(fetched.status, 200);
        assert_eq!(fetched.headers["content-type"], "application/x-apple-aspen-config");
    }
    let profile = plist::Value::from_reader_xml(plain.body.as_bytes()).unwrap();
    let profile = profile.as_dictionary().unwrap();
    assert_eq!(profile["PayloadType"].as_string(), Some("Configuration"));
    assert_eq!(profile["PayloadVersion"].as_signed_integer(), Some(1));
    let payloads = profile["PayloadContent"].as_array().unwrap();
    assert_eq!(payloads.len(), 1);
    let root = payloads[0].as_dictionary().unwrap();
    assert_eq!(root["PayloadType"].as_string(), Some("com.apple.security.root"));
    assert_eq!(root["PayloadContent"].as_data(), Some(b.ca.as_ref()), "the appliance CA, DER");
    for key in ["PayloadIdentifier", "PayloadUUID", "PayloadDisplayName"] {
        assert!(root[key].as_string().is_some_and(|v| !v.is_empty()), "{key}");
    }
    // The identifier is stable for the appliance; the UUIDs are new each time.
    let second = plist::Value::from_reader_xml(tls.body.as_bytes()).unwrap();
    let second = second.as_dictionary().unwrap();
    assert_eq!(second["PayloadIdentifier"], profile["PayloadIdentifier"]);
    assert_ne!(second["PayloadUUID"], profile["PayloadUUID"]);
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// With `enroll_auth = both`, the page asks for the passcode and the user's own password; a user without one asks
/// for a password link (mailed, at most every five minutes) or gets one from the admin, sets the password on a
/// one-time page, and is let in only with both right.
#[tokio::test(flavor = "multi_thread")]
async fn the_user_sets_a_password_through_a_one_time_link_and_the_page_asks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = Box::start(dir.path()).await;
    let call = |method: Method, path: String, body: Option<serde_json::Value>| {
        let (addr, ca, token) = (b.daemon.https, b.ca.clone(), b.token.clone());
        async move { api(addr, &ca, method, &path, Some(&token), body).await }
    };
    let (status, saved) =
        call(Method::PUT, "/api/v1/settings/enroll-auth".into(), Some(json!({"method": "both"}))).await;
    assert_eq!((status, saved["method"].as_str(), saved["source"].as_str()), (200, Some("both"), Some("saved")));
    let (status, _) = call(Method::PUT, "/api/v1/settings/enroll-auth".into(), Some(json!({"method": "pin"}))).await;
    assert_eq!(status, 422);

    let (invite_id, token, passcode) = b.invite("Eve", "android").await;
    let path = format!("/e/{token}");
    let page = b.get(&path, &[]).await;
    assert!(page.body.contains("Passcode from your invite") && page.body.contains("Your password"), "{}", page.body);
    assert!(page.body.contains("Email me a link to set my password"));

    let no_password = b.post(&path, &format!("passcode={passcode}&password=anything")).await;
    assert_eq!(no_password.status, 403);
    assert!(no_password.body.contains("You have not set your password yet"), "{}", no_password.body);
    let asked = b.post(&format!("{path}/account-link"), "").await;
    assert_eq!(asked.status, 200);
    assert!(asked.body.contains("Check your mail") && asked.body.contains("e***@example.com"), "{}", asked.body);
    assert_eq!(b.post(&format!("{path}/account-link"), "").await.status, 429, "one link every five minutes");
    let (_, invite) = call(Method::GET, format!("/api/v1/invites/{invite_id}"), None).await;
    assert!(invite["remarks"].to_string().contains("asked for a password link"), "{invite}");

    let (_, invite) = call(Method::GET, format!("/api/v1/invites/{invite_id}"), None).await;
    let (status, link) =
        call(Method::POST, format!("/api/v1/users/{}/account-link", invite["user_id"].as_str().unwrap()), None).await;
    assert_eq!(status, 201, "{link}");
    let account = link["url"].as_str().unwrap().split_once("/account/").map(|(_, t)| format!("/account/{t}")).unwrap();
    let form = b.get(&account, &[]).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("Set your password") && form.body.contains("type=\"password\""));
    let mismatch = b.post(&account, "password=correct+horse+battery&confirm=correct+horse+batteyr").await;
    assert_eq!(mismatch.status, 422);
    assert!(mismatch.body.contains("not the same"));
    assert_eq!(b.post(&account, "password=short&confirm=short").await.status, 422);
    let set = b.post(&account, "password=correct+horse+battery&confirm=correct+horse+battery").await;
    assert_eq!(set.status, 200);
    assert!(set.body.contains("Your password is set"));
    assert_eq!(b.post(&account, "password=another+long+one&confirm=another+long+one").await.status, 410, "once");

    let wrong = b.post(&path, &format!("passcode={passcode}&password=wrong+password")).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("The passcode or the password is not right. 4 tries left"), "{}", wrong.body);
    let right = b.post(&path, &format!("passcode={passcode}&password=correct+horse+battery")).await;
    assert_eq!(right.status, 200);
    assert!(right.body.contains("Passcode accepted"), "{}", right.body);

    let (_, reset) = call(Method::DELETE, "/api/v1/settings/enroll-auth".into(), None).await;
    assert_eq!((reset["method"].as_str(), reset["source"].as_str()), (Some("passcode"), Some("configuration")));
    assert!(!b.get(&path, &[]).await.body.contains("Your password"));
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}
