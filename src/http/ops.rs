//! Operational endpoints: `/healthz`, `/ca.crt`, the HTTPS redirect and the 404 answer; and what plain HTTP
//! answers while enrolld waits for the clock.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::json;
use tokio::sync::watch;

use super::{AppState, HttpError};
use crate::clock::{CLOCK_ADVICE, ClockState};

/// Answers 200 when the daemon can read its database; `healthcheck` and systemd watchers use it.
pub async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, HttpError> {
    let schema = state
        .store
        .schema_version()
        .map_err(|error| HttpError::unavailable(format!("the database cannot be read: {error}")))?;
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "schema": schema,
        "time": state.clock.now().unix_timestamp(),
        "clock": state.clock_status.report().state.as_str(),
    })))
}

/// `/healthz` while enrolld waits for the clock: 503 with the reason, so `enrolld healthcheck` and monitoring see
/// that it does not serve yet, and why.
pub async fn healthz_waiting(State(clock): State<watch::Receiver<ClockState>>) -> Response {
    let state = *clock.borrow();
    let body = json!({
        "status": "waiting_for_clock",
        "message": format!("{}. enrolld issues nothing until the clock is right. {CLOCK_ADVICE}.", state.describe()),
        "clock": state.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "2")], Json(body)).into_response()
}

/// Any other page while enrolld waits for the clock: what is wrong and what to do, reloading itself every few
/// seconds (so the browser goes on by itself once the clock is set).
pub async fn waiting_page(State(clock): State<watch::Receiver<ClockState>>) -> Response {
    let state = *clock.borrow();
    let escape = |text: &str| text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>enrolld is waiting for the clock</title>\
         </head><body><h1>enrolld is waiting for the clock</h1><p>{}.</p><p>It makes its certificates only once the \
         clock is right. {}. This page reloads itself and goes on as soon as the clock is set.</p></body></html>\n",
        escape(&state.describe()),
        escape(CLOCK_ADVICE),
    );
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, "default-src 'none'"),
        (header::CACHE_CONTROL, "no-store"),
        (header::RETRY_AFTER, "5"),
    ];
    (StatusCode::SERVICE_UNAVAILABLE, headers, page).into_response()
}

/// The appliance CA, for devices and browsers to trust.
pub async fn ca_certificate(State(state): State<AppState>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-x509-ca-cert"),
            (header::CONTENT_DISPOSITION, "inline; filename=\"enrolld-ca.crt\""),
        ],
        state.ca_pem.to_string(),
    )
        .into_response()
}

/// Sends a plain-HTTP request over HTTPS: to the host the client used when the certificate carries it, else to the
/// box's own name, so a forged Host header cannot send anyone elsewhere. A temporary (307) redirect, so browsers do
/// not remember it if the admin later changes ports.
pub fn redirect_to_https(request: &Request, target: &super::RedirectTarget) -> Response {
    let asked = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<Authority>().ok())
        .map(|authority| authority.host().to_owned());
    let host = match asked {
        Some(host) if target.serving.covers(&host) => host,
        _ => target.naming.names().mdns_name(),
    };
    let https_port = target.port;
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    Redirect::temporary(&format!("https://{host}{port}{path}")).into_response()
}

pub async fn not_found(request: Request) -> HttpError {
    HttpError::new(StatusCode::NOT_FOUND, "not_found", format!("there is no page at {}", request.uri().path()))
}
