//! The discrete-event loop: requests arrive at gateways, which decide with the real routing
//! pipeline ([`Cluster::decide`]) over the capacity reports they have received and queue in the
//! real admission queue; agents run the real scheduler and KV block manager
//! ([`Scheduler`]) and take the time the step model gives each planned step.
//!
//! Time is integer nanoseconds; events at the same time run in the order they were scheduled, so
//! a configuration and seed give the same result on every run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use kvroute_engine::kv::{block_hashes, BlockEvent};
use kvroute_engine::runtime::StepSpeed;
use kvroute_engine::sched::{SchedConfig, Scheduler, SeqSpec};
use kvroute_routing::admission::{AdmissionQueue, EntryId, Priority};
use kvroute_routing::cluster::REPUMP_MS;
use kvroute_routing::{
    CacheEvent, Cluster, Decision, PolicyConfig, PolicyKind, Report, RouteRequest, Slot, SplitMix64,
};

use crate::config::Resolved;
use crate::step::{StepModel, StepShape};
use crate::workload::{answer_token, prompt_tokens, Generator, RequestSpec};

const MODEL: &str = "sim";
const NS: f64 = 1e9;

fn ns(s: f64) -> u64 {
    (s * NS).round().max(0.0) as u64
}

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Done,
    /// The gateway's queue was full (429).
    QueueFull,
    /// It waited past the queue timeout (429).
    QueueTimeout,
    /// No agent could ever serve it (400).
    Rejected,
}

/// One request's life.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub spec: RequestSpec,
    pub prompt_tokens: u32,
    pub arrival_ns: u64,
    pub dispatched_ns: u64,
    pub first_token_ns: u64,
    pub done_ns: u64,
    pub cached_tokens: u32,
    /// Tokens generated (the spec's, or fewer where the agent's length cap ended it).
    pub output_tokens: u32,
    pub preemptions: u32,
    pub agent: u32,
    pub gateway: u32,
    pub predicted_ttft_s: f64,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A first-turn request from the generator or the trace (index into the records).
    Arrive(u32),
    /// Agent `0`'s step ends.
    Step(u32),
    /// Agent `0` may report.
    ReportDue(u32),
    /// Report `2` (index into the mailbox) of agent `1` reaches gateway `0`.
    Deliver(u32, u32, u32),
    /// Request `1` reaches agent `0`, dispatched by gateway `2` under dispatch id `3`.
    Dispatch(u32, u32, u32, u64),
    /// Gateway `0` looks at its queue.
    Pump(u32),
    /// Gateway `0`'s pump task wakes on its own ([`REPUMP_MS`] after its last look).
    Tick(u32),
    /// Sample KV utilisation.
    Sample,
}

/// A sequence running on an agent.
#[derive(Debug, Clone, Copy)]
struct SeqRun {
    req: u32,
    prompt_len: u32,
    produced: u32,
    target: u32,
    seed: u64,
    /// The gateway and the agent's slot in its view (for the TTFT calibration).
    gateway: u32,
}

struct Agent {
    sched: Scheduler,
    seqs: HashMap<u64, SeqRun>,
    busy: bool,
    /// Sequences sampled by the step running now.
    sampled: Vec<u64>,
    step_start_ns: u64,
    /// Dispatches taken in since the last report, per gateway.
    acks: Vec<Vec<u64>>,
    room_released: u64,
    sequence: u64,
    dirty: bool,
    last_report_ns: u64,
    busy_ns_since_report: u64,
    /// The agent's own measure of its speed (the engine's: what a real agent reports).
    speed: StepSpeed,
    snapshot_sent: bool,
}

impl Agent {
    fn room(&self) -> u64 {
        let s = self.sched.stats();
        s.capacity.free.saturating_sub(s.committed_blocks as u64)
    }
}

/// A request waiting in a gateway's queue.
struct Waiter {
    req: u32,
    hashes: Vec<u64>,
    tokens: Vec<u32>,
    queued_ns: u64,
    home: Option<Slot>,
}

struct Gateway {
    cluster: Cluster,
    /// Agent index → slot in this gateway's view, and back.
    slot_of: Vec<Slot>,
    agent_of: Vec<u32>,
    queue: AdmissionQueue<Waiter>,
    order: Vec<EntryId>,
    pass: kvroute_routing::queue::QueuePass,
    rng: SplitMix64,
    pump_at: Option<u64>,
    /// When the last pass over the queue ran.
    last_pump: Option<u64>,
    /// When the next backstop look at the queue is due ([`REPUMP_MS`]), if one is scheduled.
    tick_at: Option<u64>,
}

/// Counters of one run.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub decisions: u64,
    pub decision_wall_ns: u64,
    pub reports: u64,
    pub steps: u64,
    pub events: u64,
    /// (simulated seconds, mean KV use over agents (0..1), most-used agent's use, queued
    /// requests over all gateways).
    pub kv_timeline: Vec<(f64, f64, f64, u64)>,
    pub preemptions: u64,
}

/// The result of one policy's run.
pub struct RunResult {
    pub policy: PolicyKind,
    pub records: Vec<RequestRecord>,
    pub stats: RunStats,
    pub sim_ns: u64,
    pub wall_s: f64,
}

struct Sim<'a> {
    r: &'a Resolved,
    policy: PolicyConfig,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    agents: Vec<Agent>,
    gateways: Vec<Gateway>,
    records: Vec<RequestRecord>,
    /// Tokens of requests on their way to an agent.
    in_transit: HashMap<u32, Vec<u32>>,
    /// A session's earlier turns (prompt after the shared prefix, and answers).
    history: HashMap<u64, Vec<u32>>,
    mailbox: Vec<Option<Report>>,
    mailbox_free: Vec<u32>,
    generator: Option<Generator>,
    trace: Option<&'a [RequestSpec]>,
    next_first: u64,
    first_turns: u64,
    /// Arrivals scheduled and not yet happened.
    arrivals_ahead: u64,
    /// Closed loop: first turns to start once the current event is handled.
    starts_due: u32,
    /// `kv_cost.keep_finished_s` in ns (0: off), and what each routed request would keep: its
    /// prompt's last full block and its blocks ([`QueuePass::keep`]).
    keep_ns: u64,
    keep_info: HashMap<u32, (u64, u64)>,
    /// Closed loop: when it starts (ns): once every agent has reported, as a benchmark client
    /// starts once the servers are ready. Started at 0, every first request of the loop would
    /// go to the one agent that reported first, and a policy that follows prefixes would keep
    /// every group there.
    loop_start_ns: u64,
    /// Requests created and not yet ended (checked after every event: a counter, not a walk
    /// over the agents).
    open: u64,
    next_gateway: u32,
    stats: RunStats,
    step: &'a StepModel,
}

/// Runs `r`'s workload under `policy`.
pub fn run(r: &Resolved, policy: PolicyKind) -> Result<RunResult, String> {
    let started = Instant::now();
    let cfg = &r.cfg;
    let a = &cfg.agents;
    let sched_cfg = SchedConfig {
        block_size: a.block_size as usize,
        num_blocks: r.kv_blocks as usize,
        max_num_seqs: a.max_num_seqs as usize,
        max_num_batched_tokens: a.max_num_batched_tokens as usize,
        max_model_len: a.max_model_len as usize,
        enable_chunked_prefill: true,
        enable_prefix_caching: true,
        enable_events: true,
        admit_whole_future: a.admit_whole_future,
        share_inflight_prefixes: true,
    };
    let replicas = cfg.gateways.replicas as usize;
    let mut agents = Vec::with_capacity(a.count as usize);
    for _ in 0..a.count {
        agents.push(Agent {
            sched: Scheduler::new(sched_cfg.clone()).map_err(|e| format!("agents: {e}"))?,
            seqs: HashMap::new(),
            busy: false,
            sampled: Vec::new(),
            step_start_ns: 0,
            acks: vec![Vec::new(); replicas],
            room_released: 0,
            sequence: 0,
            dirty: true,
            last_report_ns: 0,
            busy_ns_since_report: 0,
            speed: StepSpeed::default(),
            snapshot_sent: false,
        });
    }
    let policy_cfg = PolicyConfig {
        kind: policy,
        cost: cfg.kv_cost.weights(),
        tpot_slo_s: cfg.kv_cost.tpot_slo_s.unwrap_or(0.0),
        ttft_slo_ms: (cfg.kv_cost.ttft_slo_s.unwrap_or(0.0) * 1000.0) as u64,
        cache_first_ms: cfg
            .kv_cost
            .cache_first_s
            .map_or(PolicyConfig::default().cache_first_ms, |s| {
                (s * 1000.0) as u64
            }),
        scorers: if policy == PolicyKind::Kv {
            r.kv_scorers
        } else {
            None
        },
        ..PolicyConfig::default()
    };
    let mut gateways = Vec::with_capacity(replicas);
    for g in 0..replicas {
        let mut cluster = Cluster::new();
        let slot_of: Vec<Slot> = (0..a.count)
            .map(|i| cluster.upsert_agent(&format!("agent-{i}")))
            .collect();
        let mut agent_of = vec![0u32; slot_of.iter().max().map_or(0, |m| m + 1)];
        for (i, &s) in slot_of.iter().enumerate() {
            agent_of[s] = i as u32;
        }
        gateways.push(Gateway {
            cluster,
            slot_of,
            agent_of,
            queue: AdmissionQueue::new(cfg.gateways.max_queue as usize),
            order: Vec::new(),
            pass: Default::default(),
            rng: SplitMix64(cfg.seed ^ (g as u64).wrapping_mul(0x5555_5555_5555_5555)),
            pump_at: None,
            last_pump: None,
            tick_at: None,
        });
    }
    let (generator, first_turns) = match (&cfg.workload, &r.trace) {
        (_, Some(t)) => (None, t.len() as u64),
        (Some(w), None) => {
            // With sessions, each arrival starts a session of `turns` requests.
            let turns = w.sessions.map_or(1, |s| u64::from(s.turns));
            (
                Some(Generator::new(w, cfg.seed)),
                w.requests.div_ceil(turns),
            )
        }
        (None, None) => return Err("no workload".into()),
    };
    let mut sim = Sim {
        r,
        policy: policy_cfg,
        now: 0,
        seq: 0,
        heap: BinaryHeap::new(),
        agents,
        gateways,
        records: Vec::new(),
        in_transit: HashMap::new(),
        history: HashMap::new(),
        mailbox: Vec::new(),
        mailbox_free: Vec::new(),
        generator,
        trace: r.trace.as_deref(),
        next_first: 0,
        first_turns,
        arrivals_ahead: 0,
        starts_due: 0,
        keep_ns: if policy == PolicyKind::Kv {
            ns(cfg
                .kv_cost
                .keep_finished_s
                .unwrap_or(kvroute_routing::queue::DEFAULT_KEEP_FINISHED_MS as f64 / 1e3))
        } else {
            0
        },
        keep_info: HashMap::new(),
        loop_start_ns: ns((cfg.gateways.report_interval_ms + cfg.gateways.report_delay_ms) / 1e3)
            + 1,
        open: 0,
        next_gateway: 0,
        stats: RunStats::default(),
        step: &r.step,
    };
    // A closed loop starts its first requests (or sessions) at once; otherwise each arrival
    // schedules the next.
    let start = cfg
        .workload
        .as_ref()
        .filter(|_| r.trace.is_none())
        .and_then(|w| w.arrival.in_flight())
        .unwrap_or(1);
    for _ in 0..start {
        sim.schedule_next_first()?;
    }
    // Stagger the agents' first reports over one interval.
    let interval = ns(cfg.gateways.report_interval_ms / 1e3).max(1);
    for i in 0..a.count {
        let at = interval * u64::from(i) / u64::from(a.count);
        sim.push(at, Event::ReportDue(i));
    }
    sim.push(0, Event::Sample);
    sim.run_loop()?;
    let stats = std::mem::take(&mut sim.stats);
    Ok(RunResult {
        policy,
        records: sim.records,
        stats,
        sim_ns: sim.now,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

impl Sim<'_> {
    fn push(&mut self, at: u64, e: Event) {
        if matches!(e, Event::Arrive(_)) {
            self.arrivals_ahead += 1;
        }
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, e)));
    }

    /// Schedules the next first-turn arrival, if any are left.
    fn schedule_next_first(&mut self) -> Result<(), String> {
        if self.next_first >= self.first_turns {
            return Ok(());
        }
        let spec = match (self.trace, &mut self.generator) {
            (Some(t), _) => t[self.next_first as usize],
            (None, Some(g)) => {
                let mut spec = g.next_request();
                if self.closed_loop() {
                    spec.arrival_s = self.now.max(self.loop_start_ns) as f64 / NS;
                }
                spec
            }
            (None, None) => return Err("no workload".into()),
        };
        self.next_first += 1;
        let idx = self.new_record(spec)?;
        self.push(ns(spec.arrival_s).max(self.now), Event::Arrive(idx));
        Ok(())
    }

    fn new_record(&mut self, spec: RequestSpec) -> Result<u32, String> {
        let idx = u32::try_from(self.records.len())
            .map_err(|_| "more than 4 billion requests".to_string())?;
        self.open += 1;
        self.records.push(RequestRecord {
            spec,
            prompt_tokens: 0,
            arrival_ns: ns(spec.arrival_s),
            dispatched_ns: 0,
            first_token_ns: 0,
            done_ns: 0,
            cached_tokens: 0,
            output_tokens: 0,
            preemptions: 0,
            agent: u32::MAX,
            gateway: 0,
            predicted_ttft_s: 0.0,
            outcome: Outcome::Pending,
        });
        Ok(idx)
    }

    /// Whether first turns start when others end (a closed loop) rather than on their own.
    fn closed_loop(&self) -> bool {
        self.trace.is_none()
            && self
                .r
                .cfg
                .workload
                .as_ref()
                .is_some_and(|w| w.arrival.in_flight().is_some())
    }

    /// In a closed loop, a request (or session) ended: the next one starts now (after the event
    /// being handled, see [`Sim::run_loop`]).
    fn ended_in_loop(&mut self) {
        if self.closed_loop() {
            self.starts_due += 1;
        }
    }

    /// Whether nothing is left to happen besides periodic events.
    fn finished(&self) -> bool {
        self.next_first >= self.first_turns && self.arrivals_ahead == 0 && self.open == 0
    }

    fn run_loop(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let mut told = 0u64;
        while let Some(Reverse((t, _, e))) = self.heap.pop() {
            self.now = t;
            self.stats.events += 1;
            if self.stats.events.is_multiple_of(256) {
                let secs = started.elapsed().as_secs();
                if secs >= told + 10 {
                    told = secs;
                    let done = self
                        .records
                        .iter()
                        .filter(|r| r.outcome != Outcome::Pending)
                        .count();
                    eprintln!(
                        "  {}: {:.1} s simulated in {secs} s; {done} of {} requests ended, {} queued, {} on agents, {} decisions",
                        self.policy.kind.as_str(),
                        t as f64 / NS,
                        self.records.len(),
                        self.gateways.iter().map(|g| g.queue.len()).sum::<usize>(),
                        self.agents.iter().map(|a| a.seqs.len()).sum::<usize>(),
                        self.stats.decisions,
                    );
                }
            }
            match e {
                Event::Arrive(idx) => {
                    self.arrivals_ahead -= 1;
                    self.arrive(idx)?;
                    if self.records[idx as usize].spec.turn == 0 && !self.closed_loop() {
                        self.schedule_next_first()?;
                    }
                }
                Event::Step(a) => self.step_done(a)?,
                Event::ReportDue(a) => self.report_due(a),
                Event::Deliver(g, a, m) => self.deliver(g, a, m),
                Event::Dispatch(a, req, g, id) => self.dispatch(a, req, g, id)?,
                Event::Pump(g) => {
                    self.gateways[g as usize].pump_at = None;
                    self.pump(g);
                }
                Event::Tick(g) => self.tick(g),
                Event::Sample => {
                    self.sample();
                    if !self.finished() {
                        self.push(t + ns(self.r.cfg.sample_s), Event::Sample);
                    }
                }
            }
            while self.starts_due > 0 {
                self.starts_due -= 1;
                self.schedule_next_first()?;
            }
            if self.finished() {
                break;
            }
        }
        Ok(())
    }

    fn arrive(&mut self, idx: u32) -> Result<(), String> {
        let g = self.next_gateway;
        self.next_gateway = (self.next_gateway + 1) % self.gateways.len() as u32;
        let spec = self.records[idx as usize].spec;
        let history = self
            .history
            .get(&spec.session)
            .map_or(&[][..], Vec::as_slice);
        let tokens = prompt_tokens(&spec, history);
        let bs = self.r.cfg.agents.block_size as usize;
        let hashes: Vec<u64> = block_hashes(&tokens, bs, &[]);
        let rec = &mut self.records[idx as usize];
        rec.prompt_tokens = tokens.len() as u32;
        rec.gateway = g;
        let w = Waiter {
            req: idx,
            hashes,
            tokens,
            queued_ns: self.now,
            home: None,
        };
        let gw = &mut self.gateways[g as usize];
        if gw.queue.push(Priority::NORMAL, "", w).is_err() {
            self.end(idx, Outcome::QueueFull);
            return Ok(());
        }
        self.want_pump(g);
        Ok(())
    }

    /// Ends request `idx` at the gateway (never served); a session ends with it.
    fn end(&mut self, idx: u32, outcome: Outcome) {
        self.open = self.open.saturating_sub(1);
        let rec = &mut self.records[idx as usize];
        rec.outcome = outcome;
        rec.done_ns = self.now;
        let session = rec.spec.session;
        self.history.remove(&session);
        self.keep_info.remove(&idx);
        // A refused or timed-out turn ends its session.
        self.ended_in_loop();
    }

    /// Asks gateway `g` to look at its queue: at once, or, within `pump_interval_ms` of its
    /// last look, when that interval ends (wake-ups in between are coalesced, as the gateway's
    /// pump task coalesces its notifications while it works).
    fn want_pump(&mut self, g: u32) {
        let interval = ns(self.r.cfg.gateways.pump_interval_ms / 1e3);
        let gw = &mut self.gateways[g as usize];
        if gw.pump_at.is_some() || gw.queue.is_empty() {
            return;
        }
        let at = gw
            .last_pump
            .map_or(self.now, |l| (l + interval).max(self.now));
        if at == self.now {
            self.pump(g);
        } else {
            gw.pump_at = Some(at);
            self.push(at, Event::Pump(g));
        }
    }

    /// The pump task's own wake-up: a look at a queue nothing woke for `REPUMP_MS`, as the
    /// gateway's pump task does (queue deadlines, and changes no report shows as new room).
    fn tick(&mut self, g: u32) {
        let repump = ns(REPUMP_MS as f64 / 1e3);
        let gw = &mut self.gateways[g as usize];
        gw.tick_at = None;
        if gw.queue.is_empty() {
            return;
        }
        let due = gw.last_pump.map_or(self.now, |l| l + repump);
        if due <= self.now {
            self.want_pump(g);
        } else {
            self.schedule_tick(g, due);
        }
    }

    fn schedule_tick(&mut self, g: u32, at: u64) {
        let gw = &mut self.gateways[g as usize];
        if gw.tick_at.is_none() && !gw.queue.is_empty() {
            gw.tick_at = Some(at);
            self.push(at, Event::Tick(g));
        }
    }

    /// The gateway's queue pass, as the gateway's router does it: requests in queue order
    /// (cache-first within the window for `kv`), each decided with the claims of the waiting
    /// requests before it and the room of the ones held for an agent; routed ones reserve room
    /// and go to their agent.
    fn pump(&mut self, g: u32) {
        self.gateways[g as usize].last_pump = Some(self.now);
        let now_ms = self.now / 1_000_000;
        let timeout = ns(self.r.cfg.gateways.queue_timeout_s);
        let max_queue = self.r.cfg.gateways.max_queue as usize;
        let net = ns(self.r.cfg.gateways.network_delay_ms / 1e3);
        let cfg = self.policy;
        // (request, agent, dispatch id, prompt, predicted TTFT, what it keeps when it ends)
        type Routed = (u32, u32, u64, Vec<u32>, f64, Option<(u64, u64)>);
        let mut routed: Vec<Routed> = Vec::new();
        let mut ended: Vec<(u32, Outcome)> = Vec::new();
        {
            let gw = &mut self.gateways[g as usize];
            let mut order = std::mem::take(&mut gw.order);
            gw.queue.order(&mut order);
            // Late ones last, and cache first within the window (as the gateway's pass).
            if cfg.kind == PolicyKind::Kv
                && (cfg.cache_first_ms > 0 || cfg.ttft_slo_ms > 0)
                && order.len() > 1
            {
                let mut ranked: Vec<(kvroute_routing::policy::QueueRank, EntryId)> =
                    Vec::with_capacity(order.len());
                for &id in &order {
                    let Some(w) = gw.queue.get(id) else {
                        continue;
                    };
                    let waited_ms = self.now.saturating_sub(w.queued_ns) / 1_000_000;
                    let cluster = &mut gw.cluster;
                    let rank = kvroute_routing::policy::queue_rank(&cfg, waited_ms, || {
                        cluster.local_prefix_blocks(MODEL, &w.hashes)
                    });
                    ranked.push((rank, id));
                }
                ranked.sort_by_key(|&(rank, _)| rank);
                order.clear();
                order.extend(ranked.iter().map(|r| r.1));
            }
            gw.pass.begin(gw.cluster.agents().len());
            gw.pass.hold_kept(now_ms);
            let queued = gw.queue.len();
            for &id in &order {
                let Some(w) = gw.queue.get(id) else {
                    continue;
                };
                if self.now.saturating_sub(w.queued_ns) > timeout {
                    if let Some(w) = gw.queue.remove(id) {
                        ended.push((w.req, Outcome::QueueTimeout));
                    }
                    continue;
                }
                if gw.pass.is_blocked(MODEL) {
                    continue;
                }
                let rec = &self.records[w.req as usize];
                let q = RouteRequest {
                    model: MODEL,
                    prompt_tokens: u64::from(rec.prompt_tokens),
                    output_tokens: u64::from(rec.spec.output_tokens),
                    block_size: self.r.cfg.agents.block_size,
                    block_hashes: &w.hashes,
                    exclude: &[],
                    claimed: &[],
                    held: &[],
                    may_hold: queued <= max_queue,
                    home: w.home,
                    waited_ms: self.now.saturating_sub(w.queued_ns) / 1_000_000,
                };
                let t = Instant::now();
                let d = gw
                    .pass
                    .decide(&mut gw.cluster, &cfg, &q, now_ms, &mut gw.rng)
                    .decision;
                self.stats.decisions += 1;
                self.stats.decision_wall_ns += t.elapsed().as_nanos() as u64;
                match d {
                    Decision::Wait => {}
                    Decision::Hold(route) => {
                        if let Some(w) = gw.queue.get_mut(id) {
                            w.home = Some(route.slot);
                        }
                    }
                    Decision::Reject(_) => {
                        if let Some(w) = gw.queue.remove(id) {
                            ended.push((w.req, Outcome::Rejected));
                        }
                    }
                    Decision::Route(route) => {
                        let handle = gw.cluster.dispatch(&cfg, &route, &w.hashes, now_ms);
                        let agent = gw.agent_of.get(route.slot).copied().unwrap_or(0);
                        if let Some(w) = gw.queue.remove(id) {
                            let keep = w.hashes.last().map(|&h| (h, route.need_blocks));
                            routed.push((
                                w.req,
                                agent,
                                handle.map_or(0, |h| h.id),
                                w.tokens,
                                route.predicted_ttft_s,
                                keep,
                            ));
                        }
                    }
                }
            }
            gw.order = order;
        }
        for (req, outcome) in ended {
            self.end(req, outcome);
        }
        self.schedule_tick(g, self.now + ns(REPUMP_MS as f64 / 1e3));
        for (req, agent, id, tokens, predicted, keep) in routed {
            if let Some(k) = keep.filter(|_| self.keep_ns > 0) {
                self.keep_info.insert(req, k);
            }
            let rec = &mut self.records[req as usize];
            rec.dispatched_ns = self.now;
            rec.agent = agent;
            rec.predicted_ttft_s = predicted;
            self.in_transit.insert(req, tokens);
            self.push(self.now + net, Event::Dispatch(agent, req, g, id));
        }
    }

    fn dispatch(&mut self, a: u32, req: u32, g: u32, id: u64) -> Result<(), String> {
        let tokens = self.in_transit.remove(&req).unwrap_or_default();
        let rec = &self.records[req as usize];
        let spec = rec.spec;
        let agent = &mut self.agents[a as usize];
        if let Some(acks) = agent.acks.get_mut(g as usize) {
            acks.push(id);
        }
        agent.dirty = true;
        let prompt_len = tokens.len() as u32;
        let added = agent.sched.add(SeqSpec {
            id: u64::from(req),
            prompt: tokens,
            max_tokens: spec.output_tokens,
            extra_key: Vec::new(),
        });
        if added.is_err() {
            // Longer than the agent serves: the gateway's filters should have kept it away.
            self.end(req, Outcome::Rejected);
            return Ok(());
        }
        agent.seqs.insert(
            u64::from(req),
            SeqRun {
                req,
                prompt_len,
                produced: 0,
                target: spec.output_tokens,
                seed: spec.seed,
                gateway: g,
            },
        );
        self.start_step(a);
        Ok(())
    }

    fn start_step(&mut self, a: u32) {
        let now = self.now;
        let agent = &mut self.agents[a as usize];
        if agent.busy {
            return;
        }
        let view = agent.sched.schedule();
        let plan = view.plan();
        if plan.is_empty() {
            return;
        }
        let mut shape = StepShape::default();
        agent.sampled.clear();
        for s in plan.seqs() {
            let prompt_len = agent.seqs.get(&s.id).map_or(0, |r| r.prompt_len as usize);
            if s.len == 1 && s.start >= prompt_len {
                shape.decode_seqs += 1;
            } else {
                shape.prefill_tokens += s.len as u64;
            }
            let (start, len) = (s.start as u64, s.len as u64);
            shape.context_tokens += start + len;
            shape.attention_pairs += len * start + len * (len + 1) / 2;
            if s.sample {
                agent.sampled.push(s.id);
            }
        }
        self.stats.preemptions += plan.preempted().len() as u64;
        for &id in plan.preempted() {
            if let Some(run) = agent.seqs.get(&id) {
                self.records[run.req as usize].preemptions += 1;
            }
        }
        let dt = self.step.step_s(&shape);
        // Decode-only steps feed the decode fit: their context is what the decode read.
        agent.speed.record(
            dt,
            shape.prefill_tokens as usize,
            shape.decode_seqs as usize,
            shape.context_tokens as usize,
        );
        agent.busy = true;
        agent.step_start_ns = now;
        self.stats.steps += 1;
        self.push(now + ns(dt).max(1), Event::Step(a));
    }

    fn step_done(&mut self, a: u32) -> Result<(), String> {
        let now = self.now;
        let mut finished: Vec<(u64, SeqRun)> = Vec::new();
        let mut first: Vec<SeqRun> = Vec::new();
        {
            let agent = &mut self.agents[a as usize];
            agent.busy = false;
            agent.busy_ns_since_report += now - agent.step_start_ns;
            agent.dirty = true;
            let mut sampled = Vec::with_capacity(agent.sampled.len());
            for &id in &agent.sampled {
                let Some(run) = agent.seqs.get_mut(&id) else {
                    continue;
                };
                sampled.push((id, answer_token(run.seed, u64::from(run.produced))));
                run.produced += 1;
                if run.produced == 1 {
                    first.push(*run);
                }
            }
            agent
                .sched
                .complete_step(&sampled)
                .map_err(|e| format!("agent {a}: {e}"))?;
            // Done: all its tokens, or as long as the agent lets a sequence grow (finish
            // reason "length").
            for &(id, _) in &sampled {
                let Some(run) = agent.seqs.get(&id) else {
                    continue;
                };
                if run.produced >= run.target || agent.sched.is_length_capped(id) == Some(true) {
                    finished.push((id, *run));
                }
            }
            let before = agent.room();
            for (id, _) in &finished {
                agent.seqs.remove(id);
                let usage = agent
                    .sched
                    .finish(*id)
                    .map_err(|e| format!("agent {a}: {e}"))?;
                let rec = &mut self.records[*id as usize];
                rec.cached_tokens = usage.cached_tokens as u32;
                rec.output_tokens = usage.output_tokens as u32;
            }
            agent.room_released += agent.room().saturating_sub(before);
        }
        for run in first {
            let rec = &mut self.records[run.req as usize];
            rec.first_token_ns = now;
            let observed = (now - rec.dispatched_ns) as f64 / NS;
            let predicted = rec.predicted_ttft_s;
            if predicted > 0.0 {
                let gw = &mut self.gateways[run.gateway as usize];
                if let Some(&slot) = gw.slot_of.get(a as usize) {
                    gw.cluster.observe_ttft(slot, 1, predicted, observed);
                }
            }
        }
        for (_, run) in finished {
            self.complete(run, a)?;
        }
        self.start_step(a);
        Ok(())
    }

    /// A request's last token: record it; a session's next turn is scheduled.
    fn complete(&mut self, run: SeqRun, agent: u32) -> Result<(), String> {
        self.open = self.open.saturating_sub(1);
        // The gateway relays the end of the response before the client sees it.
        if let Some((last_hash, blocks)) = self.keep_info.remove(&run.req) {
            let until_ms = (self.now + self.keep_ns) / 1_000_000;
            let gw = &mut self.gateways[run.gateway as usize];
            if let Some(&slot) = gw.slot_of.get(agent as usize) {
                gw.pass.keep(slot, blocks, last_hash, until_ms);
            }
        }
        let rec = &mut self.records[run.req as usize];
        rec.outcome = Outcome::Done;
        rec.done_ns = self.now;
        let spec = rec.spec;
        let Some(next) = self
            .generator
            .as_ref()
            .and_then(|g| g.next_turn(&spec, self.now as f64 / NS))
        else {
            self.history.remove(&spec.session);
            self.ended_in_loop();
            return Ok(());
        };
        // The next turn's history: this turn's prompt after the shared prefix, and its answer.
        let own = prompt_tokens(&spec, &[]);
        let h = self.history.entry(spec.session).or_default();
        h.extend_from_slice(&own[spec.shared_tokens as usize..]);
        h.extend((0..u64::from(run.produced)).map(|i| answer_token(spec.seed, i)));
        let idx = self.new_record(next)?;
        self.push(ns(next.arrival_s), Event::Arrive(idx));
        Ok(())
    }

    fn report_due(&mut self, a: u32) {
        let interval = ns(self.r.cfg.gateways.report_interval_ms / 1e3).max(1);
        let delay = ns(self.r.cfg.gateways.report_delay_ms / 1e3);
        let now = self.now;
        let agent = &mut self.agents[a as usize];
        let heartbeat = now.saturating_sub(agent.last_report_ns) >= 1_000_000_000;
        if agent.dirty || heartbeat || !agent.snapshot_sent {
            let window = now.saturating_sub(agent.last_report_ns).max(1);
            let util = (agent.busy_ns_since_report * 100 / window).min(100) as u32;
            agent.busy_ns_since_report = 0;
            agent.last_report_ns = now;
            agent.dirty = false;
            agent.sequence += 1;
            let s = agent.sched.stats();
            let fit = agent.speed.decode_fit();
            let snapshot = !agent.snapshot_sent;
            let taken = agent.sched.take_events();
            if snapshot {
                agent.snapshot_sent = true;
            }
            let base = Report {
                agent_id: format!("agent-{a}"),
                epoch: 1,
                sequence: agent.sequence,
                model: MODEL.into(),
                block_size: s.capacity.block_size,
                total_blocks: s.capacity.total,
                free_blocks: s.capacity.free.saturating_sub(s.committed_blocks as u64),
                cached_evictable_blocks: s.capacity.cached_evictable,
                running_requests: s.running as u32,
                waiting_requests: s.waiting as u32,
                requests_received: s.requests_received,
                preemptions: s.preemptions,
                gpu_utilization_percent: Some(util),
                max_model_len: self.r.cfg.agents.max_model_len,
                prefill_tokens_per_s: agent.speed.prefill_tokens_per_s.round() as u32,
                decode_step_us: (agent.speed.decode_step_s * 1e6).round() as u32,
                decode_batch: agent.speed.decode_batch.round() as u32,
                decode_step_per_seq_ns: (fit.per_seq_s * 1e9).round() as u32,
                decode_step_per_kv_token_ps: (fit.per_token_s * 1e12)
                    .round()
                    .min(f64::from(u32::MAX)) as u32,
                running_kv_tokens: s.running_kv_tokens as u64,
                room_released_blocks: agent.room_released,
                waiting_prefill_tokens: (s.waiting_prompt_blocks as u64)
                    .saturating_mul(u64::from(s.capacity.block_size)),
                running_prefill_tokens: s.running_prefill_tokens as u64,
                snapshot,
                block_use_events: true,
                events: taken.iter().map(event_of).collect(),
                dispatch_acks: true,
                acked_dispatches: Vec::new(),
                draining: false,
                host_total_blocks: 0,
                host_used_blocks: 0,
                host_copy_block_ns: 0,
            };
            let replicas = self.gateways.len();
            let mut base = Some(base);
            for g in 0..replicas {
                // The last gateway takes the report itself: one copy fewer per report.
                let Some(mut rep) = (if g + 1 == replicas {
                    base.take()
                } else {
                    base.clone()
                }) else {
                    break;
                };
                rep.acked_dispatches = std::mem::take(&mut self.agents[a as usize].acks[g]);
                let m = match self.mailbox_free.pop() {
                    Some(m) => {
                        self.mailbox[m as usize] = Some(rep);
                        m
                    }
                    None => {
                        self.mailbox.push(Some(rep));
                        (self.mailbox.len() - 1) as u32
                    }
                };
                self.push(now + delay, Event::Deliver(g as u32, a, m));
            }
            self.stats.reports += 1;
        }
        if !self.finished() {
            self.push(now + interval, Event::ReportDue(a));
        }
    }

    fn deliver(&mut self, g: u32, a: u32, m: u32) {
        let Some(report) = self.mailbox.get_mut(m as usize).and_then(Option::take) else {
            return;
        };
        self.mailbox_free.push(m);
        let now_ms = self.now / 1_000_000;
        let stale = self.policy.stale_after_ms;
        let gw = &mut self.gateways[g as usize];
        // As the gateway does: the queue is decided again when the report opened room there.
        let mut opened = false;
        if let Some(&slot) = gw.slot_of.get(a as usize) {
            let before = gw.cluster.open_room(slot, now_ms, stale);
            let new_epoch = gw.cluster.apply_report(slot, report, now_ms);
            opened = new_epoch || gw.cluster.open_room(slot, now_ms, stale) > before;
        }
        if opened {
            self.want_pump(g);
        }
    }

    fn sample(&mut self) {
        let n = self.agents.len().max(1) as f64;
        let mut sum = 0.0;
        let mut max: f64 = 0.0;
        for a in &self.agents {
            let c = a.sched.stats().capacity;
            let u = c.used as f64 / c.total.max(1) as f64;
            sum += u;
            max = max.max(u);
        }
        let queued = self.gateways.iter().map(|g| g.queue.len() as u64).sum();
        self.stats
            .kv_timeline
            .push((self.now as f64 / NS, sum / n, max, queued));
    }
}

fn event_of(e: &BlockEvent) -> CacheEvent {
    match e {
        BlockEvent::Stored(h) => CacheEvent::Stored(h.clone()),
        BlockEvent::Removed(h) => CacheEvent::Removed(h.clone()),
        BlockEvent::AllCleared => CacheEvent::AllCleared,
        BlockEvent::InUse(h) => CacheEvent::InUse(h.clone()),
        BlockEvent::Evictable(h) => CacheEvent::Evictable(h.clone()),
        BlockEvent::HostStored(h) => CacheEvent::HostStored(h.clone()),
        BlockEvent::HostRemoved(h) => CacheEvent::HostRemoved(h.clone()),
    }
}
