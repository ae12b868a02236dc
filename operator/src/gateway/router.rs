//! The router: the pure [`Cluster`] and [`AdmissionQueue`] behind one lock, with the gateway's
//! clock and random source, and the waiting that admission needs.
//!
//! It owns when a queued request is looked at again (after every report, cancellation or new
//! request) and every reservation's life: reserved when a request is admitted, cancelled when the
//! request never reached its agent, retired by the agent's reports. It never does network I/O and
//! never holds its lock across an await.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::admission::{AdmissionQueue, Full, Priority};
use super::metrics::Metrics;
use super::policy::{
    Cluster, Decision, PolicyConfig, Reject, Report, ReservationHandle, Route, RouteRequest, Slot,
    SplitMix64,
};

/// A request's routing-relevant facts (sizes and block hashes, computed from its prompt).
#[derive(Debug, Clone)]
pub struct PromptPlan {
    pub model: String,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub block_size: u32,
    pub block_hashes: Vec<u64>,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum AdmitError {
    /// The admission queue is full.
    QueueFull,
    /// The request waited its whole deadline.
    Timeout,
    /// It can never be served as it is.
    Reject(Reject),
}

struct Waiter {
    plan: PromptPlan,
    exclude: Vec<Slot>,
    tx: oneshot::Sender<Result<Admitted, AdmitError>>,
    queued_at: Instant,
}

struct Core {
    cluster: Cluster,
    queue: AdmissionQueue<Waiter>,
    rng: SplitMix64,
}

/// Shared router state.
pub struct Router {
    core: Mutex<Core>,
    /// Reservations to cancel, pushed by [`Admitted`]'s drop (which may run under `core`).
    cancels: Mutex<Vec<ReservationHandle>>,
    wake: Notify,
    start: Instant,
    pub policy: PolicyConfig,
    pub metrics: Arc<Metrics>,
}

/// An admitted request: where to send it and the reservation made for it. Dropped without
/// [`mark_sent`](Admitted::mark_sent), the reservation is cancelled (the agent never saw it).
pub struct Admitted {
    pub route: Route,
    pub endpoint: String,
    pub agent_id: String,
    handle: Option<ReservationHandle>,
    router: Arc<Router>,
    sent: bool,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted")
            .field("route", &self.route)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Admitted {
    /// The request is on its way to the agent: its counter will cover it.
    pub fn mark_sent(&mut self) {
        self.sent = true;
    }

    /// The connection failed before the request could reach the agent: release its blocks now.
    pub fn cancel(mut self) {
        self.sent = false;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.sent {
            if let Some(h) = self.handle.take() {
                let mut c = self
                    .router
                    .cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                c.push(h);
                self.router.wake.notify_one();
            }
        }
    }
}

/// A point-in-time copy of one agent for the dashboard and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentSnapshot {
    pub slot: Slot,
    pub endpoint: String,
    pub agent_id: String,
    pub model: String,
    pub active: bool,
    pub connected: bool,
    pub eligible: bool,
    pub report_age_ms: Option<u64>,
    pub epoch: u64,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub cached_blocks: u64,
    pub used_blocks: u64,
    pub reserved_blocks: u64,
    pub pending_requests: usize,
    pub running_requests: u32,
    pub waiting_requests: u32,
    pub requests_received: u64,
    pub preemptions: u64,
    pub gpu_utilization_percent: Option<u32>,
    pub prefix_hashes: usize,
}

/// Queue depth per class and tenant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueSnapshot {
    pub depth: usize,
    pub capacity: usize,
    pub entries: Vec<QueueEntry>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueEntry {
    pub priority: String,
    pub tenant: String,
    pub depth: usize,
}

impl Router {
    pub fn new(policy: PolicyConfig, max_queue: usize, seed: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            core: Mutex::new(Core {
                cluster: Cluster::new(),
                queue: AdmissionQueue::new(max_queue),
                rng: SplitMix64(seed),
            }),
            cancels: Mutex::new(Vec::new()),
            wake: Notify::new(),
            start: Instant::now(),
            policy,
            metrics,
        }
    }

    /// The router's clock: milliseconds since it was created (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
        let cancels: Vec<ReservationHandle> = {
            let mut c = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *c)
        };
        for h in cancels {
            core.cluster.cancel(h);
        }
        core
    }

    /// Adds (or re-activates) the agent whose HTTP endpoint is `endpoint`.
    pub fn add_agent(&self, endpoint: &str) -> Slot {
        self.lock().cluster.upsert_agent(endpoint)
    }

    /// The agent left the source.
    pub fn remove_agent(&self, slot: Slot) {
        self.lock().cluster.deactivate(slot);
    }

    /// A report arrived from the agent in `slot`.
    pub fn on_report(self: &Arc<Self>, slot: Slot, report: Report) {
        let now = self.now_ms();
        let mut core = self.lock();
        let new_epoch = core.cluster.apply_report(slot, report, now);
        if new_epoch {
            tracing::info!(
                slot,
                "agent: new epoch, reset its cache view and reservations"
            );
        }
        self.pump(&mut core);
    }

    /// The agent's capacity stream is down.
    pub fn on_disconnect(&self, slot: Slot) {
        self.lock().cluster.set_disconnected(slot);
    }

    /// Waits until the request is admitted to an agent, the deadline passes, or it is rejected.
    pub async fn admit(
        self: &Arc<Self>,
        plan: PromptPlan,
        exclude: Vec<Slot>,
        priority: Priority,
        tenant: &str,
        deadline: Duration,
    ) -> Result<Admitted, AdmitError> {
        let (tx, mut rx) = oneshot::channel();
        let id = {
            let mut core = self.lock();
            let waiter = Waiter {
                plan,
                exclude,
                tx,
                queued_at: Instant::now(),
            };
            let id = match core.queue.push(priority, tenant, waiter) {
                Ok(id) => id,
                Err(Full(_)) => return Err(AdmitError::QueueFull),
            };
            self.pump(&mut core);
            self.metrics.set_queue_depth(core.queue.len());
            id
        };
        match tokio::time::timeout(deadline, &mut rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(AdmitError::Timeout),
            Err(_) => {
                let removed = {
                    let mut core = self.lock();
                    let removed = core.queue.remove(id).is_some();
                    self.metrics.set_queue_depth(core.queue.len());
                    removed
                };
                if removed {
                    Err(AdmitError::Timeout)
                } else {
                    // Admitted in the same instant the deadline passed: take it.
                    rx.await.unwrap_or(Err(AdmitError::Timeout))
                }
            }
        }
    }

    /// Admits queued requests, in queue order, while the policy finds room for the head.
    fn pump(self: &Arc<Self>, core: &mut Core) {
        let cfg = self.policy;
        loop {
            let now = self.now_ms();
            let Core {
                cluster,
                queue,
                rng,
            } = &mut *core;
            let Some((_, w)) = queue.peek() else {
                break;
            };
            if w.tx.is_closed() {
                // The client left while waiting.
                queue.pop();
                continue;
            }
            let t = Instant::now();
            let decision = cluster.decide(
                &cfg,
                &RouteRequest {
                    model: &w.plan.model,
                    prompt_tokens: w.plan.prompt_tokens,
                    output_tokens: w.plan.output_tokens,
                    block_size: w.plan.block_size,
                    block_hashes: &w.plan.block_hashes,
                    exclude: &w.exclude,
                },
                now,
                rng,
            );
            self.metrics.observe_decision(t.elapsed());
            let outcome = match decision {
                Decision::Wait => break,
                Decision::Reject(r) => Err(AdmitError::Reject(r)),
                Decision::Route(route) => {
                    let handle = cluster.reserve(&route);
                    let a = &cluster.agents()[route.slot];
                    Ok(Admitted {
                        route,
                        endpoint: a.endpoint.clone(),
                        agent_id: a.report.agent_id.clone(),
                        handle,
                        router: Arc::clone(self),
                        sent: false,
                    })
                }
            };
            let Some((_, w)) = queue.pop() else {
                break;
            };
            self.metrics.observe_queue_wait(w.queued_at.elapsed());
            if let Err(Ok(mut admitted)) = w.tx.send(outcome) {
                // The client left between the check and now: release the blocks directly (we
                // hold the lock its drop would take).
                if let Some(h) = admitted.handle.take() {
                    cluster.cancel(h);
                }
            }
        }
        self.metrics.set_queue_depth(core.queue.len());
    }

    /// Runs until the process ends: applies cancellations and re-pumps the queue when woken, and
    /// every 250 ms regardless (so nothing waits on a lost wake-up).
    pub async fn run_pump(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(250), self.wake.notified()).await;
            let mut core = self.lock();
            self.pump(&mut core);
        }
    }

    /// Copies of every active agent's state.
    pub fn agents(&self) -> Vec<AgentSnapshot> {
        let now = self.now_ms();
        let core = self.lock();
        core.cluster
            .agents()
            .iter()
            .enumerate()
            .filter(|(_, a)| a.active)
            .map(|(slot, a)| {
                let r = &a.report;
                AgentSnapshot {
                    slot,
                    endpoint: a.endpoint.clone(),
                    agent_id: r.agent_id.clone(),
                    model: r.model.clone(),
                    active: a.active,
                    connected: a.connected,
                    eligible: a.fresh(now, self.policy.stale_after_ms),
                    report_age_ms: a.last_report_ms.map(|t| now.saturating_sub(t)),
                    epoch: r.epoch,
                    total_blocks: r.total_blocks,
                    free_blocks: r.free_blocks,
                    cached_blocks: r.cached_evictable_blocks,
                    used_blocks: r.total_blocks.saturating_sub(r.free_blocks),
                    reserved_blocks: a.reserved_blocks(),
                    pending_requests: a.pending_requests(),
                    running_requests: r.running_requests,
                    waiting_requests: r.waiting_requests,
                    requests_received: r.requests_received,
                    preemptions: r.preemptions,
                    gpu_utilization_percent: r.gpu_utilization_percent,
                    prefix_hashes: a.cached_blocks(),
                }
            })
            .collect()
    }

    /// The admission queue's depth per class and tenant.
    pub fn queue(&self) -> QueueSnapshot {
        let core = self.lock();
        QueueSnapshot {
            depth: core.queue.len(),
            capacity: core.queue.capacity(),
            entries: core
                .queue
                .depths()
                .into_iter()
                .map(|(p, tenant, depth)| QueueEntry {
                    priority: p.to_string(),
                    tenant,
                    depth,
                })
                .collect(),
        }
    }

    /// The HTTP endpoint of an eligible agent serving `model` (for fetching model info).
    pub fn endpoint_for_model(&self, model: Option<&str>) -> Option<String> {
        let now = self.now_ms();
        let core = self.lock();
        let agents = core.cluster.agents();
        agents
            .iter()
            .filter(|a| a.fresh(now, self.policy.stale_after_ms))
            .find(|a| model.is_none_or(|m| a.report.model == m))
            .map(|a| a.endpoint.clone())
    }

    /// Models served by fresh agents.
    pub fn models(&self) -> Vec<String> {
        let now = self.now_ms();
        let core = self.lock();
        let mut m: Vec<String> = core
            .cluster
            .agents()
            .iter()
            .filter(|a| a.fresh(now, self.policy.stale_after_ms))
            .map(|a| a.report.model.clone())
            .collect();
        m.sort();
        m.dedup();
        m
    }
}
