//! kvroute's Kubernetes API, shared by the operator (which reconciles it) and the gateway (which
//! discovers agents and reads routing settings through it):
//!
//! - the `ModelDeployment` custom resource (`kvroute.dev/v1alpha1`: spec, status, schema and
//!   validation; re-exported from its module);
//! - [`names`]: the labels, ports and derived names agents are found by;
//! - [`fixtures`]: valid objects for tests.

pub mod fixtures;
pub mod names;
mod resource;

pub use resource::*;
