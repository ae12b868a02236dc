//! The capacity view: one `WatchCapacity` stream per agent, feeding the router.
//!
//! Each agent gets a task that subscribes (with block events), hands every report to the router,
//! and on any failure marks the agent disconnected and reconnects with exponential backoff.
//! Staleness is judged by the policy from report arrival times; a stream that stays silent longer
//! than `idle_reconnect` is torn down and redialled (a half-open connection to a paused or
//! vanished host otherwise never errors). This module never decides anything about routing.

use std::sync::Arc;
use std::time::Duration;

use kvroute_proto::v1::block_event::{Kind, Tier};
use kvroute_proto::{AgentClient, CapacityReport, WatchCapacityRequest};
use tonic::transport::Endpoint;

use super::router::Router;
use kvroute_routing::{CacheEvent, Report, Slot};

/// Reconnect and timeout settings for capacity streams.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Redial when nothing (not even a heartbeat) arrived for this long.
    pub idle_reconnect: Duration,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            idle_reconnect: Duration::from_secs(10),
        }
    }
}

/// Converts a wire report into the policy's report.
pub fn to_policy_report(r: CapacityReport) -> Report {
    let events = r
        .events
        .iter()
        .filter_map(|e| match (e.kind(), Tier::try_from(e.tier).ok()?) {
            (Kind::Stored, Tier::Host) => Some(CacheEvent::HostStored(e.block_hashes.clone())),
            (Kind::Removed, Tier::Host) => Some(CacheEvent::HostRemoved(e.block_hashes.clone())),
            // Use events speak of device blocks only.
            (Kind::InUse | Kind::Evictable, Tier::Host) => None,
            (Kind::Stored, _) => Some(CacheEvent::Stored(e.block_hashes.clone())),
            (Kind::Removed, _) => Some(CacheEvent::Removed(e.block_hashes.clone())),
            (Kind::AllCleared, _) => Some(CacheEvent::AllCleared),
            (Kind::InUse, _) => Some(CacheEvent::InUse(e.block_hashes.clone())),
            (Kind::Evictable, _) => Some(CacheEvent::Evictable(e.block_hashes.clone())),
            (Kind::Unspecified, _) => None,
        })
        .collect();
    Report {
        agent_id: r.agent_id,
        epoch: r.epoch,
        sequence: r.sequence,
        model: r.model,
        block_size: r.block_size,
        total_blocks: r.total_blocks,
        free_blocks: r.free_blocks,
        cached_evictable_blocks: r.cached_evictable_blocks,
        running_requests: r.running_requests,
        waiting_requests: r.waiting_requests,
        requests_received: r.requests_received,
        preemptions: r.preemptions,
        gpu_utilization_percent: r.gpu.map(|g| g.utilization_percent),
        max_model_len: r.max_model_len,
        prefill_tokens_per_s: r.prefill_tokens_per_second,
        decode_step_us: r.decode_step_micros,
        decode_batch: r.decode_batch,
        decode_step_per_seq_ns: r.decode_step_per_seq_nanos,
        decode_step_per_kv_token_ps: r.decode_step_per_kv_token_picos,
        running_kv_tokens: r.running_kv_tokens,
        room_released_blocks: r.room_released_blocks,
        waiting_prefill_tokens: r.waiting_prefill_tokens,
        running_prefill_tokens: r.running_prefill_tokens,
        snapshot: r.snapshot,
        block_use_events: r.block_use_events,
        events,
        dispatch_acks: r.dispatch_acks,
        draining: r.draining,
        acked_dispatches: r.acked_dispatches,
        host_total_blocks: r.host_total_blocks,
        host_used_blocks: r.host_used_blocks,
        host_copy_block_ns: r.host_copy_block_nanos,
    }
}

/// Why one subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("invalid gRPC address {0:?}: {1}")]
    Address(String, String),
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("no report for {0:?}")]
    Idle(Duration),
    #[error("stream ended")]
    Ended,
}

/// Watches the agent at `grpc` (e.g. `http://127.0.0.1:9001`) forever, feeding `router` slot `slot`.
pub async fn watch_agent(router: Arc<Router>, slot: Slot, grpc: String, settings: WatchSettings) {
    let mut backoff = settings.backoff_initial;
    loop {
        let mut got_report = false;
        let err = subscribe(&router, slot, &grpc, settings, &mut got_report).await;
        router.on_disconnect(slot);
        if got_report {
            backoff = settings.backoff_initial;
        }
        tracing::warn!(slot, grpc = %grpc, error = %err, backoff_ms = backoff.as_millis() as u64, "capacity stream down; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(settings.backoff_max);
    }
}

async fn subscribe(
    router: &Arc<Router>,
    slot: Slot,
    grpc: &str,
    settings: WatchSettings,
    got_report: &mut bool,
) -> WatchError {
    let endpoint = match Endpoint::from_shared(grpc.to_string()) {
        Ok(e) => e
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true),
        Err(e) => return WatchError::Address(grpc.to_string(), e.to_string()),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    let mut client = AgentClient::new(channel);
    let request = WatchCapacityRequest {
        subscriber: router.gateway_id().to_string(),
        include_block_events: true,
        dispatcher: router.gateway_id().to_string(),
    };
    let mut request = tonic::Request::new(request);
    if let Some(v) = router
        .agent_token()
        .and_then(|t| kvroute_contract::token::bearer(t).parse().ok())
    {
        request.metadata_mut().insert("authorization", v);
    }
    let mut stream = match client.watch_capacity(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return s.into(),
    };
    loop {
        match tokio::time::timeout(settings.idle_reconnect, stream.message()).await {
            Err(_) => return WatchError::Idle(settings.idle_reconnect),
            Ok(Err(s)) => return s.into(),
            Ok(Ok(None)) => return WatchError::Ended,
            Ok(Ok(Some(report))) => {
                if !*got_report {
                    tracing::info!(slot, agent = %report.agent_id, epoch = report.epoch, free = report.free_blocks, "capacity stream up");
                }
                *got_report = true;
                router.on_report(slot, to_policy_report(report));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_proto::BlockEvent;

    #[test]
    fn wire_events_become_policy_events_and_unknown_kinds_are_dropped() {
        let ev = |kind: i32, h: Vec<u64>| BlockEvent {
            kind,
            block_hashes: h,
            tier: Tier::Device as i32,
        };
        let host = |kind: i32, h: Vec<u64>| BlockEvent {
            kind,
            block_hashes: h,
            tier: Tier::Host as i32,
        };
        let r = to_policy_report(CapacityReport {
            block_use_events: true,
            events: vec![
                ev(Kind::Stored as i32, vec![1, 2]),
                ev(Kind::Evictable as i32, vec![2]),
                ev(Kind::InUse as i32, vec![2]),
                ev(Kind::Removed as i32, vec![1]),
                ev(Kind::AllCleared as i32, Vec::new()),
                // A kind from a newer agent: skipped, not misread.
                ev(99, vec![3]),
                host(Kind::Stored as i32, vec![4]),
                host(Kind::Removed as i32, vec![4]),
                // Use events of the host tier mean nothing; a tier from a newer agent is
                // skipped, not read as the device.
                host(Kind::InUse as i32, vec![4]),
                BlockEvent {
                    tier: 7,
                    ..ev(Kind::Stored as i32, vec![5])
                },
            ],
            ..CapacityReport::default()
        });
        assert!(r.block_use_events);
        assert_eq!(
            r.events,
            vec![
                CacheEvent::Stored(vec![1, 2]),
                CacheEvent::Evictable(vec![2]),
                CacheEvent::InUse(vec![2]),
                CacheEvent::Removed(vec![1]),
                CacheEvent::AllCleared,
                CacheEvent::HostStored(vec![4]),
                CacheEvent::HostRemoved(vec![4]),
            ]
        );
    }
}
