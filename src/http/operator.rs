//! Operator endpoints: what the `env` command does, over HTTP, for a bearer of
//! `OPERATOR_TOKEN` (not an environment's API key: they change any environment).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Deserializer, Serialize};

use super::AppState;
use super::error::{ApiError, ApiJson};
use crate::db::environments::{self, EnvironmentError, Limits, SetLimits};

/// An environment's limits, as the API shows them (`null`: no limit).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitsBody {
    pub environment: String,
    pub max_jobs_in_flight: Option<i32>,
    pub max_events_per_second: Option<i32>,
}

/// A change of limits: a field left out stays as it is, `null` lifts the limit.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutLimitsBody {
    #[serde(default, deserialize_with = "present")]
    pub max_jobs_in_flight: Option<Option<i32>>,
    #[serde(default, deserialize_with = "present")]
    pub max_events_per_second: Option<Option<i32>>,
}

/// A field that is present, `null` or not: `Some(None)` for `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i32>>, D::Error> {
    Option::<i32>::deserialize(d).map(Some)
}

/// `GET /api/v1/operator/environments/{org}/{project}/{env}/limits`
pub async fn get_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, project, env)): Path<(String, String, String)>,
) -> Result<Json<LimitsBody>, ApiError> {
    authorize(&state, &headers)?;
    apply(
        &state,
        format!("{org}/{project}/{env}"),
        SetLimits::default(),
    )
    .await
}

/// `PUT /api/v1/operator/environments/{org}/{project}/{env}/limits`
pub async fn put_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, project, env)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<PutLimitsBody>,
) -> Result<Json<LimitsBody>, ApiError> {
    authorize(&state, &headers)?;
    let set = SetLimits {
        max_jobs_in_flight: body.max_jobs_in_flight,
        max_events_per_second: body.max_events_per_second,
    };
    let path = format!("{org}/{project}/{env}");
    let shown = apply(&state, path, set).await?;
    tracing::info!(environment = %shown.environment, max_jobs_in_flight = ?shown.max_jobs_in_flight,
        max_events_per_second = ?shown.max_events_per_second, "environment limits set by an operator");
    Ok(shown)
}

async fn apply(
    state: &AppState,
    path: String,
    set: SetLimits,
) -> Result<Json<LimitsBody>, ApiError> {
    match environments::limits(&state.pool, &path, set).await {
        Ok(Some(Limits {
            max_jobs_in_flight,
            max_events_per_second,
        })) => Ok(Json(LimitsBody {
            environment: path,
            max_jobs_in_flight,
            max_events_per_second,
        })),
        Ok(None) => Err(ApiError::not_found(format!("no environment {path}"))),
        Err(EnvironmentError::Db(e)) => Err(e.into()),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// The caller bears the operator token; 403 when the endpoints are off, 401 for a wrong
/// or missing token.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.operator_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the operator endpoints are off: set OPERATOR_TOKEN to turn them on",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Digests compared, so the time taken says nothing about the token's prefix.
    match given {
        Some(token) if environments::hash_api_key(token).as_slice() == &expected[..] => Ok(()),
        _ => Err(ApiError::unauthorized(
            "an operator endpoint: send Authorization: Bearer <OPERATOR_TOKEN>",
        )),
    }
}
