//! The naming contract between the operator and its readers (the gateway's agent discovery,
//! `kvroute explain`): the labels and ports agents are found by and the names derived from a
//! ModelDeployment's.

/// Label on every object the operator creates for a ModelDeployment: its name.
pub const LABEL_DEPLOYMENT: &str = "kvroute.dev/model-deployment";
/// `app.kubernetes.io/component` value of agent pods, Services (and so their EndpointSlices).
pub const COMPONENT_AGENT: &str = "agent";
/// `app.kubernetes.io/part-of` value of everything kvroute runs.
pub const PART_OF: &str = "kvroute";
/// Field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "kvroute-operator";
/// Agent HTTP (OpenAI API, probes) port and its name.
pub const HTTP_PORT: i32 = 8000;
pub const HTTP_PORT_NAME: &str = "http";
/// Agent gRPC (capacity service) port and its name.
pub const GRPC_PORT: i32 = 50051;
pub const GRPC_PORT_NAME: &str = "grpc";

/// Label selector (string form) matching every kvroute agent object in a namespace.
pub fn agent_selector() -> String {
    format!("app.kubernetes.io/component={COMPONENT_AGENT},app.kubernetes.io/part-of={PART_OF}")
}

/// Name of the agent workload (Deployment or DaemonSet) of a ModelDeployment.
pub fn workload_name(deployment: &str) -> String {
    format!("{deployment}-agent")
}

/// Name of the headless agent Service of a ModelDeployment.
pub fn service_name(deployment: &str) -> String {
    format!("{deployment}-agents")
}

/// Longest ModelDeployment name whose derived names stay valid DNS labels (63 characters).
pub const MAX_NAME_LEN: usize = 63 - "-agents".len();
