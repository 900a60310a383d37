//! The accept loop: TCP (and TLS) connections handed to hyper, each request tagged with the client address, and a
//! graceful stop that lets in-flight requests finish within a bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A client has this long to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client has this long to send the request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The certificate the client presented in the TLS handshake (DER), verified against the device CA; put in each
/// request's extensions.
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub Arc<[u8]>);

/// Serves `app` on `listener` until `shutdown`, then waits up to `grace` for open requests to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(100);
    let builder = Arc::new(builder);
    // Every connection task, so none outlives `serve` (the store is flushed only after it returns).
    let mut connections = tokio::task::JoinSet::new();

    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
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
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            match acceptor {
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let client = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|leaf| ClientCertificate(Arc::from(leaf.as_ref())));
                        serve_connection(&builder, watcher, tls, peer, client, app).await
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
                None => serve_connection(&builder, watcher, stream, peer, None, app).await,
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "requests still open after the shutdown grace period; closing them");
        }
    }
    // Connections still in their TLS handshake, and any past the grace period, end here.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    stream: S,
    peer: SocketAddr,
    client: Option<ClientCertificate>,
    app: Router,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        if let Some(client) = &client {
            request.extensions_mut().insert(client.clone());
        }
        app.clone().oneshot(request)
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
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
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
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
        let server = tokio::spawn(serve(listener, Some(tls), app, token.clone(), Duration::from_secs(1)));

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
        let server = tokio::spawn(serve(listener, Some(tls), app, token.clone(), Duration::from_secs(1)));

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
}
