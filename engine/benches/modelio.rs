//! Model I/O costs on the default model: opening the GGUF (parse + map), building the tokenizer,
//! encoding text, streaming detokenization and rendering the chat template.
//! Run: `cargo bench -p kvroute-engine --bench modelio` (after scripts/test.sh fetched the model,
//! or with KVROUTE_MODEL_PATH set).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvroute_engine::chat::{ChatMessage, ChatTemplate};
use kvroute_engine::fetch;
use kvroute_engine::gguf::Gguf;
use kvroute_engine::tokenizer::Tokenizer;
use std::hint::black_box;
use std::path::PathBuf;

fn model_path() -> PathBuf {
    std::env::var_os("KVROUTE_MODEL_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            fetch::cache_dir()
                .expect("no cache dir")
                .join("models")
                .join(fetch::DEFAULT_MODEL_FILE)
        })
}

fn bench(c: &mut Criterion) {
    let path = model_path();
    assert!(
        path.is_file(),
        "{} missing: run scripts/test.sh",
        path.display()
    );
    c.bench_function("gguf_open_default_model", |b| {
        b.iter(|| black_box(Gguf::open(&path).unwrap()))
    });
    let g = Gguf::open(&path).unwrap();
    c.bench_function("tokenizer_from_gguf", |b| {
        b.iter(|| black_box(Tokenizer::from_gguf(&g).unwrap()))
    });
    let t = Tokenizer::from_gguf(&g).unwrap();
    let text = "The quick brown fox jumps over the lazy dog 1234. Ünïcödé 日本語 🚀\n".repeat(64);
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("4KB_text", |b| {
        b.iter(|| black_box(t.encode(&text, true).unwrap()))
    });
    group.finish();
    let ids = t.encode(&text, true).unwrap();
    let mut group = c.benchmark_group("stream_decode");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("per_token", |b| {
        b.iter(|| {
            let mut s = t.stream_decoder();
            let mut n = 0;
            for &i in &ids {
                n += s.push(i).len();
            }
            black_box(n)
        })
    });
    group.finish();
    let tmpl = ChatTemplate::from_tokenizer(&t).unwrap();
    let msgs = vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello! How can I help?"),
        ChatMessage::new("user", "Tell me a joke."),
    ];
    c.bench_function("chat_render_4_messages", |b| {
        b.iter(|| black_box(tmpl.render(&msgs, true).unwrap()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
