//! Load clients the benchmark scripts drive: WebSocket echo round trips, and many idle
//! WebSockets held open until told to close. Results go to stdout as one JSON line each.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(name = "plane-bench", about = "Load clients for Plane's benchmarks.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sends messages one at a time over one WebSocket and times each echo.
    WsRtt {
        /// ws:// URL of an echo endpoint.
        #[arg(long)]
        url: String,
        /// Messages to time (after 100 untimed warm-up messages).
        #[arg(long, default_value_t = 2000)]
        messages: usize,
    },
    /// Opens WebSockets, checks each with one echo, prints `{"open": N}`, holds them idle
    /// until a line (or EOF) arrives on stdin, then closes them all and prints
    /// `{"closed": N}`.
    IdleWs {
        /// ws:// URL of an echo endpoint.
        #[arg(long)]
        url: String,
        /// How many WebSockets to hold.
        #[arg(long)]
        count: usize,
        /// How many handshakes may be in progress at once.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
    },
    /// Opens HTTP/1.1 keep-alive connections, sends one GET on each and reads the whole
    /// response, prints `{"open": N}`, holds them idle until a line (or EOF) arrives on
    /// stdin, then closes them and prints `{"closed": N}`.
    IdleHttp {
        /// http:// URL to GET.
        #[arg(long)]
        url: String,
        /// How many connections to hold.
        #[arg(long)]
        count: usize,
        /// How many connections may be opening at once.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::WsRtt { url, messages } => ws_rtt(&url, messages).await,
        Command::IdleWs {
            url,
            count,
            concurrency,
        } => idle_ws(&url, count, concurrency).await,
        Command::IdleHttp {
            url,
            count,
            concurrency,
        } => idle_http(&url, count, concurrency).await,
    }
}

async fn ws_rtt(url: &str, messages: usize) -> anyhow::Result<()> {
    if messages == 0 {
        bail!("--messages must be at least 1");
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("--url {url}: WebSocket handshake failed"))?;
    let payload = "x".repeat(32);
    let mut samples = Vec::with_capacity(messages);
    for i in 0..messages + 100 {
        let started = Instant::now();
        socket.send(Message::text(payload.clone())).await?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(error.into()),
                None => bail!("the server closed the WebSocket"),
            }
        }
        if i >= 100 {
            samples.push(started.elapsed());
        }
    }
    samples.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| micros(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    let mean = samples.iter().map(|d| micros(*d)).sum::<f64>() / samples.len() as f64;
    println!(
        r#"{{"messages": {}, "p50_us": {:.1}, "p99_us": {:.1}, "mean_us": {:.1}}}"#,
        samples.len(),
        at(0.5),
        at(0.99),
        mean
    );
    let _ = socket.close(None).await;
    Ok(())
}

async fn idle_ws(url: &str, count: usize, concurrency: usize) -> anyhow::Result<()> {
    let opened = futures_util::stream::iter(0..count)
        .map(|_| async move {
            let (mut socket, _) = tokio_tungstenite::connect_async(url)
                .await
                .with_context(|| format!("--url {url}: WebSocket handshake failed"))?;
            socket.send(Message::text("hello")).await?;
            match socket.next().await {
                Some(Ok(_)) => Ok(socket),
                Some(Err(error)) => Err(error.into()),
                None => bail!("the server closed a WebSocket before echoing"),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<anyhow::Result<_>>>()
        .await;
    let mut sockets = Vec::with_capacity(count);
    for socket in opened {
        sockets.push(socket?);
    }
    println!(r#"{{"open": {}}}"#, sockets.len());

    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;

    let closed = sockets.len();
    futures_util::stream::iter(sockets)
        .for_each_concurrent(concurrency.max(1), |mut socket| async move {
            let _ = socket.close(None).await;
            // Wait for the server's close so the connection is really gone.
            while let Some(Ok(_)) = socket.next().await {}
        })
        .await;
    println!(r#"{{"closed": {closed}}}"#);
    Ok(())
}

/// `host:port` and `/path?query` of an `http://` URL.
fn split_http_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: only http:// URLs are supported"))?;
    Ok(match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    })
}

/// Sends one GET on `stream` and reads its response to the end (by `content-length`).
async fn get_once(
    stream: &mut tokio::net::TcpStream,
    host: &str,
    path: &str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection before answering");
        }
        response.extend_from_slice(&chunk[..n]);
        let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&response[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("unexpected answer: {}", head.lines().next().unwrap_or(""));
        }
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse().ok())
            .context("the response has no content-length")?;
        if response.len() >= head_end + 4 + length {
            return Ok(());
        }
    }
}

async fn idle_http(url: &str, count: usize, concurrency: usize) -> anyhow::Result<()> {
    let (host, path) = split_http_url(url)?;
    let opened = futures_util::stream::iter(0..count)
        .map(|_| async move {
            let mut stream = tokio::net::TcpStream::connect(host)
                .await
                .with_context(|| format!("--url {url}: cannot connect"))?;
            get_once(&mut stream, host, path).await?;
            anyhow::Ok(stream)
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut streams = Vec::with_capacity(count);
    for stream in opened {
        streams.push(stream?);
    }
    println!(r#"{{"open": {}}}"#, streams.len());
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    let closed = streams.len();
    drop(streams);
    println!(r#"{{"closed": {closed}}}"#);
    Ok(())
}
