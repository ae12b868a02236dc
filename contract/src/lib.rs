//! What kvroute's processes agree on, written once: the formats of durations and sizes that the
//! agent's and gateway's flags and the `ModelDeployment` spec accept, the dispatch header a
//! gateway stamps on the requests it sends, and the Prometheus text format all three expose. (The wire protocol is `kvroute-proto`.) No
//! dependencies.

pub mod dispatch;
pub mod prom;
pub mod token;
pub mod units;
