//! Joins an upgraded client connection (a WebSocket, say) to its backend's: bytes both ways
//! until both sides have finished, with half-closes passed on.
//!
//! Why not `tokio::io::copy_bidirectional`: it owns two 8 KiB buffers per tunnel for its whole
//! life, so 10,000 idle WebSockets would pin 160 MiB doing nothing. Here an idle tunnel owns no
//! buffer at all. It waits for readiness, then reads into a buffer on the worker's stack and
//! writes straight on; only bytes the other side cannot take yet are copied to the heap, and
//! that copy is freed as soon as it has been written.

use crate::client_stream::ClientStream;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use std::io::{self, ErrorKind};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes moved per read; the buffer lives on the stack only while a read is being passed on.
const CHUNK: usize = 16 * 1024;
/// Reads passed on per wake-up before the tunnel yields, so one busy tunnel cannot hold a
/// worker thread while others wait.
const READS_PER_TURN: usize = 16;
/// Buffer size for tunnels over streams other than plain TCP (where readiness cannot be
/// awaited without a buffer).
const FALLBACK_BUFFER: usize = 4 * 1024;

/// Runs the tunnel until both directions have ended or either fails.
/// `relayed` counts the bytes each way: client to backend, backend to client.
pub async fn join(
    client: Upgraded,
    backend: Upgraded,
    relayed: (Counter, Counter),
) -> io::Result<()> {
    let client = match client.downcast::<TokioIo<ClientStream>>() {
        Ok(parts) => parts,
        Err(client) => return buffered(TokioIo::new(client), TokioIo::new(backend), relayed).await,
    };
    let read_buf = client.read_buf;
    let (client, unread_prefix) = client.io.into_inner().into_parts();
    // Bytes read past the handshake (a first frame sent eagerly) go first: hyper's buffered
    // ones, then what it never read of the stream's prefix. Copied out, so hyper's whole
    // read buffer (which these share) is freed now rather than kept for the tunnel's life.
    let client_early: Vec<u8> = [&read_buf[..], &unread_prefix[..]].concat();
    drop((read_buf, unread_prefix));
    match backend.downcast::<TokioIo<TcpStream>>() {
        Ok(backend) => {
            let (to_backend, to_client) = relayed;
            to_backend.inc_by(client_early.len() as u64);
            to_client.inc_by(backend.read_buf.len() as u64);
            let upstream = Half::with_pending(client_early, to_backend);
            let downstream = Half::with_pending(backend.read_buf.to_vec(), to_client);
            let backend_io = backend.io.into_inner();
            drop(backend.read_buf);
            tcp(client, upstream, backend_io, downstream).await
        }
        Err(backend) => {
            let mut backend = TokioIo::new(backend);
            backend.write_all(&client_early).await?;
            relayed.0.inc_by(client_early.len() as u64);
            buffered(client, backend, relayed).await
        }
    }
}

/// The tunnel for streams whose readiness cannot be awaited without a buffer (TLS, say).
async fn buffered<C, B>(
    mut client: C,
    mut backend: B,
    relayed: (Counter, Counter),
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (to_backend, to_client) = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut backend,
        FALLBACK_BUFFER,
        FALLBACK_BUFFER,
    )
    .await?;
    relayed.0.inc_by(to_backend);
    relayed.1.inc_by(to_client);
    Ok(())
}

/// One direction of the tunnel.
#[derive(Default)]
struct Half {
    /// Bytes read but not yet taken by the other side; empty (no allocation) when idle.
    pending: Vec<u8>,
    written: usize,
    /// The source has ended; the sink is shut down for writing once `pending` is out.
    eof: bool,
    /// The sink has been shut down: nothing more flows this way.
    done: bool,
    /// Counts the bytes read this way.
    relayed: Counter,
}

impl Half {
    fn with_pending(pending: Vec<u8>, relayed: Counter) -> Self {
        Self {
            pending,
            relayed,
            ..Self::default()
        }
    }

    fn has_pending(&self) -> bool {
        self.written < self.pending.len()
    }

    /// Moves what it can from `from` to `to` without waiting. Returns whether it stopped
    /// for fairness with data possibly left to read (the caller should yield and go on).
    fn pump(&mut self, from: &TcpStream, to: &TcpStream) -> io::Result<bool> {
        if !self.flush(to)? {
            return Ok(false);
        }
        for _ in 0..READS_PER_TURN {
            if self.eof {
                return Ok(false);
            }
            let mut chunk = [0u8; CHUNK];
            let read = match from.try_read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(read) => {
                    self.relayed.inc_by(read as u64);
                    read
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(error),
            };
            let mut written = 0;
            while written < read {
                match to.try_write(&chunk[written..read]) {
                    Ok(n) => written += n,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        // The other side is slow: keep the rest until it can take it, and
                        // read no more meanwhile (backpressure).
                        self.pending = chunk[written..read].to_vec();
                        self.written = 0;
                        return Ok(false);
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(true)
    }

    /// Writes out pending bytes; returns whether all of them are gone.
    fn flush(&mut self, to: &TcpStream) -> io::Result<bool> {
        while self.has_pending() {
            match to.try_write(&self.pending[self.written..]) {
                Ok(n) => self.written += n,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        // Give the memory back as soon as it is no longer needed.
        self.pending = Vec::new();
        self.written = 0;
        Ok(true)
    }
}

/// Waits until `half` can make progress: its sink can take pending bytes, or its source has
/// bytes (or its end) to read.
async fn ready(half: &Half, from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    if half.has_pending() {
        to.writable().await
    } else {
        from.readable().await
    }
}

/// `upstream` carries client bytes to the backend, `downstream` backend bytes to the client.
async fn tcp(
    mut client: TcpStream,
    mut upstream: Half,
    mut backend: TcpStream,
    mut downstream: Half,
) -> io::Result<()> {
    loop {
        let more = tokio::select! {
            ready = ready(&upstream, &client, &backend), if !upstream.eof || upstream.has_pending() => {
                ready?;
                upstream.pump(&client, &backend)?
            }
            ready = ready(&downstream, &backend, &client), if !downstream.eof || downstream.has_pending() => {
                ready?;
                downstream.pump(&backend, &client)?
            }
            // Both directions have read their end and written everything.
            else => return Ok(()),
        };
        // A side that ended is passed on as a half-close once its bytes are out, so the
        // other side may still answer (as TCP allows).
        for (half, sink) in [
            (&mut upstream, &mut backend),
            (&mut downstream, &mut client),
        ] {
            if half.eof && !half.has_pending() && !half.done {
                half.done = true;
                // The peer may already be gone; the other direction will find out.
                let _ = sink.shutdown().await;
            }
        }
        if more {
            tokio::task::yield_now().await;
        }
    }
}
