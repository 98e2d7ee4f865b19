//! The OpenAPI document of the API, generated from the handlers' own types and their
//! `#[utoipa::path]` annotations, served at `/api/openapi.json`. `api/openapi.json` is the
//! document committed beside the code; `tests/it/openapi.rs` checks that it equals this one
//! byte for byte (`UPDATE_OPENAPI=1` rewrites it).

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kongflow-events",
        version = env!("CARGO_PKG_VERSION"),
        description = "An events queue service with trigger.dev v2's event API. Every /api/v1 and /api/v2 call takes `Authorization: Bearer <api key>` and is scoped to that key's environment; another environment's ids answer 404. Every 4xx has a body `{\"error\": \"...\"}`; so has a 405, with an `Allow` header. A call is authenticated before its body is read: without a valid key (or, on operator routes, token) it is answered 401 at once. `/metrics` is served on METRICS_ADDR, never on the API's port.",
    ),
    paths(healthz, readyz)
)]
struct ApiDoc;

/// The document as served and committed: the routes of [`super::routes`] with their
/// types, the probes, and what every authenticated call can be answered; pretty JSON and a
/// final newline.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    let routes = super::routes().into_openapi();
    let probes = std::mem::take(&mut doc.paths.paths);
    doc.paths.paths = routes.paths.paths;
    doc.paths.paths.extend(probes);
    doc.components
        .get_or_insert_with(Default::default)
        .schemas
        .extend(routes.components.unwrap_or_default().schemas);
    Common.modify(&mut doc);
    let mut text = doc.to_pretty_json().expect("the document serializes");
    text.push('\n');
    text
}

/// The document, generated once.
pub static OPENAPI: LazyLock<String> = LazyLock::new(document);

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    operation_id = "openapi",
    summary = "This document",
    responses(
        (status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object),
        (status = 503, description = "too many requests in flight; retry after `Retry-After`", body = super::error::ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
    )
)]
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI.as_str(),
    )
}

/// The probes, served by `probes` beside the API: documented here, where the document is made.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    summary = "The process lives",
    responses((status = 200, description = "ok", content_type = "text/plain", body = String))
)]
#[allow(dead_code)]
fn healthz() {}

#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    summary = "The process reaches Postgres and RabbitMQ and is not shutting down",
    responses(
        (status = 200, description = "ready", content_type = "text/plain", body = String),
        (status = 503, description = "not ready", content_type = "text/plain", body = String),
    )
)]
#[allow(dead_code)]
fn readyz() {}

/// A trigger.dev v2 event filter, in the document (the handlers take it as JSON and the
/// filter module reads it).
pub struct EventFilterSchema;

impl PartialSchema for EventFilterSchema {
    fn schema() -> RefOr<Schema> {
        let any = ObjectBuilder::new().schema_type(SchemaType::AnyValue);
        let values = OneOfBuilder::new()
            .item(ArrayBuilder::new().items(any))
            .item(Ref::from_schema_name("EventFilter"));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "trigger.dev v2 event filter: keys name fields; values are lists of strings, \
                 numbers or booleans, lists of content filters ($startsWith, $endsWith, \
                 $ignoreCaseEquals, $exists, $isNull, $anythingBut, $gt, $lt, $gte, $lte, \
                 $between, $includes, $not), or nested filters.",
            ))
            .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(Schema::OneOf(
                values.build(),
            )))))
            .into()
    }
}

impl ToSchema for EventFilterSchema {
    fn name() -> std::borrow::Cow<'static, str> {
        "EventFilter".into()
    }
}

/// What every call of the API can be answered besides its own answers, added to each
/// operation that does not say otherwise; and the security schemes.
struct Common;

/// An answer in the API's error shape.
fn error(description: &str, retry_after: bool) -> RefOr<utoipa::openapi::Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Error")))
            .build(),
    );
    if retry_after {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                )
                .description(Some("seconds to wait before retrying"))
                .build(),
        );
    }
    RefOr::T(response.build())
}

fn add(operation: &mut Operation, status: &str, response: RefOr<utoipa::openapi::Response>) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert(response);
}

impl Modify for Common {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "operatorToken",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "OPERATOR_TOKEN: the operator endpoints' token, not an environment's API key",
                    ))
                    .build(),
            ),
        );
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                // No tags: the document groups nothing.
                operation.tags = None;
                // The public routes (this document, the probes) name no security.
                if operation.security.is_none() {
                    continue;
                }
                let has_body = operation.request_body.is_some();
                if has_body {
                    add(operation, "400", error("a body that is not valid", false));
                    add(
                        operation,
                        "413",
                        error("the body, or an event of it, is too large", false),
                    );
                    add(
                        operation,
                        "415",
                        error("the body is not `Content-Type: application/json`", false),
                    );
                }
                add(
                    operation,
                    "401",
                    error("no API key, or not a valid one", false),
                );
                let timeout = if has_body {
                    "the request took longer than HTTP_REQUEST_TIMEOUT_MS, or its body took \
                     longer than HTTP_BODY_TIMEOUT_MS to arrive"
                } else {
                    "the request took longer than HTTP_REQUEST_TIMEOUT_MS"
                };
                add(operation, "408", error(timeout, false));
                add(
                    operation,
                    "429",
                    error(
                        "the environment has as many requests in flight as it may \
                         (`HTTP_MAX_IN_FLIGHT_PER_ENVIRONMENT`, a share of \
                         `HTTP_MAX_IN_FLIGHT`); retry after `Retry-After`",
                        true,
                    ),
                );
                add(
                    operation,
                    "503",
                    error(
                        "too many requests in flight; retry after `Retry-After`",
                        true,
                    ),
                );
            }
        }
    }
}
