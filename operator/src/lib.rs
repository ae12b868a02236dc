//! kvroute control plane: the `ModelDeployment` CRD and its controller, and the gateway that
//! routes and admits requests by free KV blocks.
pub mod controller;
pub mod crd;
pub mod explain;
pub mod gateway;
pub mod k8s;
pub mod sim;
pub mod up;
