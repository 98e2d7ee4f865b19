//! The console's pages and the changes their forms make.

use std::time::Instant;

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::session::{self, Session};
use super::{
    Client, ConsoleState, Nav, Scope, back, check_csrf, csrf_field, failed, notice, off, page,
    page_bare, pretty, query_value, refused, when, with_env,
};
use crate::admin::{self, StateFilter};
use crate::dispatchers::{self, EventFacts};
use crate::events::list::{self, Cursor, EventFilter, EventState};
use crate::events::{EventsService, find_event};
use crate::ledger::manage::KindFigures;
use crate::ledger::{Job, JobState};
use crate::tenants::{self, SetLimits};

/// Rows a listing page shows.
const PAGE_ROWS: i64 = 50;
/// The overview's window, in minutes.
const WINDOW_MINUTES: i32 = 15;

type Page = Result<Response, Response>;

fn db(e: impl std::fmt::Display) -> Response {
    failed(e)
}

fn parse_opt<T: std::str::FromStr>(text: &Option<String>) -> Option<T> {
    text.as_deref()
        .filter(|t| !t.trim().is_empty())
        .and_then(|t| t.trim().parse().ok())
}

// ----- sign-in -----

#[derive(Deserialize)]
pub(super) struct SignIn {
    token: String,
}

pub(super) async fn sign_in_page(State(state): State<ConsoleState>, headers: HeaderMap) -> Page {
    if state.operator_token.is_none() {
        return Ok(off());
    }
    if session::find(&state.pool, &headers)
        .await
        .map_err(db)?
        .is_some()
    {
        return Ok(Redirect::to("/console").into_response());
    }
    Ok(sign_in_form(None).into_response())
}

fn sign_in_form(error: Option<&str>) -> Html<String> {
    page_bare(
        "Sign in",
        html! {
            h1 { "kongflow-events console" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/console/sign-in" {
                label for="token" { "Operator token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Sign in" }
            }
        },
    )
}

pub(super) async fn sign_in(
    State(state): State<ConsoleState>,
    Extension(Client(client)): Extension<Client>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Page {
    let Some(expected) = &state.operator_token else {
        return Ok(off());
    };
    if !session::same_origin(&headers) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "a sign-in from another site",
        ));
    }
    let now = Instant::now();
    if let Some(wait) = state.throttle.refused(client, now) {
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            sign_in_form(Some(&format!(
                "Too many failed sign-ins; try again in {} s.",
                wait.as_secs().max(1)
            ))),
        )
            .into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            wait.as_secs().max(1).to_string().parse().expect("digits"),
        );
        return Ok(r);
    }
    let given = tenants::hash_api_key(form.token.trim());
    if !tenants::constant_time_eq(&given, expected) {
        state.throttle.failed(client, now);
        tracing::warn!(client = ?client, "a wrong operator token at the console's sign-in");
        return Ok((
            StatusCode::UNAUTHORIZED,
            sign_in_form(Some("That is not the operator token.")),
        )
            .into_response());
    }
    let value = session::start(&state.pool, state.session_ttl)
        .await
        .map_err(db)?;
    let mut r = Redirect::to("/console").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(Some(&value), state.session_ttl, state.secure_cookies),
    );
    Ok(r)
}

#[derive(Deserialize)]
pub(super) struct CsrfOnly {
    csrf: Option<String>,
}

pub(super) async fn sign_out(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    headers: HeaderMap,
    Form(form): Form<CsrfOnly>,
) -> Page {
    check_csrf(&s, form.csrf.as_deref())?;
    session::end(&state.pool, &headers).await.map_err(db)?;
    let mut r = Redirect::to("/console/sign-in").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(None, state.session_ttl, state.secure_cookies),
    );
    Ok(r)
}

// ----- overview -----

#[derive(Deserialize, Default)]
pub(super) struct EnvQuery {
    env: Option<String>,
    done: Option<String>,
}

pub(super) async fn overview(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EnvQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let live = live_figures(&state, &scope).await?;
    let live_url = with_env("/console/overview.json", scope.path.as_deref());
    Ok(page(
        "Overview",
        Nav::Overview,
        &scope,
        &s,
        html! {
            h1 { "Overview" @if let Some(p) = &scope.path { " · " (p) } }
            (notice(q.done.as_deref()))
            section #live data-refresh=(live_url) data-every="5000" { (live) }
        },
    )
    .into_response())
}

/// The overview's live part alone, which the page fetches every few seconds.
pub(super) async fn overview_json(
    State(state): State<ConsoleState>,
    Query(q): Query<EnvQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let live = live_figures(&state, &scope).await?;
    Ok(Html(live.into_string()).into_response())
}

async fn live_figures(state: &ConsoleState, scope: &Scope) -> Result<Markup, Response> {
    let pool = &state.pool;
    let stats = crate::ledger::outbox::stats(pool).await.map_err(db)?;
    let (handoffs, handoff_age, set_aside) =
        crate::runs::handoff::backlog(pool).await.map_err(db)?;
    let (top, total) = crate::ledger::outbox::top_backlogs(pool, 10)
        .await
        .map_err(db)?;
    let (kinds, events, runs) = match &scope.current {
        Some(env) => (
            crate::ledger::manage::kind_figures(
                pool,
                env.id,
                std::time::Duration::from_secs(WINDOW_MINUTES as u64 * 60),
            )
            .await
            .map_err(db)?,
            list::per_minute(pool, env.id, WINDOW_MINUTES)
                .await
                .map_err(db)?,
            crate::runs::per_minute(pool, env.id, WINDOW_MINUTES)
                .await
                .map_err(db)?,
        ),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    let rate_limited = match (&state.limiter, &scope.current) {
        (Some(l), Some(env)) => l.refused(env.id),
        _ => 0,
    };
    let ms = |s: Option<f64>| s.map_or("–".to_string(), |s| format!("{:.1} ms", s * 1000.0));
    // The last whole minute's rate (the current one has only begun).
    let per_s = |v: &[i64]| v.iter().rev().nth(1).map_or(0.0, |n| *n as f64 / 60.0);
    Ok(html! {
        div.cards {
            div.card { h3 { "Events / s" } p.big data-key="events-rate" { (format!("{:.1}", per_s(&events))) }
                (spark(&events)) small { "last whole minute; bars per minute, last " (WINDOW_MINUTES) " min" } }
            div.card { h3 { "Runs / s" } p.big data-key="runs-rate" { (format!("{:.1}", per_s(&runs))) }
                (spark(&runs)) small { "last whole minute; bars per minute, last " (WINDOW_MINUTES) " min" } }
            div.card { h3 { "Outbox (all environments)" } p.big { (stats.backlog) }
                small { "oldest " (format!("{:.1}", stats.oldest_age_secs)) " s · delayed " (stats.delayed) } }
            div.card { h3 { "Run hand-offs waiting" } p.big { (handoffs) }
                small { "oldest " (format!("{:.1}", handoff_age)) " s · set aside " (set_aside) } }
            div.card { h3 { "Events refused by the rate limit" } p.big data-key="rate-limited" { (rate_limited) }
                small { "over HTTP, by this API process since it started" } }
        }
        h2 { "Jobs by kind" }
        table {
            thead { tr { th { "kind" } th { "backlog" } th { "in flight" } th { "delayed" }
                th { "ended (" (WINDOW_MINUTES) " min)" } th { "of which dead-lettered" } th { "queue latency p50" } th { "p99" } th { "p99 per minute" } } }
            tbody {
                @for KindFigures { kind, backlog, in_flight, delayed, started, discarded, latency_p50, latency_p99, p99_per_minute } in &kinds {
                    tr { td { (kind) } td { (backlog) } td { (in_flight) } td { (delayed) } td { (started) }
                        td { (discarded) } td { (ms(*latency_p50)) } td { (ms(*latency_p99)) }
                        td.chart { (spark(&p99_per_minute.iter().map(|p| p.map_or(0, |s| (s * 1000.0).ceil() as i64)).collect::<Vec<_>>())) } }
                }
                @if kinds.is_empty() { tr { td colspan="9" { "no jobs in the window" } } }
            }
        }
        h2 { "Top environments by backlog" }
        table {
            thead { tr { th { "environment" } th { "jobs waiting" } } }
            tbody {
                @for (id, waiting) in &top { tr { td { (scope.path_of(*id)) } td { (waiting) } } }
                @if top.is_empty() { tr { td colspan="2" { "nothing waits" } } }
            }
        }
        p { small { "All environments: " (total) " jobs waiting. Updated " (when(Utc::now())) " UTC." } }
    })
}

/// A small bar chart of counts, as inline SVG.
fn spark(values: &[i64]) -> Markup {
    let max = values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let w = 4.0;
    html! {
        svg.spark viewBox=(format!("0 0 {} 20", values.len() as f64 * w)) preserveAspectRatio="none" role="img" {
            @for (i, v) in values.iter().enumerate() {
                @let h = (*v as f64 / max * 20.0).max(if *v > 0 { 1.0 } else { 0.0 });
                rect x=(i as f64 * w) y=(20.0 - h) width=(w - 1.0) height=(h) {}
            }
        }
    }
}

// ----- events -----

#[derive(Deserialize, Default)]
pub(super) struct EventsQuery {
    env: Option<String>,
    id: Option<String>,
    name: Option<String>,
    state: Option<String>,
    since: Option<String>,
    until: Option<String>,
    cursor: Option<String>,
    done: Option<String>,
}

/// A time of a form: RFC 3339, or a date and time without zone (UTC).
fn parse_time(text: &Option<String>) -> Option<DateTime<Utc>> {
    let t = text.as_deref()?.trim();
    if t.is_empty() {
        return None;
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| d.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok())
                .map(|n| n.and_utc())
        })
}

pub(super) async fn events(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EventsQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let Some(env) = &scope.current else {
        return Ok(no_environment(&scope, &s, Nav::Events));
    };
    let env_path = scope.path.as_deref();
    if let Some(id) = q.id.as_deref().map(str::trim).filter(|i| !i.is_empty()) {
        return Ok(Redirect::to(&with_env(
            &format!("/console/events/{}", encode(id)),
            env_path,
        ))
        .into_response());
    }
    let filter = EventFilter {
        name: q.name.clone().filter(|n| !n.trim().is_empty()),
        since: parse_time(&q.since),
        until: parse_time(&q.until),
        state: parse_opt::<EventState>(&q.state),
        limit: PAGE_ROWS,
        cursor: q.cursor.as_deref().and_then(Cursor::decode),
    };
    let found = list::list_events(&state.pool, env.id, &filter)
        .await
        .map_err(db)?;
    let searched_to = found
        .next
        .filter(|_| (found.events.len() as i64) < PAGE_ROWS)
        .map(|c| c.timestamp);
    let next = found.next.map(|c| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("name", &q.name),
            ("state", &q.state),
            ("since", &q.since),
            ("until", &q.until),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                query.append_pair(k, v);
            }
        }
        query.append_pair("cursor", &c.encode());
        with_env(&format!("/console/events?{}", query.finish()), env_path)
    });
    Ok(page(
        "Events",
        Nav::Events,
        &scope,
        &s,
        html! {
            h1 { "Events" }
            (notice(q.done.as_deref()))
            form.filters method="get" action="/console/events" {
                input type="hidden" name="env" value=[env_path];
                label { "Id " input name="id" placeholder="an event's id"; }
                button type="submit" { "Find" }
            }
            form.filters method="get" action="/console/events" {
                input type="hidden" name="env" value=[env_path];
                label { "Name " input name="name" value=[q.name.as_deref()]; }
                label { "State "
                    select name="state" {
                        option value="" { "any" }
                        @for st in ["delayed", "pending", "delivered", "cancelled"] {
                            option value=(st) selected[q.state.as_deref() == Some(st)] { (st) }
                        }
                    }
                }
                label { "From " input type="datetime-local" name="since" value=[q.since.as_deref()]; }
                label { "Until " input type="datetime-local" name="until" value=[q.until.as_deref()]; }
                button type="submit" { "Search" }
            }
            table #events {
                thead { tr { th { "id" } th { "name" } th { "state" } th { "timestamp" } th { "deliver at" } } }
                tbody {
                    @for e in &found.events {
                        tr {
                            td { a href=(with_env(&format!("/console/events/{}", encode(&e.event_id)), env_path)) { (e.event_id) } }
                            td { (e.name) }
                            td { span class=(format!("state {}", EventState::of(e, found.now).as_str())) { (EventState::of(e, found.now).as_str()) } }
                            td { (when(e.timestamp)) }
                            td { (when(e.deliver_at)) }
                        }
                    }
                    @if found.events.is_empty() { tr { td colspan="5" { "no events" } } }
                }
            }
            @if let Some(t) = searched_to {
                p { small { "Matches among the " (list::MAX_SCANNED) " events looked at, back to "
                    (when(t)) "; older ones on the next page." } }
            }
            @if let Some(n) = next { p { a.next href=(n) { "Older →" } } }
        },
    )
    .into_response())
}

/// `text` as one segment of a URL's path: every byte but letters, digits and `*-._`
/// percent-encoded (the form encoding, whose `+` for a space means `+` in a path).
fn encode(text: &str) -> String {
    query_value(text).replace('+', "%20")
}

fn no_environment(scope: &Scope, s: &Session, nav: Nav) -> Response {
    page(
        "No environment",
        nav,
        scope,
        s,
        html! { h1 { "No such environment" } p { "Create one with " code { "kongflow-events env create org/project/env" } "." } },
    )
    .into_response()
}

pub(super) async fn event(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<EnvQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let Some(env) = scope.current.clone() else {
        return Ok(no_environment(&scope, &s, Nav::Events));
    };
    let env_path = scope.path.as_deref();
    let mut conn = state.pool.acquire().await.map_err(db)?;
    let Some(e) = find_event(&mut conn, env.id, &id).await.map_err(db)? else {
        return Ok((
            StatusCode::NOT_FOUND,
            page(
                "Event not found",
                Nav::Events,
                &scope,
                &s,
                html! { h1 { "No event " code { (id) } " in " (env_path.unwrap_or("")) } },
            ),
        )
            .into_response());
    };
    let runs = crate::runs::of_event(&mut conn, env.id, e.id)
        .await
        .map_err(db)?;
    drop(conn);
    let candidates = dispatchers::dispatchers_for_event(&state.pool, &env, &e.name)
        .await
        .map_err(db)?;
    let facts = (
        e.name.clone(),
        e.source.clone(),
        e.external_account_id,
        e.payload.clone(),
        e.context.clone(),
    );
    let run = tokio::task::spawn_blocking(move || {
        let (name, source, account, payload, context) = &facts;
        dispatchers::dry_run(
            candidates,
            EventFacts {
                name,
                source,
                account: *account,
                payload_type: "JSON",
                payload,
                context,
            },
            100,
        )
    })
    .await
    .map_err(db)?;
    let now = Utc::now();
    let st = EventState::of(&e, now);
    let cancellable = matches!(st, EventState::Delayed | EventState::Pending);
    let target = |d: &dispatchers::DispatcherView| -> String {
        d.job
            .clone()
            .or(d.dynamic_trigger.clone())
            .or(d.url.clone())
            .unwrap_or_default()
    };
    Ok(page(
        "Event",
        Nav::Events,
        &scope,
        &s,
        html! {
            h1 { "Event " code { (e.event_id) } }
            (notice(q.done.as_deref()))
            dl.facts {
                dt { "name" } dd { (e.name) }
                dt { "state" } dd { span class=(format!("state {}", st.as_str())) #event-state { (st.as_str()) } }
                dt { "source" } dd { (e.source) }
                dt { "timestamp" } dd { (when(e.timestamp)) }
                dt { "deliver at" } dd { (when(e.deliver_at)) }
                dt { "delivered at" } dd { (e.delivered_at.map(when).unwrap_or_else(|| "–".into())) }
                dt { "cancelled at" } dd { (e.cancelled_at.map(when).unwrap_or_else(|| "–".into())) }
                dt { "record id" } dd { code { (e.id) } }
            }
            @if cancellable {
                form method="post" action=(with_env(&format!("/console/events/{}/cancel", encode(&e.event_id)), env_path)) data-confirm="Cancel this event? It will not be delivered." {
                    (csrf_field(&s))
                    button.danger #cancel-event type="submit" { "Cancel event" }
                }
            }
            h2 { "Payload" } (pretty(&e.payload))
            h2 { "Context" } (pretty(&e.context))
            h2 { "Runs" }
            table #runs {
                thead { tr { th { "run" } th { "status" } th { "started" } th { "completed" } } }
                tbody {
                    @for r in &runs { tr { td { code { (r.id) } } td { (r.status) }
                        td { (r.started_at.map(when).unwrap_or_else(|| "–".into())) }
                        td { (r.completed_at.map(when).unwrap_or_else(|| "–".into())) } } }
                    @if runs.is_empty() { tr { td colspan="4" { "no runs" } } }
                }
            }
            h2 { "Dispatchers" }
            p { small { "Checked now against each dispatcher's current rule, as delivery checks: "
                (run.match_count) " take the event, " (run.miss_count) " do not." } }
            table #dispatchers {
                thead { tr { th { "dispatcher" } th { "kind" } th { "target" } th { "result" } } }
                tbody {
                    @for d in &run.matches {
                        tr.match { td { code { (d.id) } } td { (d.dispatchable_type) } td { (target(d)) }
                            td { @if e.delivered_at.is_some() { "reached" } @else { "will take it" } } }
                    }
                    @for (d, why) in &run.misses {
                        tr.miss { td { code { (d.id) } } td { (d.dispatchable_type) } td { (target(d)) }
                            td { "not reached: " span.reason { (why) } } }
                    }
                    @if run.matches.is_empty() && run.misses.is_empty() {
                        tr { td colspan="4" { "no dispatcher listens for " code { (e.name) } } }
                    }
                }
            }
        },
    )
    .into_response())
}

pub(super) async fn cancel_event(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<CsrfOnly>,
) -> Page {
    check_csrf(&s, form.csrf.as_deref())?;
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let env = scope.env()?;
    let done = match EventsService::new(state.pool.clone())
        .cancel_event(env, &id)
        .await
        .map_err(db)?
    {
        None => return Err(refused(StatusCode::NOT_FOUND, "no such event")),
        Some(r) if r.cancelled_at.is_some() => format!("Event {id} cancelled."),
        Some(_) => format!("Event {id} was already delivered: nothing cancelled."),
    };
    tracing::info!(event = %id, environment = %env.id, "event cancelled at the console");
    Ok(back(
        &with_env(
            &format!("/console/events/{}", encode(&id)),
            scope.path.as_deref(),
        ),
        &done,
    ))
}

// ----- jobs -----

#[derive(Deserialize, Default)]
pub(super) struct JobsQuery {
    env: Option<String>,
    kind: Option<String>,
    state: Option<String>,
    after: Option<String>,
    done: Option<String>,
}

pub(super) async fn jobs(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<JobsQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let env_path = scope.path.as_deref();
    let kind = q.kind.clone().filter(|k| !k.is_empty());
    let filter = admin::JobFilter {
        queue: None,
        kind: kind.clone(),
        state: parse_opt::<StateFilter>(&q.state),
        environment: scope.current.as_ref().map(|e| e.id),
        limit: PAGE_ROWS,
        after: parse_opt(&q.after),
    };
    let (jobs, next) = admin::list_jobs(&state.pool, &filter).await.map_err(db)?;
    let next = next.map(|n| {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [("kind", &q.kind), ("state", &q.state)] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                query.append_pair(k, v);
            }
        }
        query.append_pair("after", &n.to_string());
        with_env(&format!("/console/jobs?{}", query.finish()), env_path)
    });
    let states = [
        "scheduled",
        "available",
        "retryable",
        "completed",
        "discarded",
        "cancelled",
        "failed",
    ];
    Ok(page(
        "Jobs",
        Nav::Jobs,
        &scope,
        &s,
        html! {
            h1 { "Jobs" }
            (notice(q.done.as_deref()))
            form.filters method="get" action="/console/jobs" {
                input type="hidden" name="env" value=[env_path];
                label { "Kind " select name="kind" { option value="" { "any" }
                    @for k in ["deliverEvent", "events.invokeDispatcher", "events.deliverWebhook"] {
                        option value=(k) selected[kind.as_deref() == Some(k)] { (k) } } } }
                label { "State " select name="state" { option value="" { "any" }
                    @for st in states { option value=(st) selected[q.state.as_deref() == Some(st)] { (st) } } } }
                button type="submit" { "Show" }
            }
            form.filters method="post" action=(with_env("/console/jobs/retry-matching", env_path)) {
                (csrf_field(&s))
                label { "Retry all " select name="state" {
                    @for st in ["failed", "discarded", "retryable", "cancelled"] { option value=(st) { (st) } } } }
                label { " of kind " select name="kind" { option value="" { "any" }
                    @for k in ["deliverEvent", "events.invokeDispatcher", "events.deliverWebhook"] { option value=(k) { (k) } } } }
                button #retry-matching type="submit" { "Retry matching…" }
            }
            (jobs_table(&jobs, env_path))
            @if let Some(n) = next { p { a.next href=(n) { "Next →" } } }
        },
    )
    .into_response())
}

fn jobs_table(jobs: &[Job], env_path: Option<&str>) -> Markup {
    html! {
        table #jobs {
            thead { tr { th { "id" } th { "kind" } th { "state" } th { "attempt" } th { "run at" } th { "last error" } } }
            tbody {
                @for j in jobs {
                    tr {
                        td { a href=(with_env(&format!("/console/jobs/{}", j.id), env_path)) { (j.id) } }
                        td { (j.kind.as_str()) }
                        td { span class=(format!("state {}", j.state.as_str())) { (j.state.as_str()) } }
                        td { (j.attempt) " / " (j.max_attempts) }
                        td { (when(j.run_at)) }
                        td { (j.last_error().unwrap_or("")) }
                    }
                }
                @if jobs.is_empty() { tr { td colspan="6" { "no jobs" } } }
            }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct RetryMatching {
    csrf: Option<String>,
    state: String,
    kind: Option<String>,
    /// The count the confirmation showed; present once confirmed.
    confirm: Option<i64>,
}

pub(super) async fn retry_matching(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<RetryMatching>,
) -> Page {
    check_csrf(&s, form.csrf.as_deref())?;
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let env_path = scope.path.as_deref();
    let st: StateFilter = form
        .state
        .parse()
        .map_err(|e: String| refused(StatusCode::BAD_REQUEST, &e))?;
    let kind = form.kind.clone().filter(|k| !k.is_empty());
    let m = admin::matching(st, kind.as_deref(), scope.current.as_ref().map(|e| e.id));
    if form.confirm.is_none() {
        let n = admin::count_retryable(&state.pool, &m).await.map_err(db)?;
        return Ok(page(
            "Retry matching",
            Nav::Jobs,
            &scope,
            &s,
            html! {
                h1 { "Retry matching jobs" }
                p #retry-count { "Retry " strong { (n) } " job(s) in state " (form.state)
                    @if let Some(k) = &kind { " of kind " (k) } " in " (env_path.unwrap_or("")) "?" }
                p { small { "Jobs whose unique key a live job holds are skipped." } }
                form method="post" action=(with_env("/console/jobs/retry-matching", env_path)) {
                    (csrf_field(&s))
                    input type="hidden" name="state" value=(form.state);
                    input type="hidden" name="kind" value=(kind.clone().unwrap_or_default());
                    input type="hidden" name="confirm" value=(n);
                    button #confirm type="submit" { "Retry " (n) " job(s)" }
                    " " a href=(with_env("/console/jobs", env_path)) { "Back" }
                }
            },
        )
        .into_response());
    }
    let ids = admin::retry_jobs(&state.pool, &m).await.map_err(db)?;
    tracing::info!(count = ids.len(), "jobs retried at the console");
    Ok(back(
        &with_env("/console/jobs", env_path),
        &format!("Retried {} job(s).", ids.len()),
    ))
}

pub(super) async fn job(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
    Query(q): Query<EnvQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let env_path = scope.path.as_deref();
    let Some(j) = admin::get_job(&state.pool, id).await.map_err(db)? else {
        return Ok((
            StatusCode::NOT_FOUND,
            page(
                "Job not found",
                Nav::Jobs,
                &scope,
                &s,
                html! { h1 { "No job " (id) } },
            ),
        )
            .into_response());
    };
    let live = !matches!(
        j.state,
        JobState::Completed | JobState::Discarded | JobState::Cancelled
    );
    let args = serde_json::to_value(j.args).unwrap_or_default();
    Ok(page(
        "Job",
        Nav::Jobs,
        &scope,
        &s,
        html! {
            h1 { "Job " (j.id) }
            (notice(q.done.as_deref()))
            dl.facts {
                dt { "kind" } dd { (j.kind.as_str()) }
                dt { "state" } dd { span #job-state class=(format!("state {}", j.state.as_str())) { (j.state.as_str()) } }
                dt { "environment" } dd { (scope.path_of(j.environment_id)) }
                dt { "attempt" } dd { (j.attempt) " of " (j.max_attempts) }
                dt { "priority" } dd { (format!("{:?}", j.priority)) }
                dt { "run at" } dd { (when(j.run_at)) }
                dt { "created" } dd { (when(j.created_at)) }
                dt { "attempted" } dd { (j.attempted_at.map(when).unwrap_or_else(|| "–".into())) }
                dt { "finalized" } dd { (j.finalized_at.map(when).unwrap_or_else(|| "–".into())) }
                dt { "trace" } dd { (j.trace_id().unwrap_or_default()) }
            }
            div.actions {
                @if j.state != JobState::Available {
                    form method="post" action=(with_env(&format!("/console/jobs/{id}/retry"), env_path)) {
                        (csrf_field(&s)) button #retry type="submit" { "Retry" } }
                }
                @if live {
                    form method="post" action=(with_env(&format!("/console/jobs/{id}/cancel"), env_path)) data-confirm="Cancel this job?" {
                        (csrf_field(&s)) button.danger #cancel type="submit" { "Cancel" } }
                }
            }
            h2 { "Arguments" } (pretty(&args))
            h2 { "Errors" } (pretty(&j.errors))
        },
    )
    .into_response())
}

async fn job_change(
    state: &ConsoleState,
    s: &Session,
    id: i64,
    q: &EnvQuery,
    csrf: Option<&str>,
    retry: bool,
) -> Page {
    check_csrf(s, csrf)?;
    let done = if retry {
        admin::retry_job(&state.pool, id)
            .await
            .map(|_| format!("Job {id} retried."))
    } else {
        admin::cancel_job(&state.pool, id)
            .await
            .map(|_| format!("Job {id} cancelled."))
    };
    let done = match done {
        Ok(d) => d,
        Err(admin::AdminError::Refused(r)) => r.to_string(),
        Err(e) => return Err(db(e)),
    };
    tracing::info!(job = id, retry, "job changed at the console");
    Ok(back(
        &with_env(&format!("/console/jobs/{id}"), q.env.as_deref()),
        &done,
    ))
}

pub(super) async fn retry_job(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<CsrfOnly>,
) -> Page {
    job_change(&state, &s, id, &q, form.csrf.as_deref(), true).await
}

pub(super) async fn cancel_job(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<CsrfOnly>,
) -> Page {
    job_change(&state, &s, id, &q, form.csrf.as_deref(), false).await
}

// ----- dead letters -----

/// Most dead letters the page lists, and one replay takes.
const DEAD_SHOWN: usize = 100;

async fn broker(state: &ConsoleState) -> Result<lapin::Connection, Response> {
    crate::amqp::connect(&state.amqp_url, "kongflow-console")
        .await
        .map_err(|e| refused(StatusCode::SERVICE_UNAVAILABLE, &format!("RabbitMQ: {e}")))
}

pub(super) async fn dead_letters(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EnvQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let conn = broker(&state).await?;
    let letters = admin::dead_letters(&conn, &state.topology, &state.pool, DEAD_SHOWN).await;
    let _ = conn.close(200, "console".into()).await;
    // No relay has declared the topology yet: no dead-letter queue, so no dead letters.
    let (letters, undeclared) = match letters {
        Ok(l) => (l, false),
        Err(admin::AdminError::Amqp(e)) if crate::amqp::is_not_found(&e) => (Vec::new(), true),
        Err(e) => return Err(db(e)),
    };
    Ok(page(
        "Dead letters",
        Nav::DeadLetters,
        &scope,
        &s,
        html! {
            h1 { "Dead letters" }
            (notice(q.done.as_deref()))
            p { small { "The dead-letter queue of every environment (first " (DEAD_SHOWN) ")." } }
            @if undeclared { p.notice { "The dead-letter queue is not declared yet: no relay has started." } }
            form method="post" action=(with_env("/console/dead-letters/replay", scope.path.as_deref())) data-confirm="Replay the dead letters? Their discarded jobs run again." {
                (csrf_field(&s)) button #replay type="submit" disabled[letters.is_empty()] { "Replay " (letters.len()) " letter(s)" }
            }
            table #dead {
                thead { tr { th { "job" } th { "kind" } th { "attempts" } th { "ledger" } th { "dead at" } th { "reason" } } }
                tbody {
                    @for l in &letters {
                        tr {
                            td { @if let Some(id) = l.job_id { a href=(with_env(&format!("/console/jobs/{id}"), scope.path.as_deref())) { (id) } } @else { "–" } }
                            td { (l.kind.clone().unwrap_or_default()) }
                            td { (l.attempts.map(|a| a.to_string()).unwrap_or_default()) }
                            td { (l.ledger_state.clone().unwrap_or_else(|| "none".into())) }
                            td { (l.dead_at.clone().unwrap_or_default()) }
                            td { (l.reason) }
                        }
                    }
                    @if letters.is_empty() { tr { td colspan="6" { "none" } } }
                }
            }
        },
    )
    .into_response())
}

pub(super) async fn replay(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<CsrfOnly>,
) -> Page {
    check_csrf(&s, form.csrf.as_deref())?;
    let conn = broker(&state).await?;
    let report = admin::replay_dead(&conn, &state.topology, &state.pool, DEAD_SHOWN).await;
    let _ = conn.close(200, "console".into()).await;
    let report = report.map_err(db)?;
    tracing::info!(
        retried = report.retried.len(),
        cleared = report.cleared.len(),
        kept = report.kept.len(),
        "dead letters replayed at the console"
    );
    Ok(back(
        &with_env("/console/dead-letters", q.env.as_deref()),
        &admin::replay_summary(&report).replace('\n', " "),
    ))
}

// ----- dispatchers -----

#[derive(Deserialize, Default)]
pub(super) struct DispatchersQuery {
    env: Option<String>,
    after: Option<Uuid>,
    show: Option<Uuid>,
    done: Option<String>,
}

pub(super) async fn dispatchers(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<DispatchersQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let Some(env) = &scope.current else {
        return Ok(no_environment(&scope, &s, Nav::Dispatchers));
    };
    let env_path = scope.path.as_deref();
    let (list, next) = dispatchers::list_dispatchers(&state.pool, env, q.after, PAGE_ROWS)
        .await
        .map_err(db)?;
    let shown = match q.show {
        Some(id) => dispatchers::ephemeral(&state.pool, env, id)
            .await
            .map_err(db)?,
        None => None,
    };
    Ok(page(
        "Dispatchers",
        Nav::Dispatchers,
        &scope,
        &s,
        html! {
            h1 { "Dispatchers" }
            (notice(q.done.as_deref()))
            table #dispatcher-list {
                thead { tr { th { "dispatcher" } th { "kind" } th { "target" } th { "events" } th { "source" } th { "state" } th {} } }
                tbody {
                    @for d in &list {
                        tr {
                            td { code { (d.id) } }
                            td { (d.dispatchable_type) }
                            td {
                                @if d.dispatchable_type == "EPHEMERAL" {
                                    a href=(with_env(&format!("/console/dispatchers?show={}", d.id), env_path)) { (d.url.clone().unwrap_or_default()) }
                                } @else {
                                    (d.job.clone().or(d.dynamic_trigger.clone()).unwrap_or_default())
                                    @if let Some(k) = &d.key { " · " (k) }
                                }
                            }
                            td { (d.event_names.join(", ")) }
                            td { (d.source) }
                            td { @if d.enabled { "enabled" } @else { "disabled" } @if d.manual { " · manual" } }
                            td {
                                form method="post" action=(with_env(&format!("/console/dispatchers/{}/enabled", d.id), env_path)) {
                                    (csrf_field(&s))
                                    input type="hidden" name="enabled" value=(if d.enabled { "false" } else { "true" });
                                    button type="submit" { @if d.enabled { "Disable" } @else { "Enable" } }
                                }
                            }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="7" { "no dispatchers" } } }
                }
            }
            @if let Some(n) = next { p { a.next href=(with_env(&format!("/console/dispatchers?after={n}"), env_path)) { "Next →" } } }
            @if let Some(v) = shown {
                h2 { "Webhook " (v.url) }
                p { "Status " strong #webhook-status { (v.status) } " · expires " (when(v.expires_at)) }
                table #attempts {
                    thead { tr { th { "attempt" } th { "status" } th { "duration" } th { "error" } th { "event" } th { "at" } } }
                    tbody {
                        @for a in &v.attempts {
                            tr { td { (a.attempt) } td { (a.status.map(|s| s.to_string()).unwrap_or_else(|| "no answer".into())) }
                                td { (a.duration_ms) " ms" } td { (a.error.clone().unwrap_or_default()) }
                                td { code { (a.event_id) } } td { (when(a.at)) } }
                        }
                        @if v.attempts.is_empty() { tr { td colspan="6" { "no attempts yet" } } }
                    }
                }
            }
        },
    )
    .into_response())
}

#[derive(Deserialize)]
pub(super) struct Enabled {
    csrf: Option<String>,
    enabled: bool,
}

pub(super) async fn set_enabled(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Path(id): Path<Uuid>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<Enabled>,
) -> Page {
    check_csrf(&s, form.csrf.as_deref())?;
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let env = scope.env()?;
    let toggled = dispatchers::set_dispatcher_enabled(&state.pool, env, id, form.enabled)
        .await
        .map_err(db)?;
    tracing::info!(dispatcher = %id, enabled = form.enabled, "dispatcher changed at the console");
    Ok(back(
        &with_env("/console/dispatchers", scope.path.as_deref()),
        &match toggled {
            dispatchers::Toggled::Done => format!(
                "Dispatcher {id} {}.",
                if form.enabled { "enabled" } else { "disabled" }
            ),
            dispatchers::Toggled::NotFound => format!("No dispatcher {id} in this environment."),
            dispatchers::Toggled::Spent(how) => {
                format!("Dispatcher {id} has {how}: spent, it cannot be enabled again.")
            }
        },
    ))
}

// ----- environments -----

pub(super) async fn environments(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EnvQuery>,
) -> Page {
    let scope = Scope::of(&state.pool, q.env.as_deref()).await?;
    let (top, _) = crate::ledger::outbox::top_backlogs(&state.pool, 10)
        .await
        .map_err(db)?;
    let limit = |n: Option<i32>| n.map(|n| n.to_string()).unwrap_or_default();
    Ok(page(
        "Environments",
        Nav::Environments,
        &scope,
        &s,
        html! {
            h1 { "Environments" }
            (notice(q.done.as_deref()))
            p { small { "A limit left empty is no limit. Jobs in flight: each kind's jobs of the \
                environment published and not finished (its share of the workers); events per \
                second: its HTTP ingest." } }
            table #environments {
                thead { tr { th { "environment" } th { "type" } th { "jobs in flight" } th { "events / s" } th {} } }
                tbody {
                    @for e in &scope.all {
                        tr {
                            td { a href=(with_env("/console", Some(&e.path))) { (e.path) } }
                            td { (e.env_type) }
                            td colspan="3" {
                                form.limits method="post" action=(with_env("/console/environments/limits", scope.path.as_deref())) {
                                    (csrf_field(&s))
                                    input type="hidden" name="path" value=(e.path);
                                    input type="number" min="1" name="max_jobs_in_flight" value=(limit(e.max_jobs_in_flight)) aria-label="jobs in flight";
                                    input type="number" min="1" name="max_events_per_second" value=(limit(e.max_events_per_second)) aria-label="events per second";
                                    button type="submit" { "Save" }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Top environments by backlog" }
            table {
                thead { tr { th { "environment" } th { "jobs waiting" } } }
                tbody {
                    @for (id, waiting) in &top { tr { td { (scope.path_of(*id)) } td { (waiting) } } }
                    @if top.is_empty() { tr { td colspan="2" { "nothing waits" } } }
                }
            }
        },
    )
    .into_response())
}

#[derive(Deserialize)]
pub(super) struct Limits {
    csrf: Option<String>,
    path: String,
    max_jobs_in_flight: Option<String>,
    max_events_per_second: Option<String>,
}

/// A limit of the form: empty is none (no limit).
fn limit_of(text: Option<&str>) -> Result<Option<i32>, Response> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => t.parse().map(Some).map_err(|_| {
            refused(
                StatusCode::BAD_REQUEST,
                &format!("{t:?} is not a whole number (leave it empty for no limit)"),
            )
        }),
    }
}

pub(super) async fn set_limits(
    State(state): State<ConsoleState>,
    Extension(s): Extension<Session>,
    Query(q): Query<EnvQuery>,
    Form(form): Form<Limits>,
) -> Page {
    check_csrf(&s, form.csrf.as_deref())?;
    let set = SetLimits {
        max_jobs_in_flight: Some(limit_of(form.max_jobs_in_flight.as_deref())?),
        max_events_per_second: Some(limit_of(form.max_events_per_second.as_deref())?),
    };
    let done = match tenants::limits(&state.pool, &form.path, set).await {
        Ok(Some(l)) => {
            tracing::info!(environment = %form.path, max_jobs_in_flight = ?l.max_jobs_in_flight,
                max_events_per_second = ?l.max_events_per_second, "environment limits set at the console");
            format!("Limits of {} saved.", form.path)
        }
        Ok(None) => return Err(refused(StatusCode::NOT_FOUND, "no such environment")),
        Err(tenants::EnvironmentError::Db(e)) => return Err(db(e)),
        Err(e) => return Err(refused(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    Ok(back(
        &with_env("/console/environments", q.env.as_deref()),
        &done,
    ))
}
