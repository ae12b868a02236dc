//! `kvroute explain`: asks a running gateway where it would send a request now, and why,
//! without sending or reserving anything (`POST /v1/kvroute/explain`).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// `kvroute explain`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExplainArgs {
    /// The gateway, e.g. `http://127.0.0.1:8080`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub gateway: String,
    /// The model (the OpenAI `model` field).
    #[arg(long)]
    pub model: String,
    /// The prompt (a completion request), or with `--chat` the user message.
    #[arg(long)]
    pub prompt: String,
    /// Ask as a chat request (the model's chat template applies).
    #[arg(long)]
    pub chat: bool,
    /// Output tokens the request would ask for.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// API key for the gateway (one with `may_debug`); also `$KVROUTE_API_KEY`.
    #[arg(long, env = "KVROUTE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Why `kvroute explain` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("--gateway {0:?}: expected http://HOST:PORT")]
    Gateway(String),
    #[error("cannot reach the gateway at {0}: {1}")]
    Unreachable(String, String),
    #[error("the gateway answered {0}: {1}")]
    Refused(u16, String),
}

/// The request body `args` stand for.
pub fn body(args: &ExplainArgs) -> serde_json::Value {
    if args.chat {
        serde_json::json!({"model": args.model, "max_tokens": args.max_tokens,
                           "messages": [{"role": "user", "content": args.prompt}]})
    } else {
        serde_json::json!({"model": args.model, "max_tokens": args.max_tokens,
                           "prompt": args.prompt})
    }
}

/// Asks the gateway; returns its answer (JSON).
pub async fn run(args: &ExplainArgs) -> Result<serde_json::Value, ExplainError> {
    let base = args.gateway.trim_end_matches('/');
    let uri: hyper::Uri = format!("{base}/v1/kvroute/explain")
        .parse()
        .map_err(|_| ExplainError::Gateway(args.gateway.clone()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(ExplainError::Gateway(args.gateway.clone()));
    }
    let mut req = hyper::Request::post(uri).header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(k) = &args.api_key {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body(args).to_string())))
        .map_err(|_| ExplainError::Gateway(args.gateway.clone()))?;
    let client = kvroute_gateway::proxy::http_client();
    let unreachable = |e: String| ExplainError::Unreachable(base.to_string(), e);
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| unreachable("no answer within 30 s".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(
        |_| serde_json::json!({"error": {"message": String::from_utf8_lossy(&bytes)}}),
    );
    if !status.is_success() {
        let msg = v["error"]["message"]
            .as_str()
            .map_or_else(|| v.to_string(), str::to_string);
        return Err(ExplainError::Refused(status.as_u16(), msg));
    }
    Ok(v)
}
