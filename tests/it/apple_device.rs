//! A test double for an Apple device's MDM client, and a checker for Apple's published schemas.
//!
//! No iPhone can run here, so the device is simulated from the published specs: its SCEP client builds a `PKCSReq`
//! as RFC 8894 §3 describes (a PKCS#10 with the profile's challenge as `challengePassword`, enveloped to the CA's
//! RSA key with AES-128-CBC, signed by a throw-away self-signed certificate with the SCEP attributes), and its MDM
//! client signs every check-in and command report with the issued identity, as `Mdm-Signature` (a detached CMS
//! signature, base64), the way Apple's "Implementing device management" documentation describes `SignMessage`.
//! It uses the `cms` crate's builders and the `rsa` crate, not enrolld's CMS code, and re-encodes what it sends in
//! BER with indefinite lengths and chunked strings, as Apple's encoder does.
//!
//! The schema checker reads Apple's device-management YAML (tests/fixtures/apple, unmodified copies from
//! github.com/apple/device-management) and checks a plist dictionary against it: every required key present, every
//! key known, every value of the documented type.

use base64::Engine as _;
use cms::builder::{
    ContentEncryptionAlgorithm, EnvelopedDataBuilder, KeyEncryptionInfo, KeyTransRecipientInfoBuilder,
    SignedDataBuilder, SignerInfoBuilder,
};
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::ContentInfo;
use cms::enveloped_data::{EnvelopedData, RecipientIdentifier, RecipientInfo};
use cms::signed_data::{EncapsulatedContentInfo, SignedData, SignerIdentifier};
use der::asn1::{ObjectIdentifier as Oid, OctetString, SetOfVec};
use der::{Any, Decode, Encode, Tag};
use rsa::pkcs8::EncodePrivateKey;
use sha2::Digest;
use x509_cert::Certificate;
use x509_cert::attr::{Attribute, AttributeValue};
use x509_cert::spki::AlgorithmIdentifierOwned;

const ID_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
const ID_ENVELOPED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.3");
const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
pub const MESSAGE_TYPE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.2");
pub const PKI_STATUS: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.3");
pub const FAIL_INFO: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.4");
pub const SENDER_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.5");
pub const RECIPIENT_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.6");
pub const TRANSACTION_ID: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.7");

/// A simulated device: its RSA key, the throw-away certificate its SCEP request is signed with, and the identity
/// enrolld issued, once it has one.
pub struct Device {
    key: rsa::RsaPrivateKey,
    self_signed: Vec<u8>,
    pub identity: Option<Vec<u8>>,
}

/// What a `CertRep` said.
#[derive(Debug)]
pub struct CertRep {
    pub status: String,
    pub fail_info: Option<String>,
    pub recipient_nonce: Vec<u8>,
    pub transaction_id: String,
    /// The signer's certificate.
    pub signer: Vec<u8>,
    pub issued: Option<Vec<u8>>,
}

fn attribute(oid: Oid, tag: Tag, value: &[u8]) -> Attribute {
    let value = AttributeValue::from(Any::new(tag, value).unwrap());
    Attribute { oid, values: SetOfVec::try_from(vec![value]).unwrap() }
}

fn attribute_value(signed: &SignedData, oid: Oid) -> Option<Vec<u8>> {
    let signer = signed.signer_infos.0.get(0)?;
    let attrs = signer.signed_attrs.as_ref()?;
    attrs.iter().find(|a| a.oid == oid).and_then(|a| a.values.get(0)).map(|v| v.value().to_vec())
}

impl Device {
    pub fn new() -> Device {
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let pkcs8 = key.to_pkcs8_der().unwrap();
        let rcgen_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "SCEP temporary");
        let self_signed = params.self_signed(&rcgen_key).unwrap().der().to_vec();
        Device { key, self_signed, identity: None }
    }

    fn rcgen_key(&self) -> rcgen::KeyPair {
        let pkcs8 = self.key.to_pkcs8_der().unwrap();
        rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap()
    }

    /// A `PKCSReq` for `challenge`, enveloped to `ca` (the SCEP CA's certificate) and signed.
    pub fn pkcs_req(&self, ca: &[u8], challenge: &str, transaction: &str, nonce: &[u8]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "iPhone");
        // challengePassword (RFC 2985) as a UTF8String.
        let mut value = vec![0x0c, challenge.len() as u8];
        value.extend_from_slice(challenge.as_bytes());
        let mut set = vec![0x31, value.len() as u8];
        set.extend(value);
        let attrs = vec![rcgen::Attribute { oid: &[1, 2, 840, 113549, 1, 9, 7], values: set }];
        let csr = params.serialize_request_with_attributes(&self.rcgen_key(), attrs).unwrap().der().to_vec();

        let ca_cert = Certificate::from_der(ca).unwrap();
        let ca_key = {
            use rsa::pkcs1::DecodeRsaPublicKey;
            let spki = &ca_cert.tbs_certificate.subject_public_key_info;
            rsa::RsaPublicKey::from_pkcs1_der(spki.subject_public_key.raw_bytes()).unwrap()
        };
        let rid = RecipientIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: ca_cert.tbs_certificate.issuer.clone(),
            serial_number: ca_cert.tbs_certificate.serial_number.clone(),
        });
        let mut rng = rand_core::OsRng;
        let mut key_rng = rand_core::OsRng;
        let recipient = KeyTransRecipientInfoBuilder::new(rid, KeyEncryptionInfo::Rsa(ca_key), &mut key_rng).unwrap();
        let enveloped = EnvelopedDataBuilder::new(None, &csr, ContentEncryptionAlgorithm::Aes128Cbc, None)
            .unwrap()
            .add_recipient_info(recipient)
            .unwrap()
            .build_with_rng(&mut rng)
            .unwrap();
        let envelope = ContentInfo { content_type: ID_ENVELOPED_DATA, content: Any::encode_from(&enveloped).unwrap() }
            .to_der()
            .unwrap();
        let attributes = vec![
            attribute(MESSAGE_TYPE, Tag::PrintableString, b"19"),
            attribute(TRANSACTION_ID, Tag::PrintableString, transaction.as_bytes()),
            attribute(SENDER_NONCE, Tag::OctetString, nonce),
        ];
        to_ber(&self.signed(&self.self_signed, Some(&to_ber(&envelope)), None, attributes))
    }

    /// SignedData by this device's key, with `cert` as the signer: the content inside, or detached (given by
    /// its digest).
    fn signed(&self, cert: &[u8], content: Option<&[u8]>, detached: Option<&[u8]>, attrs: Vec<Attribute>) -> Vec<u8> {
        let cert = Certificate::from_der(cert).unwrap();
        let encapsulated = EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: content.map(|c| Any::new(Tag::OctetString, c).unwrap()),
        };
        let digest = detached.map(|d| sha2::Sha256::digest(d).to_vec());
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(self.key.clone());
        let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        });
        let algorithm = AlgorithmIdentifierOwned { oid: SHA256, parameters: None };
        let mut info =
            SignerInfoBuilder::new(&signer, sid, algorithm.clone(), &encapsulated, digest.as_deref()).unwrap();
        for attr in attrs {
            info.add_signed_attribute(attr).unwrap();
        }
        SignedDataBuilder::new(&encapsulated)
            .add_digest_algorithm(algorithm)
            .unwrap()
            .add_certificate(CertificateChoices::Certificate(cert))
            .unwrap()
            .add_signer_info::<_, rsa::pkcs1v15::Signature>(info)
            .unwrap()
            .build()
            .unwrap()
            .to_der()
            .unwrap()
    }

    /// Reads a `CertRep`: its SCEP attributes, and the issued certificate from the envelope (opened with this
    /// device's key), which becomes the device's identity.
    pub fn read_cert_rep(&mut self, body: &[u8]) -> CertRep {
        let info = ContentInfo::from_der(body).unwrap();
        assert_eq!(info.content_type, ID_SIGNED_DATA);
        let signed: SignedData = info.content.decode_as().unwrap();
        let text = |oid| attribute_value(&signed, oid).map(|v| String::from_utf8(v).unwrap());
        let signer = signed
            .certificates
            .as_ref()
            .and_then(|certs| {
                certs.0.iter().find_map(|c| match (c, &signed.signer_infos.0.get(0).unwrap().sid) {
                    (CertificateChoices::Certificate(cert), SignerIdentifier::IssuerAndSerialNumber(id))
                        if cert.tbs_certificate.serial_number == id.serial_number =>
                    {
                        Some(cert.to_der().unwrap())
                    }
                    _ => None,
                })
            })
            .unwrap();
        let mut rep = CertRep {
            status: text(PKI_STATUS).unwrap(),
            fail_info: text(FAIL_INFO),
            recipient_nonce: attribute_value(&signed, RECIPIENT_NONCE).unwrap(),
            transaction_id: text(TRANSACTION_ID).unwrap(),
            signer,
            issued: None,
        };
        if let Some(content) = &signed.encap_content_info.econtent {
            let envelope = OctetString::from_der(&content.to_der().unwrap()).unwrap().into_bytes();
            let degenerate = self.open(&envelope);
            let certs: SignedData = ContentInfo::from_der(&degenerate).unwrap().content.decode_as().unwrap();
            let issued = certs.certificates.unwrap().0.iter().next().map(|c| c.to_der().unwrap()).unwrap();
            // The certificate comes wrapped as a CertificateChoices; its DER is the certificate's.
            self.identity = Some(issued.clone());
            rep.issued = Some(issued);
        }
        rep
    }

    fn open(&self, envelope: &[u8]) -> Vec<u8> {
        use cbc::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
        let enveloped: EnvelopedData = ContentInfo::from_der(envelope).unwrap().content.decode_as().unwrap();
        let RecipientInfo::Ktri(ktri) = enveloped.recip_infos.0.iter().next().unwrap() else { panic!("not KTRI") };
        let key = self.key.decrypt(rsa::Pkcs1v15Encrypt, ktri.enc_key.as_bytes()).unwrap();
        let encrypted = &enveloped.encrypted_content;
        assert_eq!(encrypted.content_enc_alg.oid, Oid::new_unwrap("2.16.840.1.101.3.4.1.2"), "AES-128-CBC, as asked");
        let iv = encrypted.content_enc_alg.parameters.as_ref().unwrap().decode_as::<OctetString>().unwrap();
        cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, iv.as_bytes())
            .unwrap()
            .decrypt_padded_vec_mut::<Pkcs7>(encrypted.encrypted_content.as_ref().unwrap().as_bytes())
            .unwrap()
    }

    /// The `Mdm-Signature` header for `body`, signed with the issued identity, in BER as Apple devices send it.
    pub fn mdm_signature(&self, body: &[u8]) -> String {
        let identity = self.identity.clone().expect("the device has no identity yet");
        let signed = to_ber(&self.signed(&identity, None, Some(body), Vec::new()));
        base64::engine::general_purpose::STANDARD.encode(signed)
    }

    /// The same, signed with the throw-away certificate enrolld never issued.
    pub fn forged_signature(&self, body: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.signed(&self.self_signed, None, Some(body), Vec::new()))
    }
}

/// Re-encodes DER as BER the way Apple's CMS encoder writes it: every constructed value with an indefinite length
/// and end-of-contents octets, and OCTET STRINGs (and the primitive `[0]` of `encryptedContent`) longer than 64
/// bytes split into constructed chunks.
pub fn to_ber(der: &[u8]) -> Vec<u8> {
    fn header(input: &[u8]) -> (usize, usize) {
        let len_byte = input[1];
        if len_byte < 0x80 {
            (2, len_byte as usize)
        } else {
            let count = (len_byte & 0x7f) as usize;
            (2 + count, input[2..2 + count].iter().fold(0, |acc, b| (acc << 8) | *b as usize))
        }
    }
    fn chunks(out: &mut Vec<u8>, content: &[u8]) {
        for chunk in content.chunks(64) {
            out.push(0x04);
            if chunk.len() < 0x80 {
                out.push(chunk.len() as u8);
            }
            out.extend_from_slice(chunk);
        }
    }
    let mut out = Vec::new();
    let mut rest = der;
    while !rest.is_empty() {
        let tag = rest[0];
        let (head, len) = header(rest);
        let content = &rest[head..head + len];
        if tag & 0x20 != 0 {
            out.extend([tag, 0x80]);
            out.extend(to_ber(content));
            out.extend([0, 0]);
        } else if (tag == 0x04 || tag == 0x80) && len > 64 {
            out.extend([tag | 0x20, 0x80]);
            chunks(&mut out, content);
            out.extend([0, 0]);
        } else {
            out.extend_from_slice(&rest[..head + len]);
        }
        rest = &rest[head + len..];
    }
    out
}

/// A plist message as XML.
pub fn plist_xml(entries: Vec<(&str, plist::Value)>) -> Vec<u8> {
    let dict: plist::Dictionary = entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let mut out = Vec::new();
    plist::Value::Dictionary(dict).to_writer_xml(&mut out).unwrap();
    out
}

/// Apple's schema for one file under tests/fixtures/apple.
pub fn schema(path: &str) -> serde_norway::Value {
    let full = format!("{}/tests/fixtures/apple/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_norway::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap()
}

/// The `payloadkeys` of a schema file.
pub fn payload_keys(schema: &serde_norway::Value) -> Vec<serde_norway::Value> {
    schema["payloadkeys"].as_sequence().unwrap().clone()
}

fn applies_to(item: &serde_norway::Value, os: &str) -> bool {
    let supported = &item["supportedOS"][os];
    !(supported.is_mapping() && supported["introduced"].as_str() == Some("n/a"))
        // Keys only for User Enrollment (EnrollmentID and its kin) do not apply to a device enrollment.
        && supported["userenrollment"]["mode"].as_str() != Some("required")
}

fn type_matches(kind: &str, value: &plist::Value) -> bool {
    match kind {
        "<string>" => value.as_string().is_some(),
        "<integer>" => value.as_signed_integer().is_some() || value.as_unsigned_integer().is_some(),
        "<real>" => value.as_real().is_some() || value.as_signed_integer().is_some(),
        "<boolean>" => value.as_boolean().is_some(),
        "<data>" => value.as_data().is_some(),
        "<date>" => value.as_date().is_some(),
        "<array>" => value.as_array().is_some(),
        "<dictionary>" => value.as_dictionary().is_some(),
        "<any>" => true,
        _ => false,
    }
}

/// Checks `dict` against schema `keys` for `os`: returns every problem found, as sentences. `extra` names keys
/// allowed besides the schema's (such as `RequestType` in a command).
pub fn check(keys: &[serde_norway::Value], dict: &plist::Dictionary, os: &str, extra: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let any = keys.iter().find(|k| k["key"].as_str() == Some("ANY"));
    for item in keys {
        let name = item["key"].as_str().unwrap();
        if name == "ANY" {
            continue;
        }
        let kind = item["type"].as_str().unwrap();
        match dict.get(name) {
            None if item["presence"].as_str() == Some("required") && applies_to(item, os) => {
                problems.push(format!("required key {name} is missing"));
            }
            None => {}
            Some(value) if !type_matches(kind, value) => problems.push(format!("{name} is not {kind}: {value:?}")),
            Some(value) => {
                if let Some(range) = item["rangelist"].as_sequence() {
                    let allowed = range.iter().any(|r| match (r, value) {
                        (serde_norway::Value::String(s), v) => v.as_string() == Some(s.as_str()),
                        (serde_norway::Value::Number(n), v) => v.as_signed_integer() == n.as_i64(),
                        _ => true,
                    });
                    if !allowed && kind != "<array>" {
                        problems.push(format!("{name} = {value:?} is not one of {range:?}"));
                    }
                }
                if let Some(sub) = item["subkeys"].as_sequence() {
                    match value {
                        plist::Value::Dictionary(inner) => {
                            problems.extend(check(sub, inner, os, &[]).into_iter().map(|p| format!("{name}: {p}")))
                        }
                        plist::Value::Array(items) => {
                            let element = &sub[0];
                            for (index, element_value) in items.iter().enumerate() {
                                let element_kind = element["type"].as_str().unwrap();
                                if !type_matches(element_kind, element_value) {
                                    problems.push(format!("{name}[{index}] is not {element_kind}"));
                                }
                                if let (Some(inner_keys), plist::Value::Dictionary(inner)) =
                                    (element["subkeys"].as_sequence(), element_value)
                                {
                                    problems.extend(
                                        check(inner_keys, inner, os, &[])
                                            .into_iter()
                                            .map(|p| format!("{name}[{index}]: {p}")),
                                    );
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    for (name, value) in dict {
        let known = keys.iter().any(|k| k["key"].as_str() == Some(name.as_str())) || extra.contains(&name.as_str());
        match any {
            Some(any) if !known && !type_matches(any["type"].as_str().unwrap(), value) => {
                problems.push(format!("{name} does not match ANY"));
            }
            None if !known => problems.push(format!("{name} is not a key Apple's schema knows")),
            _ => {}
        }
    }
    problems
}
