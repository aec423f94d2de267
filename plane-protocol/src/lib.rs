//! Plane's wire types: validated names, HTTP request/response bodies and socket messages.
//!
//! This crate is pure data. It holds no server, database, Docker or HTTP code, so every
//! component (and any client) can depend on it cheaply.

pub mod api;
pub mod auth;
pub mod backend;
pub mod dns;
pub mod drone;
pub mod mount;
pub mod names;
pub mod proxy;
pub mod time;

/// Environment variables Plane sets in every backend; users may not set them.
pub const RESERVED_ENV_VARS: &[&str] = &[
    "PORT",
    "SESSION_BACKEND_ID",
    "SESSION_BACKEND_KEY",
    "SESSION_BACKEND_FENCING_TOKEN",
    "SESSION_BACKEND_STATIC_TOKEN",
    "SESSION_BACKEND_WARM",
];

/// The port a backend container listens on inside its network namespace (`PORT`).
pub const BACKEND_CONTAINER_PORT: u16 = 8080;

/// The version every component reports in its hello message and status.
pub const PLANE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit every component was built from (`unknown` when built outside a git checkout).
pub const PLANE_HASH: &str = env!("PLANE_GIT_HASH");
