//! Apple check-in throughput: `TokenUpdate` messages from enrolled devices, each signed with the device's SCEP-issued
//! identity (`Mdm-Signature`, verified by enrolld on every request), over TLS keep-alive connections to the real
//! binary. Reports requests per second and latency percentiles.
//!
//! Setup enrolls `BENCH_DEVICES` devices (default 64) the way a device does: profile, SCEP, `Authenticate`, first
//! `TokenUpdate`. Then each of `BENCH_CONNECTIONS` connections (default 16, one device each) sends `TokenUpdate`
//! for `BENCH_SECONDS` (default 10). The load generator runs on the same machine, so it shares the cores with
//! enrolld.
//!
//! Run: `cargo bench --bench checkin` (results go in BENCHMARKS.md).

// A benchmark stops at the first failure; there is nobody to report an error to.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

#[path = "../tests/it/apple_device.rs"]
mod apple_device;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use plist::Value as P;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const TOPIC: &str = "com.apple.mgmt.External.5f2c7b3e-1d2a-4c5b-9e8f-0a1b2c3d4e5f";
const PASSWORD: &str = "staple battery horse";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16, ca: &CertificateDer<'static>) -> Sender {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("enroll.local").unwrap(), stream)
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    sender
}

async fn request(
    sender: &mut Sender,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, Vec<u8>) {
    let mut request = hyper::Request::builder().method(method).uri(path).header("host", "enroll.local");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    sender.ready().await.unwrap();
    let response = sender.send_request(request.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    (status, headers, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

async fn call(
    sender: &mut Sender,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let (status, _, body) = request(sender, method, path, headers, body).await;
    (status, body)
}

async fn json_call(sender: &mut Sender, method: &str, path: &str, token: Option<&str>, body: Value) -> Value {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    let (_, body) = call(sender, method, path, &headers, body.to_string().into_bytes()).await;
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Enrolls one simulated device; returns it and the signed `TokenUpdate` it then repeats.
async fn enroll(port: u16, ca: &CertificateDer<'static>, token: &str, scep_ca: &[u8], n: usize) -> (Vec<u8>, String) {
    let mut s = connect(port, ca).await;
    let email = format!("user{n}@example.com");
    let user =
        json_call(&mut s, "POST", "/api/v1/users", Some(token), json!({"name": format!("User {n}"), "email": email}))
            .await;
    let created = json_call(
        &mut s,
        "POST",
        "/api/v1/invites/by-myself",
        Some(token),
        json!({"user_id": user["id"], "platform": "ios"}),
    )
    .await;
    let link = format!("/e/{}", created["link_token"].as_str().unwrap());
    let form = format!("passcode={}", created["passcode"].as_str().unwrap());
    let form_type = [("content-type", "application/x-www-form-urlencoded")];
    let (_, headers, _) = request(&mut s, "POST", &link, &form_type, form.into_bytes()).await;
    let cookie = headers["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let (_, signed) = call(&mut s, "GET", &format!("{link}/profile"), &[("cookie", &cookie)], Vec::new()).await;
    let profile = enrolld::pki::cms::verify(&signed, None).unwrap().content;
    let profile: plist::Dictionary = plist::from_bytes(&profile).unwrap();
    let challenge = profile["PayloadContent"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_dictionary())
        .find(|p| p["PayloadType"].as_string() == Some("com.apple.security.scep"))
        .unwrap()["PayloadContent"]
        .as_dictionary()
        .unwrap()["Challenge"]
        .as_string()
        .unwrap()
        .to_owned();
    let mut device = apple_device::Device::new();
    let request = device.pkcs_req(scep_ca, &challenge, &format!("TX-{n}"), &[n as u8; 16]);
    let (_, reply) = call(&mut s, "POST", "/scep?operation=PKIOperation", &[], request).await;
    assert_eq!(device.read_cert_rep(&reply).status, "0");
    let udid = format!("UDID-{n:05}");
    let authenticate = apple_device::plist_xml(vec![
        ("MessageType", P::from("Authenticate")),
        ("Topic", P::from(TOPIC)),
        ("UDID", P::from(udid.clone())),
        ("ModelName", P::from("iPhone")),
        ("SerialNumber", P::from(format!("SERIAL{n:05}"))),
    ]);
    let signature = device.mdm_signature(&authenticate);
    let (status, _) = call(&mut s, "PUT", "/mdm/apple/checkin", &[("mdm-signature", &signature)], authenticate).await;
    assert_eq!(status, 200);
    let token_update = apple_device::plist_xml(vec![
        ("MessageType", P::from("TokenUpdate")),
        ("Topic", P::from(TOPIC)),
        ("UDID", P::from(udid)),
        ("Token", P::Data(vec![n as u8; 32])),
        ("PushMagic", P::from(format!("MAGIC-{n}"))),
    ]);
    let signature = device.mdm_signature(&token_update);
    let (status, _) =
        call(&mut s, "PUT", "/mdm/apple/checkin", &[("mdm-signature", &signature)], token_update.clone()).await;
    assert_eq!(status, 200);
    (token_update, signature)
}

#[tokio::main]
async fn main() {
    let devices = env_number("BENCH_DEVICES", 64);
    let connections = env_number("BENCH_CONNECTIONS", 16).min(devices);
    let seconds = env_number("BENCH_SECONDS", 10) as u64;
    let dir = tempfile::tempdir().unwrap();
    let (https, http) = (free_port(), free_port());
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_enrolld"))
            .args(["serve", "--no-mdns", "--log-level", "error"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--https-listen", &format!("127.0.0.1:{https}"), "--http-listen", &format!("127.0.0.1:{http}")])
            .env("ENROLLD_ADMIN_PASSWORD", PASSWORD)
            // No push service here: pushes fail fast and are recorded, off the measured path.
            .env("ENROLLD_APNS_URL", "https://127.0.0.1:9")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let ca = loop {
        if let Ok(text) = std::fs::read_to_string(dir.path().join("state/pki/ca.crt"))
            && std::net::TcpStream::connect(("127.0.0.1", https)).is_ok()
        {
            break CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut s = connect(https, &ca).await;
    let login =
        json_call(&mut s, "POST", "/api/v1/login", None, json!({"username": "admin", "password": PASSWORD})).await;
    let token = login["token"].as_str().unwrap().to_owned();
    let push_key = rcgen::KeyPair::generate().unwrap();
    let mut push = rcgen::CertificateParams::default();
    push.distinguished_name.push(rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]), TOPIC);
    let push_cert = push.self_signed(&push_key).unwrap();
    let upload = json!({"certificate_pem": push_cert.pem(), "private_key_pem": push_key.serialize_pem()});
    json_call(&mut s, "PUT", "/api/v1/apple/push-certificate", Some(&token), upload).await;
    // On a first start the device-identity CA is made after the daemon is ready: 503 until then.
    let certs = loop {
        let (status, certs) = call(&mut s, "GET", "/scep?operation=GetCACert", &[], Vec::new()).await;
        if status == 200 {
            break certs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // GetCACert answers the one SCEP CA certificate (DER, application/x-x509-ca-cert), as stock SCEP clients expect.
    let scep_ca = certs;
    x509_parser::parse_x509_certificate(&scep_ca).expect("GetCACert answers one DER certificate");

    let started = Instant::now();
    let mut messages = Vec::new();
    for n in 0..devices {
        messages.push(enroll(https, &ca, &token, &scep_ca, n).await);
    }
    eprintln!("enrolled {devices} devices in {:.1} s", started.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (body, signature) in messages.into_iter().take(connections) {
        let ca = ca.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(https, &ca).await;
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let (status, _) =
                    call(&mut sender, "PUT", "/mdm/apple/checkin", &[("mdm-signature", &signature)], body.clone())
                        .await;
                assert_eq!(status, 200);
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "TokenUpdate check-ins: {} in {elapsed:.1} s = {:.0}/s over {connections} TLS keep-alive connections; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        at(0.50).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    );
    drop(daemon);
}
