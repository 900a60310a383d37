//! The accept loop: TCP (and TLS) connections handed to hyper, each request tagged with the client address; the
//! bounds on connections (how many are open, in all and per client address, and how long one may sit in its TLS
//! handshake, its request header or idle); and a graceful stop that lets in-flight requests finish within a bound.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub use crate::config::ConnectionLimits;

/// A connection asked to close (idle, or at shutdown) that has not closed after this long with no request in
/// flight is dropped: an HTTP/2 client that never answers the closing ping must not keep its slot.
const CLOSE_BOUND: Duration = Duration::from_secs(1);
/// When every slot is taken and no connection is idle, a new connection waits this long for one to end, then is
/// closed.
const ADMIT_WAIT: Duration = Duration::from_millis(500);
/// An HTTP/2 request body left unread when its answer is sent (a 413, a refusal) is read and thrown away up to this
/// much, so the client, still sending, sees the answer instead of a reset stream.
const DRAIN_BYTES: usize = 32 << 20;
/// ... and for at most this long.
const DRAIN_TIME: Duration = Duration::from_secs(30);
/// At most one warning this often that the connection cap is reached.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The certificate the client presented in the TLS handshake (DER), verified against the device CA; put in each
/// request's extensions.
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub Arc<[u8]>);

/// The connections every listener shares: the slots (a semaphore of `max_connections`), the count per client
/// address, and the idle connections in the order they went idle, the longest idle closed first when a new
/// connection finds every slot taken (as nginx reuses its keep-alive connections).
#[derive(Clone, Debug)]
pub struct Connections {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Connections with no request in flight (those in their TLS handshake too), by when they went idle; cancelling
    /// the token closes the connection.
    idle: Mutex<BTreeMap<(Instant, u64), CancellationToken>>,
    next_id: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Connections {
        let limits = ConnectionLimits {
            max_connections: limits.max_connections.max(1),
            max_per_address: limits.max_per_address.max(1),
            ..limits
        };
        Connections {
            inner: Arc::new(Shared {
                limits,
                slots: Arc::new(Semaphore::new(limits.max_connections)),
                per_address: Mutex::new(HashMap::new()),
                idle: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(0),
                last_warning: Mutex::new(None),
            }),
        }
    }

    pub fn limits(&self) -> ConnectionLimits {
        self.inner.limits
    }

    /// A slot for a new connection: a free one, or the one the longest idle connection gives up; failing both,
    /// whichever frees first within [`ADMIT_WAIT`]; `None` if none does.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.inner.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        self.warn_full();
        let oldest = self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner).pop_first();
        if let Some((_, close)) = oldest {
            close.cancel();
        }
        tokio::time::timeout(ADMIT_WAIT, self.inner.slots.clone().acquire_owned()).await.ok()?.ok()
    }

    /// Warns that the slots are used up, at most once every [`WARN_EVERY`].
    fn warn_full(&self) {
        let mut last = self.inner.last_warning.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                max_connections = self.inner.limits.max_connections,
                "every connection slot is in use; the longest idle connections are closed for new ones"
            );
        }
    }

    /// Counts a connection from `peer` against its address's share, or `None` when that share is used up.
    fn admit(&self, peer: IpAddr) -> Option<AddressShare> {
        let key = crate::addrs::client_network(peer);
        let mut counts = self.inner.per_address.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key).or_insert(0);
        if *count >= self.inner.limits.max_per_address {
            return None;
        }
        *count += 1;
        Some(AddressShare { shared: self.inner.clone(), key })
    }

    /// A new connection's activity, idle (and so first in line to close) until its first request.
    fn track(&self) -> Arc<Tracker> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let close = CancellationToken::new();
        self.inner.idle.lock().unwrap_or_else(PoisonError::into_inner).insert((now, id), close.clone());
        let (activity, _) = watch::channel(Activity { requests: 0, idle_since: now });
        Arc::new(Tracker { shared: self.inner.clone(), id, close, activity })
    }
}

/// One connection's place in its address's count, given back when the connection ends.
struct AddressShare {
    shared: Arc<Shared>,
    key: IpAddr,
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        let mut counts = self.shared.per_address.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What a connection is doing: how many requests are in flight, and since when none has been.
#[derive(Clone, Copy, Debug)]
struct Activity {
    requests: usize,
    idle_since: Instant,
}

/// One connection's activity, kept in the shared list of idle connections while it has no request in flight;
/// `close` is cancelled when it is picked to make room.
struct Tracker {
    shared: Arc<Shared>,
    id: u64,
    close: CancellationToken,
    activity: watch::Sender<Activity>,
}

impl Tracker {
    fn request_started(&self) {
        self.activity.send_modify(|now| {
            if now.requests == 0 {
                self.shared.idle.lock().unwrap_or_else(PoisonError::into_inner).remove(&(now.idle_since, self.id));
            }
            now.requests += 1;
        });
    }

    fn request_ended(&self) {
        self.activity.send_modify(|now| {
            now.requests = now.requests.saturating_sub(1);
            if now.requests == 0 && !self.close.is_cancelled() {
                now.idle_since = Instant::now();
                let mut idle = self.shared.idle.lock().unwrap_or_else(PoisonError::into_inner);
                idle.insert((now.idle_since, self.id), self.close.clone());
            }
        });
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let now = *self.activity.borrow();
        self.shared.idle.lock().unwrap_or_else(PoisonError::into_inner).remove(&(now.idle_since, self.id));
    }
}

/// A request in flight on a connection, from its header to the end of its answer.
struct InFlight(Arc<Tracker>);

impl InFlight {
    fn start(tracker: &Arc<Tracker>) -> InFlight {
        tracker.request_started();
        InFlight(tracker.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The HTTP settings every connection is served with.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(limits: &ConnectionLimits) -> Protocols {
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .max_concurrent_streams(100);
        Protocols { http1, http2 }
    }
}

/// Serves `app` on `listener` until `shutdown`, then waits up to `grace` for open requests to finish. TLS
/// connections speak the protocol ALPN chose (HTTP/2 or HTTP/1.1); plain ones HTTP/1.1.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shutdown: CancellationToken,
    grace: Duration,
    connections: Connections,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let protocols = Arc::new(Protocols::new(&connections.limits()));
    // Every connection task, so none outlives `serve` (the store is flushed only after it returns).
    let mut tasks = tokio::task::JoinSet::new();
    // Told to each connection at shutdown, so it finishes its request and closes.
    let closing = CancellationToken::new();

    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and similar: wait a moment instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let Some(share) = connections.admit(peer.ip()) else {
            tracing::debug!(%peer, "too many connections from this address; closed");
            continue;
        };
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = connections.slot() => slot,
        };
        let Some(slot) = slot else {
            tracing::debug!(%peer, "every connection is busy; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            peer,
            app: app.clone(),
            protocols: protocols.clone(),
            limits: connections.limits(),
            tracker: connections.track(),
            closing: closing.clone(),
        };
        let acceptor = acceptor.clone();
        tasks.spawn(async move {
            connection.run(stream, acceptor).await;
            drop((slot, share));
        });
    }
    drop(listener);
    closing.cancel();
    let finished = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, finished).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "requests still open after the shutdown grace period; closing them"
        );
    }
    // Connections still in their TLS handshake, and any past the grace period, end here.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// One accepted connection and what serving it needs.
struct Connection {
    peer: SocketAddr,
    app: Router,
    protocols: Arc<Protocols>,
    limits: ConnectionLimits,
    tracker: Arc<Tracker>,
    closing: CancellationToken,
}

impl Connection {
    async fn run(self, stream: TcpStream, acceptor: Option<TlsAcceptor>) {
        let peer = self.peer;
        let Some(acceptor) = acceptor else {
            return self.http(stream, false, None).await;
        };
        let handshake = tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(stream));
        let tls = tokio::select! {
            () = self.closing.cancelled() => return,
            () = self.tracker.close.cancelled() => return tracing::debug!(%peer, "closed in its TLS handshake to make room"),
            done = handshake => match done {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => return tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            },
        };
        let session = tls.get_ref().1;
        let client = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| ClientCertificate(Arc::from(leaf.as_ref())));
        let h2 = session.alpn_protocol() == Some(b"h2");
        self.http(tls, h2, client).await
    }

    /// Serves HTTP on `stream` until the client closes it, it stays idle past `idle_timeout`, it is the longest
    /// idle when room is needed, or the server stops.
    async fn http<S>(self, stream: S, h2: bool, client: Option<ClientCertificate>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, app, tracker) = (self.peer, self.app.clone(), self.tracker.clone());
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let request_in_flight = InFlight::start(&tracker);
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(client) = &client {
                request.extensions_mut().insert(client.clone());
            }
            let app = app.clone();
            async move {
                let request = request.map(|body| DrainedBody { body: Some(body), drain: h2 });
                let response = app.oneshot(request).await?;
                // In flight until the answer's body is sent or dropped (a download may outlast the handler).
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &request_in_flight;
                        frame
                    }))
                }))
            }
        });
        let io = TokioIo::new(stream);
        if h2 {
            let connection = self.protocols.http2.serve_connection(io, service);
            self.drive(std::pin::pin!(connection), |c| c.graceful_shutdown()).await;
        } else {
            let connection = self.protocols.http1.serve_connection(io, service).with_upgrades();
            self.drive(std::pin::pin!(connection), |c| c.graceful_shutdown()).await;
        }
    }

    /// Runs `connection` to its end. Idle for `idle_timeout`, or at shutdown, it is closed gracefully (`close`);
    /// picked to make room, it is dropped at once if still idle; one that stays open with no request in flight for
    /// [`CLOSE_BOUND`] after being asked to close is dropped.
    async fn drive<C, E>(&self, mut connection: Pin<&mut C>, close: impl Fn(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let peer = self.peer;
        let activity = self.tracker.activity.subscribe();
        let mut idle = std::pin::pin!(idle_for(activity.clone(), self.limits.idle_timeout));
        let mut asked_to_close = false;
        loop {
            let overdue = {
                let (asked, activity) = (asked_to_close, activity.clone());
                async move {
                    if asked {
                        idle_for(activity, CLOSE_BOUND).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                }
            };
            let reason = tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                    return;
                }
                () = overdue => return tracing::debug!(%peer, "connection dropped: it did not close when asked"),
                () = self.tracker.close.cancelled(), if !asked_to_close => {
                    if activity.borrow().requests == 0 {
                        return tracing::debug!(%peer, "idle connection closed to make room");
                    }
                    "to make room"
                }
                () = &mut idle, if !asked_to_close => "idle",
                () = self.closing.cancelled(), if !asked_to_close => "stopping",
            };
            tracing::debug!(%peer, reason, "closing the connection");
            close(connection.as_mut());
            asked_to_close = true;
        }
    }
}

/// Resolves once no request has been in flight on the connection for `after`.
async fn idle_for(mut activity: watch::Receiver<Activity>, after: Duration) {
    loop {
        if activity.wait_for(|now| now.requests == 0).await.is_err() {
            return std::future::pending().await;
        }
        if tokio::time::timeout(after, activity.changed()).await.is_err() {
            return;
        }
    }
}

/// A request body that, over HTTP/2, is read to its end (within [`DRAIN_BYTES`] and [`DRAIN_TIME`]) when it is
/// dropped unread. Without this, hyper resets the stream (`NO_ERROR`, as RFC 9113 §8.1 allows) as soon as the
/// answer is sent, and many clients still uploading report the reset and drop the answer (a 413 nobody sees).
struct DrainedBody {
    body: Option<Incoming>,
    drain: bool,
}

impl hyper::body::Body for DrainedBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.as_ref().map(hyper::body::Body::size_hint).unwrap_or_default()
    }
}

impl Drop for DrainedBody {
    fn drop(&mut self) {
        let Some(mut body) = self.body.take() else { return };
        if !self.drain || hyper::body::Body::is_end_stream(&body) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let drain = async {
                let mut left = DRAIN_BYTES;
                while let Some(Ok(frame)) = body.frame().await {
                    let read = frame.data_ref().map_or(0, hyper::body::Buf::remaining);
                    left = left.saturating_sub(read);
                    if left == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, wanted_names};
    use crate::tls::{ServingCertificate, server_config};
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use rustls_pki_types::{CertificateDer, ServerName};

    async fn connect(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
    ) -> (hyper::client::conn::http1::SendRequest<Empty<Bytes>>, CertificateDer<'static>) {
        connect_from(local(1), addr, ca).await
    }

    async fn connect_from(
        source: std::net::IpAddr,
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
    ) -> (hyper::client::conn::http1::SendRequest<Empty<Bytes>>, CertificateDer<'static>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let name = ServerName::try_from("enroll.local").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(connection);
        (sender, leaf)
    }

    async fn get_ok(sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) -> u16 {
        let request = hyper::Request::get("/").header("host", "enroll.local").body(Empty::new()).unwrap();
        sender.send_request(request).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn a_certificate_swap_keeps_open_connections_and_new_ones_get_the_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now).unwrap();
        let first = ca.issue_server("enroll.local", &wanted_names("enroll", &[], &[]), now).unwrap();
        let second = ca.issue_server("enroll.local", &wanted_names("enroll", &[], &[]), now).unwrap();
        let serving = Arc::new(ServingCertificate::new(&first).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let token = CancellationToken::new();
        let tls = server_config(serving.clone(), None).unwrap();
        let server =
            tokio::spawn(serve(listener, Some(tls), app, token.clone(), Duration::from_secs(1), connections(limits())));

        let (mut open, leaf) = connect(addr, ca.cert_der()).await;
        assert_eq!(leaf, first.chain[0]);
        assert_eq!(get_ok(&mut open).await, 200);

        serving.replace(&second).unwrap();
        assert_eq!(get_ok(&mut open).await, 200, "the open connection survives the swap");
        let (mut fresh, leaf) = connect(addr, ca.cert_der()).await;
        assert_eq!(leaf, second.chain[0], "a new connection gets the new certificate");
        assert_eq!(get_ok(&mut fresh).await, 200);

        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
    }

    /// A TLS client trusting `ca`, presenting `client` (a chain and its key) if asked for a certificate; the
    /// answer to `GET /`.
    async fn get_with(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
        client: Option<&rcgen::CertifiedKey<rcgen::KeyPair>>,
        issued: Option<CertificateDer<'static>>,
    ) -> String {
        use http_body_util::BodyExt as _;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            Some(client) => {
                let chain = vec![issued.unwrap_or_else(|| client.cert.der().clone())];
                let key = rustls_pki_types::PrivateKeyDer::Pkcs8(client.signing_key.serialize_der().into());
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("enroll.local").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(connection);
        let request = hyper::Request::get("/").header("host", "enroll.local").body(Empty::<Bytes>::new()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn client_certificates_are_asked_for_once_the_device_ca_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let ca = Arc::new(CertificateAuthority::load_or_create(dir.path(), "enroll", now).unwrap().0);
        let leaf = ca.issue_server("enroll.local", &wanted_names("enroll", &[], &[]), now).unwrap();
        let (device_ca, creation) = crate::pki::scep::DeviceCa::open(dir.path(), ca.clone(), now).unwrap();
        let tls = server_config(Arc::new(ServingCertificate::new(&leaf).unwrap()), Some(device_ca.clone())).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::get(|client: Option<axum::Extension<ClientCertificate>>| async move {
                if client.is_some() { "with" } else { "without" }
            }),
        );
        let token = CancellationToken::new();
        let server =
            tokio::spawn(serve(listener, Some(tls), app, token.clone(), Duration::from_secs(1), connections(limits())));

        // Pending: no certificate is asked for, so a client holding one no CA here issued still gets through.
        let stranger = rcgen::generate_simple_self_signed(vec!["device".into()]).unwrap();
        assert_eq!(get_with(addr, ca.cert_der(), Some(&stranger), None).await, "without");

        creation.unwrap().run().unwrap();
        let device = rcgen::generate_simple_self_signed(vec!["device".into()]).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&device.signing_key)
            .unwrap();
        let issued = device_ca.get().unwrap().issue_csr(csr.der(), "enrolld Windows 1", "", now).unwrap();
        assert_eq!(get_with(addr, ca.cert_der(), Some(&device), Some(issued)).await, "with", "asked for once ready");
        assert_eq!(get_with(addr, ca.cert_der(), None, None).await, "without", "and still not required");

        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
    }
    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 100,
            max_per_address: 100,
        }
    }

    fn connections(limits: ConnectionLimits) -> Connections {
        Connections::new(limits)
    }

    /// A TLS server for `app` with `limits`; its address, the CA to trust and the token that stops it.
    async fn tls_server(
        app: Router,
        limits: ConnectionLimits,
    ) -> (SocketAddr, CertificateDer<'static>, CancellationToken, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let (ca, _) = CertificateAuthority::load_or_create(dir.path(), "enroll", now).unwrap();
        let leaf = ca.issue_server("enroll.local", &wanted_names("enroll", &[], &[]), now).unwrap();
        let tls = server_config(Arc::new(ServingCertificate::new(&leaf).unwrap()), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        tokio::spawn(serve(listener, Some(tls), app, token.clone(), Duration::from_secs(1), connections(limits)));
        (addr, ca.cert_der().clone(), token, dir)
    }

    /// A TLS connection from `source` offering `alpn`, handshake done, nothing sent.
    async fn tls_from(
        source: std::net::IpAddr,
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let name = ServerName::try_from("enroll.local").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap()
    }

    /// Reads until the server closes the connection; how long that took, or `None` if it stayed open `limit`.
    async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> Option<Duration> {
        use tokio::io::AsyncReadExt as _;
        let started = std::time::Instant::now();
        let mut buffer = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return started.elapsed(),
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    fn local(last: u8) -> std::net::IpAddr {
        std::net::IpAddr::from([127, 0, 0, last])
    }

    fn ok_app() -> Router {
        Router::new().route("/", axum::routing::get(|| async { "ok" }))
    }

    #[tokio::test]
    async fn connections_that_send_nothing_or_go_quiet_are_closed() {
        let limits = ConnectionLimits {
            idle_timeout: Duration::from_millis(600),
            header_read_timeout: Duration::from_millis(900),
            ..limits()
        };
        let (addr, ca, token, _dir) = tls_server(ok_app(), limits).await;

        // Silent after the handshake: HTTP/1.1 and HTTP/2 as ALPN chose.
        for alpn in [&b"http/1.1"[..], b"h2"] {
            let mut silent = tls_from(local(1), addr, &ca, &[alpn]).await;
            let took = closed_within(&mut silent, Duration::from_secs(5)).await;
            assert!(took.is_some_and(|t| t < Duration::from_secs(3)), "{alpn:?} silent: {took:?}");
        }

        // HTTP/2 with a request answered, then quiet: hyper's keep-alive pings would keep it open forever.
        let tls = tls_from(local(1), addr, &ca, &[b"h2"]).await;
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
        let driven = tokio::spawn(connection);
        let request = hyper::Request::get("https://enroll.local/").body(Empty::<Bytes>::new()).unwrap();
        assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), driven).await.unwrap().unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "h2 idle: {:?}", started.elapsed());

        // A plain-HTTP connection that sends nothing.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, None, ok_app(), token.clone(), Duration::from_secs(1), connections(limits)));
        let mut silent = tokio::net::TcpStream::connect(plain).await.unwrap();
        let took = closed_within(&mut silent, Duration::from_secs(5)).await;
        assert!(took.is_some_and(|t| t < Duration::from_secs(2)), "plain silent: {took:?}");
        token.cancel();
    }

    #[tokio::test]
    async fn a_request_in_flight_is_not_idle() {
        let app = Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "done"
            }),
        );
        let limits = ConnectionLimits { idle_timeout: Duration::from_millis(300), ..limits() };
        let (addr, ca, token, _dir) = tls_server(app, limits).await;
        // HTTP/1.1: had the slow request counted as idle, the connection would close after answering it.
        let (mut sender, _) = connect_from(local(1), addr, &ca).await;
        for _ in 0..2 {
            let request = hyper::Request::get("/slow").header("host", "enroll.local").body(Empty::new()).unwrap();
            assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
        }
        token.cancel();
    }

    #[tokio::test]
    async fn one_address_gets_its_share_and_others_still_get_in() {
        let limits = ConnectionLimits { max_per_address: 2, ..limits() };
        let (addr, ca, token, _dir) = tls_server(ok_app(), limits).await;
        let _first = tls_from(local(1), addr, &ca, &[b"http/1.1"]).await;
        let _second = tls_from(local(1), addr, &ca, &[b"http/1.1"]).await;
        // The third from the same address is closed before its handshake.
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let took = closed_within(&mut third, Duration::from_secs(2)).await;
        assert!(took.is_some(), "a third connection from 127.0.0.1 stays open");
        let (mut other, _) = connect_from(local(2), addr, &ca).await;
        assert_eq!(get_ok(&mut other).await, 200);
        token.cancel();
    }

    #[tokio::test]
    async fn when_every_slot_is_taken_idle_connections_make_room() {
        let limits = ConnectionLimits { max_connections: 3, ..limits() };
        let (addr, ca, token, _dir) = tls_server(ok_app(), limits).await;
        let mut idle = Vec::new();
        for last in 1..=3 {
            idle.push(tls_from(local(last), addr, &ca, &[b"http/1.1"]).await);
        }
        // A fourth client gets in at once; the longest idle connection (the first) made room, the others are open.
        let started = std::time::Instant::now();
        let (mut fourth, _) = connect_from(local(4), addr, &ca).await;
        assert_eq!(get_ok(&mut fourth).await, 200);
        assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(closed_within(&mut idle[0], Duration::from_secs(2)).await.is_some(), "the first was closed");
        for stream in &mut idle[1..] {
            assert!(closed_within(stream, Duration::from_millis(300)).await.is_none(), "newer ones stay");
        }
        // The fourth, busy a moment ago, is now the newest idle: the second goes next.
        let (mut fifth, _) = connect_from(local(5), addr, &ca).await;
        assert_eq!(get_ok(&mut fifth).await, 200);
        assert!(closed_within(&mut idle[1], Duration::from_secs(2)).await.is_some(), "the second was closed");
        token.cancel();
    }
}
