//! Apple enrollment end to end through the real binary: the signed enrollment profile (checked against Apple's
//! schemas and verified with OpenSSL against the appliance CA), a full SCEP exchange with a one-time challenge, the
//! check-in messages moving an invite from Pending to Enrolled and the device to Unmanaged, forged and unsigned
//! messages refused, the command queue (DeviceInformation, EraseDevice with NotNow and Error, RemoveProfile), and
//! the pushes that wake the device.
//!
//! The device is the test double in `apple_device.rs`. Apple's push service cannot be reached from a test, so a
//! local HTTP/2 server stands in for it, built from Apple's documentation ("Sending notification requests to
//! APNs"): TLS that requires the push certificate as client certificate, `POST /3/device/<token>`, answers 200, or
//! 410 with `{"reason":"Unregistered"}` once the device is gone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper::body::Bytes;
use plist::Value as P;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::apple_device::{Device, check, payload_keys, plist_xml, schema};
use crate::common::{Daemon, PASSWORD, api, browse, fetch_bytes, get_plain, parse_pem_certs};

const TOPIC: &str = "com.apple.mgmt.External.5f2c7b3e-1d2a-4c5b-9e8f-0a1b2c3d4e5f";

/// One push the stand-in for APNs received.
#[derive(Debug, Clone)]
struct Push {
    path: String,
    topic: String,
    push_type: String,
    body: Value,
}

/// The stand-in for Apple's push gateway.
pub struct Apns {
    pub addr: SocketAddr,
    pub ca_file: std::path::PathBuf,
    pushes: Arc<Mutex<Vec<Push>>>,
    gone: Arc<AtomicBool>,
    /// The push certificate (issued by the stand-in's "Apple" CA) and its key, PEM.
    pub push_cert: (String, String),
}

impl Apns {
    pub async fn start(dir: &std::path::Path) -> Apns {
        let apple_key = rcgen::KeyPair::generate().unwrap();
        let mut apple = rcgen::CertificateParams::default();
        apple.distinguished_name.push(rcgen::DnType::CommonName, "Test Apple Worldwide CA");
        apple.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let apple_cert = apple.self_signed(&apple_key).unwrap();
        let apple_issuer = rcgen::Issuer::new(apple, apple_key);

        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut server = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        server.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let server_cert = server.signed_by(&server_key, &apple_issuer).unwrap();

        let push_key = rcgen::KeyPair::generate().unwrap();
        let mut push = rcgen::CertificateParams::default();
        push.distinguished_name.push(rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]), TOPIC);
        push.distinguished_name.push(rcgen::DnType::CommonName, format!("APSP:{TOPIC}"));
        push.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let push_cert = push.signed_by(&push_key, &apple_issuer).unwrap();

        let ca_file = dir.join("apns-ca.pem");
        std::fs::write(&ca_file, apple_cert.pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(apple_cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pushes = Arc::new(Mutex::new(Vec::new()));
        let gone = Arc::new(AtomicBool::new(false));
        let (seen, dead) = (pushes.clone(), gone.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (acceptor, seen, dead) = (acceptor.clone(), seen.clone(), dead.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let (seen, dead) = (seen.clone(), dead.clone());
                        async move {
                            let header = |name: &str| {
                                request.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
                            };
                            let (path, topic, push_type) =
                                (request.uri().path().to_owned(), header("apns-topic"), header("apns-push-type"));
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            seen.lock().unwrap().push(Push { path, topic, push_type, body });
                            let (status, answer) = if dead.load(Ordering::SeqCst) {
                                (410, json!({"reason": "Unregistered", "timestamp": 1_700_000_000_000u64}).to_string())
                            } else {
                                (200, String::new())
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder().status(status).body(Full::new(Bytes::from(answer))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Apns { addr, ca_file, pushes, gone, push_cert: (push_cert.pem(), push_key.serialize_pem()) }
    }

    /// Waits for the `n`th push (counting from 1).
    async fn nth(&self, n: usize) -> Push {
        for _ in 0..200 {
            if let Some(push) = self.pushes.lock().unwrap().get(n - 1) {
                return push.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("push {n} never arrived; got {:?}", self.pushes.lock().unwrap());
    }
}

pub struct Appliance {
    pub daemon: Daemon,
    pub ca: rustls_pki_types::CertificateDer<'static>,
    pub token: String,
}

impl Appliance {
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        api(self.daemon.https, &self.ca, method, path, Some(&self.token), body).await
    }

    async fn send(&self, path: &str, body: &[u8], signature: Option<&str>) -> (u16, Vec<u8>) {
        let mut headers = vec![("content-type", "application/x-apple-aspen-mdm-checkin")];
        if let Some(signature) = signature {
            headers.push(("mdm-signature", signature));
        }
        let (status, _, body) =
            fetch_bytes(self.daemon.https, &self.ca, Method::PUT, path, &headers, body.to_vec()).await;
        (status, body)
    }

    async fn device(&self, id: &str) -> Value {
        self.api(Method::GET, &format!("/api/v1/devices/{id}"), None).await.1
    }
}

fn dict(bytes: &[u8]) -> plist::Dictionary {
    plist::from_bytes::<P>(bytes).unwrap().into_dictionary().unwrap()
}

/// What the device sends to the command endpoint, signed; returns the next command, if any.
async fn report(box_: &Appliance, device: &Device, entries: Vec<(&str, P)>) -> Option<plist::Dictionary> {
    let body = plist_xml(entries);
    let (status, answer) = box_.send("/mdm/apple/server", &body, Some(&device.mdm_signature(&body))).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    (!answer.is_empty()).then(|| dict(&answer))
}

fn command_of(next: &plist::Dictionary) -> (String, plist::Dictionary) {
    let uuid = next["CommandUUID"].as_string().unwrap().to_owned();
    (uuid, next["Command"].as_dictionary().unwrap().clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_apple_device_enrolls_over_scep_and_check_in_is_managed_and_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    let apns_url = format!("https://127.0.0.1:{}", apns.addr.port());
    let daemon = Daemon::spawn(
        &dir.path().join("state"),
        &[],
        &[
            ("ENROLLD_ADMIN_PASSWORD", PASSWORD),
            ("ENROLLD_ORGANISATION", "Example Ltd"),
            ("ENROLLD_APNS_URL", &apns_url),
            ("ENROLLD_APNS_CA_FILE", apns.ca_file.to_str().unwrap()),
        ],
    );
    daemon.wait_healthy();
    daemon.wait_device_ca().await;
    let ca_pem = get_plain(daemon.http, "enroll.local", "/ca.crt").await.body;
    let ca = parse_pem_certs(&ca_pem).remove(0);
    let login = json!({"username": "admin", "password": PASSWORD});
    let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
    let b = Appliance { token: signed_in["token"].as_str().unwrap().to_owned(), daemon, ca };

    let (cert, key) = apns.push_cert.clone();
    let upload = json!({"certificate_pem": cert, "private_key_pem": key});
    let (status, shown) = b.api(Method::PUT, "/api/v1/apple/push-certificate", Some(upload)).await;
    assert_eq!(status, 200, "{shown}");
    let (_, user) =
        b.api(Method::POST, "/api/v1/users", Some(json!({"name": "Ann", "email": "ann@example.com"}))).await;
    let invite = json!({"user_id": user["id"], "platform": "ios", "ownership": "corporate"});
    let (status, created) = b.api(Method::POST, "/api/v1/invites/by-myself", Some(invite)).await;
    assert_eq!(status, 201, "{created}");
    let invite_id = created["invite"]["id"].as_str().unwrap().to_owned();
    let link = format!("/e/{}", created["link_token"].as_str().unwrap());

    // The profile needs the passcode first.
    let profile_path = format!("{link}/profile");
    let refused = browse(b.daemon.https, &b.ca, Method::GET, &profile_path, &[], None).await;
    assert_eq!(refused.status, 401);
    let form = format!("passcode={}", created["passcode"].as_str().unwrap());
    let page = browse(b.daemon.https, &b.ca, Method::POST, &link, &[], Some(&form)).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Download the enrollment profile"), "{}", page.body);
    let cookie = page.headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let (status, headers, signed_profile) =
        fetch_bytes(b.daemon.https, &b.ca, Method::GET, &profile_path, &[("cookie", &cookie)], Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/x-apple-aspen-config");

    // Signed: OpenSSL verifies the CMS signature against the appliance CA alone (the leaf comes with the signature)
    // for its default purpose, S/MIME signing, and gives back the profile.
    let signed_file = dir.path().join("enroll.mobileconfig");
    std::fs::write(&signed_file, &signed_profile).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let signer_file = dir.path().join("signer.pem");
    let openssl = std::process::Command::new("openssl")
        .args(["cms", "-verify", "-inform", "DER", "-in"])
        .arg(&signed_file)
        .arg("-CAfile")
        .arg(&ca_file)
        .arg("-signer")
        .arg(&signer_file)
        .output()
        .expect("openssl is installed by tests/run");
    assert!(openssl.status.success(), "{}", String::from_utf8_lossy(&openssl.stderr));
    let profile = dict(&openssl.stdout);
    // The signer is the profile-signing certificate, not the HTTPS one: made for signing, issued by the CA.
    let signer_der = parse_pem_certs(&std::fs::read_to_string(&signer_file).unwrap()).remove(0);
    let (_, signer) = x509_parser::parse_x509_certificate(&signer_der).unwrap();
    assert!(signer.key_usage().unwrap().unwrap().value.digital_signature());
    let eku = signer.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.email_protection && !eku.server_auth, "{eku:?}");
    let state_pki = b.daemon.state_dir.join("pki");
    let kept = parse_pem_certs(&std::fs::read_to_string(state_pki.join("profile-signing.crt")).unwrap()).remove(0);
    assert_eq!(signer_der, kept, "the one kept in pki/");
    let verified = enrolld::pki::cms::verify(&signed_profile, None).unwrap();
    let chain = cms_certificates(&signed_profile);
    assert_eq!(chain.len(), 2, "the leaf and the appliance CA travel with the signature");
    assert!(chain.contains(&b.ca.to_vec()) && chain.contains(&verified.signer));

    // Checked against Apple's schemas: the top level, then each payload (with the common payload keys).
    let common = payload_keys(&schema("mdm/profiles/CommonPayloadKeys.yaml"));
    let problems = check(&payload_keys(&schema("mdm/profiles/TopLevel.yaml")), &profile, "iOS", &[]);
    assert!(problems.is_empty(), "top level: {problems:?}");
    let payloads = profile["PayloadContent"].as_array().unwrap();
    let mut by_type = std::collections::HashMap::new();
    for payload in payloads {
        let payload = payload.as_dictionary().unwrap();
        let kind = payload["PayloadType"].as_string().unwrap().to_owned();
        let keys = [payload_keys(&schema(&format!("mdm/profiles/{kind}.yaml"))), common.clone()].concat();
        let problems = check(&keys, payload, "iOS", &[]);
        assert!(problems.is_empty(), "{kind}: {problems:?}");
        by_type.insert(kind, payload.clone());
    }
    let (root, scep, mdm) =
        (&by_type["com.apple.security.root"], &by_type["com.apple.security.scep"], &by_type["com.apple.mdm"]);
    assert_eq!(root["PayloadContent"].as_data().unwrap(), b.ca.as_ref());
    assert_eq!(mdm["IdentityCertificateUUID"], scep["PayloadUUID"]);
    assert_eq!(mdm["Topic"].as_string(), Some(TOPIC));
    assert_eq!((mdm["SignMessage"].as_boolean(), mdm["CheckOutWhenRemoved"].as_boolean()), (Some(true), Some(true)));
    assert_eq!(mdm["AccessRights"].as_signed_integer(), Some(8191), "a corporate device may be erased");
    let server_url = mdm["ServerURL"].as_string().unwrap();
    assert!(server_url.starts_with("https://") && server_url.ends_with("/mdm/apple/server"), "{server_url}");
    let scep = scep["PayloadContent"].as_dictionary().unwrap();
    let challenge = scep["Challenge"].as_string().unwrap().to_owned();
    assert!(scep["URL"].as_string().unwrap().ends_with("/scep"));
    // Identifiers are the appliance's; UUIDs are new in every download.
    let (_, _, again) =
        fetch_bytes(b.daemon.https, &b.ca, Method::GET, &profile_path, &[("cookie", &cookie)], Vec::new()).await;
    assert_ne!(again, signed_profile);
    let again = enrolld::pki::cms::verify(&again, None).unwrap();
    let again = dict(&again.content);
    assert_eq!(again["PayloadIdentifier"], profile["PayloadIdentifier"]);
    assert_ne!(again["PayloadUUID"], profile["PayloadUUID"]);

    // SCEP: capabilities, the CA certificates, then the request.
    let caps = get_bytes(&b, "/scep?operation=GetCACaps").await;
    let caps = String::from_utf8(caps).unwrap();
    assert!(caps.contains("AES") && caps.contains("POSTPKIOperation") && caps.contains("SHA-256"), "{caps}");
    // GetCACert: the SCEP CA alone, the certificate to encrypt to, which the profile names by its SHA-256.
    let (status, headers, answer) =
        fetch_bytes(b.daemon.https, &b.ca, Method::GET, "/scep?operation=GetCACert", &[], Vec::new()).await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (200, "application/x-x509-ca-cert"));
    let scep_ca = scep_ca_certificate(&answer);
    assert_eq!(scep["CAFingerprint"].as_data(), Some(sha2::Sha256::digest(&scep_ca).as_slice()));
    let (_, scep_ca_parsed) = x509_parser::parse_x509_certificate(&scep_ca).unwrap();
    let (_, appliance_ca) = x509_parser::parse_x509_certificate(&b.ca).unwrap();
    scep_ca_parsed
        .verify_signature(Some(appliance_ca.public_key()))
        .expect("the SCEP CA is issued by the appliance CA");

    let mut device = Device::new();
    let nonce = [7u8; 16];
    let request = device.pkcs_req(&scep_ca, &challenge, "TX-1", &nonce);
    let (status, headers, reply) = fetch_bytes(
        b.daemon.https,
        &b.ca,
        Method::POST,
        "/scep?operation=PKIOperation",
        &[("content-type", "application/x-pki-message")],
        request,
    )
    .await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (200, "application/x-pki-message"));
    enrolld::pki::cms::verify(&reply, None).expect("the CertRep is signed");
    let rep = device.read_cert_rep(&reply);
    assert_eq!((rep.status.as_str(), rep.transaction_id.as_str()), ("0", "TX-1"), "{rep:?}");
    assert_eq!(rep.recipient_nonce, nonce);
    assert_eq!(rep.signer, scep_ca, "signed by the SCEP CA");
    let identity = rep.issued.clone().unwrap();
    let (_, issued) = x509_parser::parse_x509_certificate(&identity).unwrap();
    issued.verify_signature(Some(scep_ca_parsed.public_key())).expect("issued by the SCEP CA");
    assert!(issued.subject().to_string().contains(&invite_id), "{}", issued.subject());
    let eku = issued.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);

    // The challenge was used: a second request with it gets a SCEP failure (badRequest), not a certificate.
    let mut other = Device::new();
    let replay = other.pkcs_req(&scep_ca, &challenge, "TX-2", &[9u8; 16]);
    let (status, _, reply) =
        fetch_bytes(b.daemon.https, &b.ca, Method::POST, "/scep?operation=PKIOperation", &[], replay).await;
    assert_eq!(status, 200);
    let rep = other.read_cert_rep(&reply);
    assert_eq!((rep.status.as_str(), rep.fail_info.as_deref()), ("2", Some("2")), "{rep:?}");
    assert!(rep.issued.is_none() && other.identity.is_none());
    let junk =
        fetch_bytes(b.daemon.https, &b.ca, Method::POST, "/scep?operation=PKIOperation", &[], b"junk".to_vec()).await;
    assert_eq!(junk.0, 400);

    // Check-in, shaped as Apple's schemas describe (and checked against them).
    let authenticate = vec![
        ("MessageType", P::from("Authenticate")),
        ("Topic", P::from(TOPIC)),
        ("UDID", P::from("00008030-001A2B3C4D5E6F70")),
        ("DeviceName", P::from("Ann's iPhone")),
        ("Model", P::from("iPhone14,5")),
        ("ModelName", P::from("iPhone")),
        ("ProductName", P::from("iPhone14,5")),
        ("OSVersion", P::from("17.5")),
        ("BuildVersion", P::from("21F79")),
        ("SerialNumber", P::from("F2LXK0AAHG7F")),
        ("IMEI", P::from("35 209900 176148 1")),
    ];
    let body = plist_xml(authenticate);
    assert_eq!(
        check(&payload_keys(&schema("mdm/checkin/authenticate.yaml")), &dict(&body), "iOS", &[]),
        Vec::<String>::new()
    );
    assert_eq!(b.send("/mdm/apple/checkin", &body, None).await.0, 401, "unsigned");
    assert_eq!(
        b.send("/mdm/apple/checkin", &body, Some(&device.forged_signature(&body))).await.0,
        401,
        "not issued here"
    );
    let other_body = plist_xml(vec![("MessageType", P::from("CheckOut")), ("Topic", P::from(TOPIC))]);
    assert_eq!(
        b.send("/mdm/apple/checkin", &body, Some(&device.mdm_signature(&other_body))).await.0,
        401,
        "signed something else"
    );
    let (status, _) = b.send("/mdm/apple/checkin", &body, Some(&device.mdm_signature(&body))).await;
    assert_eq!(status, 200);
    let (_, still) = b.api(Method::GET, &format!("/api/v1/invites/{invite_id}"), None).await;
    assert_eq!(still["status"], "pending", "Authenticate alone enrolls nothing");

    let token_update = vec![
        ("MessageType", P::from("TokenUpdate")),
        ("Topic", P::from(TOPIC)),
        ("UDID", P::from("00008030-001A2B3C4D5E6F70")),
        ("Token", P::Data(vec![0xab; 32])),
        ("PushMagic", P::from("5F3C2B1A-MAGIC")),
        ("UnlockToken", P::Data(vec![1, 2, 3])),
        ("AwaitingConfiguration", P::from(false)),
    ];
    let body = plist_xml(token_update);
    assert_eq!(
        check(&payload_keys(&schema("mdm/checkin/tokenupdate.yaml")), &dict(&body), "iOS", &[]),
        Vec::<String>::new()
    );
    let (status, _) = b.send("/mdm/apple/checkin", &body, Some(&device.mdm_signature(&body))).await;
    assert_eq!(status, 200);
    let (_, enrolled) = b.api(Method::GET, &format!("/api/v1/invites/{invite_id}"), None).await;
    assert_eq!(enrolled["status"], "enrolled", "{enrolled}");
    let device_id = enrolled["device_id"].as_str().unwrap().to_owned();
    let record = b.device(&device_id).await;
    assert_eq!(
        (record["status"].as_str(), record["platform"].as_str(), record["serial"].as_str(), record["name"].as_str()),
        (Some("enrolled"), Some("ios"), Some("F2LXK0AAHG7F"), Some("Ann's iPhone")),
        "{record}"
    );
    assert_eq!(record["identity"].as_str(), Some(enrolld::pki::sha256_hex(&identity).as_str()));

    // The push that asks the device to fetch DeviceInformation, as Apple documents it.
    let push = apns.nth(1).await;
    assert_eq!(push.path, format!("/3/device/{}", "ab".repeat(32)));
    assert_eq!((push.topic.as_str(), push.push_type.as_str()), (TOPIC, "mdm"));
    assert_eq!(push.body, json!({"mdm": "5F3C2B1A-MAGIC"}));

    // The command queue: Idle gets DeviceInformation; its answer updates the device; then nothing waits.
    let next =
        report(&b, &device, vec![("Status", P::from("Idle")), ("UDID", P::from("00008030-001A2B3C4D5E6F70"))]).await;
    let (uuid, command) = command_of(&next.expect("DeviceInformation waits"));
    assert_eq!(command["RequestType"].as_string(), Some("DeviceInformation"));
    let problems =
        check(&payload_keys(&schema("mdm/commands/information.device.yaml")), &command, "iOS", &["RequestType"]);
    assert!(problems.is_empty(), "{problems:?}");
    let answers = P::Dictionary(plist::Dictionary::from_iter([
        ("DeviceName", P::from("Ann's work iPhone")),
        ("OSVersion", P::from("17.6")),
        ("BuildVersion", P::from("21G80")),
        ("IMEI", P::from("35 209900 176148 1")),
    ]));
    let next = report(
        &b,
        &device,
        vec![("Status", P::from("Acknowledged")), ("CommandUUID", P::from(uuid)), ("QueryResponses", answers)],
    )
    .await;
    assert!(next.is_none(), "nothing else waits: {next:?}");
    let record = b.device(&device_id).await;
    assert_eq!(record["name"], "Ann's work iPhone");
    assert_eq!(record["os_version"], "17.6 (21G80)");

    // Factory reset: pushed, sent as EraseDevice; NotNow keeps it queued; an Error puts the device back.
    let (status, _) = b
        .api(Method::POST, &format!("/api/v1/devices/{device_id}/deprovision"), Some(json!({"kind": "factory_reset"})))
        .await;
    assert_eq!(status, 200);
    apns.nth(2).await;
    let idle = || vec![("Status", P::from("Idle")), ("UDID", P::from("00008030-001A2B3C4D5E6F70"))];
    let (uuid, command) = command_of(&report(&b, &device, idle()).await.unwrap());
    assert_eq!(command["RequestType"].as_string(), Some("EraseDevice"));
    let problems = check(&payload_keys(&schema("mdm/commands/device.erase.yaml")), &command, "iOS", &["RequestType"]);
    assert!(problems.is_empty(), "{problems:?}");
    let not_now =
        report(&b, &device, vec![("Status", P::from("NotNow")), ("CommandUUID", P::from(uuid.clone()))]).await;
    assert!(not_now.is_none());
    let (again, _) = command_of(&report(&b, &device, idle()).await.unwrap());
    assert_eq!(again, uuid, "the same command, still queued");
    let error_chain = P::Array(vec![P::Dictionary(plist::Dictionary::from_iter([
        ("ErrorCode", P::from(12021)),
        ("ErrorDomain", P::from("MCMDMErrorDomain")),
        ("USEnglishDescription", P::from("The device is in Single App Mode")),
    ]))]);
    let after = report(
        &b,
        &device,
        vec![("Status", P::from("Error")), ("CommandUUID", P::from(uuid)), ("ErrorChain", error_chain)],
    )
    .await;
    assert!(after.is_none());
    let record = b.device(&device_id).await;
    assert_eq!(record["status"], "enrolled", "{record}");
    assert!(record["problem"].as_str().unwrap().contains("Single App Mode"), "{record}");

    // Revoke MDM: RemoveProfile names the enrollment profile; acknowledged, the device is Unmanaged.
    let (status, _) = b
        .api(Method::POST, &format!("/api/v1/devices/{device_id}/deprovision"), Some(json!({"kind": "revoke_mdm"})))
        .await;
    assert_eq!(status, 200);
    apns.nth(3).await;
    let (uuid, command) = command_of(&report(&b, &device, idle()).await.unwrap());
    assert_eq!(command["RequestType"].as_string(), Some("RemoveProfile"));
    assert_eq!(command["Identifier"], profile["PayloadIdentifier"]);
    let problems = check(&payload_keys(&schema("mdm/commands/profile.remove.yaml")), &command, "iOS", &["RequestType"]);
    assert!(problems.is_empty(), "{problems:?}");
    report(&b, &device, vec![("Status", P::from("Acknowledged")), ("CommandUUID", P::from(uuid))]).await;
    assert_eq!(b.device(&device_id).await["status"], "unmanaged");

    // CheckOut as the profile goes; after it the identity is refused at the command endpoint.
    let body = plist_xml(vec![
        ("MessageType", P::from("CheckOut")),
        ("Topic", P::from(TOPIC)),
        ("UDID", P::from("00008030-001A2B3C4D5E6F70")),
    ]);
    assert_eq!(
        check(&payload_keys(&schema("mdm/checkin/checkout.yaml")), &dict(&body), "iOS", &[]),
        Vec::<String>::new()
    );
    assert_eq!(b.send("/mdm/apple/checkin", &body, Some(&device.mdm_signature(&body))).await.0, 200);
    assert_eq!(b.device(&device_id).await["status"], "unmanaged");
    let idle_body = plist_xml(idle());
    assert_eq!(b.send("/mdm/apple/server", &idle_body, Some(&device.mdm_signature(&idle_body))).await.0, 401);
    let (_, audit) = b.api(Method::GET, "/api/v1/audit?limit=100", None).await;
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for action in ["apple.identity", "device.enroll", "device.command", "device.checkout"] {
        assert!(actions.contains(&action), "{action} missing from {actions:?}");
    }
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

impl Appliance {
    /// The real binary, with the APNs stand-in as its push gateway, signed in, with the push certificate uploaded.
    async fn start(dir: &std::path::Path, apns: &Apns) -> Appliance {
        let apns_url = format!("https://127.0.0.1:{}", apns.addr.port());
        let daemon = Daemon::spawn(
            &dir.join("state"),
            &[],
            &[
                ("ENROLLD_ADMIN_PASSWORD", PASSWORD),
                ("ENROLLD_APNS_URL", &apns_url),
                ("ENROLLD_APNS_CA_FILE", apns.ca_file.to_str().unwrap()),
            ],
        );
        daemon.wait_healthy();
        daemon.wait_device_ca().await;
        let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
        let login = json!({"username": "admin", "password": PASSWORD});
        let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
        let b = Appliance { token: signed_in["token"].as_str().unwrap().to_owned(), daemon, ca };
        let (cert, key) = apns.push_cert.clone();
        let upload = json!({"certificate_pem": cert, "private_key_pem": key});
        assert_eq!(b.api(Method::PUT, "/api/v1/apple/push-certificate", Some(upload)).await.0, 200);
        b
    }

    /// An admin's own invite for `body` (user, platform, …): its id, and the SCEP challenge of the profile the
    /// user downloads after entering the passcode on a device of `platform`.
    pub async fn invite_and_profile(&self, body: Value, platform: &str) -> (String, String, plist::Dictionary) {
        let (status, created) = self.api(Method::POST, "/api/v1/invites/by-myself", Some(body)).await;
        assert_eq!(status, 201, "{created}");
        let link = format!("/e/{}", created["link_token"].as_str().unwrap());
        let form = format!("passcode={}&platform={platform}", created["passcode"].as_str().unwrap());
        let page = browse(self.daemon.https, &self.ca, Method::POST, &link, &[], Some(&form)).await;
        let cookie = page.headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
        let path = format!("{link}/profile?platform={platform}");
        let (status, _, signed) =
            fetch_bytes(self.daemon.https, &self.ca, Method::GET, &path, &[("cookie", &cookie)], Vec::new()).await;
        assert_eq!(status, 200);
        let profile = dict(&enrolld::pki::cms::verify(&signed, None).unwrap().content);
        let scep = profile["PayloadContent"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_dictionary().unwrap())
            .find(|p| p["PayloadType"].as_string() == Some("com.apple.security.scep"))
            .unwrap();
        let challenge = scep["PayloadContent"].as_dictionary().unwrap()["Challenge"].as_string().unwrap().to_owned();
        (created["invite"]["id"].as_str().unwrap().to_owned(), challenge, profile)
    }

    /// The device's SCEP request with `challenge`; the answer read by the device.
    pub async fn scep(&self, device: &mut Device, challenge: &str) -> crate::apple_device::CertRep {
        let scep_ca = scep_ca_certificate(&get_bytes(self, "/scep?operation=GetCACert").await);
        let request = device.pkcs_req(&scep_ca, challenge, "TX", &[1; 16]);
        let path = "/scep?operation=PKIOperation";
        let (status, _, reply) = fetch_bytes(self.daemon.https, &self.ca, Method::POST, path, &[], request).await;
        assert_eq!(status, 200);
        device.read_cert_rep(&reply)
    }

    /// `Authenticate` then `TokenUpdate` for a device with this UDID; the HTTP status of each.
    pub async fn check_in(&self, device: &Device, udid: &str, token: u8) -> (u16, u16) {
        self.check_in_as(device, udid, token, "iPad").await
    }

    async fn check_in_as(&self, device: &Device, udid: &str, token: u8, model_name: &str) -> (u16, u16) {
        let authenticate = plist_xml(vec![
            ("MessageType", P::from("Authenticate")),
            ("Topic", P::from(TOPIC)),
            ("UDID", P::from(udid)),
            ("ModelName", P::from(model_name)),
            ("SerialNumber", P::from(format!("SER-{udid}"))),
        ]);
        let first = self.send("/mdm/apple/checkin", &authenticate, Some(&device.mdm_signature(&authenticate))).await.0;
        let token_update = plist_xml(vec![
            ("MessageType", P::from("TokenUpdate")),
            ("Topic", P::from(TOPIC)),
            ("UDID", P::from(udid)),
            ("Token", P::Data(vec![token; 32])),
            ("PushMagic", P::from(format!("MAGIC-{token}"))),
        ]);
        let second = self.send("/mdm/apple/checkin", &token_update, Some(&device.mdm_signature(&token_update))).await.0;
        (first, second)
    }

    async fn invite(&self, id: &str) -> Value {
        self.api(Method::GET, &format!("/api/v1/invites/{id}"), None).await.1
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_push_is_recorded_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    apns.gone.store(true, Ordering::SeqCst);
    let b = Appliance::start(dir.path(), &apns).await;
    let (_, user) = b.api(Method::POST, "/api/v1/users", Some(json!({"name": "Bo", "email": "bo@example.com"}))).await;
    let body = json!({"user_id": user["id"], "platform": "any", "ownership": "personal"});
    let (invite_id, challenge, profile) = b.invite_and_profile(body, "ipados").await;
    let payloads = profile["PayloadContent"].as_array().unwrap();
    let mdm = payloads
        .iter()
        .map(|p| p.as_dictionary().unwrap())
        .find(|p| p["PayloadType"].as_string() == Some("com.apple.mdm"))
        .unwrap();
    assert_eq!(mdm["AccessRights"].as_signed_integer(), Some(8191 - 8), "a personal device's profile cannot erase");
    let mut device = Device::new();
    assert_eq!(b.scep(&mut device, &challenge).await.status, "0");
    assert_eq!(b.check_in(&device, "UDID-BO", 0xcd).await, (200, 200));
    let device_id = b.invite(&invite_id).await["device_id"].as_str().unwrap().to_owned();
    assert_eq!(b.device(&device_id).await["platform"], "ipados", "from the model name, for an OS-independent invite");
    apns.nth(1).await;
    let mut problem = Value::Null;
    for _ in 0..100 {
        problem = b.device(&device_id).await["problem"].clone();
        if problem.is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let problem = problem.as_str().unwrap_or_default().to_owned();
    assert!(problem.contains("410: Unregistered") && problem.contains("enroll it again"), "{problem}");
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// A challenge belongs to the link it was downloaded with: a resent invite (new link) or a removed one makes it
/// worthless, and a certificate request with it gets a SCEP failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_challenge_dies_with_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    let b = Appliance::start(dir.path(), &apns).await;
    let (_, user) = b.api(Method::POST, "/api/v1/users", Some(json!({"name": "Cy", "email": "cy@example.com"}))).await;
    for action in ["resend", "remove"] {
        let body = json!({"user_id": user["id"], "platform": "ios"});
        let (invite_id, challenge, _) = b.invite_and_profile(body, "ios").await;
        let (status, answer) = b.api(Method::POST, &format!("/api/v1/invites/{invite_id}/{action}"), None).await;
        assert!(status == 200 || status == 201, "{action}: {status} {answer}");
        let mut device = Device::new();
        let rep = b.scep(&mut device, &challenge).await;
        assert_eq!((rep.status.as_str(), rep.fail_info.as_deref()), ("2", Some("2")), "{action}: {rep:?}");
        assert!(device.identity.is_none());
    }
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// A device that enrolls again (a new invite, the same UDID) keeps its one record, now under the new identity; the
/// old identity can no longer fetch commands or move the push address.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_enrolls_again_keeps_one_record_and_its_old_identity_is_shut_out() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    let b = Appliance::start(dir.path(), &apns).await;
    let (_, user) = b.api(Method::POST, "/api/v1/users", Some(json!({"name": "Di", "email": "di@example.com"}))).await;
    let body = json!({"user_id": user["id"], "platform": "ipados"});
    let (first_invite, challenge, _) = b.invite_and_profile(body.clone(), "ipados").await;
    let mut old = Device::new();
    assert_eq!(b.scep(&mut old, &challenge).await.status, "0");
    assert_eq!(b.check_in(&old, "UDID-DI", 1).await, (200, 200));
    let device_id = b.invite(&first_invite).await["device_id"].as_str().unwrap().to_owned();

    let (second_invite, challenge, _) = b.invite_and_profile(body, "ipados").await;
    let mut new = Device::new();
    assert_eq!(b.scep(&mut new, &challenge).await.status, "0");
    assert_eq!(b.check_in(&new, "UDID-DI", 2).await, (200, 200));
    assert_eq!(b.invite(&second_invite).await["device_id"].as_str(), Some(device_id.as_str()), "the same record");
    let (_, listed) = b.api(Method::GET, "/api/v1/devices", None).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    let record = b.device(&device_id).await;
    assert_eq!(record["identity"].as_str(), Some(enrolld::pki::sha256_hex(new.identity.as_ref().unwrap()).as_str()));
    assert!(record["problem"].as_str().unwrap_or_default().contains("enrolled again"), "the admin is told: {record}");

    let idle = plist_xml(vec![("Status", P::from("Idle")), ("UDID", P::from("UDID-DI"))]);
    assert_eq!(b.send("/mdm/apple/server", &idle, Some(&old.mdm_signature(&idle))).await.0, 401);
    assert_eq!(b.check_in(&old, "UDID-DI", 3).await.1, 409, "the old identity cannot take the push address back");
    let next = report(&b, &new, vec![("Status", P::from("Idle")), ("UDID", P::from("UDID-DI"))]).await;
    assert_eq!(command_of(&next.unwrap()).1["RequestType"].as_string(), Some("DeviceInformation"));
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// Erasing a Mac sends a six-digit PIN (older Macs ask for it to unlock afterwards), which the admin sees on the
/// queued command.
#[tokio::test(flavor = "multi_thread")]
async fn a_mac_is_erased_with_a_pin_the_admin_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    let b = Appliance::start(dir.path(), &apns).await;
    let (_, user) = b.api(Method::POST, "/api/v1/users", Some(json!({"name": "Mo", "email": "mo@example.com"}))).await;
    let body = json!({"user_id": user["id"], "platform": "macos", "ownership": "corporate"});
    let (invite_id, challenge, profile) = b.invite_and_profile(body, "macos").await;
    assert_eq!(profile["PayloadScope"].as_string(), Some("System"), "a Mac's device profile is system-wide");
    let mut device = Device::new();
    assert_eq!(b.scep(&mut device, &challenge).await.status, "0");
    assert_eq!(b.check_in_as(&device, "UDID-MO", 7, "MacBook Pro").await, (200, 200));
    let device_id = b.invite(&invite_id).await["device_id"].as_str().unwrap().to_owned();
    assert_eq!(b.device(&device_id).await["platform"], "macos");
    let idle = || vec![("Status", P::from("Idle")), ("UDID", P::from("UDID-MO"))];
    let (uuid, _) = command_of(&report(&b, &device, idle()).await.unwrap());
    report(&b, &device, vec![("Status", P::from("Acknowledged")), ("CommandUUID", P::from(uuid))]).await;

    let path = format!("/api/v1/devices/{device_id}/deprovision");
    let (status, queued) = b.api(Method::POST, &path, Some(json!({"kind": "factory_reset"}))).await;
    assert_eq!(status, 200, "{queued}");
    let pin = queued["pending_commands"][0]["pin"].as_str().unwrap().to_owned();
    assert!(pin.len() == 6 && pin.chars().all(|c| c.is_ascii_digit()), "{pin}");
    let (_, command) = command_of(&report(&b, &device, idle()).await.unwrap());
    assert_eq!(command["RequestType"].as_string(), Some("EraseDevice"));
    assert_eq!(command["PIN"].as_string(), Some(pin.as_str()));
    let problems = check(&payload_keys(&schema("mdm/commands/device.erase.yaml")), &command, "macOS", &["RequestType"]);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// The certificates a CMS SignedData carries.
fn cms_certificates(message: &[u8]) -> Vec<Vec<u8>> {
    use der::{Decode, Encode};
    let info = cms::content_info::ContentInfo::from_der(message).unwrap();
    let signed: cms::signed_data::SignedData = info.content.decode_as().unwrap();
    signed.certificates.unwrap().0.iter().map(|c| c.to_der().unwrap()).collect()
}

async fn get_bytes(b: &Appliance, path: &str) -> Vec<u8> {
    let (status, _, body) = fetch_bytes(b.daemon.https, &b.ca, Method::GET, path, &[], Vec::new()).await;
    assert_eq!(status, 200, "{path}");
    body
}

/// The certificate of a `GetCACert` answer: one DER certificate, the SCEP CA's RSA one (the one a client encrypts
/// to; the ECDSA appliance CA is not offered, since clients encrypt to every certificate they get).
fn scep_ca_certificate(answer: &[u8]) -> Vec<u8> {
    let (rest, cert) = x509_parser::parse_x509_certificate(answer).expect("one DER certificate");
    assert!(rest.is_empty(), "nothing after the one certificate");
    assert_eq!(cert.public_key().algorithm.algorithm.to_id_string(), "1.2.840.113549.1.1.1", "an RSA key");
    answer.to_vec()
}

/// `scepclient` from Debian's `scep` package (micromdm/scep), unmodified and with its default options, against the
/// real binary: it encrypts its request to every certificate `GetCACert` gives it, in single DES, and reads the
/// reply with the same PKCS#7 library. The profile's challenge works once; a wrong one is refused, and an attempt
/// that fails does not use the challenge up.
#[tokio::test(flavor = "multi_thread")]
async fn a_stock_scep_client_gets_one_certificate_per_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    let b = Appliance::start(dir.path(), &apns).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, get_plain(b.daemon.http, "enroll.local", "/ca.crt").await.body).unwrap();
    let (_, user) = b.api(Method::POST, "/api/v1/users", Some(json!({"name": "Sy", "email": "sy@example.com"}))).await;
    let body = json!({"user_id": user["id"], "platform": "macos", "ownership": "corporate"});
    let (invite_id, challenge, _) = b.invite_and_profile(body, "macos").await;
    let url = format!("https://127.0.0.1:{}/scep", b.daemon.https.port());
    // Each run in a directory of its own: scepclient keeps its key, CSR (with the challenge) and certificate there.
    let run = |name: &str, challenge: &str, extra: &[&str]| {
        let work = dir.path().join(name);
        std::fs::create_dir(&work).unwrap();
        let mut command = std::process::Command::new("scepclient");
        command
            .args(["-server-url", &url, "-challenge", challenge, "-private-key"])
            .arg(work.join("key.pem"))
            .args(extra)
            // Go's TLS client trusts the appliance CA through the standard variable; no proxy for loopback.
            .env("SSL_CERT_FILE", &ca_file)
            .env_remove("SSL_CERT_DIR");
        for proxy in ["https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
            command.env_remove(proxy);
        }
        let output = command.output().expect("scepclient is installed by tests/run (Debian package scep)");
        let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), std::fs::read_to_string(work.join("client.pem")).ok(), said)
    };

    let (ok, cert, said) = run("wrong", "not-the-challenge", &[]);
    assert!(!ok && cert.is_none(), "a wrong challenge is refused: {said}");
    assert!(said.contains("badRequest"), "as a SCEP failure the client reads: {said}");
    // The right challenge, but a 1024-bit key, which enrolld does not accept: refused, and the challenge is kept.
    let (ok, cert, said) = run("weak", &challenge, &["-keySize", "1024"]);
    assert!(!ok && cert.is_none(), "a 1024-bit key is refused: {said}");

    let (ok, cert, said) = run("first", &challenge, &[]);
    assert!(ok, "scepclient with its defaults gets a certificate: {said}\n{}", b.daemon.log());
    let issued = parse_pem_certs(&cert.expect("client.pem written")).remove(0);
    let (_, issued) = x509_parser::parse_x509_certificate(&issued).unwrap();
    let scep_ca = scep_ca_certificate(&get_bytes(&b, "/scep?operation=GetCACert").await);
    let (_, scep_ca) = x509_parser::parse_x509_certificate(&scep_ca).unwrap();
    issued.verify_signature(Some(scep_ca.public_key())).expect("issued by the SCEP CA");
    assert!(issued.subject().to_string().contains(&invite_id), "{}", issued.subject());
    assert!(issued.extended_key_usage().unwrap().unwrap().value.client_auth);
    // Its request came in single DES (its library's default); the answer went back in 3DES, never in DES.
    assert!(b.daemon.log().contains("reply_cipher=3DES-CBC"), "{}", b.daemon.log());

    let (ok, cert, said) = run("again", &challenge, &[]);
    assert!(!ok && cert.is_none(), "the same challenge again is refused: {said}");
    assert!(said.contains("badRequest"), "{said}");
    let (_, audit) = b.api(Method::GET, "/api/v1/audit?limit=100", None).await;
    let issued_events = audit["items"].as_array().unwrap().iter().filter(|e| e["action"] == "apple.identity").count();
    assert_eq!(issued_events, 1, "one identity for one challenge: {audit}");
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

/// A device speaks only for itself: device A's identity cannot check in as device B (its UDID), nor answer B's
/// commands, and each refusal is a 403 in the audit log. B's record and queue stay as they were.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_speak_for_another_device() {
    let dir = tempfile::tempdir().unwrap();
    let apns = Apns::start(dir.path()).await;
    let b = Appliance::start(dir.path(), &apns).await;
    let mut devices = Vec::new();
    for (name, udid, token) in [("Al", "UDID-AL", 0x11), ("Bea", "UDID-BEA", 0x22)] {
        let email = format!("{}@example.com", name.to_lowercase());
        let (_, user) = b.api(Method::POST, "/api/v1/users", Some(json!({"name": name, "email": email}))).await;
        let (invite_id, challenge, _) =
            b.invite_and_profile(json!({"user_id": user["id"], "platform": "ipados"}), "ipados").await;
        let mut device = Device::new();
        assert_eq!(b.scep(&mut device, &challenge).await.status, "0");
        assert_eq!(b.check_in(&device, udid, token).await, (200, 200));
        let id = b.invite(&invite_id).await["device_id"].as_str().unwrap().to_owned();
        devices.push((device, id));
    }
    let ((al, al_id), (_, bea_id)) = (&devices[0], &devices[1]);
    let bea_before = b.device(bea_id).await;
    let bea_command = bea_before["pending_commands"][0]["id"].as_str().unwrap().to_owned();

    let signed = |entries: Vec<(&str, P)>| {
        let body = plist_xml(entries);
        let signature = al.mdm_signature(&body);
        (body, signature)
    };
    // A check-in naming Bea's UDID.
    let (body, signature) = signed(vec![
        ("MessageType", P::from("Authenticate")),
        ("Topic", P::from(TOPIC)),
        ("UDID", P::from("UDID-BEA")),
        ("DeviceName", P::from("not Bea's")),
    ]);
    assert_eq!(b.send("/mdm/apple/checkin", &body, Some(&signature)).await.0, 403);
    // A report naming Bea's UDID.
    let (body, signature) = signed(vec![("Status", P::from("Idle")), ("UDID", P::from("UDID-BEA"))]);
    assert_eq!(b.send("/mdm/apple/server", &body, Some(&signature)).await.0, 403);
    // Al's own UDID, but the answer to Bea's DeviceInformation, carrying made-up facts.
    let (body, signature) = signed(vec![
        ("Status", P::from("Acknowledged")),
        ("UDID", P::from("UDID-AL")),
        ("CommandUUID", P::from(bea_command.as_str())),
        ("QueryResponses", P::Dictionary(plist::Dictionary::from_iter([("DeviceName", P::from("Spoofed"))]))),
    ]);
    let (status, answer) = b.send("/mdm/apple/server", &body, Some(&signature)).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&answer));

    let bea_after = b.device(bea_id).await;
    assert_eq!(bea_after["pending_commands"], bea_before["pending_commands"], "Bea's command is still hers");
    assert_eq!(bea_after["name"], bea_before["name"]);
    assert_ne!(b.device(al_id).await["name"], "Spoofed", "nothing of it landed on Al's record either");
    let (_, audit) = b.api(Method::GET, "/api/v1/audit?limit=100", None).await;
    let refusals: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().filter(|e| e["action"] == "device.refused").collect();
    assert_eq!(refusals.len(), 3, "{audit}");
    assert!(refusals.iter().all(|e| e["target"] == al_id.as_str()), "{refusals:?}");

    // Al speaking for Al still works.
    let next = report(&b, al, vec![("Status", P::from("Idle")), ("UDID", P::from("UDID-AL"))]).await;
    assert_eq!(command_of(&next.unwrap()).1["RequestType"].as_string(), Some("DeviceInformation"));
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}
