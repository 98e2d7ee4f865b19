//! Dynamic triggers and their registrations, the dispatchers of an environment, and the
//! dry run that says which would take an event and why the others would not.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson, ErrorBody};
use super::jobs::{TriggerBody, register_error};
use super::openapi::EventFilterSchema;
use crate::dispatchers;
use crate::events::DEFAULT_SOURCE;
use crate::events::wire::SendEventBody;

#[derive(Debug, Deserialize, ToSchema)]
pub struct DynamicTriggerBody {
    /// Ids of registered jobs.
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// A dynamic trigger and the jobs it runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct DynamicTrigger {
    pub id: String,
    pub jobs: Vec<String>,
}

/// The dynamic trigger a route names.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DynamicTriggerParam {
    /// The dynamic trigger's id
    #[param(min_length = 1, max_length = 255)]
    pub id: String,
}

/// A registration of a dynamic trigger.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RegistrationParams {
    /// The dynamic trigger's id
    #[param(min_length = 1, max_length = 255)]
    pub id: String,
    /// The registration key
    #[param(min_length = 1, max_length = 255)]
    pub key: String,
}

/// `PUT /api/v1/dynamic-triggers/{id}`
#[utoipa::path(
    put,
    path = "/api/v1/dynamic-triggers/{id}",
    operation_id = "putDynamicTrigger",
    summary = "Create or update a dynamic trigger and its jobs",
    params(DynamicTriggerParam),
    request_body = DynamicTriggerBody,
    responses(
        (status = 200, description = "OK", body = DynamicTrigger),
        (status = 404, description = "a job it names is not registered", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn put_dynamic_trigger(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DynamicTriggerBody>,
) -> Result<Json<DynamicTrigger>, ApiError> {
    dispatchers::register_dynamic_trigger(&state.pool, &env, &id, &body.jobs)
        .await
        .map_err(register_error)?;
    Ok(Json(DynamicTrigger {
        id,
        jobs: body.jobs,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RegistrationBody {
    #[schema(min_length = 1, max_length = 255)]
    pub key: String,
    pub rule: TriggerBody,
}

/// A rule registered under a key: a DYNAMIC_TRIGGER dispatcher.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The dispatcher's id.
    pub id: Uuid,
    pub dynamic_trigger: String,
    pub key: String,
}

/// `POST /api/v1/dynamic-triggers/{id}/registrations`: a DYNAMIC_TRIGGER dispatcher.
#[utoipa::path(
    post,
    path = "/api/v1/dynamic-triggers/{id}/registrations",
    operation_id = "registerDynamicTrigger",
    summary = "Register a rule under a key (a DYNAMIC_TRIGGER dispatcher)",
    params(DynamicTriggerParam),
    request_body = RegistrationBody,
    responses(
        (status = 200, description = "OK", body = Registration),
        (status = 404, description = "no such dynamic trigger", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn post_registration(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RegistrationBody>,
) -> Result<Json<Registration>, ApiError> {
    let rule = body.rule.into_rule();
    let dispatcher =
        dispatchers::register_dynamic_registration(&state.pool, &env, &id, &body.key, &rule)
            .await
            .map_err(register_error)?;
    Ok(Json(Registration {
        id: dispatcher,
        dynamic_trigger: id,
        key: body.key,
    }))
}

/// A registration removed.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deleted {
    pub deleted: bool,
    pub dynamic_trigger: String,
    pub key: String,
}

/// `DELETE /api/v1/dynamic-triggers/{id}/registrations/{key}`
#[utoipa::path(
    delete,
    path = "/api/v1/dynamic-triggers/{id}/registrations/{key}",
    operation_id = "deleteRegistration",
    summary = "Remove a registration",
    params(RegistrationParams),
    responses(
        (status = 200, description = "OK", body = Deleted),
        (status = 404, description = "no such registration", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn delete_registration(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path((id, key)): Path<(String, String)>,
) -> Result<Json<Deleted>, ApiError> {
    if dispatchers::delete_dynamic_registration(&state.pool, &env, &id, &key).await? {
        Ok(Json(Deleted {
            deleted: true,
            dynamic_trigger: id,
            key,
        }))
    } else {
        Err(ApiError::not_found(format!(
            "registration {key:?} of dynamic trigger {id:?} not found"
        )))
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// dispatchers per page
    #[serde(default)]
    #[param(minimum = 1, maximum = 500, default = 100)]
    pub limit: Option<i64>,
    /// the `next` of the previous page
    #[serde(default)]
    pub after: Option<Uuid>,
}

/// A page of the environment's dispatchers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Dispatchers {
    pub dispatchers: Vec<dispatchers::DispatcherView>,
    /// pass as `after` for the next page; null on the last
    #[schema(required)]
    pub next: Option<Uuid>,
}

/// `GET /api/v1/dispatchers?limit=&after=`: a page (100 by default, at most 500), oldest
/// first, and `next` for the following page (`null` on the last).
#[utoipa::path(
    get,
    path = "/api/v1/dispatchers",
    operation_id = "listDispatchers",
    summary = "The environment's dispatchers, a page at a time, oldest first",
    params(PageQuery),
    responses(
        (status = 200, description = "OK", body = Dispatchers),
        (status = 400, description = "a query parameter that is not valid", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn list_dispatchers(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    page: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Dispatchers>, ApiError> {
    let Query(page) = page.map_err(|r| ApiError::bad_request(r.body_text()))?;
    let (list, next) = dispatchers::list_dispatchers(
        &state.pool,
        &env,
        page.after,
        page.limit.unwrap_or(DEFAULT_PAGE),
    )
    .await?;
    Ok(Json(Dispatchers {
        dispatchers: list,
        next,
    }))
}

/// Dispatchers in a page when the caller names no limit.
const DEFAULT_PAGE: i64 = 100;

/// Whether a dispatcher is enabled.
#[derive(Debug, Serialize, ToSchema)]
pub struct DispatcherState {
    pub id: Uuid,
    pub enabled: bool,
}

/// The dispatcher a route names.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DispatcherParam {
    /// The dispatcher's id (a UUID)
    #[param(min_length = 1, max_length = 255)]
    pub id: String,
}

async fn set_enabled(
    state: &AppState,
    env_id: &AuthEnv,
    id: &str,
    on: bool,
) -> Result<Json<DispatcherState>, ApiError> {
    let not_found = || ApiError::not_found(format!("dispatcher {id:?} not found"));
    let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
    match dispatchers::set_dispatcher_enabled(&state.pool, &env_id.0, uuid, on).await? {
        dispatchers::Toggled::Done => Ok(Json(DispatcherState {
            id: uuid,
            enabled: on,
        })),
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
#[utoipa::path(
    post,
    path = "/api/v1/dispatchers/{id}/enable",
    operation_id = "enableDispatcher",
    summary = "Enable a dispatcher",
    params(DispatcherParam),
    responses(
        (status = 200, description = "OK", body = DispatcherState),
        (status = 404, description = "no such dispatcher in this environment", body = ErrorBody),
        (status = 409, description = "an EPHEMERAL dispatcher that has fired or expired: spent, it cannot be enabled again", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn enable_dispatcher(
    State(state): State<AppState>,
    env: AuthEnv,
    Path(id): Path<String>,
) -> Result<Json<DispatcherState>, ApiError> {
    set_enabled(&state, &env, &id, true).await
}

/// `POST /api/v1/dispatchers/{id}/disable`
#[utoipa::path(
    post,
    path = "/api/v1/dispatchers/{id}/disable",
    operation_id = "disableDispatcher",
    summary = "Disable a dispatcher",
    params(DispatcherParam),
    responses(
        (status = 200, description = "OK", body = DispatcherState),
        (status = 404, description = "no such dispatcher in this environment", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn disable_dispatcher(
    State(state): State<AppState>,
    env: AuthEnv,
    Path(id): Path<String>,
) -> Result<Json<DispatcherState>, ApiError> {
    set_enabled(&state, &env, &id, false).await
}

/// Most matches, and most misses, a dry run lists; it counts them all.
pub const MAX_DRY_RUN_LISTED: usize = 100;

/// What a dry run found.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatchResult {
    pub matches: Vec<Match>,
    pub misses: Vec<MatchMiss>,
    /// dispatchers that would take the event (at most 100 are listed)
    pub match_count: usize,
    /// dispatchers that would not (at most 100 are listed)
    pub miss_count: usize,
    /// evaluation steps the filters cost (the budget is 1,000,000)
    pub steps: u64,
}

/// A dispatcher that would take the event.
#[derive(Debug, Serialize, ToSchema)]
pub struct Match {
    pub dispatcher: dispatchers::DispatcherView,
}

/// A dispatcher that would not take the event, and why.
#[derive(Debug, Serialize, ToSchema)]
pub struct MatchMiss {
    pub dispatcher: dispatchers::DispatcherView,
    pub reason: String,
}

/// `POST /api/v1/events/match`: which dispatchers an event would reach, and for each that
/// it would not, why (the first check that fails; for a filter, its path). Stores nothing.
/// Only dispatchers whose rule lists the event's name are looked at: those delivery would
/// read, the disabled and manual ones, and the newest expired EPHEMERAL ones.
/// Lists at most [`MAX_DRY_RUN_LISTED`] of each, with their counts; the filters run with the
/// step budget delivery would give the event, off the async threads.
#[utoipa::path(
    post,
    path = "/api/v1/events/match",
    operation_id = "matchEvent",
    summary = "Dry run: which dispatchers an event would reach, and why not the others",
    request_body = SendEventBody,
    responses(
        (status = 200, description = "OK", body = MatchResult),
    ),
    security(("bearerAuth" = []))
)]
pub async fn match_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    ApiJson(body): ApiJson<SendEventBody>,
) -> Result<Json<MatchResult>, ApiError> {
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
        let run = dispatchers::dry_run(dispatchers, facts, MAX_DRY_RUN_LISTED);
        MatchResult {
            matches: run
                .matches
                .into_iter()
                .map(|dispatcher| Match { dispatcher })
                .collect(),
            misses: run
                .misses
                .into_iter()
                .map(|(dispatcher, reason)| MatchMiss { dispatcher, reason })
                .collect(),
            match_count: run.match_count,
            miss_count: run.miss_count,
            steps: run.steps,
        }
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(answer))
}

/// The body of `POST /api/v1/event-dispatchers/ephemeral` (trigger.dev v2's).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EphemeralDispatcherBody)]
pub struct EphemeralBody {
    /// http or https, no credentials. Where it resolves is checked when the webhook is
    /// sent: loopback, private, link-local (cloud metadata), shared, multicast and reserved
    /// addresses are refused unless the worker's WEBHOOK_ALLOW_NETS allows them.
    #[schema(min_length = 1, max_length = 2048)]
    pub url: String,
    pub name: super::jobs::OneOrMany,
    /// default trigger.dev
    #[serde(default)]
    #[schema(value_type = String, min_length = 1, max_length = 255)]
    pub source: Option<String>,
    #[serde(default)]
    #[schema(value_type = EventFilterSchema)]
    pub filter: Option<Value>,
    #[serde(default)]
    #[schema(value_type = EventFilterSchema)]
    pub context_filter: Option<Value>,
    #[serde(default)]
    #[schema(value_type = String, min_length = 1, max_length = 255)]
    pub account_id: Option<String>,
    #[serde(default)]
    #[schema(value_type = i64, minimum = 10, maximum = 31536000, default = 3600)]
    pub timeout_in_seconds: Option<i64>,
}

/// `POST /api/v1/event-dispatchers/ephemeral`: a dispatcher that POSTs the first event its
/// rule matches to `url`, signed, once, before `timeoutInSeconds` pass. The answer carries
/// the signing secret when it created the dispatcher.
#[utoipa::path(
    post,
    path = "/api/v1/event-dispatchers/ephemeral",
    operation_id = "createEphemeralDispatcher",
    summary = "Create an EPHEMERAL dispatcher: the first event its rule matches is POSTed to the URL, signed (Standard Webhooks), once, before it expires. Idempotent on (url, environment): while one of the URL is live it is returned unchanged, without its secret.",
    request_body = EphemeralBody,
    responses(
        (status = 200, description = "OK", body = dispatchers::Ephemeral),
    ),
    security(("bearerAuth" = []))
)]
pub async fn post_ephemeral(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    ApiJson(body): ApiJson<EphemeralBody>,
) -> Result<Json<dispatchers::Ephemeral>, ApiError> {
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
    Ok(Json(created))
}

/// `GET /api/v1/event-dispatchers/{id}`: an EPHEMERAL dispatcher's state and attempts.
#[utoipa::path(
    get,
    path = "/api/v1/event-dispatchers/{id}",
    operation_id = "getEphemeralDispatcher",
    summary = "An EPHEMERAL dispatcher's state and its webhook's attempts (the newest 100)",
    params(DispatcherParam),
    responses(
        (status = 200, description = "OK", body = dispatchers::EphemeralView),
        (status = 404, description = "no such EPHEMERAL dispatcher in this environment", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn get_ephemeral(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(id): Path<String>,
) -> Result<Json<dispatchers::EphemeralView>, ApiError> {
    let not_found = || ApiError::not_found(format!("event dispatcher {id:?} not found"));
    let uuid = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let view = dispatchers::ephemeral(&state.pool, &env, uuid)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(view))
}
