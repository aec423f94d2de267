//! How `plane admin` prints: one JSON document per line with `--json`, otherwise text for a
//! person, coloured and with a live progress line when stdout is a terminal.

use futures_util::{Stream, StreamExt};
use plane_client::ClientError;
use plane_protocol::api::{BackendDetails, BackendLogLine, LogStream};
use plane_protocol::backend::{BackendStatus, BackendStatusStreamEntry};
use plane_protocol::time::Millis;
use serde::Serialize;
use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The colours the CLI uses, as ANSI SGR codes.
#[derive(Clone, Copy)]
pub enum Colour {
    Green,
    Yellow,
    Red,
    Dim,
    Bold,
}

impl Colour {
    fn code(self) -> &'static str {
        match self {
            Self::Green => "32",
            Self::Yellow => "33",
            Self::Red => "31",
            Self::Dim => "2",
            Self::Bold => "1",
        }
    }
}

/// Where and how results go.
pub struct Output {
    json: bool,
    /// Colours and the progress line: only on a terminal, and not under `NO_COLOR`.
    terminal: bool,
    /// The time of the first status entry printed: later ones show their offset from it.
    first_entry: Cell<Option<Millis>>,
}

impl Output {
    pub fn new(json: bool) -> Self {
        let terminal =
            !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self {
            json,
            terminal,
            first_entry: Cell::new(None),
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// `text` in `colour`, when colours are on.
    pub fn paint(&self, colour: Colour, text: &str) -> String {
        if self.terminal {
            format!("\x1b[{}m{text}\x1b[0m", colour.code())
        } else {
            text.to_string()
        }
    }

    /// Prints `value` as one line of JSON with `--json`, else the text `human` makes.
    pub fn print<T: Serialize>(&self, value: &T, human: impl FnOnce(&Self) -> String) {
        if self.json {
            // Serializing our own wire types cannot fail.
            println!("{}", serde_json::to_string(value).unwrap_or_default());
        } else {
            println!("{}", human(self));
        }
    }

    /// One status entry: `[+  1.23s] ready`, the time since the first entry printed (with
    /// reason, exit code and message when set).
    pub fn status_entry(&self, entry: &BackendStatusStreamEntry) {
        let first = self.first_entry.get().unwrap_or(entry.time);
        self.first_entry.set(Some(first));
        let offset = format!("[+{:>6.2}s]", seconds_between(first, entry.time));
        self.print(entry, |out| {
            format!(
                "{} {}",
                out.paint(Colour::Dim, &offset),
                out.describe(entry)
            )
        });
    }

    /// One line a backend printed: stdout lines to stdout and stderr lines to stderr (each
    /// after its time with `timestamps`), or with `--json` its JSON, all to stdout.
    pub fn log_line(&self, line: &BackendLogLine, timestamps: bool) -> std::io::Result<()> {
        if self.json {
            let json = serde_json::to_string(line).unwrap_or_default();
            return writeln!(std::io::stdout().lock(), "{json}");
        }
        let mut text = String::new();
        if timestamps {
            text.push_str(&self.paint(Colour::Dim, &rfc3339(line.time)));
            text.push(' ');
        }
        text.push_str(&line.text);
        match line.stream {
            LogStream::Stdout => writeln!(std::io::stdout().lock(), "{text}"),
            LogStream::Stderr => writeln!(std::io::stderr().lock(), "{text}"),
        }
    }

    /// A backend's current status: `ready (for 12.0s)`.
    pub fn current_status(&self, entry: &BackendStatusStreamEntry) {
        let age = format!("(for {:.1}s)", seconds_between(entry.time, Millis::now()));
        self.print(entry, |out| {
            format!("{} {}", out.describe(entry), out.paint(Colour::Dim, &age))
        });
    }

    /// A backend's facts, then its history, one status per line.
    pub fn backend(&self, details: &BackendDetails) {
        self.print(details, |out| {
            let backend = &details.backend;
            let key = match &backend.key {
                Some(key) if key.namespace.is_empty() => key.name.clone(),
                Some(key) => format!("{}/{}", key.namespace, key.name),
                None => "(none)".to_string(),
            };
            let mut text = format!(
                "backend {} in cluster {}{} on drone {}\nkey      {key}\ncreated  {}\nactive   {}\n",
                backend.backend_id,
                backend.cluster,
                match backend.pool.as_str() {
                    "" => String::new(),
                    pool => format!(" (pool {pool})"),
                },
                backend.drone,
                rfc3339(backend.created_at),
                rfc3339(backend.last_active_at),
            );
            for entry in &details.history {
                text.push_str(&format!(
                    "{}  {}\n",
                    out.paint(Colour::Dim, &rfc3339(entry.time)),
                    out.describe(entry)
                ));
            }
            text.trim_end().to_string()
        });
    }

    /// `terminated (reason: ...) (exit code 1): message`, the status coloured.
    fn describe(&self, entry: &BackendStatusStreamEntry) -> String {
        let mut line = self.paint(status_colour(entry.status), entry.status.as_str());
        if let Some(reason) = entry.termination_reason {
            line.push_str(&format!(" (reason: {})", reason.as_str()));
        }
        if let Some(code) = entry.exit_code {
            line.push_str(&format!(" (exit code {code})"));
        }
        if let Some(message) = &entry.message {
            line.push_str(&format!(": {message}"));
        }
        line
    }

    /// Prints a status stream's entries until `until` says stop (returning the entry it
    /// stopped at) or the stream ends (`None`). On a terminal, a line below the entries
    /// counts the seconds spent in the current status.
    pub async fn follow(
        &self,
        mut stream: impl Stream<Item = Result<BackendStatusStreamEntry, ClientError>> + Unpin,
        until: impl Fn(&BackendStatusStreamEntry) -> bool,
    ) -> Result<Option<BackendStatusStreamEntry>, ClientError> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut current: Option<(BackendStatus, Instant)> = None;
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = tick.tick(), if self.terminal => {
                    if let Some((status, since)) = current {
                        self.progress(status, since);
                    }
                    continue;
                }
            };
            self.clear_progress();
            let Some(entry) = next.transpose()? else {
                return Ok(None);
            };
            self.status_entry(&entry);
            if until(&entry) {
                return Ok(Some(entry));
            }
            current = Some((entry.status, Instant::now()));
        }
    }

    fn progress(&self, status: BackendStatus, since: Instant) {
        let spinner = ['|', '/', '-', '\\'][(since.elapsed().as_millis() / 100 % 4) as usize];
        print!(
            "\r\x1b[2K{} {} for {:.1}s",
            self.paint(Colour::Dim, &spinner.to_string()),
            status.as_str(),
            since.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    }

    fn clear_progress(&self) {
        if self.terminal {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
        }
    }
}

fn seconds_between(from: Millis, to: Millis) -> f64 {
    (to.0 - from.0).max(0) as f64 / 1000.0
}

fn status_colour(status: BackendStatus) -> Colour {
    match status {
        BackendStatus::Ready => Colour::Green,
        BackendStatus::Terminated => Colour::Red,
        _ => Colour::Yellow,
    }
}

/// `2026-12-03T10:47:53.123Z`.
fn rfc3339(time: Millis) -> String {
    let nanos = i128::from(time.0) * 1_000_000;
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| at.format(&format).ok())
        .unwrap_or_else(|| time.0.to_string())
}
