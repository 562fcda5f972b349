//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! the official clients map to their exception classes.

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400: a value the API does not accept.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    /// 400: a body that is not the expected JSON.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self { code: Some("invalid_api_key"), ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "Incorrect API key provided.") }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model"),
            code: Some("model_not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist."))
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("Unknown request URL: {path}."))
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("The request body is larger than {limit} bytes."))
    }

    /// 503: the model is not available (it failed to load; a later request retries).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message)
    }

    /// 503: too many requests are waiting for the engine; the client should retry later.
    pub fn overloaded(queued: usize) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, OVERLOADED, format!("The server is busy ({queued} requests waiting); retry shortly."))
    }

    /// 500: a fault of ours, not of the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// What the engine refused while running a request: a 400 when it judged the request
    /// invalid (the API's own checks should have caught it first), a 500 otherwise.
    pub fn engine(error: llm_engine::EngineError) -> Self {
        match error {
            llm_engine::EngineError::InvalidRequest(message) => Self::bad_body(message),
            other => Self::internal(other.to_string()),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The `type` of an overloaded server's 503, the one answer that carries `Retry-After`.
const OVERLOADED: &str = "server_overloaded";

/// An overloaded server's hint, in seconds: the official clients wait this long before retrying
/// instead of at once.
const OVERLOADED_RETRY_AFTER: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.kind == OVERLOADED {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static(OVERLOADED_RETRY_AFTER));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_overloaded_server_asks_clients_to_wait() {
        let overloaded = ApiError::overloaded(64).into_response();
        assert_eq!((overloaded.status(), overloaded.headers().get(RETRY_AFTER).map(|v| v.to_str().unwrap())), (StatusCode::SERVICE_UNAVAILABLE, Some("1")));
        assert!(ApiError::unavailable("loading failed").into_response().headers().get(RETRY_AFTER).is_none());
    }
}
