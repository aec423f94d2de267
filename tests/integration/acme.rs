//! Certificates from a real ACME CA (Debian's `pebble`) by DNS-01: pebble resolves the
//! challenge through our `plane dns`, which serves the values the proxy published through the
//! controller. Issuance, a restart that loads the stored certificate, renewal under an open
//! connection, one order for two proxies, and external account binding.

use crate::db_test;
use crate::harness::{free_port, which};
use crate::harness::{holds_for, wait_for, TestEnv};
use futures_util::{SinkExt, StreamExt};
use plane_dns::{DnsConfig, DnsHandle};
use plane_protocol::names::ClusterName;
use plane_proxy::config::{AcmeConfig, ProxyConfig};
use plane_proxy::ProxyHandle;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

/// Pebble's EAB key for `kid-1` in the test configuration (base64url, as a CA hands it out).
const EAB_KID: &str = "kid-1";
const EAB_HMAC_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

/// How many times pebble is started before a test gives up on it.
const PEBBLE_ATTEMPTS: u32 = 5;

/// A pebble process on free loopback ports, serving HTTPS with a certificate from a CA of
/// the test's own, resolving challenges through `dns`. Killed when dropped.
struct Pebble {
    child: tokio::process::Child,
    directory: url::Url,
    management: SocketAddr,
    /// The CA that signed pebble's own HTTPS certificate (trusted for the ACME endpoint).
    tls_ca_file: PathBuf,
    tls_ca_pem: String,
    log: PathBuf,
}

impl Pebble {
    async fn start(dir: &Path, dns: SocketAddr, require_eab: bool) -> Pebble {
        std::fs::create_dir_all(dir).expect("pebble dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params")
                .signed_by(&key, &ca, &ca_key)
                .expect("leaf");
        let tls_ca_file = dir.join("pebble-tls-ca.pem");
        std::fs::write(&tls_ca_file, ca.pem()).expect("write ca");
        std::fs::write(dir.join("pebble-cert.pem"), leaf.pem()).expect("write cert");
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).expect("write key");

        // The ports are free when chosen but pebble binds them itself, so a test running
        // beside this one may take one first; pebble then exits, and is started again on
        // others.
        let mut attempt = 1;
        loop {
            match Self::spawn(dir, dns, require_eab, &ca, &tls_ca_file).await {
                Ok(pebble) => return pebble,
                Err(lost) if attempt < PEBBLE_ATTEMPTS => {
                    eprintln!("pebble exited at start ({lost}); again on other ports");
                    attempt += 1;
                }
                Err(lost) => panic!("pebble exited at start {attempt} times; last: {lost}"),
            }
        }
    }

    /// Starts pebble on ports free now and waits for its directory. `Err` (with its log)
    /// if it exits first.
    async fn spawn(
        dir: &Path,
        dns: SocketAddr,
        require_eab: bool,
        ca: &rcgen::Certificate,
        tls_ca_file: &Path,
    ) -> Result<Pebble, String> {
        let binary = which("pebble").expect(
            "Debian's pebble is installed (the test command installs it: apt-get install pebble)",
        );
        let (port, management) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.join("pebble-cert.pem"),
                "privateKey": dir.join("pebble-key.pem"),
                // Only used for HTTP-01 and TLS-ALPN-01, which nothing here asks for.
                "httpPort": 5002,
                "tlsPort": 5001,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": require_eab,
                "externalAccountMACKeys": { EAB_KID: EAB_HMAC_KEY },
            }
        });
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).expect("write config");
        let log = dir.join("pebble.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let child = tokio::process::Command::new(binary)
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns.to_string())
            // Validate at once, and every order validates anew (no authorization reuse), so
            // each one goes through DNS.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_AUTHZREUSE", "0")
            // Pebble rejects 5% of nonces on purpose. instant-acme retries those, yet one
            // full-suite run still saw a badNonce reach the proxy, whose retry then made a
            // second order; these tests count orders, so every nonce is accepted here.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("start pebble");
        let mut pebble = Pebble {
            child,
            directory: format!("https://127.0.0.1:{port}/dir")
                .parse()
                .expect("url"),
            management: format!("127.0.0.1:{management}").parse().expect("addr"),
            tls_ca_file: tls_ca_file.to_path_buf(),
            tls_ca_pem: ca.pem(),
            log,
        };
        let client = pebble.client();
        let directory = pebble.directory.clone();
        let log = pebble.log.clone();
        let child = &mut pebble.child;
        // Served (`Ok(Ok)`), or exited at start (`Ok(Err)`, to start again elsewhere).
        let started = wait_for(
            "pebble to serve its directory",
            Duration::from_secs(20),
            || {
                let exited = child.try_wait().ok().flatten();
                let (client, directory, log) = (client.clone(), directory.clone(), log.clone());
                async move {
                    if let Some(exit) = exited {
                        let log = std::fs::read_to_string(&log).unwrap_or_default();
                        return Ok(Err(format!("{exit}: {}", log.lines().last().unwrap_or(""))));
                    }
                    let answer = client
                        .get(directory)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if answer.status().is_success() {
                        Ok(Ok(()))
                    } else {
                        Err(format!("answered {}", answer.status()))
                    }
                }
            },
        )
        .await;
        started.map(|()| pebble)
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.tls_ca_pem.as_bytes()).expect("pem"),
            )
            .build()
            .expect("client")
    }

    /// The root pebble issues under (generated per run).
    async fn issuing_root(&self) -> String {
        self.client()
            .get(format!("https://{}/roots/0", self.management))
            .send()
            .await
            .expect("pebble management")
            .text()
            .await
            .expect("root pem")
    }

    /// How many times the log shows `line`.
    fn log_count(&self, line: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(line)
            .count()
    }

    fn orders(&self) -> usize {
        self.log_count("Added order ")
    }

    fn acme(&self, dns: SocketAddr) -> AcmeConfig {
        AcmeConfig {
            root_ca: Some(self.tls_ca_file.clone()),
            dns_resolver: Some(dns),
            ..AcmeConfig::new(self.directory.clone())
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A cluster with a DNS name of its own (certificates are for names, not `127.0.0.1:port`).
fn acme_cluster() -> ClusterName {
    let suffix: u32 = rand::random();
    format!("c{suffix:08x}.plane.test")
        .parse()
        .expect("cluster")
}

async fn start_dns(env: &TestEnv) -> DnsHandle {
    let config = DnsConfig::new(
        env.controller().url(),
        "dns.plane.test".parse().expect("zone"),
    );
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    plane_dns::start(config, udp, tcp).await.expect("start dns")
}

fn acme_proxy_config(
    env: &TestEnv,
    cluster: &ClusterName,
    cert_path: &Path,
    acme: AcmeConfig,
) -> ProxyConfig {
    let mut config = ProxyConfig::new(env.controller().url(), cluster.clone());
    config.bind_ip = "127.0.0.1".parse().expect("ip");
    config.https_port = Some(0);
    config.cert_path = Some(cert_path.to_path_buf());
    config.acme = Some(acme);
    config
}

async fn start_proxy(config: ProxyConfig) -> ProxyHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    plane_proxy::start(config, listener).await.expect("proxy")
}

/// A TLS connection to the proxy as `host`, verified against `root` only; with the leaf
/// certificate it served.
async fn tls_connect(
    root: &str,
    https: SocketAddr,
    host: &str,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(https).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first().map(|cert| cert.to_vec()))
        .ok_or("no certificate")?;
    Ok((tls, leaf))
}

/// Waits until the proxy serves a certificate for `host` that chains to `root`; returns it.
async fn served_certificate(root: &str, https: SocketAddr, host: &str) -> Vec<u8> {
    wait_for(
        &format!("a certificate for {host} from the ACME CA"),
        Duration::from_secs(60),
        || async move { tls_connect(root, https, host).await.map(|(_, leaf)| leaf) },
    )
    .await
}

/// The proxy's `/ready` over HTTPS, as `host`, trusting only `root`.
async fn ready_over_https(root: &str, https: SocketAddr, host: &str) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).expect("pem"))
        .resolve(host, https)
        .build()
        .expect("client");
    let answer = client
        .get(format!("https://{host}:{}/ready", https.port()))
        .send()
        .await
        .expect("https /ready");
    (answer.status().as_u16(), answer.json().await.expect("json"))
}

db_test!(
    a_proxy_obtains_its_clusters_certificate_by_dns01_and_a_restart_reuses_it,
    |env: TestEnv| async move {
        let dns = start_dns(&env).await;
        let pebble = Pebble::start(&env.scratch.join("pebble"), dns.udp_addr(), false).await;
        let cluster = acme_cluster();
        let host = cluster.hostname().to_string();
        let cert_path = env.scratch.join("acme-cert.pem");
        let config = acme_proxy_config(&env, &cluster, &cert_path, pebble.acme(dns.udp_addr()));

        let proxy = start_proxy(config.clone()).await;
        let https = proxy.https_addr().expect("https");
        let root = pebble.issuing_root().await;
        let first = served_certificate(&root, https, &host).await;
        // The same certificate covers every subdomain (`*.<cluster>`).
        let (_, for_subdomain) = tls_connect(&root, https, &format!("doc-1.{host}"))
            .await
            .expect("the wildcard name verifies");
        assert_eq!(for_subdomain, first);
        let (status, body) = ready_over_https(&root, https, &host).await;
        assert_eq!(
            (status, &body["certificate"]),
            (200, &serde_json::json!(true)),
            "{body}"
        );
        assert_eq!(pebble.orders(), 1);
        // Kept with the key readable only by us, and the challenge values withdrawn.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cert_path)
            .expect("cert file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Withdrawn when the lease is released, just after the certificate is stored.
        crate::harness::wait_for(
            "the challenge values withdrawn",
            std::time::Duration::from_secs(10),
            || async {
                let (known, values) = env
                    .controller()
                    .state()
                    .store()
                    .acme_txt(
                        &host.parse().expect("host"),
                        plane_protocol::time::Millis::now(),
                    )
                    .await
                    .expect("txt");
                match known && values.is_empty() {
                    true => Ok(()),
                    false => Err(format!("known {known}, values {values:?}")),
                }
            },
        )
        .await;

        // Plain HTTP redirects to HTTPS, except the proxy's own /ready.
        let plain = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let answer = plain
            .get(format!("http://{}/ready", proxy.local_addr()))
            .send()
            .await
            .expect("plain /ready");
        assert_eq!(answer.status().as_u16(), 200);
        let answer = plain
            .get(format!("http://{}/some-token/path?q=1", proxy.local_addr()))
            .send()
            .await
            .expect("plain request");
        assert_eq!(answer.status().as_u16(), 308);

        // Restarted with the same --cert-path: serves the stored certificate at once and
        // orders nothing (nor registers a new account).
        proxy.shutdown().await;
        let proxy = start_proxy(config).await;
        let https = proxy.https_addr().expect("https");
        let (_, served) = tls_connect(&root, https, &host)
            .await
            .expect("the stored certificate is served from the start");
        assert_eq!(served, first);
        wait_for(
            "the restarted proxy to link",
            Duration::from_secs(20),
            || async { proxy.is_connected().then_some(()).ok_or("not yet") },
        )
        .await;
        holds_for(
            "no new order after the restart",
            Duration::from_secs(3),
            || async {
                match pebble.orders() {
                    1 => Ok(()),
                    orders => Err(format!("{orders} orders")),
                }
            },
        )
        .await;
        assert_eq!(pebble.log_count("accounts in memory"), 1);
        proxy.shutdown().await;
        dns.shutdown().await;
        env
    }
);

db_test!(
    two_proxies_of_a_cluster_make_one_order_between_them,
    |env: TestEnv| async move {
        let dns = start_dns(&env).await;
        let pebble = Pebble::start(&env.scratch.join("pebble"), dns.udp_addr(), false).await;
        let cluster = acme_cluster();
        let host = cluster.hostname().to_string();
        // On different machines they would not share a file: each has its own.
        let first = start_proxy(acme_proxy_config(
            &env,
            &cluster,
            &env.scratch.join("first.pem"),
            pebble.acme(dns.udp_addr()),
        ))
        .await;
        let second = start_proxy(acme_proxy_config(
            &env,
            &cluster,
            &env.scratch.join("second.pem"),
            pebble.acme(dns.udp_addr()),
        ))
        .await;
        let root = pebble.issuing_root().await;
        let from_first = served_certificate(&root, first.https_addr().expect("https"), &host).await;
        let from_second =
            served_certificate(&root, second.https_addr().expect("https"), &host).await;
        assert_eq!(from_first, from_second, "both serve the one certificate");
        assert_eq!(pebble.orders(), 1);
        first.shutdown().await;
        second.shutdown().await;
        dns.shutdown().await;
        env
    }
);

db_test!(
    renewal_replaces_the_certificate_while_an_open_websocket_carries_on,
    |env: TestEnv| async move {
        let dns = start_dns(&env).await;
        let pebble = Pebble::start(&env.scratch.join("pebble"), dns.udp_addr(), false).await;
        let cluster = acme_cluster();
        let host = cluster.hostname().to_string();
        let mut drone_config = env.drone_config("dr-acme");
        drone_config.cluster = cluster.clone();
        let drone = env.start_drone(drone_config).await;

        // Pebble's certificates last five years; a ten-year window makes every one due,
        // and the floor spaces the renewals out.
        let mut acme = pebble.acme(dns.udp_addr());
        acme.renew_before_seconds = Some(10 * 365 * 86_400);
        acme.min_renewal_interval_ms = 3_000;
        let proxy = start_proxy(acme_proxy_config(
            &env,
            &cluster,
            &env.scratch.join("renewed.pem"),
            acme,
        ))
        .await;
        let https = proxy.https_addr().expect("https");
        let root = pebble.issuing_root().await;
        let first = served_certificate(&root, https, &host).await;

        let mut spawn_config = env.spawn_config(&[]);
        spawn_config.cluster = Some(cluster.clone());
        let backend = env.connect_ready("acme-renewal", &spawn_config).await;
        assert!(
            backend.url.starts_with(&format!("https://{host}/")),
            "{}",
            backend.url
        );
        let token = backend.token.to_string();
        let (tls, _) = tls_connect(&root, https, &host).await.expect("tls");
        let (mut socket, _) =
            tokio_tungstenite::client_async(format!("wss://{host}/{token}/ws"), tls)
                .await
                .expect("a WebSocket through the proxy");
        socket.send(Message::text("before")).await.expect("send");
        let echoed = socket.next().await.expect("echo").expect("echo");
        assert_eq!(echoed.into_text().expect("text").as_str(), "before");

        let renewed = wait_for("a renewed certificate", Duration::from_secs(60), || {
            let (root, host, first) = (&root, &host, &first);
            async move {
                let (_, leaf) = tls_connect(root, https, host).await?;
                (leaf != *first)
                    .then_some(leaf)
                    .ok_or("still the first".to_string())
            }
        })
        .await;
        assert_ne!(renewed, first);
        assert!(pebble.orders() >= 2);
        // The WebSocket opened on the old certificate still works.
        socket.send(Message::text("after")).await.expect("send");
        let echoed = socket.next().await.expect("echo").expect("echo");
        assert_eq!(echoed.into_text().expect("text").as_str(), "after");
        let _ = socket.close(None).await;

        proxy.shutdown().await;
        drone.shutdown().await;
        dns.shutdown().await;
        env
    }
);

db_test!(
    a_ca_that_requires_external_account_binding_issues_with_it_and_refuses_without,
    |env: TestEnv| async move {
        let dns = start_dns(&env).await;
        let pebble = Pebble::start(&env.scratch.join("pebble"), dns.udp_addr(), true).await;
        let root = pebble.issuing_root().await;

        // Without EAB: the registration is refused and no certificate appears.
        let refused_cluster = acme_cluster();
        let refused = start_proxy(acme_proxy_config(
            &env,
            &refused_cluster,
            &env.scratch.join("no-eab.pem"),
            pebble.acme(dns.udp_addr()),
        ))
        .await;
        wait_for(
            "pebble to see a registration",
            Duration::from_secs(30),
            || async {
                (pebble.log_count("POST /sign-me-up") >= 1)
                    .then_some(())
                    .ok_or("not yet")
            },
        )
        .await;
        let answer = reqwest::get(format!("http://{}/ready", refused.local_addr()))
            .await
            .expect("plain /ready");
        assert_eq!(answer.status().as_u16(), 503);
        let body: serde_json::Value = answer.json().await.expect("json");
        assert_eq!(body["certificate"], serde_json::json!(false), "{body}");
        assert_eq!(pebble.orders(), 0);
        refused.shutdown().await;

        // With it: issued.
        let cluster = acme_cluster();
        let host = cluster.hostname().to_string();
        let mut acme = pebble.acme(dns.udp_addr());
        acme.eab_kid = Some(EAB_KID.to_string());
        acme.eab_hmac_key = Some(EAB_HMAC_KEY.to_string());
        acme.mailto = Some("ops@plane.test".to_string());
        let proxy = start_proxy(acme_proxy_config(
            &env,
            &cluster,
            &env.scratch.join("eab.pem"),
            acme,
        ))
        .await;
        served_certificate(&root, proxy.https_addr().expect("https"), &host).await;
        assert_eq!(pebble.orders(), 1);
        proxy.shutdown().await;
        dns.shutdown().await;
        env
    }
);

db_test!(
    the_certificate_lease_has_one_holder_until_released_or_expired,
    |env: TestEnv| async move {
        let store = env.controller().state().store();
        let cluster: ClusterName = "lease.plane.test:8443".parse().expect("cluster");
        let (first, second) = (
            "px-first".parse().expect("name"),
            "px-second".parse().expect("name"),
        );
        async fn lease(
            store: &plane::controller::store::Store,
            cluster: &ClusterName,
            who: &plane_protocol::names::NodeName,
            now: i64,
        ) -> bool {
            let at = |ms: i64| plane_protocol::time::Millis(1_000_000 + ms);
            store
                .take_cert_lease(cluster, who, at(now), at(now + 60_000))
                .await
                .expect("lease")
        }
        assert!(lease(store, &cluster, &first, 0).await);
        assert!(
            !lease(store, &cluster, &second, 1_000).await,
            "held by the first"
        );
        assert!(
            lease(store, &cluster, &first, 30_000).await,
            "the holder extends it"
        );
        assert!(
            !lease(store, &cluster, &second, 89_999).await,
            "extended to 90 s"
        );
        assert!(
            lease(store, &cluster, &second, 90_000).await,
            "expired: the second takes it"
        );

        // Values published under the cluster's host (no port) are withdrawn on release.
        let host: ClusterName = cluster.hostname().parse().expect("host");
        let now = plane_protocol::time::Millis::now();
        store
            .publish_acme_txt(
                &host,
                "value",
                now,
                plane_protocol::time::Millis(now.0 + 60_000),
            )
            .await
            .expect("publish");
        assert!(
            !store
                .release_cert_lease(&cluster, &first)
                .await
                .expect("release"),
            "not the holder any more"
        );
        assert_eq!(
            store.acme_txt(&host, now).await.expect("txt").1,
            vec!["value"]
        );
        assert!(store
            .release_cert_lease(&cluster, &second)
            .await
            .expect("release"));
        assert!(store.acme_txt(&host, now).await.expect("txt").1.is_empty());
        assert!(lease(store, &cluster, &first, 90_001).await, "free again");

        // A stored certificate is replaced only by one that lasts longer.
        let certificate = |not_after: i64| plane_protocol::proxy::ClusterCertificate {
            chain_pem: format!("chain {not_after}"),
            key_pem: "key".to_string(),
            not_after: plane_protocol::time::Millis(not_after),
        };
        assert!(store
            .store_certificate(&cluster, &certificate(10), &first, now)
            .await
            .expect("store"));
        assert!(store
            .store_certificate(&cluster, &certificate(20), &second, now)
            .await
            .expect("store"));
        assert!(!store
            .store_certificate(&cluster, &certificate(15), &first, now)
            .await
            .expect("store"));
        assert_eq!(
            store
                .certificate(&cluster)
                .await
                .expect("read")
                .map(|c| c.not_after.0),
            Some(20)
        );
        env
    }
);
