//! What Windows talks to when it enrolls (MS-MDE2 with on-premise authentication): discovery, the enrollment
//! policy (MS-XCEP `GetPolicies`) and the enrollment itself (MS-WSTEP `RequestSecurityToken`), which issues the
//! device's client certificate from its PKCS#10 request and answers with the `wap-provisioningdoc` that installs
//! the CA, the certificate and the management client's settings. The management sessions are in `syncml.rs`.
//!
//! Requests are SOAP 1.2 read with roxmltree: no DTDs (so no entity expansion), a node limit, a 64 KiB body.
//! Refusals are SOAP faults with the subcodes Windows turns into its enrollment error messages.

pub mod syncml;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use minijinja::Environment;
use roxmltree::{Document, Node};

use super::AppState;
use super::api::access::ClientAddr;
use crate::domain::{Actor, LinkProblem, WindowsFacts, WindowsRefusal};

/// Largest SOAP request: a PKCS#10 and a few context items.
const MAX_BODY_BYTES: usize = 64 << 10;
/// Enough nodes for any enrollment or management message Windows sends; a flood of elements stops here.
const MAX_NODES: u32 = 20_000;
/// The management client's ProviderID (DMClient and the w7 APPLICATION characteristic must agree).
pub const PROVIDER_ID: &str = "enrolld";
/// How often an enrolled PC checks in when nothing else wakes it (minutes).
const POLL_MINUTES: u32 = 60;

const SOAP: &str = "http://www.w3.org/2003/05/soap-envelope";
const CONTENT_TYPE: &str = "application/soap+xml; charset=utf-8";

const TEMPLATES: &[(&str, &str)] = &[
    ("discover.xml", include_str!("templates/discover.xml")),
    ("policies.xml", include_str!("templates/policies.xml")),
    ("issued.xml", include_str!("templates/issued.xml")),
    ("provisioning.xml", include_str!("templates/provisioning.xml")),
    ("fault.xml", include_str!("templates/fault.xml")),
];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/EnrollmentServer/Discovery.svc", get(discovery_probe).post(discover))
        .route("/EnrollmentServer/Policy.svc", post(policies))
        .route("/EnrollmentServer/Enrollment.svc", post(enroll))
        .route("/ManagementServer/MDM.svc", post(syncml::session))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// A SOAP fault as MS-MDE2 lists them: the subcode becomes the error Windows shows (`Authentication` is
/// 0x80180002, "user not recognized"; `Authorization` 0x80180003; `MessageFormat` 0x80180001; …).
#[derive(Debug, Clone)]
pub struct Fault {
    sender: bool,
    subcode: &'static str,
    reason: String,
    /// Set for a server that will be able to answer shortly: the fault goes out as 503 with `Retry-After`.
    retry_after: Option<u64>,
}

impl Fault {
    fn format(reason: impl Into<String>) -> Fault {
        Fault { sender: true, subcode: "MessageFormat", reason: reason.into(), retry_after: None }
    }
    fn authentication(reason: impl Into<String>) -> Fault {
        Fault { sender: true, subcode: "Authentication", reason: reason.into(), retry_after: None }
    }
    fn authorization(reason: impl Into<String>) -> Fault {
        Fault { sender: false, subcode: "Authorization", reason: reason.into(), retry_after: None }
    }
    fn certificate(reason: impl Into<String>) -> Fault {
        Fault { sender: true, subcode: "CertificateRequest", reason: reason.into(), retry_after: None }
    }
    /// The server cannot answer yet (the device-identity CA is being made): 503, try again after a while.
    fn busy(reason: impl Into<String>, retry_after: u64) -> Fault {
        Fault { sender: false, subcode: "EnrollmentServer", reason: reason.into(), retry_after: Some(retry_after) }
    }
    fn server(reason: impl Into<String>) -> Fault {
        Fault { sender: false, subcode: "EnrollmentServer", reason: reason.into(), retry_after: None }
    }

    fn respond(&self, action: &str, relates_to: &str) -> Response {
        let body = render(
            "fault.xml",
            minijinja::context! {
                action => action,
                activity => uuid(),
                relates_to => relates_to,
                code => if self.sender { "s:Sender" } else { "s:Receiver" },
                subcode => format!("s:{}", self.subcode),
                reason => self.reason.clone(),
            },
        );
        let status = match (self.sender, self.retry_after) {
            (_, Some(_)) => StatusCode::SERVICE_UNAVAILABLE,
            (true, None) => StatusCode::BAD_REQUEST,
            (false, None) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

fn render(template: &str, values: minijinja::Value) -> String {
    thread_local! {
        static ENV: Environment<'static> = {
            let mut env = Environment::new();
            // XML's escaping, not HTML's (which would also write `/` as a character reference).
            env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
            env.set_formatter(|out, _state, value| {
                let text = if value.is_undefined() || value.is_none() { String::new() } else { value.to_string() };
                out.write_str(&xml_escape(&text))
                    .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "writing the answer"))
            });
            for (name, source) in TEMPLATES {
                env.add_template(name, source).ok();
            }
            env
        };
    }
    ENV.with(|env| env.get_template(template).and_then(|t| t.render(values))).unwrap_or_else(|error| {
        tracing::error!(%error, template, "a Windows enrollment template does not render");
        String::new()
    })
}

/// Text for XML character data and attribute values: the five characters XML reserves, as entities.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A new `urn:uuid:` style identifier (activity ids).
fn uuid() -> String {
    let b = crate::domain::random_bytes::<16>();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

/// No DTD (so no entity expansion, internal or external) and at most [`MAX_NODES`] nodes.
fn parsing_options<'input>() -> roxmltree::ParsingOptions<'input> {
    roxmltree::ParsingOptions { allow_dtd: false, nodes_limit: MAX_NODES, ..roxmltree::ParsingOptions::default() }
}

/// Parses a SOAP envelope: UTF-8, no DTD, at most [`MAX_NODES`] nodes, a SOAP 1.2 `Envelope` at the top.
fn parse(body: &[u8]) -> Result<Document<'_>, Fault> {
    let text = std::str::from_utf8(body).map_err(|_| Fault::format("the request is not UTF-8"))?;
    let options = parsing_options();
    let doc = Document::parse_with_options(text, options)
        .map_err(|error| Fault::format(format!("the request is not well-formed XML: {error}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" || root.tag_name().namespace() != Some(SOAP) {
        return Err(Fault::format("the request is not a SOAP 1.2 envelope"));
    }
    Ok(doc)
}

/// The first element named `local` (any namespace) under `node`.
fn child<'a, 'input>(node: Node<'a, 'input>, local: &str) -> Option<Node<'a, 'input>> {
    node.descendants().find(|n| n.is_element() && n.tag_name().name() == local)
}

/// The trimmed text of the first element named `local` under `node`.
fn text_of(node: Node<'_, '_>, local: &str) -> Option<String> {
    child(node, local).and_then(|n| n.text()).map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

fn message_id(doc: &Document<'_>) -> String {
    text_of(doc.root_element(), "MessageID").unwrap_or_default()
}

fn soap(body: String) -> Response {
    // Windows wants the whole answer in one message, not chunked: a body of known length is sent so.
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// Windows first checks with a plain GET that the discovery service is there.
async fn discovery_probe() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/html")], "").into_response()
}

/// `Discover`: on-premise authentication, and where the policy and enrollment services are.
async fn discover(State(state): State<AppState>, body: Bytes) -> Response {
    const ACTION: &str =
        "http://schemas.microsoft.com/windows/management/2012/01/enrollment/IDiscoveryService/DiscoverResponse";
    let doc = match parse(&body) {
        Ok(doc) => doc,
        Err(fault) => return fault.respond(ACTION, ""),
    };
    let relates_to = message_id(&doc);
    let Some(request) = child(doc.root_element(), "Discover") else {
        return Fault::format("the body holds no Discover request").respond(ACTION, &relates_to);
    };
    let offered = request
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "AuthPolicy")
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect::<Vec<_>>();
    if !offered.is_empty() && !offered.contains(&"OnPremise") {
        return Fault::authorization("this server authenticates on premise (OnPremise) only")
            .respond(ACTION, &relates_to);
    }
    // Windows 10 and 11 speak versions 3.0 to 5.0; answer with the one asked for, within that range.
    let version = match text_of(request, "RequestVersion").as_deref() {
        Some(v @ ("3.0" | "4.0" | "5.0")) => v.to_owned(),
        _ => "4.0".to_owned(),
    };
    let base = state.naming.public_url();
    soap(render(
        "discover.xml",
        minijinja::context! {
            activity => uuid(),
            relates_to => relates_to,
            version => version,
            policy_url => format!("{base}/EnrollmentServer/Policy.svc"),
            enrollment_url => format!("{base}/EnrollmentServer/Enrollment.svc"),
        },
    ))
}

/// The user's email and answer from the WS-Security `UsernameToken`.
fn username_token(doc: &Document<'_>) -> Result<(String, String), Fault> {
    let token = child(doc.root_element(), "UsernameToken")
        .ok_or_else(|| Fault::authentication("sign in with your email address and the passcode from your invite"))?;
    let username = text_of(token, "Username").unwrap_or_default();
    let password = child(token, "Password").and_then(|p| p.text()).unwrap_or_default().trim().to_owned();
    if username.is_empty() || password.is_empty() {
        return Err(Fault::authentication("sign in with your email address and the passcode from your invite"));
    }
    Ok((username, password))
}

/// Failed Windows sign-ins, per email address and per client address. An email address is no secret, so wrong
/// answers here do not lock the invite (a stranger could); they slow down whoever sends them. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Throttle {
    failures: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>>,
}

/// Failures an email address may collect in [`THROTTLE_WINDOW`] (a client address four times as many).
const EMAIL_FAILURES: u32 = 5;
const THROTTLE_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);

impl Throttle {
    fn keys(email: &str, client: Option<&str>) -> [String; 2] {
        [format!("email:{}", email.trim().to_lowercase()), format!("client:{}", client.unwrap_or("?"))]
    }

    /// Whether these may try now.
    fn allows(&self, email: &str, client: Option<&str>) -> bool {
        let now = std::time::Instant::now();
        let Ok(failures) = self.failures.lock() else { return true };
        let [by_email, by_client] = Self::keys(email, client);
        let count = |key: &str| {
            failures.get(key).filter(|(_, since)| now.duration_since(*since) < THROTTLE_WINDOW).map_or(0, |(n, _)| *n)
        };
        count(&by_email) < EMAIL_FAILURES && count(&by_client) < EMAIL_FAILURES * 4
    }

    fn failed(&self, email: &str, client: Option<&str>) {
        let now = std::time::Instant::now();
        let Ok(mut failures) = self.failures.lock() else { return };
        if failures.len() > 10_000 {
            failures.retain(|_, (_, since)| now.duration_since(*since) < THROTTLE_WINDOW);
        }
        for key in Self::keys(email, client) {
            let entry = failures.entry(key).or_insert((0, now));
            if now.duration_since(entry.1) >= THROTTLE_WINDOW {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
    }

    fn succeeded(&self, email: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&format!("email:{}", email.trim().to_lowercase()));
        }
    }
}

/// Checks the user's answer against their pending invite for a Windows PC. An unknown address and a wrong answer
/// get the same fault, so the endpoint does not tell who has an invite.
async fn authenticate(
    state: &AppState,
    client: Option<String>,
    doc: &Document<'_>,
) -> Result<crate::model::Invite, Fault> {
    let (email, answer) = username_token(doc)?;
    if !state.windows.allows(&email, client.as_deref()) {
        return Err(Fault::authorization("too many wrong sign-ins; wait 15 minutes and try again"));
    }
    let domain = state.enrollment.clone();
    let lookup = email.clone();
    let checked = tokio::task::spawn_blocking(move || domain.windows_check(&lookup, &answer)).await;
    if matches!(checked, Ok(Ok(Err(WindowsRefusal::NoInvite | WindowsRefusal::Wrong)))) {
        state.windows.failed(&email, client.as_deref());
    } else if matches!(checked, Ok(Ok(Ok(_)))) {
        state.windows.succeeded(&email);
    }
    match checked {
        Ok(Ok(Ok(invite))) => Ok(invite),
        Ok(Ok(Err(refusal))) => Err(match refusal {
            WindowsRefusal::NoInvite | WindowsRefusal::Wrong => Fault::authentication(
                "the email address or passcode is not right, or there is no invite for a Windows PC under it",
            ),
            WindowsRefusal::Link(LinkProblem::Locked) => {
                Fault::authorization("too many wrong passcodes; ask your IT team to resend the invite")
            }
            WindowsRefusal::Link(problem) => {
                Fault::authorization(format!("this invite cannot enroll a device ({problem:?}); ask your IT team"))
            }
            WindowsRefusal::NoPassword => Fault::authorization(
                "set your password first: open the invite link in a browser and ask for the password link",
            ),
        }),
        Ok(Err(error)) => {
            tracing::error!(%error, "checking a Windows enrollment failed");
            Err(Fault::server("the server could not check the sign-in; try again later"))
        }
        Err(_) => Err(Fault::server("the server could not check the sign-in; try again later")),
    }
}

/// MS-XCEP `GetPolicies`, after the user's answer is checked: RSA keys of at least 2048 bits, SHA-256.
async fn policies(State(state): State<AppState>, ClientAddr(client): ClientAddr, body: Bytes) -> Response {
    const ACTION: &str =
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy/IPolicy/GetPoliciesResponse";
    let doc = match parse(&body) {
        Ok(doc) => doc,
        Err(fault) => return fault.respond(ACTION, ""),
    };
    let relates_to = message_id(&doc);
    if child(doc.root_element(), "GetPolicies").is_none() {
        return Fault::format("the body holds no GetPolicies request").respond(ACTION, &relates_to);
    }
    if let Err(fault) = authenticate(&state, client, &doc).await {
        return fault.respond(ACTION, &relates_to);
    }
    let validity = crate::pki::scep::DEVICE_CERT_VALIDITY.whole_seconds();
    soap(render(
        "policies.xml",
        minijinja::context! {
            relates_to => relates_to,
            validity_seconds => validity,
            renewal_seconds => validity / 10,
        },
    ))
}

/// A certificate as the provisioning document carries it: its SHA-1 thumbprint (as Windows names certificates in
/// its stores) and its DER in base64.
fn stored(der: &[u8]) -> minijinja::Value {
    let thumbprint = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<String>();
    minijinja::context! { thumbprint => thumbprint, base64 => base64::engine::general_purpose::STANDARD.encode(der) }
}

/// MS-WSTEP `RequestSecurityToken`: the user's answer checked, the PKCS#10 in the `BinarySecurityToken` signed by
/// the device-identity CA, the certificate recorded as the device's identity, and the provisioning document.
async fn enroll(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    const ACTION: &str = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RSTRC/wstep";
    let _ = headers;
    let doc = match parse(&body) {
        Ok(doc) => doc,
        Err(fault) => return fault.respond(ACTION, ""),
    };
    let relates_to = message_id(&doc);
    let Some(request) = child(doc.root_element(), "RequestSecurityToken") else {
        return Fault::format("the body holds no RequestSecurityToken").respond(ACTION, &relates_to);
    };
    let Some(token) = child(request, "BinarySecurityToken") else {
        return Fault::certificate("the request carries no certificate request (BinarySecurityToken)")
            .respond(ACTION, &relates_to);
    };
    if !token.attribute("ValueType").unwrap_or_default().ends_with("#PKCS10") {
        return Fault::certificate("the BinarySecurityToken must be a PKCS#10 request").respond(ACTION, &relates_to);
    }
    let encoded: String = token.text().unwrap_or_default().chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(csr) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return Fault::certificate("the certificate request is not base64").respond(ACTION, &relates_to);
    };
    let context = |name: &str| {
        request
            .descendants()
            .find(|n| n.is_element() && n.tag_name().name() == "ContextItem" && n.attribute("Name") == Some(name))
            .and_then(|n| text_of(n, "Value"))
    };
    let facts = WindowsFacts {
        device_hwid: context("HWDevID").or_else(|| context("DeviceID")),
        device_name: context("DeviceName"),
        os_version: context("OSVersion"),
    };
    let device_store = if context("EnrollmentType").as_deref() == Some("Device") { "System" } else { "User" };
    let issuer = match state.mdm.scep() {
        Ok(issuer) => issuer,
        Err(refusal) => {
            let fault = match refusal.retry_after {
                Some(seconds) => Fault::busy(refusal.message, seconds),
                None => Fault::server(refusal.message),
            };
            return fault.respond(ACTION, &relates_to);
        }
    };
    let invite = match authenticate(&state, client.clone(), &doc).await {
        Ok(invite) => invite,
        Err(fault) => return fault.respond(ACTION, &relates_to),
    };
    let now = state.clock.now();
    let common_name = format!("enrolld Windows {}", invite.id);
    let organisation = state.naming.organisation();
    let issued = match issuer.issue_csr(&csr, &common_name, &organisation, now) {
        Ok(issued) => issued,
        Err(error) => return Fault::certificate(error.to_string()).respond(ACTION, &relates_to),
    };
    let Ok(info) = crate::pki::parse_certificate(&issued) else {
        return Fault::server("the issued certificate cannot be read back").respond(ACTION, &relates_to);
    };
    let domain = state.enrollment.clone();
    let (actor, sha256, invite_id, not_after) = (Actor::device(client), info.sha256.clone(), invite.id, info.not_after);
    let recorded = tokio::task::spawn_blocking(move || {
        domain.windows_identity_issued(&actor, &invite_id, &sha256, not_after, &facts)
    })
    .await;
    if !matches!(recorded, Ok(Ok(_))) {
        return Fault::server("the certificate could not be recorded; try again").respond(ACTION, &relates_to);
    }
    let Some(root) = super::enroll::ca_der(&state) else {
        return Fault::server("the appliance CA cannot be read").respond(ACTION, &relates_to);
    };
    let search = format!(
        "Subject=CN%3d{}&Stores=My%5C{device_store}",
        form_urlencoded::byte_serialize(common_name.as_bytes()).collect::<String>().replace('+', "%20")
    );
    let name = if organisation.is_empty() { "enrolld".to_owned() } else { organisation };
    let provisioning = render(
        "provisioning.xml",
        minijinja::context! {
            root => stored(&root),
            issuer => stored(issuer.cert_der()),
            client => stored(&issued),
            store => device_store,
            provider => PROVIDER_ID,
            name => name,
            management_url => format!("{}/ManagementServer/MDM.svc", state.naming.public_url()),
            search_criteria => search,
            poll_minutes => POLL_MINUTES,
            device_name => invite.id.to_string(),
        },
    );
    tracing::info!(invite = %invite.id, serial = %info.serial, "issued a Windows device its certificate");
    let format = time::format_description::well_known::Rfc3339;
    soap(render(
        "issued.xml",
        minijinja::context! {
            relates_to => relates_to,
            created => now.format(&format).unwrap_or_default(),
            expires => (now + time::Duration::minutes(5)).format(&format).unwrap_or_default(),
            provisioning => base64::engine::general_purpose::STANDARD.encode(provisioning),
        },
    ))
}
