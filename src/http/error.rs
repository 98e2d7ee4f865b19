//! API errors: every 4xx carries `{"error": "<message>"}`; a 5xx carries no internals, and
//! its cause is logged once, here.

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::events::wire::{NUL_REFUSED, has_escaped_nul};

/// The body of every error answer: `{"error": "<message>"}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `429`: come back after `wait`.
    pub fn too_many(message: impl Into<String>, wait: std::time::Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// A failure of ours: logged with its cause, answered without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        // `?` on the text escapes line breaks a cause might carry from a request.
        tracing::error!(error = ?cause.to_string(), "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up: never earlier than the allowance returns.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(1)),
            );
        }
        response
    }
}

/// The body of a JSON request as text: the content type checked, the size limit applied,
/// and NUL characters refused (Postgres stores none, in text or in jsonb), each answered in
/// the API's error shape. For handlers that look at the text before parsing it.
pub struct JsonText(pub axum::body::Bytes);

/// The body timeout of a request that did not come through admission (the setting's
/// default), read once.
static DEFAULT_BODY_TIMEOUT: std::sync::LazyLock<std::time::Duration> =
    std::sync::LazyLock::new(|| crate::config::HttpConfig::default().http_body_timeout);

impl<S: Send + Sync> FromRequest<S> for JsonText {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_type);
        let timeout = req
            .extensions()
            .get::<super::BodyTimeout>()
            // A request that did not come through admission: the default body timeout.
            .map_or(*DEFAULT_BODY_TIMEOUT, |t| t.0);
        let bytes = tokio::time::timeout(timeout, axum::body::Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request's body took longer than {} ms to arrive (HTTP_BODY_TIMEOUT_MS)",
                        timeout.as_millis()
                    ),
                )
            })?
            .map_err(|r| ApiError::new(r.status(), r.body_text()))?;
        // Postgres stores no NUL character, in text or in jsonb: refuse it up front.
        if has_escaped_nul(&bytes) {
            return Err(ApiError::bad_request(NUL_REFUSED));
        }
        if !json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`",
            ));
        }
        Ok(JsonText(bytes))
    }
}

/// `application/json`, or any `application/…+json`, with or without parameters: what
/// axum's `Json` accepts.
fn is_json_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `Json<T>` whose rejections (bad JSON, wrong types, wrong content type, too large) are
/// answered in the API's error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    /// The body's text as [`JsonText`] takes it, then parsed once, with axum's messages.
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonText(bytes) = JsonText::from_request(req, state).await?;
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                // JSON of the wrong shape is a bad request like any other (axum says 422).
                let status = match rejection.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    s => s,
                };
                let text = rejection.body_text();
                // Nested past what the parser takes: past the depth limit, said so.
                let text = crate::events::wire::too_deep(&text).unwrap_or(text);
                Err(ApiError::new(status, text))
            }
        }
    }
}
