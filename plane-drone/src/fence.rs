//! The fence: a small process that the drone starts and that outlives it, which kills the
//! drone's containers when their leases run out, so that a drone that dies (`kill -9`, an
//! OOM kill, a crash) still never leaves a backend running past its lease.
//!
//! The drone publishes, for every backend it runs, the moment by which its process must be
//! dead (half the fencing margin before its lease ends) in `<state-dir>/fence.json`. The
//! moments are on the machine's boot clock (`/proc/uptime`), which every process on the
//! machine shares. A live drone keeps moving them ahead and stops its backends itself before
//! they pass; the fence only acts for a drone whose process is gone. One fence runs per
//! state directory (an exclusive lock), whichever drone run started it.

use anyhow::Context;
use bollard::container::KillContainerOptions;
use bollard::Docker;
use plane_protocol::names::BackendName;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

const FENCE_FILE: &str = "fence.json";
const FENCE_LOCK: &str = "fence.lock";
const FENCE_LOG: &str = "fence.log";
/// How often the fence looks at the deadlines.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

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

/// The fence process: guards `state_dir` until its drone shuts down cleanly, or dies with
/// every deadline enforced.
pub async fn run(state_dir: &Path) -> anyhow::Result<()> {
    let lock =
        std::fs::File::create(state_dir.join(FENCE_LOCK)).context("opening the fence lock")?;
    if lock.try_lock().is_err() {
        tracing::info!(state_dir = %state_dir.display(), "a fence already guards this state directory");
        return Ok(());
    }
    let docker = Docker::connect_with_defaults().context("connecting to the Docker engine")?;
    let docker = docker
        .negotiate_version()
        .await
        .context("reaching the Docker engine")?;
    tracing::info!(state_dir = %state_dir.display(), "fence guarding the drone's leases");
    let mut killed = BTreeSet::new();
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let Some(deadlines) = read_deadlines(state_dir) else {
            // The drone writes the file before starting the fence, so a missing one means
            // the state directory itself was removed: there is nothing left to guard.
            if !state_dir.join(FENCE_FILE).exists() {
                tracing::info!("the drone's state directory is gone; fence stopping");
                return Ok(());
            }
            continue;
        };
        if deadlines.closed {
            tracing::info!("the drone shut down cleanly; fence stopping");
            return Ok(());
        }
        if process_alive(deadlines.drone_pid) {
            killed.clear();
            continue;
        }
        let now = boot_clock_ms()?;
        let mut waiting = false;
        for (backend, kill_by) in &deadlines.kill_by_ms {
            if *kill_by > now {
                waiting = true;
            } else if !killed.contains(backend) {
                match kill(&docker, backend).await {
                    Ok(()) => {
                        tracing::warn!(%backend, "the drone is gone and the backend's lease ran out; killed it");
                        killed.insert(backend.clone());
                    }
                    Err(err) => {
                        waiting = true;
                        tracing::error!(%backend, error = %err, "could not kill the backend; retrying");
                    }
                }
            }
        }
        if !waiting {
            tracing::info!("the drone is gone and every lease it held is enforced; fence stopping");
            return Ok(());
        }
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

/// SIGKILL to the backend's container; gone or already stopped counts as done.
async fn kill(docker: &Docker, backend: &BackendName) -> anyhow::Result<()> {
    let name = crate::runtime::docker::DockerRuntime::container_name(backend);
    let options = KillContainerOptions { signal: "SIGKILL" };
    match docker.kill_container(&name, Some(options)).await {
        Ok(()) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError { status_code, .. })
            if status_code == 404 || status_code == 409 =>
        {
            Ok(())
        }
        Err(err) => Err(err.into()),
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
