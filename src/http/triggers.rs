//! Dynamic triggers and their registrations, the dispatchers of an environment, and the
//! dry run that says which would take an event and why the others would not.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson};
use super::jobs::{TriggerBody, register_error};
use crate::dispatchers;
use crate::events::DEFAULT_SOURCE;
use crate::events::filter::Evaluator;
use crate::events::wire::SendEventBody;

#[derive(Debug, Deserialize)]
pub struct DynamicTriggerBody {
    /// The ids of the jobs it runs (each registered in the environment).
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// `PUT /api/v1/dynamic-triggers/{id}`
pub async fn put_dynamic_trigger(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DynamicTriggerBody>,
) -> Result<Json<Value>, ApiError> {
    dispatchers::register_dynamic_trigger(&state.pool, &env, &id, &body.jobs)
        .await
        .map_err(register_error)?;
    Ok(Json(json!({"id": id, "jobs": body.jobs})))
}

#[derive(Debug, Deserialize)]
pub struct RegistrationBody {
    pub key: String,
    pub rule: TriggerBody,
}

/// `POST /api/v1/dynamic-triggers/{id}/registrations`: a DYNAMIC_TRIGGER dispatcher.
pub async fn post_registration(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RegistrationBody>,
) -> Result<Json<Value>, ApiError> {
    let rule = body.rule.into_rule();
    let dispatcher =
        dispatchers::register_dynamic_registration(&state.pool, &env, &id, &body.key, &rule)
            .await
            .map_err(register_error)?;
    Ok(Json(
        json!({"id": dispatcher, "dynamicTrigger": id, "key": body.key}),
    ))
}

/// `DELETE /api/v1/dynamic-triggers/{id}/registrations/{key}`
pub async fn delete_registration(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path((id, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if dispatchers::delete_dynamic_registration(&state.pool, &env, &id, &key).await? {
        Ok(Json(
            json!({"deleted": true, "dynamicTrigger": id, "key": key}),
        ))
    } else {
        Err(ApiError::not_found(format!(
            "registration {key:?} of dynamic trigger {id:?} not found"
        )))
    }
}

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    /// The `next` of the previous page.
    #[serde(default)]
    pub after: Option<Uuid>,
    #[serde(default)]
    pub limit: Option<i64>,
}

/// `GET /api/v1/dispatchers?limit=&after=`: a page (100 by default, at most 500), oldest
/// first, and `next` for the following page (`null` on the last).
pub async fn list_dispatchers(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    page: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|r| ApiError::bad_request(r.body_text()))?;
    let (list, next) = dispatchers::list_dispatchers(
        &state.pool,
        &env,
        page.after,
        page.limit.unwrap_or(DEFAULT_PAGE),
    )
    .await?;
    Ok(Json(json!({ "dispatchers": list, "next": next })))
}

/// Dispatchers in a page when the caller names no limit.
const DEFAULT_PAGE: i64 = 100;

async fn set_enabled(
    state: &AppState,
    env_id: &AuthEnv,
    id: &str,
    on: bool,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::not_found(format!("dispatcher {id:?} not found"));
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    match dispatchers::set_dispatcher_enabled(&state.pool, &env_id.0, uuid, on).await? {
        dispatchers::Toggled::Done => Ok(Json(json!({"id": uuid, "enabled": on}))),
        dispatchers::Toggled::NotFound => Err(not_found()),
        dispatchers::Toggled::Spent(why) => Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!(
                "dispatcher {id:?} is an EPHEMERAL dispatcher that has {why}: it fires once and \
                 cannot be enabled again; create a new one"
            ),
        )),
    }
}

/// `POST /api/v1/dispatchers/{id}/enable`
pub async fn enable_dispatcher(
    State(state): State<AppState>,
    env: AuthEnv,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_enabled(&state, &env, &id, true).await
}

/// `POST /api/v1/dispatchers/{id}/disable`
pub async fn disable_dispatcher(
    State(state): State<AppState>,
    env: AuthEnv,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_enabled(&state, &env, &id, false).await
}

/// Most matches, and most misses, a dry run lists; it counts them all.
pub const MAX_DRY_RUN_LISTED: usize = 100;

/// `POST /api/v1/events/match`: which dispatchers an event would reach, and for each that
/// it would not, why (the first check that fails; for a filter, its path). Stores nothing.
/// Only dispatchers whose rule lists the event's name are looked at: those delivery would
/// read, the disabled and manual ones, and the newest expired EPHEMERAL ones.
/// Lists at most [`MAX_DRY_RUN_LISTED`] of each, with their counts; the filters run with the
/// step budget delivery would give the event, off the async threads.
pub async fn match_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    ApiJson(body): ApiJson<SendEventBody>,
) -> Result<Json<Value>, ApiError> {
    let e = body.event;
    let account = match body.options.and_then(|o| o.account_id) {
        Some(identifier) => {
            crate::tenants::find_external_account(&state.pool, env.id, &identifier).await?
        }
        None => None,
    };
    // What delivery would read for this name, and the expired ones of it to say why not.
    let dispatchers = dispatchers::dispatchers_for_event(&state.pool, &env, &e.name).await?;
    let answer = tokio::task::spawn_blocking(move || {
        let source = e.source.unwrap_or_else(|| DEFAULT_SOURCE.to_string());
        let context = e.context.unwrap_or(Value::Null);
        let facts = dispatchers::EventFacts {
            name: &e.name,
            source: &source,
            account,
            payload_type: e.payload_type.as_deref().unwrap_or("JSON"),
            payload: &e.payload,
            context: &context,
        };
        let mut eval = Evaluator::default();
        let (mut matches, mut misses) = (Vec::new(), Vec::new());
        let (mut match_count, mut miss_count) = (0, 0);
        for d in dispatchers {
            match dispatchers::why_not(&mut eval, &d, facts) {
                None => {
                    match_count += 1;
                    if matches.len() < MAX_DRY_RUN_LISTED {
                        matches.push(json!({"dispatcher": d}));
                    }
                }
                Some(reason) => {
                    miss_count += 1;
                    if misses.len() < MAX_DRY_RUN_LISTED {
                        misses.push(json!({"dispatcher": d, "reason": reason}));
                    }
                }
            }
        }
        json!({
            "matches": matches,
            "misses": misses,
            "matchCount": match_count,
            "missCount": miss_count,
            "steps": eval.steps(),
        })
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(answer))
}

/// The body of `POST /api/v1/event-dispatchers/ephemeral` (trigger.dev v2's).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EphemeralBody {
    pub url: String,
    pub name: super::jobs::OneOrMany,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub filter: Option<Value>,
    #[serde(default)]
    pub context_filter: Option<Value>,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub timeout_in_seconds: Option<i64>,
}

/// `POST /api/v1/event-dispatchers/ephemeral`: a dispatcher that POSTs the first event its
/// rule matches to `url`, signed, once, before `timeoutInSeconds` pass. The answer carries
/// the signing secret when it created the dispatcher.
pub async fn post_ephemeral(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    ApiJson(body): ApiJson<EphemeralBody>,
) -> Result<Json<Value>, ApiError> {
    let rule = super::jobs::TriggerBody {
        event: body.name,
        source: body.source,
        payload: body.filter,
        context: body.context_filter,
    }
    .into_rule();
    let timeout = body
        .timeout_in_seconds
        .unwrap_or(dispatchers::EPHEMERAL_DEFAULT_SECS);
    let created = dispatchers::register_ephemeral(
        &state.pool,
        &env,
        &body.url,
        &rule,
        body.account_id.as_deref(),
        timeout,
    )
    .await
    .map_err(register_error)?;
    Ok(Json(serde_json::to_value(created).expect("serializes")))
}

/// `GET /api/v1/event-dispatchers/{id}`: an EPHEMERAL dispatcher's state and attempts.
pub async fn get_ephemeral(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::not_found(format!("event dispatcher {id:?} not found"));
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let view = dispatchers::ephemeral(&state.pool, &env, uuid)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(serde_json::to_value(view).expect("serializes")))
}
