//! Job registration: a version of a job with its event trigger.

use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson};
use crate::dispatchers::{self, EventRule, JobRegistration, RegisterError};
use crate::events::DEFAULT_SOURCE;

#[derive(Debug, Deserialize)]
pub struct RegisterJobBody {
    pub version: String,
    pub trigger: TriggerBody,
    #[serde(default)]
    pub enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct TriggerBody {
    pub event: OneOrMany,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub context: Option<Value>,
}

/// `"name"` or `["name", ...]`.
#[derive(Debug, Deserialize)]
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

/// `PUT /api/v1/jobs/{jobId}`
pub async fn register_job(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(job_id): Path<String>,
    ApiJson(body): ApiJson<RegisterJobBody>,
) -> Result<Json<Value>, ApiError> {
    let reg = JobRegistration {
        version: body.version,
        rule: body.trigger.into_rule(),
        enabled: body.enabled.unwrap_or(true),
        manual: false,
    };
    let job = dispatchers::register_job(&state.pool, &env, &job_id, &reg)
        .await
        .map_err(register_error)?;
    Ok(Json(json!({
        "id": job.slug,
        "latestVersion": { "id": job.version_id, "version": job.version },
        "dispatcherId": job.dispatcher_id,
        "enabled": job.enabled,
    })))
}
