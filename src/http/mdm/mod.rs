//! What enrolled Apple devices talk to: the SCEP server that issues their identity (`/scep`, RFC 8894), the
//! check-in endpoint (`/mdm/apple/checkin`: `Authenticate`, `TokenUpdate`, `CheckOut`) and the command endpoint
//! (`/mdm/apple/server`), plus the push that wakes a device when a command waits. Every check-in and command request
//! must carry an `Mdm-Signature` made by an identity this appliance issued; anything else is refused and logged.

pub mod messages;
pub mod profile;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use base64::Engine as _;
use serde::Deserialize;

use super::{AppState, HttpError};
use crate::domain::{Actor, AppleClaim, ChallengeProblem};
use crate::model::{AppleIdentity, Id};
use crate::pki::CertificateAuthority;
use crate::pki::cms;
use crate::pki::scep::{CAPABILITIES, DeviceCa, FailInfo, ScepAuthority, ScepError};
use crate::pki::signing::ProfileSigner;
use crate::push::Pusher;
use crate::tls::ServingCertificate;
use messages::{CheckIn, CommandReport};

/// Largest check-in or command report read (a full `DeviceInformation` answer is a few KiB).
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Largest SCEP request read.
const MAX_SCEP_BYTES: usize = 64 << 10;

/// The device-management handle in [`AppState`]: the appliance CA, the device-identity CA (pending on a first
/// start until its key is made), the profile signer, the serving certificate (for the dashboard), and the push
/// client.
#[derive(Clone, Debug, Default)]
pub struct Mdm {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    ca: Arc<CertificateAuthority>,
    device_ca: DeviceCa,
    /// Signs enrollment profiles (a certificate of its own from the appliance CA, kept current by the keeper).
    profile_signer: Option<Arc<ProfileSigner>>,
    serving: Option<Arc<ServingCertificate>>,
    pusher: Pusher,
    /// The problem each device's last failed push recorded (in this run), which a push that gets through clears.
    push_problems: std::sync::Mutex<std::collections::HashMap<Id, String>>,
}

/// How long a device is asked to wait while the device-identity CA is being made.
pub const RETRY_AFTER_SECS: u64 = 10;

impl Mdm {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        device_ca: DeviceCa,
        profile_signer: Option<Arc<ProfileSigner>>,
        serving: Option<Arc<ServingCertificate>>,
        pusher: Pusher,
    ) -> Mdm {
        let push_problems = std::sync::Mutex::default();
        Mdm { inner: Some(Arc::new(Inner { ca, device_ca, profile_signer, serving, pusher, push_problems })) }
    }

    /// The device-identity (SCEP) CA if it is ready; otherwise why not, as a 503 with `Retry-After` (it is being
    /// made on a first start) or because device management does not run here.
    pub(crate) fn scep(&self) -> Result<Arc<ScepAuthority>, HttpError> {
        let Some(inner) = &self.inner else {
            return Err(HttpError::unavailable("device management is not running on this server"));
        };
        inner.device_ca.get().ok_or_else(|| {
            let message = match inner.device_ca.problem() {
                None => "the device-identity CA is being made (this box's first start); try again in a moment".into(),
                Some(problem) => format!(
                    "the device-identity CA could not be made ({problem}); enrolld tries again every minute, see its log"
                ),
            };
            HttpError {
                retry_after: Some(RETRY_AFTER_SECS),
                ..HttpError::new(StatusCode::SERVICE_UNAVAILABLE, "device_ca_pending", message)
            }
        })
    }

    /// The HTTPS certificate being served, for the dashboard.
    pub fn serving_info(&self) -> Option<crate::pki::CertInfo> {
        Some(self.inner.as_ref()?.serving.as_ref()?.certificate().info.clone())
    }

    /// Signs an enrollment profile (CMS SignedData carrying it, with the profile-signing certificate and the
    /// appliance CA). `None` only without device management (tests): the profile then goes out unsigned.
    pub fn sign_profile(&self, xml: &[u8], now: time::OffsetDateTime) -> Option<Result<Vec<u8>, cms::CmsError>> {
        Some(self.inner.as_ref()?.profile_signer.as_ref()?.sign(xml, now))
    }

    /// Wakes a device so it fetches its waiting commands: looks up its push address and the push certificate and
    /// sends the push in the background. What goes wrong is recorded on the device.
    pub fn wake(&self, state: &AppState, device_id: Id) {
        let Some(inner) = self.inner.clone() else { return };
        let domain = state.enrollment.clone();
        tokio::spawn(async move {
            let lookup = {
                let domain = domain.clone();
                tokio::task::spawn_blocking(move || {
                    Ok::<_, crate::domain::DomainError>((
                        domain.apple_push_target(&device_id)?,
                        domain.push_certificate()?,
                    ))
                })
                .await
            };
            let (target, certificate) = match lookup {
                Ok(Ok((Some(target), Some(certificate)))) => (target, certificate),
                Ok(Ok(_)) => return,
                Ok(Err(error)) => return tracing::warn!(%error, device = %device_id, "no push: lookup failed"),
                Err(error) => return tracing::warn!(%error, device = %device_id, "no push: lookup failed"),
            };
            let outcome = inner.pusher.push(&certificate, &target).await;
            let push_problems = || inner.push_problems.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let recorded = match outcome {
                Ok(()) => {
                    tracing::debug!(device = %device_id, "push sent");
                    // A push that gets through clears only what an earlier push recorded: not a command the device
                    // refused, nor the warning that it enrolled again while still managed.
                    let Some(previous) = push_problems().remove(&device_id) else { return };
                    tokio::task::spawn_blocking(move || {
                        domain.clear_device_problem_if(&device_id, &previous).map(|_| ())
                    })
                    .await
                }
                Err(error) => {
                    tracing::warn!(%error, device = %device_id, "push failed");
                    let advice = error.advice();
                    push_problems().insert(device_id, advice.clone());
                    tokio::task::spawn_blocking(move || {
                        domain.record_device_problem(&device_id, Some(advice)).map(|_| ())
                    })
                    .await
                }
            };
            if let Ok(Err(error)) = recorded {
                tracing::warn!(%error, device = %device_id, "recording the push outcome failed");
            }
        });
    }
}

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/scep", get(scep_get).post(scep_post))
        .route("/mdm/apple/checkin", put(checkin).post(checkin))
        .route("/mdm/apple/server", put(server).post(server))
}

#[derive(Debug, Deserialize)]
pub struct ScepQuery {
    operation: Option<String>,
    message: Option<String>,
}

async fn scep_get(State(state): State<AppState>, Query(query): Query<ScepQuery>) -> Response {
    match query.operation.as_deref() {
        Some("GetCACaps") => ([(header::CONTENT_TYPE, "text/plain")], CAPABILITIES).into_response(),
        Some("GetCACert") => {
            let scep = match state.mdm.scep() {
                Ok(scep) => scep,
                Err(refusal) => return refusal.into_response(),
            };
            // One certificate, the one to encrypt to (RFC 8894 §4.2.1.1); see `ScepAuthority::ca_certificate`.
            ([(header::CONTENT_TYPE, "application/x-x509-ca-cert")], scep.ca_certificate().to_vec()).into_response()
        }
        // RFC 8894 §4.3: the message may come base64-encoded in the query when the client cannot POST.
        Some("PKIOperation") => {
            let decoded = query
                .message
                .as_deref()
                .and_then(|m| base64::engine::general_purpose::STANDARD.decode(m.replace(' ', "+").trim()).ok());
            match decoded {
                Some(body) if body.len() > MAX_SCEP_BYTES => {
                    (StatusCode::PAYLOAD_TOO_LARGE, format!("a SCEP request is at most {MAX_SCEP_BYTES} bytes"))
                        .into_response()
                }
                Some(body) => pki_operation(&state, &body).await,
                None => scep_problem("PKIOperation needs the request in `message`, base64-encoded"),
            }
        }
        Some(other) => scep_problem(&format!(
            "unknown operation {other:?}; this server answers GetCACaps, GetCACert and PKIOperation"
        )),
        None => scep_problem("give ?operation=GetCACaps, GetCACert or PKIOperation"),
    }
}

async fn scep_post(State(state): State<AppState>, Query(query): Query<ScepQuery>, body: Bytes) -> Response {
    if query.operation.as_deref() != Some("PKIOperation") {
        return scep_problem("POST is for ?operation=PKIOperation");
    }
    if body.len() > MAX_SCEP_BYTES {
        return (StatusCode::PAYLOAD_TOO_LARGE, format!("a SCEP request is at most {MAX_SCEP_BYTES} bytes"))
            .into_response();
    }
    pki_operation(&state, &body).await
}

fn scep_problem(text: &str) -> Response {
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text.to_owned()).into_response()
}

/// A `PKCSReq`: the challenge is redeemed (once), the identity issued and recorded, and the `CertRep` signed.
/// A refused request gets a `CertRep` with a `failInfo`, not an HTTP error, as SCEP clients expect.
async fn pki_operation(state: &AppState, body: &[u8]) -> Response {
    let now = state.clock.now();
    let scep = match state.mdm.scep() {
        Ok(scep) => scep,
        Err(refusal) => return refusal.into_response(),
    };
    let (reader, body) = (scep.clone(), body.to_vec());
    let opened = tokio::task::spawn_blocking(move || reader.read_request(&body)).await;
    let request = match opened {
        Ok(Ok(request)) => request,
        Ok(Err(ScepError::Unreadable(reason))) => {
            tracing::warn!(%reason, "an unreadable SCEP request was refused");
            return scep_problem(&format!("the SCEP request cannot be read: {reason}"));
        }
        Ok(Err(ScepError::Refused { fail, reason, request })) => {
            tracing::warn!(%reason, transaction = %request.transaction_id, "a SCEP request was refused");
            return cert_rep(&scep, &request, Err(fail), now);
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let Some(challenge) = request.challenge.clone() else {
        tracing::warn!(transaction = %request.transaction_id, "a SCEP request without a challenge was refused");
        return cert_rep(&scep, &request, Err(FailInfo::BadRequest), now);
    };
    let refused = |problem: ChallengeProblem| {
        let why = match problem {
            ChallengeProblem::Unknown => "unknown or already used",
            ChallengeProblem::Expired => "expired, or its invite was resent, removed or used",
        };
        tracing::warn!(transaction = %request.transaction_id, "a SCEP challenge was refused: {why}");
        cert_rep(&scep, &request, Err(FailInfo::BadRequest), now)
    };
    let domain = state.enrollment.clone();
    let peek = challenge.clone();
    let invite = match tokio::task::spawn_blocking(move || domain.scep_challenge_invite(&peek)).await {
        Ok(Ok(Ok(invite))) => invite,
        Ok(Ok(Err(problem))) => return refused(problem),
        Ok(Err(error)) => {
            tracing::error!(%error, "looking up a SCEP challenge failed");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let common_name = format!("enrolld device {}", invite.id);
    let issued = match scep.issue(&request, &common_name, &state.naming.organisation(), now) {
        Ok(cert) => cert,
        Err(error) => {
            tracing::warn!(%error, transaction = %request.transaction_id, "no certificate issued");
            return cert_rep(&scep, &request, Err(FailInfo::BadRequest), now);
        }
    };
    let info = match crate::pki::parse_certificate(&issued) {
        Ok(info) => info,
        Err(error) => {
            tracing::error!(%error, "the issued certificate cannot be read back");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    // The challenge is spent and the identity recorded together; only then does the certificate go out.
    let domain = state.enrollment.clone();
    let redeemed =
        tokio::task::spawn_blocking(move || domain.redeem_scep_challenge(&Actor::device(None), &challenge, &info))
            .await;
    match redeemed {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(problem))) => return refused(problem),
        Ok(Err(error)) => {
            tracing::error!(%error, "recording an issued identity failed");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
    tracing::info!(invite = %invite.id, reply_cipher = %request.cipher, "issued a device identity over SCEP");
    cert_rep(&scep, &request, Ok(&issued), now)
}

fn cert_rep(
    scep: &ScepAuthority,
    request: &crate::pki::scep::PkiRequest,
    outcome: Result<&rustls_pki_types::CertificateDer<'_>, FailInfo>,
    now: time::OffsetDateTime,
) -> Response {
    match scep.reply(request, outcome, now) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/x-pki-message")], body).into_response(),
        Err(error) => {
            tracing::error!(%error, "building the CertRep failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Checks a check-in or command request's `Mdm-Signature` (CMS, detached, over the body) and returns the identity
/// that made it: it must have been issued by this appliance's SCEP CA, be in date, and be on record.
async fn signed_by(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<AppleIdentity, Response> {
    let refuse = |reason: &str| {
        tracing::warn!(%reason, "an MDM request was refused");
        (StatusCode::UNAUTHORIZED, format!("refused: {reason}")).into_response()
    };
    let Some(signature) = headers.get("mdm-signature").and_then(|v| v.to_str().ok()) else {
        return Err(refuse("no Mdm-Signature header (the profile sets SignMessage)"));
    };
    let Ok(signature) =
        base64::engine::general_purpose::STANDARD.decode(signature.split_ascii_whitespace().collect::<String>())
    else {
        return Err(refuse("Mdm-Signature is not base64"));
    };
    let now = state.clock.now();
    let scep = state.mdm.scep().map_err(IntoResponse::into_response)?;
    let body = body.clone();
    let checked = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let verified = cms::verify(&signature, Some(&body)).map_err(|e| e.to_string())?;
        let (_, signer) =
            x509_parser::parse_x509_certificate(&verified.signer).map_err(|e| format!("signer certificate: {e}"))?;
        let (_, issuer) = x509_parser::parse_x509_certificate(scep.cert_der()).map_err(|e| e.to_string())?;
        signer
            .verify_signature(Some(issuer.public_key()))
            .map_err(|_| "the signing certificate was not issued by this appliance".to_owned())?;
        if !signer.validity().is_valid_at(x509_parser::time::ASN1Time::from(now)) {
            return Err("the signing certificate is not valid now".into());
        }
        Ok(crate::pki::sha256_hex(&verified.signer))
    })
    .await;
    let sha256 = match checked {
        Ok(Ok(sha256)) => sha256,
        Ok(Err(reason)) => return Err(refuse(&reason)),
        Err(_) => return Err(StatusCode::INTERNAL_SERVER_ERROR.into_response()),
    };
    let domain = state.enrollment.clone();
    let lookup = sha256.clone();
    match tokio::task::spawn_blocking(move || domain.apple_identity(&lookup)).await {
        Ok(Ok(Some(identity))) => Ok(identity),
        Ok(Ok(None)) => Err(refuse(&format!("identity {sha256} is not on record"))),
        _ => Err(StatusCode::SERVICE_UNAVAILABLE.into_response()),
    }
}

fn plist_ok(value: Option<plist::Value>) -> Response {
    let Some(value) = value else { return StatusCode::OK.into_response() };
    let mut body = Vec::new();
    if let Err(error) = value.to_writer_xml(&mut body) {
        tracing::error!(%error, "writing a plist failed");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/xml; charset=utf-8")], body).into_response()
}

fn too_large(body: &Bytes) -> Option<Response> {
    (body.len() > MAX_MESSAGE_BYTES).then(|| {
        (StatusCode::PAYLOAD_TOO_LARGE, format!("a message is at most {MAX_MESSAGE_BYTES} bytes")).into_response()
    })
}

async fn checkin(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(response) = too_large(&body) {
        return response;
    }
    let identity = match signed_by(&state, &headers, &body).await {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let (message, claim) = match CheckIn::parse(&body) {
        Ok(parsed) => parsed,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let actor = Actor::device(None);
    if let Some(refusal) = speaks_for_itself(&state, &actor, &identity.sha256, vec![claim]).await {
        return refusal;
    }
    let domain = state.enrollment.clone();
    let sha256 = identity.sha256.clone();
    match message {
        CheckIn::Authenticate(facts) => {
            let done = tokio::task::spawn_blocking(move || domain.apple_authenticate(&sha256, &facts)).await;
            answer(done.map(|r| r.map(|_| None)))
        }
        CheckIn::TokenUpdate(push) => {
            let done = tokio::task::spawn_blocking(move || domain.apple_token_update(&actor, &sha256, &push)).await;
            if let Ok(Ok((device, true))) = &done {
                tracing::info!(device = %device.id, "an Apple device enrolled");
                // DeviceInformation waits for it: ask the device to come and fetch it.
                state.mdm.wake(&state, device.id);
            }
            answer(done.map(|r| r.map(|_| None)))
        }
        CheckIn::CheckOut => {
            let done = tokio::task::spawn_blocking(move || domain.apple_check_out(&actor, &sha256)).await;
            answer(done.map(|r| r.map(|_| None)))
        }
        // The user channel (macOS) is declined, as Apple documents, with 410.
        CheckIn::UserAuthenticate => StatusCode::GONE.into_response(),
        // A user-channel token (macOS, a user's session) is not the device's: it is acknowledged and not used.
        CheckIn::UserChannel(kind) => {
            tracing::debug!(%kind, "a user-channel check-in was acknowledged and ignored");
            StatusCode::OK.into_response()
        }
        CheckIn::Other(kind) => {
            tracing::info!(%kind, "an unsupported check-in message was declined");
            (StatusCode::BAD_REQUEST, format!("MessageType {kind} is not supported")).into_response()
        }
    }
}

/// Refuses (403, audited by the domain) a message that names another device than the identity that signed it;
/// `None` when every device it names is that identity's own (the first one named binds it).
async fn speaks_for_itself(state: &AppState, actor: &Actor, sha256: &str, claims: Vec<AppleClaim>) -> Option<Response> {
    let (domain, actor, sha256) = (state.enrollment.clone(), actor.clone(), sha256.to_owned());
    let checked = tokio::task::spawn_blocking(move || {
        for claim in &claims {
            if let Err(problem) = domain.apple_claim(&actor, &sha256, claim)? {
                return Ok(Err(problem));
            }
        }
        Ok::<_, crate::domain::DomainError>(Ok(()))
    })
    .await;
    match checked {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(_))) => Some(other_device()),
        Ok(Err(error)) => {
            tracing::error!(%error, "checking the device a message names failed");
            Some(StatusCode::SERVICE_UNAVAILABLE.into_response())
        }
        Err(_) => Some(StatusCode::INTERNAL_SERVER_ERROR.into_response()),
    }
}

/// The answer to a message that speaks for another device than the one that signed it.
fn other_device() -> Response {
    tracing::warn!("an MDM message naming another device was refused");
    (StatusCode::FORBIDDEN, "refused: this message names another device than the identity that signed it")
        .into_response()
}

/// The HTTP answer for a domain call made for a device.
fn answer(done: Result<crate::domain::DomainResult<Option<plist::Value>>, tokio::task::JoinError>) -> Response {
    match done {
        Ok(Ok(value)) => plist_ok(value),
        Ok(Err(crate::domain::DomainError::Conflict { message, .. })) => {
            (StatusCode::CONFLICT, message).into_response()
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "handling an MDM message failed");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The command endpoint: the device reports on the last command (or says it is idle) and gets the next one, or an
/// empty answer when nothing waits.
async fn server(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(response) = too_large(&body) {
        return response;
    }
    let identity = match signed_by(&state, &headers, &body).await {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    let domain = state.enrollment.clone();
    let sha256 = identity.sha256.clone();
    let device_id = match tokio::task::spawn_blocking(move || domain.apple_managed_device(&sha256)).await {
        Ok(Ok(Some(device_id))) => device_id,
        Ok(Ok(None)) => {
            tracing::warn!(identity = %identity.sha256, "a command request from an identity that manages no device");
            return (StatusCode::UNAUTHORIZED, "this identity manages no enrolled device").into_response();
        }
        _ => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    let report = match CommandReport::parse(&body) {
        Ok(report) => report,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let actor = Actor::device(None);
    // The report names its device, and a DeviceInformation answer names it again.
    let mut claims = vec![report.claim.clone()];
    if let Some(facts) = &report.facts {
        claims.push(AppleClaim { udid: facts.udid.clone(), enrollment_id: facts.enrollment_id.clone() });
    }
    if let Some(refusal) = speaks_for_itself(&state, &actor, &identity.sha256, claims).await {
        return refusal;
    }
    if report.user_channel {
        // The user channel (macOS) is not managed: nothing waits for it.
        return StatusCode::OK.into_response();
    }
    let profile_identifier =
        profile::identifiers(state.mdm.inner.as_ref().map(|i| i.ca.cert_der().to_vec()).unwrap_or_default().as_slice())
            .enrollment;
    let domain = state.enrollment.clone();
    let sha256 = identity.sha256.clone();
    let done = tokio::task::spawn_blocking(move || {
        messages::handle_report(&domain, &actor, &device_id, &sha256, &report, &profile_identifier)
    })
    .await;
    match done {
        Ok(Ok(Err(_))) => other_device(),
        Ok(Ok(Ok(value))) => answer(Ok(Ok(value))),
        Ok(Err(error)) => answer(Ok(Err(error))),
        Err(error) => answer(Err(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, https_router};
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A router whose device-identity CA is pending, and the work that makes it.
    fn pending() -> (axum::Router, crate::pki::scep::DeviceCaCreation, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), "enroll", now).unwrap().0);
        let (device_ca, creation) = DeviceCa::open(dir.path(), ca.clone(), now).unwrap();
        let config = crate::config::Layers::default().resolve(None).unwrap();
        let mut state = crate::http::api::tests::state_with(
            crate::store::Store::open_temporary().unwrap(),
            Arc::new(crate::clock::SystemClock),
        );
        state.mdm = Mdm::new(ca, device_ca, None, None, Pusher::new(&config.apns).unwrap());
        let limits = Limits {
            request_timeout: std::time::Duration::from_secs(30),
            max_body_bytes: 1 << 16,
            import_max_bytes: 1 << 16,
        };
        (https_router(state, limits), creation.unwrap(), dir)
    }

    async fn send(router: &axum::Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = router.clone().oneshot(request).await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    fn windows_enrollment() -> Request<Body> {
        let soap = format!(
            r#"<s:Envelope xmlns:s="{}"><s:Header><a:MessageID xmlns:a="http://www.w3.org/2005/08/addressing">urn:uuid:1</a:MessageID></s:Header><s:Body><RequestSecurityToken><BinarySecurityToken ValueType="http://schemas.microsoft.com/windows/pki/2009/01/enrollment#PKCS10">TUlJQg==</BinarySecurityToken></RequestSecurityToken></s:Body></s:Envelope>"#,
            "http://www.w3.org/2003/05/soap-envelope"
        );
        Request::post("/EnrollmentServer/Enrollment.svc")
            .header(header::CONTENT_TYPE, "application/soap+xml; charset=utf-8")
            .body(Body::from(soap))
            .unwrap()
    }

    #[tokio::test]
    async fn routes_that_need_the_device_ca_ask_to_come_back_until_it_is_made() {
        let (router, creation, _dir) = pending();
        let get_ca_cert = || Request::get("/scep?operation=GetCACert").body(Body::empty()).unwrap();
        let (status, headers, body) = send(&router, get_ca_cert()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(headers[header::RETRY_AFTER], RETRY_AFTER_SECS.to_string().as_str());
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "device_ca_pending");
        // GetCACaps needs no CA.
        let caps = Request::get("/scep?operation=GetCACaps").body(Body::empty()).unwrap();
        assert_eq!(send(&router, caps).await.0, StatusCode::OK);

        let (status, headers, body) = send(&router, windows_enrollment()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(headers.contains_key(header::RETRY_AFTER));
        assert!(body.contains("s:EnrollmentServer") && body.contains("being made"), "a SOAP fault: {body}");

        let checkin = Request::put("/mdm/apple/checkin").header("mdm-signature", "AAAA").body(Body::from("x"));
        let (status, headers, _) = send(&router, checkin.unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key(header::RETRY_AFTER));
        let management = Request::post("/ManagementServer/MDM.svc").body(Body::from("<SyncML/>")).unwrap();
        assert_eq!(send(&router, management).await.0, StatusCode::SERVICE_UNAVAILABLE, "no certificate could be asked");

        creation.run().unwrap();
        let (status, headers, _) = send(&router, get_ca_cert()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/x-x509-ca-cert");
        let management = Request::post("/ManagementServer/MDM.svc").body(Body::from("<SyncML/>")).unwrap();
        assert_eq!(send(&router, management).await.0, StatusCode::UNAUTHORIZED, "now a certificate is asked for");
        let (status, _, body) = send(&router, windows_enrollment()).await;
        assert_ne!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
}
