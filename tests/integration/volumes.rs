//! Backend volumes under a drone's `--mount-base`, bound at `/plane-data`: what one backend
//! of a key writes the next one reads, backends naming one path share it, and every unsafe
//! form is refused (a 400 at the controller; a symlink on disk by the drone).

use crate::db_test;
use crate::harness::TestEnv;
use plane_drone::DroneHandle;
use plane_protocol::api::{ConnectResponse, SpawnConfig};
use plane_protocol::backend::{TerminationKind, TerminationReason};
use plane_protocol::mount::Mount;
use serde_json::json;
use std::path::{Path, PathBuf};

/// A drone with a mount base, which takes every backend while the in-process one is drained.
async fn drone_with_mounts(env: &TestEnv) -> (DroneHandle, PathBuf) {
    let base = env.scratch.join("mounts");
    let mut config = env.drone_config("dr-mounts");
    config.mount_base = Some(base.clone());
    let drone = env.start_drone(config).await;
    env.set_draining(env.drone.name(), true).await;
    (drone, base)
}

fn mounted(env: &TestEnv, mount: Mount) -> SpawnConfig {
    let mut spawn = env.spawn_config(&[]);
    spawn.executable.mount = Some(mount);
    spawn
}

async fn write(env: &TestEnv, backend: &ConnectResponse, name: &str, text: &str) {
    let url = env.proxy_url(&format!("/{}/data/{name}", backend.token));
    let answer = env
        .client
        .put(url)
        .body(text.to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(
        answer.status().as_u16(),
        200,
        "{}",
        answer.text().await.unwrap_or_default()
    );
}

async fn read(env: &TestEnv, backend: &ConnectResponse, name: &str) -> (u16, String) {
    env.get_via_proxy(backend.token.as_str(), &format!("/data/{name}"))
        .await
}

async fn stop(env: &TestEnv, backend: &ConnectResponse) {
    env.terminate(&backend.backend_id, TerminationKind::Hard)
        .await;
    env.wait_terminated(&backend.backend_id).await;
}

db_test!(
    what_a_keys_backend_writes_its_next_backend_reads,
    |env: TestEnv| async move {
        let (drone, base) = drone_with_mounts(&env).await;
        let first = env
            .connect_ready("notebook", &mounted(&env, Mount::Enabled(true)))
            .await;
        write(&env, &first, "state", "saved by the first").await;
        stop(&env, &first).await;
        let second = env
            .connect_ready("notebook", &mounted(&env, Mount::Enabled(true)))
            .await;
        assert_ne!(second.backend_id, first.backend_id);
        assert_eq!(
            read(&env, &second, "state").await,
            (200, "saved by the first".to_string())
        );
        // Another key sees nothing of it.
        let other = env
            .connect_ready("other-notebook", &mounted(&env, Mount::Enabled(true)))
            .await;
        assert_eq!(read(&env, &other, "state").await.0, 404);
        // On the drone's disk, under the base, in the key's own directory.
        let on_disk = std::fs::read_to_string(base.join("keys/-/notebook/state")).expect("file");
        assert_eq!(on_disk, "saved by the first");

        // A chosen path is shared by the backends that name it.
        let shared = Mount::Path("projects/one".to_string());
        let writer = env
            .connect_ready("writer", &mounted(&env, shared.clone()))
            .await;
        write(&env, &writer, "doc", "shared").await;
        let reader = env.connect_ready("reader", &mounted(&env, shared)).await;
        assert_eq!(
            read(&env, &reader, "doc").await,
            (200, "shared".to_string())
        );
        env.set_draining(env.drone.name(), false).await;
        drone.shutdown().await;
        env
    }
);

db_test!(
    unsafe_mounts_are_refused_at_the_controller_and_the_drone,
    |env: TestEnv| async move {
        let base = serde_json::to_value(env.spawn_config(&[])).expect("json");
        for bad in [
            json!("/etc"),
            json!("../escape"),
            json!("a/../../b"),
            json!("a//b"),
            json!("a/./b"),
            json!("a b"),
            json!("ünï"),
            json!(""),
            json!(7),
        ] {
            let mut spawn = base.clone();
            spawn["executable"]["mount"] = bad.clone();
            let (status, body) = env
                .post(
                    "/ctrl/connect",
                    &json!({ "key": { "name": "refused" }, "spawn_config": spawn }),
                )
                .await;
            assert_eq!(status, 400, "{bad}: {body}");
            assert!(
                body["message"].as_str().unwrap_or("").contains("mount"),
                "{bad}: {body}"
            );
        }

        // A symlink planted under the base that leads outside it: the drone refuses it.
        let (drone, mount_base) = drone_with_mounts(&env).await;
        let outside = env.scratch.join("outside");
        std::fs::create_dir_all(mount_base.join("paths")).expect("paths");
        std::fs::create_dir_all(&outside).expect("outside");
        std::os::unix::fs::symlink(&outside, mount_base.join("paths/evil")).expect("symlink");
        let backend = env
            .connect(
                "escaper",
                &mounted(&env, Mount::Path("evil/inside".to_string())),
            )
            .await;
        let ended = env.wait_terminated(&backend.backend_id).await;
        assert_eq!(
            ended.termination_reason,
            Some(TerminationReason::InternalError)
        );
        let message = ended.message.clone().unwrap_or_default();
        assert!(message.contains("symlink"), "{message}");
        assert!(!Path::new(&outside).join("inside").exists());

        // A drone without a mount base says so.
        env.set_draining(env.drone.name(), false).await;
        env.set_draining(drone.name(), true).await;
        let backend = env
            .connect("no-base", &mounted(&env, Mount::Enabled(true)))
            .await;
        let ended = env.wait_terminated(&backend.backend_id).await;
        let message = ended.message.clone().unwrap_or_default();
        assert!(message.contains("--mount-base"), "{message}");
        drone.shutdown().await;
        env
    }
);
