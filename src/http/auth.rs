//! `Authorization: Bearer <api key>`: the key decides the environment every call is scoped to.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::metrics::{Stage, metrics};
use crate::tenants::Environment;

/// The caller's environment.
pub struct AuthEnv(pub Environment);

impl FromRequestParts<AppState> for AuthEnv {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Admission (`super::admit`) authenticated the caller before anything else.
        if let Some(env) = parts.extensions.get::<Environment>() {
            return Ok(AuthEnv(env.clone()));
        }
        let key = api_key(&parts.headers)?;
        let started = std::time::Instant::now();
        let env = state.keys.find(&state.pool, key).await?;
        metrics().stage(Stage::Auth, started);
        env.map(AuthEnv)
            .ok_or_else(|| ApiError::unauthorized("invalid API key"))
    }
}

/// The API key of `Authorization: Bearer <api key>`, or why there is none.
pub fn api_key(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization header"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be \"Bearer <api key>\""))
}
