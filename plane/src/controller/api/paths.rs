//! Path extractors whose rejections are JSON `ApiErrorResponse`s like every other error.

use crate::controller::error::ApiErrorResponse;
use crate::controller::ControllerState;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::StatusCode;
use plane_protocol::api::ApiErrorKind;
use plane_protocol::names::{BackendName, ClusterName, InvalidName, NodeName, PoolName};
use std::collections::HashMap;

/// The `{backend}` segment of `/b/{backend}/...` routes, and `{cluster}` for the
/// `/c/{cluster}/b/{backend}/...` forms.
pub struct BackendPath {
    pub backend: BackendName,
    pub cluster: Option<ClusterName>,
}

impl BackendPath {
    /// In the `/c/{cluster}/...` forms the backend must belong to that cluster; a backend
    /// of another cluster is as good as absent there.
    pub async fn check_cluster(&self, state: &ControllerState) -> Result<(), ApiErrorResponse> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        match state.store().backend(&self.backend).await? {
            Some(row) if &row.cluster == cluster => Ok(()),
            _ => Err(ApiErrorResponse::not_found(format!(
                "no backend {} in cluster {cluster}",
                self.backend
            ))),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for BackendPath {
    type Rejection = ApiErrorResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) =
            Path::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let backend = params
            .get("backend")
            .ok_or_else(|| ApiErrorResponse::bad_request("missing backend id in path"))?
            .parse()
            .map_err(|err| ApiErrorResponse::bad_request(format!("{err}")))?;
        let cluster = params
            .get("cluster")
            .map(|raw| raw.parse())
            .transpose()
            .map_err(invalid_cluster)?;
        Ok(BackendPath { backend, cluster })
    }
}

/// The `{cluster}` segment of `/c/{cluster}/...` routes.
pub struct ClusterPath(pub ClusterName);

impl<S: Send + Sync> FromRequestParts<S> for ClusterPath {
    type Rejection = ApiErrorResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state).await?;
        raw.parse().map(ClusterPath).map_err(invalid_cluster)
    }
}

fn invalid_cluster(err: InvalidName) -> ApiErrorResponse {
    ApiErrorResponse::new(
        StatusCode::BAD_REQUEST,
        ApiErrorKind::InvalidClusterName,
        err.to_string(),
    )
}

/// The `{cluster}` and `{drone}` segments of `/c/{cluster}/d/{drone}/...` routes.
pub struct DronePath {
    pub cluster: ClusterName,
    pub drone: NodeName,
}

impl<S: Send + Sync> FromRequestParts<S> for DronePath {
    type Rejection = ApiErrorResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) =
            Path::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let segment = |name: &str| {
            params
                .get(name)
                .ok_or_else(|| ApiErrorResponse::bad_request(format!("missing {name} in path")))
        };
        let cluster = segment("cluster")?.parse().map_err(invalid_cluster)?;
        let drone = segment("drone")?
            .parse()
            .map_err(|err| ApiErrorResponse::bad_request(format!("{err}")))?;
        Ok(DronePath { cluster, drone })
    }
}

/// The `{cluster}` and (when present) `{pool}` segments of `/c/{cluster}/warm` and
/// `/c/{cluster}/pools/{pool}/warm`; without a pool segment, the cluster's default pool.
pub struct PoolPath {
    pub cluster: ClusterName,
    pub pool: PoolName,
}

impl<S: Send + Sync> FromRequestParts<S> for PoolPath {
    type Rejection = ApiErrorResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(params) =
            Path::<HashMap<String, String>>::from_request_parts(parts, state).await?;
        let cluster = params
            .get("cluster")
            .ok_or_else(|| ApiErrorResponse::bad_request("missing cluster in path"))?
            .parse()
            .map_err(invalid_cluster)?;
        let pool = match params.get("pool") {
            None => PoolName::default(),
            Some(raw) if raw.is_empty() => {
                return Err(ApiErrorResponse::bad_request(
                    "an empty pool segment; the default pool's warm pools are at /ctrl/c/{cluster}/warm",
                ))
            }
            Some(raw) => raw
                .parse()
                .map_err(|err| ApiErrorResponse::bad_request(format!("{err}")))?,
        };
        Ok(PoolPath { cluster, pool })
    }
}

/// A WebSocket upgrade; a plain HTTP request to a socket route gets a JSON 400.
pub struct SocketUpgrade(pub WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for SocketUpgrade {
    type Rejection = ApiErrorResponse;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(SocketUpgrade)
            .map_err(|rejection: WebSocketUpgradeRejection| {
                ApiErrorResponse::bad_request(format!(
                    "this endpoint takes a WebSocket connection: {}",
                    rejection.body_text()
                ))
            })
    }
}
