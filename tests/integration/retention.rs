//! Old-data cleanup (`--retention-days`): terminated backends and what belongs to them go,
//! in batches, by the controller doing the timed work; live backends and every key's
//! fencing history stay.

use crate::db_test;
use crate::harness::{wait_for, TestEnv, BACKEND_WAIT};
use plane::controller::store::Store;
use plane_protocol::backend::{BackendStatus, TerminationKind};
use plane_protocol::time::Millis;

async fn fencing_token(store: &Store, key: &str) -> i64 {
    store
        .key_holder("", key)
        .await
        .expect("key holder")
        .expect("the key is held")
        .fencing_token
}

db_test!(
    past_retention_terminated_backends_go_and_live_ones_and_keys_stay,
    |env: TestEnv| async move {
        let store = Store::open(env.db_url()).await.expect("open the store");
        let spawn = env.spawn_config(&[]);
        let live = env.connect_ready("live", &spawn).await;
        let old = env.connect_ready("old", &spawn).await;
        // More tokens for the old one, as repeated connects leave them.
        for _ in 0..3 {
            env.connect("old", &spawn).await;
        }
        let old_token = fencing_token(&store, "old").await;
        env.terminate(&old.backend_id, TerminationKind::Hard).await;
        env.wait_terminated(&old.backend_id).await;

        // Everything terminated before now is past a cutoff of now; batches of two.
        let purged = store
            .purge(Millis::now().plus_millis(1), 2, 100)
            .await
            .expect("purge");
        assert_eq!(purged.backends, 1, "{purged:?}");
        assert!(purged.tokens >= 4, "{purged:?}");
        assert!(purged.statuses >= 6, "{purged:?}");
        let (status, _) = env
            .get_json(&format!("/pub/b/{}/status", old.backend_id))
            .await;
        assert_eq!(status, 404, "the old backend is gone");

        // The live one is untouched: its history, and its token still routes.
        let history = store
            .status_history(&live.backend_id)
            .await
            .expect("history");
        let statuses: Vec<_> = history.iter().map(|entry| entry.status).collect();
        assert!(statuses.contains(&BackendStatus::Scheduled), "{statuses:?}");
        assert_eq!(statuses.last(), Some(&BackendStatus::Ready));
        let (code, _) = env.get_via_proxy(live.token.as_str(), "/").await;
        assert_eq!(code, 200);
        // The key's fencing history stays: its next backend gets a larger token.
        let again = env.connect_ready("old", &spawn).await;
        assert_ne!(again.backend_id, old.backend_id);
        assert!(fencing_token(&store, "old").await > old_token);
        store.close().await;
        env
    }
);

db_test!(
    the_controller_deletes_past_retention_on_its_own_timer,
    |mut env: TestEnv| async move {
        let spawn = env.spawn_config(&[]);
        let backend = env.connect_ready("timed", &spawn).await;
        env.terminate(&backend.backend_id, TerminationKind::Hard)
            .await;
        env.wait_terminated(&backend.backend_id).await;
        env.restart_controller_with(|config| {
            config.retention_ms = 1;
            config.retention_interval_ms = 100;
        })
        .await;
        let path = format!("/pub/b/{}/status", backend.backend_id);
        wait_for(
            "the terminated backend to be deleted",
            BACKEND_WAIT,
            || async {
                match env.get_json(&path).await {
                    (404, _) => Ok(()),
                    (status, body) => Err(format!("{status} {body}")),
                }
            },
        )
        .await;
        // Counted once the whole pass is done: its first batch's commit is what made the
        // backend go, and later batches may still be running.
        let deleted = [("kind", "backends")];
        wait_for("the deletion to be counted", BACKEND_WAIT, || async {
            let scrape =
                crate::metrics::Scrape::of(&env.client, &env.controller_url("/metrics")).await;
            match scrape.value("plane_retention_deleted_rows_total", &deleted) {
                counted if counted >= 1.0 => Ok(()),
                counted => Err(format!("{counted} backends counted deleted")),
            }
        })
        .await;
        env
    }
);
