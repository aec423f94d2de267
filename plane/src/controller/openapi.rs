//! The OpenAPI 3.1 document served at `GET /pub/openapi.json`: derived from the handlers'
//! `#[utoipa::path]` attributes and the wire types of `plane_protocol`, completed here with
//! what every operation shares (its error responses, the control token) and with the
//! aliases the router serves for the same handlers.

use super::api::{cluster, connect, drain, logs, prepull, revoke, status, terminate};
use super::{dns_socket, drone_socket, metrics, proxy_socket};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use plane_protocol::api::ApiError;
use std::sync::OnceLock;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Document, Ref, Required};
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
        status::handle_status,
        status::handle_status_stream,
        cluster::handle_health,
        cluster::handle_controller_status,
        cluster::handle_cluster_state,
        prepull::handle_prepull,
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
        (name = "nodes", description = "The sockets drones, proxies and DNS servers hold to the controller."),
    ),
)]
struct ApiDoc;

/// Routes served under a second path for the same handler: `(alias, original)`. The
/// `/c/{cluster}` forms also check that the backend belongs to that cluster.
const ALIASES: &[(&str, &str)] = &[
    ("/ctrl/revoke", "/ctrl/b/revoke"),
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

/// The whole document, built once.
pub fn document() -> &'static Document {
    static DOCUMENT: OnceLock<Document> = OnceLock::new();
    DOCUMENT.get_or_init(build)
}

fn build() -> Document {
    let mut doc = ApiDoc::openapi();
    doc.info.version = plane_protocol::PLANE_VERSION.to_string();
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
        let controlled = !path.starts_with("/pub/");
        let socket = path.ends_with("-socket");
        let takes_body = item.post.is_some();
        for operation in operations_mut(item) {
            add_shared_responses(operation, controlled, takes_body, socket);
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
                        .any(|status| status.starts_with('2') || status == "101"),
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
