//! The error every handler returns: a status code and a JSON body `{"error": code, "message": text, "field"?: name}`
//! a person can act on.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpError {
    #[serde(skip)]
    pub status: StatusCode,
    /// A stable, machine-readable code such as `not_found`.
    pub error: &'static str,
    pub message: String,
    /// The request field the problem concerns, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
    /// Seconds to wait before trying again (sent as `Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl HttpError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        HttpError { status, error, message: message.into(), field: None, retry_after: None }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(&self)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
