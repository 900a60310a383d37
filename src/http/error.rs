//! The error every handler returns: a status code and a JSON body `{"error": code, "message": text}` a person can
//! act on.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpError {
    #[serde(skip)]
    pub status: StatusCode,
    /// A stable, machine-readable code such as `not_found`.
    pub error: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'static str>,
}

impl HttpError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        HttpError { status, error, message: message.into(), field: None }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}
