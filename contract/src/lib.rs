//! What kvroute's processes agree on, written once: the formats of durations and sizes that the
//! agent's and gateway's flags and the `ModelDeployment` spec accept. (The wire protocol is
//! `kvroute-proto`.) No dependencies.

pub mod units;
