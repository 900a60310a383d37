//! The appliance's own certificate authority and the HTTPS certificates it issues (and, in `signing`, the
//! certificate that signs enrollment profiles), kept as PEM files in the state directory (keys mode 0600).
//!
//! The CA is ECDSA P-256 and valid for ten years. Server certificates follow what Apple and Windows clients accept
//! from a private CA: at most 397 days, `serverAuth`, every name in the SAN extension.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

mod ber;
pub mod cms;
pub mod push;
pub mod scep;
pub mod signing;

use crate::config::SubjectName;
use crate::state_dir::write_private;

/// Longest validity a server certificate gets; Apple clients refuse longer ones.
pub const SERVER_CERT_VALIDITY: Duration = Duration::days(397);
/// A server certificate is re-issued once it is this close to expiry.
pub const RENEW_BEFORE: Duration = Duration::days(30);
/// How long the appliance's CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3653);
/// Certificates start this far in the past so a client whose clock is a little behind still accepts them.
const BACKDATE: Duration = Duration::hours(1);

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
/// The admin's own HTTPS certificate and key, uploaded through the Settings page.
const OWN_CERT: &str = "own.crt";
const OWN_KEY: &str = "own.key";

/// Which of a certificate and its key a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemPart {
    Certificate,
    Key,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {path}: {source}; check permissions and free space in the state directory")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path} cannot be used: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the system random number generator failed")]
    Random,
}

/// What enrolld needs to know about a certificate, read back from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number in lower-case hex.
    pub serial: String,
    pub subject: String,
    pub names: BTreeSet<SubjectName>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, lower-case hex.
    pub sha256: String,
}

/// The appliance's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    info: CertInfo,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("info", &self.info).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads the CA from `dir`, or creates and saves a new one if there is none. Returns whether it was created.
    pub fn load_or_create(dir: &Path, hostname: &str, now: OffsetDateTime) -> Result<(Self, bool), PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        // The certificate is written before the key, so a certificate without its key and without any server
        // certificate is a first start that was cut short: nothing was ever issued or trusted, start again.
        let interrupted_first_start = cert_path.exists() && !key_path.exists() && !dir.join(SERVER_CERT).exists();
        if interrupted_first_start {
            tracing::warn!(dir = %dir.display(), "the first start was interrupted while creating the CA; creating it again");
        }
        match (cert_path.exists() && !interrupted_first_start, key_path.exists()) {
            (true, true) => Ok((Self::load(&cert_path, &key_path)?, false)),
            (false, false) => {
                let ca = Self::generate(hostname, now)?;
                write_file(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
                write_file(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
                Ok((ca, true))
            }
            (true, false) | (false, true) => Err(PkiError::Unusable {
                path: dir.to_owned(),
                reason: format!(
                    "only one of {CA_CERT} and {CA_KEY} is there; restore both from a backup (a new CA would orphan every enrolled device)"
                ),
            }),
        }
    }

    fn generate(hostname: &str, now: OffsetDateTime) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut tag = [0u8; 3];
        SystemRandom::new().fill(&mut tag).map_err(|_| PkiError::Random)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("enrolld CA {hostname} {}", hex(&tag)));
        params.distinguished_name.push(DnType::OrganizationName, "enrolld appliance");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let info =
            parse_certificate(&cert_der).map_err(|reason| PkiError::Unusable { path: CA_CERT.into(), reason })?;
        Ok(CertificateAuthority { cert_pem: cert.pem(), issuer: Issuer::new(params, key), cert_der, info })
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = read_file(cert_path)?;
        let key_pem = read_file(key_path)?;
        let unusable = |path: &Path, reason: String| PkiError::Unusable { path: path.to_owned(), reason };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| unusable(cert_path, format!("not a PEM certificate ({e})")))?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(|e| unusable(key_path, format!("not a PEM private key ({e})")))?;
        let info = parse_certificate(&cert_der).map_err(|reason| unusable(cert_path, reason))?;
        if certificate_public_key(&cert_der).as_deref() != Some(key.subject_public_key_info().as_slice()) {
            return Err(unusable(
                key_path,
                format!("it is not the key of {}; restore both from the same backup", cert_path.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| unusable(cert_path, format!("not usable as a CA ({e})")))?;
        Ok(CertificateAuthority { cert_pem, cert_der, issuer, info })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Refuses a CA that is expired or not yet valid: every certificate it issues would be rejected. There is no
    /// fix that keeps enrolled devices, so the message says what each choice costs.
    pub fn check_validity(&self, now: OffsetDateTime) -> Result<(), PkiError> {
        let problem = if now > self.info.not_after {
            format!("the appliance CA expired on {}", self.info.not_after.date())
        } else if now + Duration::days(1) < self.info.not_before {
            format!(
                "the appliance CA is not valid until {} (it was made while the clock was wrong)",
                self.info.not_before.date()
            )
        } else {
            if self.info.not_after - now < SERVER_CERT_VALIDITY {
                tracing::warn!(not_after = %self.info.not_after.date(), "the appliance CA expires within a year; server certificates are cut short to its end");
            }
            return Ok(());
        };
        Err(PkiError::Unusable {
            path: CA_CERT.into(),
            reason: format!(
                "{problem}; restore a backup of the state directory with a valid CA, or move pki/ away to create a new CA (every enrolled device must then enroll again)"
            ),
        })
    }

    /// Issues an HTTPS server certificate for `names`, valid from shortly before `now` for [`SERVER_CERT_VALIDITY`]
    /// (or until the CA expires, if sooner).
    pub fn issue_server(
        &self,
        common_name: &str,
        names: &BTreeSet<SubjectName>,
        now: OffsetDateTime,
    ) -> Result<ServerCertificate, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "enrolld appliance");
        params.subject_alt_names = names
            .iter()
            .map(|name| match name {
                SubjectName::Dns(dns) => dns.clone().try_into().map(SanType::DnsName),
                SubjectName::Ip(ip) => Ok(SanType::IpAddress(*ip)),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (params.not_before + SERVER_CERT_VALIDITY).min(self.info.not_after);
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer)?;
        ServerCertificate::new(vec![cert.der().clone(), self.cert_der.clone()], key.serialize_der())
            .map_err(|reason| PkiError::Unusable { path: SERVER_CERT.into(), reason })
    }
}

/// A server certificate chain (leaf first) and its private key.
#[derive(Clone)]
pub struct ServerCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    pub info: CertInfo,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate").field("info", &self.info).finish_non_exhaustive()
    }
}

impl ServerCertificate {
    fn new(chain: Vec<CertificateDer<'static>>, key_pkcs8: Vec<u8>) -> Result<Self, String> {
        let leaf = chain.first().ok_or("the file holds no certificate")?;
        let info = parse_certificate(leaf)?;
        Ok(ServerCertificate { chain, key_pkcs8, info })
    }

    /// The private key, PKCS#8 DER.
    pub fn key_pkcs8(&self) -> &[u8] {
        &self.key_pkcs8
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// Loads the self-issued certificate from the state directory; `None` if it is missing or its files do not
    /// belong together (as after a crash between writing the two), so a fresh one is issued.
    pub fn load_issued(dir: &Path) -> Result<Option<Self>, PkiError> {
        let (cert_path, key_path) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        match Self::load_files(&cert_path, &key_path) {
            Ok(cert) => Ok(Some(cert)),
            Err(PkiError::Unusable { path, reason }) => {
                tracing::warn!(path = %path.display(), %reason, "issuing a new server certificate");
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }

    /// Loads a PEM certificate chain and private key, checking that they belong together.
    pub fn load_files(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| PkiError::Io { action: "read", path: path.to_owned(), source })
        };
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        Self::from_pem(&cert_pem, &key_pem).map_err(|(part, reason)| PkiError::Unusable {
            path: match part {
                PemPart::Certificate => cert_path.to_owned(),
                PemPart::Key => key_path.to_owned(),
            },
            reason,
        })
    }

    /// Reads a PEM certificate chain (leaf first) and its PKCS#8 private key, checking that they belong together.
    /// A refusal says which of the two is wrong and why.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, (PemPart, String)> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (PemPart::Certificate, format!("not a PEM certificate chain ({e})")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| (PemPart::Key, format!("not a PEM private key ({e})")))?;
        let key_pkcs8 = match &key {
            PrivateKeyDer::Pkcs8(pkcs8) => pkcs8.secret_pkcs8_der().to_vec(),
            _ => {
                return Err((
                    PemPart::Key,
                    "the key is not PKCS#8; convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
                        .into(),
                ));
            }
        };
        let cert = Self::new(chain, key_pkcs8).map_err(|reason| (PemPart::Certificate, reason))?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| (PemPart::Key, format!("unsupported key type ({e})")))?;
        let certified = rustls::sign::CertifiedKey::new(cert.chain.clone(), signing);
        certified.keys_match().map_err(|_| {
            (PemPart::Key, "it is not the private key of the certificate (the first in the chain)".into())
        })?;
        Ok(cert)
    }

    /// The admin's own certificate and key as uploaded through the Settings page, if there are both.
    pub fn own_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
        let (cert, key) = (dir.join(OWN_CERT), dir.join(OWN_KEY));
        (cert.exists() && key.exists()).then_some((cert, key))
    }

    /// Keeps this as the admin's own certificate (key first), for the keeper to serve in place of self-issued ones.
    pub fn save_own(&self, dir: &Path) -> Result<(), PkiError> {
        write_file(&dir.join(OWN_KEY), pem("PRIVATE KEY", &self.key_pkcs8).as_bytes(), 0o600)?;
        let chain: String = self.chain.iter().map(|der| pem("CERTIFICATE", der)).collect();
        write_file(&dir.join(OWN_CERT), chain.as_bytes(), 0o644)
    }

    /// Forgets the admin's own certificate (certificate first, so a half-done removal leaves no pair behind).
    pub fn remove_own(dir: &Path) -> Result<(), PkiError> {
        for name in [OWN_CERT, OWN_KEY] {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(PkiError::Io { action: "remove", path, source }),
            }
        }
        Ok(())
    }

    /// Saves the certificate chain and key into the state directory, key first.
    pub fn save_issued(&self, dir: &Path) -> Result<(), PkiError> {
        write_file(&dir.join(SERVER_KEY), pem("PRIVATE KEY", &self.key_pkcs8).as_bytes(), 0o600)?;
        let chain: String = self.chain.iter().map(|der| pem("CERTIFICATE", der)).collect();
        write_file(&dir.join(SERVER_CERT), chain.as_bytes(), 0o644)
    }
}

/// The names the HTTPS certificate must carry: the mDNS name, the bare hostname, the configured extras, every
/// usable address of the box, and loopback.
pub fn wanted_names(hostname: &str, extra: &[SubjectName], addresses: &[IpAddr]) -> BTreeSet<SubjectName> {
    let mut names = BTreeSet::from([
        SubjectName::Dns(format!("{hostname}.local")),
        SubjectName::Dns(hostname.to_owned()),
        SubjectName::Dns("localhost".to_owned()),
        SubjectName::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SubjectName::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]);
    names.extend(extra.iter().cloned());
    names.extend(addresses.iter().copied().map(SubjectName::Ip));
    names
}

/// Why a server certificate must be replaced now, or `None` if it is still good. `ca_not_after` is the CA's expiry:
/// a certificate already cut short to it is not renewed for expiry, since a new one could not last longer.
pub fn reissue_reason(
    info: &CertInfo,
    wanted: &BTreeSet<SubjectName>,
    ca_not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Option<String> {
    if let Some(reason) = renewal_reason(info, ca_not_after, now) {
        return Some(reason);
    }
    if &info.names != wanted {
        let added: Vec<String> = wanted.difference(&info.names).map(|n| format!("+{n}")).collect();
        let removed: Vec<String> = info.names.difference(wanted).map(|n| format!("-{n}")).collect();
        return Some(format!("names changed: {}", [added, removed].concat().join(" ")));
    }
    None
}

/// Why a certificate the appliance CA issued (an HTTPS or a profile-signing one) must be renewed for its dates
/// alone: it is not valid yet (issued while the clock was wrong), or it ends within [`RENEW_BEFORE`] (unless it was
/// cut short to the CA's own end, which a new one could not pass either).
pub fn renewal_reason(info: &CertInfo, ca_not_after: OffsetDateTime, now: OffsetDateTime) -> Option<String> {
    if now < info.not_before {
        return Some(format!(
            "it is not valid until {} (the clock was wrong when it was issued)",
            info.not_before.date()
        ));
    }
    if now + RENEW_BEFORE >= info.not_after && info.not_after < ca_not_after {
        return Some(format!("it expires on {}", info.not_after.date()));
    }
    None
}

/// Reads serial, subject, names, validity and fingerprint from a DER certificate.
pub fn parse_certificate(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => {
                    names.insert(SubjectName::Dns(dns.to_ascii_lowercase()));
                }
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(SubjectName::Ip));
                }
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    Ok(CertInfo {
        serial: hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        names,
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        sha256: sha256_hex(der),
    })
}

fn certificate_public_key(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// A positive 127-bit random serial number, as RFC 5280 and the CA/Browser Forum ask.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new().fill(&mut bytes).map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { action: "read", path: path.to_owned(), source })
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    write_private(path, contents, mode).map_err(|source| PkiError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap()
    }

    fn names() -> BTreeSet<SubjectName> {
        wanted_names("enroll", &[SubjectName::Dns("mdm.example.com".into())], &["10.0.0.5".parse().unwrap()])
    }

    #[test]
    fn ca_is_created_once_with_private_key_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        assert!(created);
        assert!(ca.info().subject.contains("enrolld CA enroll"), "{}", ca.info().subject);
        assert!(ca.info().not_after - ca.info().not_before >= Duration::days(3650));
        let mode = std::fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let (again, created) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        assert!(!created);
        assert_eq!(again.cert_der(), ca.cert_der());
    }

    #[test]
    fn an_interrupted_first_start_makes_a_new_ca_and_an_expired_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY)).unwrap();
        let (second, created) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        assert!(created, "no server certificate was ever issued, so the CA is made again");
        assert_ne!(second.cert_der(), first.cert_der());

        assert!(second.check_validity(now()).is_ok());
        let expired = second.check_validity(now() + Duration::days(3700)).unwrap_err().to_string();
        assert!(expired.contains("expired on") && expired.contains("restore a backup"), "{expired}");
        let early = second.check_validity(now() - Duration::days(30)).unwrap_err().to_string();
        assert!(early.contains("not valid until"), "{early}");
    }

    #[test]
    fn half_a_ca_is_refused_rather_than_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        ca.issue_server("enroll.local", &names(), now()).unwrap().save_issued(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY)).unwrap();
        let message = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap_err().to_string();
        assert!(message.contains("restore both from a backup"), "{message}");
    }

    #[test]
    fn server_certificate_has_what_apple_and_windows_require() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        let cert = ca.issue_server("enroll.local", &names(), now()).unwrap();
        assert_eq!(cert.info.names, names());
        assert!(cert.info.not_after - cert.info.not_before <= Duration::days(397));
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        assert!(!parsed.is_ca());
        assert_eq!(parsed.issuer().to_string(), ca.info().subject);
        assert_eq!(cert.chain[1], *ca.cert_der());

        cert.save_issued(dir.path()).unwrap();
        let loaded = ServerCertificate::load_issued(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.chain, cert.chain);
        let mode = std::fs::metadata(dir.path().join(SERVER_KEY)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_key_that_does_not_match_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        let first = ca.issue_server("enroll.local", &names(), now()).unwrap();
        let second = ca.issue_server("enroll.local", &names(), now()).unwrap();
        first.save_issued(dir.path()).unwrap();
        write_file(&dir.path().join(SERVER_KEY), pem("PRIVATE KEY", &second.key_pkcs8).as_bytes(), 0o600).unwrap();
        let message = ServerCertificate::load_files(&dir.path().join(SERVER_CERT), &dir.path().join(SERVER_KEY))
            .unwrap_err()
            .to_string();
        assert!(message.contains("not the private key"), "{message}");
        assert!(ServerCertificate::load_issued(dir.path()).unwrap().is_none(), "a torn pair is re-issued");
    }

    #[test]
    fn reissue_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        let info = ca.issue_server("enroll.local", &names(), now()).unwrap().info;
        let ca_end = ca.info().not_after;
        assert_eq!(reissue_reason(&info, &names(), ca_end, now()), None);
        assert_eq!(reissue_reason(&info, &names(), ca_end, now() + Duration::days(360)), None);
        let late = reissue_reason(&info, &names(), ca_end, now() + Duration::days(368)).unwrap();
        assert!(late.starts_with("it expires on"), "{late}");
        let early = reissue_reason(&info, &names(), ca_end, now() - Duration::days(2)).unwrap();
        assert!(early.contains("not valid until"), "{early}");
        let moved =
            wanted_names("enroll", &[SubjectName::Dns("mdm.example.com".into())], &["10.0.0.9".parse().unwrap()]);
        let changed = reissue_reason(&info, &moved, ca_end, now()).unwrap();
        assert_eq!(changed, "names changed: +10.0.0.9 -10.0.0.5");
        // Cut short to the CA's own end: renewing could not help, so it is not renewed in a loop.
        assert_eq!(reissue_reason(&info, &names(), info.not_after, now() + Duration::days(368)), None);
    }
}
