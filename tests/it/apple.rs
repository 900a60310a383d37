//! The Apple MDM push certificate through the real binary: uploaded as PEM, read back with its Topic and expiry,
//! a warning in its last 30 days, renewals that keep the Topic accepted, and one with another Topic refused.
//!
//! Apple's Push Certificates Portal cannot be reached from a test, so the certificates are made here in its shape:
//! the Topic (`com.apple.mgmt.External.<uuid>`) in the subject's UID attribute, as Apple issues them.

use hyper::Method;
use serde_json::{Value, json};

use crate::common::{Daemon, PASSWORD, api, get_plain, parse_pem_certs};

pub const TOPIC: &str = "com.apple.mgmt.External.5f2c7b3e-1d2a-4c5b-9e8f-0a1b2c3d4e5f";

/// A certificate and key in the shape of Apple's MDM push certificates.
pub fn push_certificate(topic: &str, days: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]), topic);
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("APSP:{topic}"));
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_push_certificate_is_uploaded_shown_renewed_and_never_swapped_for_another_topic() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(&dir.path().join("state"), &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    daemon.wait_healthy();
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    let token = signed_in["token"].as_str().unwrap().to_owned();
    let path = "/api/v1/apple/push-certificate";
    let call = |method: Method, body: Option<Value>| api(daemon.https, &ca, method, path, Some(&token), body);

    let (status, none) = call(Method::GET, None).await;
    assert_eq!((status, none["error"].as_str()), (404, Some("no_push_certificate")));
    let (status, _) = api(daemon.https, &ca, Method::GET, path, None, None).await;
    assert_eq!(status, 401, "admins only");

    let (cert, key) = push_certificate(TOPIC, 365);
    let (_, other_key) = push_certificate(TOPIC, 365);
    let mismatched = json!({"certificate_pem": cert, "private_key_pem": other_key});
    let (status, error) = call(Method::PUT, Some(mismatched)).await;
    assert_eq!((status, error["field"].as_str()), (422, Some("private_key_pem")), "{error}");
    let (not_mdm, not_mdm_key) = push_certificate("com.example.app", 365);
    let (status, error) =
        call(Method::PUT, Some(json!({"certificate_pem": not_mdm, "private_key_pem": not_mdm_key}))).await;
    assert_eq!((status, error["field"].as_str()), (422, Some("certificate_pem")));
    assert!(error["message"].as_str().unwrap().contains("not an MDM push certificate"), "{error}");

    let (status, shown) = call(Method::PUT, Some(json!({"certificate_pem": cert, "private_key_pem": key}))).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["topic"], TOPIC);
    assert!((363..=365).contains(&shown["days_left"].as_i64().unwrap()), "{shown}");
    assert!(shown["warning"].is_null());
    assert!(shown.get("private_key_pem").is_none(), "the key is never shown");

    // A renewal keeps the Topic; this one expires within 30 days, so it is flagged.
    let (renewed, renewed_key) = push_certificate(TOPIC, 20);
    let (status, shown) =
        call(Method::PUT, Some(json!({"certificate_pem": renewed, "private_key_pem": renewed_key}))).await;
    assert_eq!(status, 200, "{shown}");
    let warning = shown["warning"].as_str().unwrap();
    assert!(warning.starts_with("expires in 19 days") || warning.starts_with("expires in 20 days"), "{warning}");
    let (_, read_back) = call(Method::GET, None).await;
    assert_eq!(read_back["sha256"], shown["sha256"]);

    let (other, other_key) = push_certificate("com.apple.mgmt.External.00000000-0000-0000-0000-000000000000", 365);
    let (status, error) =
        call(Method::PUT, Some(json!({"certificate_pem": other, "private_key_pem": other_key}))).await;
    assert_eq!((status, error["error"].as_str()), (409, Some("push_topic_changed")), "{error}");
    let (_, still) = call(Method::GET, None).await;
    assert_eq!(still["topic"], TOPIC, "the certificate in use is unchanged");
    assert_eq!(daemon.terminate().0.code(), Some(0));
}

/// A `.p12` as Keychain Access exports it (3DES-encrypted bags, SHA-1 MAC), the legacy form with the certificate
/// under RC2-40, and one as current OpenSSL writes it (PBES2, AES-256), all made by OpenSSL from a certificate in
/// Apple's shape.
#[tokio::test(flavor = "multi_thread")]
async fn a_pkcs12_export_is_read_and_a_wrong_password_is_refused() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = push_certificate(TOPIC, 365);
    std::fs::write(dir.path().join("push.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("push.key"), &key).unwrap();
    let export = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let status = std::process::Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:s3cret", "-in"])
            .arg(dir.path().join("push.pem"))
            .arg("-inkey")
            .arg(dir.path().join("push.key"))
            .arg("-out")
            .arg(&out)
            .args(extra)
            .status()
            .expect("openssl is installed by tests/run");
        assert!(status.success());
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(out).unwrap())
    };
    let keychain =
        export("keychain.p12", &["-certpbe", "PBE-SHA1-3DES", "-keypbe", "PBE-SHA1-3DES", "-macalg", "sha1"]);
    // Keychain Access on older macOS, and OpenSSL 1.x: the certificate under 40-bit RC2.
    let legacy = export(
        "legacy.p12",
        &["-legacy", "-certpbe", "PBE-SHA1-RC2-40", "-keypbe", "PBE-SHA1-3DES", "-macalg", "sha1"],
    );
    let modern = export("modern.p12", &[]);

    let daemon = Daemon::spawn(&dir.path().join("state"), &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
    daemon.wait_healthy();
    let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    let token = signed_in["token"].as_str().unwrap().to_owned();
    let path = "/api/v1/apple/push-certificate";
    let put = |body: Value| api(daemon.https, &ca, Method::PUT, path, Some(&token), Some(body));

    let (status, error) = put(json!({"pkcs12_base64": keychain, "pkcs12_password": "wrong"})).await;
    assert_eq!((status, error["field"].as_str()), (422, Some("pkcs12_base64")), "{error}");
    assert!(error["message"].as_str().unwrap().contains("password is wrong"), "{error}");
    let (status, error) = put(json!({"pkcs12_base64": "not base64!"})).await;
    assert_eq!(status, 422, "{error}");
    let (status, error) = put(json!({"certificate_pem": cert})).await;
    assert_eq!((status, error["field"].as_str()), (422, Some("certificate_pem")), "a certificate without its key");

    for p12 in [keychain, legacy, modern] {
        let (status, shown) = put(json!({"pkcs12_base64": p12, "pkcs12_password": "s3cret"})).await;
        assert_eq!(status, 200, "{shown}");
        assert_eq!(shown["topic"], TOPIC);
    }
    assert_eq!(daemon.terminate().0.code(), Some(0));
}
