//! Messages on the drone socket (`/ctrl/c/:cluster/drone-socket`), both directions.
//!
//! Delivery is at-least-once both ways: the controller stores each action until the drone
//! acks it and re-sends unacked actions when the drone reconnects; the drone keeps each
//! event until the controller acks it and replays the rest after reconnecting. Handlers on
//! both sides are idempotent, so a duplicate is harmless.

use crate::api::{BackendLogLine, ExecutorConfig, RegistryCredentials};
use crate::backend::{BackendStateUpdate, TerminationKind, TerminationReason};
use crate::names::{BackendName, BearerToken, NodeName, PoolName};
use serde::{Deserialize, Serialize};

/// Drone → controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageFromDrone {
    /// The pull asked for by [`MessageToDrone::Prepull`] `request_id` ended (`error` when it
    /// failed).
    PrepullDone {
        request_id: u64,
        #[serde(default)]
        error: Option<String>,
    },
    /// Lines of the logs asked for by [`MessageToDrone::Logs`] `request_id`, oldest first.
    /// The first batch is empty and comes as soon as the drone has found the logs.
    /// The drone sends a few batches ahead and then waits for
    /// [`MessageToDrone::LogsNext`], so a reader that falls behind never makes either side
    /// hold more than those few batches.
    LogLines {
        request_id: u64,
        lines: Vec<BackendLogLine>,
    },
    /// The logs asked for by `request_id` end here (with `follow`, because the backend
    /// exited).
    LogsEnd {
        request_id: u64,
        outcome: LogsOutcome,
    },
    /// First message on every connection.
    Hello {
        name: NodeName,
        /// The drone pool this drone serves; empty for the default pool.
        #[serde(default)]
        pool: PoolName,
        version: String,
        /// The commit the drone was built from.
        #[serde(default)]
        hash: String,
        /// This drone process (see [`crate::names::new_instance_id`]).
        #[serde(default)]
        instance: String,
        /// Milliseconds between this drone's heartbeats. The controller refuses a drone
        /// whose heartbeats could not keep its leases alive.
        #[serde(default)]
        heartbeat_interval_ms: Option<u64>,
        /// Milliseconds before a lease's end at which this drone starts stopping a backend
        /// it could not renew (see [`MessageToDrone::LeaseRenewal`]).
        #[serde(default)]
        fence_margin_ms: Option<u64>,
        /// Whether this drone's container engine can limit a container's disk (its storage
        /// driver supports a size option), so spawns with `disk_limit_bytes` may go here.
        #[serde(default)]
        disk_limits: bool,
    },
    /// Sent every heartbeat interval (and at once when a backend arrives). Lists the
    /// backends the drone is running, asking the controller to renew their leases; answered
    /// by [`MessageToDrone::LeaseRenewal`] with the same `seq`.
    Heartbeat {
        backends: Vec<BackendName>,
        /// Numbers this heartbeat within the drone process, so the answer can be matched to
        /// the moment it was sent.
        #[serde(default)]
        seq: u64,
    },
    /// A backend changed status.
    BackendEvent(BackendEvent),
    /// The drone has taken on an action; the controller stops re-sending it.
    ActionAck { action_id: i64 },
}

/// How a logs request ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogsOutcome {
    /// Every line asked for was sent.
    Complete,
    /// The drone keeps no logs of that backend: unknown here, or ended longer ago than its
    /// log retention.
    NotKept,
    /// The container engine failed; the message says how.
    Failed { message: String },
}

/// A status change of one backend, numbered by the drone for acknowledgement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendEvent {
    /// Unique per drone and growing, also across restarts (the drone stores unacked events
    /// and replays them with their original IDs); echoed in [`MessageToDrone::EventAck`].
    pub event_id: u64,
    pub backend_id: BackendName,
    pub update: BackendStateUpdate,
}

/// Controller → drone.
// Messages are decoded once and handled at once; boxing the action would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MessageToDrone {
    Action(BackendAction),
    /// The controller has durably recorded the event; the drone may forget it.
    EventAck {
        event_id: u64,
    },
    /// The answer to a [`MessageFromDrone::Heartbeat`]. Each backend in `renewed` holds its
    /// lease until at least `lease_ms` after the heartbeat `seq` was *sent*, measured on the
    /// drone's own monotonic clock: the controller started its `lease_ms` when it received
    /// the heartbeat, which is later. No wall clocks are compared.
    LeaseRenewal {
        seq: u64,
        lease_ms: u64,
        renewed: Vec<BackendName>,
        /// Backends the drone listed that the controller no longer considers running here
        /// (terminated, lost, or never its own): the drone must stop them at once.
        gone: Vec<BackendName>,
    },
    /// The controller will not accept this drone (e.g. its heartbeat cannot keep leases
    /// alive); the reason names the flags to change. The socket closes after this.
    Refused {
        reason: String,
    },
    /// Pull `image` now (answered by [`MessageFromDrone::PrepullDone`]).
    Prepull {
        request_id: u64,
        image: String,
        #[serde(default)]
        credentials: Option<RegistryCredentials>,
    },
    /// Send a backend's logs (answered by [`MessageFromDrone::LogLines`] batches, then
    /// [`MessageFromDrone::LogsEnd`]).
    Logs {
        request_id: u64,
        #[serde(flatten)]
        request: LogsRequest,
    },
    /// One more batch of `request_id` may be sent: the controller passed one on.
    LogsNext {
        request_id: u64,
    },
    /// Nobody reads `request_id` any more; stop sending it.
    LogsCancel {
        request_id: u64,
    },
}

/// Which of a backend's logs to send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    pub backend_id: BackendName,
    /// Keep sending new lines until the backend exits.
    #[serde(default)]
    pub follow: bool,
    /// Only the last this many lines printed so far (then, with `follow`, every new one).
    #[serde(default)]
    pub tail: Option<u64>,
}

/// Something the drone must do to one backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendAction {
    /// Stored by the controller; echoed in [`MessageFromDrone::ActionAck`].
    pub action_id: i64,
    pub backend_id: BackendName,
    pub action: ActionKind,
}

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ActionKind {
    Spawn(SpawnAction),
    /// Hand a warm backend (spawned with [`SpawnAction::warm`]) to the connect that claimed
    /// it: POST the claim to its `/.plane/claim`, report `ready` on a 2xx and terminate it
    /// otherwise. May arrive more than once; a backend already claimed ignores a repeat.
    Claim(ClaimAction),
    Terminate {
        kind: TerminationKind,
        reason: TerminationReason,
    },
}

/// Everything a drone needs to start a backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpawnAction {
    pub executable: ExecutorConfig,
    /// The key's name, given to the backend as `SESSION_BACKEND_KEY` (absent for spawns
    /// without a key).
    #[serde(default)]
    pub key: Option<String>,
    /// Grows every time the key changes hands; given as `SESSION_BACKEND_FENCING_TOKEN`.
    #[serde(default)]
    pub fencing_token: Option<i64>,
    /// Given as `SESSION_BACKEND_STATIC_TOKEN` when the backend uses a static token.
    #[serde(default)]
    pub static_token: Option<BearerToken>,
    /// Milliseconds from container start until the backend must answer HTTP; the drone's
    /// own startup timeout when absent.
    #[serde(default)]
    pub startup_timeout_ms: Option<u64>,
    /// The directory under the drone's mount base to bind at `/plane-data` (see
    /// [`crate::mount`]), when the spawn asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_dir: Option<String>,
    /// A warm-pool backend: started without a key, it is probed like any other but then
    /// reported `waiting` with [`BackendStateUpdate::warm`] set, and waits for a
    /// [`ActionKind::Claim`] before it is `ready`. Given as `SESSION_BACKEND_WARM=1`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
}

/// What a warm backend is told when a connect claims it; the drone POSTs it as JSON
/// ([`ClaimBody`]) to the backend's `/.plane/claim`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimAction {
    /// The key the backend now holds (absent for a keyless spawn).
    #[serde(default)]
    pub key: Option<String>,
    /// The key's fencing token, taken at the claim.
    #[serde(default)]
    pub fencing_token: Option<i64>,
    /// The backend's static token, when the claiming spawn asked for one.
    #[serde(default)]
    pub static_token: Option<BearerToken>,
}

/// The body of `POST /.plane/claim`, as a backend author sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimBody {
    pub backend_id: BackendName,
    pub key: Option<String>,
    pub fencing_token: Option<i64>,
    pub static_token: Option<BearerToken>,
}
