//! The SCEP certificate authority (RFC 8894) that issues device identities.
//!
//! SCEP clients encrypt their request to the CA's key with RSA key transport, so beside the appliance's ECDSA CA
//! there is an RSA-2048 intermediate, issued by that CA: `pki/scep.crt` and `pki/scep.key`. It signs the `CertRep`
//! replies and the device certificates (Apple's over SCEP, Windows' through MS-WSTEP), and opens the requests'
//! envelopes. RSA key generation takes a moment (seconds on a small board), so on first start the daemon holds a
//! [`DeviceCa`] that is pending until the key is made, off the path to answering anything.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use der::asn1::{ObjectIdentifier as Oid, PrintableStringRef};
use der::{Any, Tag, Tagged as _};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_RSA_SHA256, SubjectPublicKeyInfo,
};
use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use x509_cert::attr::{Attribute, AttributeValue};

use super::cms::{self, CmsError, ContentCipher, SigningKey};
use super::{BACKDATE, CertInfo, CertificateAuthority, PkiError, parse_certificate, pem, random_serial};

const SCEP_CERT: &str = "scep.crt";
const SCEP_KEY: &str = "scep.key";
/// How long a device identity is valid (at most until the SCEP certificate ends).
pub const DEVICE_CERT_VALIDITY: Duration = Duration::days(5 * 365);

const MESSAGE_TYPE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.2");
const PKI_STATUS: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.3");
const FAIL_INFO: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.4");
const SENDER_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.5");
const RECIPIENT_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.6");
const TRANSACTION_ID: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.7");

/// What `GetCACaps` answers (RFC 8894 §3.5.2): AES and SHA-256 first (what `SCEPStandard` promises), POST, then
/// the legacy algorithms older clients ask for. Single DES is not advertised: requests sealed with it are opened (see
/// `cms::open_envelope`) because some clients send nothing else, but no client should choose it.
pub const CAPABILITIES: &str = "AES\nSHA-256\nPOSTPKIOperation\nSCEPStandard\nDES3\nSHA-1\n";

/// Why a request gets a SCEP failure rather than a certificate (`failInfo`, RFC 8894 §3.2.1.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailInfo {
    BadAlg = 0,
    BadMessageCheck = 1,
    BadRequest = 2,
}

#[derive(Debug, thiserror::Error)]
pub enum ScepError {
    /// The message could not be read at all: no reply can be built, so the client gets an HTTP error.
    #[error("{0}")]
    Unreadable(String),
    /// The message was read but is refused; the client gets a `CertRep` with this `failInfo`.
    #[error("{reason}")]
    Refused { fail: FailInfo, reason: String, request: Box<PkiRequest> },
}

/// A `PKIOperation` request, opened and checked.
#[derive(Debug, Clone)]
pub struct PkiRequest {
    /// `messageType`: 19 PKCSReq, 17 RenewalReq, 20 CertPoll, …
    pub message_type: u32,
    pub transaction_id: String,
    pub sender_nonce: Vec<u8>,
    /// The certificate that signed the request (the device's throw-away self-signed one); the reply is encrypted
    /// to it.
    pub signer: Vec<u8>,
    /// The cipher the reply is sealed with: the request's own, or 3DES for a request in single DES.
    pub cipher: ContentCipher,
    /// The PKCS#10 request inside the envelope, with its signature checked.
    pub csr: Vec<u8>,
    /// The CSR's `challengePassword`.
    pub challenge: Option<String>,
}

/// The SCEP CA: the RSA key and its certificate, and the appliance CA above it.
pub struct ScepAuthority {
    cert: CertificateDer<'static>,
    ca: CertificateDer<'static>,
    decrypt: rsa::RsaPrivateKey,
    signing: SigningKey,
    issuer: Issuer<'static, KeyPair>,
    info: CertInfo,
}

impl std::fmt::Debug for ScepAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScepAuthority").field("info", &self.info).finish_non_exhaustive()
    }
}

/// The device-identity CA as the daemon holds it: pending while it is being made (first start), then ready.
/// Cheap to clone; every clone sees it become ready. Made only by [`DeviceCa::open`].
#[derive(Clone, Debug)]
pub struct DeviceCa {
    ready: Arc<OnceLock<Arc<ScepAuthority>>>,
    /// Why making it failed last, while it is still pending.
    problem: Arc<Mutex<Option<String>>>,
}

/// The work that makes a pending [`DeviceCa`] ready: RSA key generation and two file writes, to run on a thread
/// that may block.
#[derive(Debug)]
pub struct DeviceCaCreation {
    handle: DeviceCa,
    dir: PathBuf,
    ca: Arc<CertificateAuthority>,
    now: OffsetDateTime,
}

impl DeviceCa {
    /// The device-identity CA in `dir`: loaded now if its files are there (a damaged pair is an error, as for the
    /// appliance CA), else pending, with the work that makes it under `ca`.
    pub fn open(
        dir: &Path,
        ca: Arc<CertificateAuthority>,
        now: OffsetDateTime,
    ) -> Result<(DeviceCa, Option<DeviceCaCreation>), PkiError> {
        let handle = DeviceCa { ready: Arc::default(), problem: Arc::default() };
        if let Some(loaded) = ScepAuthority::load(dir, &ca)? {
            let _ = handle.ready.set(Arc::new(loaded));
            return Ok((handle, None));
        }
        let creation = DeviceCaCreation { handle: handle.clone(), dir: dir.to_owned(), ca, now };
        Ok((handle, Some(creation)))
    }

    /// The CA, once it is ready.
    pub fn get(&self) -> Option<Arc<ScepAuthority>> {
        self.ready.get().cloned()
    }

    /// Why the last attempt to make it failed, while it is pending.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl DeviceCaCreation {
    /// Makes the CA (blocking) and makes the handle ready; on failure the handle stays pending, with the reason,
    /// and this may be run again.
    pub fn run(&self) -> Result<(), PkiError> {
        match ScepAuthority::create(&self.dir, &self.ca, self.now) {
            Ok(made) => {
                let _ = self.handle.ready.set(Arc::new(made));
                *self.handle.problem.lock().unwrap_or_else(PoisonError::into_inner) = None;
                Ok(())
            }
            Err(error) => {
                *self.handle.problem.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
                Err(error)
            }
        }
    }
}

impl ScepAuthority {
    /// Loads the SCEP CA from `dir`, or makes one under `ca` (an RSA-2048 key; this takes a moment).
    pub fn load_or_create(dir: &Path, ca: &CertificateAuthority, now: OffsetDateTime) -> Result<Self, PkiError> {
        match Self::load(dir, ca)? {
            Some(loaded) => Ok(loaded),
            None => Self::create(dir, ca, now),
        }
    }

    /// Loads the SCEP CA from `dir`; `None` if its files are not there.
    pub fn load(dir: &Path, ca: &CertificateAuthority) -> Result<Option<Self>, PkiError> {
        let (cert_path, key_path) = (dir.join(SCEP_CERT), dir.join(SCEP_KEY));
        let unusable = |path: &Path, reason: String| PkiError::Unusable { path: path.to_owned(), reason };
        if cert_path.exists() && key_path.exists() {
            let cert_pem = super::read_file(&cert_path)?;
            let key_pem = super::read_file(&key_path)?;
            let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
                .map_err(|e| unusable(&cert_path, format!("not a PEM certificate ({e})")))?;
            let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| unusable(&key_path, format!("not a PEM PKCS#8 key ({e})")))?;
            return Self::assemble(cert, ca.cert_der().clone(), key.secret_pkcs8_der())
                .map(Some)
                .map_err(|reason| unusable(&key_path, reason));
        }
        Ok(None)
    }

    /// Makes a new SCEP CA under `ca` in `dir` (an RSA-2048 key; this takes a moment).
    pub fn create(dir: &Path, ca: &CertificateAuthority, now: OffsetDateTime) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join(SCEP_CERT), dir.join(SCEP_KEY));
        let unusable = |path: &Path, reason: String| PkiError::Unusable { path: path.to_owned(), reason };
        tracing::info!("creating the SCEP CA (RSA-2048) for device identities");
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
            .map_err(|e| unusable(&key_path, format!("RSA key generation failed ({e})")))?;
        let pkcs8 = key.to_pkcs8_der().map_err(|e| unusable(&key_path, format!("encoding the key ({e})")))?;
        let key_pair = rsa_key_pair(pkcs8.as_bytes()).map_err(|reason| unusable(&key_path, reason))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let ca_name = ca.info().subject.split("CN=").nth(1).unwrap_or("enrolld CA").split(',').next().unwrap_or("");
        params.distinguished_name.push(DnType::CommonName, format!("{ca_name} device identities"));
        params.distinguished_name.push(DnType::OrganizationName, "enrolld appliance");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // It issues device identities and nothing else: the EKU keeps a certificate it signed from serving as a
        // TLS server to the devices that trust the appliance CA.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = ca.info().not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key_pair, &ca.issuer)?;
        super::write_file(&key_path, pem("PRIVATE KEY", pkcs8.as_bytes()).as_bytes(), 0o600)?;
        super::write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Self::assemble(cert.der().clone(), ca.cert_der().clone(), pkcs8.as_bytes())
            .map_err(|reason| unusable(&cert_path, reason))
    }

    fn assemble(cert: CertificateDer<'static>, ca: CertificateDer<'static>, pkcs8: &[u8]) -> Result<Self, String> {
        let decrypt = rsa::RsaPrivateKey::from_pkcs8_der(pkcs8).map_err(|e| format!("not an RSA key ({e})"))?;
        let signing = SigningKey::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
        if cms::public_key_of(&cert).map_err(|e| e.to_string())? != cms::public_key_of_key(&signing) {
            return Err("the key does not belong to the certificate; restore both from the same backup".into());
        }
        let issuer = Issuer::from_ca_cert_der(&cert, rsa_key_pair(pkcs8)?).map_err(|e| e.to_string())?;
        let info = parse_certificate(&cert)?;
        Ok(ScepAuthority { cert, ca, decrypt, signing, issuer, info })
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The `GetCACert` answer: the SCEP CA alone, as one DER certificate (`application/x-x509-ca-cert`, RFC 8894
    /// §4.2.1.1). It is the only certificate a client may use: clients encrypt their request to every certificate
    /// they are given, and the appliance CA above it has an ECDSA key nothing can be encrypted to. Devices get the
    /// appliance CA from the enrollment profile (and `/ca.crt`), and find the SCEP CA by its SHA-256 there
    /// (`CAFingerprint`).
    pub fn ca_certificate(&self) -> &[u8] {
        &self.cert
    }

    /// Opens a `PKIOperation` message: checks its signature, reads the SCEP attributes, opens the envelope and
    /// checks the CSR's signature.
    pub fn read_request(&self, message: &[u8]) -> Result<PkiRequest, ScepError> {
        let unreadable = |e: CmsError| ScepError::Unreadable(e.to_string());
        let verified = cms::verify(message, None).map_err(unreadable)?;
        let printable = |oid| {
            verified.attribute(oid).and_then(|v| PrintableStringRef::try_from(v).ok().map(|s| s.as_str().to_owned()))
        };
        let message_type = printable(MESSAGE_TYPE)
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(|| ScepError::Unreadable("the request has no messageType".into()))?;
        let transaction_id = printable(TRANSACTION_ID)
            .ok_or_else(|| ScepError::Unreadable("the request has no transactionID".into()))?;
        let sender_nonce = verified
            .attribute(SENDER_NONCE)
            .filter(|v| v.tag() == Tag::OctetString)
            .map(|v| v.value().to_vec())
            .ok_or_else(|| ScepError::Unreadable("the request has no senderNonce".into()))?;
        let mut request = PkiRequest {
            message_type,
            transaction_id,
            sender_nonce,
            signer: verified.signer.clone(),
            cipher: ContentCipher::Aes128Cbc,
            csr: Vec::new(),
            challenge: None,
        };
        let refuse = |fail, reason: String, request: &PkiRequest| ScepError::Refused {
            fail,
            reason,
            request: Box::new(request.clone()),
        };
        // Only PKCSReq is answered; anything else is refused before the envelope is opened, so no answer depends
        // on what the RSA key made of it.
        if message_type != 19 {
            return Err(refuse(
                FailInfo::BadRequest,
                format!("messageType {message_type} is not supported; enrolld answers PKCSReq (19)"),
                &request,
            ));
        }
        // The reply is encrypted to the signer's key: refuse one it cannot be (before the challenge is spent).
        if !matches!(cms::public_key_algorithm(&request.signer).as_deref(), Ok("1.2.840.113549.1.1.1")) {
            return Err(refuse(
                FailInfo::BadAlg,
                "the request is signed with a non-RSA key; SCEP replies are encrypted to it with RSA".into(),
                &request,
            ));
        }
        // Every failure from here to a readable CSR gets the same answer, so it says nothing about the RSA key.
        let opened = cms::open_envelope(&verified.content, &self.decrypt, &self.cert);
        let (csr, cipher) = match opened {
            Ok(opened) => opened,
            Err(CmsError::Unsupported(what)) => {
                return Err(refuse(FailInfo::BadAlg, format!("the envelope uses {what}"), &request));
            }
            Err(error) => return Err(refuse(FailInfo::BadMessageCheck, error.to_string(), &request)),
        };
        request.cipher = cipher;
        use x509_parser::prelude::FromDer as _;
        let parsed = match x509_parser::certification_request::X509CertificationRequest::from_der(&csr) {
            Ok((_, parsed)) => parsed,
            Err(e) => return Err(refuse(FailInfo::BadMessageCheck, format!("the CSR cannot be read ({e})"), &request)),
        };
        if parsed.verify_signature().is_err() {
            return Err(refuse(FailInfo::BadMessageCheck, "the CSR's signature does not verify".into(), &request));
        }
        request.challenge =
            parsed.certification_request_info.iter_attributes().find_map(|a| match a.parsed_attribute() {
                x509_parser::cri_attributes::ParsedCriAttribute::ChallengePassword(p) => Some(p.0.clone()),
                _ => None,
            });
        request.csr = csr;
        Ok(request)
    }

    /// Issues the device identity for a checked request: the CSR's key, a subject of enrolld's choosing (the
    /// request's own subject is only a suggestion), `clientAuth`.
    pub fn issue(
        &self,
        request: &PkiRequest,
        common_name: &str,
        organisation: &str,
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, PkiError> {
        self.issue_csr(&request.csr, common_name, organisation, now)
    }

    /// A device identity (clientAuth) for the key in a PKCS#10 request whose signature checks out; the subject is
    /// ours (`common_name`, `organisation`), not the request's. Also how Windows devices get theirs (MS-WSTEP).
    pub fn issue_csr(
        &self,
        csr: &[u8],
        common_name: &str,
        organisation: &str,
        now: OffsetDateTime,
    ) -> Result<CertificateDer<'static>, PkiError> {
        use x509_parser::prelude::FromDer as _;
        let unusable = |reason: String| PkiError::Unusable { path: "the device's certificate request".into(), reason };
        let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
            .map_err(|e| unusable(e.to_string()))?;
        parsed.verify_signature().map_err(|e| unusable(format!("its signature does not verify ({e})")))?;
        let public = SubjectPublicKeyInfo::from_der(parsed.certification_request_info.subject_pki.raw)
            .map_err(|e| unusable(format!("its key cannot be used ({e})")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        if !organisation.is_empty() {
            params.distinguished_name.push(DnType::OrganizationName, organisation);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + DEVICE_CERT_VALIDITY).min(self.info.not_after);
        params.serial_number = Some(random_serial()?);
        Ok(params.signed_by(&public, &self.issuer)?.der().clone())
    }

    /// The `CertRep` for `request`: the issued certificate, encrypted to the requester, or a failure.
    pub fn reply(
        &self,
        request: &PkiRequest,
        outcome: Result<&CertificateDer<'_>, FailInfo>,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, CmsError> {
        let printable = |oid, text: &str| -> Result<Attribute, CmsError> {
            let value = Any::new(Tag::PrintableString, text.as_bytes())?;
            Ok(Attribute { oid, values: der::asn1::SetOfVec::try_from(vec![AttributeValue::from(value)])? })
        };
        let octets = |oid, bytes: &[u8]| -> Result<Attribute, CmsError> {
            let value = Any::new(Tag::OctetString, bytes)?;
            Ok(Attribute { oid, values: der::asn1::SetOfVec::try_from(vec![AttributeValue::from(value)])? })
        };
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| CmsError::Envelope("no randomness"))?;
        let mut attributes = vec![
            printable(TRANSACTION_ID, &request.transaction_id)?,
            printable(MESSAGE_TYPE, "3")?,
            octets(SENDER_NONCE, &nonce)?,
            octets(RECIPIENT_NONCE, &request.sender_nonce)?,
        ];
        let chain: [&[u8]; 2] = [&self.cert, &self.ca];
        match outcome {
            Ok(issued) => {
                attributes.push(printable(PKI_STATUS, "0")?);
                let degenerate = cms::certificates_only(&[issued])?;
                let envelope = cms::seal_envelope(&degenerate, &request.signer, request.cipher)?;
                cms::sign(Some(&envelope), &self.signing, &chain, attributes, now)
            }
            Err(fail) => {
                attributes.push(printable(PKI_STATUS, "2")?);
                attributes.push(printable(FAIL_INFO, &(fail as u8).to_string())?);
                cms::sign(None, &self.signing, &chain, attributes, now)
            }
        }
    }
}

fn rsa_key_pair(pkcs8: &[u8]) -> Result<KeyPair, String> {
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8.to_vec()), &PKCS_RSA_SHA256)
        .map_err(|e| format!("the RSA key cannot sign ({e})"))
}
