//! The HTTPS identity: the rustls configuration (ring provider, TLS 1.2 and 1.3), a certificate that can be swapped
//! while connections stay up, and the [`CertificateKeeper`] that re-issues it when it nears expiry or the box's
//! addresses change (and renews the profile-signing certificate on the same checks).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;

use crate::addrs::{ADDRESS_POLL, AddressSource};
use crate::clock::Clock;
use crate::config::{Config, SubjectName, TlsSource};
use crate::naming::Naming;
use crate::pki::scep::DeviceCa;
use crate::pki::signing::ProfileSigner;
use crate::pki::{self, CertificateAuthority, PkiError, ServerCertificate};
use crate::store::{CertificateRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the certificate's key cannot be used by TLS: {0}")]
    Key(rustls::Error),
}

/// The certificate handed to every new TLS handshake; replacing it leaves established connections alone.
pub struct ServingCertificate {
    current: ArcSwap<CertifiedKey>,
    /// The same certificate with its key as PKCS#8, for signing enrollment profiles.
    source: ArcSwap<ServerCertificate>,
    /// The names the current certificate carries (DNS names and addresses as text), for the HTTPS redirect.
    names: ArcSwap<Vec<String>>,
}

impl fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServingCertificate")
    }
}

impl ServingCertificate {
    pub fn new(cert: &ServerCertificate) -> Result<Self, TlsError> {
        Ok(ServingCertificate {
            current: ArcSwap::from_pointee(certified_key(cert)?),
            source: ArcSwap::from_pointee(cert.clone()),
            names: ArcSwap::from_pointee(names_of(cert)),
        })
    }

    pub fn replace(&self, cert: &ServerCertificate) -> Result<(), TlsError> {
        self.current.store(Arc::new(certified_key(cert)?));
        self.source.store(Arc::new(cert.clone()));
        self.names.store(Arc::new(names_of(cert)));
        Ok(())
    }

    /// Whether `host` (a DNS name or an address, as in a Host header) is one the certificate carries.
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        self.names.load().contains(&host)
    }

    /// The certificate (chain and key) now being served.
    pub fn certificate(&self) -> Arc<ServerCertificate> {
        self.source.load_full()
    }

    /// The leaf certificate now being served.
    pub fn leaf(&self) -> Vec<u8> {
        self.current.load().cert.first().map(|der| der.to_vec()).unwrap_or_default()
    }
}

fn names_of(cert: &ServerCertificate) -> Vec<String> {
    cert.info.names.iter().map(|name| name.to_string().to_ascii_lowercase()).collect()
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert: &ServerCertificate) -> Result<CertifiedKey, TlsError> {
    let key = rustls::crypto::ring::sign::any_supported_type(&cert.private_key()).map_err(TlsError::Key)?;
    Ok(CertifiedKey::new(cert.chain.clone(), key))
}

/// A rustls server configuration on the ring provider, TLS 1.2 and 1.3, offering HTTP/2 and HTTP/1.1. With
/// `device_ca`, clients may present a certificate that CA issued (Windows devices authenticate their management
/// sessions so) once the CA is ready; a client without one is served as before, and what a certificate proves is
/// up to the route.
pub fn server_config(
    resolver: Arc<ServingCertificate>,
    device_ca: Option<DeviceCa>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Key)?;
    let builder = match device_ca {
        Some(device_ca) => builder.with_client_cert_verifier(Arc::new(DeviceCaVerifier::new(device_ca, provider))),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Asks clients for a certificate from the device-identity CA, and checks it, once that CA is ready: until then
/// (it is being made on a first start) the server asks for none. A certificate is never required.
#[derive(Debug)]
pub struct DeviceCaVerifier {
    device_ca: DeviceCa,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The WebPKI verifier for the CA, made the first time the CA is seen ready.
    inner: std::sync::OnceLock<Option<Arc<dyn ClientCertVerifier>>>,
}

impl DeviceCaVerifier {
    pub fn new(device_ca: DeviceCa, provider: Arc<rustls::crypto::CryptoProvider>) -> DeviceCaVerifier {
        DeviceCaVerifier { device_ca, provider, inner: std::sync::OnceLock::new() }
    }

    /// The verifier to delegate to, if the CA is ready (and its certificate makes one).
    fn inner(&self) -> Option<&Arc<dyn ClientCertVerifier>> {
        if let Some(inner) = self.inner.get() {
            return inner.as_ref();
        }
        let ca = self.device_ca.get()?;
        self.inner
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                let built = roots.add(ca.cert_der().clone()).map_err(|error| error.to_string()).and_then(|()| {
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|error| error.to_string())
                });
                match built {
                    Ok(verifier) => Some(verifier),
                    Err(error) => {
                        tracing::error!(%error, "client certificates from the device-identity CA cannot be checked; none are asked for");
                        None
                    }
                }
            })
            .as_ref()
    }

    fn not_ready() -> rustls::Error {
        rustls::Error::General("the device-identity CA is not ready".into())
    }
}

impl ClientCertVerifier for DeviceCaVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner().is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner().map_or(&[], |inner| inner.root_hint_subjects())
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner().ok_or_else(Self::not_ready)?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().ok_or_else(Self::not_ready)?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().ok_or_else(Self::not_ready)?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match self.inner() {
            Some(inner) => inner.supported_verify_schemes(),
            None => self.provider.signature_verification_algorithms.supported_schemes(),
        }
    }
}

/// What a check of the certificate did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    Unchanged,
    /// A new certificate is being served, for the reason given.
    Replaced(String),
}

/// Keeps the HTTPS certificate current: the self-issued one is re-issued by the appliance's CA when it is within
/// 30 days of expiry or when the names it should carry changed; an admin-supplied one is reloaded when its files
/// change on disk.
pub struct CertificateKeeper {
    mode: KeeperMode,
    serving: Arc<ServingCertificate>,
    clock: Arc<dyn Clock>,
    renewer: Renewer,
    /// The profile-signing certificate, renewed on the same checks whichever certificate serves HTTPS.
    profiles: ProfileSigning,
}

/// What renewing the profile-signing certificate takes.
struct ProfileSigning {
    signer: Arc<ProfileSigner>,
    ca: Arc<CertificateAuthority>,
    pki_dir: PathBuf,
    naming: Naming,
}

/// The admin's say over the HTTPS certificate, handed to the pages: a new self-issued certificate now (an admin's
/// "regenerate"), or the admin's own certificate in its place (and back). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Renewer {
    wanted: Arc<std::sync::atomic::AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    /// Where an uploaded certificate is kept; `None` when the configuration names the files (`tls_cert`).
    pki_dir: Option<PathBuf>,
}

impl Renewer {
    /// Whether the appliance manages the certificate (so it can issue a new one or take an upload); not when the
    /// configuration names the files.
    pub fn self_issued(&self) -> bool {
        self.pki_dir.is_some()
    }

    /// Whether the admin's own uploaded certificate is in use (in place of a self-issued one).
    pub fn own_in_use(&self) -> bool {
        self.pki_dir.as_deref().is_some_and(|dir| ServerCertificate::own_files(dir).is_some())
    }

    /// Checks the admin's certificate chain and key (they belong together, the leaf is valid at `now`, it is
    /// meant for servers) and keeps them to be served in place of self-issued certificates from within moments.
    pub fn install_own(
        &self,
        cert_pem: &[u8],
        key_pem: &[u8],
        now: time::OffsetDateTime,
    ) -> Result<pki::CertInfo, (pki::PemPart, String)> {
        let Some(dir) = &self.pki_dir else {
            return Err((
                pki::PemPart::Certificate,
                "the configuration names the certificate files (tls_cert, tls_key); replace those".into(),
            ));
        };
        let cert = ServerCertificate::from_pem(cert_pem, key_pem)?;
        if cert.info.not_after <= now || cert.info.not_before > now {
            return Err((
                pki::PemPart::Certificate,
                format!("it is valid from {} to {}, not now", cert.info.not_before.date(), cert.info.not_after.date()),
            ));
        }
        cert.save_own(dir).map_err(|e| (pki::PemPart::Certificate, e.to_string()))?;
        self.wake.notify_one();
        Ok(cert.info)
    }

    /// Stops using the admin's own certificate; the appliance's CA issues one again.
    pub fn remove_own(&self) -> Result<(), PkiError> {
        if let Some(dir) = &self.pki_dir {
            ServerCertificate::remove_own(dir)?;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Asks the keeper to check the certificate now rather than at its next tick (the clock jumped): it issues a
    /// new one only if the check finds a reason.
    pub fn check_now(&self) {
        self.wake.notify_one();
    }

    /// Asks for a new certificate; the keeper issues and serves it within moments.
    pub fn request(&self) {
        self.wanted.store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
    }
}

enum KeeperMode {
    SelfIssued(Box<SelfIssued>),
    Files { cert: PathBuf, key: PathBuf, loaded: Vec<u8> },
}

struct SelfIssued {
    ca: Arc<CertificateAuthority>,
    store: Store,
    addresses: Arc<dyn AddressSource>,
    pki_dir: PathBuf,
    /// The host name to issue for follows what an admin saves.
    naming: Naming,
    extra: Vec<SubjectName>,
    current: pki::CertInfo,
    /// The fingerprint of the admin's own files while they are served.
    own: Option<Vec<u8>>,
}

impl fmt::Debug for CertificateKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateKeeper").finish_non_exhaustive()
    }
}

impl CertificateKeeper {
    /// Loads or issues the certificate to serve at start-up.
    pub fn start(
        config: &Config,
        ca: Arc<CertificateAuthority>,
        store: Store,
        addresses: Arc<dyn AddressSource>,
        pki_dir: PathBuf,
        clock: Arc<dyn Clock>,
        naming: Naming,
    ) -> Result<Self, TlsError> {
        let profiles = ProfileSigning {
            signer: Arc::new(ProfileSigner::start(&ca, &pki_dir, &naming.hostname(), clock.now())?),
            ca: ca.clone(),
            pki_dir: pki_dir.clone(),
            naming: naming.clone(),
        };
        match &config.tls {
            TlsSource::Files { cert, key } => {
                let loaded = ServerCertificate::load_files(cert, key)?;
                warn_if_expiring(&loaded.info, clock.now());
                Ok(CertificateKeeper {
                    serving: Arc::new(ServingCertificate::new(&loaded)?),
                    mode: KeeperMode::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                        loaded: files_fingerprint(cert, key),
                    },
                    clock,
                    renewer: Renewer::default(),
                    profiles,
                })
            }
            TlsSource::SelfIssued => {
                let now = clock.now();
                let hostname = naming.hostname();
                ca.check_validity(now)?;
                let existing =
                    ServerCertificate::load_issued(&pki_dir)?.filter(|cert| cert.chain.get(1) == Some(ca.cert_der()));
                let named = addresses_to_name(addresses.as_ref(), existing.as_ref().map(|cert| &cert.info));
                let wanted = pki::wanted_names(&hostname, &config.extra_sans, &named);
                let own = load_own(&pki_dir);
                let own_fingerprint = own.as_ref().map(|(_, fingerprint)| fingerprint.clone());
                let cert = match (own, existing) {
                    (Some((own, _)), _) => own,
                    (None, Some(cert)) => match pki::reissue_reason(&cert.info, &wanted, ca.info().not_after, now) {
                        None => cert,
                        Some(reason) => issue(&ca, &store, &pki_dir, &hostname, &wanted, now, reason)?,
                    },
                    (None, None) => issue(&ca, &store, &pki_dir, &hostname, &wanted, now, "first start".into())?,
                };
                Ok(CertificateKeeper {
                    serving: Arc::new(ServingCertificate::new(&cert)?),
                    renewer: Renewer { pki_dir: Some(pki_dir.clone()), ..Renewer::default() },
                    mode: KeeperMode::SelfIssued(Box::new(SelfIssued {
                        ca,
                        store,
                        addresses,
                        pki_dir,
                        naming,
                        extra: config.extra_sans.clone(),
                        current: cert.info,
                        own: own_fingerprint,
                    })),
                    clock,
                    profiles,
                })
            }
        }
    }

    /// The resolver to hand to rustls; it follows every replacement this keeper makes.
    pub fn serving(&self) -> Arc<ServingCertificate> {
        self.serving.clone()
    }

    /// The handle that asks this keeper for a new certificate now.
    pub fn renewer(&self) -> Renewer {
        self.renewer.clone()
    }

    /// The signer of enrollment profiles, whose certificate this keeper renews.
    pub fn profile_signer(&self) -> Arc<ProfileSigner> {
        self.profiles.signer.clone()
    }

    /// Checks the certificate once and replaces it if needed (or if an admin asked for a new one); renews the
    /// profile-signing certificate if it is due (what happened to it is logged, not returned).
    pub fn check(&mut self) -> Result<CheckOutcome, TlsError> {
        let now = self.clock.now();
        let ProfileSigning { signer, ca, pki_dir, naming } = &self.profiles;
        match signer.renew_if_due(ca, pki_dir, &naming.hostname(), now) {
            Ok(None) => {}
            Ok(Some(reason)) => tracing::info!(%reason, "now signing profiles with a new certificate"),
            Err(error) => {
                tracing::error!(%error, "renewing the profile-signing certificate failed; keeping the current one")
            }
        }
        let asked = self.renewer.wanted.swap(false, std::sync::atomic::Ordering::SeqCst);
        match &mut self.mode {
            KeeperMode::SelfIssued(keep) => {
                let SelfIssued { ca, store, addresses, pki_dir, naming, extra, current, own } = keep.as_mut();
                let own_now = ServerCertificate::own_files(pki_dir).map(|(c, k)| files_fingerprint(&c, &k));
                match (&own_now, own.as_ref()) {
                    (Some(now_on_disk), Some(served)) if now_on_disk == served => return Ok(CheckOutcome::Unchanged),
                    (Some(now_on_disk), _) => match load_own(pki_dir) {
                        Some((cert, _)) => {
                            warn_if_expiring(&cert.info, now);
                            self.serving.replace(&cert)?;
                            *current = cert.info;
                            *own = Some(now_on_disk.clone());
                            return Ok(CheckOutcome::Replaced("the admin's own certificate".into()));
                        }
                        None if own.is_some() => return Ok(CheckOutcome::Unchanged),
                        None => {}
                    },
                    (None, _) => {}
                }
                let left_own = own.take().is_some();
                let hostname = naming.hostname();
                let wanted = pki::wanted_names(&hostname, extra, &addresses_to_name(addresses.as_ref(), Some(current)));
                let reason = left_own
                    .then(|| "the admin's own certificate was removed".to_owned())
                    .or_else(|| pki::reissue_reason(current, &wanted, ca.info().not_after, now))
                    .or_else(|| asked.then(|| "an admin asked for a new certificate".to_owned()));
                let Some(reason) = reason else {
                    return Ok(CheckOutcome::Unchanged);
                };
                let cert = issue(ca, store, pki_dir, &hostname, &wanted, now, reason.clone())?;
                self.serving.replace(&cert)?;
                *current = cert.info;
                Ok(CheckOutcome::Replaced(reason))
            }
            KeeperMode::Files { cert, key, loaded } => {
                let on_disk = files_fingerprint(cert, key);
                if on_disk == *loaded {
                    return Ok(CheckOutcome::Unchanged);
                }
                let fresh = ServerCertificate::load_files(cert, key)?;
                self.serving.replace(&fresh)?;
                *loaded = on_disk;
                warn_if_expiring(&fresh.info, now);
                Ok(CheckOutcome::Replaced(format!("{} changed on disk", cert.display())))
            }
        }
    }

    /// Checks every `interval`, at once when the box is renamed, asked to, or its addresses change (looked at every
    /// [`ADDRESS_POLL`]), until `shutdown`; a failed check is logged and tried again next time.
    pub async fn run(mut self, interval: std::time::Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let wake = self.renewer.wake.clone();
        let (mut names, addresses) = match &self.mode {
            KeeperMode::SelfIssued(keep) => (Some(keep.naming.subscribe()), Some(keep.addresses.clone())),
            KeeperMode::Files { .. } => (None, None),
        };
        // Nothing seen yet: the first look checks the certificate, since the addresses may have changed between
        // issuing it at start and this loop (a DHCP lease arriving while enrolld starts).
        let mut seen = None;
        let mut address_poll = tokio::time::interval(ADDRESS_POLL);
        address_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let renamed = async {
                match names.as_mut() {
                    Some(names) => names.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let due = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => true,
                () = wake.notified() => true,
                true = renamed => true,
                _ = address_poll.tick(), if addresses.is_some() => {
                    let now = addresses.as_ref().map(|source| source.addresses());
                    std::mem::replace(&mut seen, now.clone()) != now
                }
            };
            if !due {
                continue;
            }
            // Key generation and fsyncs are blocking work: keep them off the async workers.
            let (keeper, outcome) = match tokio::task::spawn_blocking(move || {
                let outcome = self.check();
                (self, outcome)
            })
            .await
            {
                Ok(done) => done,
                Err(error) => {
                    tracing::error!(%error, "the TLS certificate check panicked; no more checks until restart");
                    return;
                }
            };
            self = keeper;
            match outcome {
                Ok(CheckOutcome::Unchanged) => {}
                Ok(CheckOutcome::Replaced(reason)) => {
                    tracing::info!(%reason, "now serving a new TLS certificate")
                }
                Err(error) => {
                    tracing::error!(%error, "checking the TLS certificate failed; keeping the current one")
                }
            }
        }
    }
}

/// The addresses a certificate should name: the box's own, or, while it has none at all, the ones `current` names.
/// At a boot before the DHCP lease the box has no usable address for a few seconds; dropping the addresses from the
/// certificate then would only issue another one moments later, when the lease (usually the same address) comes.
fn addresses_to_name(source: &dyn AddressSource, current: Option<&pki::CertInfo>) -> Vec<std::net::IpAddr> {
    let now = source.addresses();
    match current {
        Some(current) if now.is_empty() => crate::addrs::usable(current.names.iter().filter_map(|name| match name {
            SubjectName::Ip(ip) => Some(*ip),
            SubjectName::Dns(_) => None,
        })),
        _ => now,
    }
}

fn issue(
    ca: &CertificateAuthority,
    store: &Store,
    pki_dir: &std::path::Path,
    hostname: &str,
    wanted: &std::collections::BTreeSet<SubjectName>,
    now: time::OffsetDateTime,
    reason: String,
) -> Result<ServerCertificate, TlsError> {
    let cert = ca.issue_server(&format!("{hostname}.local"), wanted, now)?;
    cert.save_issued(pki_dir)?;
    store.record_server_certificate(&CertificateRecord {
        serial: cert.info.serial.clone(),
        subject: cert.info.subject.clone(),
        names: cert.info.names.iter().map(ToString::to_string).collect(),
        not_before: cert.info.not_before.unix_timestamp(),
        not_after: cert.info.not_after.unix_timestamp(),
        sha256: cert.info.sha256.clone(),
        reason: reason.clone(),
    })?;
    tracing::info!(serial = %cert.info.serial, %reason, not_after = %cert.info.not_after.date(), "issued TLS certificate");
    Ok(cert)
}

/// The admin's own certificate, if one was uploaded and still loads (a broken pair is logged and left out).
fn load_own(pki_dir: &std::path::Path) -> Option<(ServerCertificate, Vec<u8>)> {
    let (cert, key) = ServerCertificate::own_files(pki_dir)?;
    match ServerCertificate::load_files(&cert, &key) {
        Ok(loaded) => Some((loaded, files_fingerprint(&cert, &key))),
        Err(error) => {
            tracing::error!(%error, "the uploaded HTTPS certificate cannot be used; serving a self-issued one");
            None
        }
    }
}

fn files_fingerprint(cert: &std::path::Path, key: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(cert).unwrap_or_default();
    bytes.extend(std::fs::read(key).unwrap_or_default());
    ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().to_vec()
}

fn warn_if_expiring(info: &pki::CertInfo, now: time::OffsetDateTime) {
    if now + pki::RENEW_BEFORE >= info.not_after {
        tracing::warn!(not_after = %info.not_after, "the TLS certificate you supplied expires within 30 days; replace its files (enrolld reloads them by itself)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addrs::StaticAddresses;
    use crate::clock::ManualClock;
    use crate::config::{ConfigArgs, Layers};
    use time::{Duration, OffsetDateTime};

    struct Fixture {
        dir: tempfile::TempDir,
        clock: ManualClock,
        addresses: StaticAddresses,
        store: Store,
        keeper: CertificateKeeper,
        ca_der: Vec<u8>,
        naming: Naming,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap());
        let addresses = StaticAddresses::new(["192.168.1.20".parse().unwrap()]);
        let store = Store::open_temporary().unwrap();
        let naming = Naming::fixed();
        let (keeper, ca_der) = start_keeper(&dir, &store, &addresses, &clock, &naming);
        Fixture { dir, clock, addresses, store, keeper, ca_der, naming }
    }

    /// The same box started again: its state directory, store, addresses and clock, a new keeper.
    fn restarted(f: Fixture) -> Fixture {
        let (keeper, _) = start_keeper(&f.dir, &f.store, &f.addresses, &f.clock, &f.naming);
        Fixture { keeper, ..f }
    }

    /// A keeper on the defaults, with the CA in `dir` (made if missing), and that CA's certificate.
    fn start_keeper(
        dir: &tempfile::TempDir,
        store: &Store,
        addresses: &StaticAddresses,
        clock: &ManualClock,
        naming: &Naming,
    ) -> (CertificateKeeper, Vec<u8>) {
        let config = Layers::gather(&ConfigArgs::default(), Vec::new()).unwrap().resolve(None).unwrap();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", clock.now()).unwrap();
        let ca_der = ca.cert_der().to_vec();
        let keeper = CertificateKeeper::start(
            &config,
            Arc::new(ca),
            store.clone(),
            Arc::new(addresses.clone()),
            dir.path().to_owned(),
            Arc::new(clock.clone()),
            naming.clone(),
        )
        .unwrap();
        (keeper, ca_der)
    }

    fn served_names(keeper: &CertificateKeeper) -> Vec<String> {
        served_names_of(&keeper.serving())
    }

    #[test]
    fn nothing_changes_while_the_certificate_is_good() {
        let mut f = fixture();
        let before = f.keeper.serving().leaf();
        f.clock.advance(Duration::days(300));
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged);
        assert_eq!(f.keeper.serving().leaf(), before);
        assert_eq!(f.store.issued_certificates().unwrap().len(), 1);
    }

    #[test]
    fn renewed_thirty_days_before_expiry_by_the_same_ca() {
        let mut f = fixture();
        let before = pki::parse_certificate(&f.keeper.serving().leaf()).unwrap();
        let signer = f.keeper.profile_signer();
        let signing_before = signer.info();
        f.clock.advance(Duration::days(368));
        let CheckOutcome::Replaced(reason) = f.keeper.check().unwrap() else { panic!("not renewed") };
        // The profile-signing certificate too, on the same check, by the same CA.
        assert_ne!(signer.info().serial, signing_before.serial);
        assert!(signer.info().not_after > signing_before.not_after);
        assert!(signer.info().subject.contains("profile signing"), "{}", signer.info().subject);
        assert!(reason.starts_with("it expires on"), "{reason}");
        let after = pki::parse_certificate(&f.keeper.serving().leaf()).unwrap();
        assert_ne!(after.serial, before.serial);
        let chain = f.keeper.serving().current.load().cert.clone();
        assert_eq!(chain[1].as_ref(), f.ca_der.as_slice(), "the chain still ends in the same CA");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&f.ca_der).unwrap();
        assert_eq!(leaf.issuer(), ca.subject());
        assert!(leaf.verify_signature(Some(ca.public_key())).is_ok(), "signed by the same CA key");
        assert!(after.not_after > before.not_after);
        let issuers: Vec<_> = f.store.issued_certificates().unwrap();
        assert_eq!(issuers.len(), 2);
        assert_eq!(f.store.current_server_certificate().unwrap().unwrap().serial, after.serial);
    }

    #[test]
    fn reissued_when_the_address_changes() {
        let mut f = fixture();
        assert!(served_names(&f.keeper).contains(&"192.168.1.20".to_owned()));
        f.addresses.set(["192.168.1.77".parse().unwrap(), "fe80::1".parse().unwrap()]);
        let outcome = f.keeper.check().unwrap();
        assert_eq!(outcome, CheckOutcome::Replaced("names changed: +192.168.1.77 -192.168.1.20".into()));
        let names = served_names(&f.keeper);
        assert!(names.contains(&"192.168.1.77".to_owned()) && !names.contains(&"192.168.1.20".to_owned()));
        assert!(names.contains(&"enroll.local".to_owned()) && names.contains(&"::1".to_owned()));
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged, "stable once reissued");
    }

    #[test]
    fn a_boot_before_the_lease_keeps_the_certificate_and_the_lease_replaces_it_once() {
        let mut f = fixture();
        let first = f.keeper.serving().leaf();
        // No usable address for a while (the network is not up yet): nothing to issue, at a check or a start.
        f.addresses.set([]);
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged);
        let f = restarted(f);
        assert_eq!(f.keeper.serving().leaf(), first, "the same certificate after a start without addresses");
        // The lease, on another network this time: one new certificate, without the old address.
        let mut f = f;
        f.addresses.set(["10.0.2.15".parse().unwrap()]);
        let outcome = f.keeper.check().unwrap();
        assert_eq!(outcome, CheckOutcome::Replaced("names changed: +10.0.2.15 -192.168.1.20".into()));
        assert_eq!(f.store.issued_certificates().unwrap().len(), 2, "issued at first start and for the lease only");
    }

    #[tokio::test]
    async fn a_new_address_is_in_the_certificate_within_moments_not_at_the_next_check() {
        let f = fixture();
        let serving = f.keeper.serving();
        let token = CancellationToken::new();
        let running = tokio::spawn(f.keeper.run(std::time::Duration::from_secs(3_600), token.clone()));
        tokio::time::sleep(ADDRESS_POLL + std::time::Duration::from_millis(300)).await;
        assert!(!served_names_of(&serving).contains(&"10.0.2.15".to_owned()));
        // The DHCP lease arrives after enrolld is ready.
        f.addresses.set(["192.168.1.20".parse().unwrap(), "10.0.2.15".parse().unwrap()]);
        named_within_moments(&serving, "10.0.2.15").await;
        token.cancel();
        running.await.unwrap();
    }

    #[tokio::test]
    async fn an_address_that_came_while_enrolld_started_is_in_the_certificate() {
        let f = fixture();
        let serving = f.keeper.serving();
        // Issued at start without it; the lease arrives before the keeper's loop runs.
        f.addresses.set(["192.168.1.20".parse().unwrap(), "10.0.2.15".parse().unwrap()]);
        let token = CancellationToken::new();
        let running = tokio::spawn(f.keeper.run(std::time::Duration::from_secs(3_600), token.clone()));
        named_within_moments(&serving, "10.0.2.15").await;
        token.cancel();
        running.await.unwrap();
    }

    /// Waits for the served certificate to name `name`, failing after five looks at the addresses.
    async fn named_within_moments(serving: &ServingCertificate, name: &str) {
        let deadline = std::time::Instant::now() + ADDRESS_POLL * 5;
        while !served_names_of(serving).iter().any(|named| named == name) {
            assert!(std::time::Instant::now() < deadline, "{name} is not in the certificate");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn served_names_of(serving: &ServingCertificate) -> Vec<String> {
        let info = pki::parse_certificate(&serving.leaf()).unwrap();
        info.names.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn reissued_when_an_admin_renames_the_box() {
        let mut f = fixture();
        f.naming.set(crate::naming::Names::checked("", "front-desk").unwrap());
        let outcome = f.keeper.check().unwrap();
        assert_eq!(
            outcome,
            CheckOutcome::Replaced("names changed: +front-desk +front-desk.local -enroll -enroll.local".into())
        );
        let info = pki::parse_certificate(&f.keeper.serving().leaf()).unwrap();
        assert!(info.subject.contains("front-desk.local"), "{}", info.subject);
        assert!(served_names(&f.keeper).contains(&"front-desk.local".to_owned()));
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged);
    }

    #[tokio::test]
    async fn a_check_now_runs_the_check_at_once_without_forcing_a_new_certificate() {
        let f = fixture();
        let (renewer, serving) = (f.keeper.renewer(), f.keeper.serving());
        let before = serving.leaf();
        let token = CancellationToken::new();
        let running = tokio::spawn(f.keeper.run(std::time::Duration::from_secs(3_600), token.clone()));
        renewer.check_now();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(serving.leaf(), before, "nothing due: the same certificate");
        // The clock jumped to within 30 days of expiry: told so, the keeper renews now, not at its next hourly tick.
        f.clock.advance(Duration::days(368));
        renewer.check_now();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while serving.leaf() == before {
            assert!(std::time::Instant::now() < deadline, "not renewed after check_now");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        token.cancel();
        running.await.unwrap();
    }

    #[test]
    fn reissued_when_an_admin_asks_and_only_then() {
        let mut f = fixture();
        let renewer = f.keeper.renewer();
        assert!(renewer.self_issued());
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged);
        let before = pki::parse_certificate(&f.keeper.serving().leaf()).unwrap();
        renewer.request();
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Replaced("an admin asked for a new certificate".into()));
        assert_ne!(pki::parse_certificate(&f.keeper.serving().leaf()).unwrap().serial, before.serial);
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged, "one request, one certificate");
    }

    #[test]
    fn the_admins_own_certificate_is_served_until_removed() {
        let mut f = fixture();
        let renewer = f.keeper.renewer();
        let other = tempfile::tempdir().unwrap();
        let (their_ca, _) = CertificateAuthority::load_or_create(other.path(), "corp", f.clock.now()).unwrap();
        let names = std::collections::BTreeSet::from([SubjectName::Dns("enroll.example.com".into())]);
        let theirs = their_ca.issue_server("enroll.example.com", &names, f.clock.now()).unwrap();
        theirs.save_issued(other.path()).unwrap();
        let read = |name: &str| std::fs::read(other.path().join(name)).unwrap();
        let (cert_pem, key_pem) = (read("server.crt"), read("server.key"));

        let wrong_key = std::fs::read(f.dir.path().join("server.key")).unwrap();
        let refused = renewer.install_own(&cert_pem, &wrong_key, f.clock.now()).unwrap_err();
        assert_eq!(refused.0, pki::PemPart::Key, "{refused:?}");
        let late = f.clock.now() + time::Duration::days(400);
        assert!(renewer.install_own(&cert_pem, &key_pem, late).unwrap_err().1.contains("not now"));
        assert!(!renewer.own_in_use(), "nothing refused is kept");

        let info = renewer.install_own(&cert_pem, &key_pem, f.clock.now()).unwrap();
        assert!(renewer.own_in_use());
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Replaced("the admin's own certificate".into()));
        assert_eq!(pki::parse_certificate(&f.keeper.serving().leaf()).unwrap().serial, info.serial);
        f.naming.set(crate::naming::Names::checked("", "front-desk").unwrap());
        assert_eq!(f.keeper.check().unwrap(), CheckOutcome::Unchanged, "a rename does not replace the admin's own");

        renewer.remove_own().unwrap();
        let outcome = f.keeper.check().unwrap();
        assert_eq!(outcome, CheckOutcome::Replaced("the admin's own certificate was removed".into()));
        let served = f.keeper.serving().certificate();
        assert_eq!(served.chain[1].as_ref(), f.ca_der.as_slice(), "the appliance's CA issues again");
        assert!(served_names(&f.keeper).contains(&"front-desk.local".to_owned()));
    }
}
