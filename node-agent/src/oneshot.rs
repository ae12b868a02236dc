//! `run` and `bench`: drive an [`InferenceBackend`] directly, without HTTP, for quick checks by
//! hand and throughput measurements. Generic over the backend, so both are tested with the
//! fake one.

use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvroute_engine::api::{EngineEvent, GenerateRequest, Prompt, SamplingParams};

use crate::backend::{ChatMessage, InferenceBackend, SubmitError};

/// Failures of `run` and `bench`.
#[derive(Debug, thiserror::Error)]
pub enum OneshotError {
    #[error(transparent)]
    Text(#[from] crate::backend::TextError),
    #[error("the engine refused the request: {0}")]
    Submit(#[from] SubmitError),
    #[error("generation failed: {0}")]
    Engine(String),
    #[error("the engine dropped the request")]
    Dropped,
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

/// What `run` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutput {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: &'static str,
}

/// Generates from `prompt` (rendered as one user message with `chat`), writing text to `out` as
/// it arrives.
pub fn run_once(
    backend: &dyn InferenceBackend,
    prompt: &str,
    chat: bool,
    params: SamplingParams,
    out: &mut dyn Write,
) -> Result<RunOutput, OneshotError> {
    let ids = if chat {
        let rendered = backend.render_chat(
            &[ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
            true,
        )?;
        backend.tokenize_chat(&rendered)?
    } else {
        backend.tokenize(prompt, true)?
    };
    let (tx, rx) = mpsc::channel();
    backend.submit(
        GenerateRequest {
            prompt: Prompt::Tokens(ids),
            params,
            cache_key: None,
            hold: None,
            dispatch: None,
            only_with_room: false,
        },
        Box::new(move |ev| tx.send(ev).is_ok()),
    )?;
    let mut text = String::new();
    for ev in rx {
        match ev {
            EngineEvent::Started { .. } => {}
            EngineEvent::Token(t) => {
                out.write_all(t.text.as_bytes())?;
                out.flush()?;
                text.push_str(&t.text);
            }
            EngineEvent::Finished { reason, usage } => {
                return Ok(RunOutput {
                    text,
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    finish_reason: reason.as_openai(),
                })
            }
            EngineEvent::Error(m) => return Err(OneshotError::Engine(m)),
            EngineEvent::NoRoom { need, room } => {
                return Err(OneshotError::Engine(format!(
                    "no room: needs {need} KV blocks, {room} free"
                )))
            }
        }
    }
    Err(OneshotError::Dropped)
}

/// Shape of a synthetic benchmark.
#[derive(Debug, Clone, Copy)]
pub struct BenchShape {
    pub requests: u32,
    pub concurrency: u32,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

/// What a benchmark measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    pub completed: u32,
    pub wall: Duration,
    pub output_tokens: u64,
    pub ttft_p50: Duration,
    pub ttft_p99: Duration,
}

impl BenchReport {
    pub fn requests_per_s(&self) -> f64 {
        f64::from(self.completed) / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn output_tokens_per_s(&self) -> f64 {
        self.output_tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "completed": self.completed,
            "wall_s": self.wall.as_secs_f64(),
            "req_per_s": self.requests_per_s(),
            "output_tok_per_s": self.output_tokens_per_s(),
            "ttft_p50_s": self.ttft_p50.as_secs_f64(),
            "ttft_p99_s": self.ttft_p99.as_secs_f64(),
        })
        .to_string()
    }
}

/// Runs `shape.requests` synthetic requests (distinct prompts of `prompt_tokens` ids, exactly
/// `output_tokens` greedy tokens each, EOS ignored), at most `shape.concurrency` at once.
pub fn bench(
    backend: Arc<dyn InferenceBackend>,
    shape: BenchShape,
) -> Result<BenchReport, OneshotError> {
    enum Msg {
        First(Duration),
        Done(u32),
        Failed(String),
    }
    let (tx, rx) = mpsc::channel::<Msg>();
    let start = Instant::now();
    let mut submitted = 0u32;
    let mut in_flight = 0u32;
    let mut completed = 0u32;
    let mut output_tokens = 0u64;
    let mut ttfts = Vec::with_capacity(shape.requests as usize);
    let submit = |i: u32| -> Result<(), OneshotError> {
        // Distinct first token per request: no prefix-cache hits between requests.
        let prompt: Vec<u32> = (0..shape.prompt_tokens.max(1))
            .map(|j| 100 + (i * 7919 + j * 31) % 20_000)
            .collect();
        let tx = tx.clone();
        let t0 = Instant::now();
        let mut first = true;
        backend.submit(
            GenerateRequest {
                prompt: Prompt::Tokens(prompt),
                params: SamplingParams {
                    max_tokens: shape.output_tokens.max(1),
                    temperature: 0.0,
                    ignore_eos: true,
                    ..SamplingParams::default()
                },
                cache_key: None,
                hold: None,
                dispatch: None,
                only_with_room: false,
            },
            Box::new(move |ev| {
                let msg = match ev {
                    EngineEvent::Token(_) if first => {
                        first = false;
                        Some(Msg::First(t0.elapsed()))
                    }
                    EngineEvent::Finished { usage, .. } => Some(Msg::Done(usage.completion_tokens)),
                    EngineEvent::Error(m) => Some(Msg::Failed(m)),
                    _ => None,
                };
                match msg {
                    Some(m) => tx.send(m).is_ok(),
                    None => true,
                }
            }),
        )?;
        Ok(())
    };
    while completed < shape.requests {
        while in_flight < shape.concurrency.max(1) && submitted < shape.requests {
            submit(submitted)?;
            submitted += 1;
            in_flight += 1;
        }
        match rx.recv() {
            Ok(Msg::First(d)) => ttfts.push(d),
            Ok(Msg::Done(n)) => {
                completed += 1;
                in_flight -= 1;
                output_tokens += u64::from(n);
            }
            Ok(Msg::Failed(m)) => return Err(OneshotError::Engine(m)),
            Err(_) => return Err(OneshotError::Dropped),
        }
    }
    let wall = start.elapsed();
    ttfts.sort();
    let pick = |q: f64| {
        ttfts
            .get(((ttfts.len() as f64 * q) as usize).min(ttfts.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(BenchReport {
        completed,
        wall,
        output_tokens,
        ttft_p50: pick(0.5),
        ttft_p99: pick(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{FakeBackend, FakeConfig};

    #[test]
    fn run_streams_the_text_and_reports_usage() {
        let b = FakeBackend::start(FakeConfig::default());
        let mut out = Vec::new();
        let r = run_once(
            b.as_ref(),
            "hello",
            false,
            SamplingParams {
                max_tokens: 5,
                temperature: 0.0,
                ..SamplingParams::default()
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), r.text);
        assert_eq!(r.completion_tokens, 5);
        assert_eq!(r.prompt_tokens, 5);
        assert_eq!(r.finish_reason, "length");
        b.shutdown();
    }

    #[test]
    fn bench_completes_every_request_with_exact_output() {
        let b = FakeBackend::start(FakeConfig {
            step: Duration::from_micros(100),
            ..FakeConfig::default()
        });
        let r = bench(
            b.clone(),
            BenchShape {
                requests: 12,
                concurrency: 4,
                prompt_tokens: 9,
                output_tokens: 6,
            },
        )
        .unwrap();
        assert_eq!(r.completed, 12);
        assert_eq!(r.output_tokens, 72);
        assert!(r.ttft_p50 <= r.ttft_p99);
        let j: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(j["completed"], 12);
        b.shutdown();
    }
}
