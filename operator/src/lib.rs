//! kvroute control plane: the `ModelDeployment` controller (the CRD's types are the crate
//! `kvroute-crd`), and what the `kvroute` binary runs besides it: `up` (agents and gateway on one
//! machine), `sim` and `explain`. The gateway is the crate `kvroute-gateway`.

pub mod controller;
pub mod explain;
pub mod k8s;
pub mod sim;
pub mod up;
