//! The fence: a small process that the drone starts and that outlives it, which kills the
//! drone's containers when their leases run out, so that a drone that dies (`kill -9`, an
//! OOM kill, a crash) still never leaves a backend running past its lease.
//!
//! The drone publishes, for every backend it runs, the moment by which its process must be
//! dead (half the fencing margin before its lease ends) in `<state-dir>/fence.json`. The
//! moments are on the machine's boot clock (`/proc/uptime`), which every process on the
//! machine shares. A live drone keeps moving them ahead and stops its backends itself before
//! they pass, so the fence's kills only ever find work when the drone could not do it. One
//! fence works per state directory (an exclusive lock); a newer one waits its turn.

use anyhow::Context;
use bollard::container::KillContainerOptions;
use bollard::Docker;
use plane_protocol::names::BackendName;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

const FENCE_FILE: &str = "fence.json";
const FENCE_LOCK: &str = "fence.lock";
const FENCE_LOG: &str = "fence.log";
/// How often the fence looks at the deadlines.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Bound on one call to the engine.
const KILL_TIMEOUT: Duration = Duration::from_secs(2);

/// What the drone publishes for its fence.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Deadlines {
    /// The drone process; while it lives, it fences its backends itself.
    drone_pid: u32,
    /// The drone shut down cleanly: nothing left to guard.
    closed: bool,
    /// For each backend, the boot-clock millisecond by which it must be dead.
    kill_by_ms: BTreeMap<BackendName, u64>,
}

/// Milliseconds since the machine booted, from `/proc/uptime` (10 ms resolution).
pub fn boot_clock_ms() -> anyhow::Result<u64> {
    let uptime = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
    let seconds: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("unreadable /proc/uptime")?;
    Ok((seconds * 1000.0) as u64)
}

/// The kill-by moments an earlier run of the drone published in `state_dir` that have not
/// passed yet, on this process's clock: the backends it may re-adopt, and until when at the
/// latest. Empty if there is no file, or the earlier run shut down cleanly.
pub fn previous_deadlines(state_dir: &Path) -> BTreeMap<BackendName, Instant> {
    let Ok(bytes) = std::fs::read(state_dir.join(FENCE_FILE)) else {
        return BTreeMap::new();
    };
    let Ok(deadlines) = serde_json::from_slice::<Deadlines>(&bytes) else {
        tracing::warn!("unreadable fence file; re-adopting nothing");
        return BTreeMap::new();
    };
    let Ok(boot_now) = boot_clock_ms() else {
        return BTreeMap::new();
    };
    let now = Instant::now();
    deadlines
        .kill_by_ms
        .into_iter()
        .filter(|_| !deadlines.closed)
        .filter_map(|(backend, kill_by)| {
            let left = kill_by.checked_sub(boot_now)?;
            Some((backend, now + Duration::from_millis(left)))
        })
        .collect()
}

/// The drone's side: writes the deadlines where its fence reads them.
#[derive(Clone, Debug)]
pub struct FencePublisher {
    dir: PathBuf,
}

impl FencePublisher {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
        }
    }

    /// Publishes the moments (on this process's monotonic clock) by which each backend must
    /// be dead, replacing what was there. Written to a temporary file and renamed, so the
    /// fence never reads half a file. `closed` tells the fence its watch is over.
    pub fn publish<'a>(
        &self,
        kill_by: impl IntoIterator<Item = (&'a BackendName, Instant)>,
        closed: bool,
    ) -> anyhow::Result<()> {
        let boot_now = boot_clock_ms()?;
        let now = Instant::now();
        let deadlines = Deadlines {
            drone_pid: std::process::id(),
            closed,
            kill_by_ms: kill_by
                .into_iter()
                .map(|(backend, at)| {
                    let left = at.saturating_duration_since(now).as_millis() as u64;
                    (backend.clone(), boot_now.saturating_add(left))
                })
                .collect(),
        };
        let json = serde_json::to_vec(&deadlines).context("encoding the fence deadlines")?;
        let temporary = self.dir.join(format!("{FENCE_FILE}.tmp"));
        std::fs::write(&temporary, json).context("writing the fence deadlines")?;
        std::fs::rename(&temporary, self.dir.join(FENCE_FILE))
            .context("publishing the fence deadlines")?;
        Ok(())
    }
}

/// Starts the fence for `state_dir` as a process of its own (its own process group, so a
/// signal to the drone's group does not reach it), running `executable drone-fence`. If a
/// fence already guards this directory, the new one exits at once.
pub fn spawn(executable: &Path, state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state_dir.join(FENCE_LOG))
        .context("opening the fence log")?;
    let mut child = std::process::Command::new(executable)
        .arg("drone-fence")
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the fence ({} drone-fence)", executable.display()))?;
    // Reap it if it ends while the drone still runs; otherwise it outlives the drone.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// The fence process: guards `state_dir` until its drone shuts down cleanly, or is gone
/// with every deadline it published enforced.
///
/// Deadlines are enforced whether or not the drone process lives: a live drone stops its
/// backends itself before they pass (it keeps moving them ahead while it renews), so for a
/// healthy drone a kill finds nothing to do, while a drone that is alive but no longer
/// fencing (stopped, its tasks gone) is covered too. The fence remembers the latest
/// deadline of every backend it was ever told of, so a later file (say, a restarted drone's,
/// written before it has cleaned up) never erases one.
pub async fn run(state_dir: &Path) -> anyhow::Result<()> {
    let lock =
        std::fs::File::create(state_dir.join(FENCE_LOCK)).context("opening the fence lock")?;
    // Wait our turn: a fence still guarding an earlier run of the drone holds the lock
    // until its work is done.
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .context("waiting for the fence lock")?
        .context("taking the fence lock")?;
    let docker = connect_to_docker().await;
    tracing::info!(state_dir = %state_dir.display(), "fence guarding the drone's leases");
    let mut guarded: BTreeMap<BackendName, u64> = BTreeMap::new();
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let drone_alive = match read_deadlines(state_dir) {
            Some(deadlines) if deadlines.closed => {
                // A clean stop: the drone stopped every backend (and removed what an earlier
                // run left) before saying so.
                tracing::info!("the drone shut down cleanly; fence stopping");
                drop(lock);
                return Ok(());
            }
            Some(deadlines) => {
                for (backend, kill_by) in deadlines.kill_by_ms {
                    let entry = guarded.entry(backend).or_insert(kill_by);
                    *entry = (*entry).max(kill_by);
                }
                process_alive(deadlines.drone_pid)
            }
            // Gone or unreadable: nothing new to learn, and no drone to defer to.
            None => false,
        };
        let now = boot_clock_ms()?;
        let due: Vec<BackendName> = guarded
            .iter()
            .filter(|(_, kill_by)| **kill_by <= now)
            .map(|(backend, _)| backend.clone())
            .collect();
        let kills = due.iter().map(|backend| kill(&docker, backend));
        for (backend, result) in due.iter().zip(futures_util::future::join_all(kills).await) {
            match result {
                Ok(killed) => {
                    if killed {
                        tracing::warn!(%backend, "the backend's lease ran out while it still ran; killed it");
                    }
                    guarded.remove(backend);
                }
                Err(err) => {
                    tracing::error!(%backend, error = %err, "could not kill the backend; retrying");
                }
            }
        }
        if !drone_alive && guarded.is_empty() {
            tracing::info!("the drone is gone and every lease it held is enforced; fence stopping");
            drop(lock);
            return Ok(());
        }
    }
}

/// The Docker engine, retrying until it answers: a fence that gave up would leave the
/// drone's backends unguarded.
async fn connect_to_docker() -> Docker {
    loop {
        let attempt = async {
            let docker = Docker::connect_with_defaults()?;
            docker.negotiate_version().await
        };
        match tokio::time::timeout(KILL_TIMEOUT, attempt).await {
            Ok(Ok(docker)) => return docker,
            Ok(Err(err)) => {
                tracing::error!(error = %err, "fence cannot reach the Docker engine; retrying")
            }
            Err(_) => tracing::error!("fence cannot reach the Docker engine (no answer); retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn read_deadlines(state_dir: &Path) -> Option<Deadlines> {
    let bytes = std::fs::read(state_dir.join(FENCE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a process with this ID runs (Linux: it has a `/proc` entry that is not a zombie).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: "Z" is a zombie (dead, unreaped).
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGKILL to the backend's container, bounded in time (kills run side by side, so one
/// slow call never holds up the rest). `Ok(false)` when it was gone or stopped already.
async fn kill(docker: &Docker, backend: &BackendName) -> anyhow::Result<bool> {
    let name = crate::runtime::docker::DockerRuntime::container_name(backend);
    let options = KillContainerOptions { signal: "SIGKILL" };
    match tokio::time::timeout(KILL_TIMEOUT, docker.kill_container(&name, Some(options))).await {
        Ok(Ok(())) => Ok(true),
        Ok(Err(bollard::errors::Error::DockerResponseServerError { status_code, .. }))
            if status_code == 404 || status_code == 409 =>
        {
            Ok(false)
        }
        Ok(Err(err)) => Err(err.into()),
        Err(_) => anyhow::bail!("the engine did not answer within {KILL_TIMEOUT:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_published_on_the_boot_clock_and_read_back() {
        let dir = std::env::temp_dir().join(format!("plane-fence-{}", BackendName::new_random()));
        std::fs::create_dir_all(&dir).expect("dir");
        let publisher = FencePublisher::new(&dir);
        let backend = BackendName::new_random();
        let before = boot_clock_ms().expect("boot clock");
        publisher
            .publish([(&backend, Instant::now() + Duration::from_secs(5))], false)
            .expect("published");
        let read = read_deadlines(&dir).expect("readable");
        assert_eq!(read.drone_pid, std::process::id());
        let kill_by = read.kill_by_ms[&backend];
        // Five seconds ahead on the boot clock (give or take its 10 ms resolution).
        assert!(
            kill_by >= before + 4_980 && kill_by <= boot_clock_ms().expect("clock") + 5_020,
            "{kill_by} vs {before}"
        );
        assert!(process_alive(std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
    }
}
