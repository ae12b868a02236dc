//! Controller metrics in the Prometheus text format ([`kvroute_contract::prom`]): reconciles,
//! failures by error label, reconcile duration, and whether this replica leads.
//!
//! Owns only counters and their rendering; the HTTP server is `serve`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvroute_contract::prom::{self, counter, gauge, header, sample, Histogram};

/// Upper bounds (seconds) of the reconcile-duration histogram buckets.
const BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counters shared by reconcile, error_policy and the leader loop.
#[derive(Debug)]
pub struct Metrics {
    reconciles: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    duration: Histogram,
    leader: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            duration: Histogram::new(BUCKETS),
            leader: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Counts one reconcile and its duration.
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        self.duration.observe_duration(took);
    }

    /// Counts one failed reconcile under its error label.
    pub fn observe_failure(&self, label: &'static str) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(label).or_insert(0) += 1;
        }
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    pub fn failures(&self, label: &str) -> u64 {
        self.failures
            .lock()
            .map(|f| f.get(label).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        counter(
            &mut s,
            "kvroute_operator_reconciles_total",
            "Reconciles run.",
            &[],
            self.reconciles() as f64,
        );
        header(
            &mut s,
            "kvroute_operator_reconcile_errors_total",
            "Reconciles that failed, by error.",
            "counter",
        );
        if let Ok(f) = self.failures.lock() {
            for (label, n) in f.iter() {
                sample(
                    &mut s,
                    "kvroute_operator_reconcile_errors_total",
                    &[("error", label)],
                    *n as f64,
                );
            }
        }
        self.duration.write(
            &mut s,
            "kvroute_operator_reconcile_duration_seconds",
            "Time spent in reconcile.",
            &[],
        );
        gauge(
            &mut s,
            "kvroute_operator_leader",
            "1 when this replica holds the leader Lease.",
            &[],
            f64::from(u8::from(self.leader.load(Ordering::Relaxed))),
        );
        s
    }
}

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` until the listener fails.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, metrics).await
}

/// Like [`serve`], on a bound listener (tests bind `127.0.0.1:0`).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, prom::CONTENT_TYPE)],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.observe_reconcile(Duration::from_millis(30));
        m.observe_reconcile(Duration::from_secs(3));
        m.observe_failure("kube_api");
        m.observe_failure("kube_api");
        m.set_leader(true);
        let text = m.render();
        assert!(
            text.contains("kvroute_operator_reconciles_total 2\n"),
            "{text}"
        );
        assert!(text.contains("kvroute_operator_reconcile_errors_total{error=\"kube_api\"} 2\n"));
        assert!(
            text.contains("kvroute_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1\n")
        );
        assert!(text.contains("kvroute_operator_reconcile_duration_seconds_bucket{le=\"5\"} 2\n"));
        assert!(
            text.contains("kvroute_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("kvroute_operator_reconcile_duration_seconds_sum 3.03\n"));
        assert!(text.contains("kvroute_operator_leader 1\n"));
        assert_eq!(m.failures("kube_api"), 2);
    }
}
