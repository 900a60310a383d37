//! Windows enrollment (MS-MDE2, on-premise authentication) and management (OMA-DM) against the real binary. No
//! Windows PC can run here, so the PC is played from Microsoft's published example messages
//! (`tests/fixtures/windows`, from *On-premises authentication device enrollment*): the test fills in the user's
//! email and passcode and a PKCS#10 request it makes with its own RSA key, checks the answers against MS-MDE2 and
//! MS-XCEP, verifies the issued certificate's chain to the appliance CA, then holds OMA-DM sessions authenticated
//! by that certificate over TLS, as the Windows management client does.

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{Value, json};
use x509_parser::prelude::FromDer as _;

use crate::common::{Daemon, PASSWORD, api, fetch_bytes, get_plain, parse_pem_certs};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/windows");

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
}

struct Appliance {
    daemon: Daemon,
    ca: CertificateDer<'static>,
    token: String,
}

/// A PC: its key, and once enrolled its certificate.
struct Pc {
    key_pkcs8: Vec<u8>,
    cert: Option<CertificateDer<'static>>,
    id: &'static str,
}

impl Appliance {
    async fn start(state: &std::path::Path) -> Appliance {
        let daemon = Daemon::spawn(state, &[], &[("ENROLLD_ADMIN_PASSWORD", PASSWORD)]);
        daemon.wait_healthy();
        daemon.wait_device_ca().await;
        let ca = parse_pem_certs(&get_plain(daemon.http, "enroll.local", "/ca.crt").await.body).remove(0);
        let login = json!({"username": "admin", "password": PASSWORD});
        let (_, signed_in) = api(daemon.https, &ca, Method::POST, "/api/v1/login", None, Some(login)).await;
        Appliance { token: signed_in["token"].as_str().unwrap().to_owned(), daemon, ca }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        api(self.daemon.https, &self.ca, method, path, Some(&self.token), body).await
    }

    /// A user and an invite for a Windows PC made by the admin for themself: its id and passcode; the enrollment
    /// page, once the passcode is entered, offers Windows' own enrollment with the user's email filled in.
    async fn invite(&self, email: &str, ownership: &str) -> (String, String) {
        let (_, user) =
            self.admin(Method::POST, "/api/v1/users", Some(json!({"name": "Pat Doe", "email": email}))).await;
        let body = json!({"user_id": user["id"], "platform": "windows", "ownership": ownership, "channels": "email"});
        let (status, created) = self.admin(Method::POST, "/api/v1/invites/by-myself", Some(body)).await;
        assert_eq!(status, 201, "{created}");
        let passcode = created["passcode"].as_str().unwrap().to_owned();
        let link = format!("/e/{}", created["link_token"].as_str().unwrap());
        let page = crate::common::browse(
            self.daemon.https,
            &self.ca,
            Method::POST,
            &link,
            &[],
            Some(&format!("passcode={passcode}")),
        )
        .await;
        let encoded = email.replace('@', "%40");
        assert!(
            page.body.contains(&format!(
                "ms-device-enrollment:?mode=mdm&amp;username={encoded}&amp;servername=https%3A%2F%2Fenroll.local"
            )),
            "{}",
            page.body
        );
        (created["invite"]["id"].as_str().unwrap().to_owned(), passcode)
    }

    async fn soap(&self, path: &str, body: String) -> (u16, String) {
        let headers = [("content-type", "application/soap+xml; charset=utf-8")];
        let (status, _, body) =
            fetch_bytes(self.daemon.https, &self.ca, Method::POST, path, &headers, body.into_bytes()).await;
        (status, String::from_utf8(body).unwrap())
    }

    /// One OMA-DM message over TLS, presenting the PC's certificate (or none).
    async fn syncml(&self, pc: &Pc, body: String, with_certificate: bool) -> (u16, String) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match (&pc.cert, with_certificate) {
            (Some(cert), true) => {
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pc.key_pkcs8.clone()));
                builder.with_client_auth_cert(vec![cert.clone()], key).unwrap()
            }
            _ => builder.with_no_client_auth(),
        };
        let stream = tokio::net::TcpStream::connect(self.daemon.https).await.unwrap();
        let name = ServerName::try_from("enroll.local").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::post("/ManagementServer/MDM.svc")
            .header(hyper::header::HOST, "enroll.local")
            .header(hyper::header::CONTENT_TYPE, "application/vnd.syncml.dm+xml")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Policy, then enrollment, as Windows does them; returns the provisioning document.
    async fn enroll(&self, pc: &mut Pc, email: &str, passcode: &str) -> String {
        let fill = |xml: String| xml.replace("{{USERNAME}}", email).replace("{{PASSWORD}}", passcode);
        let (status, policies) = self.soap("/EnrollmentServer/Policy.svc", fill(fixture("get-policies.xml"))).await;
        assert_eq!(status, 200, "{policies}");
        let doc = roxmltree::Document::parse(&policies).unwrap();
        assert_eq!(text(&doc, "minimalKeyLength"), "2048");
        assert_eq!(text(&doc, "RelatesTo"), "urn:uuid:72048B64-0F19-448F-8C2E-B4C661860AA0");
        assert_eq!(text(&doc, "value"), "2.16.840.1.101.3.4.2.1", "SHA-256, the hash the policy names");

        let rst = fill(fixture("request-security-token.xml"))
            .replace("{{PKCS10}}", &pc.csr())
            .replace("7BA748C8-703E-4DF2-A74A-92984117346A", pc.id);
        let (status, answer) = self.soap("/EnrollmentServer/Enrollment.svc", rst).await;
        assert_eq!(status, 200, "{answer}");
        let doc = roxmltree::Document::parse(&answer).unwrap();
        let token = doc.descendants().find(|n| n.tag_name().name() == "BinarySecurityToken").unwrap();
        assert!(token.attribute("ValueType").unwrap().ends_with("/DeviceEnrollmentProvisionDoc"));
        use base64::Engine as _;
        let provisioning = base64::engine::general_purpose::STANDARD.decode(token.text().unwrap().trim()).unwrap();
        let provisioning = String::from_utf8(provisioning).unwrap();
        pc.cert = Some(CertificateDer::from(certificate_in(&provisioning, "My")));
        provisioning
    }
}

impl Pc {
    fn new(id: &'static str) -> Pc {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        Pc { key_pkcs8: key.to_pkcs8_der().unwrap().as_bytes().to_vec(), cert: None, id }
    }

    /// A PKCS#10 request for the PC's key, base64, as the enrollment client makes it.
    fn csr(&self) -> String {
        use base64::Engine as _;
        let pkcs8 = PrivatePkcs8KeyDer::from(self.key_pkcs8.clone());
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec![]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        base64::engine::general_purpose::STANDARD.encode(csr.der())
    }

    fn session(&self, body: &str) -> String {
        body.replace("{{DEVICE}}", self.id).replace("{{SERVER}}", "https://enroll.local/ManagementServer/MDM.svc")
    }
}

fn text(doc: &roxmltree::Document<'_>, local: &str) -> String {
    doc.descendants()
        .find(|n| n.is_element() && n.tag_name().name() == local)
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The DER of the certificate a provisioning document puts in `store` (`Root`, `CA` or `My`).
fn certificate_in(provisioning: &str, store: &str) -> Vec<u8> {
    use base64::Engine as _;
    let doc = roxmltree::Document::parse(provisioning).unwrap();
    let store = doc
        .descendants()
        .find(|n| {
            n.attribute("type") == Some(store)
                && n.parent().and_then(|p| p.attribute("type")) == Some("CertificateStore")
        })
        .unwrap_or_else(|| panic!("no {store} store in {provisioning}"));
    let parm = store.descendants().find(|n| n.attribute("name") == Some("EncodedCertificate")).unwrap();
    base64::engine::general_purpose::STANDARD.decode(parm.attribute("value").unwrap()).unwrap()
}

/// The value of `parm` `name` in a provisioning document.
fn parm(provisioning: &str, name: &str) -> String {
    let doc = roxmltree::Document::parse(provisioning).unwrap();
    doc.descendants()
        .find(|n| n.attribute("name") == Some(name))
        .and_then(|n| n.attribute("value"))
        .unwrap_or_default()
        .to_owned()
}

fn verifies(child: &[u8], issuer: &[u8]) -> bool {
    let (_, child) = x509_parser::certificate::X509Certificate::from_der(child).unwrap();
    let (_, issuer) = x509_parser::certificate::X509Certificate::from_der(issuer).unwrap();
    child.verify_signature(Some(issuer.public_key())).is_ok()
}

/// Discovery, the policy, the certificate and the provisioning document, then OMA-DM sessions: the first one
/// enrolls the PC, a factory reset goes out as `doWipe` and its status wipes the PC; a second PC's user
/// unenrolls it (alert 1226) while a revoke MDM waits for it. Wrong passcodes, sessions without the certificate
/// and malformed XML (a DTD with entity expansion, truncated, oversized, not SOAP) are refused with the faults
/// and statuses Windows understands.
#[tokio::test(flavor = "multi_thread")]
async fn a_windows_pc_enrolls_with_its_passcode_and_is_managed_over_oma_dm() {
    let dir = tempfile::tempdir().unwrap();
    let b = Appliance::start(&dir.path().join("state")).await;
    let origin = format!("https://enroll.local:{}", b.daemon.https.port());

    // Discovery: a GET first, then the published Discover request.
    let (status, _, _) =
        fetch_bytes(b.daemon.https, &b.ca, Method::GET, "/EnrollmentServer/Discovery.svc", &[], Vec::new()).await;
    assert_eq!(status, 200);
    let (status, discovered) = b.soap("/EnrollmentServer/Discovery.svc", fixture("discover.xml")).await;
    assert_eq!(status, 200, "{discovered}");
    let doc = roxmltree::Document::parse(&discovered).unwrap();
    assert_eq!(text(&doc, "AuthPolicy"), "OnPremise");
    assert_eq!(text(&doc, "EnrollmentVersion"), "3.0");
    assert_eq!(text(&doc, "EnrollmentServiceUrl"), format!("{origin}/EnrollmentServer/Enrollment.svc"));
    assert_eq!(text(&doc, "EnrollmentPolicyServiceUrl"), format!("{origin}/EnrollmentServer/Policy.svc"));

    // A wrong passcode is an Authentication fault (0x80180002, "user not recognized"), and counts.
    let (invite_id, passcode) = b.invite("user@contoso.com", "corporate").await;
    let wrong =
        fixture("get-policies.xml").replace("{{USERNAME}}", "user@contoso.com").replace("{{PASSWORD}}", "00000000");
    let (status, fault) = b.soap("/EnrollmentServer/Policy.svc", wrong).await;
    let doc = roxmltree::Document::parse(&fault).unwrap();
    assert_eq!(
        (
            status,
            text(&doc, "Value"),
            doc.descendants().filter(|n| n.tag_name().name() == "Value").nth(1).and_then(|n| n.text()).map(str::trim)
        ),
        (400, "s:Sender".to_owned(), Some("s:Authentication")),
        "{fault}"
    );
    assert!(text(&doc, "Text").contains("not right"), "{fault}");
    let (_, invite) = b.admin(Method::GET, &format!("/api/v1/invites/{invite_id}"), None).await;
    assert_eq!(invite["locked"], false, "an email address is no secret: its wrong answers lock nothing");

    // Guessing is slowed down per email address: after five wrong answers even the right one waits.
    let (_, guessed) = b.invite("guessed@contoso.com", "corporate").await;
    let policies = |answer: &str| {
        fixture("get-policies.xml").replace("{{USERNAME}}", "guessed@contoso.com").replace("{{PASSWORD}}", answer)
    };
    for _ in 0..5 {
        assert!(b.soap("/EnrollmentServer/Policy.svc", policies("11111111")).await.1.contains("s:Authentication"));
    }
    let (status, fault) = b.soap("/EnrollmentServer/Policy.svc", policies(&guessed)).await;
    assert!(status >= 400 && fault.contains("s:Authorization") && fault.contains("wait 15 minutes"), "{fault}");

    // Malformed bodies: each a clean 4xx, none a crash.
    let laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&lol2;</s:Body></s:Envelope>"#;
    let truncated = fixture("discover.xml")[..400].to_owned();
    let oversized = fixture("discover.xml").replace("user@contoso.com", &"x".repeat(70_000));
    for (body, expected, what) in [
        (laughs.to_owned(), 400, "entity expansion"),
        (truncated, 400, "truncated"),
        ("<html/>".to_owned(), 400, "not SOAP"),
        (oversized, 413, "oversized"),
    ] {
        let (status, answer) = b.soap("/EnrollmentServer/Discovery.svc", body).await;
        assert_eq!(status, expected, "{what}: {answer}");
        if expected == 400 {
            assert!(answer.contains("s:MessageFormat"), "{what}: {answer}");
        }
    }

    // The certificate and the provisioning document.
    let mut pc = Pc::new("7BA748C8-703E-4DF2-A74A-92984117346A");
    let provisioning = b.enroll(&mut pc, "user@contoso.com", &passcode).await;
    let (root, issuer, client) =
        (certificate_in(&provisioning, "Root"), certificate_in(&provisioning, "CA"), pc.cert.clone().unwrap());
    assert_eq!(root, b.ca.to_vec(), "the appliance CA goes in the Root store");
    assert!(
        verifies(&issuer, &root) && verifies(&client, &issuer),
        "the client certificate chains to the appliance CA"
    );
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&client).unwrap();
    let csr = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, pc.csr()).unwrap();
    let (_, request) = x509_parser::certification_request::X509CertificationRequest::from_der(&csr).unwrap();
    assert_eq!(parsed.public_key().raw, request.certification_request_info.subject_pki.raw, "issued for the PC's key");
    assert!(parsed.extended_key_usage().unwrap().unwrap().value.client_auth);
    assert_eq!(parm(&provisioning, "ADDR"), format!("{origin}/ManagementServer/MDM.svc"));
    assert_eq!(parm(&provisioning, "PROVIDER-ID"), "enrolld");
    assert!(
        provisioning.contains(r#"<characteristic type="Provider">"#)
            && provisioning.contains(r#"<characteristic type="enrolld">"#)
    );
    assert!(parm(&provisioning, "SSLCLIENTCERTSEARCHCRITERIA").starts_with("Subject=CN%3denrolld%20Windows%20"));
    let (_, invite) = b.admin(Method::GET, &format!("/api/v1/invites/{invite_id}"), None).await;
    assert_eq!(invite["status"], "pending", "enrolled at the first management session, not before");

    // Management: no certificate, no session; the first session enrolls the PC from its DevInfo.
    let first = pc.session(&fixture("syncml-first-session.xml"));
    assert_eq!(b.syncml(&pc, first.clone(), false).await.0, 401);
    let (status, answer) = b.syncml(&pc, first.clone(), true).await;
    assert_eq!(status, 200, "{answer}");
    let doc = roxmltree::Document::parse(&answer).unwrap();
    let statuses: Vec<(String, String)> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "Status")
        .map(|s| (text_in(s, "Cmd"), text_in(s, "Data")))
        .collect();
    assert_eq!(statuses[0], ("SyncHdr".into(), "200".into()));
    assert_eq!(statuses.len(), 4, "the header and the three commands: {answer}");
    let (_, devices) = b.admin(Method::GET, "/api/v1/devices?platform=windows", None).await;
    let device = devices["items"][0].clone();
    assert_eq!(device["status"], "enrolled", "{devices}");
    assert_eq!(
        (device["model"].as_str(), device["name"].as_str()),
        (Some("Contoso Laptop 7"), Some("MY_WINDOWS_DEVICE"))
    );
    assert_eq!(device["hardware_id"], pc.id);
    let (_, invite) = b.admin(Method::GET, &format!("/api/v1/invites/{invite_id}"), None).await;
    assert_eq!(invite["status"], "enrolled");

    // A session body that is not SyncML, or carries a DTD, is refused without touching the device.
    for bad in [r#"<!DOCTYPE x [<!ENTITY a "aaaa">]><SyncML>&a;</SyncML>"#, "<SyncML><SyncHdr>", "<html/>"] {
        assert_eq!(b.syncml(&pc, bad.to_owned(), true).await.0, 400, "{bad}");
    }

    // A factory reset: queued, sent as doWipe at the next session, wiped by its status.
    let device_id = device["id"].as_str().unwrap().to_owned();
    let reset = json!({"kind": "factory_reset"});
    assert_eq!(b.admin(Method::POST, &format!("/api/v1/devices/{device_id}/deprovision"), Some(reset)).await.0, 200);
    let (_, answer) = b.syncml(&pc, first.clone(), true).await;
    assert!(answer.contains("<Exec>") && answer.contains("./Device/Vendor/MSFT/RemoteWipe/doWipe"), "{answer}");
    let status_message = pc.session(
        r#"<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>2</SessionID><MsgID>2</MsgID><Target><LocURI>{{SERVER}}</LocURI></Target><Source><LocURI>{{DEVICE}}</LocURI></Source></SyncHdr><SyncBody><Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>9002</CmdRef><Cmd>Exec</Cmd><Data>200</Data></Status><Final/></SyncBody></SyncML>"#
    );
    assert_eq!(b.syncml(&pc, status_message, true).await.0, 200);
    let (_, device) = b.admin(Method::GET, &format!("/api/v1/devices/{device_id}"), None).await;
    assert_eq!(device["status"], "wiped");
    assert_eq!(b.syncml(&pc, first, true).await.0, 403, "a wiped PC has no more sessions");

    // A second PC: revoke MDM goes out as the DMClient Unenroll exec naming our provider; the user unenrolls
    // the PC themself meanwhile (alert 1226), which makes it Unmanaged.
    let (_, passcode) = b.invite("second@contoso.com", "personal").await;
    let mut second = Pc::new("0C6F4A6E-0000-4000-8000-00000000B0B0");
    b.enroll(&mut second, "second@contoso.com", &passcode).await;
    let first = second.session(&fixture("syncml-first-session.xml"));
    assert_eq!(b.syncml(&second, first.clone(), true).await.0, 200);
    let (_, devices) = b.admin(Method::GET, "/api/v1/devices?platform=windows&status=enrolled", None).await;
    let second_id = devices["items"][0]["id"].as_str().unwrap().to_owned();
    let revoke = json!({"kind": "revoke_mdm"});
    assert_eq!(b.admin(Method::POST, &format!("/api/v1/devices/{second_id}/deprovision"), Some(revoke)).await.0, 200);
    let (_, answer) = b.syncml(&second, first, true).await;
    assert!(
        answer.contains("./Device/Vendor/MSFT/DMClient/Unenroll") && answer.contains("<Data>enrolld</Data>"),
        "{answer}"
    );
    let unenroll = second.session(
        r#"<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD><VerProto>DM/1.2</VerProto><SessionID>3</SessionID><MsgID>1</MsgID><Target><LocURI>{{SERVER}}</LocURI></Target><Source><LocURI>{{DEVICE}}</LocURI></Source></SyncHdr><SyncBody><Alert><CmdID>2</CmdID><Data>1226</Data><Item><Meta><Type xmlns="syncml:metinf">com.microsoft:mdm.unenrollment.userrequest</Type><Format xmlns="syncml:metinf">int</Format></Meta><Data>1</Data></Item></Alert><Final/></SyncBody></SyncML>"#,
    );
    assert_eq!(b.syncml(&second, unenroll, true).await.0, 200);
    let (_, device) = b.admin(Method::GET, &format!("/api/v1/devices/{second_id}"), None).await;
    assert_eq!(device["status"], "unmanaged");
    let (_, audit) = b.admin(Method::GET, "/api/v1/audit?limit=100", None).await;
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for action in ["windows.identity", "device.enroll", "device.command", "device.checkout"] {
        assert!(actions.contains(&action), "{action} missing from {actions:?}");
    }
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}

fn text_in(node: roxmltree::Node<'_, '_>, local: &str) -> String {
    node.descendants()
        .find(|n| n.is_element() && n.tag_name().name() == local)
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// A PC speaks only for itself: a session under one PC's certificate whose DevInfo names another PC's DevId is
/// refused with 403 and audited, and leaves the other PC's record alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_pc_cannot_speak_for_another_pc() {
    let dir = tempfile::tempdir().unwrap();
    let b = Appliance::start(&dir.path().join("state")).await;
    let mut pcs = Vec::new();
    for (email, id) in [
        ("al@contoso.com", "0C6F4A6E-0000-4000-8000-0000000000A1"),
        ("bea@contoso.com", "0C6F4A6E-0000-4000-8000-0000000000B2"),
    ] {
        let (_, passcode) = b.invite(email, "corporate").await;
        let mut pc = Pc::new(id);
        b.enroll(&mut pc, email, &passcode).await;
        assert_eq!(b.syncml(&pc, pc.session(&fixture("syncml-first-session.xml")), true).await.0, 200);
        pcs.push(pc);
    }
    let (_, devices) = b.admin(Method::GET, "/api/v1/devices?platform=windows", None).await;
    let id_of = |hardware_id: &str| {
        devices["items"].as_array().unwrap().iter().find(|d| d["hardware_id"] == hardware_id).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (al_id, bea_id) = (id_of(pcs[0].id), id_of(pcs[1].id));
    let (_, bea_before) = b.admin(Method::GET, &format!("/api/v1/devices/{bea_id}"), None).await;

    // Al's certificate, Bea's DevId.
    let posing = pcs[1].session(&fixture("syncml-first-session.xml"));
    let (status, answer) = b.syncml(&pcs[0], posing, true).await;
    assert_eq!(status, 403, "{answer}");
    let (_, bea_after) = b.admin(Method::GET, &format!("/api/v1/devices/{bea_id}"), None).await;
    assert_eq!(bea_after, bea_before);
    let (_, audit) = b.admin(Method::GET, "/api/v1/audit?limit=100", None).await;
    let refusals: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().filter(|e| e["action"] == "device.refused").collect();
    assert_eq!(refusals.len(), 1, "{audit}");
    assert_eq!(refusals[0]["target"], al_id.as_str());

    // Al's own session still works.
    assert_eq!(b.syncml(&pcs[0], pcs[0].session(&fixture("syncml-first-session.xml")), true).await.0, 200);
    assert_eq!(b.daemon.terminate().0.code(), Some(0));
}
