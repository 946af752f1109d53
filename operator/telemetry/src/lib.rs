//! Process plumbing shared by the yukumo binaries: tracing set-up, the
//! `/metrics` and `/healthz` endpoint, and shutdown on SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Set up tracing from `RUST_LOG` (default `info`); JSON lines when
/// `YUKUMO_LOG_FORMAT=json`.
pub fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var("YUKUMO_LOG_FORMAT").as_deref() == Ok("json") {
        fmt().json().with_env_filter(filter).init();
    } else {
        use std::io::IsTerminal;
        fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
}

/// Liveness that reflects real progress: components call [`Health::beat`]
/// named checks as they make progress, and `/healthz` fails when any check has
/// not beaten within its allowed age.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<Vec<(String, Duration, Instant)>>>,
}

impl Health {
    /// Register (or refresh) a check that must beat at least every `max_age`.
    pub fn beat(&self, name: &str, max_age: Duration) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match checks.iter_mut().find(|(n, _, _)| n == name) {
            Some(c) => {
                c.1 = max_age;
                c.2 = now;
            }
            None => checks.push((name.to_string(), max_age, now)),
        }
    }

    /// Checks that are overdue, with how long since they last beat.
    pub fn overdue(&self) -> Vec<(String, Duration)> {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        checks
            .iter()
            .filter(|(_, max, at)| at.elapsed() > *max)
            .map(|(n, _, at)| (n.clone(), at.elapsed()))
            .collect()
    }
}

#[derive(Clone)]
struct ServerState {
    registry: Arc<Registry>,
    health: Health,
}

async fn metrics(State(s): State<ServerState>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

async fn healthz(State(s): State<ServerState>) -> impl IntoResponse {
    let overdue = s.health.overdue();
    if overdue.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        let lines: Vec<String> = overdue
            .iter()
            .map(|(n, d)| format!("{n}: no progress for {:.1}s", d.as_secs_f64()))
            .collect();
        (StatusCode::SERVICE_UNAVAILABLE, lines.join("\n") + "\n")
    }
}

/// The HTTP framework of the endpoint, for components adding routes.
pub use axum;

/// Serve `/metrics`, `/healthz` and the component's `extra` routes on
/// `addr` until `shutdown` flips to true.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
    extra: Router,
) -> anyhow::Result<()> {
    let state = ServerState {
        registry: Arc::new(registry),
        health,
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
        .merge(extra);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

/// A channel that turns true on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = tx.send(true);
    });
    rx
}

/// Parse durations such as `500ms`, `10s`, `2m` (used by command-line flags).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("duration {s:?} needs a unit: ms, s or m"))?;
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    }
}

/// Resident set size of this process in bytes (from /proc/self/statm).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10h").is_err());
    }

    #[test]
    fn health_overdue() {
        let h = Health::default();
        h.beat("a", Duration::from_secs(60));
        h.beat("b", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        let o = h.overdue();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].0, "b");
    }
}
