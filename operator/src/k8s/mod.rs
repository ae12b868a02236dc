//! Kubernetes helpers of the controller: the naming contract it shares with the gateway's agent
//! discovery ([`kvroute_crd::names`], re-exported here) and [`lease`] (leader election).

pub mod lease;

pub use kvroute_crd::names::*;
