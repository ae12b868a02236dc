//! Turns an OpenAI request body into what the policy needs: prompt token count, reserved output
//! tokens and the prompt's chained block hashes.
//!
//! The model's own tokenizer and chat template are fetched once per model from an agent
//! (`GET /v1/kvroute/model`) and cached, so there is no per-request round trip. Without them (an
//! agent that does not serve the endpoint), prompts are sized by a conservative byte estimate and
//! carry no block hashes: routing still works, without prefix affinity. This module never routes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use kvroute_text::chat::{ChatMessage, ChatTemplate};
use kvroute_text::tokenizer::Tokenizer;

use super::types::PromptPlan;

pub use kvroute_text::hash::block_hashes;

/// How many output tokens to reserve KV room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveOutput {
    /// The request's whole `max_tokens` (never over-admits).
    Full,
    /// At most this many (admits more, relies on the engine's own queue for the rest).
    Expected(u64),
}

/// Which OpenAI endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// The model facts the gateway needs to tokenize like the agent does.
pub struct ModelInfo {
    pub model: String,
    pub block_size: u32,
    pub max_model_len: u32,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelInfo")
            .field("model", &self.model)
            .field("block_size", &self.block_size)
            .field("tokenizer", &self.tokenizer.is_some())
            .finish()
    }
}

/// A bad request body (answered 400 with an OpenAI error).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    pub message: String,
    pub param: Option<&'static str>,
}

fn bad(message: impl Into<String>, param: Option<&'static str>) -> BadRequest {
    BadRequest {
        message: message.into(),
        param,
    }
}

/// A failure to get a model's info from an agent.
#[derive(Debug, thiserror::Error)]
pub enum ModelInfoError {
    #[error("model info: {0}")]
    Json(#[from] serde_json::Error),
    #[error("model info: tokenizer: {0}")]
    Tokenizer(String),
    #[error("model info: chat template: {0}")]
    Template(String),
}

impl ModelInfo {
    /// Parses the agent's `GET /v1/kvroute/model` body.
    pub fn from_json(body: &[u8]) -> Result<Self, ModelInfoError> {
        #[derive(serde::Deserialize)]
        struct Wire {
            model: String,
            block_size: u32,
            #[serde(default)]
            max_model_len: u32,
            #[serde(default)]
            tokenizer_json: Value,
            #[serde(default)]
            chat_template: Option<String>,
            #[serde(default)]
            bos_token: Option<String>,
            #[serde(default)]
            eos_token: Option<String>,
            #[serde(default)]
            add_bos: bool,
        }
        let w: Wire = serde_json::from_slice(body)?;
        // The tokenizer comes as an embedded JSON string or as a JSON object, in the engine's
        // serialized form (`Tokenizer::to_json`) or as a plain Hugging Face tokenizer.json.
        let tok_text = match w.tokenizer_json {
            Value::String(s) => Some(s),
            Value::Null => None,
            other => Some(other.to_string()),
        };
        let tokenizer = match tok_text {
            Some(t) => Some(
                Tokenizer::from_json(&t)
                    .or_else(|_| Tokenizer::from_hf_json(&t, None))
                    .map_err(|e| ModelInfoError::Tokenizer(e.to_string()))?,
            ),
            None => None,
        };
        let bos = w
            .bos_token
            .or_else(|| tokenizer.as_ref().and_then(Tokenizer::bos_token))
            .unwrap_or_default();
        let eos = w
            .eos_token
            .or_else(|| tokenizer.as_ref().and_then(Tokenizer::eos_token))
            .unwrap_or_default();
        let source = w.chat_template.filter(|t| !t.is_empty()).or_else(|| {
            tokenizer
                .as_ref()
                .and_then(|t| t.chat_template().map(str::to_string))
        });
        let chat_template = match source {
            Some(src) => Some(
                ChatTemplate::new(&src, &bos, &eos)
                    .map_err(|e| ModelInfoError::Template(e.to_string()))?,
            ),
            None => None,
        };
        // BOS is added by the engine's `encode(text, true)` when the model's config asks for
        // it, exactly as the agent tokenizes; `add_bos` is informational here.
        let _ = w.add_bos;
        Ok(Self {
            model: w.model,
            block_size: w.block_size.max(1),
            max_model_len: w.max_model_len,
            tokenizer,
            chat_template,
        })
    }
}

/// Model infos by model name, fetched lazily; failures are retried after a pause.
#[derive(Debug, Default)]
pub struct ModelCatalog {
    known: Mutex<HashMap<String, std::sync::Arc<ModelInfo>>>,
    failed: Mutex<HashMap<String, Instant>>,
}

impl ModelCatalog {
    pub fn get(&self, model: &str) -> Option<std::sync::Arc<ModelInfo>> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .cloned()
    }

    pub fn insert(&self, info: ModelInfo) -> std::sync::Arc<ModelInfo> {
        let info = std::sync::Arc::new(info);
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(info.model.clone(), info.clone());
        info
    }

    /// Whether a fetch for `model` should be tried now (not within 5 s of a failure).
    pub fn should_fetch(&self, model: &str) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed
            .get(model)
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
    }

    pub fn mark_failed(&self, model: &str) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string(), Instant::now());
    }
}

/// The request's `model` field.
pub fn model_of(body: &Value) -> Result<&str, BadRequest> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m),
        Some(_) => Err(bad("'model' must be a non-empty string", Some("model"))),
        None => Err(bad("you must provide a model parameter", Some("model"))),
    }
}

/// Whether the request asks for a stream.
pub fn is_stream(body: &Value) -> Result<bool, BadRequest> {
    match body.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad("'stream' must be a boolean", Some("stream"))),
    }
}

/// What a prompt is before tokenization.
enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

fn completion_prompt(body: &Value) -> Result<Vec<PromptInput>, BadRequest> {
    let p = body
        .get("prompt")
        .ok_or_else(|| bad("'prompt' is required", Some("prompt")))?;
    let as_tokens = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let err = || {
        bad(
            "'prompt' must be a string, an array of strings, or token ids",
            Some("prompt"),
        )
    };
    match p {
        Value::String(s) => Ok(vec![PromptInput::Text(s.clone())]),
        Value::Array(a) if a.is_empty() => Err(bad("'prompt' must not be empty", Some("prompt"))),
        Value::Array(a) if a.iter().all(Value::is_string) => Ok(a
            .iter()
            .filter_map(|v| v.as_str().map(|s| PromptInput::Text(s.to_string())))
            .collect()),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            Ok(vec![PromptInput::Tokens(as_tokens(a).ok_or_else(err)?)])
        }
        Value::Array(a) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|v| {
                v.as_array()
                    .and_then(|x| as_tokens(x))
                    .map(PromptInput::Tokens)
                    .ok_or_else(err)
            })
            .collect(),
        _ => Err(err()),
    }
}

/// The request's chat messages (OpenAI JSON, content parts joined as the engine does).
fn chat_messages(body: &Value) -> Result<Vec<ChatMessage>, BadRequest> {
    let msgs = body
        .get("messages")
        .ok_or_else(|| bad("'messages' is required", Some("messages")))?;
    let list = ChatMessage::from_openai(msgs).map_err(|e| bad(e.to_string(), Some("messages")))?;
    if list.is_empty() {
        return Err(bad("'messages' must not be empty", Some("messages")));
    }
    Ok(list)
}

/// Estimated tokens of text without a tokenizer: one per 3 bytes, rounded up (over-estimates
/// for English, so admission errs on the safe side).
fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(3).max(1)
}

/// Builds the routing plan for a request body.
pub fn plan(
    endpoint: Endpoint,
    body: &Value,
    info: Option<&ModelInfo>,
    reserve: ReserveOutput,
) -> Result<PromptPlan, BadRequest> {
    let model = model_of(body)?.to_string();
    let mut prompt_tokens: u64 = 0;
    let mut first_ids: Option<Vec<u32>> = None;
    let mut texts: Vec<String> = Vec::new();
    match endpoint {
        Endpoint::Completions => {
            for p in completion_prompt(body)? {
                match p {
                    PromptInput::Text(t) => texts.push(t),
                    PromptInput::Tokens(ids) => {
                        prompt_tokens += ids.len() as u64;
                        first_ids.get_or_insert(ids);
                    }
                }
            }
        }
        Endpoint::ChatCompletions => {
            let messages = chat_messages(body)?;
            let add_generation_prompt = match body.get("add_generation_prompt") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad(
                        "'add_generation_prompt' must be a boolean",
                        Some("add_generation_prompt"),
                    ))
                }
            };
            let rendered = info
                .and_then(|i| i.chat_template.as_ref())
                .and_then(|t| t.render(&messages, add_generation_prompt).ok());
            texts.push(rendered.unwrap_or_else(|| {
                messages
                    .iter()
                    .map(|m| format!("{}: {}\n", m.role, m.content))
                    .collect()
            }));
        }
    }
    for t in &texts {
        // As the agent does: special tokens in the text are recognised and BOS is added when
        // the model's config asks for it.
        match info
            .and_then(|i| i.tokenizer.as_ref())
            .map(|tok| tok.encode(t, true))
        {
            Some(Ok(ids)) => {
                prompt_tokens += ids.len() as u64;
                first_ids.get_or_insert(ids);
            }
            _ => prompt_tokens += estimate_tokens(t),
        }
    }
    let max_tokens_field = match endpoint {
        Endpoint::Completions => "max_tokens",
        Endpoint::ChatCompletions => {
            if body.get("max_completion_tokens").is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            }
        }
    };
    let max_len = info.map_or(0, |i| u64::from(i.max_model_len));
    let room = if max_len > 0 {
        max_len.saturating_sub(prompt_tokens).max(1)
    } else {
        4096
    };
    let asked = match body.get(max_tokens_field) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n >= 1 && *n <= u64::from(u32::MAX))
                .ok_or_else(|| {
                    bad(
                        format!("'{max_tokens_field}' must be a positive integer"),
                        Some("max_tokens"),
                    )
                })?,
        ),
    };
    let output = match (endpoint, asked) {
        (_, Some(n)) => n.min(room),
        (Endpoint::Completions, None) => 16,
        (Endpoint::ChatCompletions, None) => room,
    };
    let output_tokens = match reserve {
        ReserveOutput::Full => output,
        ReserveOutput::Expected(n) => output.min(n),
    };
    let block_size = info.map_or(16, |i| i.block_size);
    // The agent mixes the request's cache salt into its block hashes: so does the plan, or a
    // salted prompt would look cached where only its unsalted twin is.
    let salt = body
        .get("cache_salt")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let block_hashes = match &first_ids {
        Some(ids) if info.is_some() => block_hashes(ids, block_size as usize, salt.as_bytes()),
        _ => Vec::new(),
    };
    Ok(PromptPlan {
        model,
        prompt_tokens,
        output_tokens,
        block_size,
        block_hashes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hashes_are_chained_and_full_blocks_only() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7], 2, b"");
        assert_eq!(a.len(), 3);
        let b = block_hashes(&[1, 2, 9, 9, 5, 6], 2, b"");
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // Same block tokens after a different parent hash differently.
        assert_ne!(a[2], b[2]);
        assert_ne!(
            block_hashes(&[1, 2], 2, b"lora"),
            block_hashes(&[1, 2], 2, b"")
        );
    }

    #[test]
    fn a_cache_salt_is_mixed_into_the_plans_block_hashes_as_the_agent_does() {
        let info = ModelInfo {
            model: "m".into(),
            block_size: 2,
            max_model_len: 0,
            tokenizer: None,
            chat_template: None,
        };
        let hashes = |salt: Option<&str>| {
            let mut body = json!({"model": "m", "prompt": [1, 2, 3, 4, 5], "max_tokens": 1});
            if let Some(s) = salt {
                body["cache_salt"] = json!(s);
            }
            plan(
                Endpoint::Completions,
                &body,
                Some(&info),
                ReserveOutput::Full,
            )
            .map(|p| p.block_hashes)
            .unwrap_or_default()
        };
        assert_eq!(hashes(None), block_hashes(&[1, 2, 3, 4, 5], 2, b""));
        assert_eq!(
            hashes(Some("tenant:a")),
            block_hashes(&[1, 2, 3, 4, 5], 2, b"tenant:a")
        );
        assert_eq!(hashes(Some("tenant:a")).len(), 2);
        assert_ne!(hashes(Some("tenant:a"))[0], hashes(Some("tenant:b"))[0]);
    }

    #[test]
    fn validates_bodies() {
        let r = ReserveOutput::Full;
        assert!(plan(Endpoint::Completions, &json!({"prompt": "x"}), None, r).is_err());
        assert!(plan(
            Endpoint::Completions,
            &json!({"model": 3, "prompt": "x"}),
            None,
            r
        )
        .is_err());
        assert!(plan(Endpoint::Completions, &json!({"model": "m"}), None, r).is_err());
        assert!(plan(
            Endpoint::Completions,
            &json!({"model": "m", "prompt": {}}),
            None,
            r
        )
        .is_err());
        assert!(plan(
            Endpoint::Completions,
            &json!({"model": "m", "prompt": "x", "max_tokens": -1}),
            None,
            r
        )
        .is_err());
        assert!(plan(
            Endpoint::ChatCompletions,
            &json!({"model": "m", "messages": []}),
            None,
            r
        )
        .is_err());
        let p = plan(
            Endpoint::Completions,
            &json!({"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}),
            None,
            r,
        )
        .unwrap();
        assert_eq!((p.prompt_tokens, p.output_tokens), (3, 5));
        let p = plan(
            Endpoint::ChatCompletions,
            &json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 100}),
            None,
            ReserveOutput::Expected(10),
        )
        .unwrap();
        assert_eq!(p.output_tokens, 10);
        assert!(p.prompt_tokens > 0);
    }
}
