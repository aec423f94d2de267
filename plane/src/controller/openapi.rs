//! The OpenAPI 3.1 document served at `GET /pub/openapi.json`: derived from the handlers'
//! `#[utoipa::path]` attributes and the wire types of `plane_protocol`, completed here with
//! what every operation shares (its error responses, the control token) and with the
//! aliases the router serves for the same handlers.

use super::api::{
    cluster, connect, drain, logs, overview, prepull, revoke, status, terminate, warm,
};
use super::{dns_socket, drone_socket, metrics, proxy_socket, ui};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use plane_protocol::api::ApiError;
use plane_protocol::auth::CLUSTER_SECRET_HEADER;
use std::sync::OnceLock;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOf, AnyOfBuilder, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, Ref, RefOr, Required};
use utoipa::{OpenApi, ToSchema};

/// The name of the bearer-token security scheme (the controller's `--ctrl-token`).
const CTRL_TOKEN_SCHEME: &str = "ctrl_token";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Plane",
        description = "Plane's controller: start, find and stop session backends, and watch the \
                       cluster that runs them. Every error is an `ApiError` JSON body. Routes under \
                       `/ctrl` (and `/metrics`) need `Authorization: Bearer <token>` when the \
                       controller runs with `--ctrl-token`; routes under `/pub` are for browsers \
                       and need none.",
        license(name = "MIT"),
    ),
    paths(
        connect::handle_connect,
        connect::handle_spawn,
        revoke::handle_revoke,
        terminate::handle_soft_terminate,
        terminate::handle_hard_terminate,
        logs::handle_logs,
        overview::handle_backend,
        overview::handle_overview,
        overview::handle_overview_stream,
        ui::handle_ui_redirect,
        ui::handle_ui_index,
        ui::handle_ui_file,
        status::handle_status,
        status::handle_status_stream,
        cluster::handle_health,
        cluster::handle_controller_status,
        cluster::handle_cluster_state,
        prepull::handle_prepull,
        warm::handle_set_default_warm_pool,
        warm::handle_set_warm_pool,
        drain::handle_drain,
        drain::handle_undrain,
        metrics::handle_metrics,
        drone_socket::handle_drone_socket,
        proxy_socket::handle_proxy_socket,
        dns_socket::handle_dns_socket,
        handle_openapi,
    ),
    components(schemas(ApiError, plane_protocol::backend::BackendStatusStreamEntry, plane_protocol::api::BackendLogLine)),
    tags(
        (name = "backends", description = "Start, reach and stop backends."),
        (name = "cluster", description = "The drones and proxies of a cluster."),
        (name = "controller", description = "The controller itself."),
        (name = "public", description = "What browsers read, without credentials."),
        (name = "dashboard", description = "The web dashboard's files (they need no token; the page asks for one)."),
        (name = "nodes", description = "The sockets drones, proxies and DNS servers hold to the controller."),
    ),
)]
struct ApiDoc;

/// Routes served under a second path for the same handler: `(alias, original)`. The
/// `/c/{cluster}` forms also check that the backend belongs to that cluster.
const ALIASES: &[(&str, &str)] = &[
    ("/ctrl/revoke", "/ctrl/b/revoke"),
    ("/ctrl/c/{cluster}/b/{backend}", "/ctrl/b/{backend}"),
    (
        "/ctrl/c/{cluster}/b/{backend}/soft-terminate",
        "/ctrl/b/{backend}/soft-terminate",
    ),
    (
        "/ctrl/c/{cluster}/b/{backend}/hard-terminate",
        "/ctrl/b/{backend}/hard-terminate",
    ),
    (
        "/ctrl/c/{cluster}/b/{backend}/logs",
        "/ctrl/b/{backend}/logs",
    ),
    (
        "/pub/c/{cluster}/b/{backend}/status",
        "/pub/b/{backend}/status",
    ),
    (
        "/pub/c/{cluster}/b/{backend}/status-stream",
        "/pub/b/{backend}/status-stream",
    ),
];

/// The event streams: the route, the schema of each event's JSON data, and whether events
/// are numbered (`id:`).
const EVENT_STREAMS: &[(&str, &str, bool)] = &[
    ("/ctrl/b/{backend}/logs", "BackendLogLine", false),
    ("/ctrl/overview-stream", "Overview", false),
    (
        "/pub/b/{backend}/status-stream",
        "BackendStatusStreamEntry",
        true,
    ),
];

/// The whole document, built once.
pub fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(build)
}

fn build() -> Document {
    let mut doc = ApiDoc::openapi();
    doc.info.version = plane_protocol::PLANE_VERSION.to_string();
    for (path, entry, numbered) in EVENT_STREAMS {
        let operation = doc.paths.paths[*path].get.as_mut().expect("a GET route");
        describe_events(operation, entry, *numbered);
    }
    for item in doc.paths.paths.values_mut() {
        for operation in operations_mut(item) {
            for parameter in operation.parameters.iter_mut().flatten() {
                if parameter.parameter_in == ParameterIn::Header {
                    not_nullable(parameter);
                }
            }
        }
    }
    let schemas = &mut doc.components.get_or_insert_with(Default::default).schemas;
    if let Some(RefOr::T(Schema::Object(executor))) = schemas.get_mut("ExecutorConfig") {
        executor
            .properties
            .insert("env".to_string(), environment().into());
    }
    // A warm pool's executable has no mount (there is no key to mount for yet). Said with
    // `allOf`, which also keeps schemathesis (4.32) from taking `0` as a valid body: it does
    // for an object whose required property is a bare `$ref`.
    if let Some(RefOr::T(Schema::Object(warm))) = schemas.get_mut("WarmPoolRequest") {
        if let Some(executable) = warm.properties.get_mut("executable") {
            let description = match &*executable {
                RefOr::Ref(reference) => Some(reference.description.clone()),
                _ => None,
            };
            let no_mount = AnyOfBuilder::new()
                .item(ObjectBuilder::new().schema_type(Type::Null))
                .item(
                    ObjectBuilder::new()
                        .schema_type(Type::Boolean)
                        .enum_values(Some([false])),
                );
            *executable = AllOfBuilder::new()
                .item(executable.clone())
                .item(ObjectBuilder::new().property("mount", no_mount))
                .description(description)
                .into();
        }
    }
    // What connect and spawn refuse that one field's schema cannot say.
    for (name, rules) in [
        (
            "ConnectRequest",
            vec![
                needs_key_or_spawn_config(),
                no_ttl_for_static_tokens(),
                key_for_own_mount(true),
            ],
        ),
        (
            "SpawnRequest",
            vec![no_ttl_for_static_tokens(), key_for_own_mount(false)],
        ),
    ] {
        let derived = schemas.remove(name).expect("a request schema");
        let description = match &derived {
            RefOr::T(Schema::Object(object)) => object.description.clone(),
            _ => None,
        };
        let all = rules
            .into_iter()
            .fold(AllOfBuilder::new().item(derived), |all, rule| {
                all.item(Schema::AnyOf(rule))
            })
            .description(description);
        schemas.insert(name.to_string(), all.into());
    }
    for (alias, original) in ALIASES {
        let mut item = doc.paths.paths[*original].clone();
        for operation in operations_mut(&mut item) {
            if let Some(id) = &mut operation.operation_id {
                id.push_str(if alias.contains("/c/{cluster}/") {
                    "_in_cluster"
                } else {
                    "_alias"
                });
            }
            if alias.contains("{cluster}") {
                let cluster = cluster_parameter();
                let parameters = operation.parameters.get_or_insert_with(Vec::new);
                parameters.insert(0, cluster);
            }
        }
        doc.paths.paths.insert(alias.to_string(), item);
    }
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        CTRL_TOKEN_SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("A token given to the controller with --ctrl-token."))
                .build(),
        ),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        let controlled = !path.starts_with("/pub/") && !path.starts_with("/ctrl/ui");
        let socket = path.ends_with("-socket");
        let takes_body = item.post.is_some();
        for operation in operations_mut(item) {
            add_shared_responses(operation, controlled, takes_body, socket);
            if socket {
                let parameters = operation.parameters.get_or_insert_with(Vec::new);
                parameters.extend(upgrade_headers());
            }
            if controlled {
                operation.security = Some(vec![SecurityRequirement::new(
                    CTRL_TOKEN_SCHEME,
                    Vec::<String>::new(),
                )]);
            }
        }
    }
    doc
}

/// Describes the server-sent events of an operation's `200`, one event as the schema reads
/// it: `data` holds one JSON `entry`.
fn describe_events(operation: &mut Operation, entry: &str, numbered: bool) {
    let mut data = ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(format!(
            "One `{entry}` (#/components/schemas/{entry}), as JSON."
        )))
        .build();
    data.content_media_type = "application/json".to_string();
    let mut event = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("data", data)
        .required("data")
        .property(
            "event",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["message"])),
        );
    if numbered {
        event = event
            .property(
                "id",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^[0-9]+$"))
                    .description(Some("The status number, for `Last-Event-ID`; absent on an entry that only changes health.")),
            );
    }
    let Some(RefOr::T(response)) = operation.responses.responses.get_mut("200") else {
        panic!("an event stream answers 200");
    };
    let content = response
        .content
        .get_mut("text/event-stream")
        .expect("documented as text/event-stream");
    content.schema = Some(event.into());
}

/// A header is text or absent, never `null`.
fn not_nullable(parameter: &mut Parameter) {
    if let Some(RefOr::T(Schema::Object(object))) = &mut parameter.schema {
        if let SchemaType::Array(types) = &object.schema_type {
            let rest: Vec<Type> = types
                .iter()
                .filter(|t| **t != Type::Null)
                .cloned()
                .collect();
            if let [only] = rest.as_slice() {
                object.schema_type = SchemaType::Type(only.clone());
            }
        }
    }
}

/// A connect names a key, a spawn config, or both (a 400 otherwise).
fn needs_key_or_spawn_config() -> AnyOf {
    let present = |field: &str| {
        ObjectBuilder::new()
            .required(field)
            .property(field, ObjectBuilder::new().schema_type(Type::Object))
    };
    AnyOfBuilder::new()
        .item(present("key"))
        .item(present("spawn_config"))
        .build()
}

/// `executable.mount: true` keeps a directory per key, so it needs one: the request has a key
/// (a connect may), or the mount is not `true`.
fn key_for_own_mount(key_allowed: bool) -> AnyOf {
    let not_own = AnyOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .enum_values(Some([false])),
        );
    let executable = ObjectBuilder::new().property("mount", not_own);
    let spawn_config = AnyOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(ObjectBuilder::new().property("executable", executable));
    let mut rule =
        AnyOfBuilder::new().item(ObjectBuilder::new().property("spawn_config", spawn_config));
    if key_allowed {
        rule = rule.item(
            ObjectBuilder::new()
                .required("key")
                .property("key", ObjectBuilder::new().schema_type(Type::Object)),
        );
    }
    rule.build()
}

/// `executable.env`: variable names as shells take them, values without NUL, and none of
/// the names Plane sets itself.
fn environment() -> ObjectBuilder {
    // No string is 1 character long and empty: a name with this schema cannot be given.
    let forbidden = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(0))
            .description(Some("Set by Plane; cannot be overridden."))
    };
    let mut env = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Extra environment for the process. Names Plane sets itself (`PORT`, \
             `SESSION_BACKEND_*`) are refused.",
        ))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Za-z_][A-Za-z0-9_]*$")),
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[^\\u0000]*$")),
        ));
    for name in plane_protocol::RESERVED_ENV_VARS {
        env = env.property(*name, forbidden());
    }
    env
}

/// `token_ttl_seconds` does not go with `spawn_config.use_static_token` (a 400): one of
/// them is absent, null or false.
fn no_ttl_for_static_tokens() -> AnyOf {
    let null = || ObjectBuilder::new().schema_type(Type::Null);
    let not_static = ObjectBuilder::new().property(
        "use_static_token",
        ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .enum_values(Some([false])),
    );
    AnyOfBuilder::new()
        .item(ObjectBuilder::new().property("token_ttl_seconds", null()))
        .item(ObjectBuilder::new().property(
            "spawn_config",
            AnyOfBuilder::new().item(null()).item(not_static),
        ))
        .build()
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.post.as_mut(),
        item.put.as_mut(),
        item.delete.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// What makes a request a WebSocket upgrade (RFC 6455), which the socket routes require, and
/// the cluster secret nodes present.
fn upgrade_headers() -> Vec<Parameter> {
    let header = |name: &str, schema: ObjectBuilder, required: bool, description: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(if required {
                Required::True
            } else {
                Required::False
            })
            .description(Some(description))
            .schema(Some(schema))
            .build()
    };
    let text = || ObjectBuilder::new().schema_type(Type::String);
    vec![
        header(
            "Connection",
            text().enum_values(Some(["Upgrade"])),
            true,
            "A WebSocket upgrade.",
        ),
        header(
            "Upgrade",
            text().enum_values(Some(["websocket"])),
            true,
            "A WebSocket upgrade.",
        ),
        header(
            "Sec-WebSocket-Version",
            text().enum_values(Some(["13"])),
            true,
            "The WebSocket protocol version.",
        ),
        header(
            "Sec-WebSocket-Key",
            text().pattern(Some("^[A-Za-z0-9+/]{21}[AQgw]==$")),
            true,
            "16 random bytes, base64-encoded.",
        ),
        header(
            CLUSTER_SECRET_HEADER,
            text(),
            false,
            "The cluster secret, when the controller runs with --cluster-secret.",
        ),
    ]
}

fn cluster_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("cluster")
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(
            "The cluster the backend must belong to (404 when it belongs to another).",
        ))
        .schema(Some(Ref::from_schema_name(
            plane_protocol::names::ClusterName::name(),
        )))
        .build()
}

/// The failures any operation can answer with, added where the operation does not describe
/// them itself: malformed input, missing credentials, a wrong method, an internal fault.
fn add_shared_responses(
    operation: &mut Operation,
    controlled: bool,
    takes_body: bool,
    socket: bool,
) {
    let mut shared = vec![
        (
            "400",
            if socket {
                "Not a WebSocket upgrade, or a malformed path."
            } else {
                "Malformed input: a path segment, query parameter or body field is invalid (the message names it)."
            },
        ),
        ("405", "The path does not take this method."),
        (
            "500",
            "An internal fault; the controller's log has details under the error's `id`.",
        ),
    ];
    if controlled {
        shared.push((
            "401",
            if socket {
                "The bearer token (--ctrl-token) or the cluster secret (--cluster-secret) is missing or wrong."
            } else {
                "The bearer token is missing or not one the controller accepts (it runs with --ctrl-token)."
            },
        ));
    }
    if takes_body {
        shared.push(("413", "The body is larger than 1 MiB."));
    }
    for (status, description) in shared {
        operation
            .responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(description).into());
    }
}

fn error_response(description: &str) -> ApiResponse {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name(ApiError::name()))),
        )
        .build()
}

/// The document itself, as JSON.
#[utoipa::path(
    get,
    path = "/pub/openapi.json",
    operation_id = "openapi",
    tag = "public",
    responses((status = 200, description = "This document: OpenAPI 3.1, as JSON.", content_type = "application/json", body = serde_json::Value)),
)]
pub async fn handle_openapi() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| {
        document()
            .to_json()
            .expect("the OpenAPI document serializes")
    });
    ([(CONTENT_TYPE, "application/json")], json.as_str()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::router::served_routes;
    use std::collections::BTreeSet;

    fn documented() -> BTreeSet<(String, String)> {
        let mut operations = BTreeSet::new();
        for (path, item) in &document().paths.paths {
            for (method, operation) in [("GET", &item.get), ("POST", &item.post)] {
                if operation.is_some() {
                    operations.insert((method.to_string(), path.clone()));
                }
            }
            for other in [
                &item.put,
                &item.delete,
                &item.patch,
                &item.head,
                &item.options,
            ] {
                assert!(other.is_none(), "{path} documents a method no route serves");
            }
        }
        operations
    }

    #[test]
    fn the_document_describes_every_route_and_nothing_else() {
        let served: BTreeSet<(String, String)> = served_routes()
            .into_iter()
            .map(|(method, path)| (method.to_string(), path))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the OpenAPI document: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "documented operations no route serves: {unserved:?}"
        );
    }

    #[test]
    fn every_operation_names_its_success_and_its_errors_are_api_errors() {
        let json = serde_json::to_value(document()).expect("serializes");
        assert_eq!(json["openapi"], "3.1.0");
        let mut ids = BTreeSet::new();
        for (path, item) in json["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                let id = operation["operationId"].as_str().expect("operationId");
                assert!(ids.insert(id.to_string()), "operationId {id} is used twice");
                let responses = operation["responses"].as_object().expect("responses");
                assert!(
                    responses
                        .keys()
                        .any(|status| status.starts_with(['2', '3']) || status == "101"),
                    "{method} {path} has no success response"
                );
                for (status, response) in responses {
                    assert!(
                        response["description"]
                            .as_str()
                            .is_some_and(|d| !d.is_empty()),
                        "{method} {path} {status} has no description"
                    );
                    if status.starts_with('4') || status.starts_with('5') {
                        assert_eq!(
                            response["content"]["application/json"]["schema"]["$ref"],
                            "#/components/schemas/ApiError",
                            "{method} {path} {status} is not an ApiError"
                        );
                    }
                }
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    if parameter["in"] == "path" {
                        let name = parameter["name"].as_str().expect("name");
                        assert!(
                            path.contains(&format!("{{{name}}}")),
                            "{path} has no {{{name}}}"
                        );
                    }
                }
            }
        }
        // Every `$ref` points at a schema the document holds.
        let text = json.to_string();
        let schemas = json["components"]["schemas"].as_object().expect("schemas");
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').expect("closing quote")];
            assert!(schemas.contains_key(name), "$ref to missing schema {name}");
        }
    }
}
