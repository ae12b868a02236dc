//! The router: the pure [`Cluster`] and [`AdmissionQueue`] behind one lock, with the gateway's
//! clock and random source, and the waiting that admission needs.
//!
//! It owns when a queued request is looked at again (after every report, cancellation or new
//! request), every reservation's life (reserved when a request is admitted, cancelled when the
//! request never reached its agent, retired by the agent's reports) and each model's settings
//! (policy, queue bound and timeout; the flags unless the model's spec says otherwise). It never
//! does network I/O and never holds its lock across an await.
//!
//! No head-of-line blocking: every queued request is offered to the policy in queue order
//! (priority, then tenant turns). One that has to wait *claims* the agents that could serve it
//! once room frees (fresh, serving its model, large enough for its prompt, not excluded); later
//! requests may only go to unclaimed agents. So a request for another model (or one another set
//! of agents can serve) goes ahead, while a later request can never take the room an earlier one
//! is waiting for on the same agents: priorities and tenant fairness hold among the requests that
//! compete for the same agents.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use super::config::ModelSettings;
use super::metrics::Metrics;
use super::types::{AgentSnapshot, ModelSpecSettings, PromptPlan, QueueEntry, QueueSnapshot};
use kvroute_contract::dispatch::format_dispatch;
use kvroute_routing::admission::{AdmissionQueue, EntryId, Full, Priority};
use kvroute_routing::queue::QueuePass;
use kvroute_routing::{
    Cluster, Decision, PolicyConfig, PolicyKind, Reject, Report, ReservationHandle, Route,
    RouteRequest, Slot, SplitMix64,
};

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
    priority: Priority,
    /// Offered to the policy (or checked for a reject) at least once.
    looked_at: std::cell::Cell<bool>,
    /// The prefix hold kept for it on the agent it waits for, if any.
    hold: std::cell::Cell<HoldState>,
    /// The agent its last decision had it wait for, if any (the cost model's `stick`).
    home: std::cell::Cell<Option<Slot>>,
    /// Wants the routing decision explained ([`Admitted::trace`]).
    trace: bool,
}

/// The request the policy sees for `plan`, with no claims or holds counted.
fn route_request<'a>(
    plan: &'a PromptPlan,
    exclude: &'a [Slot],
    may_hold: bool,
    home: Option<Slot>,
    waited_ms: u64,
) -> RouteRequest<'a> {
    RouteRequest {
        model: &plan.model,
        prompt_tokens: plan.prompt_tokens,
        output_tokens: plan.output_tokens,
        block_size: plan.block_size,
        block_hashes: &plan.block_hashes,
        exclude,
        claimed: &[],
        held: &[],
        may_hold,
        home,
        waited_ms,
    }
}

/// An agent's id, by slot (empty if unknown).
fn agent_name(cluster: &Cluster, slot: Slot) -> String {
    cluster
        .agents()
        .get(slot)
        .map_or_else(String::new, |a| a.report.agent_id.clone())
}

/// The candidates of the decision `cluster` just made for `req`, named.
/// `filters_req` is what the filters saw (with the claims of requests queued before it); the
/// estimates read `req` (claims and holds already applied to the candidates' room).
fn trace_of(
    cluster: &Cluster,
    cfg: &PolicyConfig,
    req: &RouteRequest<'_>,
    filters_req: &RouteRequest<'_>,
    now_ms: u64,
) -> Trace {
    Trace {
        candidates: cluster
            .explain(cfg, req)
            .into_iter()
            .map(|t| TraceEntry {
                agent_id: agent_name(cluster, t.candidate.slot),
                trace: t,
            })
            .collect(),
        filtered: cluster
            .filter_verdicts(cfg, filters_req, now_ms)
            .into_iter()
            .map(|(slot, v)| (agent_name(cluster, slot), v.as_str()))
            .collect(),
        policy: *cfg,
        scorers: scorers_of(cluster, cfg),
    }
}

/// The scorers of `cfg`'s pipeline with their weights, named as `cluster`'s registry names them.
fn scorers_of(cluster: &Cluster, cfg: &PolicyConfig) -> Vec<super::decisions::ScorerInfo> {
    kvroute_routing::pipeline::Preset::of(cfg)
        .scorers
        .as_slice()
        .iter()
        .map(|&(id, weight)| super::decisions::ScorerInfo {
            name: cluster
                .scorers()
                .name(id)
                .map_or_else(|| format!("scorer-{}", id.0), str::to_string),
            weight,
        })
        .collect()
}

pub use super::decisions::{Trace, TraceEntry};

/// A waiting request's prefix hold (see [`HoldAction`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    None,
    /// Asked of the agent in this slot (ask number, at most this many free blocks), no answer
    /// yet.
    Asked(Slot, u64, u64),
    /// Kept by the agent in this slot under this id.
    Held(Slot, u64),
    /// The agent in this slot held nothing at this time: not asked there again before
    /// [`HOLD_RETRY`] has passed.
    Refused(Slot, Instant),
}

/// How soon a request whose hold an agent refused (nothing cached, or no unpromised room) asks
/// that agent again; without it every pump would ask again.
pub const HOLD_RETRY: Duration = Duration::from_millis(500);

/// Work for the gateway's hold task (the router does no I/O): a request waiting for one agent
/// whose cached prefix there is evictable asks that agent to keep it (`POST /v1/kvroute/hold`),
/// so admitting other requests meanwhile cannot evict it. The request names the hold when it is
/// sent there (the agent then lets it go); one that goes elsewhere or leaves releases it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldAction {
    Place {
        entry: EntryId,
        /// This ask's number, to give back with its answer.
        ask: u64,
        slot: Slot,
        endpoint: String,
        block_hashes: Vec<u64>,
        /// Most free (evictable) blocks the hold may take: the room this gateway's reservations
        /// and earlier waiters leave there, so a hold never takes room promised elsewhere.
        max_free: u64,
        ttl: Duration,
    },
    Release {
        endpoint: String,
        id: u64,
        /// The ask that placed it, when its request had stopped waiting for that agent before
        /// the answer came: see [`Router::hold_released`].
        ask: Option<u64>,
    },
}

/// Counts an unanswered ask's blocks as taken on its agent (see [`Router::pump`]).
fn count_ask(held: &mut [u64], ask: Option<(Slot, u64)>) {
    if let Some((slot, m)) = ask {
        if let Some(h) = held.get_mut(slot) {
            *h = h.saturating_add(m);
        }
    }
}

/// Longest prefix hold asked for (the agent's limit is 60 s).
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// A waiter's place in [`Router::cache_first`]'s order: class, no prefix hold,
/// [`queue_rank`](kvroute_routing::policy::queue_rank) (late, within its window, cached blocks),
/// id.
type Ranked = (
    std::cmp::Reverse<Priority>,
    bool,
    kvroute_routing::policy::QueueRank,
    EntryId,
);

struct Core {
    cluster: Cluster,
    queue: AdmissionQueue<Waiter>,
    rng: SplitMix64,
    /// Per-model settings where a model's spec differs from the defaults.
    settings: HashMap<String, ModelSettings>,
    /// Queued requests per model (for each model's queue bound).
    queued: HashMap<String, usize>,
    /// Scratch of [`Router::pump`]: the queue's order, and the pass over it (what the requests
    /// decided so far claimed and hold).
    order: Vec<EntryId>,
    pass: QueuePass,
    /// Holds asked for requests that stopped waiting for that agent before the answer came:
    /// (ask, slot, most free blocks it may take). Until the answer says nothing is held, or the
    /// hold it placed is released, those blocks are counted as taken there: the agent's reports
    /// may not show a hold placed after they were sent.
    stray_asks: std::cell::RefCell<Vec<(u64, Slot, u64)>>,
    /// Agents (by slot) that have no hold API (an older agent, another backend: 404, 405 or
    /// 501): not asked again until their next epoch.
    holdless: Vec<bool>,
    next_ask: std::cell::Cell<u64>,
    /// Scratch of [`Router::cache_first`].
    ranked: Vec<Ranked>,
}

impl Core {
    /// Removes queued entry `id` (served out of turn when `served`), keeping the per-model count.
    fn take(&mut self, id: EntryId, served: bool) -> Option<Waiter> {
        let w = if served {
            self.queue.take(id)
        } else {
            self.queue.remove(id)
        }?;
        if let Some(n) = self.queued.get_mut(&w.plan.model) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.queued.remove(&w.plan.model);
            }
        }
        Some(w)
    }
}

/// Shared router state.
pub struct Router {
    core: Mutex<Core>,
    /// Reservations to cancel, pushed by [`Admitted`]'s drop (which may run under `core`).
    cancels: Mutex<Vec<ReservationHandle>>,
    wake: Notify,
    start: Instant,
    /// The default policy (the flags'); a model's spec may set its own.
    pub policy: PolicyConfig,
    /// The flags' per-model settings, for models whose spec says nothing.
    defaults: ModelSettings,
    pub metrics: Arc<Metrics>,
    /// Prefix holds are asked for (`kv` models only).
    prefix_holds: std::sync::atomic::AtomicBool,
    hold_tx: tokio::sync::mpsc::UnboundedSender<HoldAction>,
    hold_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<HoldAction>>>,
    /// This replica's dispatcher id (see [`Router::dispatch_header`]).
    gateway_id: String,
    /// The shared token agents require (`--agent-token-file`).
    agent_token: Option<Arc<str>>,
    /// `--keep-finished-for`, in ms (0: finished requests' blocks are not kept).
    keep_finished_ms: std::sync::atomic::AtomicU64,
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
    /// The prefix hold the agent keeps for this request (sent as `x-kvroute-hold`).
    pub hold: Option<u64>,
    /// Every candidate of the decision that routed it, when asked for.
    pub trace: Option<Trace>,
    /// Its prompt's last full block and its blocks in all, kept for a while once it ends
    /// ([`QueuePass::keep`]).
    keep: Option<(u64, u64)>,
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

    /// The `x-kvroute-dispatch` value naming this request's reservation: the agent
    /// acknowledges it on this gateway's capacity stream once it counts the request.
    pub fn dispatch_header(&self) -> Option<String> {
        self.handle
            .map(|h| format_dispatch(self.router.gateway_id(), h.id))
    }

    /// The connection failed before the request could reach the agent: release its blocks now.
    pub fn cancel(mut self) {
        self.sent = false;
    }

    /// What to call with the observed time to first token: it calibrates the agent's predicted
    /// times (see [`Cluster::observe_ttft`]).
    pub fn ttft_calibrator(&self) -> Box<dyn FnOnce(Duration) + Send + Sync> {
        let router = Arc::clone(&self.router);
        let (slot, predicted) = (self.route.slot, self.route.predicted_ttft_s);
        let epoch = self.handle.map(|h| h.epoch);
        Box::new(move |observed| {
            if let Some(epoch) = epoch {
                router
                    .lock()
                    .cluster
                    .observe_ttft(slot, epoch, predicted, observed.as_secs_f64());
            }
        })
    }
}

impl Admitted {
    /// What to call when the agent's response has ended: keeps the request's blocks there from
    /// other requests for `--keep-finished-for` (`None`: not kept).
    pub fn finish_keeper(&self) -> Option<Box<dyn FnOnce() + Send + Sync>> {
        let window = self
            .router
            .keep_finished_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let (last_hash, blocks) = self.keep?;
        if window == 0 {
            return None;
        }
        let router = Arc::clone(&self.router);
        let slot = self.route.slot;
        Some(Box::new(move || {
            let until_ms = router.now_ms().saturating_add(window);
            router.lock().pass.keep(slot, blocks, last_hash, until_ms);
        }))
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

impl Router {
    /// A router whose models all use `defaults` until [`set_model_settings`] says otherwise.
    ///
    /// [`set_model_settings`]: Router::set_model_settings
    pub fn new(defaults: ModelSettings, seed: u64, metrics: Arc<Metrics>) -> Self {
        let (hold_tx, hold_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            core: Mutex::new(Core {
                cluster: Cluster::new(),
                // Bounded per model (`ModelSettings::max_queue`), not as a whole.
                queue: AdmissionQueue::new(usize::MAX),
                rng: SplitMix64(seed),
                settings: HashMap::new(),
                queued: HashMap::new(),
                order: Vec::new(),
                pass: QueuePass::default(),
                stray_asks: std::cell::RefCell::new(Vec::new()),
                holdless: Vec::new(),
                next_ask: std::cell::Cell::new(0),
                ranked: Vec::new(),
            }),
            cancels: Mutex::new(Vec::new()),
            wake: Notify::new(),
            start: Instant::now(),
            policy: defaults.policy,
            defaults,
            metrics,
            prefix_holds: std::sync::atomic::AtomicBool::new(true),
            hold_tx,
            hold_rx: Mutex::new(Some(hold_rx)),
            gateway_id: super::config::gateway_id("kvroute-gateway").unwrap_or_default(),
            agent_token: None,
            keep_finished_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Keeps a finished request's blocks on its agent from other requests for `window` after its
    /// response ends, for the next turn of its conversation ([`QueuePass::keep`]); zero: off.
    pub fn keep_finished_for(&self, window: Duration) {
        self.keep_finished_ms.store(
            window.as_millis().min(u128::from(u64::MAX)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The shared token to send to agents on every call.
    pub fn with_agent_token(mut self, token: Option<String>) -> Self {
        self.agent_token = token.map(Arc::from);
        self
    }

    /// The shared token agents require, if any.
    pub fn agent_token(&self) -> Option<&str> {
        self.agent_token.as_deref()
    }

    /// Names this replica to agents (a valid dispatcher id, see `config::gateway_id`).
    pub fn with_gateway_id(mut self, id: String) -> Self {
        self.gateway_id = id;
        self
    }

    /// This replica's dispatcher id: the capacity streams it opens ask agents to acknowledge
    /// the requests it stamps with it.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Turns prefix holds on or off (on by default; see [`HoldAction`]).
    pub fn set_prefix_holds(&self, on: bool) {
        self.prefix_holds
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The hold work for the gateway's hold task (once; `None` after the first call).
    pub fn take_hold_actions(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<HoldAction>> {
        self.hold_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The agent keeps hold `id` (`blocks` blocks) asked for by `ask` for queue entry `entry`:
    /// recorded if the request still waits for that agent, released otherwise.
    pub fn hold_placed(
        self: &Arc<Self>,
        entry: EntryId,
        ask: u64,
        endpoint: String,
        id: u64,
        blocks: u64,
    ) {
        self.metrics.count_prefix_hold(blocks);
        let core = self.lock();
        match core.queue.get(entry).map(|w| (w, w.hold.get())) {
            Some((w, HoldState::Asked(slot, a, _))) if a == ask => {
                w.hold.set(HoldState::Held(slot, id));
            }
            _ => {
                let stray = core.stray_asks.borrow().iter().any(|s| s.0 == ask);
                let _ = self.hold_tx.send(HoldAction::Release {
                    endpoint,
                    id,
                    ask: stray.then_some(ask),
                });
            }
        }
    }

    /// Ask `ask` for queue entry `entry` held nothing: it may ask again after [`HOLD_RETRY`].
    /// `unsupported`: the agent has no hold API, so it is not asked again.
    pub fn hold_refused(self: &Arc<Self>, entry: EntryId, ask: u64, unsupported: bool) {
        let mut core = self.lock();
        if let Some(w) = core.queue.get(entry) {
            if let HoldState::Asked(slot, a, _) = w.hold.get() {
                if a == ask {
                    w.hold.set(HoldState::Refused(slot, Instant::now()));
                    if unsupported {
                        if core.holdless.len() <= slot {
                            core.holdless.resize(slot + 1, false);
                        }
                        core.holdless[slot] = true;
                    }
                }
            }
        }
        self.hold_released(&mut core, ask);
    }

    /// The hold placed by stray ask `ask` (see `Core::stray_asks`) is released, or nothing was
    /// held: its blocks no longer count as taken.
    pub fn stray_hold_released(self: &Arc<Self>, ask: u64) {
        let mut core = self.lock();
        self.hold_released(&mut core, ask);
    }

    fn hold_released(self: &Arc<Self>, core: &mut Core, ask: u64) {
        let before = core.stray_asks.get_mut().len();
        core.stray_asks.get_mut().retain(|s| s.0 != ask);
        if core.stray_asks.get_mut().len() != before {
            // Room came back.
            self.pump(core);
        }
    }

    /// Releases `w`'s hold unless it is on `keep` (then returns its id).
    fn end_hold(&self, core: &Core, w: &Waiter, keep: Option<Slot>) -> Option<u64> {
        match w.hold.replace(HoldState::None) {
            HoldState::Held(slot, id) if Some(slot) == keep => Some(id),
            HoldState::Held(slot, id) => {
                if let Some(a) = core.cluster.agents().get(slot) {
                    let _ = self.hold_tx.send(HoldAction::Release {
                        endpoint: a.endpoint.clone(),
                        id,
                        ask: None,
                    });
                }
                None
            }
            // Sent there: its own blocks cover whatever the hold takes, and the answer releases
            // it (`hold_placed`).
            HoldState::Asked(slot, ..) if Some(slot) == keep => None,
            HoldState::Asked(slot, ask, max_free) => {
                core.stray_asks.borrow_mut().push((ask, slot, max_free));
                None
            }
            HoldState::None | HoldState::Refused(..) => None,
        }
    }

    /// Removes entry `id` from the queue (not served), releasing its hold.
    fn forget(&self, core: &mut Core, id: EntryId) -> Option<Waiter> {
        let w = core.take(id, false)?;
        self.end_hold(core, &w, None);
        Some(w)
    }

    /// `w` waits for `route`'s agent: asks that agent to keep the part of its cached prefix no
    /// running request holds (evictable), unless already asked there.
    fn want_hold(
        &self,
        core: &Core,
        (id, w): (EntryId, &Waiter),
        route: &Route,
        max_free: u64,
        timeout: Duration,
    ) {
        if route.cached_blocks <= route.shared_blocks
            || max_free == 0
            || !self.prefix_holds.load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        match w.hold.get() {
            HoldState::Asked(s, ..) | HoldState::Held(s, _) if s == route.slot => return,
            HoldState::Refused(s, at) if s == route.slot && at.elapsed() < HOLD_RETRY => return,
            _ => {}
        }
        if core.holdless.get(route.slot).copied().unwrap_or(false) {
            return;
        }
        self.end_hold(core, w, None);
        let Some(a) = core.cluster.agents().get(route.slot) else {
            return;
        };
        let n = (route.cached_blocks as usize).min(w.plan.block_hashes.len());
        let ttl = timeout
            .saturating_sub(w.queued_at.elapsed())
            .clamp(Duration::from_secs(1), MAX_HOLD);
        let ask = core.next_ask.get();
        core.next_ask.set(ask.wrapping_add(1));
        w.hold.set(HoldState::Asked(route.slot, ask, max_free));
        let _ = self.hold_tx.send(HoldAction::Place {
            entry: id,
            ask,
            slot: route.slot,
            endpoint: a.endpoint.clone(),
            block_hashes: w.plan.block_hashes[..n].to_vec(),
            max_free,
            ttl,
        });
    }

    /// Replaces the per-model settings with what each model's spec says (models not listed, and
    /// everything a spec leaves unset, take the defaults). Bad values are logged and ignored.
    pub fn set_model_settings(self: &Arc<Self>, specs: &BTreeMap<String, ModelSpecSettings>) {
        let mut settings = HashMap::new();
        for (model, spec) in specs {
            let (s, warnings) = ModelSettings::from_spec(
                &self.defaults,
                spec.routing.as_ref(),
                spec.admission.as_ref(),
            );
            for w in warnings {
                tracing::warn!(model = %model, "{w}");
            }
            if s != self.defaults {
                settings.insert(model.clone(), s);
            }
        }
        let mut core = self.lock();
        if core.settings != settings {
            tracing::info!(models = settings.len(), "per-model settings changed");
            core.settings = settings;
            self.pump(&mut core);
        }
    }

    /// The settings that hold for `model`.
    pub fn settings(&self, model: &str) -> ModelSettings {
        self.lock()
            .settings
            .get(model)
            .copied()
            .unwrap_or(self.defaults)
    }

    /// What the policy would do with `plan` now, without queueing or reserving anything: the
    /// decision's kind (`route`, `hold`: wait for that agent, `wait`: for any, `reject`), the
    /// agent it names, and every candidate. Requests already queued are not counted against
    /// the room (they may be admitted first).
    pub fn explain_now(&self, plan: &PromptPlan) -> (&'static str, Option<String>, Trace) {
        let mut core = self.lock();
        let cfg = core
            .settings
            .get(&plan.model)
            .map_or(self.defaults.policy, |s| s.policy);
        let req = route_request(plan, &[], true, None, 0);
        let now = self.now_ms();
        // Its own random source: asking must not change the tie-breaks of real requests.
        let d = core.cluster.decide(&cfg, &req, now, &mut SplitMix64(0));
        let (kind, route) = match &d {
            Decision::Route(r) => ("route", Some(r.slot)),
            Decision::Hold(r) => ("hold", Some(r.slot)),
            Decision::Wait => ("wait", None),
            Decision::Reject(_) => ("reject", None),
        };
        let trace = if route.is_some() {
            trace_of(&core.cluster, &cfg, &req, &req, now)
        } else {
            Trace {
                policy: cfg,
                scorers: scorers_of(&core.cluster, &cfg),
                ..Trace::default()
            }
        };
        let name = route.map(|slot| agent_name(&core.cluster, slot));
        (kind, name, trace)
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

    /// A report arrived from the agent in `slot`. The queue is decided again when the report
    /// opened room there (or the agent is new); a report that only took room (a step's progress,
    /// most of them) changes no queued request's decision, and every `REPUMP_MS` the pump task
    /// looks anyway.
    pub fn on_report(self: &Arc<Self>, slot: Slot, report: Report) {
        let now = self.now_ms();
        let mut core = self.lock();
        let stale = self.policy.stale_after_ms;
        let before = core.cluster.open_room(slot, now, stale);
        let new_epoch = core.cluster.apply_report(slot, report, now);
        let opened = core.cluster.open_room(slot, now, stale) > before;
        if new_epoch {
            // Perhaps another version now.
            if let Some(h) = core.holdless.get_mut(slot) {
                *h = false;
            }
            tracing::info!(
                slot,
                "agent: new epoch, reset its cache view and reservations"
            );
        }
        if new_epoch || opened {
            self.pump(&mut core);
        }
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
        self.admit_traced(plan, exclude, priority, tenant, deadline, false)
            .await
    }

    /// [`Self::admit`]; with `trace`, the admission carries every candidate of the decision
    /// that routed it ([`Admitted::trace`]).
    pub async fn admit_traced(
        self: &Arc<Self>,
        plan: PromptPlan,
        exclude: Vec<Slot>,
        priority: Priority,
        tenant: &str,
        deadline: Duration,
        trace: bool,
    ) -> Result<Admitted, AdmitError> {
        let (tx, mut rx) = oneshot::channel();
        let id = {
            let mut core = self.lock();
            let model = plan.model.clone();
            let max_queue = core
                .settings
                .get(&model)
                .map_or(self.defaults.max_queue, |s| s.max_queue);
            let waiter = Waiter {
                plan,
                exclude,
                tx,
                queued_at: Instant::now(),
                priority,
                looked_at: std::cell::Cell::new(false),
                hold: std::cell::Cell::new(HoldState::None),
                home: std::cell::Cell::new(None),
                trace,
            };
            let id = match core.queue.push(priority, tenant, waiter) {
                Ok(id) => id,
                Err(Full(_)) => return Err(AdmitError::QueueFull),
            };
            *core.queued.entry(model.clone()).or_insert(0) += 1;
            self.pump(&mut core);
            // Still waiting, with more of its model waiting than the model allows: refused (so
            // a bound of 0 means "route now or 429").
            let over = core.queue.get(id).is_some()
                && core.queued.get(&model).copied().unwrap_or(0) > max_queue;
            if over {
                self.forget(&mut core, id);
                self.metrics.set_queue_depth(core.queue.len());
                return Err(AdmitError::QueueFull);
            }
            self.metrics.set_queue_depth(core.queue.len());
            id
        };
        match tokio::time::timeout(deadline, &mut rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(AdmitError::Timeout),
            Err(_) => {
                let removed = {
                    let mut core = self.lock();
                    let removed = self.forget(&mut core, id).is_some();
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

    /// Offers every queued request to the policy, in queue order: admits those with room,
    /// answers those that can never be served, and lets a waiting one claim its agents so no
    /// later request takes them (see the module header).
    fn pump(self: &Arc<Self>, core: &mut Core) {
        let mut order = std::mem::take(&mut core.order);
        core.queue.order(&mut order);
        self.cache_first(core, &mut order);
        let mut pass = std::mem::take(&mut core.pass);
        pass.begin(core.cluster.agents().len());
        pass.hold_kept(self.now_ms());
        // Holds asked and not yet answered may take up to their `max_free` blocks at any moment,
        // and the agent's reports do not show them yet: count them taken whatever the order (a
        // request ranked ahead of the asking one in this pump would otherwise be sent into that
        // room).
        let asked = order
            .iter()
            .filter_map(|&id| match core.queue.get(id)?.hold.get() {
                HoldState::Asked(slot, _, m) => Some((slot, m)),
                _ => None,
            });
        let strays = core.stray_asks.borrow();
        for (slot, blocks) in asked.chain(strays.iter().map(|&(_, s, m)| (s, m))) {
            count_ask(pass.held_mut(), Some((slot, blocks)));
        }
        drop(strays);
        for &id in &order {
            let Some(w) = core.queue.get(id) else {
                continue;
            };
            if w.tx.is_closed() {
                // The client left while waiting.
                self.forget(core, id);
                continue;
            }
            let blocked_model = pass.is_blocked(&w.plan.model);
            if blocked_model && w.looked_at.get() {
                continue;
            }
            let (cfg, max_queue, timeout) = core.settings.get(&w.plan.model).map_or(
                (
                    self.defaults.policy,
                    self.defaults.max_queue,
                    self.defaults.queue_timeout,
                ),
                |s| (s.policy, s.max_queue, s.queue_timeout),
            );
            // Waiting for one agent is a queue entry like any other: not where the model's
            // queue bound says "route now or refuse".
            let may_hold = core.queued.get(&w.plan.model).copied().unwrap_or(0) <= max_queue;
            // Its own unanswered ask takes nothing from itself.
            let own_ask = match w.hold.get() {
                HoldState::Asked(slot, _, m) => {
                    if let Some(h) = pass.held_mut().get_mut(slot) {
                        *h = h.saturating_sub(m);
                    }
                    Some((slot, m))
                }
                _ => None,
            };
            let q = route_request(
                &w.plan,
                &w.exclude,
                may_hold,
                w.home.get(),
                w.queued_at.elapsed().as_millis().min(u128::from(u64::MAX)) as u64,
            );
            let now = self.now_ms();
            let mut held_before = 0;
            let decision = if blocked_model {
                // Every agent of its model is claimed: it can only wait, unless it can never be
                // served at all (told once, at once, rather than at its deadline).
                w.looked_at.set(true);
                match pass.rejection(&core.cluster, &q) {
                    Some(r) => Decision::Reject(r),
                    None => {
                        count_ask(pass.held_mut(), own_ask);
                        continue;
                    }
                }
            } else {
                let first = !w.looked_at.get();
                w.looked_at.set(true);
                let t = Instant::now();
                let passed = pass.decide(&mut core.cluster, &cfg, &q, now, &mut core.rng);
                self.metrics.observe_decision(t.elapsed());
                held_before = passed.held_before;
                let d = passed.decision;
                if first {
                    let (kind, r) = match &d {
                        Decision::Route(r) => ("route", Some(r)),
                        Decision::Hold(r) => ("hold", Some(r)),
                        Decision::Wait => ("wait", None),
                        Decision::Reject(_) => ("reject", None),
                    };
                    tracing::debug!(
                        kind,
                        slot = r.map_or(99, |r| r.slot),
                        need = r.map_or(0, |r| r.need_blocks),
                        cached = r.map_or(0, |r| r.cached_blocks),
                        prefix = w.plan.block_hashes.first().map_or(0, |h| h % 10_000),
                        "first look"
                    );
                }
                d
            };
            // Unless it goes where it asked, its ask stays outstanding (or becomes stray).
            if !matches!((&decision, own_ask), (Decision::Route(r), Some((s, _))) if r.slot == s) {
                count_ask(pass.held_mut(), own_ask);
            }
            let outcome = match decision {
                // The pass claimed its agents (it waits for any of them).
                Decision::Wait => continue,
                Decision::Hold(route) => {
                    self.metrics.count_held();
                    w.home.set(Some(route.slot));
                    // It waits for this agent: the pass counts that room held from later
                    // requests.
                    if cfg.kind == PolicyKind::Kv {
                        let max_free = core.cluster.agents().get(route.slot).map_or(0, |a| {
                            a.report
                                .free_blocks
                                .saturating_sub(a.reserved_blocks())
                                .saturating_sub(held_before)
                        });
                        self.want_hold(core, (id, w), &route, max_free, timeout);
                    }
                    continue;
                }
                Decision::Reject(r) => Err(AdmitError::Reject(r)),
                Decision::Route(route) => {
                    // What the estimates read of the request (its claims and holds were already
                    // applied to the candidates' room).
                    let trace = w.trace.then(|| {
                        let filters_req = RouteRequest {
                            claimed: pass.claimed(),
                            ..q
                        };
                        trace_of(&core.cluster, &cfg, &q, &filters_req, now)
                    });
                    let hold = self.end_hold(core, w, Some(route.slot));
                    tracing::debug!(
                        slot = route.slot,
                        need = route.need_blocks,
                        cached = route.cached_blocks,
                        prefix = w.plan.block_hashes.first().map_or(0, |h| h % 10_000),
                        held = hold.is_some(),
                        "routed"
                    );
                    let handle = core
                        .cluster
                        .dispatch(&cfg, &route, &w.plan.block_hashes, now);
                    let a = &core.cluster.agents()[route.slot];
                    Ok(Admitted {
                        route,
                        endpoint: a.endpoint.clone(),
                        agent_id: a.report.agent_id.clone(),
                        handle,
                        router: Arc::clone(self),
                        sent: false,
                        hold,
                        trace,
                        keep: w.plan.block_hashes.last().map(|&h| (h, route.need_blocks)),
                    })
                }
            };
            let Some(w) = core.take(id, true) else {
                continue;
            };
            self.end_hold(core, &w, None);
            self.metrics.observe_queue_wait(w.queued_at.elapsed());
            if let Err(Ok(mut admitted)) = w.tx.send(outcome) {
                // The client left between the check and now: release the blocks directly (we
                // hold the lock its drop would take), and the hold.
                if let Some(h) = admitted.handle.take() {
                    core.cluster.cancel(h);
                }
                if let Some(id) = admitted.hold.take() {
                    let _ = self.hold_tx.send(HoldAction::Release {
                        endpoint: admitted.endpoint.clone(),
                        id,
                        ask: None,
                    });
                }
            }
        }
        core.order = order;
        core.pass = pass;
        self.metrics.set_queue_depth(core.queue.len());
    }

    /// Reorders `order` (the queue's) so that, within a priority class, requests with more of
    /// their prompt cached or in flight on an agent of their model come first (`kv` models whose
    /// `cache_first_ms` is set): they take little room and little prefill, and serving them
    /// while their prefix is resident keeps it from being evicted and computed again. A request
    /// that has waited longer than its window is served in the queue's own order, ahead of the
    /// younger ones of its class, so none is passed for ever. Stable: equal keys keep the queue's
    /// order (arrival, tenants taking turns).
    fn cache_first(&self, core: &mut Core, order: &mut Vec<EntryId>) {
        if order.len() < 2 {
            return;
        }
        let mut ranked = std::mem::take(&mut core.ranked);
        ranked.clear();
        let mut reorders = false;
        for &id in order.iter() {
            let Some(w) = core.queue.get(id) else {
                continue;
            };
            let cfg = core
                .settings
                .get(&w.plan.model)
                .map_or(self.defaults.policy, |s| s.policy);
            let waited_ms = w.queued_at.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
            let cluster = &mut core.cluster;
            let rank = kvroute_routing::policy::queue_rank(&cfg, waited_ms, || {
                cluster.local_prefix_blocks(&w.plan.model, &w.plan.block_hashes)
            });
            // A request an agent keeps a prefix for goes first: the held blocks are idle until
            // it is admitted, and a request queued before it may need exactly that room.
            let holding = matches!(w.hold.get(), HoldState::Held(..));
            reorders |= rank.0 || rank.2 .0 > 0 || holding;
            ranked.push((std::cmp::Reverse(w.priority), !holding, rank, id));
        }
        if reorders {
            ranked.sort_by_key(|&(class, holding, rank, _)| (class, holding, rank));
            order.clear();
            order.extend(ranked.iter().map(|r| r.3));
        }
        core.ranked = ranked;
    }

    /// Runs until the process ends: applies cancellations and re-pumps the queue when woken, and
    /// every `REPUMP_MS` regardless (so nothing waits on a lost wake-up, or on what no report
    /// shows: a deadline, an agent gone stale).
    pub async fn run_pump(self: Arc<Self>) {
        loop {
            let _ = tokio::time::timeout(
                Duration::from_millis(kvroute_routing::cluster::REPUMP_MS),
                self.wake.notified(),
            )
            .await;
            self.pump_now();
        }
    }

    /// One look at the queue, as the pump task takes when woken or every `REPUMP_MS`: applies
    /// cancellations, drops requests whose clients left, asks for prefix holds again.
    pub fn pump_now(self: &Arc<Self>) {
        let mut core = self.lock();
        self.pump(&mut core);
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
                    dispatches_acked: a.dispatches_acked(),
                    dispatches_expired: a.dispatches_expired(),
                    over_admissions: a.over_admissions(),
                    host_total_blocks: r.host_total_blocks,
                    host_used_blocks: r.host_used_blocks,
                }
            })
            .collect()
    }

    /// The admission queue's depth per class and tenant.
    pub fn queue(&self) -> QueueSnapshot {
        let core = self.lock();
        QueueSnapshot {
            depth: core.queue.len(),
            capacity: self.defaults.max_queue,
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

    /// `Retry-After` seconds for a refused request of `plan`'s model: the blocks its queued
    /// requests and it need, less the room its agents have, at the rate they were seen giving
    /// room back (see `kvroute_routing::cost::retry_after_s`). `None` before a rate is known.
    pub fn retry_after_s(&self, plan: &PromptPlan) -> Option<u64> {
        let blocks = |p: &PromptPlan| {
            (p.prompt_tokens + p.output_tokens).div_ceil(u64::from(p.block_size.max(1)))
        };
        let now = self.now_ms();
        let core = self.lock();
        let mut ids = Vec::new();
        core.queue.order(&mut ids);
        let queued: u64 = ids
            .iter()
            .filter_map(|&id| core.queue.get(id))
            .filter(|w| w.plan.model == plan.model)
            .map(|w| blocks(&w.plan))
            .sum();
        let stale = core
            .settings
            .get(&plan.model)
            .map_or(self.policy.stale_after_ms, |s| s.policy.stale_after_ms);
        core.cluster
            .retry_after_s(&plan.model, queued + blocks(plan), now, stale)
    }

    /// Each model's KV demand, the signal autoscaling reads (`controller::autoscale`): blocks
    /// used and reserved on its live agents, the blocks its waiting requests need beyond the
    /// room those agents have (the shortfall), and one replica's pool.
    pub fn kv_signals(&self) -> Vec<(String, kvroute_routing::autoscale::KvSignal)> {
        use kvroute_routing::autoscale::KvSignal;
        let now = self.now_ms();
        let core = self.lock();
        let mut by_model: BTreeMap<String, (KvSignal, u64)> = BTreeMap::new();
        for a in core.cluster.agents() {
            if !a.fresh(now, self.policy.stale_after_ms) {
                continue;
            }
            let r = &a.report;
            let (sig, room) = by_model.entry(r.model.clone()).or_default();
            sig.used_blocks += r.total_blocks.saturating_sub(r.free_blocks);
            sig.reserved_blocks += a.reserved_blocks();
            sig.blocks_per_replica = sig.blocks_per_replica.max(r.total_blocks);
            *room += r.free_blocks.saturating_sub(a.reserved_blocks());
        }
        let mut ids = Vec::new();
        core.queue.order(&mut ids);
        let mut need: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for w in ids.iter().filter_map(|&id| core.queue.get(id)) {
            let p = &w.plan;
            let e = need.entry(p.model.as_str()).or_default();
            e.0 += (p.prompt_tokens + p.output_tokens).div_ceil(u64::from(p.block_size.max(1)));
            e.1 += 1;
        }
        for (model, (blocks, waiting)) in need {
            let (sig, room) = by_model.entry(model.to_string()).or_default();
            sig.shortfall_blocks = blocks.saturating_sub(*room);
            sig.waiting_requests = waiting;
        }
        by_model.into_iter().map(|(m, (s, _))| (m, s)).collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use kvroute_crd::{AdmissionSpec, RoutingPolicy, RoutingSpec};
    use kvroute_routing::PolicyKind;

    fn router() -> Arc<Router> {
        let cfg = GatewayConfig::for_agents("127.0.0.1:0".parse().unwrap(), Vec::new());
        Arc::new(Router::new(
            cfg.model_defaults(),
            1,
            Arc::new(Metrics::new("kv")),
        ))
    }

    fn agent(r: &Arc<Router>, id: &str, model: &str, free: u64) -> Slot {
        let slot = r.add_agent(&format!("{id}:8000"));
        report(r, slot, id, model, free);
        slot
    }

    fn report(r: &Arc<Router>, slot: Slot, id: &str, model: &str, free: u64) {
        report_cached(r, slot, id, model, free, Vec::new());
    }

    /// A snapshot report whose cache holds `cached`.
    fn report_cached(
        r: &Arc<Router>,
        slot: Slot,
        id: &str,
        model: &str,
        free: u64,
        cached: Vec<u64>,
    ) {
        r.on_report(
            slot,
            Report {
                agent_id: id.into(),
                epoch: 1,
                model: model.into(),
                block_size: 16,
                total_blocks: 100,
                free_blocks: free,
                max_model_len: 8192,
                snapshot: true,
                // Idle: nothing running holds the cached blocks.
                cached_evictable_blocks: cached.len() as u64,
                events: vec![kvroute_routing::CacheEvent::Stored(cached)],
                ..Report::default()
            },
        );
    }

    /// Admits now (a request that fits).
    async fn admit_now(r: &Arc<Router>, plan: PromptPlan) -> Admitted {
        r.admit(
            plan,
            Vec::new(),
            Priority::NORMAL,
            "t",
            Duration::from_secs(600),
        )
        .await
        .unwrap()
    }

    fn plan(model: &str, prompt_tokens: u64) -> PromptPlan {
        PromptPlan {
            model: model.into(),
            prompt_tokens,
            output_tokens: 0,
            block_size: 16,
            block_hashes: Vec::new(),
        }
    }

    /// Admits in the background; the request is queued (or answered) once this returns, since
    /// `admit` pumps under the lock before it first waits.
    fn spawn_admit(
        r: &Arc<Router>,
        plan: PromptPlan,
        exclude: Vec<Slot>,
        priority: Priority,
    ) -> tokio::task::JoinHandle<Result<Admitted, AdmitError>> {
        let r = Arc::clone(r);
        tokio::spawn(async move {
            r.admit(plan, exclude, priority, "t", Duration::from_secs(600))
                .await
        })
    }

    async fn until_depth(r: &Arc<Router>, depth: usize) {
        for _ in 0..3000 {
            if r.queue().depth == depth {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("queue depth never {depth}: {:?}", r.queue());
    }

    #[tokio::test]
    async fn a_finished_requests_blocks_wait_for_its_next_turn_within_the_window() {
        let r = router();
        r.keep_finished_for(Duration::from_secs(600));
        let a = agent(&r, "a", "m", 30);
        // A 20-block turn (320 tokens) is routed, answers and ends.
        let turn = PromptPlan {
            block_hashes: (1..=20).collect(),
            ..plan("m", 320)
        };
        let mut first = admit_now(&r, turn).await;
        first.mark_sent();
        let keeper = first.finish_keeper().expect("kept with a window");
        // The agent reports the room it freed (all 30 blocks), the request counted, and the
        // turn's blocks cached, which nothing running holds.
        r.on_report(
            a,
            Report {
                agent_id: "a".into(),
                epoch: 1,
                model: "m".into(),
                block_size: 16,
                total_blocks: 100,
                free_blocks: 30,
                max_model_len: 8192,
                requests_received: 1,
                cached_evictable_blocks: 20,
                events: vec![kvroute_routing::CacheEvent::Stored((1..=20).collect())],
                ..Report::default()
            },
        );
        keeper();
        drop(first);
        // A stranger needing 20 blocks sees 10: it waits.
        let stranger = PromptPlan {
            block_hashes: (101..=120).collect(),
            ..plan("m", 320)
        };
        let waiting = spawn_admit(&r, stranger, Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        // The next turn (its prompt continues the first's) is not kept out: it is routed.
        let next = PromptPlan {
            block_hashes: (1..=22).collect(),
            ..plan("m", 352)
        };
        let routed = tokio::time::timeout(Duration::from_secs(30), admit_now(&r, next))
            .await
            .expect("the next turn is not kept waiting");
        assert_eq!(routed.route.slot, a);
        // When it ends it keeps the room it frees: its need, its cached history included (the
        // agent counts evictable cached blocks as free), not that history a second time.
        assert_eq!(routed.route.cached_blocks, 20);
        assert_eq!(
            routed.keep.map(|(_, blocks)| blocks),
            Some(routed.route.need_blocks)
        );
        assert!(!waiting.is_finished());
        waiting.abort();
        // Without a window nothing is kept.
        let r = router();
        let a = agent(&r, "a", "m", 30);
        let first = admit_now(&r, plan("m", 320)).await;
        assert_eq!(first.route.slot, a);
        assert!(first.finish_keeper().is_none());
    }

    #[tokio::test]
    async fn a_waiting_request_does_not_hold_back_another_models() {
        let r = router();
        let a = agent(&r, "a", "A", 10);
        agent(&r, "b", "B", 100);
        // 20 blocks on an agent with 10 free: waits, at high priority, at the head.
        let big = spawn_admit(&r, plan("A", 320), Vec::new(), Priority::HIGH);
        until_depth(&r, 1).await;
        // A later, lower-priority request for B goes ahead at once.
        let got = r
            .admit(
                plan("B", 16),
                Vec::new(),
                Priority::LOW,
                "u",
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        assert_eq!(got.endpoint, "b:8000");
        // A later request for A fits in A's 10 free blocks but must not take the room the
        // earlier one waits for: it queues behind it.
        let small = spawn_admit(&r, plan("A", 16), Vec::new(), Priority::NORMAL);
        until_depth(&r, 2).await;
        assert!(!big.is_finished() && !small.is_finished());
        // Room for the big one only: it goes first, the small one still waits.
        report(&r, a, "a", "A", 20);
        let admitted = big.await.unwrap().unwrap();
        assert_eq!(admitted.route.need_blocks, 20);
        until_depth(&r, 1).await;
        assert!(!small.is_finished());
        report(&r, a, "a", "A", 100);
        assert_eq!(small.await.unwrap().unwrap().endpoint, "a:8000");
        until_depth(&r, 0).await;
    }

    /// Agent "b", as busy as [`busy_a`] with `free` blocks free and nothing cached.
    fn busy_b(r: &Arc<Router>, free: u64) -> Slot {
        let b = r.add_agent("b:8000");
        r.on_report(
            b,
            Report {
                agent_id: "b".into(),
                snapshot: true,
                ..busy_a(free, Vec::new())
            },
        );
        b
    }

    /// Agent "a" serving "M" with 4 requests running, measured rates, `free` blocks free and
    /// `stored` newly cached.
    fn busy_a(free: u64, stored: Vec<u64>) -> Report {
        Report {
            agent_id: "a".into(),
            epoch: 1,
            model: "M".into(),
            block_size: 16,
            total_blocks: 100,
            free_blocks: free,
            max_model_len: 8192,
            running_requests: 4,
            prefill_tokens_per_s: 300,
            decode_step_us: 20_000,
            decode_batch: 4,
            events: vec![kvroute_routing::CacheEvent::Stored(stored)],
            ..Report::default()
        }
    }

    #[tokio::test]
    async fn kv_holds_a_request_for_the_agent_caching_its_prefix() {
        let r = router();
        let prefix: Vec<u64> = (1..=15).collect();
        let a = r.add_agent("a:8000");
        r.on_report(
            a,
            Report {
                snapshot: true,
                ..busy_a(0, prefix.clone())
            },
        );
        busy_b(&r, 100);
        let mut p = plan("M", 256);
        p.output_tokens = 32;
        p.block_hashes = prefix.clone();
        // a has no room but caches all 15 blocks; b, as busy, has room and nothing cached: it
        // waits for a.
        let held = spawn_admit(&r, p, Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        assert!(!held.is_finished());
        assert!(r
            .metrics
            .render(&[])
            .contains("kvroute_gateway_held_total 1"));
        // a makes room: the request goes there, needing only its own output blocks.
        r.on_report(a, busy_a(10, Vec::new()));
        let got = held.await.unwrap().unwrap();
        assert_eq!(got.endpoint, "a:8000");
        assert_eq!(got.route.cached_blocks, 15);
        assert!(got.route.predicted_ttft_s > 0.0);
        until_depth(&r, 0).await;
    }

    async fn next(
        actions: &mut tokio::sync::mpsc::UnboundedReceiver<HoldAction>,
    ) -> Option<HoldAction> {
        tokio::time::timeout(Duration::from_secs(10), actions.recv())
            .await
            .unwrap_or(None)
    }

    #[tokio::test]
    async fn a_request_waiting_for_its_prefix_asks_the_agent_to_keep_it() {
        let r = router();
        let mut actions = r.take_hold_actions().unwrap();
        assert!(r.take_hold_actions().is_none());
        let prefix: Vec<u64> = (1..=15).collect();
        // All 15 cached blocks evictable (no request uses them).
        let at = |free: u64, stored: Vec<u64>| Report {
            cached_evictable_blocks: 15,
            ..busy_a(free, stored)
        };
        let a = r.add_agent("a:8000");
        r.on_report(
            a,
            Report {
                snapshot: true,
                ..at(2, prefix.clone())
            },
        );
        let b = busy_b(&r, 100);
        let request = |blocks: usize| {
            let mut p = plan("M", 256);
            p.output_tokens = 32;
            p.block_hashes = prefix[..blocks].to_vec();
            p
        };
        // a caches all 15 blocks, none in use (evictable), and has 2 blocks free, no room for
        // the request's 18: it waits for a and asks a to keep its prefix, taking at most 2 free
        // blocks for it.
        let held = spawn_admit(&r, request(15), Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        let Some(HoldAction::Place {
            entry,
            ask,
            slot,
            endpoint,
            block_hashes,
            max_free,
            ttl,
        }) = next(&mut actions).await
        else {
            panic!("no hold asked for");
        };
        assert_eq!((slot, endpoint.as_str()), (a, "a:8000"));
        assert_eq!(block_hashes, prefix);
        assert_eq!(max_free, 2);
        assert!(ttl >= Duration::from_secs(1) && ttl <= MAX_HOLD, "{ttl:?}");
        // Asked once, not again on every report while it waits.
        r.on_report(a, at(2, Vec::new()));
        assert!(actions.try_recv().is_err());
        r.hold_placed(entry, ask, endpoint, 77, 2);
        assert!(r
            .metrics
            .render(&[])
            .contains("kvroute_gateway_prefix_holds_total 1"));
        // Room on a: it goes there naming the hold, which the agent lets go; nothing to release.
        r.on_report(a, at(20, Vec::new()));
        let got = held.await.unwrap().unwrap();
        assert_eq!((got.endpoint.as_str(), got.hold), ("a:8000", Some(77)));
        assert!(actions.try_recv().is_err());
        drop(got);

        // A held request whose client leaves releases its hold.
        r.on_report(a, at(1, Vec::new()));
        let gone = spawn_admit(&r, request(15), Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        let Some(HoldAction::Place {
            entry,
            ask,
            max_free: 1,
            ..
        }) = next(&mut actions).await
        else {
            panic!("no hold asked for");
        };
        r.hold_placed(entry, ask, "a:8000".into(), 78, 1);
        gone.abort();
        let _ = gone.await;
        // The pump task's next look finds the client gone.
        r.on_report(a, at(1, Vec::new()));
        r.pump_now();
        until_depth(&r, 0).await;
        assert_eq!(
            next(&mut actions).await,
            Some(HoldAction::Release {
                endpoint: "a:8000".into(),
                id: 78,
                ask: None,
            })
        );

        // One that leaves before the agent answers: until the answer, the block the hold may
        // take counts as taken, so a 1-block request that only a may serve waits.
        let gone = spawn_admit(&r, request(15), Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        let Some(HoldAction::Place {
            entry,
            ask,
            max_free: 1,
            ..
        }) = next(&mut actions).await
        else {
            panic!("no hold asked for");
        };
        gone.abort();
        let _ = gone.await;
        // The pump task's next look finds the client gone.
        r.on_report(a, at(1, Vec::new()));
        r.pump_now();
        until_depth(&r, 0).await;
        let small = spawn_admit(&r, plan("M", 16), vec![b], Priority::NORMAL);
        until_depth(&r, 1).await;
        // The hold was placed after all: released at once, and the block is counted taken
        // until the release is done.
        r.hold_placed(entry, ask, "a:8000".into(), 79, 1);
        assert_eq!(
            next(&mut actions).await,
            Some(HoldAction::Release {
                endpoint: "a:8000".into(),
                id: 79,
                ask: Some(ask),
            })
        );
        r.on_report(a, at(1, Vec::new()));
        assert_eq!(r.queue().depth, 1);
        assert!(!small.is_finished());
        r.stray_hold_released(ask);
        assert_eq!(small.await.unwrap().unwrap().endpoint, "a:8000");
    }

    #[tokio::test]
    async fn a_refused_hold_is_asked_again_only_later_and_never_of_an_agent_without_holds() {
        let r = router();
        let mut actions = r.take_hold_actions().unwrap();
        let prefix: Vec<u64> = (1..=15).collect();
        let at = |free: u64| Report {
            cached_evictable_blocks: 15,
            snapshot: true,
            ..busy_a(free, prefix.clone())
        };
        let a = r.add_agent("a:8000");
        r.on_report(a, at(2));
        let mut p = plan("M", 256);
        p.output_tokens = 32;
        p.block_hashes = prefix.clone();
        let waiting = spawn_admit(&r, p, Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        let Some(HoldAction::Place { entry, ask, .. }) = next(&mut actions).await else {
            panic!("no hold asked for");
        };
        r.hold_refused(entry, ask, false);
        // Reports keep coming: not asked again at once...
        r.on_report(a, at(2));
        assert!(actions.try_recv().is_err());
        // ...but after HOLD_RETRY, on the pump task's next look (a report that opens no room
        // does not look at the queue).
        tokio::time::sleep(HOLD_RETRY + Duration::from_millis(50)).await;
        r.on_report(a, at(2));
        r.pump_now();
        let Some(HoldAction::Place { entry, ask, .. }) = next(&mut actions).await else {
            panic!("no hold asked for again");
        };
        // An agent without the hold API is not asked again, until its next epoch.
        r.hold_refused(entry, ask, true);
        tokio::time::sleep(HOLD_RETRY + Duration::from_millis(50)).await;
        r.on_report(a, at(2));
        r.pump_now();
        assert!(actions.try_recv().is_err());
        r.on_report(a, Report { epoch: 2, ..at(2) });
        tokio::time::sleep(HOLD_RETRY + Duration::from_millis(50)).await;
        r.on_report(a, Report { epoch: 2, ..at(2) });
        r.pump_now();
        assert!(matches!(
            next(&mut actions).await,
            Some(HoldAction::Place { .. })
        ));
        waiting.abort();
    }

    /// One agent with no room that caches `prefix`; a request of 20 uncached blocks queued first,
    /// then one whose 15-block prefix is cached, then room for the cached one only. Returns the
    /// two admissions.
    async fn room_for_one_after_two_queued(
        cache_first_ms: u64,
        ttft_slo_ms: u64,
        gap: Duration,
    ) -> (
        tokio::task::JoinHandle<Result<Admitted, AdmitError>>,
        tokio::task::JoinHandle<Result<Admitted, AdmitError>>,
        Arc<Router>,
    ) {
        let cfg = GatewayConfig::for_agents("127.0.0.1:0".parse().unwrap(), Vec::new());
        let mut defaults = cfg.model_defaults();
        defaults.policy.cache_first_ms = cache_first_ms;
        defaults.policy.ttft_slo_ms = ttft_slo_ms;
        let r = Arc::new(Router::new(defaults, 1, Arc::new(Metrics::new("kv"))));
        let prefix: Vec<u64> = (1..=15).collect();
        let a = r.add_agent("a:8000");
        let at = |free: u64, stored: Vec<u64>| Report {
            agent_id: "a".into(),
            epoch: 1,
            model: "M".into(),
            block_size: 16,
            total_blocks: 100,
            free_blocks: free,
            max_model_len: 8192,
            snapshot: true,
            events: vec![kvroute_routing::CacheEvent::Stored(stored)],
            ..Report::default()
        };
        r.on_report(a, at(0, prefix.clone()));
        let uncached = spawn_admit(&r, plan("M", 320), Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        tokio::time::sleep(gap).await;
        let mut p = plan("M", 256);
        p.output_tokens = 32;
        p.block_hashes = prefix.clone();
        let cached = spawn_admit(&r, p, Vec::new(), Priority::NORMAL);
        until_depth(&r, 2).await;
        r.on_report(a, at(10, prefix));
        (uncached, cached, r)
    }

    #[tokio::test]
    async fn kv_serves_a_queued_request_with_a_cached_prefix_before_an_older_uncached_one() {
        let (uncached, cached, r) = room_for_one_after_two_queued(60_000, 0, Duration::ZERO).await;
        let got = cached.await.unwrap().unwrap();
        assert_eq!(got.route.cached_blocks, 15);
        until_depth(&r, 1).await;
        assert!(!uncached.is_finished());
    }

    #[tokio::test]
    async fn without_a_cache_first_window_the_queue_keeps_arrival_order() {
        // The older request holds the room it waits for; the cached one stays behind it.
        let (uncached, cached, r) = room_for_one_after_two_queued(0, 0, Duration::ZERO).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.queue().depth, 2);
        assert!(!uncached.is_finished() && !cached.is_finished());
    }

    #[tokio::test]
    async fn a_request_waiting_past_its_cache_first_window_is_passed_no_more() {
        let (uncached, cached, r) =
            room_for_one_after_two_queued(50, 0, Duration::from_millis(120)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.queue().depth, 2);
        assert!(!uncached.is_finished() && !cached.is_finished());
    }

    #[tokio::test]
    async fn a_request_past_its_ttft_target_is_served_after_one_that_can_still_meet_it() {
        // As above, but the older request has waited past the 100 ms target: it is late
        // anyway, and the younger one takes the room (in arrival order it would wait too).
        let (uncached, cached, r) =
            room_for_one_after_two_queued(50, 100, Duration::from_millis(120)).await;
        let got = cached.await.unwrap().unwrap();
        assert_eq!(got.route.cached_blocks, 15);
        until_depth(&r, 1).await;
        assert!(!uncached.is_finished());
    }

    #[tokio::test]
    async fn a_never_fitting_request_behind_a_waiting_one_is_rejected_at_once() {
        let r = router();
        agent(&r, "a", "A", 10);
        let waiting = spawn_admit(&r, plan("A", 320), Vec::new(), Priority::HIGH);
        until_depth(&r, 1).await;
        // Larger than the 100-block pool: 400 at once, not a 429 at its deadline.
        let got = r
            .admit(
                plan("A", 16 * 200),
                Vec::new(),
                Priority::NORMAL,
                "u",
                Duration::from_secs(600),
            )
            .await;
        assert!(
            matches!(got, Err(AdmitError::Reject(Reject::PromptTooLarge { .. }))),
            "{got:?}"
        );
        assert!(!waiting.is_finished());
        waiting.abort();
    }

    #[tokio::test]
    async fn a_waiting_request_claims_only_the_agents_it_could_use() {
        let r = router();
        let a1 = agent(&r, "a1", "A", 100);
        agent(&r, "a2", "A", 5);
        // A retry that excludes a1 waits for a2.
        let retry = spawn_admit(&r, plan("A", 160), vec![a1], Priority::NORMAL);
        until_depth(&r, 1).await;
        // Another request for A that a1 can serve is not held back by it.
        let got = r
            .admit(
                plan("A", 160),
                Vec::new(),
                Priority::NORMAL,
                "u",
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        assert_eq!(got.endpoint, "a1:8000");
        assert!(!retry.is_finished());
        retry.abort();
    }

    #[tokio::test]
    async fn per_model_settings_bound_each_models_queue() {
        let r = router();
        let a = agent(&r, "a", "A", 0);
        agent(&r, "b", "B", 0);
        agent(&r, "c", "C", 100);
        let specs = BTreeMap::from([
            (
                "A".to_string(),
                ModelSpecSettings {
                    routing: None,
                    admission: Some(AdmissionSpec {
                        max_queue: Some(0),
                        ..AdmissionSpec::default()
                    }),
                },
            ),
            (
                "C".to_string(),
                ModelSpecSettings {
                    routing: Some(RoutingSpec {
                        policy: RoutingPolicy::RoundRobin,
                        weights: None,
                        scorers: None,
                        slo: None,
                    }),
                    admission: None,
                },
            ),
        ]);
        r.set_model_settings(&specs);
        assert_eq!(r.settings("A").max_queue, 0);
        assert_eq!(r.settings("B"), r.defaults);
        assert_eq!(r.settings("C").policy.kind, PolicyKind::RoundRobin);
        // A may queue nothing: a request without room is refused at once ...
        let refused = r
            .admit(
                plan("A", 16),
                Vec::new(),
                Priority::NORMAL,
                "t",
                Duration::from_secs(600),
            )
            .await;
        assert_eq!(refused.unwrap_err(), AdmitError::QueueFull);
        // ... while B (the default bound) queues.
        let waiting = spawn_admit(&r, plan("B", 16), Vec::new(), Priority::NORMAL);
        until_depth(&r, 1).await;
        assert!(!waiting.is_finished());
        // With room, A still routes (a bound of 0 only refuses waiting).
        report(&r, a, "a", "A", 100);
        let ok = r
            .admit(
                plan("A", 16),
                Vec::new(),
                Priority::NORMAL,
                "t",
                Duration::from_secs(600),
            )
            .await;
        assert_eq!(ok.unwrap().endpoint, "a:8000");
        waiting.abort();
    }
}
