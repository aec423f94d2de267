//! A network namespace of a test's own, holding only a loopback, and relays that carry TCP
//! between it and the host's loopback. The browser tests run Chromium in one: Chromium
//! aborts its connections (`ERR_NETWORK_CHANGED`) whenever the machine's interfaces change,
//! and the other tests add and remove a container interface on the host all the time.

use crate::harness::wait_for;
use std::collections::HashSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The namespace a process entered, and the relays into and out of it.
pub struct Netns {
    file: Arc<File>,
    /// Host ports already reachable at the same port on the namespace's loopback.
    forwarded: Mutex<HashSet<u16>>,
    relays: Mutex<Vec<JoinHandle<()>>>,
}

impl Netns {
    /// The network namespace of process `pid`, once it is no longer ours: a process started
    /// under `unshare --net` enters its own a moment after it starts.
    pub async fn of_process(pid: u32) -> Netns {
        let path = format!("/proc/{pid}/ns/net");
        let ours = std::fs::read_link("/proc/self/ns/net").expect("our network namespace");
        wait_for(
            "the process to enter a network namespace of its own",
            Duration::from_secs(10),
            || async {
                match std::fs::read_link(&path) {
                    Ok(theirs) if theirs != ours => Ok(()),
                    Ok(theirs) => Err(format!("{path} is still {}", theirs.display())),
                    Err(err) => Err(format!("{path}: {err}")),
                }
            },
        )
        .await;
        Netns {
            file: Arc::new(File::open(&path).expect("open the namespace")),
            forwarded: Mutex::new(HashSet::new()),
            relays: Mutex::new(Vec::new()),
        }
    }

    /// Makes the host's `127.0.0.1:port` reachable at `127.0.0.1:port` inside the
    /// namespace (once; later calls for the port do nothing).
    pub async fn forward_into(&self, port: u16) {
        if !self.forwarded.lock().expect("forwarded").insert(port) {
            return;
        }
        let listener = inside(self.file.clone(), move || {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .await
        .unwrap_or_else(|err| panic!("listen on port {port} in the namespace: {err}"));
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let relay = tokio::spawn(async move {
            while let Ok((mut inner, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // The connect runs on a runtime thread, which is in the host's namespace.
                    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    if let Ok(mut outer) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inner, &mut outer).await;
                    }
                });
            }
        });
        self.relays.lock().expect("relays").push(relay);
    }

    /// Listens on a free port of the host's loopback and relays each connection to
    /// `127.0.0.1:port` inside the namespace; returns the host's port.
    pub async fn forward_out_of(&self, port: u16) -> u16 {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("listen on the host's loopback");
        let host_port = listener.local_addr().expect("local addr").port();
        let file = self.file.clone();
        let relay = tokio::spawn(async move {
            while let Ok((mut outer, _)) = listener.accept().await {
                let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let connected = inside(file.clone(), move || {
                    let stream = TcpStream::connect(target)?;
                    stream.set_nonblocking(true)?;
                    Ok(stream)
                })
                .await;
                let Ok(inner) = connected else {
                    // Not listening yet: the caller polls until it is.
                    continue;
                };
                let Ok(mut inner) = tokio::net::TcpStream::from_std(inner) else {
                    continue;
                };
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut outer, &mut inner).await;
                });
            }
        });
        self.relays.lock().expect("relays").push(relay);
        host_port
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for relay in self.relays.get_mut().expect("relays").drain(..) {
            relay.abort();
        }
    }
}

/// Runs `work` on a new thread that has joined the namespace `file` names: the sockets it
/// makes stay in the namespace wherever they are used later. A thread of its own, never a
/// pooled one, so that no later task runs in the namespace by surprise.
async fn inside<T: Send + 'static>(
    file: Arc<File>,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let outcome = nix::sched::setns(&*file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)
            .and_then(|()| work());
        let _ = done.send(outcome);
    });
    result.await.expect("the namespace thread answers")
}
