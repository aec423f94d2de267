//! HTTPS at the proxy from a PEM certificate file: requests reach the backend over TLS (h2 or
//! HTTP/1.1 by ALPN), plain
//! HTTP is redirected (308, path and query kept) except `/.well-known/`, and a changed file
//! is served to new connections while open ones carry on.

use crate::db_test;
use crate::harness::{wait_for, TestEnv};
use plane_proxy::config::ProxyConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA, and a function that issues it a `localhost`/127.0.0.1 certificate as a PEM file.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![]).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca");
        Self { cert, key }
    }

    /// Writes a fresh leaf certificate and key to `path`; returns the leaf's DER.
    fn issue(&self, path: &Path) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        let leaf = params.signed_by(&key, &self.cert, &self.key).expect("leaf");
        // Written whole then renamed, as a certificate manager would, so no reader sees half.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, format!("{}{}", leaf.pem(), key.serialize_pem())).expect("write");
        std::fs::rename(&partial, path).expect("rename");
        leaf.der().to_vec()
    }

    fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

/// Opens a TLS connection to `addr` as `localhost`; returns it with the certificate served.
async fn tls_connect(
    ca: &TestCa,
    addr: std::net::SocketAddr,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = ca
        .connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let served: Vec<u8> = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first().map(|c: &CertificateDer<'_>| c.to_vec()))
        .expect("a certificate");
    (tls, served)
}

/// Sends one HTTP/1.1 GET on an open connection; returns the status line.
async fn get_on(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut buffer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buffer))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
    text.lines().next().unwrap_or_default().to_string()
}

db_test!(
    the_proxy_serves_https_from_a_certificate_file_and_redirects_plain_http,
    |env: TestEnv| async move {
        let ca = TestCa::new();
        let cert_path = env.scratch.join("proxy.pem");
        let first = ca.issue(&cert_path);
        let mut config = ProxyConfig::new(env.controller().url(), env.cluster.clone());
        config.bind_ip = "127.0.0.1".parse().expect("ip");
        config.https_port = Some(0);
        config.cert_path = Some(cert_path.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let proxy = plane_proxy::start(config, listener).await.expect("proxy");
        let https = proxy.https_addr().expect("an HTTPS address");
        let backend = env.connect_ready("tls-doc", &env.spawn_config(&[])).await;
        let token = backend.token.to_string();

        // Through TLS to the backend, with a client that trusts only the test CA.
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).expect("ca pem"),
            )
            .resolve("localhost", https)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let answer = client
            .get(format!("https://localhost:{}/{token}/", https.port()))
            .send()
            .await
            .expect("https request");
        assert_eq!(answer.status().as_u16(), 200);
        // The client offered h2 by ALPN and got it; the backend still speaks HTTP/1.1.
        assert_eq!(answer.version(), reqwest::Version::HTTP_2);
        let client_http1 = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).expect("ca pem"),
            )
            .resolve("localhost", https)
            .http1_only()
            .build()
            .expect("client");
        let answer = client_http1
            .get(format!("https://localhost:{}/{token}/", https.port()))
            .send()
            .await
            .expect("https request over HTTP/1.1");
        assert_eq!(answer.status().as_u16(), 200);
        assert_eq!(answer.version(), reqwest::Version::HTTP_11);

        // Plain HTTP: 308 to the same path and query over HTTPS, but not /.well-known/.
        let plain = format!("http://127.0.0.1:{}", proxy.local_addr().port());
        let answer = client
            .get(format!("{plain}/{token}/echo?x=1"))
            .send()
            .await
            .expect("plain request");
        assert_eq!(answer.status().as_u16(), 308);
        assert_eq!(
            answer.headers()["location"],
            format!("https://127.0.0.1:{}/{token}/echo?x=1", https.port()).as_str()
        );
        let answer = client
            .get(format!("{plain}/.well-known/acme-challenge/x"))
            .send()
            .await
            .expect("well-known request");
        assert_ne!(answer.status().as_u16(), 308);

        // A new certificate in the file: new connections get it, an open one carries on.
        let (mut open, served) = tls_connect(&ca, https).await;
        assert_eq!(served, first);
        let second = ca.issue(&cert_path);
        wait_for(
            "the new certificate served",
            Duration::from_secs(10),
            || async {
                let (_, served) = tls_connect(&ca, https).await;
                if served == second {
                    Ok(())
                } else {
                    Err("still the first certificate")
                }
            },
        )
        .await;
        let status = get_on(&mut open, &format!("/{token}/")).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        proxy.shutdown().await;
        env
    }
);
