//! `plane dns` with real DNS queries over UDP and TCP: TXT answers for challenge names from
//! the controller's values, the error codes for everything else, garbage and floods survived,
//! and the link back after a controller restart.

use crate::db_test;
use crate::harness::{wait_for, TestEnv};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use plane_dns::{DnsConfig, DnsHandle};
use plane_protocol::names::ClusterName;
use plane_protocol::time::Millis;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const ZONE: &str = "dns.plane.test";
const CLUSTER: &str = "app.plane.test";

async fn start_dns(env: &TestEnv) -> DnsHandle {
    start_dns_with(env, None).await
}

/// A DNS server for the test's controller, serving its metrics on `metrics_port`.
async fn start_dns_with(env: &TestEnv, metrics_port: Option<u16>) -> DnsHandle {
    let mut config = DnsConfig::new(env.controller().url(), ZONE.parse().expect("zone"));
    config.metrics_port = metrics_port;
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
    plane_dns::start(config, udp, tcp).await.expect("start dns")
}

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::new();
    message
        .set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(false)
        .add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            record_type,
        ));
    message
}

/// Sends raw bytes over UDP; the decoded answer, or `None` if none came within `wait`.
async fn udp_exchange(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(bytes, server).await.expect("send");
    let mut buffer = vec![0; 65_535];
    let received = tokio::time::timeout(wait, socket.recv(&mut buffer)).await;
    let length = received.ok()?.expect("recv");
    Some(Message::from_vec(&buffer[..length]).expect("a DNS message"))
}

async fn udp(server: SocketAddr, message: &Message) -> Message {
    let bytes = message.to_vec().expect("encode");
    // Longer than the server's own wait for the controller (2 s), after which it says
    // SERVFAIL.
    udp_exchange(server, &bytes, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no UDP answer to {message:?}"))
}

async fn tcp(server: SocketAddr, message: &Message) -> Message {
    let bytes = message.to_vec().expect("encode");
    let mut stream = TcpStream::connect(server).await.expect("connect");
    stream
        .write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .expect("write length");
    stream.write_all(&bytes).await.expect("write");
    let mut length = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut length))
        .await
        .expect("a TCP answer within 5 s")
        .expect("read length");
    let mut answer = vec![0; u16::from_be_bytes(length) as usize];
    stream.read_exact(&mut answer).await.expect("read");
    Message::from_vec(&answer).expect("a DNS message")
}

fn txt_values(message: &Message) -> Vec<String> {
    message
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            Some(RData::TXT(txt)) => Some(
                txt.txt_data()
                    .iter()
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

async fn publish(env: &TestEnv, cluster: &str, value: &str, expires_in_ms: i64) {
    let cluster: ClusterName = cluster.parse().expect("cluster");
    let now = Millis::now();
    env.controller()
        .state()
        .store()
        .publish_acme_txt(&cluster, value, now, Millis(now.0 + expires_in_ms))
        .await
        .expect("publish");
}

/// Waits until the server answers a challenge query from the controller (not SERVFAIL).
async fn wait_until_linked(server: SocketAddr) {
    let probe = query(&format!("_acme-challenge.{CLUSTER}."), RecordType::TXT);
    wait_for(
        "the dns server to reach the controller",
        Duration::from_secs(20),
        || async {
            let answer = udp(server, &probe).await;
            match answer.response_code() {
                ResponseCode::ServFail => Err("SERVFAIL".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
}

db_test!(
    dns_answers_challenge_txt_over_udp_and_tcp_and_refuses_the_rest,
    |env: TestEnv| async move {
        let metrics_port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        let dns = start_dns_with(&env, Some(metrics_port)).await;
        publish(&env, CLUSTER, "first-value", 60_000).await;
        publish(&env, CLUSTER, "second-value", 60_000).await;
        publish(&env, CLUSTER, "expired-value", -1_000).await;
        publish(&env, "quiet.plane.test", "long-gone", -1_000).await;
        wait_until_linked(dns.udp_addr()).await;

        // Both names of the challenge, over both transports, with every live value, TTL 1.
        for name in [
            format!("_acme-challenge.{CLUSTER}."),
            format!("{CLUSTER}.{ZONE}."),
        ] {
            for answer in [
                udp(dns.udp_addr(), &query(&name, RecordType::TXT)).await,
                tcp(dns.tcp_addr(), &query(&name, RecordType::TXT)).await,
            ] {
                assert_eq!(answer.response_code(), ResponseCode::NoError, "{name}");
                assert!(answer.authoritative(), "{name}");
                let mut values = txt_values(&answer);
                values.sort();
                assert_eq!(values, ["first-value", "second-value"], "{name}");
                assert!(answer.answers().iter().all(|r| r.ttl() == 1));
            }
        }
        // The name exists only with TXT: NOERROR, no answer.
        let answer = udp(
            dns.udp_addr(),
            &query(&format!("_acme-challenge.{CLUSTER}."), RecordType::A),
        )
        .await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(answer.answers().is_empty());
        // A known cluster whose values have all expired: NOERROR, no answer.
        let answer = udp(
            dns.udp_addr(),
            &query("_acme-challenge.quiet.plane.test.", RecordType::TXT),
        )
        .await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(answer.answers().is_empty());
        // The zone apex: ours, nothing to say.
        let answer = udp(dns.udp_addr(), &query(&format!("{ZONE}."), RecordType::TXT)).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError);
        assert!(answer.answers().is_empty());
        // A cluster the controller does not know, and a name outside the zone: REFUSED.
        for name in ["_acme-challenge.unknown.plane.test.", "www.example.com."] {
            let answer = udp(dns.udp_addr(), &query(name, RecordType::TXT)).await;
            assert_eq!(answer.response_code(), ResponseCode::Refused, "{name}");
        }
        // Another opcode: NOTIMP.
        let mut notify = query(&format!("{ZONE}."), RecordType::SOA);
        notify.set_op_code(OpCode::Notify);
        let answer = udp(dns.udp_addr(), &notify).await;
        assert_eq!(answer.response_code(), ResponseCode::NotImp);

        // Every answer was counted by its code.
        let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
        let scrape = crate::metrics::Scrape::of(&env.client, &metrics).await;
        let queries = "plane_dns_queries_total";
        // Those above, and the probes that waited for the link.
        assert!(scrape.value(queries, &[("rcode", "noerror")]) >= 7.0);
        assert_eq!(scrape.value(queries, &[("rcode", "refused")]), 2.0);
        assert_eq!(scrape.value(queries, &[("rcode", "notimp")]), 1.0);
        dns.shutdown().await;
        env
    }
);

db_test!(
    dns_survives_garbage_truncation_huge_queries_and_floods,
    |env: TestEnv| async move {
        let dns = start_dns(&env).await;
        publish(&env, CLUSTER, "still-here", 60_000).await;
        wait_until_linked(dns.udp_addr()).await;
        let good = query(&format!("_acme-challenge.{CLUSTER}."), RecordType::TXT);
        let good_bytes = good.to_vec().expect("encode");

        // Garbage, a truncated query, a header claiming two questions, a 60 KB datagram:
        // each is answered FORMERR or dropped, never a crash.
        let mut two_questions = good_bytes.clone();
        two_questions[5] = 2;
        let packets: Vec<Vec<u8>> = vec![
            vec![0xff; 3],
            b"this is not dns at all".to_vec(),
            good_bytes[..good_bytes.len() / 2].to_vec(),
            two_questions,
            vec![0x42; 60_000],
        ];
        for packet in &packets {
            if let Some(answer) = udp_exchange(dns.udp_addr(), packet, Duration::from_secs(1)).await
            {
                assert_eq!(answer.response_code(), ResponseCode::FormErr, "{packet:?}");
            }
        }
        // Garbage over TCP: the connection is closed or answered, and the server goes on.
        let mut stream = TcpStream::connect(dns.tcp_addr()).await.expect("connect");
        let _ = stream.write_all(&[0x00, 0x10, 1, 2, 3]).await;
        drop(stream);

        // A flood of queries sent without waiting for answers.
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        for _ in 0..3_000 {
            let _ = socket.send_to(&good_bytes, dns.udp_addr()).await;
        }
        // Still answering, correctly, once the flood is worked off.
        let flooded_at = std::time::Instant::now();
        wait_for(
            "answers after the flood",
            Duration::from_secs(20),
            || async {
                match udp_exchange(dns.udp_addr(), &good_bytes, Duration::from_secs(2)).await {
                    Some(answer) if txt_values(&answer) == ["still-here"] => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        tracing::info!(after = ?flooded_at.elapsed(), "answering again after the flood");
        let answer = tcp(dns.tcp_addr(), &good).await;
        assert_eq!(txt_values(&answer), ["still-here"]);
        dns.shutdown().await;
        env
    }
);

db_test!(
    dns_server_relinks_after_a_controller_restart,
    |mut env: TestEnv| async move {
        let dns = start_dns(&env).await;
        publish(&env, CLUSTER, "before", 60_000).await;
        wait_until_linked(dns.udp_addr()).await;
        env.restart_controller().await;
        publish(&env, CLUSTER, "after", 60_000).await;
        let probe = query(&format!("_acme-challenge.{CLUSTER}."), RecordType::TXT);
        wait_for(
            "answers from the new controller",
            Duration::from_secs(30),
            || async {
                let mut values = txt_values(&udp(dns.udp_addr(), &probe).await);
                values.sort();
                if values == ["after", "before"] {
                    Ok(())
                } else {
                    Err(format!("{values:?}"))
                }
            },
        )
        .await;
        dns.shutdown().await;
        env
    }
);

db_test!(
    a_dns_server_needs_the_cluster_secret_when_the_controller_asks_for_one,
    |env: TestEnv| async move {
        let guarded = env
            .start_controller_with(|config| {
                config.db = env.scratch.join("guarded.db").display().to_string();
                config.cluster_secret = Some("dns-s3cret".to_string());
            })
            .await;
        let start = |secret: Option<&str>| {
            let mut config = DnsConfig::new(guarded.url(), ZONE.parse().expect("zone"));
            config.cluster_secret = secret.map(str::to_string);
            async move {
                let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
                let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
                plane_dns::start(config, udp, tcp).await.expect("start dns")
            }
        };
        let cluster: ClusterName = CLUSTER.parse().expect("cluster");
        let now = Millis::now();
        guarded
            .state()
            .store()
            .publish_acme_txt(&cluster, "guarded", now, Millis(now.0 + 60_000))
            .await
            .expect("publish");
        let probe = query(&format!("_acme-challenge.{CLUSTER}."), RecordType::TXT);

        // Without the secret the socket is refused: queries get SERVFAIL, not values.
        let outsider = start(None).await;
        crate::harness::holds_for(
            "an unlinked server answers SERVFAIL",
            Duration::from_secs(3),
            || async {
                match udp(outsider.udp_addr(), &probe).await.response_code() {
                    ResponseCode::ServFail => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        outsider.shutdown().await;

        let member = start(Some("dns-s3cret")).await;
        wait_until_linked(member.udp_addr()).await;
        assert_eq!(
            txt_values(&udp(member.udp_addr(), &probe).await),
            ["guarded"]
        );
        member.shutdown().await;
        guarded.shutdown().await;
        env
    }
);
