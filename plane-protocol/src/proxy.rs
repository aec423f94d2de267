//! Messages on the proxy socket (`/ctrl/c/:cluster/proxy-socket`), both directions.

use crate::api::BackendProtocol;
use crate::backend::{BackendStatus, TerminationReason};
use crate::names::{BackendName, BearerToken, NodeName, SecretToken};
use crate::time::Millis;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::SocketAddr;

/// Proxy → controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageFromProxy {
    /// First message on every connection. Followed at once by a
    /// [`MessageFromProxy::ConnectionsChanged`] listing every backend with an open
    /// connection (the controller forgets what an earlier session reported).
    Hello {
        name: NodeName,
        version: String,
        /// The commit the proxy was built from.
        #[serde(default)]
        hash: String,
        /// This proxy process (see [`crate::names::new_instance_id`]).
        #[serde(default)]
        instance: String,
        /// Milliseconds between this proxy's keep-alive reports; the controller lets an
        /// open connection it was told of lapse after three of them without a refresh.
        #[serde(default)]
        report_interval_ms: Option<u64>,
    },
    /// Sent as it happens (a few times a second at most): backends that gained their first
    /// open connection through this proxy, and backends that lost their last. Every report
    /// interval, every backend still open is sent again in `opened`. A backend with an open
    /// connection is never reaped as idle; idle time counts from its close.
    ConnectionsChanged {
        opened: Vec<BackendName>,
        closed: Vec<BackendName>,
    },
    /// Where does this token lead? Answered by [`MessageToProxy::RouteResponse`] once the
    /// backend is ready or is known never to become ready, or with
    /// [`RouteAnswer::Starting`] when the controller's own wait runs out first.
    RouteRequest { token: BearerToken },
    /// Sent every report interval: the backends that had a connection open, or any
    /// traffic, since the previous report. Keeps them from being reaped as idle.
    KeepAlive { backends: Vec<BackendName> },
    /// A step of getting the cluster's certificate (see [`CertRequest`]); answered by a
    /// [`MessageToProxy::Cert`] with the same `id`.
    Cert { id: u64, request: CertRequest },
}

/// How long a granted certificate lease lasts unless its holder takes it again; the holder
/// does so every third of it while it orders.
pub const CERT_LEASE_SECONDS: u64 = 60;

/// The proxy's certificate manager asks the controller, one step at a time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum CertRequest {
    /// The certificate a proxy of this cluster stored last, if any.
    Fetch,
    /// Take (or extend) the cluster's certificate lease: only its holder orders from the CA,
    /// so a cluster's proxies make one order between them.
    TakeLease,
    /// Serve these values as the TXT record of `_acme-challenge.<cluster host>` (lease
    /// holders only).
    PublishTxt { values: Vec<String> },
    /// Keep this newly issued certificate for the cluster's other proxies.
    Store { certificate: ClusterCertificate },
    /// Done ordering: give up the lease and withdraw the TXT values.
    ReleaseLease,
}

/// The controller's answer to a [`CertRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum CertResponse {
    Certificate {
        certificate: Option<ClusterCertificate>,
    },
    /// Whether the lease is this proxy's now (`false`: another proxy holds it).
    Lease {
        granted: bool,
    },
    /// Whether the values were published (`false`: this proxy does not hold the lease).
    TxtPublished {
        published: bool,
    },
    /// Whether the certificate was kept (`false`: a newer one already is).
    Stored {
        stored: bool,
    },
    Released,
    /// The controller could not do it (its database failed, say); try again later.
    Failed {
        error: String,
    },
}

/// A certificate chain (leaf first) and its private key, both PEM.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterCertificate {
    pub chain_pem: String,
    pub key_pem: String,
    /// When the leaf certificate expires.
    pub not_after: Millis,
}

impl std::fmt::Debug for ClusterCertificate {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCertificate")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Controller → proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageToProxy {
    /// The answer to a [`MessageFromProxy::RouteRequest`].
    RouteResponse {
        token: BearerToken,
        answer: RouteAnswer,
    },
    /// The backend is stopping: forget every route to it and refuse new requests.
    BackendRemoved { backend_id: BackendName },
    /// The controller will not accept this proxy (another one with its name is connected);
    /// the socket closes after this.
    Refused { reason: String },
    /// Every token of `backend_id` issued to `user` was revoked: forget their routes and
    /// refuse their requests from now on.
    TokensRevoked {
        backend_id: BackendName,
        user: String,
        /// Tokens issued up to this time are revoked; later ones are not.
        revoked_at: Millis,
    },
    /// The answer to the [`MessageFromProxy::Cert`] with this `id`.
    Cert { id: u64, response: CertResponse },
}

/// What the controller knows about a token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouteAnswer {
    /// The backend is ready: send the token's traffic here.
    Ready(RouteInfo),
    /// No such token, a revoked one, or one for a backend of another cluster.
    Unknown,
    /// The token's lifetime (`token_ttl_seconds`) has ended.
    Expired,
    /// The token's backend has stopped (or is stopping) and will never serve it.
    Terminated {
        backend_id: BackendName,
        /// Why Plane stopped it; `None` when the process exited on its own.
        #[serde(default)]
        reason: Option<TerminationReason>,
        /// The process's exit code, when it exited and the code is known.
        #[serde(default)]
        exit_code: Option<i32>,
    },
    /// Still starting (at `status`) when the controller stopped waiting; ask again to keep
    /// waiting.
    Starting {
        backend_id: BackendName,
        status: BackendStatus,
    },
}

/// Where to send a token's traffic, and what to tell the backend about the caller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    pub backend_id: BackendName,
    /// The backend's published address on its drone.
    pub address: SocketAddr,
    /// Sent as `x-verified-secret`.
    pub secret_token: SecretToken,
    /// Sent as `x-verified-username` when present.
    #[serde(default)]
    pub user: Option<String>,
    /// Sent as `x-verified-user-data` (JSON).
    #[serde(default)]
    pub user_data: Value,
    /// When the token was issued: a revocation covers the tokens issued before it.
    #[serde(default)]
    pub issued_at: Millis,
    /// When the token stops working, if it was given a lifetime.
    #[serde(default)]
    pub expires_at: Option<Millis>,
    /// For a backend with a subdomain: the only `Host` its requests may come to
    /// (`<subdomain>.<cluster>`).
    #[serde(default)]
    pub host: Option<String>,
    /// How the backend speaks HTTP.
    #[serde(default)]
    pub protocol: BackendProtocol,
}
