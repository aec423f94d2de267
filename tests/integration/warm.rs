//! Warm pools, against real containers: a pool fills to its size; a connect with the same
//! executable claims one (the backend gets the claim body, then it is `ready` for the key)
//! and the pool refills; a refused claim ends that backend and the connect starts a cold
//! one; shrinking stops the extra; draining a drone moves its warm backends; and claims
//! racing cold spawns keep one backend per key.

use crate::db_test;
use crate::harness::{holds_for, wait_for, TestEnv, BACKEND_WAIT};
use plane_protocol::api::{SpawnConfig, WarmPoolState};
use plane_protocol::backend::BackendStatus;
use plane_protocol::names::{BackendName, PoolName};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

async fn set_pool(env: &TestEnv, spawn: &SpawnConfig, size: u32) -> WarmPoolState {
    match env
        .api()
        .plane
        .set_warm_pool(
            &env.cluster,
            &PoolName::default(),
            spawn.executable.clone(),
            size,
        )
        .await
    {
        Ok(state) => state,
        Err(error) => panic!("setting the warm pool to {size}: {error}"),
    }
}

/// Waits until the cluster state shows the pool with `idle` idle and nothing starting.
async fn wait_for_idle(env: &TestEnv, idle: u32) {
    wait_for(
        &format!("a warm pool with {idle} idle"),
        BACKEND_WAIT,
        || async {
            let state = env.cluster_state().await;
            match state.warm_pools.first() {
                Some(pool) if pool.idle == idle && pool.starting == 0 => Ok(()),
                _ => Err(format!("{:?}", state.warm_pools)),
            }
        },
    )
    .await
}

/// The live backends no key holds: the unclaimed warm ones.
async fn unclaimed(env: &TestEnv) -> Vec<(BackendName, String)> {
    let overview = env.api().plane.overview().await.expect("overview");
    overview
        .backends
        .into_iter()
        .filter(|b| b.key.is_none() && !b.status.is_terminating())
        .map(|b| (b.backend_id, b.drone.to_string()))
        .collect()
}

db_test!(
    a_warm_pool_fills_is_claimed_refills_and_shrinks,
    |env: TestEnv| async move {
        let spawn = env.spawn_config(&[]);
        let set = set_pool(&env, &spawn, 2).await;
        assert_eq!(set.size, 2);
        wait_for_idle(&env, 2).await;
        let warm: HashSet<BackendName> = unclaimed(&env).await.into_iter().map(|b| b.0).collect();
        assert_eq!(warm.len(), 2, "{warm:?}");

        // Unclaimed backends are never reaped, whatever their age: they have no idle limit
        // until a connect gives them one.
        let claiming = SpawnConfig {
            max_idle_seconds: Some(1),
            ..spawn.clone()
        };
        let claimed = env.connect("doc-1", &claiming).await;
        assert!(
            warm.contains(&claimed.backend_id),
            "claimed a warm one: {claimed:?}"
        );
        assert!(claimed.spawned);
        // The claim is answered once the backend has accepted it.
        assert_eq!(claimed.status, BackendStatus::Ready, "{claimed:?}");

        // The backend got the claim, and the key is its own.
        let (code, body) = env
            .get_via_proxy(claimed.token.as_str(), "/.plane/claim")
            .await;
        assert_eq!(code, 200, "{body}");
        let claim: Value = serde_json::from_str(&body).expect("claim JSON");
        assert_eq!(
            claim["backend_id"],
            claimed.backend_id.to_string(),
            "{claim}"
        );
        assert_eq!(claim["key"], "doc-1", "{claim}");
        assert!(
            claim["fencing_token"].as_i64().is_some_and(|t| t >= 1),
            "{claim}"
        );
        assert_eq!(claim["static_token"], Value::Null, "{claim}");
        let joined = env.connect("doc-1", &claiming).await;
        assert_eq!(joined.backend_id, claimed.backend_id);
        assert!(!joined.spawned);
        let statuses = env.status_sequence(&claimed.backend_id).await;
        let waiting = statuses.iter().position(|s| *s == BackendStatus::Waiting);
        let ready = statuses.iter().position(|s| *s == BackendStatus::Ready);
        assert!(
            waiting < ready,
            "waiting, then ready at the claim: {statuses:?}"
        );

        // The pool refills to two unclaimed.
        wait_for_idle(&env, 2).await;
        let refilled: HashSet<BackendName> =
            unclaimed(&env).await.into_iter().map(|b| b.0).collect();
        assert!(!refilled.contains(&claimed.backend_id));

        // The claimed one is reaped once idle (it has the connect's limit); the unclaimed
        // stay.
        let swept = env.wait_terminated(&claimed.backend_id).await;
        assert_eq!(
            swept.termination_reason,
            Some(plane_protocol::backend::TerminationReason::Swept),
            "{swept:?}"
        );
        holds_for("the unclaimed stay", Duration::from_secs(2), || async {
            let now: HashSet<BackendName> =
                unclaimed(&env).await.into_iter().map(|b| b.0).collect();
            if now == refilled {
                Ok(())
            } else {
                Err(format!("{now:?} != {refilled:?}"))
            }
        })
        .await;

        // Shrinking stops the extra, and zero stops them all.
        set_pool(&env, &spawn, 1).await;
        wait_for_idle(&env, 1).await;
        wait_for("one unclaimed left", BACKEND_WAIT, || async {
            let left = unclaimed(&env).await;
            if left.len() == 1 {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        })
        .await;
        set_pool(&env, &spawn, 0).await;
        wait_for("no warm pool, nothing unclaimed", BACKEND_WAIT, || async {
            let state = env.cluster_state().await;
            let left = unclaimed(&env).await;
            if state.warm_pools.is_empty() && left.is_empty() {
                Ok(())
            } else {
                Err(format!("{:?} {left:?}", state.warm_pools))
            }
        })
        .await;
        env
    }
);

db_test!(
    a_refused_claim_ends_that_backend_and_the_connect_starts_a_cold_one,
    |env: TestEnv| async move {
        let spawn = env.spawn_config(&[("DEMO_REFUSE_CLAIM", "1")]);
        set_pool(&env, &spawn, 1).await;
        wait_for_idle(&env, 1).await;
        let warm = unclaimed(&env).await;
        assert_eq!(warm.len(), 1, "{warm:?}");
        let refusing = warm[0].0.clone();

        let connected = env.connect("doc-refused", &spawn).await;
        assert_ne!(
            connected.backend_id, refusing,
            "a cold start, not the refusing one"
        );
        env.wait_for_status(&connected.backend_id, BackendStatus::Ready, BACKEND_WAIT)
            .await;
        let ended = env.wait_terminated(&refusing).await;
        let message = ended.message.unwrap_or_default();
        assert!(message.contains("refused its claim"), "{message}");
        assert!(message.contains("409"), "{message}");
        // The cold one holds the key.
        let again = env.connect("doc-refused", &spawn).await;
        assert_eq!(again.backend_id, connected.backend_id);
        set_pool(&env, &spawn, 0).await;
        env
    }
);

db_test!(
    draining_a_drone_moves_its_warm_backends_to_another,
    |env: TestEnv| async move {
        let second = env.start_drone(env.drone_config("dr-second")).await;
        let spawn = env.spawn_config(&[]);
        set_pool(&env, &spawn, 2).await;
        wait_for_idle(&env, 2).await;
        let first = env.drone.name().clone();
        env.set_draining(&first, true).await;
        wait_for(
            "both warm backends on the undrained drone",
            BACKEND_WAIT,
            || async {
                let warm = unclaimed(&env).await;
                let state = env.cluster_state().await;
                let idle = state.warm_pools.first().map(|p| p.idle);
                let on_second = warm
                    .iter()
                    .filter(|(_, drone)| drone == second.name().as_str())
                    .count();
                if warm.len() == 2 && on_second == 2 && idle == Some(2) {
                    Ok(())
                } else {
                    Err(format!("{warm:?} {:?}", state.warm_pools))
                }
            },
        )
        .await;
        // A claim now is served by the undrained drone.
        let claimed = env.connect("doc-drained", &spawn).await;
        assert_eq!(claimed.status, BackendStatus::Ready);
        assert_eq!(claimed.drone.as_ref(), Some(second.name()));
        set_pool(&env, &spawn, 0).await;
        // Stops its backends, so no container outlives the test.
        second.shutdown().await;
        env
    }
);

db_test!(
    claims_and_cold_spawns_racing_keep_one_backend_per_key,
    |env: TestEnv| async move {
        let spawn = env.spawn_config(&[]);
        set_pool(&env, &spawn, 5).await;
        wait_for_idle(&env, 5).await;
        let warm: HashSet<BackendName> = unclaimed(&env).await.into_iter().map(|b| b.0).collect();
        // 200 connects at once for 10 keys: five keys can be served warm, the rest cold,
        // and every connect of a key must name the same backend. (Ten keys, not more: each
        // cold one is a container start, and this runs beside the rest of the suite.)
        let keys: Vec<String> = (0..10).map(|i| format!("race-{i}")).collect();
        let attempts = (0..200).map(|i| {
            let key = keys[i % keys.len()].clone();
            let api = env.api();
            let spawn = spawn.clone();
            async move {
                let answer = api.try_connect(&key, &spawn).await;
                (key, answer)
            }
        });
        let answers = futures_util::future::join_all(attempts).await;
        let mut backend_of: HashMap<String, BackendName> = HashMap::new();
        for (key, answer) in answers {
            let response = match answer {
                Ok(response) => response,
                Err(error) => panic!("connect for {key}: {error}"),
            };
            let first = backend_of
                .entry(key.clone())
                .or_insert(response.backend_id.clone());
            assert_eq!(*first, response.backend_id, "two backends for {key}");
        }
        assert_eq!(backend_of.len(), 10);
        let distinct: HashSet<&BackendName> = backend_of.values().collect();
        assert_eq!(distinct.len(), 10, "one backend per key, none shared");
        // Claims really raced the cold spawns: some keys were served from the pool.
        let served_warm = distinct.iter().filter(|b| warm.contains(**b)).count();
        assert!((1..=5).contains(&served_warm), "{served_warm} served warm");
        let overview = env.api().plane.overview().await.expect("overview");
        for key in &keys {
            let live: Vec<_> = overview
                .backends
                .iter()
                .filter(|b| {
                    b.key.as_ref().is_some_and(|k| &k.name == key) && !b.status.is_terminating()
                })
                .collect();
            assert_eq!(live.len(), 1, "{key}: {live:?}");
        }
        for backend in backend_of.values() {
            env.wait_for_status(backend, BackendStatus::Ready, BACKEND_WAIT)
                .await;
        }
        set_pool(&env, &spawn, 0).await;
        env
    }
);

db_test!(
    idle_warm_backends_do_not_count_as_spawns_in_progress,
    |mut env: TestEnv| async move {
        env.restart_controller_with(|config| config.max_concurrent_spawns = Some(2))
            .await;
        // The pool fills past the limit, two at a time, since idle ones are not starting.
        let spawn = env.spawn_config(&[]);
        set_pool(&env, &spawn, 3).await;
        wait_for_idle(&env, 3).await;
        // And a cold start of another executable is still admitted.
        let other = env.spawn_config(&[("SOMETHING", "else")]);
        let cold = env.connect("doc-cold", &other).await;
        assert!(cold.spawned);
        assert!(!unclaimed(&env)
            .await
            .iter()
            .any(|(id, _)| *id == cold.backend_id));
        set_pool(&env, &spawn, 0).await;
        env
    }
);
