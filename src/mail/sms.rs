//! Text messages: a generic HTTP SMS API (one request per message, rustls for HTTPS) or mail to
//! `<number>@<domain>` through the SMTP relay. Both answer with the same [`Attempt`] as mail, so SMS jobs share
//! the outbox's retries and remarks.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Relay;
use super::templates::InviteContext;
use crate::config::{HttpGateway, SmsGateway};
use crate::domain::Attempt;

/// How long a gateway gets to answer.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a gateway's answer that is read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How much of a gateway's answer is kept as the reply.
const REPLY_CHARS: usize = 300;

/// The text of an invite SMS: short, with the link, the passcode and the expiry date.
pub fn invite_text(invite: &InviteContext) -> String {
    let who = if invite.organisation.is_empty() { String::new() } else { format!("{}: ", invite.organisation) };
    let date = invite.expires.split(',').next().unwrap_or(&invite.expires);
    format!("{who}enroll your device at {} passcode {} (until {date})", invite.link, invite.passcode)
}

/// Sends one text message through the configured gateway.
pub async fn send(gateway: &SmsGateway, relay: Option<&Relay>, to: &str, text: &str, message_id: &str) -> Attempt {
    match gateway {
        SmsGateway::Email { domain } => {
            let Some(relay) = relay else {
                return Attempt::Permanent("SMS by email needs the SMTP relay (smtp_host), which is not set".into());
            };
            let number: String = to.chars().filter(char::is_ascii_digit).collect();
            match relay.text_message(&format!("{number}@{domain}"), message_id, "", text) {
                Ok(message) => relay.send(message).await,
                Err(error) => Attempt::Permanent(error.to_string()),
            }
        }
        SmsGateway::Http(http) => match tokio::time::timeout(GATEWAY_TIMEOUT, request(http, to, text)).await {
            Ok(attempt) => attempt,
            Err(_) => {
                Attempt::Unreachable(format!("the SMS gateway did not answer within {} s", GATEWAY_TIMEOUT.as_secs()))
            }
        },
    }
}

async fn request(gateway: &HttpGateway, to: &str, text: &str) -> Attempt {
    let body = match HttpGateway::render_body(&gateway.body, to, text) {
        Ok(body) => body,
        Err(error) => return Attempt::Permanent(format!("sms_http_body does not render: {error}")),
    };
    let uri: Uri = match gateway.url.parse() {
        Ok(uri) => uri,
        Err(error) => return Attempt::Permanent(format!("sms_http_url: {error}")),
    };
    let https = uri.scheme_str() == Some("https");
    // An IPv6 literal comes bracketed in a URL; connecting and TLS want it bare.
    let Some(host) = uri.host().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned()) else {
        return Attempt::Permanent("sms_http_url has no host".into());
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = match TcpStream::connect((host.as_str(), port)).await {
        Ok(stream) => stream,
        Err(error) => return Attempt::Unreachable(format!("cannot reach the SMS gateway at {host}:{port}: {error}")),
    };
    let method = Method::from_bytes(gateway.method.as_bytes()).unwrap_or(Method::POST);
    let mut builder = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, uri.authority().map_or(host.as_str(), |a| a.as_str()))
        .header(header::USER_AGENT, concat!("enrolld/", env!("CARGO_PKG_VERSION")));
    let has_content_type = gateway.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    if !has_content_type {
        let json = body.trim_start().starts_with(['{', '[']);
        builder = builder
            .header(header::CONTENT_TYPE, if json { "application/json" } else { "application/x-www-form-urlencoded" });
    }
    for (name, value) in &gateway.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = match builder.body(Full::new(Bytes::from(body))) {
        Ok(request) => request,
        Err(error) => return Attempt::Permanent(format!("the SMS request cannot be built: {error}")),
    };
    if https {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map(|config| {
                let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                config.with_root_certificates(roots).with_no_client_auth()
            });
        let (config, name) = match (config, rustls_pki_types::ServerName::try_from(host.clone())) {
            (Ok(config), Ok(name)) => (config, name),
            (Err(error), _) => return Attempt::Permanent(format!("TLS setup: {error}")),
            (_, Err(error)) => return Attempt::Permanent(format!("sms_http_url host: {error}")),
        };
        match tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream).await {
            Ok(tls) => exchange(tls, request, gateway).await,
            Err(error) => Attempt::Unreachable(format!("TLS with the SMS gateway {host} failed: {error}")),
        }
    } else {
        exchange(stream, request, gateway).await
    }
}

async fn exchange(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    request: Request<Full<Bytes>>,
    gateway: &HttpGateway,
) -> Attempt {
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(error) => return Attempt::Unreachable(format!("the SMS gateway: {error}")),
    };
    tokio::spawn(connection);
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => return Attempt::Unreachable(format!("the SMS gateway did not answer: {error}")),
    };
    let status = response.status();
    // A gateway's answer is a short status; a runaway one is cut off rather than read whole.
    let body = match http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES).collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(error) => return Attempt::Unreachable(format!("the SMS gateway's answer broke off: {error}")),
    };
    let short: String = body.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(REPLY_CHARS).collect();
    let reply = format!("HTTP {}: {short}", status.as_u16()).trim_end_matches(": ").to_owned();
    if status.is_success() {
        match &gateway.success_contains {
            Some(needle) if !body.contains(needle.as_str()) => Attempt::Permanent(format!(
                "{reply} — the answer does not contain {needle:?} (sms_http_success_contains)"
            )),
            _ => Attempt::Sent(reply),
        }
    } else if status.as_u16() == 429 || status.is_server_error() {
        Attempt::Temporary(reply)
    } else if status.as_u16() == 401 || status.as_u16() == 403 {
        Attempt::Permanent(format!("{reply} — the gateway refused the credentials; check sms_http_headers"))
    } else {
        Attempt::Permanent(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_encode_the_number_and_text_for_json_and_forms() {
        let text = "Enroll at https://e.local/e/x?a=1 \"now\"";
        let json =
            HttpGateway::render_body(r#"{"to": {{ to_json }}, "text": {{ text_json }}}"#, "+1 202", text).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!((parsed["to"].as_str(), parsed["text"].as_str()), (Some("+1 202"), Some(text)));
        let form = HttpGateway::render_body("to={{ to_url }}&msg={{ text_url }}", "+1 202", "a&b=c").unwrap();
        assert_eq!(form, "to=%2B1+202&msg=a%26b%3Dc");
    }

    #[test]
    fn the_invite_text_is_short() {
        let mut invite = InviteContext::sample(crate::model::Platform::Ios);
        invite.link = format!("https://enroll.local:8443/e/{}", "x".repeat(43));
        let text = invite_text(&invite);
        assert!(text.contains(&invite.link) && text.contains("12345678"), "{text}");
        assert!(text.chars().count() <= 160, "{} characters: {text}", text.chars().count());
    }
}
