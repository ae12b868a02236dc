#![allow(clippy::unwrap_used)]
//! The engine runtime on the default model: batching, preemption, aborts, stop strings, seeds,
//! request validation and capacity reports.

mod model_fixture;

use kvroute_engine::api::{
    Dispatch, EngineEvent, FinishReason, GenerateRequest, Prompt, SamplingParams, Usage,
};
use kvroute_engine::load::load_path;
use kvroute_engine::model::KvStorage;
use kvroute_engine::runtime::{CapacityUpdate, Engine, EngineConfig, EngineError};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Generous guard so a bug shows as a failure, not a hung test (never a timing assertion).
const GUARD: Duration = Duration::from_secs(600);

fn engine(blocks: usize, max_batched: usize) -> Engine {
    let m = load_path(&model_fixture::model_path()).unwrap();
    let block_bytes = KvStorage::block_bytes(&m.config, 16);
    Engine::start(
        m,
        EngineConfig {
            block_size: 16,
            kv_memory_bytes: (blocks * block_bytes) as u64,
            max_num_batched_tokens: max_batched,
            threads: 2,
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        ..SamplingParams::default()
    }
}

fn submit(e: &Engine, prompt: &str, params: SamplingParams) -> (u64, Receiver<EngineEvent>) {
    submit_prompt(e, Prompt::Text(prompt.into()), params)
}

fn submit_prompt(
    e: &Engine,
    prompt: Prompt,
    params: SamplingParams,
) -> (u64, Receiver<EngineEvent>) {
    let (tx, rx) = channel();
    let id = e
        .add_request(
            GenerateRequest {
                prompt,
                params,
                cache_key: None,
                hold: None,
                dispatch: None,
                only_with_room: false,
            },
            Box::new(move |ev| tx.send(ev).is_ok()),
        )
        .unwrap();
    (id, rx)
}

struct Done {
    text: String,
    tokens: Vec<u32>,
    reason: FinishReason,
    usage: Usage,
}

fn collect(rx: &Receiver<EngineEvent>) -> Done {
    let mut d = Done {
        text: String::new(),
        tokens: Vec::new(),
        reason: FinishReason::Abort,
        usage: Usage::default(),
    };
    let mut started = false;
    loop {
        match rx.recv_timeout(GUARD).unwrap() {
            EngineEvent::Started { .. } => started = true,
            EngineEvent::Token(t) => {
                assert!(started, "token before Started");
                d.text.push_str(&t.text);
                d.tokens.push(t.token);
            }
            EngineEvent::Finished { reason, usage } => {
                d.reason = reason;
                d.usage = usage;
                return d;
            }
            EngineEvent::Error(e) => panic!("request failed: {e}"),
            EngineEvent::NoRoom { need, room } => panic!("no room: {need} > {room}"),
        }
    }
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
];

#[test]
fn concurrent_requests_match_one_at_a_time_and_preemption_keeps_outputs() {
    let solo = engine(64, 512);
    let expected: Vec<Done> = PROMPTS
        .iter()
        .map(|p| {
            let (_, rx) = submit(&solo, p, greedy(24));
            collect(&rx)
        })
        .collect();
    for d in &expected {
        assert_eq!(d.tokens.len(), 24);
        assert_eq!(d.reason, FinishReason::Length);
        assert_eq!(d.usage.completion_tokens, 24);
    }
    assert_eq!(solo.stats().capacity.free, solo.stats().capacity.total);
    solo.shutdown();

    // All at once, with a step budget that forces chunked prefill alongside decodes.
    let batched = engine(64, 8);
    let rxs: Vec<_> = PROMPTS
        .iter()
        .map(|p| submit(&batched, p, greedy(24)).1)
        .collect();
    for (rx, want) in rxs.iter().zip(&expected) {
        let got = collect(rx);
        assert_eq!(got.tokens, want.tokens);
        assert_eq!(got.text, want.text);
    }
    batched.shutdown();

    // A pool too small for all four at once: the scheduler preempts and recomputes.
    let tiny = engine(7, 64);
    let rxs: Vec<_> = PROMPTS
        .iter()
        .map(|p| submit(&tiny, p, greedy(24)).1)
        .collect();
    for (rx, want) in rxs.iter().zip(&expected) {
        assert_eq!(collect(rx).tokens, want.tokens);
    }
    let st = tiny.stats();
    assert!(st.preemptions > 0, "the tiny pool never preempted: {st:?}");
    assert_eq!(st.capacity.free, st.capacity.total);
    tiny.shutdown();
}

#[test]
fn stop_strings_end_generation_before_the_match_and_seeds_reproduce() {
    let e = engine(64, 512);
    let (_, rx) = submit(&e, PROMPTS[0], greedy(24));
    let full = collect(&rx);
    // Stop on a piece of the greedy output that starts after the first few characters.
    let start = full.text.char_indices().nth(4).unwrap().0;
    let stop: String = full.text[start..].chars().take(3).collect();
    let at = full.text.find(&stop).unwrap();
    let mut p = greedy(24);
    p.stop = vec!["zzz-not-there".into(), stop.clone()];
    let (_, rx) = submit(&e, PROMPTS[0], p);
    let cut = collect(&rx);
    assert_eq!(cut.reason, FinishReason::Stop);
    assert_eq!(cut.text, full.text[..at]);

    let sampled = |seed: u64| {
        let p = SamplingParams {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let (_, rx) = submit(&e, PROMPTS[1], p);
        collect(&rx).tokens
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7));
    assert_ne!(a, sampled(8));
    e.shutdown();
}

#[test]
fn abort_and_a_gone_client_free_their_blocks() {
    let e = engine(64, 512);
    let (id, rx) = submit(&e, PROMPTS[1], greedy(2000));
    // Wait until it is generating, then abort.
    loop {
        if let EngineEvent::Token(_) = rx.recv_timeout(GUARD).unwrap() {
            break;
        }
    }
    e.abort(id);
    loop {
        match rx.recv_timeout(GUARD).unwrap() {
            EngineEvent::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Abort);
                break;
            }
            EngineEvent::Token(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // A client that goes away: its sink returns false after three tokens.
    let seen = Arc::new(Mutex::new(0));
    let s2 = seen.clone();
    e.add_request(
        GenerateRequest {
            prompt: Prompt::Text(PROMPTS[2].into()),
            params: greedy(2000),
            cache_key: None,
            hold: None,
            dispatch: None,
            only_with_room: false,
        },
        Box::new(move |ev| {
            let mut n = s2.lock().unwrap();
            if matches!(ev, EngineEvent::Token(_)) {
                *n += 1;
            }
            *n < 3
        }),
    )
    .unwrap();
    // Then a normal request: once it is done, the engine has processed the abort too.
    let (_, rx) = submit(&e, PROMPTS[0], greedy(4));
    collect(&rx);
    let mut tries = 0;
    while e.stats().running + e.stats().waiting > 0 {
        tries += 1;
        assert!(tries < 60_000, "requests never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = e.stats();
    assert_eq!(st.capacity.free, st.capacity.total, "{st:?}");
    assert_eq!(*seen.lock().unwrap(), 3);
    assert_eq!(st.requests_received, 3);
    e.shutdown();
}

#[test]
fn invalid_requests_are_rejected_with_reasons() {
    let e = engine(8, 512);
    let req = |prompt: Prompt, params: SamplingParams| GenerateRequest {
        prompt,
        params,
        cache_key: None,
        hold: None,
        dispatch: None,
        only_with_room: false,
    };
    let err = |r: GenerateRequest| e.add_request(r, Box::new(|_| true)).unwrap_err();
    assert!(matches!(
        err(req(Prompt::Tokens(vec![]), greedy(4))),
        EngineError::InvalidRequest(_)
    ));
    assert!(matches!(
        err(req(Prompt::Text(String::new()), greedy(4))),
        EngineError::InvalidRequest(_)
    ));
    // 8 blocks of 16 tokens: the longest request is 128 tokens, so a 200-token prompt can
    // never fit.
    let e200 = err(req(Prompt::Tokens(vec![42; 200]), greedy(4)));
    assert!(
        matches!(&e200, EngineError::InvalidRequest(m) if m.contains("at most 127")),
        "{e200}"
    );
    assert!(matches!(
        err(req(Prompt::Tokens(vec![49152]), greedy(4))),
        EngineError::InvalidRequest(_)
    ));
    let mut p = greedy(0);
    assert!(matches!(
        err(req(Prompt::Tokens(vec![1]), p.clone())),
        EngineError::InvalidRequest(_)
    ));
    p.max_tokens = 4;
    p.logprobs = Some(21);
    assert!(matches!(
        err(req(Prompt::Tokens(vec![1]), p)),
        EngineError::InvalidRequest(_)
    ));
    let info = e.info();
    assert_eq!(info.num_blocks, 8);
    assert_eq!(info.block_size, 16);
    assert_eq!(info.max_model_len, 128);
    e.shutdown();
    assert!(matches!(
        e.add_request(req(Prompt::Tokens(vec![1]), greedy(1)), Box::new(|_| true)),
        Err(EngineError::Shutdown)
    ));
}

#[test]
fn capacity_observer_sees_admissions_steps_and_prefix_blocks() {
    let e = engine(64, 512);
    let updates: Arc<Mutex<Vec<CapacityUpdate>>> = Arc::default();
    let u2 = updates.clone();
    e.set_capacity_observer(Box::new(move |u| u2.lock().unwrap().push(u.clone())));
    // A prompt longer than one block, so a full block gets hashed and stored.
    let prompt = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move.";
    let mut p = greedy(3);
    p.logprobs = Some(2);
    let (_, rx) = submit(&e, prompt, p);
    let mut saw_logprobs = false;
    loop {
        match rx.recv_timeout(GUARD).unwrap() {
            EngineEvent::Token(t) => {
                assert_eq!(t.top_logprobs.len(), 2);
                assert!(t.logprob.unwrap() <= 0.0);
                saw_logprobs = true;
            }
            EngineEvent::Finished { .. } => break,
            _ => {}
        }
    }
    assert!(saw_logprobs);
    // Same prompt again: served partly from the prefix cache.
    let (_, rx) = submit(&e, prompt, greedy(3));
    let d = collect(&rx);
    assert!(d.usage.cached_tokens >= 16, "{:?}", d.usage);
    e.shutdown();
    let u = updates.lock().unwrap();
    assert!(u.len() >= 3);
    assert_eq!(u.last().unwrap().stats.requests_received, 2);
    let stored = u
        .iter()
        .flat_map(|x| &x.events)
        .any(|ev| matches!(ev, kvroute_engine::kv::BlockEvent::Stored(h) if !h.is_empty()));
    assert!(stored, "no Stored block event reached the observer");
    assert!(u.last().unwrap().stats.prefix_hit_tokens >= 16);
}

#[test]
fn a_dispatch_is_acknowledged_in_the_update_that_counts_it() {
    let e = engine(64, 512);
    let updates: Arc<Mutex<Vec<CapacityUpdate>>> = Arc::default();
    let u2 = updates.clone();
    e.set_capacity_observer(Box::new(move |u| u2.lock().unwrap().push(u.clone())));
    let source: Arc<str> = Arc::from("gw-a");
    let send = |seq: u64, max_tokens: u32| {
        let (tx, rx) = channel();
        e.add_request(
            GenerateRequest {
                prompt: Prompt::Text("The capital of France is".into()),
                params: greedy(max_tokens),
                cache_key: None,
                hold: None,
                dispatch: Some(Dispatch {
                    source: source.clone(),
                    seq,
                }),
                only_with_room: false,
            },
            Box::new(move |ev| tx.send(ev).is_ok()),
        )
        .unwrap();
        rx
    };
    let a = send(7, 4);
    collect(&a);
    let b = send(9, 2);
    collect(&b);
    e.shutdown();
    let u = updates.lock().unwrap();
    let acked: Vec<(u64, u64)> = u
        .iter()
        .flat_map(|x| x.acks.iter().map(|d| (d.seq, x.stats.requests_received)))
        .collect();
    // Each dispatch once, in the first update whose counters include its request.
    assert_eq!(acked, vec![(7, 1), (9, 2)], "{acked:?}");
    assert!(u.iter().flat_map(|x| &x.acks).all(|d| &*d.source == "gw-a"));
}

#[test]
fn a_request_that_must_have_room_is_refused_rather_than_queued() {
    // 8 blocks of 16 tokens. The first request's whole future takes 6 of them.
    let e = engine(8, 512);
    let send = |max_tokens: u32, only_with_room: bool| {
        let (tx, rx) = channel();
        e.add_request(
            GenerateRequest {
                prompt: Prompt::Text("The capital of France is".into()),
                params: SamplingParams {
                    ignore_eos: true,
                    ..greedy(max_tokens)
                },
                cache_key: None,
                hold: None,
                dispatch: None,
                only_with_room,
            },
            Box::new(move |ev| tx.send(ev).is_ok()),
        )
        .unwrap();
        rx
    };
    let first = send(90, true);
    assert!(matches!(
        first.recv_timeout(GUARD).unwrap(),
        EngineEvent::Started { .. }
    ));
    // 3 more blocks do not fit beside it: refused at once, nothing queued.
    let second = send(40, true);
    match second.recv_timeout(GUARD).unwrap() {
        EngineEvent::NoRoom { need, room } => assert!(need > room, "{need} {room}"),
        ev => panic!("{ev:?}"),
    }
    // Without the flag the same request queues and is served after the first.
    let third = send(40, false);
    let finished = |rx: &Receiver<EngineEvent>| loop {
        if let EngineEvent::Finished { usage, .. } = rx.recv_timeout(GUARD).unwrap() {
            return usage.completion_tokens;
        }
    };
    assert_eq!(finished(&first), 90);
    assert_eq!(finished(&third), 40);
    e.shutdown();
}

#[test]
fn a_panicking_step_loop_is_reported_as_a_failure_with_its_message() {
    let m = load_path(&model_fixture::model_path()).unwrap();
    let block_bytes = KvStorage::block_bytes(&m.config, 16);
    let e = Engine::start(
        m,
        EngineConfig {
            block_size: 16,
            kv_memory_bytes: (64 * block_bytes) as u64,
            threads: 1,
            fault_panic_at_step: Some(3),
            ..EngineConfig::default()
        },
    )
    .unwrap();
    assert_eq!(e.failure(), None);
    let (_, rx) = submit(&e, "Hello there", greedy(16));
    // The events end without a finish: the sink went down with the thread.
    let mut tokens = 0;
    while let Ok(ev) = rx.recv_timeout(GUARD) {
        match ev {
            EngineEvent::Token(_) => tokens += 1,
            EngineEvent::Finished { .. } => panic!("a request finished past the fault"),
            _ => {}
        }
    }
    assert_eq!(tokens, 2, "steps 1 and 2 sampled, step 3 panicked");
    let deadline = std::time::Instant::now() + GUARD;
    let why = loop {
        if let Some(why) = e.failure() {
            break why;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        why.contains("panicked") && why.contains("injected fault at step 3"),
        "{why}"
    );
    // It stays failed, and new requests are refused.
    assert_eq!(e.failure(), Some(why));
    let (tx, _rx) = channel();
    let refused = e.add_request(
        GenerateRequest {
            prompt: Prompt::Text("again".into()),
            params: greedy(2),
            cache_key: None,
            hold: None,
            dispatch: None,
            only_with_room: false,
        },
        Box::new(move |ev| tx.send(ev).is_ok()),
    );
    assert!(refused.is_err());
}

#[test]
fn a_shut_down_engine_is_not_a_failure() {
    let e = engine(32, 256);
    let (_, rx) = submit(&e, "Hello", greedy(2));
    collect(&rx);
    e.shutdown();
    assert_eq!(e.failure(), None);
}

fn submit_tokens(e: &Engine, prompt: Vec<u32>, params: SamplingParams) -> Receiver<EngineEvent> {
    submit_prompt(e, Prompt::Tokens(prompt), params).1
}

#[test]
fn prompts_whose_block_hashes_collide_never_share_kv() {
    use kvroute_engine::kv::hash_block;
    // With public hashes cut to 16 bits, find two different first blocks that collide.
    const MASK: u64 = 0xffff;
    let mut seen = std::collections::HashMap::new();
    let (a, b) = (0u32..)
        .find_map(|i| {
            let block: Vec<u32> = (0..16).map(|j| 1000 + (i * 16 + j) % 40000).collect();
            let h = hash_block(None, b"", &block) & MASK;
            seen.insert(h, block.clone())
                .filter(|prev| *prev != block)
                .map(|prev| (prev, block))
        })
        .unwrap();
    let suffix: Vec<u32> = (500..520).collect();
    let prompt = |first: &[u32]| [first, &suffix[..]].concat();
    let start = || {
        let m = load_path(&model_fixture::model_path()).unwrap();
        let block_bytes = KvStorage::block_bytes(&m.config, 16);
        Engine::start(
            m,
            EngineConfig {
                block_size: 16,
                kv_memory_bytes: (64 * block_bytes) as u64,
                threads: 2,
                block_hash_bits_for_tests: Some(16),
                ..EngineConfig::default()
            },
        )
        .unwrap()
    };
    let e = start();
    let first = collect(&submit_tokens(&e, prompt(&a), greedy(8)));
    assert_eq!(first.usage.cached_tokens, 0);
    // The same prompt again is a hit: the cache works at 16 bits.
    let again = collect(&submit_tokens(&e, prompt(&a), greedy(8)));
    assert_eq!(again.usage.cached_tokens, 32);
    assert_eq!(again.tokens, first.tokens);
    // The colliding prompt finds A's block under its public hash, but shares none of it.
    let colliding = collect(&submit_tokens(&e, prompt(&b), greedy(8)));
    assert_eq!(colliding.usage.cached_tokens, 0);
    e.shutdown();
    let fresh = start();
    let alone = collect(&submit_tokens(&fresh, prompt(&b), greedy(8)));
    fresh.shutdown();
    assert_eq!(
        colliding.tokens, alone.tokens,
        "the colliding prompt's output equals its output on an empty cache"
    );
}

#[test]
fn a_prefix_evicted_to_the_host_tier_comes_back_with_the_same_output() {
    let start = |host_blocks: usize| {
        let m = load_path(&model_fixture::model_path()).unwrap();
        let block_bytes = KvStorage::block_bytes(&m.config, 16);
        Engine::start(
            m,
            EngineConfig {
                block_size: 16,
                // 12 blocks: a 170-token prompt takes all of them.
                kv_memory_bytes: (12 * block_bytes) as u64,
                kv_offload_memory_bytes: (host_blocks * block_bytes) as u64,
                threads: 2,
                ..EngineConfig::default()
            },
        )
        .unwrap()
    };
    let a: Vec<u32> = (1000..1080).collect();
    let b: Vec<u32> = (2000..2170).collect();
    let e = start(32);
    let first = collect(&submit_tokens(&e, a.clone(), greedy(8)));
    assert_eq!(first.usage.cached_tokens, 0);
    // B needs every block: A's cached blocks are evicted, to the host tier.
    collect(&submit_tokens(&e, b, greedy(8)));
    let after_b = e.stats().capacity;
    assert!(after_b.offloaded_blocks >= 4, "{after_b:?}");
    assert!(after_b.host_used >= 4);
    // A again: its four full prompt blocks before the last token come back from the host.
    let again = collect(&submit_tokens(&e, a.clone(), greedy(8)));
    let s = e.stats().capacity;
    e.shutdown();
    assert_eq!(again.usage.cached_tokens, 64);
    assert_eq!(s.reloaded_blocks - after_b.reloaded_blocks, 4);
    assert_eq!(s.prefix_host_hit_tokens, 64);
    assert_eq!(
        again.tokens, first.tokens,
        "copied-back KV gives the same output"
    );
    // Without a host tier the same sequence recomputes A.
    let plain = start(0);
    collect(&submit_tokens(&plain, a.clone(), greedy(8)));
    collect(&submit_tokens(&plain, (2000..2170).collect(), greedy(8)));
    let recomputed = collect(&submit_tokens(&plain, a, greedy(8)));
    plain.shutdown();
    assert_eq!(recomputed.usage.cached_tokens, 0);
    assert_eq!(recomputed.tokens, first.tokens);
}

#[test]
fn a_host_tier_smaller_than_a_block_is_refused_clearly() {
    let m = load_path(&model_fixture::model_path()).unwrap();
    let block_bytes = KvStorage::block_bytes(&m.config, 16);
    let err = Engine::start(
        m,
        EngineConfig {
            block_size: 16,
            kv_memory_bytes: (12 * block_bytes) as u64,
            kv_offload_memory_bytes: (block_bytes / 2) as u64,
            threads: 1,
            ..EngineConfig::default()
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("--kv-offload-memory"), "{err}");
}

#[test]
fn a_q8_0_kv_cache_holds_more_blocks_in_the_same_memory_and_serves() {
    use kvroute_engine::model::KvCacheDtype;
    let m = load_path(&model_fixture::model_path()).unwrap();
    let f16 = KvStorage::block_bytes(&m.config, 16);
    let q8 = KvStorage::block_bytes_of(&m.config, 16, KvCacheDtype::Q8_0);
    let e = Engine::start(
        m,
        EngineConfig {
            block_size: 16,
            kv_memory_bytes: (12 * f16) as u64,
            kv_cache_dtype: KvCacheDtype::Q8_0,
            // The host tier follows the cache's type.
            kv_offload_memory_bytes: (4 * q8) as u64,
            threads: 2,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let s = e.stats();
    assert_eq!(s.capacity.total as usize, 12 * f16 / q8);
    assert_eq!(
        s.capacity.total, 22,
        "12 f16 blocks' memory holds 22 q8_0 blocks"
    );
    assert_eq!(s.capacity.host_total, 4);
    assert_eq!(s.block_bytes, q8);
    let d = collect(&submit(&e, PROMPTS[0], greedy(8)).1);
    e.shutdown();
    assert_eq!(d.tokens.len(), 8);
}

#[test]
fn a_hold_named_by_a_request_refused_for_room_is_let_go() {
    // 8 blocks of 16 tokens. A finished prompt leaves 2 full blocks cached; a router holds them
    // for a request that waits for room here, then sends it naming the hold and asking to be
    // refused rather than queued. Refused, the request is routed again (perhaps elsewhere)
    // without the hold: the hold must not keep pinning the blocks until its TTL.
    let e = engine(8, 512);
    let updates: Arc<Mutex<Vec<CapacityUpdate>>> = Arc::default();
    let u2 = Arc::clone(&updates);
    e.set_capacity_observer(Box::new(move |u| u2.lock().unwrap().push(u.clone())));
    let prompt = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm \
                  windowsill and the children play in the garden behind the old stone house, \
                  where their grandmother grows tomatoes, beans and tall yellow sunflowers";
    let (_, rx) = submit(&e, prompt, greedy(1));
    while !matches!(
        rx.recv_timeout(GUARD).unwrap(),
        EngineEvent::Finished { .. }
    ) {}
    let stored = || -> Vec<u64> {
        updates
            .lock()
            .unwrap()
            .iter()
            .flat_map(|u| &u.events)
            .filter_map(|ev| match ev {
                kvroute_engine::kv::BlockEvent::Stored(h) => Some(h.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    // The step's update reaches the observer after the request's last event.
    let deadline = std::time::Instant::now() + GUARD;
    while stored().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", stored());
        std::thread::sleep(Duration::from_millis(5));
    }
    let hashes = stored();
    let (tx, held) = channel();
    e.hold_prefix(
        hashes.clone(),
        8,
        Duration::from_secs(600),
        Box::new(move |id, n| {
            let _ = tx.send((id, n));
        }),
    )
    .unwrap();
    let (hold, n) = held.recv_timeout(GUARD).unwrap();
    assert_eq!(n, hashes.len());
    let free_now = |e: &Engine| {
        let s = e.stats();
        (s.capacity.free, s.running, s.waiting)
    };
    // The stats follow each step; a hold kept pins its blocks for its whole TTL (600 s), so a
    // short guard tells the two apart.
    let wait_for = |want: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while free_now(&e).0 != want {
            assert!(std::time::Instant::now() < deadline, "{:?}", free_now(&e));
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(8 - n as u64);
    // Another request takes most of the rest.
    let (_, busy) = submit(
        &e,
        "Hello",
        SamplingParams {
            ignore_eos: true,
            ..greedy(70)
        },
    );
    assert!(matches!(
        busy.recv_timeout(GUARD).unwrap(),
        EngineEvent::Started { .. }
    ));
    // The held prompt with more output than the room left, naming the hold: refused.
    let (tx, rx) = channel();
    e.add_request(
        GenerateRequest {
            prompt: Prompt::Text(prompt.into()),
            params: SamplingParams {
                ignore_eos: true,
                ..greedy(60)
            },
            cache_key: None,
            hold: Some(hold),
            dispatch: None,
            only_with_room: true,
        },
        Box::new(move |ev| tx.send(ev).is_ok()),
    )
    .unwrap();
    assert!(matches!(
        rx.recv_timeout(GUARD).unwrap(),
        EngineEvent::NoRoom { .. }
    ));
    while !matches!(
        busy.recv_timeout(GUARD).unwrap(),
        EngineEvent::Finished { .. }
    ) {}
    // Let go with the refusal: every block is free again (still cached, evictable).
    wait_for(8);
    assert_eq!(free_now(&e), (8, 0, 0));
    e.shutdown();
}
