//! mDNS announcement: `<hostname>.local` and the `_https._tcp` and `_enrolld._tcp` services on every interface,
//! following address changes and renames, with goodbye packets on shutdown.

use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceInfo, UnregisterStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::naming::Names;

/// How long to wait for each goodbye to be sent on shutdown.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("mDNS announcement failed: {0}; the box will not be found as .local (check that a LAN interface is up)")]
pub struct MdnsError(#[from] mdns_sd::Error);

/// What to announce.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub hostname: String,
    /// The port of the web interface and whether it speaks HTTPS.
    pub port: u16,
    pub https: bool,
    /// SHA-256 of the appliance's CA certificate, so a client can check the CA it downloads.
    pub ca_sha256: String,
}

/// The running announcement. mdns-sd answers queries and re-announces on its own thread.
pub struct Announcer {
    daemon: ServiceDaemon,
    fullnames: Vec<String>,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer").field("services", &self.fullnames).finish_non_exhaustive()
    }
}

impl Announcer {
    pub fn start(what: &Announcement) -> Result<Announcer, MdnsError> {
        let daemon = ServiceDaemon::new()?;
        let host = format!("{}.local.", what.hostname);
        let instance = format!("enrolld on {}", what.hostname);
        let web_type = if what.https { "_https._tcp.local." } else { "_http._tcp.local." };
        let version = env!("CARGO_PKG_VERSION");
        let services = [
            ServiceInfo::new(web_type, &instance, &host, (), what.port, [("path", "/")].as_slice())?,
            ServiceInfo::new(
                "_enrolld._tcp.local.",
                &instance,
                &host,
                (),
                what.port,
                [("path", "/"), ("ca", "/ca.crt"), ("ca_sha256", what.ca_sha256.as_str()), ("version", version)]
                    .as_slice(),
            )?,
        ];
        let mut fullnames = Vec::new();
        for service in services {
            let service = service.enable_addr_auto();
            fullnames.push(service.get_fullname().to_owned());
            daemon.register(service)?;
        }
        tracing::info!(host = %host, services = ?fullnames, "announcing over mDNS");
        Ok(Announcer { daemon, fullnames })
    }

    /// Withdraws every service (goodbye packets) and stops the responder.
    pub fn stop(self) {
        for fullname in &self.fullnames {
            match self.daemon.unregister(fullname) {
                Ok(receiver) => match receiver.recv_timeout(GOODBYE_WAIT) {
                    Ok(UnregisterStatus::OK) => tracing::debug!(%fullname, "mDNS goodbye sent"),
                    Ok(status) => tracing::warn!(%fullname, ?status, "mDNS withdrawal"),
                    Err(error) => {
                        tracing::warn!(%fullname, %error, "no confirmation of the mDNS goodbye")
                    }
                },
                Err(error) => tracing::warn!(%fullname, %error, "mDNS withdrawal failed"),
            }
        }
        if let Ok(receiver) = self.daemon.shutdown() {
            let _ = receiver.recv_timeout(GOODBYE_WAIT);
        }
    }
}

/// Announces `what` until `shutdown`, and again under the new name whenever an admin renames the box (goodbyes for
/// the old one first). A failed announcement is logged; the next rename tries again.
pub async fn run(mut what: Announcement, mut names: watch::Receiver<Names>, shutdown: CancellationToken) {
    let mut current = start_logged(what.clone()).await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = names.changed() => {
                if changed.is_err() {
                    shutdown.cancelled().await;
                    break;
                }
                let hostname = names.borrow_and_update().hostname.clone();
                if hostname == what.hostname {
                    continue;
                }
                tracing::info!(from = %what.hostname, to = %hostname, "announcing the new host name");
                what.hostname = hostname;
                if let Some(old) = current.take() {
                    tokio::task::spawn_blocking(move || old.stop()).await.ok();
                }
                current = start_logged(what.clone()).await;
            }
        }
    }
    if let Some(announcer) = current {
        tokio::task::spawn_blocking(move || announcer.stop()).await.ok();
    }
}

async fn start_logged(what: Announcement) -> Option<Announcer> {
    match tokio::task::spawn_blocking(move || Announcer::start(&what)).await {
        Ok(Ok(announcer)) => Some(announcer),
        Ok(Err(error)) => {
            tracing::warn!(%error);
            None
        }
        Err(_) => None,
    }
}
