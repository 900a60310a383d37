//! The Apple MDM push certificate: kept with who uploaded it, and never replaced by one with another Topic, since
//! every enrolled Apple device listens on the Topic it enrolled with.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Actor, DomainError, DomainResult, Enrollment};
use crate::model::Setting;
use crate::pki::push::PushCertificate;

const PUSH_SETTING: &str = "apple.push_certificate";

/// The push certificate as stored: what was read from it, the PEM files, and who uploaded it when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPushCertificate {
    pub topic: String,
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub sha256: String,
    pub certificate_pem: String,
    pub private_key_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub uploaded_at: OffsetDateTime,
    pub uploaded_by: String,
}

impl Enrollment {
    /// The push certificate in use, if one was uploaded.
    pub fn push_certificate(&self) -> DomainResult<Option<StoredPushCertificate>> {
        match self.store.get::<Setting>(PUSH_SETTING.as_bytes())? {
            Some(setting) => serde_json::from_str(&setting.value).map(Some).map_err(|e| {
                DomainError::invalid(
                    "push_certificate",
                    format!("the stored push certificate cannot be read ({e}); upload it again"),
                )
            }),
            None => Ok(None),
        }
    }

    /// Stores a checked push certificate. A renewal must keep the Topic: a certificate with another one would cut
    /// off every enrolled Apple device, so it is refused.
    pub fn save_push_certificate(
        &self,
        actor: &Actor,
        push: &PushCertificate,
        certificate_pem: &str,
        private_key_pem: &str,
    ) -> DomainResult<StoredPushCertificate> {
        let stored = StoredPushCertificate {
            topic: push.topic.clone(),
            subject: push.subject.clone(),
            not_before: push.not_before,
            not_after: push.not_after,
            sha256: push.sha256.clone(),
            certificate_pem: certificate_pem.to_owned(),
            private_key_pem: private_key_pem.to_owned(),
            uploaded_at: self.now(),
            uploaded_by: actor.name.clone(),
        };
        let value =
            serde_json::to_string(&stored).map_err(|e| DomainError::invalid("push_certificate", e.to_string()))?;
        let setting = Setting {
            name: PUSH_SETTING.into(),
            value,
            updated_at: stored.uploaded_at,
            updated_by: actor.name.clone(),
        };
        self.transact(|tx| {
            let old = tx.get::<Setting, _>(PUSH_SETTING.as_bytes())?;
            if let Some(old) = &old
                && let Ok(previous) = serde_json::from_str::<StoredPushCertificate>(&old.value)
                && previous.topic != stored.topic
            {
                return Err(DomainError::conflict(
                    "push_topic_changed",
                    format!(
                        "this certificate's Topic is {}, but the one in use is {}: devices enrolled with the old Topic would no longer receive commands. Renew the existing certificate in Apple's Push Certificates Portal (with the same Apple ID) instead of creating a new one",
                        stored.topic, previous.topic
                    ),
                )
                .into());
            }
            tx.put(old.as_ref(), &setting)?;
            let detail = format!("Topic {}, valid until {}, SHA-256 {}", stored.topic, stored.not_after.date(), stored.sha256);
            self.audit(tx, actor, "apple.push_certificate", None, detail)
        })?;
        Ok(stored)
    }
}
