//! `enrolld healthcheck`: asks the running daemon's `/healthz` over plain HTTP if it listens there, otherwise over
//! HTTPS trusting only the appliance's CA (or the admin-supplied chain), and says why when it gets no answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{Config, SubjectName, TlsSource};
use crate::pki;

/// Probes the daemon described by `config`; `Ok` carries the health answer, `Err` what is wrong.
pub async fn probe(config: &Config, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, probe_inner(config)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} s; the daemon may be hung or overloaded", timeout.as_secs())),
    }
}

async fn probe_inner(config: &Config) -> Result<String, String> {
    if let Some(addr) = config.http_listen {
        let addr = loopback_for(addr);
        let stream = connect(addr).await?;
        return get_healthz(stream, addr).await;
    }
    let Some(addr) = config.https_listen else {
        return Err("both listeners are off in the configuration".into());
    };
    let addr = loopback_for(addr);
    let (roots, server_name) = trust_for(config)?;
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(server_name, stream)
        .await
        .map_err(|e| format!("TLS with {addr} failed: {e}"))?;
    get_healthz(tls, addr).await
}

/// Where to connect for a listen address: loopback when it listens everywhere.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    }
}

fn trust_for(config: &Config) -> Result<(rustls::RootCertStore, ServerName<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    let (pem_path, server_name) = match &config.tls {
        TlsSource::SelfIssued => (config.state_dir.join("pki").join("ca.crt"), ServerName::try_from("localhost")),
        TlsSource::Files { cert, .. } => {
            let bytes = std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
            let leaf = CertificateDer::pem_slice_iter(&bytes).next().and_then(Result::ok);
            let name = leaf
                .and_then(|der| pki::parse_certificate(&der).ok())
                .and_then(|info| info.names.into_iter().next())
                .map(|name| match name {
                    SubjectName::Dns(dns) => ServerName::try_from(dns),
                    SubjectName::Ip(ip) => Ok(ServerName::IpAddress(ip.into())),
                })
                .unwrap_or_else(|| ServerName::try_from("localhost".to_owned()));
            (cert.clone(), name)
        }
    };
    let bytes = std::fs::read(&pem_path).map_err(|e| format!("cannot read {}: {e}", pem_path.display()))?;
    for der in CertificateDer::pem_slice_iter(&bytes).flatten() {
        roots.add(der).map_err(|e| format!("{}: {e}", pem_path.display()))?;
    }
    Ok((roots, server_name.map_err(|e| e.to_string())?))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    TcpStream::connect(addr).await.map_err(|error| match error.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            format!("nothing listens on {addr}; is enrolld running?")
        }
        _ => format!("cannot connect to {addr}: {error}"),
    })
}

async fn get_healthz<S>(stream: S, addr: SocketAddr) -> Result<String, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {addr} failed: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::get("/healthz")
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("request to {addr} failed: {e}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() { Ok(text) } else { Err(format!("{addr} answered {status}: {text}")) }
}
