//! The capacity hub: mirrors the engine's KV counters and cached block hashes, and turns them into
//! `kvroute.v1.CapacityReport` streams for any number of subscribers.
//!
//! The engine calls [`CapacityHub::apply`] on its own thread after every change; that call only
//! takes a short lock and pushes into a bounded `tokio::sync::broadcast` channel, so it never
//! waits on a subscriber. Each subscriber runs its own task ([`CapacityHub::watch`]) that
//! coalesces updates (at most one report per `min_interval`), sends heartbeats, and feeds a
//! bounded mpsc channel. A subscriber that falls so far behind that the broadcast buffer overflows
//! gets a fresh snapshot instead of the missed events. This module never calls into the engine.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvroute_proto::v1::block_event::{Kind, Tier};
use kvroute_proto::{BlockEvent, CapacityReport};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::backend::{CacheEvent, CapacityObserver, CapacityStats, CapacityUpdate, Dispatch};
use crate::gpu::GpuMonitor;

/// Stream pacing.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// Least time between two reports on one stream.
    pub min_interval: Duration,
    /// A report is sent at least this often, even without changes.
    pub heartbeat: Duration,
}

impl Default for StreamTiming {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_millis(5),
            heartbeat: Duration::from_secs(1),
        }
    }
}

/// Updates buffered per subscriber before it is considered lagging.
pub const BROADCAST_BUFFER: usize = 1024;
/// Reports buffered between a subscriber's task and its gRPC stream.
pub const STREAM_BUFFER: usize = 16;
/// Acknowledgements kept per dispatcher, repeated in a snapshot (a subscriber that fell behind
/// or reconnected still learns of the dispatches it missed).
pub const RECENT_ACKS: usize = 4096;
/// Dispatchers whose recent acknowledgements are kept (the least recently acked one goes).
pub const MAX_DISPATCHERS: usize = 64;

#[derive(Debug)]
struct Delta {
    version: u64,
    stats: CapacityStats,
    events: Vec<CacheEvent>,
    acks: Vec<Dispatch>,
}

struct HubState {
    version: u64,
    stats: CapacityStats,
    cached: HashSet<u64>,
    /// Of `cached`, the blocks no request uses (evictable).
    idle: HashSet<u64>,
    /// The host tier's hashes.
    host: HashSet<u64>,
    /// Per dispatcher: the version of its last acknowledgement, and its recent ones.
    recent_acks: HashMap<std::sync::Arc<str>, (u64, VecDeque<u64>)>,
}

impl HubState {
    fn remember_acks(&mut self, acks: &[Dispatch]) {
        for d in acks {
            if !self.recent_acks.contains_key(&d.source)
                && self.recent_acks.len() >= MAX_DISPATCHERS
            {
                let oldest = self
                    .recent_acks
                    .iter()
                    .min_by_key(|(_, (v, _))| *v)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.recent_acks.remove(&k);
                }
            }
            let (v, q) = self.recent_acks.entry(d.source.clone()).or_default();
            *v = self.version;
            if q.len() >= RECENT_ACKS {
                q.pop_front();
            }
            q.push_back(d.seq);
        }
    }
}

/// See the module docs.
pub struct CapacityHub {
    agent_id: String,
    model: String,
    epoch: u64,
    gpu: GpuMonitor,
    state: Mutex<HubState>,
    tx: broadcast::Sender<Arc<Delta>>,
    /// Said in every report from now on (the next heartbeat at the latest).
    draining: std::sync::atomic::AtomicBool,
}

/// A point-in-time copy of the hub, consistent with the receiver handed out with it.
struct Snapshot {
    version: u64,
    stats: CapacityStats,
    hashes: Vec<u64>,
    /// Of `hashes`, the evictable ones.
    idle: Vec<u64>,
    /// The host tier's hashes.
    host: Vec<u64>,
    /// The subscriber's dispatcher's recent acknowledgements.
    acks: Vec<u64>,
}

/// A fresh epoch for this process: wall-clock nanoseconds mixed with the process id, so two
/// agents started in the same instant still differ.
pub fn new_epoch() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 48)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl CapacityHub {
    pub fn new(
        agent_id: String,
        model: String,
        gpu: GpuMonitor,
        initial: CapacityStats,
    ) -> Arc<Self> {
        let (tx, _) = broadcast::channel(BROADCAST_BUFFER);
        Arc::new(Self {
            agent_id,
            model,
            epoch: new_epoch(),
            gpu,
            state: Mutex::new(HubState {
                version: 0,
                stats: initial,
                cached: HashSet::new(),
                idle: HashSet::new(),
                host: HashSet::new(),
                recent_acks: HashMap::new(),
            }),
            tx,
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// From now on every report says the agent is draining.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// An observer for `InferenceBackend::set_capacity_observer` feeding this hub.
    pub fn observer(self: &Arc<Self>) -> CapacityObserver {
        let hub = self.clone();
        Box::new(move |u: &CapacityUpdate| hub.apply(u))
    }

    /// Records one engine update. Never blocks on subscribers.
    pub fn apply(&self, update: &CapacityUpdate) {
        let mut s = self.lock();
        for ev in &update.events {
            match ev {
                CacheEvent::Stored(h) => {
                    for x in h {
                        s.cached.insert(*x);
                        s.idle.remove(x);
                    }
                }
                CacheEvent::Removed(h) => {
                    for x in h {
                        s.cached.remove(x);
                        s.idle.remove(x);
                    }
                }
                CacheEvent::AllCleared => {
                    s.cached.clear();
                    s.idle.clear();
                    s.host.clear();
                }
                CacheEvent::HostStored(h) => s.host.extend(h.iter().copied()),
                CacheEvent::HostRemoved(h) => {
                    for x in h {
                        s.host.remove(x);
                    }
                }
                CacheEvent::InUse(h) => {
                    for x in h {
                        s.idle.remove(x);
                    }
                }
                CacheEvent::Evictable(h) => {
                    for x in h {
                        if s.cached.contains(x) {
                            s.idle.insert(*x);
                        }
                    }
                }
            }
        }
        s.version += 1;
        s.stats = update.stats;
        s.remember_acks(&update.acks);
        if self.tx.receiver_count() > 0 {
            // Sent under the lock so versions reach every receiver in order. A full buffer
            // drops the oldest entry for lagging receivers; it never waits.
            let _ = self.tx.send(Arc::new(Delta {
                version: s.version,
                stats: update.stats,
                events: update.events.clone(),
                acks: update.acks.clone(),
            }));
        }
    }

    /// Acknowledges a dispatch the engine never took in (the agent refused the request, or its
    /// backend does not acknowledge): it takes no room, so any report may carry it.
    pub fn ack(&self, dispatch: Dispatch) {
        let mut s = self.lock();
        s.version += 1;
        let acks = vec![dispatch];
        s.remember_acks(&acks);
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(Delta {
                version: s.version,
                stats: s.stats,
                events: Vec::new(),
                acks,
            }));
        }
    }

    /// The latest counters.
    pub fn stats(&self) -> CapacityStats {
        self.lock().stats
    }

    /// Every block hash the engine caches now, sorted.
    pub fn cached_hashes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.lock().cached.iter().copied().collect();
        v.sort_unstable();
        v
    }

    fn subscribe(&self, dispatcher: Option<&str>) -> (Snapshot, broadcast::Receiver<Arc<Delta>>) {
        let s = self.lock();
        let acks = dispatcher
            .and_then(|d| s.recent_acks.get(d))
            .map(|(_, q)| q.iter().copied().collect())
            .unwrap_or_default();
        let rx = self.tx.subscribe();
        let mut hashes: Vec<u64> = s.cached.iter().copied().collect();
        hashes.sort_unstable();
        let mut idle: Vec<u64> = s.idle.iter().copied().collect();
        idle.sort_unstable();
        let mut host: Vec<u64> = s.host.iter().copied().collect();
        host.sort_unstable();
        (
            Snapshot {
                version: s.version,
                stats: s.stats,
                hashes,
                idle,
                host,
                acks,
            },
            rx,
        )
    }

    /// A report of `stats` (sequence, snapshot flag and events left to the caller).
    pub fn report(&self, stats: &CapacityStats) -> CapacityReport {
        CapacityReport {
            agent_id: self.agent_id.clone(),
            epoch: self.epoch,
            sequence: 0,
            model: self.model.clone(),
            block_size: stats.block_size,
            total_blocks: stats.total_blocks,
            // The room a router may admit into: free and not promised to a live request.
            free_blocks: stats.free_blocks.saturating_sub(stats.committed_blocks),
            cached_evictable_blocks: stats.cached_evictable_blocks,
            running_requests: stats.running,
            waiting_requests: stats.waiting,
            requests_received: stats.requests_received,
            preemptions: stats.preemptions,
            prefix_query_tokens: stats.prefix_query_tokens,
            prefix_hit_tokens: stats.prefix_hit_tokens,
            timestamp_ms: now_ms(),
            gpu: self.gpu.sample().map(Into::into),
            events: Vec::new(),
            snapshot: false,
            max_model_len: stats.max_model_len,
            block_bytes: stats.block_bytes,
            prefill_tokens_per_second: stats.prefill_tokens_per_s,
            decode_step_micros: stats.decode_step_us,
            decode_batch: stats.decode_batch,
            decode_step_per_seq_nanos: stats.decode_step_per_seq_ns,
            decode_step_per_kv_token_picos: stats.decode_step_per_kv_token_ps,
            running_kv_tokens: stats.running_kv_tokens,
            room_released_blocks: stats.room_released_blocks,
            waiting_prefill_tokens: stats.waiting_prefill_tokens,
            running_prefill_tokens: stats.running_prefill_tokens,
            block_use_events: stats.block_use_events,
            acked_dispatches: Vec::new(),
            dispatch_acks: true,
            draining: self.draining.load(std::sync::atomic::Ordering::Relaxed),
            host_total_blocks: stats.host_total_blocks,
            host_used_blocks: stats.host_used_blocks,
            prefix_host_hit_tokens: stats.prefix_host_hit_tokens,
            host_copy_block_nanos: stats.host_copy_block_ns,
        }
    }

    /// Starts a subscriber's stream: a snapshot first, then coalesced changes and heartbeats,
    /// until the receiver is dropped or `shutdown` turns true.
    pub fn watch<T: Send + 'static>(
        self: &Arc<Self>,
        include_events: bool,
        dispatcher: Option<Arc<str>>,
        timing: StreamTiming,
        shutdown: watch::Receiver<bool>,
        wrap: fn(CapacityReport) -> T,
    ) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let hub = self.clone();
        tokio::spawn(async move {
            hub.stream_task(include_events, dispatcher, timing, shutdown, tx, wrap)
                .await;
        });
        rx
    }

    async fn stream_task<T>(
        &self,
        include_events: bool,
        dispatcher: Option<Arc<str>>,
        timing: StreamTiming,
        mut shutdown: watch::Receiver<bool>,
        tx: mpsc::Sender<T>,
        wrap: fn(CapacityReport) -> T,
    ) {
        let mut sequence = 0u64;
        'snapshot: loop {
            let (snap, mut rx) = self.subscribe(dispatcher.as_deref());
            sequence += 1;
            let mut report = self.report(&snap.stats);
            report.sequence = sequence;
            report.snapshot = true;
            report.acked_dispatches = snap.acks;
            if include_events && !snap.hashes.is_empty() {
                report.events.push(BlockEvent {
                    kind: Kind::Stored as i32,
                    block_hashes: snap.hashes,
                    tier: Tier::Device as i32,
                });
                if snap.stats.block_use_events && !snap.idle.is_empty() {
                    // Stored means in use: the idle ones are named right after.
                    report.events.push(BlockEvent {
                        kind: Kind::Evictable as i32,
                        block_hashes: snap.idle,
                        tier: Tier::Device as i32,
                    });
                }
            }
            if include_events && !snap.host.is_empty() {
                report.events.push(BlockEvent {
                    kind: Kind::Stored as i32,
                    block_hashes: snap.host,
                    tier: Tier::Host as i32,
                });
            }
            if tx.send(wrap(report)).await.is_err() {
                return;
            }
            let mut last_sent = Instant::now();
            let mut version = snap.version;
            let mut stats = snap.stats;
            let mut pending: Option<Vec<CacheEvent>> = None;
            let mut acks: Vec<u64> = Vec::new();
            loop {
                // Wait for a change, a heartbeat, or a coalescing deadline.
                let deadline = if pending.is_some() {
                    last_sent + timing.min_interval
                } else {
                    last_sent + timing.heartbeat
                };
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    _ = tx.closed() => return,
                    r = rx.recv() => match r {
                        Ok(d) => {
                            if d.version > version {
                                version = d.version;
                                stats = d.stats;
                                pending.get_or_insert_with(Vec::new).extend(d.events.iter().cloned());
                                if let Some(me) = dispatcher.as_deref() {
                                    acks.extend(d.acks.iter().filter(|a| &*a.source == me).map(|a| a.seq));
                                }
                            }
                            continue;
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::debug!(missed, "capacity subscriber fell behind; sending a fresh snapshot");
                            continue 'snapshot;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tokio::time::sleep_until(deadline) => {}
                }
                sequence += 1;
                let mut report = self.report(&stats);
                report.sequence = sequence;
                report.acked_dispatches = std::mem::take(&mut acks);
                if let Some(events) = pending.take() {
                    if include_events {
                        report.events = to_proto_events(events);
                    }
                }
                if tx.send(wrap(report)).await.is_err() {
                    return;
                }
                last_sent = Instant::now();
            }
        }
    }
}

/// Engine cache events as proto block events, merging runs of the same kind.
pub fn to_proto_events(events: Vec<CacheEvent>) -> Vec<BlockEvent> {
    let mut out: Vec<BlockEvent> = Vec::new();
    for ev in events {
        let (kind, hashes, tier) = match ev {
            CacheEvent::Stored(h) => (Kind::Stored, h, Tier::Device),
            CacheEvent::Removed(h) => (Kind::Removed, h, Tier::Device),
            CacheEvent::AllCleared => (Kind::AllCleared, Vec::new(), Tier::Device),
            CacheEvent::InUse(h) => (Kind::InUse, h, Tier::Device),
            CacheEvent::Evictable(h) => (Kind::Evictable, h, Tier::Device),
            CacheEvent::HostStored(h) => (Kind::Stored, h, Tier::Host),
            CacheEvent::HostRemoved(h) => (Kind::Removed, h, Tier::Host),
        };
        match out.last_mut() {
            Some(last)
                if last.kind == kind as i32
                    && last.tier == tier as i32
                    && kind != Kind::AllCleared =>
            {
                last.block_hashes.extend(hashes)
            }
            _ => out.push(BlockEvent {
                kind: kind as i32,
                block_hashes: hashes,
                tier: tier as i32,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(free: u64) -> CapacityStats {
        CapacityStats {
            block_size: 16,
            total_blocks: 100,
            free_blocks: free,
            ..Default::default()
        }
    }

    fn hub() -> Arc<CapacityHub> {
        CapacityHub::new("a".into(), "m".into(), GpuMonitor::absent(), stats(100))
    }

    fn timing() -> StreamTiming {
        StreamTiming {
            min_interval: Duration::from_millis(5),
            heartbeat: Duration::from_secs(3600),
        }
    }

    #[test]
    fn merges_events_of_one_kind() {
        let ev = to_proto_events(vec![
            CacheEvent::Stored(vec![1]),
            CacheEvent::Stored(vec![2]),
            CacheEvent::Removed(vec![1]),
            CacheEvent::AllCleared,
            CacheEvent::AllCleared,
        ]);
        assert_eq!(ev.len(), 4);
        assert_eq!(ev[0].block_hashes, vec![1, 2]);
        assert_eq!(ev[1].kind, Kind::Removed as i32);
    }

    #[tokio::test]
    async fn a_snapshot_names_the_evictable_blocks_after_the_stored_ones() {
        let hub = hub();
        let tracked = CapacityStats {
            block_use_events: true,
            ..stats(90)
        };
        hub.apply(&CapacityUpdate {
            stats: tracked,
            events: vec![
                CacheEvent::Stored(vec![7, 8, 9]),
                CacheEvent::Evictable(vec![8, 9]),
                CacheEvent::InUse(vec![9]),
                // Not cached: ignored.
                CacheEvent::Evictable(vec![42]),
            ],
            acks: Vec::new(),
        });
        let (_stop_tx, stop) = watch::channel(false);
        let mut rx = hub.watch(true, None, timing(), stop, |r| r);
        let first = rx.recv().await.unwrap();
        assert!(first.snapshot && first.block_use_events);
        let kinds: Vec<(i32, Vec<u64>)> = first
            .events
            .iter()
            .map(|e| (e.kind, e.block_hashes.clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::Stored as i32, vec![7, 8, 9]),
                (Kind::Evictable as i32, vec![8])
            ]
        );
        // Later changes stream as they come.
        hub.apply(&CapacityUpdate {
            stats: tracked,
            events: vec![CacheEvent::Evictable(vec![7])],
            acks: Vec::new(),
        });
        let next = rx.recv().await.unwrap();
        assert_eq!(next.events[0].kind, Kind::Evictable as i32);
        assert_eq!(next.events[0].block_hashes, vec![7]);
    }

    /// A report's events as (kind, tier, hashes).
    fn tiered(r: &CapacityReport) -> Vec<(i32, i32, Vec<u64>)> {
        r.events
            .iter()
            .map(|e| (e.kind, e.tier, e.block_hashes.clone()))
            .collect()
    }

    #[tokio::test]
    async fn host_tier_blocks_stream_with_their_tier_and_are_in_the_snapshot() {
        let hub = hub();
        let st = CapacityStats {
            host_total_blocks: 8,
            host_used_blocks: 2,
            prefix_host_hit_tokens: 32,
            ..stats(90)
        };
        hub.apply(&CapacityUpdate {
            stats: st,
            events: vec![
                CacheEvent::Stored(vec![1, 2]),
                // 1 moves to the host tier; 3 goes there and leaves again.
                CacheEvent::Removed(vec![1]),
                CacheEvent::HostStored(vec![1, 3]),
                CacheEvent::HostRemoved(vec![3]),
            ],
            acks: Vec::new(),
        });
        let (_stop_tx, stop) = watch::channel(false);
        let mut rx = hub.watch(true, None, timing(), stop, |r| r);
        let first = rx.recv().await.unwrap();
        assert_eq!(
            tiered(&first),
            vec![
                (Kind::Stored as i32, Tier::Device as i32, vec![2]),
                (Kind::Stored as i32, Tier::Host as i32, vec![1]),
            ]
        );
        assert_eq!((first.host_total_blocks, first.host_used_blocks), (8, 2));
        assert_eq!(first.prefix_host_hit_tokens, 32);
        // Streamed changes keep the tier, and runs of one kind and tier merge.
        hub.apply(&CapacityUpdate {
            stats: st,
            events: vec![
                CacheEvent::Stored(vec![5]),
                CacheEvent::HostStored(vec![6]),
                CacheEvent::HostStored(vec![7]),
                CacheEvent::AllCleared,
            ],
            acks: Vec::new(),
        });
        let next = rx.recv().await.unwrap();
        assert_eq!(
            tiered(&next),
            vec![
                (Kind::Stored as i32, Tier::Device as i32, vec![5]),
                (Kind::Stored as i32, Tier::Host as i32, vec![6, 7]),
                (Kind::AllCleared as i32, Tier::Device as i32, vec![]),
            ]
        );
    }

    fn dispatch(source: &str, seq: u64) -> Dispatch {
        Dispatch {
            source: Arc::from(source),
            seq,
        }
    }

    #[tokio::test]
    async fn a_stream_acknowledges_its_own_dispatchers_requests_only() {
        let hub = hub();
        let (_stop_tx, stop) = watch::channel(false);
        let mut a = hub.watch(
            false,
            Some(Arc::from("gw-a")),
            timing(),
            stop.clone(),
            |r| r,
        );
        let mut none = hub.watch(false, None, timing(), stop, |r| r);
        let first = a.recv().await.unwrap();
        assert!(first.snapshot && first.dispatch_acks && first.acked_dispatches.is_empty());
        assert!(none.recv().await.unwrap().snapshot);
        // Taken in by the engine: acknowledged with the counters that include it.
        hub.apply(&CapacityUpdate {
            stats: stats(80),
            events: Vec::new(),
            acks: vec![dispatch("gw-a", 1), dispatch("gw-b", 1)],
        });
        // Refused by the agent: acknowledged directly.
        hub.ack(dispatch("gw-a", 2));
        let mut acked = Vec::new();
        while acked.len() < 2 {
            let r = a.recv().await.unwrap();
            if r.acked_dispatches.contains(&1) {
                assert_eq!(r.free_blocks, 80, "the ack came before its counters");
            }
            acked.extend(r.acked_dispatches);
        }
        assert_eq!(acked, vec![1, 2]);
        let r = none.recv().await.unwrap();
        assert!(r.acked_dispatches.is_empty());
        // A new stream of the same dispatcher (a reconnect) hears the recent ones again.
        let (_stop_tx, stop) = watch::channel(false);
        let mut again = hub.watch(false, Some(Arc::from("gw-a")), timing(), stop, |r| r);
        assert_eq!(again.recv().await.unwrap().acked_dispatches, vec![1, 2]);
    }

    #[test]
    fn recent_acknowledgements_are_bounded() {
        let hub = hub();
        for i in 0..(RECENT_ACKS as u64 + 10) {
            hub.ack(dispatch("gw-a", i));
        }
        for d in 0..(MAX_DISPATCHERS + 5) {
            hub.ack(dispatch(&format!("gw-{d}"), 0));
        }
        let s = hub.lock();
        assert_eq!(s.recent_acks.len(), MAX_DISPATCHERS);
        // The least recently acknowledged dispatcher went first.
        assert!(!s.recent_acks.contains_key("gw-a"));
        assert!(s.recent_acks.values().all(|(_, q)| q.len() <= RECENT_ACKS));
        drop(s);
        let hub = self::hub();
        for i in 0..(RECENT_ACKS as u64 + 10) {
            hub.ack(dispatch("gw-a", i));
        }
        let s = hub.lock();
        let q = &s.recent_acks["gw-a"].1;
        assert_eq!(q.len(), RECENT_ACKS);
        assert_eq!(q.front(), Some(&10));
    }

    #[tokio::test]
    async fn snapshot_then_changes_in_order() {
        let hub = hub();
        hub.apply(&CapacityUpdate {
            stats: stats(90),
            events: vec![CacheEvent::Stored(vec![7, 8])],
            acks: Vec::new(),
        });
        let (_stop_tx, stop) = watch::channel(false);
        let mut rx = hub.watch(true, None, timing(), stop, |r| r);
        let first = rx.recv().await.unwrap();
        assert!(first.snapshot);
        assert_eq!(first.sequence, 1);
        assert_eq!(first.free_blocks, 90);
        assert_eq!(first.events[0].block_hashes, vec![7, 8]);
        hub.apply(&CapacityUpdate {
            stats: stats(80),
            events: vec![CacheEvent::Removed(vec![7])],
            acks: Vec::new(),
        });
        hub.apply(&CapacityUpdate {
            stats: stats(70),
            events: vec![CacheEvent::Stored(vec![9])],
            acks: Vec::new(),
        });
        // Both updates arrive, possibly coalesced into one report; the last stats win.
        let mut seen = Vec::new();
        let mut free = 0;
        let mut expect_seq = 2;
        while free != 70 {
            let r = rx.recv().await.unwrap();
            assert!(!r.snapshot);
            assert_eq!(r.sequence, expect_seq);
            expect_seq += 1;
            free = r.free_blocks;
            seen.extend(r.events);
        }
        let kinds: Vec<i32> = seen.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![Kind::Removed as i32, Kind::Stored as i32]);
        assert_eq!(hub.cached_hashes(), vec![8, 9]);
    }

    #[tokio::test]
    async fn lagging_subscriber_gets_a_fresh_snapshot() {
        let hub = hub();
        let (_stop_tx, stop) = watch::channel(false);
        let mut rx = hub.watch(true, None, timing(), stop, |r| r);
        assert!(rx.recv().await.unwrap().snapshot);
        // The subscriber's task cannot run during this loop (single-threaded test runtime):
        // more updates than the broadcast buffer holds arrive before it reads any.
        for i in 0..(BROADCAST_BUFFER as u64 * 3) {
            hub.apply(&CapacityUpdate {
                stats: stats(i % 100),
                events: vec![CacheEvent::Stored(vec![i])],
                acks: Vec::new(),
            });
        }
        let mut got_snapshot = None;
        while let Ok(r) = rx.try_recv() {
            if r.snapshot {
                got_snapshot = Some(r);
            }
        }
        // A final read after the buffered ones: the task may still be sending.
        while got_snapshot.is_none() {
            let r = rx.recv().await.unwrap();
            if r.snapshot {
                got_snapshot = Some(r);
            }
        }
        let snap = got_snapshot.unwrap();
        // The snapshot carries the whole cache as one STORED event.
        assert_eq!(snap.events.len(), 1);
        assert!(snap.events[0].block_hashes.len() > BROADCAST_BUFFER);
    }

    #[tokio::test]
    async fn heartbeat_without_changes_and_shutdown_ends_stream() {
        let hub = hub();
        let (stop_tx, stop) = watch::channel(false);
        let t = StreamTiming {
            min_interval: Duration::from_millis(1),
            heartbeat: Duration::from_millis(20),
        };
        let mut rx = hub.watch(false, None, t, stop, |r| r);
        assert!(rx.recv().await.unwrap().snapshot);
        let hb = rx.recv().await.unwrap();
        assert_eq!(hb.sequence, 2);
        assert!(!hb.snapshot);
        assert!(hb.events.is_empty());
        stop_tx.send(true).unwrap();
        while rx.recv().await.is_some() {}
    }
}
