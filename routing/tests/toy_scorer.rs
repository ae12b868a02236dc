//! A scorer written outside the routing crate, added through the registry, changes decisions;
//! a weighted scorer list replaces a preset's own scorers.

use kvroute_routing::{
    Candidate, Cluster, Decision, PolicyConfig, PolicyKind, Report, RouteRequest, ScoreContext,
    Scorer, ScorerId, ScorerList, SplitMix64,
};

/// Prefers the agent with the highest slot: the opposite of what headroom says below.
struct HighestSlot;

impl Scorer for HighestSlot {
    fn score(&self, _ctx: &ScoreContext<'_>, candidates: &[Candidate], out: &mut [f64]) {
        for (o, c) in out.iter_mut().zip(candidates) {
            *o = c.slot as f64;
        }
    }
}

fn cluster(frees: &[u64]) -> Cluster {
    let mut c = Cluster::new();
    for (i, &free) in frees.iter().enumerate() {
        let id = format!("a{i}");
        let s = c.upsert_agent(&id);
        c.apply_report(
            s,
            Report {
                agent_id: id,
                epoch: 1,
                model: "m".into(),
                block_size: 16,
                total_blocks: 100,
                free_blocks: free,
                max_model_len: 8192,
                snapshot: true,
                ..Report::default()
            },
            0,
        );
    }
    c
}

fn request() -> RouteRequest<'static> {
    RouteRequest {
        model: "m",
        prompt_tokens: 64,
        output_tokens: 16,
        block_size: 16,
        block_hashes: &[],
        exclude: &[],
        claimed: &[],
        held: &[],
        may_hold: true,
        home: None,
        waited_ms: 0,
    }
}

fn pick(c: &mut Cluster, cfg: &PolicyConfig) -> usize {
    match c.decide(cfg, &request(), 0, &mut SplitMix64(1)) {
        Decision::Route(r) => r.slot,
        d => panic!("expected a route, got {d:?}"),
    }
}

#[test]
fn a_registered_scorer_changes_decisions() {
    // Agent 0 has the most room: kv-score's headroom term picks it.
    let mut c = cluster(&[90, 50, 20]);
    let preset = PolicyConfig {
        kind: PolicyKind::KvScore,
        ..PolicyConfig::default()
    };
    assert_eq!(pick(&mut c, &preset), 0);

    let id = c
        .scorers_mut()
        .register("highest-slot", Box::new(HighestSlot))
        .unwrap();
    assert_eq!(c.scorers().name(id), Some("highest-slot"));
    assert_eq!(c.scorers().id("highest-slot"), Some(id));
    // The same name twice is refused.
    assert!(c
        .scorers_mut()
        .register("highest-slot", Box::new(HighestSlot))
        .is_err());

    // Alone, the toy scorer wins: the highest slot.
    let toy = PolicyConfig {
        scorers: Some(ScorerList::new(&[(id, 1.0)]).unwrap()),
        ..preset
    };
    assert_eq!(pick(&mut c, &toy), 2);

    // Weighed against headroom, the heavier term decides.
    let light = PolicyConfig {
        scorers: Some(ScorerList::new(&[(ScorerId::HEADROOM, 10.0), (id, 0.1)]).unwrap()),
        ..preset
    };
    assert_eq!(pick(&mut c, &light), 0);
    let heavy = PolicyConfig {
        scorers: Some(ScorerList::new(&[(ScorerId::HEADROOM, 0.1), (id, 10.0)]).unwrap()),
        ..preset
    };
    assert_eq!(pick(&mut c, &heavy), 2);
}

#[test]
fn the_room_filter_stays_whatever_the_scorers() {
    // The toy scorer prefers agent 1, which has no room: kv-score (room now) never picks it.
    let mut c = cluster(&[50, 0]);
    let id = c
        .scorers_mut()
        .register("highest-slot", Box::new(HighestSlot))
        .unwrap();
    let cfg = PolicyConfig {
        kind: PolicyKind::KvScore,
        scorers: Some(ScorerList::new(&[(id, 1.0)]).unwrap()),
        ..PolicyConfig::default()
    };
    assert_eq!(pick(&mut c, &cfg), 0);
}

#[test]
fn scorer_lists_are_bounded_and_weights_finite() {
    assert!(ScorerList::new(&[(ScorerId::COST, f64::NAN)]).is_err());
    assert!(ScorerList::new(&[(ScorerId::COST, f64::INFINITY)]).is_err());
    let nine = [(ScorerId::PREFIX, 1.0); 9];
    assert!(ScorerList::new(&nine).is_err());
    assert!(ScorerList::new(&nine[..8]).is_ok());
    assert_eq!(ScorerId::builtin("cost"), Some(ScorerId::COST));
    assert_eq!(ScorerId::builtin("nope"), None);
}
