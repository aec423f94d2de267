//! A backend's lifecycle: statuses, termination causes, and the entries of its status stream.

use crate::time::Millis;
use serde::{Deserialize, Serialize};
use std::fmt::{self, Display};
use std::net::SocketAddr;

/// Where a backend is in its life. Statuses only move forward; `number()` gives the order
/// the store enforces, so a duplicated or reordered report can never move a backend back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BackendStatus {
    /// Chosen a drone; the drone has not acted yet. Only the controller writes this.
    Scheduled,
    /// The drone is fetching (or checking) the image.
    Loading,
    /// The drone is creating and starting the container.
    Starting,
    /// The container runs; the drone waits for its port to answer HTTP.
    Waiting,
    /// The backend answers HTTP and takes traffic.
    Ready,
    /// SIGTERM sent; waiting for the process to exit within the grace period.
    Terminating,
    /// SIGKILL sent (hard terminate, or the grace period ran out).
    HardTerminating,
    /// The process is gone; its key is free again.
    Terminated,
}

impl BackendStatus {
    pub const ALL: [BackendStatus; 8] = [
        Self::Scheduled,
        Self::Loading,
        Self::Starting,
        Self::Waiting,
        Self::Ready,
        Self::Terminating,
        Self::HardTerminating,
        Self::Terminated,
    ];

    /// The position of this status in the lifecycle; larger is later.
    pub fn number(self) -> i32 {
        match self {
            Self::Scheduled => 10,
            Self::Loading => 20,
            Self::Starting => 30,
            Self::Waiting => 40,
            Self::Ready => 50,
            Self::Terminating => 60,
            Self::HardTerminating => 70,
            Self::Terminated => 80,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Loading => "loading",
            Self::Starting => "starting",
            Self::Waiting => "waiting",
            Self::Ready => "ready",
            Self::Terminating => "terminating",
            Self::HardTerminating => "hard-terminating",
            Self::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// True once the backend is on its way out (it takes no new connections).
    pub fn is_terminating(self) -> bool {
        self.number() >= Self::Terminating.number()
    }
}

impl Display for BackendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a backend was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TerminationKind {
    /// SIGTERM, then SIGKILL after the drone's grace period.
    Soft,
    /// SIGKILL at once.
    Hard,
}

impl TerminationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Soft => "soft",
            Self::Hard => "hard",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Soft, Self::Hard]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Why Plane stopped a backend. A backend that exits on its own has no reason, only an
/// exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TerminationReason {
    /// Idle longer than `max_idle_seconds`, or older than `lifetime_limit_seconds`.
    Swept,
    /// A terminate call on the API.
    External,
    /// Its key lease could not be renewed.
    KeyExpired,
    /// Its drone stopped reporting.
    Lost,
    /// It never answered HTTP within the drone's startup timeout.
    StartupTimeout,
    /// It could not be started (image missing or unpullable, container rejected; the
    /// status entry's `message` says which), or a fault inside Plane stopped it. Plane 0.5
    /// reports a failed start this way too, and its clients know no other reason for it.
    /// (`startfailed`, which earlier versions wrote, reads as this.)
    #[serde(alias = "startfailed")]
    InternalError,
}

impl TerminationReason {
    const ALL: [TerminationReason; 6] = [
        Self::Swept,
        Self::External,
        Self::KeyExpired,
        Self::Lost,
        Self::StartupTimeout,
        Self::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Swept => "swept",
            Self::External => "external",
            Self::KeyExpired => "keyexpired",
            Self::Lost => "lost",
            Self::StartupTimeout => "startuptimeout",
            Self::InternalError => "internalerror",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "startfailed" => Some(Self::InternalError),
            _ => Self::ALL.into_iter().find(|r| r.as_str() == s),
        }
    }
}

/// What a ready backend's health checks say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendHealth {
    /// Answering its checks again after failing them.
    Healthy,
    /// Failing its checks (the entry's `message` says which and how); it is terminated if
    /// it keeps failing.
    Unhealthy,
}

impl BackendHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "healthy" => Some(Self::Healthy),
            "unhealthy" => Some(Self::Unhealthy),
            _ => None,
        }
    }
}

/// One status transition as a drone reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStateUpdate {
    pub status: BackendStatus,
    /// Where the backend listens, from `waiting` on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_kind: Option<TerminationKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_reason: Option<TerminationReason>,
    /// The process's exit code, on `terminated` when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A human-readable explanation, e.g. why the image could not be loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// On `ready` only: a change of health (the status itself does not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<BackendHealth>,
    /// On `waiting` only: this warm backend answers HTTP and waits for its claim (the
    /// status itself does not change). A drone that re-adopts a warm backend after a
    /// restart says this again, and the controller re-sends a claim it already made.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
}

impl BackendStateUpdate {
    pub fn status(status: BackendStatus) -> Self {
        Self {
            status,
            address: None,
            termination_kind: None,
            termination_reason: None,
            exit_code: None,
            message: None,
            health: None,
            warm: false,
        }
    }

    /// A warm backend answers HTTP and waits for a claim.
    pub fn warm(address: SocketAddr) -> Self {
        Self {
            address: Some(address),
            warm: true,
            ..Self::status(BackendStatus::Waiting)
        }
    }

    /// A ready backend's health changed.
    pub fn health(health: BackendHealth, message: String) -> Self {
        Self {
            health: Some(health),
            message: Some(message),
            ..Self::status(BackendStatus::Ready)
        }
    }
}

/// One entry of `GET /pub/b/:backend/status` and of the status stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendStatusStreamEntry {
    pub status: BackendStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_reason: Option<TerminationReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_kind: Option<TerminationKind>,
    /// On `terminated`: whether the process exited with a non-zero code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_error: Option<bool>,
    /// On `terminated`, when known: the process's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A human-readable explanation of a failure, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// On an entry that repeats `ready`: its health changed (see `message`). Such entries
    /// carry no event ID in the status stream, since the status did not move on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<BackendHealth>,
    /// When the backend entered this status.
    pub time: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_only_grow() {
        let mut last = 0;
        for status in BackendStatus::ALL {
            assert!(status.number() > last);
            last = status.number();
            assert_eq!(BackendStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).expect("serializes");
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        for reason in TerminationReason::ALL {
            let json = serde_json::to_string(&reason).expect("serializes");
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
        // What earlier drones stored for a failed start still reads.
        let old: TerminationReason = serde_json::from_str("\"startfailed\"").expect("reads");
        assert_eq!(old, TerminationReason::InternalError);
        assert_eq!(
            TerminationReason::parse("startfailed"),
            Some(TerminationReason::InternalError)
        );
    }
}
