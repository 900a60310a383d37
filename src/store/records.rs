//! The records the store keeps, as plain serde structs.

use serde::{Deserialize, Serialize};

/// A certificate the appliance's CA issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// Serial number in lower-case hex; also the record's key.
    pub serial: String,
    pub subject: String,
    /// Subject alternative names, DNS names and IP addresses as text.
    pub names: Vec<String>,
    /// Validity as Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub sha256: String,
    /// Why it was issued ("first start", "expires in 12 days", "addresses changed: +10.0.0.7").
    pub reason: String,
}
