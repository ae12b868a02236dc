//! The controller's side of KV-aware autoscaling: the signal its agents' capacity reports give.
//! The policy, the signal's type and the decision are pure and live in
//! [`kvroute_routing::autoscale`] (re-exported here), beside the gateway that reports the same
//! signal for its queue.

pub use kvroute_routing::autoscale::*;

/// The signal the agents' capacity reports give: blocks in use, and the blocks the requests
/// waiting in their engines need (their prompts), beyond the room there is.
pub fn signal_of(reports: &[kvroute_proto::CapacityReport]) -> KvSignal {
    let mut s = KvSignal::default();
    let mut waiting_blocks = 0u64;
    let mut room = 0u64;
    for r in reports {
        s.used_blocks += r.total_blocks.saturating_sub(r.free_blocks);
        s.blocks_per_replica = s.blocks_per_replica.max(r.total_blocks);
        s.waiting_requests += u64::from(r.waiting_requests);
        waiting_blocks += r
            .waiting_prefill_tokens
            .div_ceil(u64::from(r.block_size.max(1)));
        room += r.free_blocks;
    }
    s.shortfall_blocks = waiting_blocks.saturating_sub(room);
    s
}
