//! A typed client for the controller's HTTP API, as apps, `plane admin` and our tests call it.
//!
//! ```no_run
//! use plane_client::PlaneClient;
//! use plane_protocol::api::{ConnectRequest, ExecutorConfig, KeyConfig, SpawnConfig};
//! use plane_protocol::backend::BackendStatus;
//!
//! # async fn example() -> Result<(), plane_client::ClientError> {
//! // `http://TOKEN@host:port` sends TOKEN as the bearer token, as Plane's tools do.
//! let plane = PlaneClient::new("http://127.0.0.1:8080".parse().expect("url"));
//! let connected = plane
//!     .connect(&ConnectRequest {
//!         key: Some(KeyConfig::named("document-42")),
//!         spawn_config: Some(SpawnConfig::of_image("ghcr.io/me/editor:1")),
//!         user: Some("alice".to_string()),
//!         ..Default::default()
//!     })
//!     .await?;
//! // Give `connected.url` to the browser once the backend is ready.
//! plane
//!     .wait_for_status(&connected.backend_id, BackendStatus::Ready)
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod status_stream;

pub use status_stream::StatusStream;

use futures_util::stream::{BoxStream, StreamExt};
use plane_protocol::api::{
    ApiError, BackendDetails, BackendLogLine, ClusterState, ConnectRequest, ConnectResponse,
    ControllerStatus, DrainResult, ExecutorConfig, Overview, RevokeRequest, SpawnRequest,
    WarmPoolRequest, WarmPoolState,
};
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry, TerminationKind};
use plane_protocol::names::{BackendName, ClusterName, NodeName, PoolName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use url::Url;

/// How long one API call (not a status stream) may take before it fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long opening a TCP connection to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller answered with an error body: what it said, with the HTTP status.
    #[error("the controller refused ({status}, {kind:?}): {message}", kind = error.kind, message = error.message)]
    Api { status: u16, error: ApiError },
    /// The controller (or something in front of it) answered an error without Plane's error
    /// body.
    #[error("{url} answered {status}: {body}")]
    UnexpectedStatus { url: Url, status: u16, body: String },
    /// The request did not get an answer: connection refused, reset, timed out.
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    /// The answer arrived but is not the JSON this call expects.
    #[error("the answer from {url} is not what was expected: {detail}")]
    Decode { url: Url, detail: String },
    /// The backend terminated before it reached the status waited for.
    #[error("backend {backend} terminated before it was {wanted}")]
    TerminatedBefore {
        backend: BackendName,
        wanted: BackendStatus,
        entry: Box<BackendStatusStreamEntry>,
    },
    /// The status stream ended (and could not be resumed) before what was waited for.
    #[error("the status stream of backend {backend} ended before it was {wanted}")]
    StreamEnded {
        backend: BackendName,
        wanted: BackendStatus,
    },
}

impl ClientError {
    /// The HTTP status of an answer that was an error, if the controller answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::UnexpectedStatus { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The controller's error body, when it sent one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Self::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A controller's API. Cheap to clone: clones share one connection pool.
#[derive(Clone, Debug)]
pub struct PlaneClient {
    base: Url,
    bearer: Option<String>,
    http: reqwest::Client,
}

impl PlaneClient {
    /// A client of the controller at `controller` (its base URL). A user name in the URL
    /// (`http://TOKEN@host:port`) is sent as the bearer token and left out of every request
    /// URL.
    pub fn new(controller: Url) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            // Only fails when the TLS backend cannot start, which no caller can recover from.
            .unwrap_or_else(|_| reqwest::Client::new());
        Self::with_http_client(controller, http)
    }

    /// As [`PlaneClient::new`], on a `reqwest::Client` of the caller's (its proxy, TLS
    /// roots, pool settings).
    pub fn with_http_client(controller: Url, http: reqwest::Client) -> Self {
        let (mut base, bearer) = plane_protocol::auth::split_bearer(&controller);
        // `join` drops the last segment of a base without a trailing slash.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Self { base, bearer, http }
    }

    /// The controller's base URL, without credentials.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Replaces the bearer token sent with every request (`None`: send none).
    pub fn set_bearer_token(&mut self, token: Option<String>) {
        self.bearer = token;
    }

    /// `GET /ctrl/status`: the controller's version, build and database.
    pub async fn status(&self) -> Result<ControllerStatus, ClientError> {
        self.get(&["ctrl", "status"]).await
    }

    /// `GET /pub/health`: as [`PlaneClient::status`], without credentials.
    pub async fn health(&self) -> Result<ControllerStatus, ClientError> {
        self.get(&["pub", "health"]).await
    }

    /// `POST /ctrl/connect`: the backend holding the request's key (started if none does and
    /// the request says how), with a fresh token for it.
    pub async fn connect(&self, request: &ConnectRequest) -> Result<ConnectResponse, ClientError> {
        self.post(&["ctrl", "connect"], request).await
    }

    /// `POST /ctrl/spawn`: a new backend with no key.
    pub async fn spawn(&self, request: &SpawnRequest) -> Result<ConnectResponse, ClientError> {
        self.post(&["ctrl", "spawn"], request).await
    }

    /// `POST /ctrl/b/:backend/soft-terminate` or `/hard-terminate`. Returns once the
    /// controller has recorded the request; follow the status to see the backend end.
    pub async fn terminate(
        &self,
        backend: &BackendName,
        kind: TerminationKind,
    ) -> Result<(), ClientError> {
        let action = format!("{}-terminate", kind.as_str());
        self.post_expecting_null(&["ctrl", "b", backend.as_str(), &action], &EmptyBody {})
            .await
    }

    /// `GET /pub/b/:backend/status`: the backend's latest status.
    pub async fn backend_status(
        &self,
        backend: &BackendName,
    ) -> Result<BackendStatusStreamEntry, ClientError> {
        self.get(&["pub", "b", backend.as_str(), "status"]).await
    }

    /// The backend's statuses from its first, then each new one as it happens, ending after
    /// `terminated`. A dropped connection is resumed where it stopped (`Last-Event-ID`), with
    /// backoff; see [`StatusStream`].
    pub fn status_stream(&self, backend: &BackendName) -> StatusStream {
        StatusStream::new(self.clone(), backend.clone(), None)
    }

    /// As [`PlaneClient::status_stream`], starting after the status numbered `after` (the
    /// `id` of the last event a previous stream delivered).
    pub fn status_stream_after(&self, backend: &BackendName, after: i32) -> StatusStream {
        StatusStream::new(self.clone(), backend.clone(), Some(after))
    }

    /// What the backend printed, oldest first: the last `tail` lines (all kept ones when
    /// `None`), then with `follow` each new line until the backend exits. Resolves once
    /// the controller has found the logs (an error answer such as 404 comes here); the
    /// stream then ends when they do. Not resumed if the connection drops.
    pub async fn backend_logs(
        &self,
        backend: &BackendName,
        follow: bool,
        tail: Option<u64>,
    ) -> Result<BoxStream<'static, Result<BackendLogLine, ClientError>>, ClientError> {
        use eventsource_stream::Eventsource;
        let mut url = self.url(&["ctrl", "b", backend.as_str(), "logs"]);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("follow", if follow { "true" } else { "false" });
            if let Some(tail) = tail {
                query.append_pair("tail", &tail.to_string());
            }
        }
        let request = self
            .request(reqwest::Method::GET, url.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let response = send(request, &url).await?;
        let lines = response.bytes_stream().eventsource().map(move |event| {
            let event = event.map_err(|err| ClientError::Decode {
                url: url.clone(),
                detail: err.to_string(),
            })?;
            serde_json::from_str::<BackendLogLine>(&event.data).map_err(|err| ClientError::Decode {
                url: url.clone(),
                detail: format!("log line {:?}: {err}", event.data),
            })
        });
        Ok(lines.boxed())
    }

    /// Follows the backend's status until it reaches `wanted` (or a later status: one that
    /// is `ready` has been `starting`); returns that entry. A backend that terminates first is
    /// [`ClientError::TerminatedBefore`].
    pub async fn wait_for_status(
        &self,
        backend: &BackendName,
        wanted: BackendStatus,
    ) -> Result<BackendStatusStreamEntry, ClientError> {
        use futures_util::StreamExt;
        let mut stream = self.status_stream(backend);
        while let Some(entry) = stream.next().await {
            let entry = entry?;
            if entry.status.number() >= wanted.number() {
                if entry.status == BackendStatus::Terminated && wanted != BackendStatus::Terminated
                {
                    return Err(ClientError::TerminatedBefore {
                        backend: backend.clone(),
                        wanted,
                        entry: Box::new(entry),
                    });
                }
                return Ok(entry);
            }
        }
        Err(ClientError::StreamEnded {
            backend: backend.clone(),
            wanted,
        })
    }

    /// `GET /ctrl/b/:backend`: the backend (key, drone, times, why it ended) and every
    /// status it has been in.
    pub async fn backend(&self, backend: &BackendName) -> Result<BackendDetails, ClientError> {
        self.get(&["ctrl", "b", backend.as_str()]).await
    }

    /// `GET /ctrl/overview`: every cluster's nodes, and the backends live or ended in the
    /// last hour, newest first.
    pub async fn overview(&self) -> Result<Overview, ClientError> {
        self.get(&["ctrl", "overview"]).await
    }

    /// `GET /ctrl/c/:cluster/state`: the cluster's drones and proxies.
    pub async fn cluster_state(&self, cluster: &ClusterName) -> Result<ClusterState, ClientError> {
        self.get(&["ctrl", "c", cluster.as_str(), "state"]).await
    }

    /// `POST /ctrl/c/:cluster/pools/:pool/warm` (`/ctrl/c/:cluster/warm` for the default
    /// pool): keep `size` backends of `executable` started and waiting for a claim; 0
    /// removes them.
    pub async fn set_warm_pool(
        &self,
        cluster: &ClusterName,
        pool: &PoolName,
        executable: ExecutorConfig,
        size: u32,
    ) -> Result<WarmPoolState, ClientError> {
        let request = WarmPoolRequest { executable, size };
        if pool.is_default() {
            self.post(&["ctrl", "c", cluster.as_str(), "warm"], &request)
                .await
        } else {
            self.post(
                &[
                    "ctrl",
                    "c",
                    cluster.as_str(),
                    "pools",
                    pool.as_str(),
                    "warm",
                ],
                &request,
            )
            .await
        }
    }

    /// `POST /ctrl/c/:cluster/d/:drone/drain`: the drone gets no new backends; its own keep
    /// serving. `updated` is false when it was already draining.
    pub async fn drain(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
    ) -> Result<DrainResult, ClientError> {
        self.post(
            &["ctrl", "c", cluster.as_str(), "d", drone.as_str(), "drain"],
            &EmptyBody {},
        )
        .await
    }

    /// `POST /ctrl/c/:cluster/d/:drone/undrain`: reverses [`PlaneClient::drain`].
    pub async fn undrain(
        &self,
        cluster: &ClusterName,
        drone: &NodeName,
    ) -> Result<DrainResult, ClientError> {
        self.post(
            &[
                "ctrl",
                "c",
                cluster.as_str(),
                "d",
                drone.as_str(),
                "undrain",
            ],
            &EmptyBody {},
        )
        .await
    }

    /// `POST /ctrl/b/revoke`: every token issued to `user` for the backend stops working at
    /// every proxy.
    pub async fn revoke(&self, request: &RevokeRequest) -> Result<(), ClientError> {
        self.post_expecting_null(&["ctrl", "b", "revoke"], request)
            .await
    }

    /// The URL of an API path, given as its segments (each percent-encoded as needed).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.bearer {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, ClientError> {
        let url = self.url(segments);
        let request = self
            .request(reqwest::Method::GET, url.clone())
            .timeout(REQUEST_TIMEOUT);
        decode(url.clone(), send(request, &url).await?).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(segments);
        let request = self
            .request(reqwest::Method::POST, url.clone())
            .timeout(REQUEST_TIMEOUT)
            .json(body);
        decode(url.clone(), send(request, &url).await?).await
    }

    /// A POST whose success body is JSON `null` (terminate, revoke: Plane 0.5's answers).
    async fn post_expecting_null<B: Serialize>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<(), ClientError> {
        let _: Option<serde_json::Value> = self.post(segments, body).await?;
        Ok(())
    }
}

/// `{}`, the body of the POSTs that take no parameters.
#[derive(Serialize)]
struct EmptyBody {}

/// Sends a request; an answer that is not a success becomes the error it describes.
async fn send(
    request: reqwest::RequestBuilder,
    url: &Url,
) -> Result<reqwest::Response, ClientError> {
    let response = request
        .send()
        .await
        .map_err(|source| ClientError::Unreachable {
            url: url.clone(),
            source,
        })?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(error_from(url.clone(), response).await)
    }
}

/// The error an unsuccessful answer stands for: Plane's error body when it has one.
async fn error_from(url: Url, response: reqwest::Response) -> ClientError {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiError>(&body) {
        Ok(error) => ClientError::Api { status, error },
        Err(_) => ClientError::UnexpectedStatus {
            url,
            status,
            body: body.chars().take(512).collect(),
        },
    }
}

async fn decode<T: DeserializeOwned>(
    url: Url,
    response: reqwest::Response,
) -> Result<T, ClientError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|source| ClientError::Unreachable {
            url: url.clone(),
            source,
        })?;
    serde_json::from_slice(&bytes).map_err(|err| ClientError::Decode {
        url,
        detail: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_becomes_the_bearer_token_and_leaves_the_urls() {
        let client = PlaneClient::new("http://s3cret@127.0.0.1:9/base".parse().expect("url"));
        assert_eq!(client.bearer.as_deref(), Some("s3cret"));
        assert_eq!(
            client.url(&["ctrl", "status"]).as_str(),
            "http://127.0.0.1:9/base/ctrl/status"
        );
    }

    #[test]
    fn path_segments_are_encoded() {
        let client = PlaneClient::new("http://127.0.0.1:9/".parse().expect("url"));
        assert_eq!(
            client
                .url(&["ctrl", "c", "localhost:9090", "d", "a/b", "drain"])
                .as_str(),
            "http://127.0.0.1:9/ctrl/c/localhost:9090/d/a%2Fb/drain"
        );
    }
}
