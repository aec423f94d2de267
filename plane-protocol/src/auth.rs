//! Credentials as they travel: the bearer token of a controller URL's user-info (Plane's
//! convention, `http://TOKEN@host:port`), the cluster secret's header, and the constant-time
//! comparison that checks both.

use url::Url;

/// The header a node sends its cluster secret in when it opens its socket.
pub const CLUSTER_SECRET_HEADER: &str = "plane-cluster-secret";

/// Splits a controller URL into the URL without user-info and the bearer token its user
/// name carried, if any (percent-decoding it), as Plane 0.5's tools read such URLs.
pub fn split_bearer(url: &Url) -> (Url, Option<String>) {
    let mut bare = url.clone();
    let token = match url.username() {
        "" => None,
        name => Some(
            percent_encoding::percent_decode_str(name)
                .decode_utf8()
                .map_or_else(|_| name.to_string(), |decoded| decoded.into_owned()),
        ),
    };
    // Only fails for URLs that cannot have credentials, which then have none to strip.
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    (bare, token)
}

/// `Bearer TOKEN`, the `Authorization` value for a token.
pub fn bearer_header(token: &str) -> String {
    format!("Bearer {token}")
}

/// What a node sends when it opens its socket: the bearer token of its controller URL and
/// its cluster secret, each when it has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCredentials {
    pub bearer: Option<String>,
    pub cluster_secret: Option<String>,
}

impl NodeCredentials {
    /// The request headers, as `(name, value)`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(token) = &self.bearer {
            headers.push(("authorization", bearer_header(token)));
        }
        if let Some(secret) = &self.cluster_secret {
            headers.push((CLUSTER_SECRET_HEADER, secret.clone()));
        }
        headers
    }
}

/// Compares a secret with a presented value in time that depends only on the presented
/// value's length (which its sender knows anyway), so neither the secret's bytes nor its
/// length can be found from response times.
pub fn constant_time_eq(secret: &[u8], presented: &[u8]) -> bool {
    let mut diff = u64::from(secret.len() != presented.len());
    for (i, byte) in presented.iter().enumerate() {
        // Past the secret's end, compare with a byte of it again (the lengths already differ).
        let expected = if secret.is_empty() {
            0
        } else {
            secret[i % secret.len()]
        };
        diff |= u64::from(expected ^ byte);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_up_its_token() {
        let url: Url = "http://s3cr%2Ft@ctl.example:8080/base/"
            .parse()
            .expect("url");
        let (bare, token) = split_bearer(&url);
        assert_eq!(bare.as_str(), "http://ctl.example:8080/base/");
        assert_eq!(token.as_deref(), Some("s3cr/t"));
        let plain: Url = "http://ctl.example/".parse().expect("url");
        assert_eq!(split_bearer(&plain), (plain.clone(), None));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(!constant_time_eq(b"abc", b""));
        assert!(!constant_time_eq(b"ab", b"abab"));
    }
}
