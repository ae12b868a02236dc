//! The OpenAI request and response shapes the agent speaks, and the validation of requests.
//!
//! Requests are read field by field from a JSON object so that every wrong type or out-of-range
//! value is answered with the offending parameter's name (`param`) in an OpenAI-style error
//! body. Unknown fields are ignored, as OpenAI-compatible servers do. This module does no I/O
//! and never talks to the engine; `http` does.

use axum::http::StatusCode;
use kvroute_openai::RequestError;
use serde_json::{json, Value};

/// An error answered to an API client as `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("Request body is larger than the limit of {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    pub fn unavailable(message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: Some(code),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

pub use kvroute_openai::{Endpoint, Input, Request};

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let mut a = ApiError::bad_request(e.message, e.param.as_deref());
        a.code = e.code;
        a
    }
}

/// Parses and checks a request body (the rules are `kvroute_openai`'s, shared with the gateway).
pub fn parse_request(body: &[u8], endpoint: Endpoint) -> Result<Request, ApiError> {
    Ok(kvroute_openai::parse_request(body, endpoint)?)
}

/// `usage` of a response.
pub fn usage_json(prompt: u32, completion: u32, cached: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_openai::ChatMessage;

    fn completions(body: &str) -> Result<Request, ApiError> {
        parse_request(body.as_bytes(), Endpoint::Completions)
    }

    fn chat(body: &str) -> Result<Request, ApiError> {
        parse_request(body.as_bytes(), Endpoint::Chat)
    }

    #[test]
    fn accepts_the_usual_shapes() {
        let r = completions(r#"{"model":"m","prompt":"hi","max_tokens":5,"temperature":0,"stop":"x","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(r.input, Input::Text("hi".into()));
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.temperature, 0.0);
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert!(r.stream && r.include_usage);
        let r = completions(r#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.input, Input::Tokens(vec![1, 2, 3]));
        let r = completions(r#"{"model":"m","prompt":[[4,5]],"unknown_field":{"x":1}}"#).unwrap();
        assert_eq!(r.input, Input::Tokens(vec![4, 5]));
        let r = chat(r#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},{"role":"user","content":"q"}],"max_completion_tokens":3,"max_tokens":9}"#).unwrap();
        assert_eq!(r.max_tokens, Some(3));
        match r.input {
            Input::Chat {
                messages,
                add_generation_prompt,
            } => {
                assert!(add_generation_prompt);
                assert_eq!(
                    messages[0],
                    ChatMessage {
                        role: "system".into(),
                        content: "ab".into()
                    }
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_bad_input_with_param() {
        let cases: &[(Endpoint, &str, Option<&str>)] = &[
            (Endpoint::Completions, "{not json", None),
            (Endpoint::Completions, "[1,2]", None),
            (Endpoint::Completions, r#"{"prompt":"x"}"#, Some("model")),
            (
                Endpoint::Completions,
                r#"{"model":5,"prompt":"x"}"#,
                Some("model"),
            ),
            (Endpoint::Completions, r#"{"model":"m"}"#, Some("prompt")),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":""}"#,
                Some("prompt"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":7}"#,
                Some("prompt"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":[-1]}"#,
                Some("prompt"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":-3}"#,
                Some("max_tokens"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":"5"}"#,
                Some("max_tokens"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","max_tokens":1.5}"#,
                Some("max_tokens"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","temperature":2.5}"#,
                Some("temperature"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","temperature":-0.1}"#,
                Some("temperature"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","temperature":"hot"}"#,
                Some("temperature"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","top_p":0}"#,
                Some("top_p"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","top_p":1.01}"#,
                Some("top_p"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","n":2}"#,
                Some("n"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","stream":"yes"}"#,
                Some("stream"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","stop":[1]}"#,
                Some("stop"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","logprobs":21}"#,
                Some("logprobs"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","echo":true,"logprobs":1}"#,
                Some("echo"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"echo":true}"#,
                Some("echo"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","logprobs":-1}"#,
                Some("logprobs"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","presence_penalty":2.5}"#,
                Some("presence_penalty"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":"x","frequency_penalty":"high"}"#,
                Some("frequency_penalty"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":3}"#,
                Some("logprobs"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                Some("top_logprobs"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                Some("top_logprobs"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[]}"#,
                Some("messages"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":"hi"}"#,
                Some("messages"),
            ),
            (Endpoint::Chat, r#"{"model":"m"}"#, Some("messages")),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                Some("messages[0].content"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}"#,
                Some("max_completion_tokens"),
            ),
        ];
        for (ep, body, param) in cases {
            let e = parse_request(body.as_bytes(), *ep).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), *param, "{body}: {e}");
            let b = e.body();
            assert_eq!(b["error"]["type"], "invalid_request_error");
            assert!(b["error"]["message"].as_str().unwrap().len() > 5);
        }
    }
}
