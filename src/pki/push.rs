//! The Apple MDM push certificate an admin uploads (from Apple's Push Certificates Portal): its Topic (the
//! subject's UID, `com.apple.mgmt.External.…`), its validity, and a check that the private key belongs to it.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;

/// The subject attribute Apple puts the push Topic in: userId (UID), OID 0.9.2342.19200300.100.1.1.
const UID_OID: &str = "0.9.2342.19200300.100.1.1";
/// Every MDM push topic starts so.
const MDM_TOPIC_PREFIX: &str = "com.apple.mgmt.";

/// What enrolld needs of a push certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushCertificate {
    /// The APNs topic, which enrollment profiles carry and every push names.
    pub topic: String,
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER certificate, hex.
    pub sha256: String,
}

/// Why an upload was refused; each says what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushCertError {
    #[error("the certificate is not PEM (-----BEGIN CERTIFICATE-----); export it from Keychain or the portal as PEM")]
    NotPem,
    #[error("the certificate cannot be read: {0}")]
    Unreadable(String),
    #[error(
        "this is not an MDM push certificate: its subject has no Topic starting with com.apple.mgmt. (found {0}); download the MDM push certificate from Apple's Push Certificates Portal"
    )]
    NoTopic(String),
    #[error("the certificate expired on {0}; renew it in Apple's Push Certificates Portal (keep the same Apple ID)")]
    Expired(String),
    #[error("the private key is not PEM (-----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY): {0}")]
    KeyUnreadable(String),
    #[error(
        "the private key does not belong to this certificate; upload the key the certificate request was made with"
    )]
    KeyMismatch,
    #[error("the PKCS#12 file: {0}")]
    Pkcs12(String),
}

impl PushCertificate {
    /// Reads a PEM certificate and its PEM private key, checking that they belong together and that the
    /// certificate is an MDM push certificate still valid at `now`.
    pub fn from_pem(cert_pem: &str, key_pem: &str, now: OffsetDateTime) -> Result<PushCertificate, PushCertError> {
        let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next().ok_or(PushCertError::NotPem)?;
        let der = der.map_err(|e| PushCertError::Unreadable(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PushCertError::Unreadable(e.to_string()))?;
        let topic = cert
            .subject()
            .iter_attributes()
            .find(|a| a.attr_type().to_id_string() == UID_OID)
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned)
            .filter(|t| t.starts_with(MDM_TOPIC_PREFIX))
            .ok_or_else(|| PushCertError::NoTopic(cert.subject().to_string()))?;
        let validity = cert.validity();
        let (not_before, not_after) = (validity.not_before.to_datetime(), validity.not_after.to_datetime());
        if not_after <= now {
            return Err(PushCertError::Expired(not_after.date().to_string()));
        }
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| PushCertError::KeyUnreadable(e.to_string()))?;
        if key.public_key_raw() != &*cert.public_key().subject_public_key.data {
            return Err(PushCertError::KeyMismatch);
        }
        Ok(PushCertificate {
            topic,
            subject: cert.subject().to_string(),
            not_before,
            not_after,
            sha256: super::sha256_hex(&der),
        })
    }
}

/// Reads the push certificate and its key from a PKCS#12 file (what Keychain Access exports), as PEM for
/// [`PushCertificate::from_pem`]: the certificate is the one whose key is in the file.
pub fn pem_from_pkcs12(der: &[u8], password: &str) -> Result<(String, String), PushCertError> {
    let archive = p12_keystore::Pkcs12Archive::from_pkcs12(der, password).map_err(|error| match error {
        p12_keystore::error::Error::MacError(_) => PushCertError::Pkcs12(
            "the password is wrong (or the file is damaged); use the password given when it was exported".into(),
        ),
        other => PushCertError::Pkcs12(format!("it cannot be read ({other}); export it again as a .p12 with its key")),
    })?;
    let Some(key) = archive.keys.first() else {
        return Err(PushCertError::Pkcs12(
            "it holds no private key; in Keychain Access, export the certificate together with its key".into(),
        ));
    };
    let key_pem = super::pem("PRIVATE KEY", key.key.as_der());
    let key_pair = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| PushCertError::KeyUnreadable(e.to_string()))?;
    let own = archive.certs.iter().find(|bag| {
        x509_parser::parse_x509_certificate(bag.cert.as_der())
            .is_ok_and(|(_, cert)| key_pair.public_key_raw() == &*cert.public_key().subject_public_key.data)
    });
    match own {
        Some(bag) => Ok((super::pem("CERTIFICATE", bag.cert.as_der()), key_pem)),
        None => Err(PushCertError::KeyMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate shaped like Apple's MDM push certificates (UID = topic in the subject), self-signed here.
    pub(crate) fn push_pair(topic: &str, days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]), topic);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("APSP:{topic}"));
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(days);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[test]
    fn the_topic_and_expiry_are_read_and_the_key_must_match() {
        let topic = "com.apple.mgmt.External.5f2c7b3e-1d2a-4c5b-9e8f-0a1b2c3d4e5f";
        let (cert, key) = push_pair(topic, 365);
        let push = PushCertificate::from_pem(&cert, &key, OffsetDateTime::now_utc()).unwrap();
        assert_eq!(push.topic, topic);
        assert!(push.not_after > OffsetDateTime::now_utc() + time::Duration::days(364));

        let (_, other_key) = push_pair(topic, 365);
        let error = PushCertificate::from_pem(&cert, &other_key, OffsetDateTime::now_utc()).unwrap_err();
        assert_eq!(error, PushCertError::KeyMismatch);
        let later = OffsetDateTime::now_utc() + time::Duration::days(400);
        assert!(matches!(PushCertificate::from_pem(&cert, &key, later), Err(PushCertError::Expired(_))));
    }

    #[test]
    fn other_certificates_and_garbage_are_refused_with_advice() {
        let (cert, key) = push_pair("com.example.not-mdm", 365);
        let error = PushCertificate::from_pem(&cert, &key, OffsetDateTime::now_utc()).unwrap_err();
        assert!(error.to_string().contains("Push Certificates Portal"), "{error}");
        assert_eq!(PushCertificate::from_pem("hello", &key, OffsetDateTime::now_utc()), Err(PushCertError::NotPem));
        let (cert, _) = push_pair("com.apple.mgmt.External.x", 365);
        let error = PushCertificate::from_pem(&cert, "nope", OffsetDateTime::now_utc()).unwrap_err();
        assert!(matches!(error, PushCertError::KeyUnreadable(_)));
    }
}
