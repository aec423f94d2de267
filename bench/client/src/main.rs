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
