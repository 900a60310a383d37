//! The certificate that signs enrollment profiles: `pki/profile-signing.crt` and `.key`, an ECDSA P-256 leaf issued
//! by the appliance CA for signing and nothing else (`digitalSignature`, EKU `emailProtection`, the purpose CMS
//! verifiers such as `openssl cms -verify` check by default). The HTTPS certificate (`serverAuth` only) is not a
//! signer a verifier should accept.
//!
//! It is made at start if it is missing, unreadable or from another CA, and renewed like the HTTPS certificate
//! (the certificate keeper asks [`ProfileSigner::renew_if_due`] on every check). [`ProfileSigner`] is the
//! swappable handle that signs with whichever certificate is current; the signature carries the chain (the leaf
//! and the appliance CA), so a device that trusts the CA shows the profile as verified.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::cms::{self, CmsError, SigningKey};
use super::{
    BACKDATE, CertInfo, CertificateAuthority, PkiError, SERVER_CERT_VALIDITY, parse_certificate, pem, random_serial,
};

const SIGNING_CERT: &str = "profile-signing.crt";
const SIGNING_KEY: &str = "profile-signing.key";

/// A profile-signing certificate, its chain (leaf, then the appliance CA) and key.
pub struct SigningCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: SigningKey,
    pub info: CertInfo,
}

impl std::fmt::Debug for SigningCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCertificate").field("info", &self.info).finish_non_exhaustive()
    }
}

impl SigningCertificate {
    /// A new signing certificate from `ca`, valid from shortly before `now` as long as an HTTPS certificate (or
    /// until the CA ends), written to `dir` (key first).
    pub fn issue(ca: &CertificateAuthority, dir: &Path, hostname: &str, now: OffsetDateTime) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("{hostname}.local profile signing"));
        params.distinguished_name.push(DnType::OrganizationName, "enrolld appliance");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (params.not_before + SERVER_CERT_VALIDITY).min(ca.info().not_after);
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &ca.issuer)?;
        let pkcs8 = key.serialize_der();
        super::write_file(&dir.join(SIGNING_KEY), pem("PRIVATE KEY", &pkcs8).as_bytes(), 0o600)?;
        super::write_file(&dir.join(SIGNING_CERT), cert.pem().as_bytes(), 0o644)?;
        Self::assemble(vec![cert.der().clone(), ca.cert_der().clone()], &pkcs8)
            .map_err(|reason| PkiError::Unusable { path: dir.join(SIGNING_CERT), reason })
    }

    /// The signing certificate kept in `dir`, if it is there, whole, and issued by `ca`; otherwise `None` (and why,
    /// logged), so a new one is issued.
    pub fn load(ca: &CertificateAuthority, dir: &Path) -> Result<Option<Self>, PkiError> {
        let (cert_path, key_path) = (dir.join(SIGNING_CERT), dir.join(SIGNING_KEY));
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let (cert_pem, key_pem) = (super::read_file(&cert_path)?, super::read_file(&key_path)?);
        let loaded = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("not a PEM certificate ({e})"))
            .and_then(|leaf| {
                let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| format!("not a PEM PKCS#8 key ({e})"))?;
                let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?;
                let (_, issuer) = x509_parser::parse_x509_certificate(ca.cert_der()).map_err(|e| e.to_string())?;
                parsed.verify_signature(Some(issuer.public_key())).map_err(|_| "issued by another CA".to_owned())?;
                Self::assemble(vec![leaf.into_owned(), ca.cert_der().clone()], key.secret_pkcs8_der())
            });
        match loaded {
            Ok(loaded) => Ok(Some(loaded)),
            Err(reason) => {
                tracing::warn!(path = %cert_path.display(), %reason, "issuing a new profile-signing certificate");
                Ok(None)
            }
        }
    }

    fn assemble(chain: Vec<CertificateDer<'static>>, pkcs8: &[u8]) -> Result<Self, String> {
        let leaf = chain.first().ok_or("no certificate")?;
        let key = SigningKey::from_pkcs8(pkcs8).map_err(|e| e.to_string())?;
        if cms::public_key_of(leaf).map_err(|e| e.to_string())? != cms::public_key_of_key(&key) {
            return Err("the key does not belong to the certificate".into());
        }
        let info = parse_certificate(leaf)?;
        Ok(SigningCertificate { chain, key, info })
    }
}

/// Signs enrollment profiles with the current signing certificate; cheap to share, and the keeper swaps the
/// certificate in place when it renews it.
pub struct ProfileSigner {
    current: ArcSwap<SigningCertificate>,
}

impl std::fmt::Debug for ProfileSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileSigner").field("current", &self.current.load().info).finish()
    }
}

impl ProfileSigner {
    /// The signer with the certificate kept in `dir`, issued now if there is none that is usable and current.
    pub fn start(
        ca: &CertificateAuthority,
        dir: &Path,
        hostname: &str,
        now: OffsetDateTime,
    ) -> Result<ProfileSigner, PkiError> {
        let current = match SigningCertificate::load(ca, dir)? {
            Some(loaded) => match renewal_reason(&loaded.info, ca, now) {
                None => loaded,
                Some(reason) => issued(ca, dir, hostname, now, &reason)?,
            },
            None => issued(ca, dir, hostname, now, "none was usable")?,
        };
        Ok(ProfileSigner { current: ArcSwap::from_pointee(current) })
    }

    /// Renews the signing certificate if it is due (it nears expiry, or was issued while the clock was wrong);
    /// returns why it was renewed.
    pub fn renew_if_due(
        &self,
        ca: &CertificateAuthority,
        dir: &Path,
        hostname: &str,
        now: OffsetDateTime,
    ) -> Result<Option<String>, PkiError> {
        let Some(reason) = renewal_reason(&self.current.load().info, ca, now) else { return Ok(None) };
        self.current.store(Arc::new(issued(ca, dir, hostname, now, &reason)?));
        Ok(Some(reason))
    }

    /// The certificate now signing.
    pub fn info(&self) -> CertInfo {
        self.current.load().info.clone()
    }

    /// `content` as CMS SignedData, signed with the current certificate, the chain included.
    pub fn sign(&self, content: &[u8], now: OffsetDateTime) -> Result<Vec<u8>, CmsError> {
        let current = self.current.load();
        let chain: Vec<&[u8]> = current.chain.iter().map(|c| c.as_ref()).collect();
        cms::sign(Some(content), &current.key, &chain, Vec::new(), now)
    }
}

fn renewal_reason(info: &CertInfo, ca: &CertificateAuthority, now: OffsetDateTime) -> Option<String> {
    super::renewal_reason(info, ca.info().not_after, now)
}

fn issued(
    ca: &CertificateAuthority,
    dir: &Path,
    hostname: &str,
    now: OffsetDateTime,
    reason: &str,
) -> Result<SigningCertificate, PkiError> {
    let cert = SigningCertificate::issue(ca, dir, hostname, now)?;
    tracing::info!(serial = %cert.info.serial, %reason, not_after = %cert.info.not_after.date(), "issued the profile-signing certificate");
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap()
    }

    #[test]
    fn made_once_kept_and_renewed_by_the_same_ca_before_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        let signer = ProfileSigner::start(&ca, dir.path(), "enroll", now()).unwrap();
        let first = signer.info();
        let leaf_der = CertificateDer::from_pem_slice(&std::fs::read(dir.path().join(SIGNING_CERT)).unwrap()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.email_protection && !eku.server_auth && !eku.client_auth);
        assert!(!leaf.is_ca());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(SIGNING_KEY)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        // Kept across starts; nothing due for most of a year.
        let again = ProfileSigner::start(&ca, dir.path(), "enroll", now()).unwrap();
        assert_eq!(again.info().serial, first.serial);
        assert_eq!(signer.renew_if_due(&ca, dir.path(), "enroll", now() + time::Duration::days(300)).unwrap(), None);

        // Thirty days before it ends: a new one, from the same CA, signing from now on.
        let late = now() + time::Duration::days(368);
        let reason = signer.renew_if_due(&ca, dir.path(), "enroll", late).unwrap().unwrap();
        assert!(reason.starts_with("it expires on"), "{reason}");
        assert_ne!(signer.info().serial, first.serial);
        assert!(signer.info().not_after > first.not_after);
        let signed = signer.sign(b"<plist/>", late).unwrap();
        let verified = cms::verify(&signed, None).unwrap();
        assert_eq!(crate::pki::sha256_hex(&verified.signer), signer.info().sha256);
        let (_, new_leaf) = x509_parser::parse_x509_certificate(&verified.signer).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(new_leaf.verify_signature(Some(root.public_key())).is_ok());
        assert_eq!(ProfileSigner::start(&ca, dir.path(), "enroll", late).unwrap().info().serial, signer.info().serial);
    }

    #[test]
    fn one_from_another_ca_or_torn_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now()).unwrap();
        let (stranger, _) = CertificateAuthority::load_or_create(other.path(), "enroll", now()).unwrap();
        let foreign = ProfileSigner::start(&stranger, dir.path(), "enroll", now()).unwrap().info();
        let ours = ProfileSigner::start(&ca, dir.path(), "enroll", now()).unwrap().info();
        assert_ne!(ours.serial, foreign.serial, "not signed by the appliance CA: replaced");
        std::fs::write(dir.path().join(SIGNING_KEY), "not a key").unwrap();
        assert_ne!(ProfileSigner::start(&ca, dir.path(), "enroll", now()).unwrap().info().serial, ours.serial);
    }
}
