//! Job registration: a version of a job with its event trigger.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson};
use super::openapi::EventFilterSchema;
use crate::dispatchers::{self, EventRule, JobRegistration, RegisterError};
use crate::events::DEFAULT_SOURCE;

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterJobBody {
    #[schema(min_length = 1)]
    pub version: String,
    pub trigger: TriggerBody,
    #[serde(default)]
    #[schema(value_type = bool, default = true)]
    pub enabled: Option<bool>,
}

/// Which events a job (or a registration) takes: their names, source, and filters of
/// their payload and context.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = EventRule)]
pub struct TriggerBody {
    pub event: OneOrMany,
    #[serde(default)]
    #[schema(value_type = String)]
    pub source: Option<String>,
    #[serde(default)]
    #[schema(value_type = EventFilterSchema)]
    pub payload: Option<Value>,
    #[serde(default)]
    #[schema(value_type = EventFilterSchema)]
    pub context: Option<Value>,
}

/// `"name"` or `["name", ...]`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl TriggerBody {
    pub fn into_rule(self) -> EventRule {
        EventRule {
            event_names: match self.event {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            },
            source: self.source.unwrap_or_else(|| DEFAULT_SOURCE.to_string()),
            payload_filter: self.payload,
            context_filter: self.context,
        }
    }
}

pub fn register_error(e: RegisterError) -> ApiError {
    match e {
        RegisterError::Invalid(m) => ApiError::bad_request(m),
        e @ RegisterError::NotFound(_) => ApiError::not_found(e.to_string()),
        RegisterError::Db(e) => ApiError::internal(e),
    }
}

/// A job as registered: its latest version and its dispatcher.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = RegisteredJob)]
pub struct JobRegistered {
    pub id: String,
    #[schema(inline)]
    pub latest_version: LatestVersion,
    pub dispatcher_id: Uuid,
    pub enabled: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LatestVersion {
    pub id: Uuid,
    pub version: String,
}

/// The job a route names.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path, rename_all = "camelCase")]
pub struct JobIdParam {
    /// The job's id
    #[param(min_length = 1, max_length = 255)]
    pub job_id: String,
}

/// `PUT /api/v1/jobs/{jobId}`
#[utoipa::path(
    put,
    path = "/api/v1/jobs/{jobId}",
    operation_id = "registerJob",
    summary = "Register a job version and its event trigger",
    params(JobIdParam),
    request_body = RegisterJobBody,
    responses(
        (status = 200, description = "OK", body = JobRegistered),
    ),
    security(("bearerAuth" = []))
)]
pub async fn register_job(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(job_id): Path<String>,
    ApiJson(body): ApiJson<RegisterJobBody>,
) -> Result<Json<JobRegistered>, ApiError> {
    let reg = JobRegistration {
        version: body.version,
        rule: body.trigger.into_rule(),
        enabled: body.enabled.unwrap_or(true),
        manual: false,
    };
    let job = dispatchers::register_job(&state.pool, &env, &job_id, &reg)
        .await
        .map_err(register_error)?;
    Ok(Json(JobRegistered {
        id: job.slug,
        latest_version: LatestVersion {
            id: job.version_id,
            version: job.version,
        },
        dispatcher_id: job.dispatcher_id,
        enabled: job.enabled,
    }))
}
