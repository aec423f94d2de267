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

/// Compares two secrets in time that depends only on their lengths, so a caller cannot
/// find a token byte by byte from response times.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
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
    }
}
