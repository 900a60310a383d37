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
    let (certificates, keys) = pkcs12::read(der, password)?;
    let Some(key) = keys.first() else {
        return Err(PushCertError::Pkcs12(
            "it holds no private key; in Keychain Access, export the certificate together with its key".into(),
        ));
    };
    let key_pem = super::pem("PRIVATE KEY", key);
    let key_pair = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| PushCertError::KeyUnreadable(e.to_string()))?;
    let own = certificates.iter().find(|der| {
        x509_parser::parse_x509_certificate(der)
            .is_ok_and(|(_, cert)| key_pair.public_key_raw() == &*cert.public_key().subject_public_key.data)
    });
    match own {
        Some(der) => Ok((super::pem("CERTIFICATE", der), key_pem)),
        None => Err(PushCertError::KeyMismatch),
    }
}

/// PKCS#12 (RFC 7292) reading, the parts a certificate export needs: the MAC checked with the password, the
/// encrypted parts opened (PBES2 with PBKDF2 and AES, as current exports use; the legacy PBE-SHA1-3DES and
/// PBE-SHA1-RC2-40 of Keychain Access and older OpenSSL), and the certificates and PKCS#8 keys taken out. The
/// structures and key derivations are the `pkcs12` and `pkcs5` crates'; this is the glue between them.
mod pkcs12 {
    use ::pkcs12::authenticated_safe::AuthenticatedSafe;
    use ::pkcs12::cert_type::CertBag;
    use ::pkcs12::kdf::{Pkcs12KeyType, derive_key_utf8};
    use ::pkcs12::pbe_params::{EncryptedPrivateKeyInfo, Pkcs12PbeParams};
    use ::pkcs12::pfx::Pfx;
    use ::pkcs12::safe_bag::SafeContents;
    use cms::encrypted_data::EncryptedData;
    use der::asn1::{ObjectIdentifier as Oid, OctetString};
    use der::{Decode, Encode};
    use x509_cert::spki::AlgorithmIdentifierOwned;

    use super::PushCertError;

    const ID_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
    const ID_ENCRYPTED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.6");
    const KEY_BAG: Oid = Oid::new_unwrap("1.2.840.113549.1.12.10.1.1");
    const SHROUDED_KEY_BAG: Oid = Oid::new_unwrap("1.2.840.113549.1.12.10.1.2");
    const CERT_BAG: Oid = Oid::new_unwrap("1.2.840.113549.1.12.10.1.3");
    const X509_CERTIFICATE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.22.1");
    const PBES2: Oid = Oid::new_unwrap("1.2.840.113549.1.5.13");
    const PBE_SHA1_3DES: Oid = Oid::new_unwrap("1.2.840.113549.1.12.1.3");
    const PBE_SHA1_RC2_40: Oid = Oid::new_unwrap("1.2.840.113549.1.12.1.6");
    const SHA1: Oid = Oid::new_unwrap("1.3.14.3.2.26");
    const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");

    fn unreadable(what: impl std::fmt::Display) -> PushCertError {
        PushCertError::Pkcs12(format!("it cannot be read ({what}); export it again as a .p12 with its key"))
    }

    fn wrong_password() -> PushCertError {
        PushCertError::Pkcs12(
            "the password is wrong (or the file is damaged); use the password given when it was exported".into(),
        )
    }

    /// What a PKCS#12 file holds: certificates (DER) and private keys (PKCS#8 DER).
    pub type Contents = (Vec<Vec<u8>>, Vec<Vec<u8>>);

    /// The certificates and private keys in a PKCS#12 file.
    pub fn read(file: &[u8], password: &str) -> Result<Contents, PushCertError> {
        // Keychain Access writes BER; the structures below read DER.
        let file = super::super::ber::to_der(file).map_err(unreadable)?;
        let pfx = Pfx::from_der(&file).map_err(unreadable)?;
        if pfx.auth_safe.content_type != ID_DATA {
            return Err(unreadable("it is not password-integrity protected"));
        }
        let auth_safe = octets(&pfx.auth_safe.content)?;
        let Some(mac) = &pfx.mac_data else { return Err(unreadable("it has no MAC")) };
        let (algorithm, length) = match mac.mac.algorithm.oid {
            SHA1 => (ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, 20),
            SHA256 => (ring::hmac::HMAC_SHA256, 32),
            other => return Err(unreadable(format!("MAC digest {other}"))),
        };
        let salt = mac.mac_salt.as_bytes();
        let mac_key = match mac.mac.algorithm.oid {
            SHA1 => derive_key_utf8::<sha1::Sha1>(password, salt, Pkcs12KeyType::Mac, mac.iterations, length),
            _ => derive_key_utf8::<sha2::Sha256>(password, salt, Pkcs12KeyType::Mac, mac.iterations, length),
        }
        .map_err(unreadable)?;
        ring::hmac::verify(&ring::hmac::Key::new(algorithm, &mac_key), &auth_safe, mac.mac.digest.as_bytes())
            .map_err(|_| wrong_password())?;

        let (mut certificates, mut keys) = (Vec::new(), Vec::new());
        for content in AuthenticatedSafe::from_der(&auth_safe).map_err(unreadable)? {
            let bags = match content.content_type {
                ID_DATA => octets(&content.content)?,
                ID_ENCRYPTED_DATA => {
                    let encrypted: EncryptedData = content.content.decode_as().map_err(unreadable)?;
                    let info = encrypted.enc_content_info;
                    let data = info.encrypted_content.ok_or_else(|| unreadable("an encrypted part is empty"))?;
                    decrypt(&info.content_enc_alg, data.as_bytes(), password)?
                }
                _ => continue,
            };
            for bag in SafeContents::from_der(&bags).map_err(unreadable)? {
                // The value comes with its `[0] EXPLICIT` wrapper.
                let value = der::Any::from_der(&bag.bag_value).map_err(unreadable)?.value().to_vec();
                match bag.bag_id {
                    CERT_BAG => {
                        let cert = CertBag::from_der(&value).map_err(unreadable)?;
                        if cert.cert_id == X509_CERTIFICATE {
                            certificates.push(cert.cert_value.as_bytes().to_vec());
                        }
                    }
                    SHROUDED_KEY_BAG => {
                        let shrouded = EncryptedPrivateKeyInfo::from_der(&value).map_err(unreadable)?;
                        keys.push(decrypt(
                            &shrouded.encryption_algorithm,
                            shrouded.encrypted_data.as_bytes(),
                            password,
                        )?);
                    }
                    KEY_BAG => keys.push(value),
                    _ => {}
                }
            }
        }
        Ok((certificates, keys))
    }

    fn octets(any: &der::Any) -> Result<Vec<u8>, PushCertError> {
        let der = any.to_der().map_err(unreadable)?;
        Ok(OctetString::from_der(&der).map_err(unreadable)?.into_bytes())
    }

    fn decrypt(algorithm: &AlgorithmIdentifierOwned, data: &[u8], password: &str) -> Result<Vec<u8>, PushCertError> {
        use cbc::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
        match algorithm.oid {
            PBES2 => {
                let der = algorithm.to_der().map_err(unreadable)?;
                let scheme = pkcs5::EncryptionScheme::from_der(&der).map_err(unreadable)?;
                scheme.decrypt(password, data).map_err(|_| wrong_password())
            }
            PBE_SHA1_3DES | PBE_SHA1_RC2_40 => {
                let params: Pkcs12PbeParams = algorithm
                    .parameters
                    .as_ref()
                    .ok_or_else(|| unreadable("the cipher has no parameters"))?
                    .decode_as()
                    .map_err(unreadable)?;
                let (salt, rounds) = (params.salt.as_bytes(), params.iterations);
                let key_len = if algorithm.oid == PBE_SHA1_3DES { 24 } else { 5 };
                let key = derive_key_utf8::<sha1::Sha1>(password, salt, Pkcs12KeyType::EncryptionKey, rounds, key_len)
                    .map_err(unreadable)?;
                let iv =
                    derive_key_utf8::<sha1::Sha1>(password, salt, Pkcs12KeyType::Iv, rounds, 8).map_err(unreadable)?;
                let opened = if algorithm.oid == PBE_SHA1_3DES {
                    cbc::Decryptor::<des::TdesEde3>::new_from_slices(&key, &iv)
                        .map_err(unreadable)?
                        .decrypt_padded_vec_mut::<Pkcs7>(data)
                } else {
                    use cbc::cipher::InnerIvInit as _;
                    let cipher = rc2::Rc2::new_with_eff_key_len(&key, 40);
                    cbc::Decryptor::<rc2::Rc2>::inner_iv_slice_init(cipher, &iv)
                        .map_err(unreadable)?
                        .decrypt_padded_vec_mut::<Pkcs7>(data)
                };
                opened.map_err(|_| wrong_password())
            }
            other => Err(unreadable(format!("cipher {other}"))),
        }
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
