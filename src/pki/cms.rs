//! Cryptographic Message Syntax (RFC 5652), the parts device management needs: signing (profiles, SCEP replies),
//! verifying a signature and finding the certificate that made it (SCEP requests, `Mdm-Signature`), certificate-only
//! messages (the certificate in a SCEP `CertRep`), and RSA key-transport envelopes (SCEP's encrypted requests and
//! replies).
//!
//! The ASN.1 types come from the `cms` crate; keys and signatures are ring's, except RSA decryption, which ring does
//! not offer and the `rsa` crate does.

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::enveloped_data::{
    EncryptedContentInfo, EnvelopedData, KeyTransRecipientInfo, RecipientIdentifier, RecipientInfo, RecipientInfos,
};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{ObjectIdentifier as Oid, OctetString, SetOfVec, UtcTime};
use der::{Any, Decode, Encode, Tag, Tagged as _};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use x509_cert::Certificate;
use x509_cert::attr::{Attribute, AttributeValue};
use x509_cert::spki::AlgorithmIdentifierOwned;

pub const ID_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
pub const ID_SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
pub const ID_ENVELOPED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.3");
const ATTR_CONTENT_TYPE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.3");
const ATTR_MESSAGE_DIGEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.4");
const ATTR_SIGNING_TIME: Oid = Oid::new_unwrap("1.2.840.113549.1.9.5");
const SHA1: Oid = Oid::new_unwrap("1.3.14.3.2.26");
const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA384: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.2");
const SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");
const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
const ECDSA_WITH_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
const P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
const P384: Oid = Oid::new_unwrap("1.3.132.0.34");
const AES128_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.2");
const AES192_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.22");
const AES256_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.42");
const DES_EDE3_CBC: Oid = Oid::new_unwrap("1.2.840.113549.3.7");
const DES_CBC: Oid = Oid::new_unwrap("1.3.14.3.2.7");

#[derive(Debug, thiserror::Error)]
pub enum CmsError {
    #[error("the message is not valid CMS: {0}")]
    Malformed(String),
    #[error("the message uses {0}, which enrolld does not support")]
    Unsupported(String),
    #[error("the signature does not verify: {0}")]
    BadSignature(&'static str),
    #[error("the envelope cannot be opened: {0}")]
    Envelope(&'static str),
    #[error("the signing key cannot be used: {0}")]
    Key(String),
}

impl From<der::Error> for CmsError {
    fn from(error: der::Error) -> Self {
        CmsError::Malformed(error.to_string())
    }
}

/// A private key that signs CMS messages: ECDSA P-256/P-384 or RSA, from PKCS#8.
pub struct SigningKey {
    kind: KeyKind,
}

enum KeyKind {
    Ecdsa(Box<EcdsaKeyPair>, Oid, &'static ring::digest::Algorithm),
    Rsa(Box<RsaKeyPair>),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            KeyKind::Ecdsa(..) => "ECDSA",
            KeyKind::Rsa(_) => "RSA",
        };
        f.debug_struct("SigningKey").field("kind", &kind).finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, CmsError> {
        let rng = ring::rand::SystemRandom::new();
        let ecdsa = [
            (&signature::ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_WITH_SHA256, &ring::digest::SHA256),
            (&signature::ECDSA_P384_SHA384_ASN1_SIGNING, ECDSA_WITH_SHA384, &ring::digest::SHA384),
        ];
        for (algorithm, oid, digest) in ecdsa {
            if let Ok(key) = EcdsaKeyPair::from_pkcs8(algorithm, der, &rng) {
                return Ok(SigningKey { kind: KeyKind::Ecdsa(Box::new(key), oid, digest) });
            }
        }
        RsaKeyPair::from_pkcs8(der)
            .map(|key| SigningKey { kind: KeyKind::Rsa(Box::new(key)) })
            .map_err(|e| CmsError::Key(format!("not an ECDSA P-256/P-384 or RSA PKCS#8 key ({e})")))
    }

    fn digest(&self) -> (&'static ring::digest::Algorithm, Oid) {
        match &self.kind {
            KeyKind::Ecdsa(_, _, digest) if std::ptr::eq(*digest, &ring::digest::SHA384) => (digest, SHA384),
            KeyKind::Ecdsa(_, _, digest) => (digest, SHA256),
            KeyKind::Rsa(_) => (&ring::digest::SHA256, SHA256),
        }
    }

    fn signature_algorithm(&self) -> AlgorithmIdentifierOwned {
        match &self.kind {
            KeyKind::Ecdsa(_, oid, _) => AlgorithmIdentifierOwned { oid: *oid, parameters: None },
            KeyKind::Rsa(_) => AlgorithmIdentifierOwned { oid: SHA256_WITH_RSA, parameters: Some(Any::null()) },
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CmsError> {
        let rng = ring::rand::SystemRandom::new();
        match &self.kind {
            KeyKind::Ecdsa(key, _, _) => key.sign(&rng, message).map(|s| s.as_ref().to_vec()),
            KeyKind::Rsa(key) => {
                let mut out = vec![0; key.public().modulus_len()];
                key.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut out).map(|()| out)
            }
        }
        .map_err(|_| CmsError::Key("signing failed".into()))
    }
}

/// Signs `content` as CMS SignedData (`id-data`, carried inside) with `key`, whose certificate is `chain[0]`; the
/// whole chain goes along so the reader can build the path to its trust anchor. `attributes` are signed with the
/// standard content type, message digest and signing time. Without content (a SCEP failure) the digest is that of
/// nothing.
pub fn sign(
    content: Option<&[u8]>,
    key: &SigningKey,
    chain: &[&[u8]],
    attributes: Vec<Attribute>,
    now: time::OffsetDateTime,
) -> Result<Vec<u8>, CmsError> {
    let Some(signer_der) = chain.first() else {
        return Err(CmsError::Key("no certificate for the signing key".into()));
    };
    let signer = Certificate::from_der(signer_der)?;
    let (digest_algorithm, digest_oid) = key.digest();
    let digest = ring::digest::digest(digest_algorithm, content.unwrap_or_default());
    let signing_time = UtcTime::from_unix_duration(std::time::Duration::from_secs(now.unix_timestamp().max(0) as u64))?;
    let mut signed = vec![
        attribute(ATTR_CONTENT_TYPE, Any::encode_from(&ID_DATA)?)?,
        attribute(ATTR_MESSAGE_DIGEST, Any::new(Tag::OctetString, digest.as_ref())?)?,
        attribute(ATTR_SIGNING_TIME, Any::encode_from(&signing_time)?)?,
    ];
    signed.extend(attributes);
    let signed = SetOfVec::try_from(signed)?;
    let signature = key.sign(&signed.to_der()?)?;
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: signer.tbs_certificate.issuer.clone(),
            serial_number: signer.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: AlgorithmIdentifierOwned { oid: digest_oid, parameters: None },
        signed_attrs: Some(signed),
        signature_algorithm: key.signature_algorithm(),
        signature: OctetString::new(signature)?,
        unsigned_attrs: None,
    };
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![AlgorithmIdentifierOwned { oid: digest_oid, parameters: None }])?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: content.map(|c| Any::new(Tag::OctetString, c)).transpose()?,
        },
        certificates: Some(certificate_set(chain)?),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer_info])?),
    };
    Ok(ContentInfo { content_type: ID_SIGNED_DATA, content: Any::encode_from(&signed_data)? }.to_der()?)
}

/// A "certificates-only" message (degenerate SignedData: no content, no signers), as a SCEP `CertRep` carries.
pub fn certificates_only(certificates: &[&[u8]]) -> Result<Vec<u8>, CmsError> {
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::default(),
        encap_content_info: EncapsulatedContentInfo { econtent_type: ID_DATA, econtent: None },
        certificates: Some(certificate_set(certificates)?),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::default()),
    };
    Ok(ContentInfo { content_type: ID_SIGNED_DATA, content: Any::encode_from(&signed_data)? }.to_der()?)
}

fn certificate_set(certificates: &[&[u8]]) -> Result<CertificateSet, CmsError> {
    let choices = certificates
        .iter()
        .map(|der| Certificate::from_der(der).map(CertificateChoices::Certificate))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CertificateSet(SetOfVec::try_from(choices)?))
}

fn attribute(oid: Oid, value: Any) -> Result<Attribute, CmsError> {
    Ok(Attribute { oid, values: SetOfVec::try_from(vec![AttributeValue::from(value)])? })
}

/// What a verified SignedData holds.
#[derive(Debug)]
pub struct Verified {
    /// The signer's certificate (DER), taken from the message and checked to have made the signature. Whether to
    /// trust it is the caller's question.
    pub signer: Vec<u8>,
    /// The signed content (the detached content, when it was detached).
    pub content: Vec<u8>,
    /// The signed attributes.
    pub attributes: Vec<Attribute>,
}

impl Verified {
    /// The value of signed attribute `oid`, if present.
    pub fn attribute(&self, oid: Oid) -> Option<&Any> {
        self.attributes.iter().find(|a| a.oid == oid).and_then(|a| a.values.get(0))
    }
}

/// Verifies a CMS SignedData made by one signer whose certificate is in the message. With `detached`, that is the
/// content that was signed; otherwise the content must be inside. RSA (PKCS#1 v1.5 with SHA-1 or SHA-2) and ECDSA
/// (P-256, P-384) signatures are accepted.
pub fn verify(message: &[u8], detached: Option<&[u8]>) -> Result<Verified, CmsError> {
    let message = super::ber::to_der(message).map_err(CmsError::Malformed)?;
    let info = ContentInfo::from_der(&message)?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(CmsError::Malformed(format!("expected SignedData, found content type {}", info.content_type)));
    }
    let signed: SignedData = info.content.decode_as()?;
    let content = match (detached, &signed.encap_content_info.econtent) {
        (Some(content), _) => content.to_vec(),
        (None, Some(inner)) => OctetString::from_der(&inner.to_der()?)?.into_bytes(),
        (None, None) => return Err(CmsError::Malformed("no content was signed".into())),
    };
    let [signer_info] = signed.signer_infos.0.as_slice() else {
        return Err(CmsError::Malformed(format!("expected one signer, found {}", signed.signer_infos.0.len())));
    };
    let certificates: Vec<&Certificate> = signed
        .certificates
        .as_ref()
        .map(|set| {
            set.0
                .iter()
                .filter_map(|c| match c {
                    CertificateChoices::Certificate(cert) => Some(cert),
                    CertificateChoices::Other(_) => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let signer = certificates
        .iter()
        .find(|cert| match &signer_info.sid {
            SignerIdentifier::IssuerAndSerialNumber(id) => {
                cert.tbs_certificate.issuer == id.issuer && cert.tbs_certificate.serial_number == id.serial_number
            }
            SignerIdentifier::SubjectKeyIdentifier(ski) => subject_key_id(cert).as_deref() == Some(ski.0.as_bytes()),
        })
        .ok_or(CmsError::BadSignature("the signer's certificate is not in the message"))?;
    let digest = digest_algorithm(&signer_info.digest_alg.oid)?;
    let (signed_bytes, attributes) = match &signer_info.signed_attrs {
        Some(attrs) => {
            let content_type = attrs
                .iter()
                .find(|a| a.oid == ATTR_CONTENT_TYPE)
                .and_then(|a| a.values.get(0))
                .and_then(|v| v.decode_as::<Oid>().ok());
            if content_type != Some(signed.encap_content_info.econtent_type) {
                return Err(CmsError::BadSignature("the signed content type is missing or not the content's"));
            }
            let wanted = ring::digest::digest(digest, &content);
            let found = attrs
                .iter()
                .find(|a| a.oid == ATTR_MESSAGE_DIGEST)
                .and_then(|a| a.values.get(0))
                .ok_or(CmsError::BadSignature("the signed attributes carry no message digest"))?;
            if found.tag() != Tag::OctetString || found.value() != wanted.as_ref() {
                return Err(CmsError::BadSignature("the content does not match its signed digest"));
            }
            (attrs.to_der()?, attrs.iter().cloned().collect())
        }
        None => (content.clone(), Vec::new()),
    };
    let spki = &signer.tbs_certificate.subject_public_key_info;
    let public_key = spki.subject_public_key.raw_bytes();
    let algorithm: &dyn signature::VerificationAlgorithm = match spki.algorithm.oid {
        RSA_ENCRYPTION => match signer_info.digest_alg.oid {
            SHA1 => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            SHA256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            SHA384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            _ => &signature::RSA_PKCS1_2048_8192_SHA512,
        },
        EC_PUBLIC_KEY => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<Oid>().ok());
            match (curve, signer_info.digest_alg.oid) {
                (Some(P256), SHA256) => &signature::ECDSA_P256_SHA256_ASN1,
                (Some(P384), SHA384) => &signature::ECDSA_P384_SHA384_ASN1,
                (Some(P256), SHA384) => &signature::ECDSA_P256_SHA384_ASN1,
                (Some(P384), SHA256) => &signature::ECDSA_P384_SHA256_ASN1,
                _ => return Err(CmsError::Unsupported("an elliptic curve or digest other than P-256/P-384".into())),
            }
        }
        other => return Err(CmsError::Unsupported(format!("public-key algorithm {other}"))),
    };
    signature::UnparsedPublicKey::new(algorithm, public_key)
        .verify(&signed_bytes, signer_info.signature.as_bytes())
        .map_err(|_| CmsError::BadSignature("the signature was not made by the signer's key"))?;
    Ok(Verified { signer: signer.to_der()?, content, attributes })
}

fn digest_algorithm(oid: &Oid) -> Result<&'static ring::digest::Algorithm, CmsError> {
    match *oid {
        SHA1 => Ok(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY),
        SHA256 => Ok(&ring::digest::SHA256),
        SHA384 => Ok(&ring::digest::SHA384),
        SHA512 => Ok(&ring::digest::SHA512),
        other => Err(CmsError::Unsupported(format!("digest algorithm {other}"))),
    }
}

fn subject_key_id(cert: &Certificate) -> Option<Vec<u8>> {
    const SKI: Oid = Oid::new_unwrap("2.5.29.14");
    let ext = cert.tbs_certificate.extensions.as_ref()?.iter().find(|e| e.extn_id == SKI)?;
    OctetString::from_der(ext.extn_value.as_bytes()).ok().map(|o| o.into_bytes())
}

/// A cipher enrolld seals envelopes with (and opens them with); a reply uses the one its request used, or 3DES for
/// a request in single DES (see [`OpeningCipher`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCipher {
    Aes128Cbc,
    Aes192Cbc,
    Aes256Cbc,
    DesEde3Cbc,
}

impl std::fmt::Display for ContentCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContentCipher::Aes128Cbc => "AES-128-CBC",
            ContentCipher::Aes192Cbc => "AES-192-CBC",
            ContentCipher::Aes256Cbc => "AES-256-CBC",
            ContentCipher::DesEde3Cbc => "3DES-CBC",
        })
    }
}

impl ContentCipher {
    fn oid(self) -> Oid {
        match self {
            ContentCipher::Aes128Cbc => AES128_CBC,
            ContentCipher::Aes192Cbc => AES192_CBC,
            ContentCipher::Aes256Cbc => AES256_CBC,
            ContentCipher::DesEde3Cbc => DES_EDE3_CBC,
        }
    }

    fn key_len(self) -> usize {
        match self {
            ContentCipher::Aes128Cbc => 16,
            ContentCipher::Aes192Cbc | ContentCipher::DesEde3Cbc => 24,
            ContentCipher::Aes256Cbc => 32,
        }
    }

    fn iv_len(self) -> usize {
        match self {
            ContentCipher::DesEde3Cbc => 8,
            _ => 16,
        }
    }

    fn encrypt(self, key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, CmsError> {
        use cbc::cipher::{BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
        fn run<C: BlockEncryptMut + KeyIvInit>(key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, CmsError> {
            Ok(C::new_from_slices(key, iv)
                .map_err(|_| CmsError::Envelope("the content key or IV has the wrong length"))?
                .encrypt_padded_vec_mut::<Pkcs7>(data))
        }
        match self {
            ContentCipher::Aes128Cbc => run::<cbc::Encryptor<aes::Aes128>>(key, iv, data),
            ContentCipher::Aes192Cbc => run::<cbc::Encryptor<aes::Aes192>>(key, iv, data),
            ContentCipher::Aes256Cbc => run::<cbc::Encryptor<aes::Aes256>>(key, iv, data),
            ContentCipher::DesEde3Cbc => run::<cbc::Encryptor<des::TdesEde3>>(key, iv, data),
        }
    }
}

/// A cipher an envelope may be opened with: every [`ContentCipher`], and single DES-CBC, the default of SCEP
/// clients built on older PKCS#7 libraries (micromdm/scep's `scepclient` among them). Single DES is accepted for
/// opening only, and only because of what it guards here: a SCEP request holds a CSR and a one-time challenge, and it
/// travels inside TLS. Nothing is ever sealed with it; a reply to a single-DES request is sealed with 3DES, which
/// every client that speaks DES also reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpeningCipher {
    Sealing(ContentCipher),
    DesCbc,
}

impl OpeningCipher {
    fn from_oid(oid: &Oid) -> Result<Self, CmsError> {
        match *oid {
            AES128_CBC => Ok(OpeningCipher::Sealing(ContentCipher::Aes128Cbc)),
            AES192_CBC => Ok(OpeningCipher::Sealing(ContentCipher::Aes192Cbc)),
            AES256_CBC => Ok(OpeningCipher::Sealing(ContentCipher::Aes256Cbc)),
            DES_EDE3_CBC => Ok(OpeningCipher::Sealing(ContentCipher::DesEde3Cbc)),
            DES_CBC => Ok(OpeningCipher::DesCbc),
            other => Err(CmsError::Unsupported(format!("content cipher {other}"))),
        }
    }

    /// The cipher a reply to an envelope sealed with this one uses.
    fn reply(self) -> ContentCipher {
        match self {
            OpeningCipher::Sealing(cipher) => cipher,
            OpeningCipher::DesCbc => ContentCipher::DesEde3Cbc,
        }
    }

    fn key_len(self) -> usize {
        match self {
            OpeningCipher::Sealing(cipher) => cipher.key_len(),
            OpeningCipher::DesCbc => 8,
        }
    }

    fn decrypt(self, key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, CmsError> {
        use cbc::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
        fn run<C: BlockDecryptMut + KeyIvInit>(key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, CmsError> {
            C::new_from_slices(key, iv)
                .map_err(|_| CmsError::Envelope("the content key or IV has the wrong length"))?
                .decrypt_padded_vec_mut::<Pkcs7>(data)
                .map_err(|_| CmsError::Envelope("the content does not decrypt (wrong key or damaged data)"))
        }
        match self {
            OpeningCipher::Sealing(ContentCipher::Aes128Cbc) => run::<cbc::Decryptor<aes::Aes128>>(key, iv, data),
            OpeningCipher::Sealing(ContentCipher::Aes192Cbc) => run::<cbc::Decryptor<aes::Aes192>>(key, iv, data),
            OpeningCipher::Sealing(ContentCipher::Aes256Cbc) => run::<cbc::Decryptor<aes::Aes256>>(key, iv, data),
            OpeningCipher::Sealing(ContentCipher::DesEde3Cbc) => run::<cbc::Decryptor<des::TdesEde3>>(key, iv, data),
            OpeningCipher::DesCbc => run::<cbc::Decryptor<des::Des>>(key, iv, data),
        }
    }
}

/// Opens an EnvelopedData addressed (by key transport, RSA PKCS#1 v1.5) to `key`, whose certificate is
/// `recipient` (DER). Returns the content and the cipher a reply to it is sealed with: the envelope's own, or 3DES
/// for one in single DES (which is opened, never used to seal).
///
/// Only the recipient entry naming `recipient` is tried, once. RSA decryption is blinded, and a key that does not
/// decrypt is replaced by one derived from the ciphertext (implicit rejection), so a malformed key and a wrong one
/// fail the same way, at the content's padding, every time: the answer gives no padding oracle on the RSA key.
pub fn open_envelope(
    message: &[u8],
    key: &rsa::RsaPrivateKey,
    recipient: &[u8],
) -> Result<(Vec<u8>, ContentCipher), CmsError> {
    let message = super::ber::to_der(message).map_err(CmsError::Malformed)?;
    let info = ContentInfo::from_der(&message)?;
    if info.content_type != ID_ENVELOPED_DATA {
        return Err(CmsError::Malformed(format!("expected EnvelopedData, found content type {}", info.content_type)));
    }
    let enveloped: EnvelopedData = join_encrypted_content(&info.content)?.decode_as()?;
    let encrypted = &enveloped.encrypted_content;
    let cipher = OpeningCipher::from_oid(&encrypted.content_enc_alg.oid)?;
    let iv = encrypted
        .content_enc_alg
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<OctetString>().ok())
        .ok_or(CmsError::Envelope("the cipher has no IV"))?;
    let data = encrypted.encrypted_content.as_ref().ok_or(CmsError::Envelope("the envelope is empty"))?;
    let ours = Certificate::from_der(recipient)?;
    let ski = subject_key_id(&ours);
    let ktri = enveloped
        .recip_infos
        .0
        .iter()
        .find_map(|recipient| match recipient {
            RecipientInfo::Ktri(ktri) if ktri.key_enc_alg.oid == RSA_ENCRYPTION => match &ktri.rid {
                RecipientIdentifier::IssuerAndSerialNumber(id)
                    if id.issuer == ours.tbs_certificate.issuer
                        && id.serial_number == ours.tbs_certificate.serial_number =>
                {
                    Some(ktri)
                }
                RecipientIdentifier::SubjectKeyIdentifier(id) if Some(id.0.as_bytes()) == ski.as_deref() => Some(ktri),
                _ => None,
            },
            _ => None,
        })
        .ok_or(CmsError::Envelope("it is not addressed to this server's SCEP certificate"))?;
    // Implicit rejection: the key a malformed encryption yields is derived from the ciphertext and a secret of the
    // private key, so the same request always fails the same way, and the two are chosen between without a branch.
    let synthetic = {
        use rsa::traits::PrivateKeyParts as _;
        let secret = ring::digest::digest(&ring::digest::SHA256, &key.d().to_bytes_be());
        let mac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
        let tag = ring::hmac::sign(&mac, ktri.enc_key.as_bytes());
        let mut bytes = tag.as_ref().to_vec();
        bytes.extend_from_slice(ring::hmac::sign(&mac, tag.as_ref()).as_ref());
        bytes.truncate(cipher.key_len());
        bytes
    };
    let decrypted = key.decrypt_blinded(&mut rand_core::OsRng, rsa::Pkcs1v15Encrypt, ktri.enc_key.as_bytes());
    let (valid, real) = match decrypted {
        Ok(real) if real.len() == cipher.key_len() => (subtle::Choice::from(1), real),
        _ => (subtle::Choice::from(0), vec![0; cipher.key_len()]),
    };
    let content_key: Vec<u8> = synthetic
        .iter()
        .zip(&real)
        .map(|(s, r)| subtle::ConditionallySelectable::conditional_select(s, r, valid))
        .collect();
    let content = cipher.decrypt(&content_key, iv.as_bytes(), data.as_bytes())?;
    Ok((content, cipher.reply()))
}

/// BER lets `encryptedContent` (`[0] IMPLICIT OCTET STRING`) come in constructed, chunked form, which only the
/// schema tells apart from a constructed `[0]`; in EncryptedContentInfo (a SEQUENCE of OID, algorithm, `[0]`) the
/// chunks are joined into the primitive form DER wants.
fn join_encrypted_content(enveloped: &Any) -> Result<Any, CmsError> {
    let mut fields: Vec<Any> = enveloped.decode_as()?;
    let constructed_zero = Tag::ContextSpecific { constructed: true, number: der::TagNumber::N0 };
    for field in fields.iter_mut().filter(|f| f.tag() == Tag::Sequence) {
        let mut parts: Vec<Any> = field.decode_as()?;
        if let [first, _, content] = parts.as_mut_slice()
            && first.tag() == Tag::ObjectIdentifier
            && content.tag() == constructed_zero
        {
            let joined = super::ber::octet_chunks(content.value()).map_err(CmsError::Malformed)?;
            *content = Any::new(Tag::ContextSpecific { constructed: false, number: der::TagNumber::N0 }, joined)?;
            *field = Any::encode_from(&parts)?;
        }
    }
    Ok(Any::encode_from(&fields)?)
}

/// Seals `content` in an EnvelopedData for the holder of `recipient` (an RSA certificate, DER), with `cipher`.
pub fn seal_envelope(content: &[u8], recipient: &[u8], cipher: ContentCipher) -> Result<Vec<u8>, CmsError> {
    let mut content_key = vec![0; cipher.key_len()];
    let mut iv = vec![0; cipher.iv_len()];
    let rng = ring::rand::SystemRandom::new();
    ring::rand::SecureRandom::fill(&rng, &mut content_key).map_err(|_| CmsError::Envelope("no randomness"))?;
    ring::rand::SecureRandom::fill(&rng, &mut iv).map_err(|_| CmsError::Envelope("no randomness"))?;
    let sealed = cipher.encrypt(&content_key, &iv, content)?;
    envelope(recipient, cipher.oid(), &content_key, iv, sealed)
}

/// The EnvelopedData around content already `sealed` under `content_key` (the cipher `cipher`, its IV `iv`), the
/// key transported to `recipient` with RSA PKCS#1 v1.5.
fn envelope(
    recipient: &[u8],
    cipher: Oid,
    content_key: &[u8],
    iv: Vec<u8>,
    sealed: Vec<u8>,
) -> Result<Vec<u8>, CmsError> {
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    let cert = Certificate::from_der(recipient)?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(CmsError::Unsupported(format!("encrypting to a {} key", spki.algorithm.oid)));
    }
    let public = rsa::RsaPublicKey::from_pkcs1_der(spki.subject_public_key.raw_bytes())
        .map_err(|e| CmsError::Malformed(format!("the recipient's RSA key: {e}")))?;
    let encrypted_key = public
        .encrypt(&mut rand_core::OsRng, rsa::Pkcs1v15Encrypt, content_key)
        .map_err(|_| CmsError::Envelope("RSA encryption failed"))?;
    let recipient_info = RecipientInfo::Ktri(KeyTransRecipientInfo {
        version: CmsVersion::V0,
        rid: RecipientIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        }),
        key_enc_alg: AlgorithmIdentifierOwned { oid: RSA_ENCRYPTION, parameters: Some(Any::null()) },
        enc_key: OctetString::new(encrypted_key)?,
    });
    let enveloped = EnvelopedData {
        version: CmsVersion::V0,
        originator_info: None,
        recip_infos: RecipientInfos(SetOfVec::try_from(vec![recipient_info])?),
        encrypted_content: EncryptedContentInfo {
            content_type: ID_DATA,
            content_enc_alg: AlgorithmIdentifierOwned {
                oid: cipher,
                parameters: Some(Any::new(Tag::OctetString, iv)?),
            },
            encrypted_content: Some(OctetString::new(sealed)?),
        },
        unprotected_attrs: None,
    };
    Ok(ContentInfo { content_type: ID_ENVELOPED_DATA, content: Any::encode_from(&enveloped)? }.to_der()?)
}

/// The public key of a certificate as ring reads it, for checking who signed something.
pub fn public_key_of(certificate: &[u8]) -> Result<Vec<u8>, CmsError> {
    let cert = Certificate::from_der(certificate)?;
    Ok(cert.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes().to_vec())
}

/// The OID of a certificate's public-key algorithm, as text.
pub fn public_key_algorithm(certificate: &[u8]) -> Result<String, CmsError> {
    let cert = Certificate::from_der(certificate)?;
    Ok(cert.tbs_certificate.subject_public_key_info.algorithm.oid.to_string())
}

/// The public key of a signing key as ring reads it.
pub fn public_key_of_key(key: &SigningKey) -> Vec<u8> {
    match &key.kind {
        KeyKind::Ecdsa(key, _, _) => key.public_key().as_ref().to_vec(),
        KeyKind::Rsa(key) => key.public().as_ref().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ecdsa_identity() -> (SigningKey, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["signer.example".into()]).unwrap().self_signed(&key).unwrap();
        (SigningKey::from_pkcs8(&key.serialize_der()).unwrap(), cert.der().to_vec())
    }

    #[test]
    fn a_signed_message_verifies_and_a_changed_one_does_not() {
        let (key, cert) = ecdsa_identity();
        let message = sign(Some(b"<plist/>"), &key, &[&cert], Vec::new(), time::OffsetDateTime::now_utc()).unwrap();
        let verified = verify(&message, None).unwrap();
        assert_eq!(verified.content, b"<plist/>");
        assert_eq!(verified.signer, cert);
        assert!(verified.attribute(ATTR_SIGNING_TIME).is_some());

        // Detached: the same signature over other content fails on the digest.
        assert!(matches!(verify(&message, Some(b"<plist>changed</plist>")), Err(CmsError::BadSignature(_))));
        // A flipped byte in the signature itself.
        let mut broken = message.clone();
        let last = broken.len() - 1;
        broken[last] ^= 1;
        assert!(verify(&broken, None).is_err());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [&b""[..], b"\x30\x80", b"not der at all", &[0x30, 0x03, 0x06, 0x01, 0x00]] {
            assert!(verify(bytes, None).is_err());
            assert!(certificates_only(&[bytes]).is_err());
        }
    }

    #[test]
    fn every_cipher_round_trips() {
        for cipher in
            [ContentCipher::Aes128Cbc, ContentCipher::Aes192Cbc, ContentCipher::Aes256Cbc, ContentCipher::DesEde3Cbc]
        {
            let key = vec![7; cipher.key_len()];
            let iv = vec![9; cipher.iv_len()];
            let sealed = cipher.encrypt(&key, &iv, b"certificate request").unwrap();
            let opening = OpeningCipher::Sealing(cipher);
            assert_eq!(opening.decrypt(&key, &iv, &sealed).unwrap(), b"certificate request");
            assert_eq!(opening.reply(), cipher, "answered in the request's own cipher");
        }
    }

    fn rsa_recipient() -> (rsa::RsaPrivateKey, Vec<u8>) {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let pkcs8 = key.to_pkcs8_der().unwrap();
        let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let cert = rcgen::CertificateParams::new(vec!["scep.example".into()]).unwrap().self_signed(&signer).unwrap();
        (key, cert.der().to_vec())
    }

    #[test]
    fn a_single_des_envelope_opens_and_is_answered_in_3des() {
        use cbc::cipher::{BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
        let (key, cert) = rsa_recipient();
        let (content_key, iv) = ([0x13u8; 8], vec![0x24u8; 8]);
        let sealed = cbc::Encryptor::<des::Des>::new_from_slices(&content_key, &iv)
            .unwrap()
            .encrypt_padded_vec_mut::<Pkcs7>(b"certificate request");
        let message = envelope(&cert, DES_CBC, &content_key, iv, sealed).unwrap();
        let (content, reply) = open_envelope(&message, &key, &cert).unwrap();
        assert_eq!(content, b"certificate request");
        assert_eq!(reply, ContentCipher::DesEde3Cbc, "never sealed with single DES");

        // The reply's envelope names 3DES, and the holder of the key opens it.
        let answer = seal_envelope(b"issued", &cert, reply).unwrap();
        let (opened, again) = open_envelope(&answer, &key, &cert).unwrap();
        assert_eq!((opened.as_slice(), again), (&b"issued"[..], ContentCipher::DesEde3Cbc));

        // RC2 and the like are still refused.
        let rc2 = envelope(&cert, Oid::new_unwrap("1.2.840.113549.3.2"), &[0; 16], vec![0; 8], vec![0; 16]).unwrap();
        assert!(matches!(open_envelope(&rc2, &key, &cert), Err(CmsError::Unsupported(_))));
    }
}
