//! Backend volumes: where under a drone's `--mount-base` a spawn's `executable.mount` lives.
//! The controller turns the spawn's request into a relative directory (refusing every unsafe
//! form with a 400) and the drone checks that directory's form again before touching disk.

use serde::{Deserialize, Serialize};

/// `executable.mount`: `false` (none), `true` (a directory of the key's own, kept across its
/// backends), or a relative path (a directory that backends naming it share).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Mount {
    Enabled(bool),
    Path(String),
}

/// One component of a [`Mount::Path`] as a regular expression: 1 to 64 letters, digits,
/// `.`, `_` and `-`, but not `.` or `..`.
const COMPONENT_PATTERN: &str = "([A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\\.\\.[A-Za-z0-9._-]{1,62})";

/// Written by hand: the derived schema cannot carry the path's pattern.
impl utoipa::PartialSchema for Mount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Boolean))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(MAX_COMPONENTS * (MAX_COMPONENT_LEN + 1)))
                    .pattern(Some(format!(
                        "^{COMPONENT_PATTERN}(/{COMPONENT_PATTERN}){{0,{}}}$",
                        MAX_COMPONENTS - 1
                    ))),
            )
            .description(Some(
                "`false` (none), `true` (a directory of the key's own, kept across its \
                 backends; only for a backend with a key), or a relative path (a directory \
                 that backends naming it share).",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Mount {}

/// Where a mounted directory appears inside the container.
pub const MOUNT_TARGET: &str = "/plane-data";

const MAX_COMPONENTS: usize = 8;
const MAX_COMPONENT_LEN: usize = 64;

/// The directory (relative to the mount base, `/`-separated) that `mount` asks for, `None`
/// for no mount. `key` is the backend's key (namespace, name), needed for `true`.
pub fn mount_dir(
    mount: Option<&Mount>,
    key: Option<(&str, &str)>,
) -> Result<Option<String>, String> {
    match mount {
        None | Some(Mount::Enabled(false)) => Ok(None),
        Some(Mount::Enabled(true)) => {
            let Some((namespace, name)) = key else {
                return Err(
                    "spawn_config.executable.mount: true keeps a directory per key, and this backend has no key"
                        .to_string(),
                );
            };
            Ok(Some(format!("keys/{}/{}", encode(namespace), encode(name))))
        }
        Some(Mount::Path(path)) => {
            check_relative(path)
                .map_err(|why| format!("spawn_config.executable.mount {path:?}: {why}"))?;
            Ok(Some(format!("paths/{path}")))
        }
    }
}

/// A path the user chose: relative, 1 to 8 components of letters, digits, `.`, `_` and
/// `-`, none of them `.` or `..`.
fn check_relative(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.starts_with('/') {
        return Err("must be relative to the drone's mount base, not absolute");
    }
    let components: Vec<&str> = path.split('/').collect();
    if components.len() > MAX_COMPONENTS {
        return Err("has more than 8 components");
    }
    for component in components {
        check_component(component, false)?;
    }
    Ok(())
}

fn check_component(component: &str, encoded: bool) -> Result<(), &'static str> {
    if component.is_empty() {
        return Err("has an empty component (`//` or a trailing `/`)");
    }
    if component == "." || component == ".." {
        return Err("may not contain `.` or `..` components");
    }
    if component.len() > MAX_COMPONENT_LEN * if encoded { 3 } else { 1 } {
        return Err("has a component longer than 64 characters");
    }
    let allowed = |c: char| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (encoded && c == '%')
    };
    if !component.chars().all(allowed) {
        return Err("may only contain letters, digits, '.', '_' and '-' between slashes");
    }
    Ok(())
}

/// The drone's check of a directory the controller sent: the same safe form (key
/// directories percent-encoded), so a forged or corrupted action cannot reach outside the
/// base through its name. Symlinks are the drone's own check, on disk.
pub fn check_mount_dir(dir: &str) -> Result<(), String> {
    let mut components = dir.split('/');
    let kind = components.next().unwrap_or_default();
    let rest: Vec<&str> = components.collect();
    let well_formed = match kind {
        "keys" => rest.len() == 2 && rest.iter().all(|c| check_component(c, true).is_ok()),
        "paths" => !rest.is_empty() && check_relative(&rest.join("/")).is_ok(),
        _ => false,
    };
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "mount directory {dir:?} is not one the controller makes"
        ))
    }
}

/// A key's namespace or name as one directory name: letters, digits and `_` as they are,
/// every other byte `%XX` (so `.`, `..` and `/` cannot occur), and the empty string `-`.
fn encode(part: &str) -> String {
    if part.is_empty() {
        return "-".to_string();
    }
    part.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Result<Option<String>, String> {
        mount_dir(Some(&Mount::Path(p.to_string())), None)
    }

    #[test]
    fn keys_get_directories_of_their_own_that_cannot_escape() {
        let dir = |ns, name| mount_dir(Some(&Mount::Enabled(true)), Some((ns, name)));
        assert_eq!(dir("", "doc-1"), Ok(Some("keys/-/doc%2D1".to_string())));
        assert_eq!(
            dir("team", "../x"),
            Ok(Some("keys/team/%2E%2E%2Fx".to_string()))
        );
        assert_ne!(dir("a", "-").expect("ok"), dir("", "a").expect("ok"));
        assert!(mount_dir(Some(&Mount::Enabled(true)), None).is_err());
        assert_eq!(mount_dir(Some(&Mount::Enabled(false)), None), Ok(None));
        for key in [("", "doc-1"), ("team", "../x"), ("ünï", "ç/ö")] {
            let dir = dir(key.0, key.1).expect("ok").expect("some");
            assert_eq!(check_mount_dir(&dir), Ok(()), "{dir}");
        }
    }

    #[test]
    fn chosen_paths_must_stay_relative_and_plain() {
        assert_eq!(
            path("projects/one"),
            Ok(Some("paths/projects/one".to_string()))
        );
        for bad in [
            "",
            "/etc",
            "../x",
            "a/../../b",
            "a//b",
            "a/",
            "a/./b",
            ".",
            "a b",
            "ä",
            "a\\b",
            "a/b/c/d/e/f/g/h/i",
        ] {
            assert!(path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_mount_dir("paths/../etc").is_err());
        assert!(check_mount_dir("keys/a/b/c").is_err());
        assert!(check_mount_dir("/etc").is_err());
        assert!(check_mount_dir("other/x").is_err());
    }
}
