//! Image pulls against a real (local, password-protected) registry: each pull policy, and
//! registry credentials.

use crate::harness::{test_image, TestEnv};
use crate::{db_test, postgres_test};
use bollard::auth::DockerCredentials;
use bollard::image::{PushImageOptions, RemoveImageOptions, TagImageOptions};
use futures_util::StreamExt;
use plane_protocol::api::{PullPolicy, RegistryCredentials, SpawnConfig};
use plane_protocol::backend::TerminationReason;
use rand::distributions::{Alphanumeric, DistString};

/// The test registry, started by the test command: `host:port`, user, password.
struct Registry {
    address: String,
    username: String,
    password: String,
}

fn registry() -> Registry {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} must be set: the test command (scripts/test.sh) starts a local registry")
        })
    };
    Registry {
        address: var("PLANE_TEST_REGISTRY"),
        username: var("PLANE_TEST_REGISTRY_USER"),
        password: var("PLANE_TEST_REGISTRY_PASSWORD"),
    }
}

impl Registry {
    fn credentials(&self) -> RegistryCredentials {
        RegistryCredentials {
            username: self.username.clone(),
            password: self.password.clone(),
        }
    }

    /// Pushes the test backend image under a fresh repository and removes the local tag, so
    /// the engine must pull it to run it. Returns the image reference.
    async fn push_fresh_image(&self) -> String {
        let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
        let name = Alphanumeric
            .sample_string(&mut rand::thread_rng(), 10)
            .to_lowercase();
        let repo = format!("{}/plane-test/pull-{name}", self.address);
        docker
            .tag_image(
                test_image(),
                Some(TagImageOptions {
                    repo: repo.as_str(),
                    tag: "v1",
                }),
            )
            .await
            .expect("tag for the registry");
        let credentials = DockerCredentials {
            username: Some(self.username.clone()),
            password: Some(self.password.clone()),
            serveraddress: Some(self.address.clone()),
            ..Default::default()
        };
        let mut push = docker.push_image(
            &repo,
            Some(PushImageOptions { tag: "v1" }),
            Some(credentials),
        );
        while let Some(step) = push.next().await {
            let step = step.expect("push to the test registry");
            assert!(step.error.is_none(), "push failed: {step:?}");
        }
        let image = format!("{repo}:v1");
        remove_local(&image).await;
        image
    }
}

/// Untags a local image (the layers stay, shared with the test image).
async fn remove_local(image: &str) {
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
    let options = RemoveImageOptions {
        force: false,
        noprune: true,
    };
    let _ = docker.remove_image(image, Some(options), None).await;
}

fn config_for(env: &TestEnv, image: &str, policy: Option<PullPolicy>) -> SpawnConfig {
    let mut config = env.spawn_config(&[]);
    config.executable.image = image.to_string();
    config.executable.pull_policy = policy;
    config.executable.credentials = Some(registry().credentials());
    config
}

db_test!(
    a_missing_image_is_pulled_with_credentials_by_default,
    |env: TestEnv| async move {
        let image = registry().push_fresh_image().await;
        let response = env
            .connect_ready("pulled", &config_for(&env, &image, None))
            .await;
        let (code, _) = env.get_via_proxy(response.token.as_str(), "/").await;
        assert_eq!(code, 200);
        remove_local(&image).await;
        env
    }
);

db_test!(
    pull_policy_always_pulls_even_when_the_image_is_present,
    |env: TestEnv| async move {
        let image = registry().push_fresh_image().await;
        env.connect_ready(
            "always",
            &config_for(&env, &image, Some(PullPolicy::Always)),
        )
        .await;
        // Present now; Always still goes to the registry, so without credentials it fails.
        let mut config = config_for(&env, &image, Some(PullPolicy::Always));
        config.executable.credentials = None;
        let response = env.connect("always-no-credentials", &config).await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(
            entry.termination_reason,
            Some(TerminationReason::InternalError)
        );
        remove_local(&image).await;
        env
    }
);

db_test!(
    pull_policy_never_refuses_an_image_the_drone_lacks,
    |env: TestEnv| async move {
        let image = registry().push_fresh_image().await;
        let response = env
            .connect("never", &config_for(&env, &image, Some(PullPolicy::Never)))
            .await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(
            entry.termination_reason,
            Some(TerminationReason::InternalError)
        );
        assert!(entry.message.unwrap_or_default().contains(&image));
        env
    }
);

/// Test drones pull only from the test registry (`--allowed-registry`): an image of any
/// other registry fails its start without the engine being asked for it, and one already on
/// the drone still runs unless its pull policy asks for a pull.
#[tokio::test(flavor = "current_thread")]
async fn images_of_registries_the_drone_does_not_allow_are_never_pulled() {
    crate::harness::run_test(
        "images_of_registries_the_drone_does_not_allow_are_never_pulled",
        crate::harness::Db::Sqlite,
        |env: TestEnv| async move {
            let local = test_image();
            for (image, policy) in [
                ("127.0.0.2:1/plane-test/elsewhere:v1", None),
                (local, Some(PullPolicy::Always)),
            ] {
                let response = env
                    .connect(
                        &format!("refused-{}", image.len()),
                        &config_for(&env, image, policy),
                    )
                    .await;
                let entry = env.wait_terminated(&response.backend_id).await;
                let message = entry.message.unwrap_or_default();
                assert!(
                    message.contains("--allowed-registry") && message.contains(image),
                    "{image}: {message}"
                );
            }
            env.connect_ready("present", &config_for(&env, local, None))
                .await;
            env
        },
    )
    .await;
}

db_test!(
    wrong_registry_credentials_fail_the_start_with_a_reason,
    |env: TestEnv| async move {
        let image = registry().push_fresh_image().await;
        let mut config = config_for(&env, &image, None);
        config.executable.credentials = Some(RegistryCredentials {
            username: "plane".to_string(),
            password: "wrong".to_string(),
        });
        let response = env.connect("bad-credentials", &config).await;
        let entry = env.wait_terminated(&response.backend_id).await;
        assert_eq!(
            entry.termination_reason,
            Some(TerminationReason::InternalError)
        );
        env
    }
);

async fn present_locally(image: &str) -> bool {
    let docker = bollard::Docker::connect_with_local_defaults().expect("docker");
    docker.inspect_image(image).await.is_ok()
}

/// Asks `api` to prepull `image` with the registry's credentials; the one drone of the
/// cluster, the test's, must have pulled it by the answer.
async fn prepull_pulls_on_the_test_drone(
    env: &TestEnv,
    api: &crate::harness::Api,
    registry: &Registry,
    image: &str,
) {
    let (status, body) = api
        .post(
            &format!("/ctrl/c/{}/prepull", env.cluster),
            &serde_json::json!({ "image": image, "credentials": registry.credentials() }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let drones = body["drones"].as_array().expect("drones");
    assert_eq!(drones.len(), 1, "{body}");
    assert_eq!(drones[0]["drone"], env.drone.name().as_str(), "{body}");
    assert_eq!(drones[0]["outcome"], "pulled", "{body}");
    assert!(present_locally(image).await, "pulled before the answer");
}

db_test!(
    prepull_asks_every_drone_to_pull_and_reports_each,
    |env: TestEnv| async move {
        let registry = registry();
        let image = registry.push_fresh_image().await;
        assert!(!present_locally(&image).await);
        let cluster = env.cluster.clone();
        prepull_pulls_on_the_test_drone(&env, &env.api(), &registry, &image).await;

        // Without the credentials the registry refuses, and the answer says so.
        remove_local(&image).await;
        let (status, body) = env
            .post(
                &format!("/ctrl/c/{cluster}/prepull"),
                &serde_json::json!({ "image": image }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["drones"][0]["outcome"], "failed", "{body}");
        assert!(
            body["drones"][0]["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty()),
            "{body}"
        );

        // Bad requests name what is wrong.
        for (request, expected) in [
            (serde_json::json!({ "image": "" }), "image must be"),
            (serde_json::json!({ "image": "a b" }), "image must be"),
            (
                serde_json::json!({ "image": "x", "timeout_seconds": 0 }),
                "timeout_seconds",
            ),
            (serde_json::json!({ "imag": "x" }), "imag"),
        ] {
            let (status, body) = env
                .post(&format!("/ctrl/c/{cluster}/prepull"), &request)
                .await;
            assert_eq!(status, 400, "{request}: {body}");
            assert!(
                body["message"].as_str().unwrap_or("").contains(expected),
                "{body}"
            );
        }
        env
    }
);

db_test!(
    a_drone_started_with_prepull_has_the_image_before_it_takes_work,
    |env: TestEnv| async move {
        let registry = registry();
        let image = registry.push_fresh_image().await;
        assert!(!present_locally(&image).await);
        let mut config = env.drone_config("dr-preseeded");
        config.prepull = vec![image.clone()];
        config.prepull_credentials = Some(registry.credentials());
        // Returns once the drone is connected, which it is only after the pull.
        let drone = env.start_drone(config).await;
        assert!(present_locally(&image).await);
        drone.shutdown().await;
        remove_local(&image).await;
        env
    }
);

postgres_test!(
    prepull_reaches_drones_connected_to_other_controllers,
    |env: TestEnv| async move {
        // The test's drone is connected to the first controller; ask the second.
        let registry = registry();
        let image = registry.push_fresh_image().await;
        let other = env.start_controller().await;
        prepull_pulls_on_the_test_drone(&env, &env.api_at(&other.url()), &registry, &image).await;
        other.shutdown().await;
        env
    }
);
