//! Apple Push Notification service for MDM: the HTTP/2 client that wakes a device when a command waits for it.
//!
//! Apple documents the request ("Sending notification requests to APNs"): `POST /3/device/<token hex>` over
//! HTTP/2 and TLS, authenticated by the MDM push certificate as the TLS client certificate, with `apns-topic` the
//! certificate's Topic, `apns-push-type: mdm`, and the JSON body `{"mdm":"<PushMagic>"}`. A 200 means accepted;
//! otherwise the JSON body names a `reason` (`BadDeviceToken`, `Unregistered`, `BadCertificate`, …). One HTTP/2
//! connection is kept open per push certificate and reused, as Apple asks.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::config::ApnsConfig;
use crate::domain::StoredPushCertificate;
use crate::model::ApplePush;

/// How long connecting and one push may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The push service refused this push; `reason` is Apple's word for why (`BadDeviceToken`, …).
    #[error("the push service refused the push ({status}: {reason})")]
    Refused { status: u16, reason: String },
    #[error("the push service cannot be reached: {0}")]
    Unreachable(String),
    #[error("the push certificate cannot be used: {0}")]
    Certificate(String),
}

impl PushError {
    /// What the admin should do about it, in a sentence for the device's record.
    pub fn advice(&self) -> String {
        match self {
            PushError::Refused { reason, .. } if reason == "BadDeviceToken" || reason == "Unregistered" => format!(
                "{self}: the device no longer listens for this appliance's pushes (the management profile was removed, or the device was erased); enroll it again"
            ),
            PushError::Refused { reason, .. }
                if reason.contains("Certificate") || reason == "Forbidden" || reason == "TopicDisallowed" =>
            {
                format!(
                    "{self}: renew the MDM push certificate in Apple's Push Certificates Portal and upload it again"
                )
            }
            other => format!("{other}; the command waits and goes out at the device's next check-in"),
        }
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// The push client: one per daemon, a cheap handle.
#[derive(Clone)]
pub struct Pusher {
    config: ApnsConfig,
    extra_roots: Arc<Vec<CertificateDer<'static>>>,
    /// The open connection and the fingerprint of the certificate it was made with.
    connection: Arc<Mutex<Option<(String, Sender)>>>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher").field("url", &self.config.url).finish_non_exhaustive()
    }
}

impl Pusher {
    pub fn new(config: &ApnsConfig) -> Result<Pusher, PushError> {
        let extra_roots = match &config.ca_file {
            Some(path) => CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| PushError::Certificate(format!("apns_ca_file {}: {e}", path.display())))?,
            None => Vec::new(),
        };
        Ok(Pusher { config: config.clone(), extra_roots: Arc::new(extra_roots), connection: Arc::default() })
    }

    /// Sends the MDM push to one device.
    pub async fn push(&self, certificate: &StoredPushCertificate, device: &ApplePush) -> Result<(), PushError> {
        match tokio::time::timeout(PUSH_TIMEOUT, self.send(certificate, device)).await {
            Ok(result) => result,
            Err(_) => {
                *self.connection.lock().await = None;
                Err(PushError::Unreachable(format!("no answer within {} s", PUSH_TIMEOUT.as_secs())))
            }
        }
    }

    async fn send(&self, certificate: &StoredPushCertificate, device: &ApplePush) -> Result<(), PushError> {
        let body = serde_json::json!({ "mdm": device.push_magic }).to_string();
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/3/device/{}", self.config.url, device.token))
            // The certificate's Topic: the one APNs authorises this connection for (the device enrolled with it).
            .header("apns-topic", &certificate.topic)
            .header("apns-push-type", "mdm")
            .header("apns-priority", "10")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PushError::Refused { status: 0, reason: format!("the request cannot be built: {e}") })?;
        let mut slot = self.connection.lock().await;
        let reusable = slot.as_ref().filter(|(sha, sender)| *sha == certificate.sha256 && !sender.is_closed());
        let mut sender = match reusable {
            Some((_, sender)) => sender.clone(),
            None => {
                let sender = self.connect(certificate).await?;
                *slot = Some((certificate.sha256.clone(), sender.clone()));
                sender
            }
        };
        drop(slot);
        sender.ready().await.map_err(|e| PushError::Unreachable(e.to_string()))?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                *self.connection.lock().await = None;
                return Err(PushError::Unreachable(error.to_string()));
            }
        };
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(());
        }
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let reason = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("no reason given").to_owned());
        Err(PushError::Refused { status: status.as_u16(), reason })
    }

    async fn connect(&self, certificate: &StoredPushCertificate) -> Result<Sender, PushError> {
        let chain = CertificateDer::pem_slice_iter(certificate.certificate_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PushError::Certificate(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(certificate.private_key_pem.as_bytes())
            .map_err(|e| PushError::Certificate(e.to_string()))?;
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for extra in self.extra_roots.iter() {
            roots.add(extra.clone()).map_err(|e| PushError::Certificate(format!("apns_ca_file: {e}")))?;
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| PushError::Certificate(e.to_string()))?
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .map_err(|e| PushError::Certificate(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let uri: axum::http::Uri =
            self.config.url.parse().map_err(|e| PushError::Unreachable(format!("apns_url: {e}")))?;
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let name = ServerName::try_from(host.to_owned()).map_err(|e| PushError::Unreachable(format!("{host}: {e}")))?;
        let stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| PushError::Unreachable(format!("cannot connect to {host}:{port}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| PushError::Unreachable(format!("TLS with {host} failed: {e}")))?;
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| PushError::Unreachable(format!("HTTP/2 with {host} failed: {e}")))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "the push connection closed");
            }
        });
        Ok(sender)
    }
}
