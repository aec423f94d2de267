//! temporary experiment
use bollard::image::{BuildImageOptions, RemoveImageOptions};
use futures_util::{SinkExt, StreamExt};
use plane_drone::DroneConfig;
use plane_protocol::api::ExecutorConfig;
use plane_protocol::backend::*;
use plane_protocol::drone::*;
use plane_protocol::names::*;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\", \"sh\", \"-c\"]\nCMD [\"trap 'exit 7' TERM; env; /bin/busybox httpd -f -p 8080 -h / & wait\"]\n";

fn ctx() -> Vec<u8> {
    let bb = std::fs::read("/bin/busybox").unwrap();
    let mut a = tar::Builder::new(Vec::new());
    for (p, m, d) in [("Dockerfile", 0o644, DOCKERFILE.as_bytes()), ("busybox", 0o755, bb.as_slice())] {
        let mut h = tar::Header::new_gnu(); h.set_size(d.len() as u64); h.set_mode(m); h.set_cksum();
        a.append_data(&mut h, p, d).unwrap();
    }
    a.into_inner().unwrap()
}

type S = WebSocketStream<TcpStream>;
async fn next(s: &mut S, t0: Instant) -> MessageFromDrone {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), s.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(t) = f {
            let m: MessageFromDrone = serde_json::from_str(&t).unwrap();
            if matches!(m, MessageFromDrone::Heartbeat{..}) { continue; }
            if let MessageFromDrone::BackendEvent(e) = &m {
                let ack = serde_json::to_string(&MessageToDrone::EventAck{event_id: e.event_id}).unwrap();
                s.send(Message::Text(ack.into())).await.unwrap();
            }
            eprintln!("[{:>6}ms] {}", t0.elapsed().as_millis(), serde_json::to_string(&m).unwrap());
            return m;
        }
    }
}
async fn until(s: &mut S, t0: Instant, b: &BackendName, st: BackendStatus) {
    loop { if let MessageFromDrone::BackendEvent(e) = next(s, t0).await { if &e.backend_id == b && e.update.status == st { return; } } }
}
async fn act(s: &mut S, id: i64, b: &BackendName, action: ActionKind) {
    let m = MessageToDrone::Action(BackendAction{action_id: id, backend_id: b.clone(), action});
    s.send(Message::Text(serde_json::to_string(&m).unwrap().into())).await.unwrap();
}
fn spawn(image: &str) -> ActionKind {
    ActionKind::Spawn(SpawnAction{ executable: ExecutorConfig{ image: image.into(), pull_policy: None, credentials: None,
        env: [("FOO".to_string(),"bar".to_string()),("PORT".to_string(),"1".to_string())].into(), resource_limits: plane_protocol::api::ResourceLimits{memory_limit_bytes: Some(64<<20), cpu_period_percent: Some(50), ..Default::default()}, mount: None},
        key: Some("k1".into()), fencing_token: Some(3), static_token: None })
}

#[tokio::test]
async fn e2e() {
    let docker = bollard::Docker::connect_with_defaults().unwrap().negotiate_version().await.unwrap();
    let tag = format!("plane-e2e:{}", BackendName::new_random());
    let mut b = docker.build_image(BuildImageOptions{t: tag.clone(), rm: true, ..Default::default()}, None, Some(ctx().into()));
    while let Some(x) = b.next().await { x.unwrap(); }

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = DroneConfig::new(format!("http://{}", l.local_addr().unwrap()).parse().unwrap(), "localhost:9090".parse().unwrap());
    config.stop_grace_period_ms = 1000;
    config.heartbeat_interval_ms = 500;
    let t0 = Instant::now();
    let h = plane_drone::start(config.clone()).await.unwrap();
    let (st, _) = l.accept().await.unwrap();
    let mut s = tokio_tungstenite::accept_async(st).await.unwrap();
    next(&mut s, t0).await;
    let mut c = h.connected(); c.wait_for(|c| *c).await.unwrap();

    let b1 = BackendName::new_random();
    act(&mut s, 1, &b1, spawn(&tag)).await;
    act(&mut s, 2, &b1, spawn(&tag)).await;
    until(&mut s, t0, &b1, BackendStatus::Ready).await;
    let info = docker.inspect_container(&format!("plane-{b1}"), None).await.unwrap();
    eprintln!("env {:?}", info.config.unwrap().env);
    let hc = info.host_config.unwrap(); eprintln!("mem {:?} cpu {:?}/{:?}", hc.memory, hc.cpu_quota, hc.cpu_period);
    act(&mut s, 3, &b1, ActionKind::Terminate{kind: TerminationKind::Soft, reason: TerminationReason::External}).await;
    until(&mut s, t0, &b1, BackendStatus::Terminated).await;
    assert!(docker.inspect_container(&format!("plane-{b1}"), None).await.is_err());

    let b2 = BackendName::new_random();
    let t = Instant::now();
    act(&mut s, 4, &b2, spawn("plane-nonexistent-image-xyz")).await;
    until(&mut s, t0, &b2, BackendStatus::Terminated).await;
    eprintln!("nonexistent image failure took {:?}", t.elapsed());

    // a backend that exits on its own
    let b3 = BackendName::new_random();
    act(&mut s, 5, &b3, spawn(&tag)).await;
    until(&mut s, t0, &b3, BackendStatus::Ready).await;
    docker.kill_container(&format!("plane-{b3}"), Some(bollard::container::KillContainerOptions{signal: "SIGUSR1"})).await.unwrap();
    until(&mut s, t0, &b3, BackendStatus::Terminated).await;

    // shutdown with a running backend
    let b4 = BackendName::new_random();
    act(&mut s, 6, &b4, spawn(&tag)).await;
    until(&mut s, t0, &b4, BackendStatus::Ready).await;
    let sd = tokio::spawn(h.shutdown());
    until(&mut s, t0, &b4, BackendStatus::Terminated).await;
    // keep reading to ack
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), s.next()).await {} });
    sd.await.unwrap();
    reader.await.unwrap();
    eprintln!("shutdown done at {:?}", t0.elapsed());

    // orphan: start a container labelled for drone X, then start drone X
    let b5 = BackendName::new_random();
    let h2 = plane_drone::start(config.clone()).await.unwrap();
    let (st, _) = l.accept().await.unwrap();
    let mut s = tokio_tungstenite::accept_async(st).await.unwrap();
    next(&mut s, t0).await;
    act(&mut s, 7, &b5, spawn(&tag)).await;
    until(&mut s, t0, &b5, BackendStatus::Ready).await;
    drop(h2); // no graceful shutdown: simulates a crash (tasks remain until runtime ends though)
    drop(s);
    let h3 = plane_drone::start(config.clone()).await.unwrap();
    let (st, _) = l.accept().await.unwrap();
    let mut s = tokio_tungstenite::accept_async(st).await.unwrap();
    next(&mut s, t0).await;
    until(&mut s, t0, &b5, BackendStatus::Terminated).await;
    let t = Instant::now();
    let sd = tokio::spawn(h3.shutdown());
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), s.next()).await {} });
    sd.await.unwrap(); reader.abort();
    eprintln!("empty shutdown took {:?}", t.elapsed());
    docker.remove_image(&tag, Some(RemoveImageOptions{force: true, ..Default::default()}), None).await.unwrap();
}
