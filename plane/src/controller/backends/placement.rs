//! Where a new backend goes: best-of-N least-loaded placement over a pool's placeable
//! drones.

use crate::controller::error::ControllerError;
use crate::controller::ControllerState;
use plane_protocol::names::{ClusterName, NodeName, PoolName};
use plane_protocol::time::Millis;

/// A drone of the pool for a new backend: of `--placement-best-of` drones drawn at random
/// from those that can take one (a session with any controller, heard from within a lease,
/// not drained), the one with the fewest live backends; ties are broken at random.
///
/// Sampling rather than taking the least loaded of all keeps concurrent connects, which all
/// read the same counts, from piling onto one drone, while two choices already keep the
/// load nearly even ("the power of two choices").
///
/// A backend with a disk limit goes only to a drone whose engine can enforce one; when the
/// pool has placeable drones but none of those, no drone is available for it (503, saying
/// why), never a limit silently ignored.
pub(crate) async fn pick_drone(
    state: &ControllerState,
    cluster: &ClusterName,
    pool: &PoolName,
    needs_disk_limits: bool,
) -> Result<Option<NodeName>, ControllerError> {
    let seen_since = Millis::now().minus_millis(state.config().lease_ms);
    let store = state.store();
    let candidates = store
        .placeable_drones(cluster, pool.as_str(), seen_since, needs_disk_limits)
        .await?;
    if candidates.is_empty() && needs_disk_limits {
        let others = store
            .placeable_drones(cluster, pool.as_str(), seen_since, false)
            .await?;
        if !others.is_empty() {
            return Err(ControllerError::NoCapableDrone(format!(
                "spawn_config.executable.resource_limits.disk_limit_bytes cannot be enforced by any drone of cluster {cluster}{pool}: their Docker storage drivers cannot limit a container's disk (btrfs, zfs, devicemapper and overlay2 on xfs with pquota can); leave it out or null",
                pool = if pool.is_default() { String::new() } else { format!(", pool {pool}") }
            )));
        }
    }
    if candidates.len() <= 1 {
        return Ok(candidates.into_iter().next());
    }
    let live = state.store().live_backend_counts(cluster).await?;
    Ok(choose_best_of(
        candidates,
        state.config().placement_best_of,
        |drone| live.get(drone).copied().unwrap_or(0),
        &mut rand::thread_rng(),
    ))
}

/// Of `n` candidates drawn at random, the least loaded (ties at random).
fn choose_best_of<R: rand::Rng>(
    candidates: Vec<NodeName>,
    n: usize,
    load: impl Fn(&NodeName) -> u32,
    rng: &mut R,
) -> Option<NodeName> {
    use rand::seq::SliceRandom;
    // Shuffled, so taking the first of the least loaded breaks ties at random.
    let mut sample: Vec<NodeName> = candidates.choose_multiple(rng, n.max(1)).cloned().collect();
    sample.shuffle(rng);
    sample.into_iter().min_by_key(|drone| load(drone))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    fn drones(n: usize) -> Vec<NodeName> {
        (0..n)
            .map(|i| format!("dr-{i}").parse().expect("name"))
            .collect()
    }

    #[test]
    fn best_of_two_keeps_the_load_nearly_even() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let candidates = drones(3);
        let mut load: HashMap<NodeName, u32> = HashMap::new();
        for _ in 0..300 {
            let chosen = choose_best_of(
                candidates.clone(),
                2,
                |d| load.get(d).copied().unwrap_or(0),
                &mut rng,
            )
            .expect("a drone");
            *load.entry(chosen).or_default() += 1;
        }
        let (min, max) = (load.values().min(), load.values().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max - min <= 3),
            "{load:?}"
        );
    }

    #[test]
    fn best_of_all_is_the_least_loaded_and_ties_are_random() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let candidates = drones(3);
        let busy: NodeName = "dr-1".parse().expect("name");
        let loads = |d: &NodeName| if *d == busy { 0 } else { 5 };
        for _ in 0..20 {
            assert_eq!(
                choose_best_of(candidates.clone(), 3, loads, &mut rng).as_ref(),
                Some(&busy)
            );
        }
        let picked: std::collections::HashSet<NodeName> = (0..50)
            .filter_map(|_| choose_best_of(candidates.clone(), 3, |_| 0, &mut rng))
            .collect();
        assert_eq!(picked.len(), 3, "equal loads: every drone gets picked");
    }
}
