//! Validated name newtypes: backend IDs, node names, cluster names and tokens.
//!
//! Each type checks its syntax when parsed (including when deserialized), so a value that
//! reaches a handler, a Docker call or a URL is already known to be safe there.

use rand::{distributions::Alphanumeric, Rng};
use serde::{Deserialize, Serialize};
use std::fmt::{self, Display};
use std::str::FromStr;

/// Why a string was rejected as a name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} is invalid: {reason}")]
pub struct InvalidName {
    pub kind: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn random_lowercase(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(|c| (c as char).to_ascii_lowercase())
        .collect()
}

fn random_mixed(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Implements Display, FromStr, `as_str`, string (de)serialization and an OpenAPI string
/// schema (the same rules as `$validate`, as a pattern and lengths) for a validated newtype.
macro_rules! validated_string {
    ($ty:ident, $validate:path, pattern = $pattern:literal, length = $min:literal..=$max:literal) => {
        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some($pattern))
                    .min_length(Some($min))
                    .max_length(Some($max))
                    .into()
            }
        }

        impl utoipa::ToSchema for $ty {}

        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $validate(s)?;
                Ok(Self(s.to_string()))
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $validate(&s)?;
                Ok(Self(s))
            }
        }

        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0
            }
        }
    };
}

/// The ID of one backend, e.g. `ba-k3x9...`. Lowercase letters, digits and `-`, at most 64
/// characters (the API accepts at most 45), so it is valid as a Docker container name and as a DNS label prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackendName(String);
validated_string!(
    BackendName,
    validate_backend_name,
    pattern = "^[a-z0-9][a-z0-9-]*$",
    length = 1..=64
);

impl BackendName {
    pub fn new_random() -> Self {
        Self(format!("ba-{}", random_lowercase(18)))
    }
}

fn validate_backend_name(s: &str) -> Result<(), InvalidName> {
    let invalid = |reason| InvalidName {
        kind: "backend id",
        value: s.to_string(),
        reason,
    };
    // The API takes at most 45 (Plane 0.5's limit, so its tools can address every ID);
    // stored IDs of earlier versions may be up to 64 and stay readable.
    if s.is_empty() || s.len() > 64 {
        return Err(invalid("must be 1 to 64 characters long"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid("may only contain a-z, 0-9 and '-'"));
    }
    if s.starts_with('-') {
        return Err(invalid("may not start with '-'"));
    }
    Ok(())
}

/// A random ID a node process takes at start and sends in every hello. A hello with the
/// name of a connected node but another instance comes from a second process using that
/// name, and is refused; the same instance is the node reconnecting.
pub fn new_instance_id() -> String {
    random_lowercase(16)
}

/// The name of a drone or proxy, unique within a cluster. Letters, digits, `.`, `_`, `-`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);
validated_string!(
    NodeName,
    validate_node_name,
    pattern = "^[A-Za-z0-9._-]+$",
    length = 1..=64
);

impl NodeName {
    /// A fresh random name with the given prefix (`dr` for drones, `px` for proxies).
    pub fn new_random(prefix: &str) -> Self {
        Self(format!("{prefix}-{}", random_lowercase(12)))
    }
}

fn validate_node_name(s: &str) -> Result<(), InvalidName> {
    let invalid = |reason| InvalidName {
        kind: "node name",
        value: s.to_string(),
        reason,
    };
    if s.is_empty() || s.len() > 64 {
        return Err(invalid("must be 1 to 64 characters long"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "may only contain letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

/// A backend's subdomain: one DNS label (1 to 63 lowercase letters, digits and `-`, not at
/// either end). The backend is served at `<subdomain>.<cluster>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subdomain(String);
validated_string!(
    Subdomain,
    validate_subdomain,
    pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
    length = 1..=63
);

fn validate_subdomain(s: &str) -> Result<(), InvalidName> {
    let invalid = |reason| InvalidName {
        kind: "subdomain",
        value: s.to_string(),
        reason,
    };
    if s.is_empty() || s.len() > 63 {
        return Err(invalid("must be 1 to 63 characters long"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(invalid("may only contain a-z, 0-9 and '-'"));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(invalid("may not start or end with '-'"));
    }
    Ok(())
}

/// A drone pool within a cluster: at most 64 letters, digits, `.`, `_` and `-`. Empty is the
/// cluster's default pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PoolName(String);
validated_string!(
    PoolName,
    validate_pool_name,
    pattern = "^[A-Za-z0-9._-]*$",
    length = 0..=64
);

impl PoolName {
    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }
}

fn validate_pool_name(s: &str) -> Result<(), InvalidName> {
    if s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(InvalidName {
            kind: "pool",
            value: s.to_string(),
            reason: "must be at most 64 letters, digits, '.', '_' or '-'",
        });
    }
    Ok(())
}

/// A cluster is named by the host (and optional port) its proxies answer on, e.g.
/// `plane.example.com` or `localhost:9090`. Without a port, or with port 443, URLs are https.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);
validated_string!(
    ClusterName,
    validate_cluster_name,
    pattern = "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?$",
    length = 1..=259
);

impl ClusterName {
    /// The cluster's host without its port: the name its certificate is for.
    pub fn hostname(&self) -> &str {
        match self.0.rsplit_once(':') {
            Some((host, _)) => host,
            None => &self.0,
        }
    }

    pub fn is_https(&self) -> bool {
        match self.0.rsplit_once(':') {
            None => true,
            Some((_, port)) => port == "443",
        }
    }

    /// The base URL browsers use to reach this cluster's proxies.
    pub fn base_url(&self) -> String {
        self.base_url_for(None)
    }

    /// The host (with port, if the cluster has one) a backend is served at: the cluster's
    /// own, or `<subdomain>.<cluster>`.
    pub fn host_for(&self, subdomain: Option<&Subdomain>) -> String {
        match subdomain {
            Some(subdomain) => format!("{subdomain}.{}", self.0),
            None => self.0.clone(),
        }
    }

    /// The base URL of a backend served at [`ClusterName::host_for`].
    pub fn base_url_for(&self, subdomain: Option<&Subdomain>) -> String {
        self.base_url_with(subdomain, self.is_https())
    }

    /// As [`ClusterName::base_url_for`], over HTTPS or not as `https` says (for a cluster
    /// whose proxies serve HTTPS on a port other than 443).
    pub fn base_url_with(&self, subdomain: Option<&Subdomain>, https: bool) -> String {
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{}", self.host_for(subdomain))
    }
}

fn validate_cluster_name(s: &str) -> Result<(), InvalidName> {
    let invalid = |reason| InvalidName {
        kind: "cluster name",
        value: s.to_string(),
        reason,
    };
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    };
    if host.is_empty() || host.len() > 253 {
        return Err(invalid("host must be 1 to 253 characters long"));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !host.split('.').all(label_ok) {
        return Err(invalid("host must be a DNS name or IPv4 address"));
    }
    if let Some(port) = port {
        // Digits only, no leading zero: one spelling per port, so one name per cluster.
        let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        match port.parse::<u16>() {
            Ok(p) if p > 0 && digits && !port.starts_with('0') => {}
            _ => return Err(invalid("port must be a number from 1 to 65535")),
        }
    }
    Ok(())
}

/// A connection token: the first path segment of a backend URL. Unguessable (32 random
/// alphanumerics after a time prefix, see [`BearerToken::new_random`]); whoever holds it may
/// reach the backend as the user it was issued for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BearerToken(String);
validated_string!(
    BearerToken,
    validate_token,
    pattern = "^[A-Za-z0-9.]+$",
    length = 1..=128
);

/// Lets maps keyed by token be searched with the raw path segment, before it is validated
/// (hashing and equality are those of the string, as `Borrow` requires).
impl std::borrow::Borrow<str> for BearerToken {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl BearerToken {
    /// A fresh token: the time of issue, then 32 random alphanumerics (about 190 bits, all
    /// the unguessability). The prefix makes tokens sort in the order they were issued, so
    /// the stored tokens' index grows at its end instead of at random places: a batch of
    /// tokens then changes a few index pages instead of one per token. On SQLite that took
    /// joins from about 14k to 22k a second and their p99 from about 11 to 5 ms, by writing
    /// less and so checkpointing less often (docs/performance.md). Anyone who sees the
    /// token learns when it was issued, and nothing else.
    pub fn new_random() -> Self {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_micros());
        Self::issued_at(micros)
    }

    /// A token issued `micros` after the epoch: 11 base-36 digits (lowercase, zero-padded:
    /// over 4,000 years from 1970), so byte order and PostgreSQL's collations agree with
    /// time order; then the random part.
    fn issued_at(micros: u128) -> Self {
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut prefix = [b'0'; TOKEN_TIME_DIGITS];
        let mut rest = micros;
        for digit in prefix.iter_mut().rev() {
            *digit = DIGITS[(rest % 36) as usize];
            rest /= 36;
        }
        let prefix = std::str::from_utf8(&prefix).expect("base-36 digits are ASCII");
        Self(format!("{prefix}{}", random_mixed(32)))
    }

    /// A backend's one static token. The `s.` prefix marks it static, as in Plane 0.5
    /// (whose client tells them apart by it).
    pub fn new_random_static() -> Self {
        Self(format!("s.{}", random_mixed(32)))
    }

    pub fn is_static(&self) -> bool {
        self.0.starts_with("s.")
    }
}

/// Width of a token's time prefix (36^11 microseconds is about 4,100 years).
const TOKEN_TIME_DIGITS: usize = 11;

/// A secret handed to the app alongside a token and passed to the backend as
/// `x-verified-secret`, so the backend can tell requests that came through Plane.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretToken(String);
validated_string!(
    SecretToken,
    validate_token,
    pattern = "^[A-Za-z0-9.]+$",
    length = 1..=128
);

impl SecretToken {
    pub fn new_random() -> Self {
        Self(random_mixed(32))
    }
}

fn validate_token(s: &str) -> Result<(), InvalidName> {
    if s.is_empty() || s.len() > 128 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
        return Err(InvalidName {
            kind: "token",
            value: s.to_string(),
            reason: "must be 1 to 128 letters, digits or '.'",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_sort_in_the_order_they_were_issued() {
        let times = [
            0,
            35,
            36,
            1_700_000_000_000_000,
            1_700_000_000_000_001,
            36u128.pow(11) - 1,
        ];
        let tokens: Vec<BearerToken> = times.iter().map(|&t| BearerToken::issued_at(t)).collect();
        for pair in tokens.windows(2) {
            assert!(pair[0].as_str() < pair[1].as_str(), "{pair:?}");
        }
        for token in &tokens {
            assert_eq!(token.as_str().len(), TOKEN_TIME_DIGITS + 32);
            assert!(token.as_str().parse::<BearerToken>().is_ok(), "{token:?}");
            assert!(!token.is_static());
        }
        assert_eq!(&tokens[1].as_str()[..TOKEN_TIME_DIGITS], "0000000000z");
        // The random part differs between tokens issued in the same microsecond.
        assert_ne!(BearerToken::issued_at(7), BearerToken::issued_at(7));
        assert!(BearerToken::new_random().as_str() > tokens[3].as_str());
    }

    #[test]
    fn backend_names_are_docker_safe() {
        let name = BackendName::new_random();
        assert!(name.as_str().parse::<BackendName>().is_ok());
        assert!("Bad_Name".parse::<BackendName>().is_err());
        assert!("".parse::<BackendName>().is_err());
        assert!(serde_json::from_str::<BackendName>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<BackendName>("\"no/slash\"").is_err());
    }

    #[test]
    fn subdomains_are_dns_labels() {
        assert!("doc-42".parse::<Subdomain>().is_ok());
        for bad in ["", "-a", "a-", "Upper", "a.b", "a_b", &"x".repeat(64)] {
            assert!(bad.parse::<Subdomain>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pool_names_are_short_and_plain() {
        assert!("".parse::<PoolName>().is_ok_and(|p| p.is_default()));
        assert!("gpu-a100_x.2".parse::<PoolName>().is_ok());
        assert!("has space".parse::<PoolName>().is_err());
        assert!("x".repeat(65).parse::<PoolName>().is_err());
        assert!(serde_json::from_str::<PoolName>("\"a/b\"").is_err());
    }

    #[test]
    fn cluster_names_decide_the_scheme() {
        let local: ClusterName = "localhost:9090".parse().expect("valid");
        assert_eq!(local.base_url(), "http://localhost:9090");
        let prod: ClusterName = "plane.example.com".parse().expect("valid");
        assert_eq!(prod.base_url(), "https://plane.example.com");
        assert!("bad host:80".parse::<ClusterName>().is_err());
        assert!("host:0".parse::<ClusterName>().is_err());
        assert!("host:99999".parse::<ClusterName>().is_err());
        // One spelling per port.
        assert!("host:0080".parse::<ClusterName>().is_err());
        assert!("host:+80".parse::<ClusterName>().is_err());
        assert!("host:".parse::<ClusterName>().is_err());
    }
}
