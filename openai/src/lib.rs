//! The OpenAI completion and chat-completion request rules, written once for the agent (which
//! serves the request) and the gateway (which must refuse what the agent would refuse before it
//! reserves any KV room for it).
//!
//! Requests are read field by field from a JSON object so that every wrong type or out-of-range
//! value is answered with the offending parameter's name (`param`) in an OpenAI-style error
//! body. Unknown fields are ignored, as OpenAI-compatible servers do. No I/O, no HTTP types.

use std::fmt;

use serde_json::{Map, Value};

/// Largest request body the agent and the gateway accept by default (`--max-body-bytes`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;

/// Bodies longer than this are parsed on a blocking thread by the servers: parsing megabytes of
/// JSON on an async worker holds up every other request's bytes and the capacity streams that
/// share the workers (64 concurrent 16 MiB bodies made an agent's reports late enough for the
/// gateway to count it stale).
pub const PARSE_INLINE_MAX_BYTES: usize = 256 << 10;

/// A request that breaks a rule: answered as a 400 `invalid_request_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
    /// The offending field, e.g. `temperature` or `messages[2].role`.
    pub param: Option<String>,
    /// OpenAI's error code where there is one (`invalid_json`).
    pub code: Option<&'static str>,
}

impl RequestError {
    pub fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RequestError {}

/// One chat message, reduced to text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What to generate from, before tokenizing.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    Tokens(Vec<u32>),
    Chat {
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
    },
}

/// A validated completion or chat-completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: String,
    pub input: Input,
    /// `None`: as many as fit in the context (chat) or 16 (completions, OpenAI's default).
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub cache_salt: Option<String>,
    /// Subtracted from the logit of every token already generated (once), in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from the logit of every token already generated, times its count, in [-2, 2].
    pub frequency_penalty: f32,
    /// Log-probabilities asked for: `Some(n)` = the sampled token's and the `n` most likely
    /// alternatives' (0..=[`MAX_LOGPROBS`]). Completions: `logprobs: n`; chat: `logprobs: true`
    /// with `top_logprobs: n`.
    pub logprobs: Option<u32>,
    /// Completions: the output starts with the prompt.
    pub echo: bool,
}

/// Most alternatives `logprobs` / `top_logprobs` may ask for (OpenAI's chat limit).
pub const MAX_LOGPROBS: u32 = 20;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// Longest `cache_salt` accepted (it is hashed into every block of the request, by the agent
/// and by the gateway; a gateway isolating tenants prefixes the tenant to it).
pub const MAX_CACHE_SALT_BYTES: usize = 256;

fn type_err(param: &str, want: &str) -> RequestError {
    RequestError::new(format!("`{param}` must be {want}"), Some(param))
}

fn opt<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn get_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, RequestError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| type_err(k, "a boolean")),
    }
}

fn get_f64(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, RequestError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| type_err(k, "a number")),
    }
}

fn get_int(o: &Map<String, Value>, k: &str) -> Result<Option<i64>, RequestError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => {
            if let Some(i) = v.as_i64() {
                return Ok(Some(i));
            }
            if v.as_u64().is_some() {
                return Err(RequestError::new(format!("`{k}` is too large"), Some(k)));
            }
            Err(type_err(k, "an integer"))
        }
    }
}

fn get_str<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, RequestError> {
    match opt(o, k) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| type_err(k, "a string")),
    }
}

fn token_ids(v: &Value, param: &str) -> Result<Vec<u32>, RequestError> {
    let arr = v
        .as_array()
        .ok_or_else(|| type_err(param, "an array of token ids"))?;
    arr.iter()
        .map(|t| {
            t.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| type_err(param, "an array of non-negative integer token ids"))
        })
        .collect()
}

/// Parses and validates a request body. `endpoint` selects the prompt field (`prompt` or
/// `messages`).
/// Parses and checks a request body.
pub fn parse_request(body: &[u8], endpoint: Endpoint) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        RequestError::new(format!("Request body is not valid JSON: {e}"), None)
            .with_code("invalid_json")
    })?;
    parse_value(&value, endpoint)
}

/// Checks an already parsed request body.
pub fn parse_value(value: &Value, endpoint: Endpoint) -> Result<Request, RequestError> {
    let Value::Object(o) = value else {
        return Err(RequestError::new(
            "Request body must be a JSON object",
            None,
        ));
    };
    let model = get_str(o, "model")?
        .ok_or_else(|| RequestError::new("`model` is required", Some("model")))?
        .to_string();

    let input = match endpoint {
        Endpoint::Completions => parse_prompt(o)?,
        Endpoint::Chat => parse_messages(o)?,
    };

    // Chat's newer name wins when both are given.
    let max_tokens = match get_int(o, "max_completion_tokens")? {
        Some(v) => Some(("max_completion_tokens", v)),
        None => get_int(o, "max_tokens")?.map(|v| ("max_tokens", v)),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some((param, v)) if v <= 0 => {
            return Err(RequestError::new(
                format!("`{param}` must be at least 1, got {v}"),
                Some(param),
            ))
        }
        Some((param, v)) => Some(
            u32::try_from(v)
                .map_err(|_| RequestError::new(format!("`{param}` is too large"), Some(param)))?,
        ),
    };

    let temperature = get_f64(o, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(RequestError::new(
            format!("`temperature` must be in [0, 2], got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = get_f64(o, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RequestError::new(
            format!("`top_p` must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let top_k = match get_int(o, "top_k")? {
        None => 0,
        // vLLM's convention: -1 (or 0) turns top-k off.
        Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k)
            .map_err(|_| RequestError::new("`top_k` is too large", Some("top_k")))?,
        Some(k) => {
            return Err(RequestError::new(
                format!("`top_k` must be -1, 0 or positive, got {k}"),
                Some("top_k"),
            ))
        }
    };
    // Negative seeds are accepted and reinterpreted bit for bit, as the OpenAI API takes any
    // 64-bit integer.
    let seed = get_int(o, "seed")?.map(|s| s as u64);
    if let Some(n) = get_int(o, "n")? {
        if n != 1 {
            return Err(RequestError::new(
                format!("only `n` = 1 is supported, got {n}"),
                Some("n"),
            ));
        }
    }
    let echo = get_bool(o, "echo")?.unwrap_or(false);
    if echo && endpoint == Endpoint::Chat {
        return Err(RequestError::new(
            "`echo` is a completions parameter",
            Some("echo"),
        ));
    }
    let mut penalties = [0.0f32; 2];
    for (i, k) in ["presence_penalty", "frequency_penalty"]
        .into_iter()
        .enumerate()
    {
        if let Some(v) = get_f64(o, k)? {
            if !(-2.0..=2.0).contains(&v) {
                return Err(RequestError::new(
                    format!("`{k}` must be in [-2, 2], got {v}"),
                    Some(k),
                ));
            }
            penalties[i] = v as f32;
        }
    }
    let logprobs = parse_logprobs(o, endpoint)?;
    if echo && logprobs.is_some() {
        return Err(RequestError::new(
            "`echo` with `logprobs` is not supported (it needs the prompt's log-probabilities)",
            Some("echo"),
        ));
    }
    let stop = match opt(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| type_err("stop", "a string or an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(type_err("stop", "a string or an array of strings")),
    };
    if stop.len() > 16 || stop.iter().any(String::is_empty) {
        return Err(RequestError::new(
            "`stop` takes at most 16 non-empty strings",
            Some("stop"),
        ));
    }
    let stop_token_ids = match opt(o, "stop_token_ids") {
        None => Vec::new(),
        Some(v) => token_ids(v, "stop_token_ids")?,
    };
    let ignore_eos = get_bool(o, "ignore_eos")?.unwrap_or(false);
    let stream = get_bool(o, "stream")?.unwrap_or(false);
    let include_usage = match opt(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => get_bool(so, "include_usage")
            .map_err(|_| type_err("stream_options.include_usage", "a boolean"))?
            .unwrap_or(false),
        Some(_) => return Err(type_err("stream_options", "an object")),
    };
    let cache_salt = get_str(o, "cache_salt")?.map(str::to_string);
    if cache_salt
        .as_ref()
        .is_some_and(|s| s.len() > MAX_CACHE_SALT_BYTES)
    {
        return Err(RequestError::new(
            format!("`cache_salt` must be at most {MAX_CACHE_SALT_BYTES} bytes"),
            Some("cache_salt"),
        ));
    }
    Ok(Request {
        model,
        input,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        stop,
        stop_token_ids,
        ignore_eos,
        stream,
        include_usage,
        cache_salt,
        presence_penalty: penalties[0],
        frequency_penalty: penalties[1],
        logprobs,
        echo,
    })
}

/// `logprobs` as each endpoint spells it (see [`Request::logprobs`]).
fn parse_logprobs(o: &Map<String, Value>, endpoint: Endpoint) -> Result<Option<u32>, RequestError> {
    let count = |param: &str, v: &Value| -> Result<u32, RequestError> {
        match v.as_u64() {
            Some(n) if n <= u64::from(MAX_LOGPROBS) => Ok(n as u32),
            _ => Err(RequestError::new(
                format!("`{param}` must be an integer from 0 to {MAX_LOGPROBS}"),
                Some(param),
            )),
        }
    };
    match endpoint {
        Endpoint::Completions => match opt(o, "logprobs") {
            None => Ok(None),
            Some(v) => count("logprobs", v).map(Some),
        },
        Endpoint::Chat => {
            let on = match opt(o, "logprobs") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(type_err("logprobs", "a boolean")),
            };
            match (on, opt(o, "top_logprobs")) {
                (false, None) => Ok(None),
                (true, None) => Ok(Some(0)),
                (true, Some(v)) => count("top_logprobs", v).map(Some),
                (false, Some(_)) => Err(RequestError::new(
                    "`top_logprobs` needs `logprobs: true`",
                    Some("top_logprobs"),
                )),
            }
        }
    }
}

fn parse_prompt(o: &Map<String, Value>) -> Result<Input, RequestError> {
    let p = opt(o, "prompt")
        .ok_or_else(|| RequestError::new("`prompt` is required", Some("prompt")))?;
    let input = match p {
        Value::String(s) => Input::Text(s.clone()),
        Value::Array(a) if a.is_empty() => {
            return Err(RequestError::new(
                "`prompt` must not be empty",
                Some("prompt"),
            ))
        }
        Value::Array(a) => match &a[0] {
            Value::String(_) if a.len() == 1 => {
                Input::Text(a[0].as_str().unwrap_or_default().into())
            }
            Value::String(_) => {
                return Err(RequestError::new(
                    "only one prompt per request is supported",
                    Some("prompt"),
                ))
            }
            Value::Number(_) => Input::Tokens(token_ids(p, "prompt")?),
            Value::Array(_) if a.len() == 1 => Input::Tokens(token_ids(&a[0], "prompt")?),
            _ => {
                return Err(type_err(
                    "prompt",
                    "a string, an array of token ids, or a one-element array of either",
                ))
            }
        },
        _ => return Err(type_err("prompt", "a string or an array of token ids")),
    };
    let empty = match &input {
        Input::Text(s) => s.is_empty(),
        Input::Tokens(t) => t.is_empty(),
        Input::Chat { .. } => false,
    };
    if empty {
        return Err(RequestError::new(
            "`prompt` must not be empty",
            Some("prompt"),
        ));
    }
    Ok(input)
}

fn parse_messages(o: &Map<String, Value>) -> Result<Input, RequestError> {
    let msgs = opt(o, "messages")
        .ok_or_else(|| RequestError::new("`messages` is required", Some("messages")))?
        .as_array()
        .ok_or_else(|| type_err("messages", "an array of messages"))?;
    if msgs.is_empty() {
        return Err(RequestError::new(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let param = format!("messages[{i}]");
        let m = m.as_object().ok_or_else(|| {
            RequestError::new(format!("`{param}` must be an object"), Some(&param))
        })?;
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            let p = format!("{param}.role");
            RequestError::new(format!("`{p}` must be a string"), Some(&p))
        })?;
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            let p = format!("{param}.role");
            return Err(RequestError::new(
                format!(
                    "`{p}` must be one of system, developer, user, assistant, tool; got {role:?}"
                ),
                Some(&p),
            ));
        }
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    let p = format!("{param}.content[{j}]");
                    let kind = part.get("type").and_then(Value::as_str);
                    match (kind, part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(RequestError::new(
                                format!(
                                    "`{p}` must be a text part {{\"type\":\"text\",\"text\":...}}"
                                ),
                                Some(&p),
                            ))
                        }
                    }
                }
                text
            }
            Some(_) => {
                let p = format!("{param}.content");
                return Err(type_err(&p, "a string or an array of text parts"));
            }
        };
        let role = if role == "developer" { "system" } else { role };
        out.push(ChatMessage {
            role: role.to_string(),
            content,
        });
    }
    let add_generation_prompt = get_bool(o, "add_generation_prompt")?.unwrap_or(true);
    Ok(Input::Chat {
        messages: out,
        add_generation_prompt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_rule_set_for_bytes_and_parsed_values() {
        let body = json!({"model": "m", "prompt": "hi", "temperature": 2.5});
        let from_value = parse_value(&body, Endpoint::Completions).unwrap_err();
        let from_bytes =
            parse_request(body.to_string().as_bytes(), Endpoint::Completions).unwrap_err();
        assert_eq!(from_value, from_bytes);
        assert_eq!(from_value.param.as_deref(), Some("temperature"));
        assert!(from_value.to_string().contains("[0, 2]"));
        let not_json = parse_request(b"{", Endpoint::Chat).unwrap_err();
        assert_eq!(not_json.code, Some("invalid_json"));
        assert!(parse_value(&json!([1]), Endpoint::Chat).is_err());
        let ok = parse_value(
            &json!({"model": "m", "messages": [{"role": "developer", "content": "x"}], "max_completion_tokens": 3}),
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(ok.max_tokens, Some(3));
        let Input::Chat { messages, .. } = ok.input else {
            panic!("not chat")
        };
        assert_eq!(messages[0].role, "system");
    }

    #[test]
    fn cache_salt_is_a_bounded_string() {
        let with = |salt: serde_json::Value| {
            parse_value(
                &json!({"model": "m", "prompt": "hi", "cache_salt": salt}),
                Endpoint::Completions,
            )
        };
        assert_eq!(
            with(json!("tenant-a")).unwrap().cache_salt.as_deref(),
            Some("tenant-a")
        );
        let max = "s".repeat(MAX_CACHE_SALT_BYTES);
        assert!(with(json!(max)).is_ok());
        for bad in [
            json!("s".repeat(MAX_CACHE_SALT_BYTES + 1)),
            json!(7),
            json!(["a"]),
        ] {
            let e = with(bad.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("cache_salt"), "{bad}: {e}");
        }
    }

    #[test]
    fn logprobs_and_penalties_as_each_endpoint_spells_them() {
        let chat = |extra: serde_json::Value| {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            parse_value(&b, Endpoint::Chat)
        };
        assert_eq!(chat(json!({})).unwrap().logprobs, None);
        assert_eq!(chat(json!({"logprobs": false})).unwrap().logprobs, None);
        assert_eq!(chat(json!({"logprobs": true})).unwrap().logprobs, Some(0));
        assert_eq!(
            chat(json!({"logprobs": true, "top_logprobs": 20}))
                .unwrap()
                .logprobs,
            Some(20)
        );
        let c = |extra: serde_json::Value| {
            let mut b = json!({"model": "m", "prompt": "x"});
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            parse_value(&b, Endpoint::Completions)
        };
        assert_eq!(c(json!({"logprobs": 0})).unwrap().logprobs, Some(0));
        assert_eq!(c(json!({"logprobs": 5})).unwrap().logprobs, Some(5));
        assert_eq!(c(json!({"logprobs": null})).unwrap().logprobs, None);
        assert!(c(json!({"logprobs": true})).is_err());
        let r = c(json!({"presence_penalty": -2, "frequency_penalty": 1.5})).unwrap();
        assert_eq!((r.presence_penalty, r.frequency_penalty), (-2.0, 1.5));
        assert!(c(json!({"frequency_penalty": -2.01})).is_err());
    }
}
