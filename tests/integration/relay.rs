//! A TCP relay on loopback that a test can partition: while partitioned it reads and drops
//! everything in both directions and closes nothing, like a network that loses packets. When
//! the partition heals, a side that closed meanwhile is closed on the other side too (its
//! FIN, lost in the partition, would have been retransmitted). It also counts the HTTP
//! requests it carries, so a test can tell a client that waits from one that spins.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct Relay {
    addr: SocketAddr,
    partitioned: watch::Sender<bool>,
    requests: Arc<AtomicUsize>,
    /// Owns the accept loop and every pipe; dropping the relay stops them all.
    _tasks: JoinSet<()>,
}

impl Relay {
    /// Relays connections made to [`Relay::addr`] to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let (partitioned, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let partition = partitioned.clone();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        tasks.spawn(async move {
            let mut pipes = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                let count_requests = Some(Arc::clone(&counter));
                pipes.spawn(pipe(
                    in_read,
                    out_write,
                    partition.subscribe(),
                    count_requests,
                ));
                pipes.spawn(pipe(out_read, in_write, partition.subscribe(), None));
            }
        });
        Relay {
            addr,
            partitioned,
            requests,
            _tasks: tasks,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HTTP requests (lines starting `GET `, `POST `, ...) carried so far, towards upstream.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Starts dropping all traffic, without closing anything.
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Lets traffic through again.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }
}

/// Copies `from` to `to`, dropping what arrives while partitioned. An end of stream seen
/// while partitioned is passed on once the partition heals.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut partitioned: watch::Receiver<bool>,
    requests: Option<Arc<AtomicUsize>>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut lines = RequestLines::default();
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            // Re-check the state when it changes (nothing to do otherwise).
            Ok(()) = partitioned.changed() => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if *partitioned.borrow() {
            continue; // lost in the partition
        }
        if let Some(requests) = &requests {
            requests.fetch_add(lines.count(&buffer[..n]), Ordering::SeqCst);
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
    // The sending side closed. Behind a partition the close is not seen until it heals.
    let _ = partitioned.wait_for(|p| !*p).await;
    let _ = to.shutdown().await;
}

/// Counts request lines in a client's byte stream, across reads: a line that begins with an
/// HTTP method and a space. Bodies could hold such a line too; the tests' bodies do not.
#[derive(Default)]
struct RequestLines {
    /// The start of the current line, up to the longest method.
    line_start: Vec<u8>,
    at_line_start: bool,
    started: bool,
}

impl RequestLines {
    const METHODS: [&'static [u8]; 4] = [b"GET ", b"POST ", b"PUT ", b"DELETE "];

    fn count(&mut self, bytes: &[u8]) -> usize {
        if !self.started {
            self.started = true;
            self.at_line_start = true;
        }
        let mut found = 0;
        for &byte in bytes {
            if byte == b'\n' {
                self.at_line_start = true;
                self.line_start.clear();
                continue;
            }
            if !self.at_line_start {
                continue;
            }
            self.line_start.push(byte);
            if Self::METHODS.iter().any(|m| self.line_start == *m) {
                found += 1;
                self.at_line_start = false;
            } else if !Self::METHODS
                .iter()
                .any(|m| m.starts_with(&self.line_start))
            {
                self.at_line_start = false;
            }
        }
        found
    }
}
