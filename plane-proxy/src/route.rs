//! A resolved route: where a token's traffic goes, with the `x-verified-*` header values
//! rendered once when the controller answers rather than on every request.

use crate::headers;
use http::header::{HeaderValue, InvalidHeaderValue};
use plane_protocol::api::BackendProtocol;
use plane_protocol::names::BackendName;
use plane_protocol::proxy::RouteInfo;
use plane_protocol::time::Millis;
use std::net::SocketAddr;

/// Shared (`Arc`) between the route cache and every request in flight on it.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub backend_id: BackendName,
    /// The backend's published address on its drone.
    pub address: SocketAddr,
    /// `x-verified-username`, when the connect named a user.
    pub username: Option<HeaderValue>,
    /// `x-verified-user-data`: the connect's `auth` as ASCII JSON.
    pub user_data: HeaderValue,
    /// `x-verified-secret`.
    pub secret: HeaderValue,
    /// `x-verified-backend`.
    pub backend: HeaderValue,
    /// `host` for HTTP/1.0 clients that sent none.
    pub host: HeaderValue,
    /// When the token was issued (a revocation covers tokens issued before it).
    pub issued_at: Millis,
    /// When the token stops working, if it has a lifetime.
    pub expires_at: Option<Millis>,
    /// For a backend with a subdomain, the only host it is served at.
    pub served_at: Option<String>,
    /// The backend serves HTTP/2 (h2c): plain requests go to it over HTTP/2.
    pub http2: bool,
}

impl Route {
    /// Whether a request that came for `host` (its `Host`, or its HTTP/2 authority) may use
    /// this route: any host, unless the backend has a subdomain.
    pub fn serves_host(&self, host: Option<&str>) -> bool {
        match &self.served_at {
            None => true,
            Some(expected) => host.is_some_and(|host| {
                normalized_host(host).eq_ignore_ascii_case(normalized_host(expected))
            }),
        }
    }

    /// Whether the token's lifetime has ended.
    pub fn has_expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= Millis::now())
    }
}

impl Route {
    /// Renders the header values; fails only if the controller sent something no header
    /// can carry (a user name with a newline, say).
    pub fn new(info: RouteInfo) -> Result<Self, InvalidHeaderValue> {
        Ok(Self {
            username: info
                .user
                .as_deref()
                // from_bytes: a non-ASCII user name passes as its UTF-8 bytes.
                .map(|user| HeaderValue::from_bytes(user.as_bytes()))
                .transpose()?,
            user_data: HeaderValue::from_str(&headers::ascii_json(&info.user_data))?,
            secret: HeaderValue::from_str(info.secret_token.as_str())?,
            backend: HeaderValue::from_str(info.backend_id.as_str())?,
            host: HeaderValue::from_str(&info.address.to_string())?,
            backend_id: info.backend_id,
            address: info.address,
            issued_at: info.issued_at,
            expires_at: info.expires_at,
            served_at: info.host,
            http2: info.protocol == BackendProtocol::Http2,
        })
    }
}

/// A host as browsers may write it, reduced to one form: without the default ports (a
/// cluster named `x:443` is reached as `x`) and without the root's trailing dot.
fn normalized_host(host: &str) -> &str {
    let host = host
        .strip_suffix(":443")
        .or_else(|| host.strip_suffix(":80"))
        .unwrap_or(host);
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plane_protocol::names::SecretToken;

    fn info(user: Option<&str>) -> RouteInfo {
        RouteInfo {
            backend_id: BackendName::new_random(),
            address: "127.0.0.1:8080".parse().expect("test address"),
            secret_token: SecretToken::new_random(),
            user: user.map(str::to_string),
            user_data: serde_json::json!({"team": "Zoë"}),
            issued_at: Millis(1),
            expires_at: None,
            host: None,
            protocol: Default::default(),
        }
    }

    #[test]
    fn a_subdomain_route_serves_its_host_in_every_spelling_and_no_other() {
        let mut info = info(None);
        info.host = Some("doc.plane.example.com:443".to_string());
        let route = Route::new(info).expect("valid route");
        for host in [
            "doc.plane.example.com",
            "DOC.plane.example.com:443",
            "doc.plane.example.com.",
        ] {
            assert!(route.serves_host(Some(host)), "{host}");
        }
        for host in [
            "plane.example.com",
            "other.plane.example.com",
            "doc.plane.example.com:8443",
        ] {
            assert!(!route.serves_host(Some(host)), "{host}");
        }
        assert!(!route.serves_host(None));
    }

    #[test]
    fn header_values_are_rendered_from_the_route() {
        let info = info(Some("alice"));
        let route = Route::new(info.clone()).expect("valid route");
        assert_eq!(route.username, Some(HeaderValue::from_static("alice")));
        assert_eq!(route.user_data, r#"{"team":"Zo\u00eb"}"#);
        assert_eq!(route.secret, info.secret_token.as_str());
        assert_eq!(route.backend, info.backend_id.as_str());
        assert_eq!(route.host, "127.0.0.1:8080");
    }

    #[test]
    fn a_user_name_no_header_can_carry_is_refused() {
        assert!(Route::new(info(Some("line\nbreak"))).is_err());
    }
}
