//! Which headers cross the proxy and which it adds: hop-by-hop headers stop here, callers'
//! `x-verified-*` headers are dropped, and the proxy adds the verified ones it vouches for.

use crate::route::Route;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// Prefix of the headers only the proxy may set; backends trust them.
const VERIFIED_PREFIX: &str = "x-verified-";

pub const X_VERIFIED_USERNAME: HeaderName = HeaderName::from_static("x-verified-username");
pub const X_VERIFIED_USER_DATA: HeaderName = HeaderName::from_static("x-verified-user-data");
pub const X_VERIFIED_SECRET: HeaderName = HeaderName::from_static("x-verified-secret");
pub const X_VERIFIED_BACKEND: HeaderName = HeaderName::from_static("x-verified-backend");
pub const X_VERIFIED_PATH: HeaderName = HeaderName::from_static("x-verified-path");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one hop (RFC 9110 §7.6.1), plus the non-standard ones that are
/// commonly treated the same way.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The comma-separated tokens of every `Connection` header (as sent; compare them
/// case-insensitively).
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Whether the message asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
/// Whether `request` opens a WebSocket over HTTP/2 (RFC 8441): an extended CONNECT with
/// `:protocol websocket`.
pub fn is_h2_websocket<B>(request: &http::Request<B>) -> bool {
    request.method() == http::Method::CONNECT
        && request
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case("websocket"))
}

/// Turns an RFC 8441 WebSocket request into the HTTP/1.1 handshake a backend expects (GET
/// with `Upgrade: websocket` and a fresh `Sec-WebSocket-Key`); the client's version,
/// subprotocols and extensions are kept, so what they negotiate is end to end.
pub fn h2_websocket_to_http1(parts: &mut http::request::Parts) {
    use base64::Engine;
    parts.method = http::Method::GET;
    // Fresh per handshake; it need not be secret.
    let key: [u8; 16] = rand::random();
    let headers = &mut parts.headers;
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(key) = HeaderValue::from_str(&base64::engine::general_purpose::STANDARD.encode(key)) {
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    if !headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
}

/// The backend's 101 as the answer to an RFC 8441 client: 200, without the HTTP/1.1
/// handshake's own headers.
pub fn http1_websocket_response_to_h2(parts: &mut http::response::Parts) {
    parts.status = http::StatusCode::OK;
    parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    parts.headers.remove(header::UPGRADE);
    parts.headers.remove(header::CONNECTION);
}

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including any the `Connection` header names. With
/// `keep_upgrade`, the upgrade handshake (`Connection: upgrade`, `Upgrade`) is kept, since
/// switching protocols end to end is the point of forwarding it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade.then(|| headers.get(header::UPGRADE).cloned());
    // Most messages name nothing but the standard hop-by-hop headers (or have no
    // `Connection` at all); only the rest pay for collecting names.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|token| {
            !token.eq_ignore_ascii_case("keep-alive")
                && !token.eq_ignore_ascii_case("close")
                && !token.eq_ignore_ascii_case("upgrade")
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(Some(upgrade)) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Whether `name` (lowercase, as `HeaderName` stores it) is `x-verified-*`, spelled with
/// dashes or underscores: many servers (CGI, WSGI, Rack) read `x_verified_user` as
/// `x-verified-user`.
fn is_verified_name(name: &str) -> bool {
    let name = name.as_bytes();
    name.len() >= VERIFIED_PREFIX.len()
        && name
            .iter()
            .zip(VERIFIED_PREFIX.as_bytes())
            .all(|(&byte, &want)| byte == want || (want == b'-' && byte == b'_'))
}

/// Drops every `x-verified-*` header the caller sent: only the proxy may vouch for a caller.
pub fn strip_verified(headers: &mut HeaderMap) {
    // Header names are stored lowercased, so a prefix test is case-insensitive.
    if !headers.keys().any(|name| is_verified_name(name.as_str())) {
        return;
    }
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_verified_name(name.as_str()))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// Adds the headers that tell the backend who is calling and which route was taken.
/// `path_and_query` is the path the backend sees (the token removed).
pub fn add_verified(headers: &mut HeaderMap, route: &Route, path_and_query: HeaderValue) {
    if let Some(username) = &route.username {
        headers.insert(X_VERIFIED_USERNAME, username.clone());
    }
    headers.insert(X_VERIFIED_USER_DATA, route.user_data.clone());
    headers.insert(X_VERIFIED_SECRET, route.secret.clone());
    headers.insert(X_VERIFIED_BACKEND, route.backend.clone());
    headers.insert(X_VERIFIED_PATH, path_and_query);
}

/// The `x-forwarded-for` value for a client at `client_ip` (IPv4-mapped addresses as IPv4).
pub fn forwarded_for(client_ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&client_ip.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sets `x-forwarded-for` and `x-forwarded-proto`. Any values the caller sent are replaced,
/// not appended to: the proxy is the edge, so the client's claims about earlier hops are
/// unverifiable.
pub fn set_forwarded(headers: &mut HeaderMap, forwarded_for: &HeaderValue, proto: &'static str) {
    headers.insert(X_FORWARDED_FOR, forwarded_for.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// Compact JSON with every non-ASCII character written as a `\u` escape, so the value is a
/// valid header and every backend reads the same characters (headers are not UTF-8).
pub fn ascii_json(value: &serde_json::Value) -> String {
    let json = value.to_string();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            // Outside strings JSON is pure ASCII, so every such character is inside a string
            // literal, where a \u escape (a surrogate pair above U+FFFF) means the same.
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_str(value).expect("test header value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Custom-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-custom-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut map, false);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("content-type"));
    }

    #[test]
    fn upgrades_keep_their_handshake_headers() {
        let mut map = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
        ]);
        assert!(is_upgrade(&map));
        strip_hop_by_hop(&mut map, true);
        assert_eq!(
            map.get("connection").and_then(|v| v.to_str().ok()),
            Some("upgrade")
        );
        assert_eq!(
            map.get("upgrade").and_then(|v| v.to_str().ok()),
            Some("websocket")
        );
        assert!(!map.contains_key("keep-alive"));
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
    }

    #[test]
    fn verified_headers_from_callers_are_dropped_whatever_their_case() {
        let mut map = headers(&[
            ("X-Verified-Username", "mallory"),
            ("x-verified-anything", "x"),
            ("x_verified_user", "x"),
            ("x-verified_secret", "x"),
            ("x-verifiedish", "kept"),
            ("x-verif", "kept"),
        ]);
        strip_verified(&mut map);
        assert_eq!(map.len(), 2);
        assert!(map.contains_key("x-verifiedish"));
        assert!(map.contains_key("x-verif"));
    }

    #[test]
    fn user_data_header_is_ascii_json_meaning_the_same() {
        let value = serde_json::json!({"name": "Zoë 🚀", "n": 1});
        let encoded = ascii_json(&value);
        assert!(encoded.is_ascii());
        let decoded: serde_json::Value = serde_json::from_str(&encoded).expect("valid JSON");
        assert_eq!(decoded, value);
    }
}
