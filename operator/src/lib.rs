//! kvroute control plane: the `ModelDeployment` CRD and its controller, and the gateway that
//! routes and admits requests by free KV blocks.

pub mod gateway;
pub mod up;
