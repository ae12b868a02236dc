//! kvroute's routing core, pure data and pure functions: no I/O, no clock, no random source of
//! its own, no async runtime (the compiler enforces it: this crate depends on nothing). The
//! gateway's capacity streams, its HTTP server and the simulator feed it, so tests drive exactly
//! the code that runs in production.
//!
//! - [`cluster`]: what the gateway knows of each agent, the reservation ledger, the prefix index
//!   and the prompts in flight ("the cluster view");
//! - [`pipeline`]: a decision as filters → weighted [`Scorer`](scorer::Scorer)s → a picker;
//!   [`scorer`]: what a scorer sees; [`scorers`]: the built-in ones; [`registry`]: scorers by name; [`policy`]: the presets and what a decision takes and
//!   gives; [`cost`]: the `kv` policy's model of a request's time on an agent;
//! - [`admission`]: the priority- and tenant-fair admission queue; [`queue`]: one pass over it
//!   (each queued request decided with what the ones before it claimed or held), run by the
//!   gateway's router and the simulator alike;
//! - [`autoscale`]: how many replicas a model needs from its KV signal (used by the operator).

pub mod admission;
pub mod autoscale;
pub mod cluster;
pub mod cost;
pub(crate) mod index;
pub mod pipeline;
pub mod policy;
pub mod queue;
pub mod registry;
pub mod scorer;
pub mod scorers;
pub mod sent;

#[cfg(test)]
mod tests;

pub use cluster::{AgentState, CacheEvent, Cluster, Report, ReservationHandle};
pub use policy::{
    CacheAwareParams, Decision, HeldPrefixes, PolicyConfig, PolicyKind, RandomSource, Reject,
    Route, RouteRequest, ScorerId, ScorerList, Slot, SplitMix64, Weights,
};
pub use registry::ScorerRegistry;
pub use scorer::{AgentView, Candidate, ScoreContext, Scorer};
