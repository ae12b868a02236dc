//! A routing decision as a pipeline: **filters → weighted scorers → picker**.
//!
//! 1. **Filters** (fixed, in this order) turn the agents serving the model into candidates: live
//!    and fresh, the prompt below its `max_model_len`, not excluded (a retry) nor claimed by an
//!    earlier queued request, a pool that holds the prompt, and the preset's room rule (room now;
//!    room now or worth waiting for; or room ignored, for the baselines). Each candidate carries
//!    what the request takes there (blocks, cached prefix, room, prompt tokens to compute).
//! 2. **Scorers** ([`Scorer`](crate::scorer::Scorer)) each write one value per candidate into a reusable slice (higher is better);
//!    the pipeline adds them up with their weights. A scorer is a [`Scorer`] registered by name
//!    in the cluster's [`ScorerRegistry`](crate::registry::ScorerRegistry); the built-in ones live in [`scorers`](crate::scorers).
//! 3. **A picker** takes the best total (ties: more blocks left after the request for `kv`, then
//!    a seeded random draw), or the first candidate from the round-robin cursor.
//!
//! A [`PolicyKind`] is a preset of the three: `kv` = room-or-wait, the `cost` scorer, best with
//! headroom ties; `kv-score` = room now, `prefix` + `headroom` + `queue`; `least-requests` and
//! `gpu-utilization` = room ignored, one scorer each; `round-robin` = room ignored, the cursor;
//! the peers' policies: `llm-d` = room ignored, `prefix` 3 + `kv-usage` 2 + `waiting` 2;
//! `cache-aware` = room ignored, SGLang router's choice over what was sent ([`sent`](crate::sent)).
//! [`PolicyConfig::scorers`] replaces a preset's scorers with any weighted list.
//!
//! Pure: no I/O, no clock, no allocation once the scratch buffers are warm.

use crate::cluster::{Cluster, ReservationHandle};
use crate::cost;
use crate::index::{has_bit, prefix_overlap};
use crate::policy::{
    Decision, PolicyConfig, PolicyKind, RandomSource, Route, RouteRequest, ScorerId, ScorerList,
};
use crate::scorer::{AgentView, Candidate, PipelineScratch, ScoreContext};
use crate::scorers::{ask_of, load_of, load_with_room};

/// Which candidates the room filter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRule {
    /// Only agents with room for the request now.
    Now,
    /// Also agents without room: the request may wait for the one picked (when it may wait).
    NowOrWait,
    /// Room is not looked at (baselines).
    Ignore,
}

/// How the winner is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Picker {
    /// Highest total; ties to a random one of them, or first to the one with more blocks left.
    Best { headroom_ties: bool },
    /// The first candidate from the model's round-robin cursor.
    RoundRobin,
    /// SGLang router's `cache_aware` choice over what this gateway sent (see [`sent`](crate::sent)).
    CacheAware,
}

/// The filter rule, picker and default scorers a [`PolicyKind`] stands for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    pub room: RoomRule,
    pub picker: Picker,
    /// Walk the prefix index (for scorers that read cached blocks).
    pub walks_cache: bool,
    /// Count prefixes in flight to an agent as local there.
    pub tracks_inflight: bool,
    /// Remember what was sent to each agent (the `cache-aware` picker reads it).
    pub records_sent: bool,
    pub scorers: ScorerList,
}

impl Preset {
    /// The preset of `cfg.kind`, with `cfg.scorers` in place of its own when set.
    pub fn of(cfg: &PolicyConfig) -> Preset {
        let list = |items: &[(ScorerId, f64)]| {
            // Presets name at most three scorers: they always fit.
            ScorerList::new(items).unwrap_or_default()
        };
        // The highest weighted total wins, not looking at what the agents cache or were sent
        // unless `walks_cache`.
        let best = |room: RoomRule, walks_cache: bool, scorers: ScorerList| Preset {
            room,
            picker: Picker::Best {
                headroom_ties: false,
            },
            walks_cache,
            tracks_inflight: false,
            records_sent: false,
            scorers,
        };
        let mut p = match cfg.kind {
            PolicyKind::Kv => Preset {
                room: RoomRule::NowOrWait,
                picker: Picker::Best {
                    headroom_ties: true,
                },
                walks_cache: true,
                tracks_inflight: true,
                records_sent: false,
                scorers: list(&[(ScorerId::COST, 1.0)]),
            },
            PolicyKind::KvScore => {
                let w = cfg.weights;
                let scorers = list(&[
                    (ScorerId::PREFIX, w.prefix),
                    (ScorerId::HEADROOM, w.headroom),
                    (ScorerId::QUEUE, w.queue),
                ]);
                best(RoomRule::Now, true, scorers)
            }
            PolicyKind::RoundRobin => Preset {
                picker: Picker::RoundRobin,
                ..best(RoomRule::Ignore, false, ScorerList::default())
            },
            PolicyKind::LeastRequests => {
                best(RoomRule::Ignore, false, list(&[(ScorerId::REQUESTS, 1.0)]))
            }
            PolicyKind::GpuUtilization => {
                best(RoomRule::Ignore, false, list(&[(ScorerId::GPU, 1.0)]))
            }
            PolicyKind::CacheAware => Preset {
                picker: Picker::CacheAware,
                records_sent: true,
                ..best(RoomRule::Ignore, false, ScorerList::default())
            },
            PolicyKind::LlmD => {
                let scorers = list(&[
                    (ScorerId::PREFIX, 3.0),
                    (ScorerId::KV_USAGE, 2.0),
                    (ScorerId::WAITING, 2.0),
                ]);
                best(RoomRule::Ignore, true, scorers)
            }
        };
        if let Some(list) = cfg.scorers {
            p.scorers = list;
            // Scorers that read the cache need the walk whatever the preset.
            p.walks_cache |= list.as_slice().iter().any(|&(id, _)| {
                id == ScorerId::COST
                    || id == ScorerId::PREFIX
                    || usize::from(id.0) >= ScorerId::BUILTIN.len()
            });
        }
        p
    }
}

impl Cluster {
    /// Picks an agent for `req` under `cfg` at clock `now_ms`; ties broken with `rng`.
    ///
    /// Costs up to two walks of the prompt's block hashes (presets that read the cache), one pass
    /// over the agents serving the model, and one pass per scorer over the candidates; it
    /// allocates nothing once the scratch buffers are warm. `&mut self` only for those buffers: a
    /// decision changes no state (round-robin's cursor moves in [`reserve`](Cluster::reserve)).
    pub fn decide(
        &mut self,
        cfg: &PolicyConfig,
        req: &RouteRequest<'_>,
        now_ms: u64,
        rng: &mut dyn RandomSource,
    ) -> Decision {
        let Some(model) = self.models.iter().position(|m| m == req.model) else {
            return self.why_not(req);
        };
        let preset = Preset::of(cfg);
        let n = self.hot.len();
        if preset.walks_cache {
            prefix_overlap(&self.index, req.block_hashes, n, &mut self.scratch);
        }
        let overlap: &[u32] = if preset.walks_cache {
            &self.scratch.overlap
        } else {
            &[]
        };
        let inflight: &[u32] = if preset.tracks_inflight && !self.inflight_index.is_empty() {
            prefix_overlap(
                &self.inflight_index,
                req.block_hashes,
                n,
                &mut self.scratch_inflight,
            );
            &self.scratch_inflight.overlap
        } else {
            &[]
        };
        // Leading prompt blocks each agent caches with a request using them: sharing those takes
        // no room (agents that report block use only).
        let in_use: &[u32] = if preset.walks_cache && !self.in_use_index.is_empty() {
            prefix_overlap(
                &self.in_use_index,
                req.block_hashes,
                n,
                &mut self.scratch_in_use,
            );
            &self.scratch_in_use.overlap
        } else {
            &[]
        };
        // Leading prompt blocks each agent holds in either tier (agents with a host tier).
        let reach: &[u32] = if preset.walks_cache && self.host_entries > 0 {
            prefix_overlap(
                &self.reach_index,
                req.block_hashes,
                n,
                &mut self.scratch_reach,
            );
            &self.scratch_reach.overlap
        } else {
            &[]
        };
        let slots: &[u32] = self.model_slots.get(model).map_or(&[], Vec::as_slice);
        let model = model as u32;
        // Round-robin walks from the cursor (cyclically, in slot order); the others from the
        // lowest slot.
        let start = if preset.picker == Picker::RoundRobin && n > 0 {
            let cursor = self.rr_next.get(model as usize).copied().unwrap_or(0) % n;
            slots.partition_point(|&s| (s as usize) < cursor)
        } else {
            0
        };
        let (tail, head) = slots.split_at(start);
        let first_only = preset.picker == Picker::RoundRobin;
        let may_wait = preset.room == RoomRule::NowOrWait && req.may_hold;
        let total_tokens = req.prompt_tokens + req.output_tokens;
        let PipelineScratch {
            candidates,
            scores,
            totals,
            best_local: last_best_local,
        } = &mut self.pipeline;
        candidates.clear();
        // The longest prefix any agent of the model holds or is computing (eligible or not).
        let mut best_local = 0u64;
        // Block counts for the last block size seen (agents of a model share one in practice).
        let mut sized = (0u32, 0u64, 0u64, 0u64);
        for &slot in head.iter().chain(tail) {
            let slot = slot as usize;
            let Some(h) = self.hot.get(slot) else {
                continue;
            };
            let reported = overlap.get(slot).copied().unwrap_or(0);
            let local_any = reported.max(inflight.get(slot).copied().unwrap_or(0));
            let reachable = reach.get(slot).copied().unwrap_or(0);
            best_local = best_local.max(u64::from(local_any.max(reachable)));
            if first_filters(h, slot, model, req, cfg, now_ms).is_some() {
                continue;
            }
            if sized.0 != h.block_size {
                sized = (
                    h.block_size,
                    crate::policy::blocks_for(total_tokens, h.block_size),
                    crate::policy::blocks_for(req.prompt_tokens + 1, h.block_size),
                    // An engine computes at least the prompt's last token: a prefix hit covers
                    // at most the full blocks before it.
                    req.prompt_tokens.saturating_sub(1) / u64::from(h.block_size.max(1)),
                );
            }
            let (_, all_blocks, prompt_min, max_hit) = sized;
            if prompt_min > h.total {
                continue;
            }
            // A request whose reserved output would not fit even in an empty pool is clamped to
            // the pool: it can still run when the agent is idle.
            let blocks = all_blocks.min(h.total);
            let same_size = h.block_size == req.block_size;
            let cached = if same_size {
                u64::from(reported).min(max_hit)
            } else {
                0
            };
            let local = if same_size {
                u64::from(local_any).min(max_hit)
            } else {
                0
            };
            let host = if same_size {
                u64::from(reachable).min(max_hit).saturating_sub(local)
            } else {
                0
            };
            // Cached prefix blocks that no running request holds are counted in `free` too:
            // using them takes them out of `free`; sharing blocks a running request holds takes
            // nothing. Blocks surely in use: the leading run the agent reported in use (its
            // block-use events), and at least as many as it has cached blocks beyond its
            // evictable ones (exact on an idle agent).
            //
            // The credit holds only while the blocks stay in use until the request arrives. If
            // every holder ends first and the blocks are evicted, each request sent on that
            // credit recomputes them; the holders' release covers one such request per block,
            // not two. So while one credited request is on its way (not yet counted by the
            // agent, which then reserves its whole prompt until it runs), the next gets none.
            let shared = if same_size && h.credited_pending == 0 {
                u64::from(in_use.get(slot).copied().unwrap_or(0))
                    .min(cached)
                    .max(cached.saturating_sub(h.cached_evictable))
            } else {
                0
            };
            let need = blocks.saturating_sub(shared);
            let held = req.held.get(slot).copied().unwrap_or(0);
            let mut room = (h.free as i128 - h.reserved as i128 - held as i128)
                .clamp(i128::from(i64::MIN), i128::from(i64::MAX))
                as i64;
            if over_tpot_slo(cfg, preset.room, h, total_tokens) {
                // Too slow a step to join now: no room, short by one block, so that it waits
                // for this agent (or goes where the step is short enough) as for blocks.
                room = room.min(i64::try_from(need).unwrap_or(i64::MAX).saturating_sub(1));
            }
            let c = Candidate {
                slot,
                need_blocks: need,
                cached_blocks: cached,
                local_blocks: local,
                shared_blocks: shared,
                room,
                host_blocks: host,
                prefill_tokens: req.prompt_tokens.saturating_sub(
                    local * u64::from(h.block_size)
                        + ((host * u64::from(h.block_size)) as f64
                            * (1.0 - f64::from(h.host_block_cost)))
                            as u64,
                ),
            };
            let fits = c.headroom() >= 0;
            match preset.room {
                RoomRule::Now if !fits => continue,
                RoomRule::NowOrWait if !fits && !may_wait => continue,
                _ => {}
            }
            candidates.push(c);
            if first_only {
                break;
            }
        }
        *last_best_local = best_local;
        if candidates.is_empty() {
            return self.why_not(req);
        }
        let ctx = ScoreContext::new(req, cfg, best_local, home_of(req, candidates), &self.hot);
        totals.clear();
        totals.resize(candidates.len(), 0.0);
        for (i, &(id, weight)) in preset.scorers.as_slice().iter().enumerate() {
            let Some(scorer) = self.scorers.get(id) else {
                continue;
            };
            if i == 0 {
                // The first scorer writes the totals directly (one pass fewer in the common
                // single-scorer pipeline).
                scorer.score(&ctx, candidates, totals);
                if weight != 1.0 {
                    totals.iter_mut().for_each(|t| *t *= weight);
                }
                continue;
            }
            scores.clear();
            scores.resize(candidates.len(), 0.0);
            scorer.score(&ctx, candidates, scores);
            for (t, s) in totals.iter_mut().zip(scores.iter()) {
                *t += weight * s;
            }
        }
        let pick = match preset.picker {
            Picker::RoundRobin => 0,
            Picker::Best { headroom_ties } => pick_best(candidates, totals, headroom_ties, rng),
            Picker::CacheAware => self.sent.pick(
                candidates,
                &self.hot,
                req.block_hashes,
                req.prompt_tokens,
                &cfg.cache_aware,
            ),
        };
        let (Some(&c), Some(&score)) = (candidates.get(pick), totals.get(pick)) else {
            return self.why_not(req);
        };
        let a = &self.hot[c.slot];
        let e = cost::estimate(
            &load_of(a, &c),
            &ask_of(&ctx, a, &c),
            &cfg.priors,
            &cfg.cost,
        );
        let route = Route {
            slot: c.slot,
            need_blocks: c.need_blocks,
            cached_blocks: c.cached_blocks,
            shared_blocks: c.shared_blocks,
            score,
            prefill_tokens: c.prefill_tokens,
            predicted_ttft_s: e.ttft_s(),
        };
        if c.deficit_blocks() > 0 && preset.room == RoomRule::NowOrWait {
            Decision::Hold(route)
        } else {
            Decision::Route(route)
        }
    }
}

impl Cluster {
    /// Commits a routed request under `cfg`: reserves its room ([`reserve`](Cluster::reserve)),
    /// and records its prompt's block hashes where the policy reads them later (in flight to
    /// the agent for `kv`, [`track_inflight`](Cluster::track_inflight); sent to it for
    /// `cache-aware`). What the gateway and the simulator call once a request is dispatched.
    pub fn dispatch(
        &mut self,
        cfg: &PolicyConfig,
        route: &Route,
        hashes: &[u64],
        now_ms: u64,
    ) -> Option<ReservationHandle> {
        let handle = self.reserve(route);
        let preset = Preset::of(cfg);
        if preset.tracks_inflight {
            self.track_inflight(route.slot, hashes, now_ms);
        }
        if preset.records_sent && route.slot < self.hot.len() {
            let block_size = u64::from(self.hot[route.slot].block_size.max(1));
            let max_blocks = cfg.cache_aware.tree_tokens / block_size;
            self.sent.insert(route.slot, hashes, now_ms, max_blocks);
        }
        handle
    }
}

/// One candidate of a decision, as [`Cluster::explain`] shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateTrace {
    pub candidate: Candidate,
    /// The weighted total of the scorers (what the picker compared; higher is better).
    pub score: f64,
    /// Each scorer's value here (unweighted), in the order of [`Preset::scorers`] for the
    /// decision's config; entries past that list's length are 0.
    pub values: [f64; crate::policy::MAX_SCORERS],
    /// The cost model's terms there (the `kv` policy's scorer is minus its `cost`).
    pub estimate: cost::Estimate,
}

impl Cluster {
    /// The candidates of the last [`decide`](Cluster::decide) for `req` (call it right after,
    /// with the same `cfg` and `req`), in the order they were scored, with their totals, each
    /// scorer's value and the cost estimates. For debugging and decision traces: it allocates.
    pub fn explain(&self, cfg: &PolicyConfig, req: &RouteRequest<'_>) -> Vec<CandidateTrace> {
        let ctx = ScoreContext::new(
            req,
            cfg,
            self.pipeline.best_local,
            home_of(req, &self.pipeline.candidates),
            &self.hot,
        );
        let candidates = &self.pipeline.candidates;
        let totals = &self.pipeline.totals;
        let mut values = vec![[0.0; crate::policy::MAX_SCORERS]; candidates.len()];
        let mut one = vec![0.0; candidates.len()];
        let scorers = Preset::of(cfg).scorers;
        for (i, &(id, weight)) in scorers.as_slice().iter().enumerate() {
            if scorers.as_slice().len() == 1 && weight != 0.0 {
                // One scorer: its value is the total over its weight (no second pass).
                for (v, &t) in values.iter_mut().zip(totals) {
                    v[0] = t / weight;
                }
                break;
            }
            let Some(scorer) = self.scorers.get(id) else {
                continue;
            };
            one.iter_mut().for_each(|v| *v = 0.0);
            scorer.score(&ctx, candidates, &mut one);
            for (v, &x) in values.iter_mut().zip(&one) {
                v[i] = x;
            }
        }
        candidates
            .iter()
            .zip(totals)
            .zip(values)
            .filter_map(|((c, &score), values)| {
                let a = self.hot.get(c.slot)?;
                Some(CandidateTrace {
                    candidate: *c,
                    score,
                    values,
                    estimate: cost::estimate(
                        &load_of(a, c),
                        &ask_of(&ctx, a, c),
                        &cfg.priors,
                        &cfg.cost,
                    ),
                })
            })
            .collect()
    }
}

/// Why the pipeline's filters left an agent out of a decision's candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not connected, or no report in its current epoch.
    Down,
    /// Serves another model.
    OtherModel,
    /// Its last report is older than `stale_after_ms`.
    Stale,
    /// The prompt reaches its `max_model_len`.
    PromptTooLong,
    /// Excluded by the request (a retry after it failed there).
    Excluded,
    /// Claimed by an earlier queued request.
    Claimed,
    /// Its whole pool cannot hold the prompt.
    PoolTooSmall,
    /// No room now, and the preset (or the request) does not wait for room.
    NoRoom,
    /// Round-robin took the first eligible agent from its cursor; this one was not looked at.
    NotTried,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Down => "down",
            Verdict::OtherModel => "other_model",
            Verdict::Stale => "stale",
            Verdict::PromptTooLong => "prompt_too_long",
            Verdict::Excluded => "excluded",
            Verdict::Claimed => "claimed",
            Verdict::PoolTooSmall => "pool_too_small",
            Verdict::NoRoom => "no_room",
            Verdict::NotTried => "not_tried",
        }
    }
}

/// The filters that need nothing of the request's size on the agent, in order; the first that
/// leaves agent `slot` out.
#[inline]
fn first_filters(
    h: &crate::scorer::AgentView,
    slot: usize,
    model: u32,
    req: &RouteRequest<'_>,
    cfg: &PolicyConfig,
    now_ms: u64,
) -> Option<Verdict> {
    if !h.live {
        Some(Verdict::Down)
    } else if h.model != model {
        Some(Verdict::OtherModel)
    } else if now_ms.saturating_sub(h.last_report_ms) > cfg.stale_after_ms {
        Some(Verdict::Stale)
    } else if h.max_model_len > 0 && req.prompt_tokens >= u64::from(h.max_model_len) {
        Some(Verdict::PromptTooLong)
    } else if req.exclude.contains(&slot) {
        Some(Verdict::Excluded)
    } else if has_bit(req.claimed, slot) {
        Some(Verdict::Claimed)
    } else {
        None
    }
}

impl Cluster {
    /// The agents serving `req`'s model that the last [`decide`](Cluster::decide) for `req`
    /// (same `cfg`, `req` and `now_ms`, called right after) left out of its candidates, with
    /// why. For decision traces: it allocates.
    pub fn filter_verdicts(
        &self,
        cfg: &PolicyConfig,
        req: &RouteRequest<'_>,
        now_ms: u64,
    ) -> Vec<(usize, Verdict)> {
        let Some(model) = self.models.iter().position(|m| m == req.model) else {
            return Vec::new();
        };
        let preset = Preset::of(cfg);
        let slots: &[u32] = self.model_slots.get(model).map_or(&[], Vec::as_slice);
        // The candidates' slots as a bitset: one pass, not one scan per agent.
        let mut picked = vec![0u64; crate::index::words_for(self.hot.len())];
        for c in &self.pipeline.candidates {
            if let Some(w) = picked.get_mut(c.slot / 64) {
                *w |= 1 << (c.slot % 64);
            }
        }
        slots
            .iter()
            .map(|&s| s as usize)
            .filter(|&s| !has_bit(&picked, s))
            .filter_map(|slot| {
                let h = self.hot.get(slot)?;
                let verdict = first_filters(h, slot, model as u32, req, cfg, now_ms)
                    .or_else(|| {
                        let prompt_min =
                            crate::policy::blocks_for(req.prompt_tokens + 1, h.block_size);
                        (prompt_min > h.total).then_some(Verdict::PoolTooSmall)
                    })
                    .unwrap_or(if preset.picker == Picker::RoundRobin {
                        Verdict::NotTried
                    } else {
                        Verdict::NoRoom
                    });
                Some((slot, verdict))
            })
            .collect()
    }
}

/// Whether joining agent `a`'s batch would make its predicted decode step longer than the
/// policy's time-per-output-token target (`kv` with a target only; never for an idle agent).
/// The requests this gateway sent there that the agent has not counted yet join it too.
fn over_tpot_slo(cfg: &PolicyConfig, rule: RoomRule, a: &AgentView, kv_tokens: u64) -> bool {
    if rule != RoomRule::NowOrWait || cfg.tpot_slo_s <= 0.0 {
        return false;
    }
    let ahead = a
        .running
        .saturating_add(a.waiting)
        .saturating_add(a.pending);
    ahead > 0
        && cost::step_with(
            &load_with_room(a, 0),
            &cfg.priors,
            1.0 + f64::from(a.pending),
            kv_tokens,
        ) > cfg.tpot_slo_s
}

/// The request's home agent and the prefix it has there, when that agent is a candidate.
fn home_of(req: &RouteRequest<'_>, candidates: &[Candidate]) -> Option<(usize, u64)> {
    let home = req.home?;
    candidates
        .iter()
        .find(|c| c.slot == home)
        .map(|c| (home, c.local_blocks))
}

/// Index of the highest total; equal totals (within 1e-12) go to the candidate with more blocks
/// left when `headroom_ties`, then to a uniformly random one (reservoir sampling).
fn pick_best(
    candidates: &[Candidate],
    totals: &[f64],
    headroom_ties: bool,
    rng: &mut dyn RandomSource,
) -> usize {
    let mut best = 0usize;
    let mut ties = 0u64;
    for (i, (c, &score)) in candidates.iter().zip(totals).enumerate() {
        if i == 0 {
            ties = 1;
            continue;
        }
        let b = totals[best];
        let left = if headroom_ties { c.headroom() } else { 0 };
        let best_left = if headroom_ties {
            candidates[best].headroom()
        } else {
            0
        };
        if score > b + 1e-12 || ((score - b).abs() <= 1e-12 && left > best_left) {
            best = i;
            ties = 1;
        } else if (score - b).abs() <= 1e-12 && left == best_left {
            ties += 1;
            if rng.below(ties) == 0 {
                best = i;
            }
        }
    }
    best
}
