//! The gateway's request errors and their OpenAI-style HTTP answers.
//!
//! Every error a client can cause or meet maps to a status and an
//! `{"error":{"message","type","param","code"}}` body; 429s carry `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use kvroute_routing::Reject;

/// Errors answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// Breaks a rule of the OpenAI API as the agents apply it (`kvroute_openai`).
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{0}")]
    PromptTooLarge(String),
    #[error("the model `{0}` does not exist or no agent serves it")]
    ModelNotFound(String),
    #[error("the admission queue is full; retry later")]
    QueueFull { retry_after_s: u64 },
    #[error("no agent had room for this request within the queue deadline; retry later")]
    QueueTimeout { retry_after_s: u64 },
    #[error("request body too large (limit {0} bytes)")]
    BodyTooLarge(usize),
    #[error("no agent could be reached: {0}")]
    Upstream(String),
    /// No API key, or one not in the key file.
    #[error("{0}")]
    Unauthorized(String),
    /// Over a guardrail of the request's API key.
    #[error("{message}")]
    KeyLimit {
        message: String,
        param: Option<&'static str>,
        /// `Some`: a rate or concurrency limit (429, retry then); `None`: can never pass (400).
        retry_after_s: Option<u64>,
    },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest { .. } | Error::Invalid { .. } | Error::PromptTooLarge(_) => {
                StatusCode::BAD_REQUEST
            }
            Error::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Error::QueueFull { .. } | Error::QueueTimeout { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Upstream(_) => StatusCode::BAD_GATEWAY,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::KeyLimit {
                retry_after_s: Some(_),
                ..
            } => StatusCode::TOO_MANY_REQUESTS,
            Error::KeyLimit { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// Short label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::BadRequest { .. } | Error::Invalid { .. } => "bad_request",
            Error::PromptTooLarge(_) => "prompt_too_large",
            Error::ModelNotFound(_) => "model_not_found",
            Error::QueueFull { .. } => "queue_full",
            Error::QueueTimeout { .. } => "queue_timeout",
            Error::BodyTooLarge(_) => "body_too_large",
            Error::Upstream(_) => "upstream",
            Error::Unauthorized(_) => "unauthorized",
            Error::KeyLimit { .. } => "key_limit",
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Error::BadRequest { .. } => ("invalid_request_error", None),
            Error::Invalid { code, .. } => ("invalid_request_error", *code),
            Error::PromptTooLarge(_) => ("invalid_request_error", Some("context_length_exceeded")),
            Error::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Error::QueueFull { .. } | Error::QueueTimeout { .. } => {
                ("rate_limit_error", Some("rate_limit_exceeded"))
            }
            Error::BodyTooLarge(_) => ("invalid_request_error", None),
            Error::Upstream(_) => ("api_error", Some("upstream_unavailable")),
            Error::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            Error::KeyLimit {
                retry_after_s: Some(_),
                ..
            } => ("rate_limit_error", Some("rate_limit_exceeded")),
            Error::KeyLimit { .. } => ("invalid_request_error", Some("key_limit_exceeded")),
        }
    }

    /// The OpenAI error object.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            Error::BadRequest { param, .. } => *param,
            Error::Invalid { param, .. } => param.as_deref(),
            Error::PromptTooLarge(_) => Some("messages"),
            Error::ModelNotFound(_) => Some("model"),
            Error::KeyLimit { param, .. } => *param,
            _ => None,
        };
        serde_json::json!({
            "error": { "message": self.to_string(), "type": kind, "param": param, "code": code }
        })
    }

    /// From a policy rejection.
    pub fn from_reject(model: &str, r: Reject) -> Self {
        match r {
            Reject::UnknownModel => Error::ModelNotFound(model.to_string()),
            Reject::PromptTooLarge {
                prompt_blocks,
                largest_pool,
            } => Error::PromptTooLarge(format!(
                "this prompt needs {prompt_blocks} KV blocks, more than any agent's whole KV cache \
                 ({largest_pool} blocks); it can never be served: shorten it"
            )),
            Reject::PromptTooLong {
                prompt_tokens,
                max_model_len,
            } => Error::PromptTooLarge(format!(
                "this prompt has {prompt_tokens} tokens; the model's maximum context length is \
                 {max_model_len} tokens"
            )),
        }
    }
}

impl From<kvroute_openai::RequestError> for Error {
    fn from(e: kvroute_openai::RequestError) -> Self {
        Error::Invalid {
            message: e.message,
            param: e.param,
            code: e.code,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Error::QueueFull { retry_after_s }
        | Error::QueueTimeout { retry_after_s }
        | Error::KeyLimit {
            retry_after_s: Some(retry_after_s),
            ..
        } = self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after_s.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
