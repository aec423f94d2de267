//! What connect and spawn accept: every limit on keys, users, `auth`, spawn configs and
//! token lifetimes, checked before anything is stored, each refusal naming the field.

use crate::controller::error::ControllerError;
use plane_protocol::api::{ConnectRequest, ExecutorConfig, SpawnConfig};
use plane_protocol::RESERVED_ENV_VARS;
use serde_json::{Map, Value};

/// The largest idle or lifetime limit accepted: ten years, in seconds. Larger values would
/// overflow millisecond arithmetic in the database.
const MAX_LIMIT_SECONDS: i64 = 10 * 365 * 24 * 60 * 60;

/// The longest startup timeout a spawn may ask for: an hour.
const MAX_STARTUP_TIMEOUT_SECONDS: i64 = 3600;

/// The longest backend ID a spawn may choose (Plane 0.5's limit).
const MAX_BACKEND_ID_INPUT: usize = 45;

pub(super) fn validate_connect(request: &ConnectRequest) -> Result<(), ControllerError> {
    if let Some(key) = &request.key {
        validate_text("key.name", &key.name, 1, 256)?;
        validate_text("key.namespace", &key.namespace, 0, 64)?;
        validate_text("key.tag", &key.tag, 0, 256)?;
    }
    if let Some(spawn_config) = &request.spawn_config {
        validate_spawn_config(spawn_config)?;
    }
    validate_token_ttl(request.token_ttl_seconds, request.spawn_config.as_ref())?;
    validate_caller(request.user.as_deref(), &request.auth)
}

pub(super) fn validate_token_ttl(
    ttl: Option<i64>,
    spawn_config: Option<&SpawnConfig>,
) -> Result<(), ControllerError> {
    let Some(ttl) = ttl else { return Ok(()) };
    if !(1..=MAX_LIMIT_SECONDS).contains(&ttl) {
        return Err(ControllerError::invalid(format!(
            "token_ttl_seconds must be 1 to {MAX_LIMIT_SECONDS}, got {ttl}"
        )));
    }
    if spawn_config.is_some_and(|config| config.use_static_token) {
        return Err(ControllerError::invalid(
            "token_ttl_seconds does not apply with spawn_config.use_static_token: one static token serves every connect",
        ));
    }
    Ok(())
}

/// The largest `auth` accepted, as JSON. Proxies pass it to the backend as a header
/// (`x-verified-user-data`), and a request whose headers are too large fails at the proxy.
const MAX_AUTH_BYTES: usize = 8 * 1024;

pub(super) fn validate_caller(
    user: Option<&str>,
    auth: &Map<String, Value>,
) -> Result<(), ControllerError> {
    if let Some(user) = user {
        validate_text("user", user, 1, 256)?;
    }
    let auth_bytes = serde_json::to_string(auth).map_or(usize::MAX, |json| json.len());
    if auth_bytes > MAX_AUTH_BYTES {
        return Err(ControllerError::invalid(format!(
            "auth must be at most {MAX_AUTH_BYTES} bytes of JSON, got {auth_bytes}"
        )));
    }
    Ok(())
}

pub(super) fn validate_spawn_config(config: &SpawnConfig) -> Result<(), ControllerError> {
    // Plane 0.5's tools take backend IDs of at most 45 characters; IDs stored by earlier
    // versions (up to 64) stay readable.
    if let Some(id) = &config.id {
        // `/ctrl/b/revoke` is the revoke endpoint, so a backend of that name could not be
        // read at `/ctrl/b/:backend`.
        if id.as_str() == "revoke" {
            return Err(ControllerError::invalid(
                "spawn_config.id \"revoke\" is reserved (it is an endpoint's name)",
            ));
        }
        if id.as_str().len() > MAX_BACKEND_ID_INPUT {
            return Err(ControllerError::invalid(format!(
                "spawn_config.id must be at most {MAX_BACKEND_ID_INPUT} characters, got {}",
                id.as_str().len()
            )));
        }
    }
    validate_executable("spawn_config.executable", &config.executable)?;
    for (field, value) in [
        ("spawn_config.max_idle_seconds", config.max_idle_seconds),
        (
            "spawn_config.lifetime_limit_seconds",
            config.lifetime_limit_seconds,
        ),
    ] {
        if let Some(seconds) = value {
            if !(1..=MAX_LIMIT_SECONDS).contains(&seconds) {
                return Err(ControllerError::invalid(format!(
                    "{field} must be 1 to {MAX_LIMIT_SECONDS} (ten years), got {seconds}"
                )));
            }
        }
    }
    if let Some(seconds) = config.startup_timeout_seconds {
        if !(1..=MAX_STARTUP_TIMEOUT_SECONDS).contains(&seconds) {
            return Err(ControllerError::invalid(format!(
                "spawn_config.startup_timeout_seconds must be 1 to {MAX_STARTUP_TIMEOUT_SECONDS}, got {seconds}"
            )));
        }
    }
    Ok(())
}

/// An executable's own limits (`prefix` names it in messages: `spawn_config.executable`, or
/// `executable` for a warm pool).
pub(crate) fn validate_executable(
    prefix: &str,
    executable: &ExecutorConfig,
) -> Result<(), ControllerError> {
    validate_image(&format!("{prefix}.image"), &executable.image)?;
    for (name, value) in &executable.env {
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(ControllerError::invalid(format!(
                "{prefix}.env: {name:?} is not a valid variable name (letters, digits and '_', not starting with a digit)"
            )));
        }
        if RESERVED_ENV_VARS.contains(&name.as_str()) {
            return Err(ControllerError::invalid(format!(
                "{prefix}.env: {name:?} is set by Plane and cannot be overridden"
            )));
        }
        if value.contains('\0') {
            return Err(ControllerError::invalid(format!(
                "{prefix}.env.{name} contains a NUL byte"
            )));
        }
    }
    let limits = &executable.resource_limits;
    if let Some(seconds) = limits.cpu_time_limit {
        if !(1..=MAX_LIMIT_SECONDS).contains(&seconds) {
            return Err(ControllerError::invalid(format!(
                "{prefix}.resource_limits.cpu_time_limit must be 1 to {MAX_LIMIT_SECONDS} seconds, got {seconds}"
            )));
        }
    }
    if let Some(pids) = limits.pids_limit {
        if !(1..=4_194_304).contains(&pids) {
            return Err(ControllerError::invalid(format!(
                "{prefix}.resource_limits.pids_limit must be 1 to 4194304, got {pids}"
            )));
        }
    }
    if let Some(bytes) = limits.disk_limit_bytes {
        // Whether a drone can enforce it is settled at placement.
        if bytes < 1024 * 1024 {
            return Err(ControllerError::invalid(format!(
                "{prefix}.resource_limits.disk_limit_bytes must be at least 1048576 (1 MiB), got {bytes}"
            )));
        }
    }
    if let Some(bytes) = limits.memory_limit_bytes {
        if bytes < 6 * 1024 * 1024 {
            return Err(ControllerError::invalid(format!(
                "{prefix}.resource_limits.memory_limit_bytes must be at least 6291456 (6 MiB), got {bytes}"
            )));
        }
    }
    if let Some(percent) = limits.cpu_period_percent {
        if !(1..=100).contains(&percent) {
            return Err(ControllerError::invalid(format!(
                "{prefix}.resource_limits.cpu_period_percent must be 1 to 100, got {percent}"
            )));
        }
    }
    if let Some(period) = limits.cpu_period {
        if !(1000..=1_000_000).contains(&period) {
            return Err(ControllerError::invalid(format!(
                "{prefix}.resource_limits.cpu_period must be 1000 to 1000000 microseconds, got {period}"
            )));
        }
    }
    // `true` needs the key, which the spawn checks (see `connect::spawn`).
    if let Some(mount @ plane_protocol::mount::Mount::Path(_)) = &executable.mount {
        plane_protocol::mount::mount_dir(Some(mount), None).map_err(ControllerError::invalid)?;
    }
    if let Some(network) = &executable.network_name {
        if !is_docker_name(network) {
            return Err(ControllerError::invalid(format!(
                "{prefix}.network_name {network:?} is not a Docker network name (1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit)"
            )));
        }
    }
    if let Some(path) = &executable.ready_path {
        let printable = path.chars().all(|c| c.is_ascii_graphic());
        if !path.starts_with('/') || !printable || path.len() > 1024 {
            return Err(ControllerError::invalid(format!(
                "{prefix}.ready_path {path:?} must be a URL path starting with '/', of at most 1024 printable ASCII characters without spaces"
            )));
        }
    }
    if let Some(plane_protocol::api::Gpus::Count(0)) = executable.gpus {
        return Err(ControllerError::invalid(format!(
            "{prefix}.gpus must be a positive count or \"all\", got 0"
        )));
    }
    Ok(())
}

/// An image reference as Docker reads one: 1 to 512 printable ASCII characters, no spaces.
pub(crate) fn validate_image(field: &str, image: &str) -> Result<(), ControllerError> {
    if image.is_empty() || image.len() > 512 || !image.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ControllerError::invalid(format!(
            "{field} must be an image reference of 1 to 512 printable ASCII characters without spaces, got {image:?}"
        )));
    }
    Ok(())
}

pub(crate) fn validate_text(
    field: &str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<(), ControllerError> {
    let length = value.chars().count();
    if length < min || length > max {
        return Err(ControllerError::invalid(format!(
            "{field} must be {min} to {max} characters long, got {length}"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ControllerError::invalid(format!(
            "{field} may not contain control characters"
        )));
    }
    if value.chars().any(is_invisible_format) {
        return Err(ControllerError::invalid(format!(
            "{field} may not contain bidirectional overrides or other invisible formatting characters"
        )));
    }
    Ok(())
}

/// Characters that change how text around them is displayed without being seen themselves:
/// bidirectional embeddings, overrides, isolates and marks, zero-width characters, and the
/// byte-order mark. In a key or user name they let two different names look the same.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061C}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// What Docker accepts as a network (or runtime) name.
pub fn is_docker_name(name: &str) -> bool {
    name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
