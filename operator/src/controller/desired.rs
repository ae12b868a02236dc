//! Desired state: the objects a `ModelDeployment` should own, as a pure function of its spec
//! and the operator's settings.
//!
//! Owns how an agent pod looks (flags as `KVROUTE_*` env, probes, ports, volumes, GPUs, security
//! context). Must never talk to the API server; `reconcile` applies what this returns.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, DeploymentStrategy,
    RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, ImageVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Toleration, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::k8s::{
    service_name, workload_name, COMPONENT_AGENT, GRPC_PORT, GRPC_PORT_NAME, HTTP_PORT,
    HTTP_PORT_NAME, LABEL_DEPLOYMENT, MAX_NAME_LEN, PART_OF,
};
use kvroute_crd::{Device, ModelDeployment, ModelFormat, ModelSource, SpecError};

/// Operator-wide settings that shape every agent.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentDefaults {
    /// Agent image when the spec names none.
    pub agent_image: String,
    /// Image of the init container that downloads `spec.model.url` (needs `curl`).
    pub fetch_image: String,
    /// Gateway base URL written into `status.endpoint`.
    pub gateway_endpoint: Option<String>,
    /// Prefixes (`registry/` or `registry/repo`) the images a spec names (`agentImage`,
    /// `model.image.reference`) must start with; empty: any image.
    pub allowed_image_prefixes: Vec<String>,
    /// Directories a spec's `model.hostPath` must lie in; empty: any path.
    pub allowed_host_paths: Vec<String>,
    /// Secret (in each ModelDeployment's namespace) and key holding the token agents require of
    /// every caller (their `--auth-token-file`); `None`: agents require none.
    pub agent_token: Option<(String, String)>,
}

/// Where an agent pod finds the token its callers must present.
pub const AGENT_TOKEN_DIR: &str = "/etc/kvroute/agent-token";

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            agent_image: "kvroute-agent:latest".into(),
            fetch_image: "curlimages/curl:8.11.1".into(),
            gateway_endpoint: None,
            allowed_image_prefixes: Vec::new(),
            allowed_host_paths: Vec::new(),
            agent_token: None,
        }
    }
}

impl AgentDefaults {
    /// Refuses an image the operator's `--allowed-image-prefix` list does not cover.
    fn check_image(&self, field: &'static str, image: &str) -> Result<(), DesiredError> {
        if self.allowed_image_prefixes.is_empty()
            || self
                .allowed_image_prefixes
                .iter()
                .any(|p| image.starts_with(p.as_str()))
        {
            return Ok(());
        }
        Err(DesiredError::ImageNotAllowed {
            field,
            image: image.to_string(),
            allowed: self.allowed_image_prefixes.join(", "),
        })
    }

    /// Refuses a host path outside the operator's `--allowed-host-path` directories (whole
    /// components: `/models` covers `/models/a.gguf`, not `/models-old/a.gguf`; no `..`).
    fn check_host_path(&self, path: &str) -> Result<(), DesiredError> {
        if self.allowed_host_paths.is_empty() {
            return Ok(());
        }
        let p = std::path::Path::new(path);
        let inside = p.is_absolute()
            && !p
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            && self
                .allowed_host_paths
                .iter()
                .any(|dir| p.starts_with(std::path::Path::new(dir)));
        if inside {
            Ok(())
        } else {
            Err(DesiredError::HostPathNotAllowed {
                path: path.to_string(),
                allowed: self.allowed_host_paths.join(", "),
            })
        }
    }
}

/// Why desired state could not be computed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DesiredError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("metadata.name {0:?} is longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("object has no {0} (not read from the API server?)")]
    MissingMeta(&'static str),
    #[error(
        "{field} {image:?} is not allowed: this operator accepts images starting with {allowed}"
    )]
    ImageNotAllowed {
        field: &'static str,
        image: String,
        allowed: String,
    },
    #[error("spec.model.hostPath {path:?} is not allowed: this operator accepts host paths in {allowed}")]
    HostPathNotAllowed { path: String, allowed: String },
}

/// The agent workload: a Deployment, or a DaemonSet when `placement.perNode`.
#[derive(Clone, Debug, PartialEq)]
pub enum Workload {
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
}

/// Everything one ModelDeployment owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub workload: Workload,
    pub service: Service,
    /// At most one agent of the model evicted at a time (a node drain, a cluster upgrade): each
    /// holds a KV cache and streams in flight, and evicting them all at once empties the pool.
    pub disruption_budget: PodDisruptionBudget,
}

/// Labels selecting the agent pods of one ModelDeployment.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/component".into(), COMPONENT_AGENT.into()),
        ("app.kubernetes.io/part-of".into(), PART_OF.into()),
        (LABEL_DEPLOYMENT.into(), name.into()),
    ])
}

/// Selector labels as a selector string (`status.selector`, pod lists).
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn object_labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert("app.kubernetes.io/name".into(), "kvroute-agent".into());
    l.insert("app.kubernetes.io/instance".into(), name.into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        crate::k8s::FIELD_MANAGER.into(),
    );
    l
}

/// Computes the objects `md` should own.
pub fn desired(md: &ModelDeployment, defaults: &AgentDefaults) -> Result<Desired, DesiredError> {
    md.spec.validate()?;
    if let Some(image) = &md.spec.agent_image {
        defaults.check_image("spec.agentImage", image)?;
    }
    match md.spec.model.source()? {
        ModelSource::Image(i) => {
            defaults.check_image("spec.model.image.reference", &i.reference)?
        }
        ModelSource::HostPath(p) => defaults.check_host_path(p)?,
        ModelSource::Url(_) | ModelSource::Pvc(_) => {}
    }
    let name = md
        .metadata
        .name
        .clone()
        .ok_or(DesiredError::MissingMeta("name"))?;
    if name.len() > MAX_NAME_LEN {
        return Err(DesiredError::NameTooLong(name));
    }
    let namespace = md
        .namespace()
        .ok_or(DesiredError::MissingMeta("namespace"))?;
    let owner = md
        .controller_owner_ref(&())
        .ok_or(DesiredError::MissingMeta("uid"))?;
    let meta = |obj_name: String| ObjectMeta {
        name: Some(obj_name),
        namespace: Some(namespace.clone()),
        labels: Some(object_labels(&name)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let template = pod_template(md, &name, defaults)?;
    let selector = LabelSelector {
        match_labels: Some(selector_labels(&name)),
        ..Default::default()
    };
    let workload = if md.spec.per_node() {
        Workload::DaemonSet(Box::new(DaemonSet {
            metadata: meta(workload_name(&name)),
            spec: DaemonSetSpec {
                selector,
                template,
                ..Default::default()
            },
            ..Default::default()
        }))
    } else {
        Workload::Deployment(Box::new(Deployment {
            metadata: meta(workload_name(&name)),
            spec: DeploymentSpec {
                replicas: Some(md.spec.replicas),
                selector,
                template,
                strategy: Some(rollout_strategy(md)),
                ..Default::default()
            },
            ..Default::default()
        }))
    };
    let service = Service {
        metadata: meta(service_name(&name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![
                service_port(HTTP_PORT_NAME, HTTP_PORT),
                service_port(GRPC_PORT_NAME, GRPC_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let disruption_budget = PodDisruptionBudget {
        metadata: meta(workload_name(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Desired {
        workload,
        service,
        disruption_budget,
    })
}

/// GPU agents roll one at a time without a surge pod (a surge pod would need a free GPU that
/// usually does not exist); CPU agents surge one so capacity never dips.
fn rollout_strategy(md: &ModelDeployment) -> DeploymentStrategy {
    let gpus = md.spec.resources.as_ref().and_then(|r| r.gpus).unwrap_or(0);
    let (surge, unavailable) = if gpus > 0 { (0, 1) } else { (1, 0) };
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(surge)),
            max_unavailable: Some(IntOrString::Int(unavailable)),
        }),
    }
}

/// Owner reference of `md` (used by tests and by `reconcile` to check ownership).
pub fn owner_ref(md: &ModelDeployment) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

const MODEL_VOLUME: &str = "model";
const MODEL_DIR: &str = "/models";

fn pod_template(
    md: &ModelDeployment,
    name: &str,
    defaults: &AgentDefaults,
) -> Result<PodTemplateSpec, DesiredError> {
    let spec = &md.spec;
    let model = &spec.model;
    let engine = spec.engine.clone().unwrap_or_default();
    let gpus = spec.resources.as_ref().and_then(|r| r.gpus).unwrap_or(0);
    let file = match model.format {
        ModelFormat::Gguf => "model.gguf",
        ModelFormat::Safetensors => "model",
    };

    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    let mut init_containers = Vec::new();
    let model_path = match model.source()? {
        ModelSource::Url(url) => {
            volumes.push(Volume {
                name: MODEL_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
            let target = format!("{MODEL_DIR}/{file}");
            init_containers.push(Container {
                name: "fetch-model".into(),
                image: Some(defaults.fetch_image.clone()),
                // No shell: the URL is one argv entry, never interpreted.
                command: Some(vec![
                    "curl".into(),
                    "--fail".into(),
                    "--silent".into(),
                    "--show-error".into(),
                    "--location".into(),
                    "--retry".into(),
                    "5".into(),
                    "--output".into(),
                    target.clone(),
                    url.into(),
                ]),
                volume_mounts: Some(vec![VolumeMount {
                    name: MODEL_VOLUME.into(),
                    mount_path: MODEL_DIR.into(),
                    ..Default::default()
                }]),
                security_context: Some(container_security()),
                ..Default::default()
            });
            mounts.push(read_only_mount(MODEL_DIR));
            target
        }
        ModelSource::Pvc(pvc) => {
            volumes.push(Volume {
                name: MODEL_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc.claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Default::default()
            });
            mounts.push(read_only_mount(MODEL_DIR));
            format!("{MODEL_DIR}/{}", pvc.path)
        }
        ModelSource::HostPath(path) => {
            let kind = match model.format {
                ModelFormat::Gguf => "File",
                ModelFormat::Safetensors => "Directory",
            };
            volumes.push(Volume {
                name: MODEL_VOLUME.into(),
                host_path: Some(HostPathVolumeSource {
                    path: path.into(),
                    type_: Some(kind.into()),
                }),
                ..Default::default()
            });
            let target = format!("{MODEL_DIR}/{file}");
            mounts.push(read_only_mount(&target));
            target
        }
        ModelSource::Image(image) => {
            volumes.push(Volume {
                name: MODEL_VOLUME.into(),
                image: Some(ImageVolumeSource {
                    reference: Some(image.reference.clone()),
                    pull_policy: Some("IfNotPresent".into()),
                }),
                ..Default::default()
            });
            mounts.push(read_only_mount(MODEL_DIR));
            format!("{MODEL_DIR}/{}", image.path)
        }
    };

    let device = engine
        .device
        .unwrap_or(if gpus > 0 { Device::Cuda } else { Device::Cpu });
    let mut envs = vec![
        env("KVROUTE_MODEL", model_path),
        env("KVROUTE_SERVED_MODEL_NAME", model.name.clone()),
        env("KVROUTE_HTTP", format!("0.0.0.0:{HTTP_PORT}")),
        env("KVROUTE_GRPC", format!("0.0.0.0:{GRPC_PORT}")),
        env("KVROUTE_DEVICE", device.as_flag()),
        EnvVar {
            name: "KVROUTE_AGENT_ID".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some(b) = engine.block_size {
        envs.push(env("KVROUTE_BLOCK_SIZE", b.to_string()));
    }
    if let Some(u) = engine.gpu_memory_utilization {
        envs.push(env("KVROUTE_GPU_MEMORY_UTILIZATION", u.to_string()));
    }
    if let Some(m) = &engine.kv_memory {
        envs.push(env("KVROUTE_KV_MEMORY", m.clone()));
    }
    if let Some(t) = engine.kv_cache_dtype {
        envs.push(env("KVROUTE_KV_CACHE_DTYPE", t.as_flag().to_string()));
    }
    if let Some(m) = &engine.kv_offload_memory {
        envs.push(env("KVROUTE_KV_OFFLOAD_MEMORY", m.clone()));
    }
    if let Some(n) = engine.max_model_len {
        envs.push(env("KVROUTE_MAX_MODEL_LEN", n.to_string()));
    }
    if let Some(n) = engine.max_num_seqs {
        envs.push(env("KVROUTE_MAX_NUM_SEQS", n.to_string()));
    }
    if let Some((secret, key)) = &defaults.agent_token {
        // The whole Secret's key as a file (no subPath), read by the agent at start.
        volumes.push(Volume {
            name: "agent-token".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                items: Some(vec![KeyToPath {
                    key: key.clone(),
                    path: "token".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "agent-token".into(),
            mount_path: AGENT_TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        envs.push(env(
            "KVROUTE_AUTH_TOKEN_FILE",
            format!("{AGENT_TOKEN_DIR}/token"),
        ));
    }

    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".to_string(), Quantity(gpus.to_string()));
        requests.insert("nvidia.com/gpu".to_string(), Quantity(gpus.to_string()));
    }
    if let Some(r) = &spec.resources {
        if let Some(m) = &r.memory {
            limits.insert("memory".into(), m.clone());
            requests.insert("memory".into(), m.clone());
        }
        if let Some(c) = &r.cpu {
            requests.insert("cpu".into(), c.clone());
        }
    }
    let resources = (!limits.is_empty() || !requests.is_empty()).then(|| ResourceRequirements {
        limits: (!limits.is_empty()).then_some(limits),
        requests: (!requests.is_empty()).then_some(requests),
        ..Default::default()
    });

    let container = Container {
        name: "agent".into(),
        image: Some(
            spec.agent_image
                .clone()
                .unwrap_or_else(|| defaults.agent_image.clone()),
        ),
        args: Some(vec!["serve".into()]),
        env: Some(envs),
        ports: Some(vec![
            ContainerPort {
                name: Some(HTTP_PORT_NAME.into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(GRPC_PORT_NAME.into()),
                container_port: GRPC_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // Loading a model can take minutes: the startup probe holds liveness off until then.
        startup_probe: Some(http_probe("/health", 5, 120)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        resources,
        volume_mounts: Some(mounts),
        security_context: Some(container_security()),
        ..Default::default()
    };

    let placement = spec.placement.clone().unwrap_or_default();
    let tolerations = (gpus > 0).then(|| {
        vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]
    });
    let mut pod_labels = object_labels(name);
    pod_labels.remove("app.kubernetes.io/managed-by");
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(BTreeMap::from([(
                "kvroute.dev/served-model".to_string(),
                model.name.clone(),
            )])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            volumes: Some(volumes),
            node_selector: (!placement.node_selector.is_empty()).then_some(placement.node_selector),
            tolerations,
            // Spread agents over nodes when possible, so one node failing loses one agent.
            topology_spread_constraints: (!spec.per_node()).then(|| {
                vec![TopologySpreadConstraint {
                    max_skew: 1,
                    topology_key: "kubernetes.io/hostname".into(),
                    when_unsatisfiable: "ScheduleAnyway".into(),
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(name)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]
            }),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                fs_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            termination_grace_period_seconds: Some(30),
            ..Default::default()
        }),
    })
}

fn read_only_mount(path: &str) -> VolumeMount {
    VolumeMount {
        name: MODEL_VOLUME.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Desired {
    /// The agent pod spec of the workload.
    pub fn workload_pod(&self) -> Option<&PodSpec> {
        let t = match &self.workload {
            Workload::Deployment(d) => &d.spec.template,
            Workload::DaemonSet(d) => &d.spec.template,
        };
        t.spec.as_ref()
    }
}

/// Returns the Kubernetes kind name of a workload (for logs and the stale-kind cleanup).
pub fn workload_kind(w: &Workload) -> &'static str {
    match w {
        Workload::Deployment(_) => "Deployment",
        Workload::DaemonSet(_) => "DaemonSet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_crd::fixtures::ModelDeploymentFixture;
    use kvroute_crd::{EngineSpec, ImageSource, ModelSpec};

    fn deployment(d: &Desired) -> &Deployment {
        match &d.workload {
            Workload::Deployment(d) => d,
            Workload::DaemonSet(_) => panic!("expected a Deployment"),
        }
    }

    fn agent(t: &PodTemplateSpec) -> &Container {
        &t.spec.as_ref().unwrap().containers[0]
    }

    fn env_of(c: &Container, name: &str) -> Option<String> {
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    #[test]
    fn cpu_deployment_with_owner_probes_and_service() {
        let md = ModelDeployment::test().with_replicas(3);
        let d = desired(&md, &AgentDefaults::default()).unwrap();
        let dep = deployment(&d);
        assert_eq!(dep.metadata.name.as_deref(), Some("smollm-agent"));
        assert_eq!(dep.metadata.namespace.as_deref(), Some("default"));
        let owner = &dep.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "ModelDeployment");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.uid, md.metadata.uid.clone().unwrap());
        let spec = &dep.spec;
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.selector.match_labels, Some(selector_labels("smollm")));
        let tpl_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        for (k, v) in selector_labels("smollm") {
            assert_eq!(
                tpl_labels.get(&k),
                Some(&v),
                "template misses selector label {k}"
            );
        }
        let c = agent(&spec.template);
        assert_eq!(
            env_of(c, "KVROUTE_MODEL").as_deref(),
            Some("/models/smollm2/model.gguf")
        );
        assert_eq!(
            env_of(c, "KVROUTE_SERVED_MODEL_NAME").as_deref(),
            Some("smollm2-135m")
        );
        assert_eq!(env_of(c, "KVROUTE_DEVICE").as_deref(), Some("cpu"));
        assert_eq!(env_of(c, "KVROUTE_HTTP").as_deref(), Some("0.0.0.0:8000"));
        let probe_path =
            |p: &Option<Probe>| p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone();
        assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/ready"));
        assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/health"));
        assert!(c.resources.is_none(), "no GPU asked, no resources set");
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );

        let svc = d.service.spec.as_ref().unwrap();
        assert_eq!(d.service.metadata.name.as_deref(), Some("smollm-agents"));
        assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
        let ports: Vec<_> = svc.ports.as_ref().unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, [8000, 50051]);
        assert_eq!(
            d.service
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .get(LABEL_DEPLOYMENT)
                .map(String::as_str),
            Some("smollm")
        );
    }

    #[test]
    fn kv_cache_type_and_host_tier_become_agent_settings() {
        let md = ModelDeployment::test().with_engine(EngineSpec {
            kv_memory: Some("2GiB".into()),
            kv_cache_dtype: Some(kvroute_crd::KvCacheDtype::Q8_0),
            kv_offload_memory: Some("8GiB".into()),
            ..Default::default()
        });
        let d = desired(&md, &AgentDefaults::default()).unwrap();
        let tpl = &deployment(&d).spec.template;
        let c = agent(tpl);
        assert_eq!(env_of(c, "KVROUTE_KV_MEMORY").as_deref(), Some("2GiB"));
        assert_eq!(env_of(c, "KVROUTE_KV_CACHE_DTYPE").as_deref(), Some("q8_0"));
        assert_eq!(
            env_of(c, "KVROUTE_KV_OFFLOAD_MEMORY").as_deref(),
            Some("8GiB")
        );
        // The names the CRD accepts are the agent's.
        let spec: EngineSpec =
            serde_json::from_value(serde_json::json!({"kvCacheDtype": "f16"})).unwrap();
        assert_eq!(spec.kv_cache_dtype, Some(kvroute_crd::KvCacheDtype::F16));
        assert!(
            serde_json::from_value::<EngineSpec>(serde_json::json!({"kvCacheDtype": "fp8"}))
                .is_err()
        );
    }

    #[test]
    fn gpus_become_resource_requests_and_cuda() {
        let md = ModelDeployment::test()
            .with_gpus(2)
            .with_engine(EngineSpec {
                block_size: Some(32),
                gpu_memory_utilization: Some(0.85),
                max_num_seqs: Some(64),
                ..Default::default()
            });
        let d = desired(&md, &AgentDefaults::default()).unwrap();
        let tpl = &deployment(&d).spec.template;
        let c = agent(tpl);
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits.get("nvidia.com/gpu"), Some(&Quantity("2".into())));
        assert_eq!(env_of(c, "KVROUTE_DEVICE").as_deref(), Some("cuda"));
        assert_eq!(env_of(c, "KVROUTE_BLOCK_SIZE").as_deref(), Some("32"));
        assert_eq!(
            env_of(c, "KVROUTE_GPU_MEMORY_UTILIZATION").as_deref(),
            Some("0.85")
        );
        assert_eq!(env_of(c, "KVROUTE_MAX_NUM_SEQS").as_deref(), Some("64"));
        assert_eq!(env_of(c, "KVROUTE_KV_MEMORY"), None);
        assert_eq!(env_of(c, "KVROUTE_KV_CACHE_DTYPE"), None);
        assert_eq!(env_of(c, "KVROUTE_KV_OFFLOAD_MEMORY"), None);
        let tol = tpl.spec.as_ref().unwrap().tolerations.as_ref().unwrap();
        assert_eq!(tol[0].key.as_deref(), Some("nvidia.com/gpu"));
        let ru = deployment(&d)
            .spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .clone()
            .unwrap();
        assert_eq!(
            (ru.max_surge, ru.max_unavailable),
            (Some(IntOrString::Int(0)), Some(IntOrString::Int(1))),
            "no GPU surge"
        );
        let cpu = desired(&ModelDeployment::test(), &AgentDefaults::default()).unwrap();
        let ru = deployment(&cpu)
            .spec
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .clone()
            .unwrap();
        assert_eq!(
            (ru.max_surge, ru.max_unavailable),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
        );
        let spread = &cpu
            .workload_pod()
            .unwrap()
            .topology_spread_constraints
            .as_ref()
            .unwrap()[0];
        assert_eq!(spread.topology_key, "kubernetes.io/hostname");
    }

    #[test]
    fn per_node_is_a_daemonset_with_node_selector() {
        let md = ModelDeployment::test().with_per_node(&[("gpu", "h200")]);
        let d = desired(&md, &AgentDefaults::default()).unwrap();
        let Workload::DaemonSet(ds) = &d.workload else {
            panic!("perNode must give a DaemonSet")
        };
        assert_eq!(workload_kind(&d.workload), "DaemonSet");
        let pod = ds.spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.node_selector
                .as_ref()
                .unwrap()
                .get("gpu")
                .map(String::as_str),
            Some("h200")
        );
    }

    #[test]
    fn each_source_mounts_the_model() {
        let base = ModelSpec {
            name: "m".into(),
            ..Default::default()
        };
        let cases = [
            (
                ModelSpec {
                    url: Some("https://example.invalid/x.gguf".into()),
                    ..base.clone()
                },
                "/models/model.gguf",
            ),
            (
                ModelSpec {
                    host_path: Some("/data/x.gguf".into()),
                    ..base.clone()
                },
                "/models/model.gguf",
            ),
            (
                ModelSpec {
                    image: Some(ImageSource {
                        reference: "registry.invalid/models:1".into(),
                        path: "x.gguf".into(),
                    }),
                    ..base.clone()
                },
                "/models/x.gguf",
            ),
        ];
        for (model, path) in cases {
            let md = ModelDeployment::test().with_model(model.clone());
            let d = desired(&md, &AgentDefaults::default()).unwrap();
            let tpl = &deployment(&d).spec.template;
            assert_eq!(
                env_of(agent(tpl), "KVROUTE_MODEL").as_deref(),
                Some(path),
                "{model:?}"
            );
            let pod = tpl.spec.as_ref().unwrap();
            let vol = pod
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == MODEL_VOLUME)
                .unwrap();
            if model.url.is_some() {
                let init = &pod.init_containers.as_ref().unwrap()[0];
                assert_eq!(init.command.as_ref().unwrap().last(), model.url.as_ref());
                assert!(vol.empty_dir.is_some());
            } else if model.host_path.is_some() {
                assert_eq!(
                    vol.host_path.as_ref().unwrap().type_.as_deref(),
                    Some("File")
                );
            } else {
                assert!(vol.image.is_some());
            }
        }
    }

    #[test]
    fn invalid_specs_are_errors_not_objects() {
        let two_sources = ModelDeployment::test().with_model(ModelSpec {
            name: "m".into(),
            url: Some("https://example.invalid/x".into()),
            host_path: Some("/x".into()),
            ..Default::default()
        });
        assert_eq!(
            desired(&two_sources, &AgentDefaults::default()),
            Err(DesiredError::Spec(SpecError::ModelSource(2)))
        );
        let mut long = ModelDeployment::test();
        long.metadata.name = Some("x".repeat(MAX_NAME_LEN + 1));
        assert!(matches!(
            desired(&long, &AgentDefaults::default()),
            Err(DesiredError::NameTooLong(_))
        ));
        let mut no_uid = ModelDeployment::test();
        no_uid.metadata.uid = None;
        assert_eq!(
            desired(&no_uid, &AgentDefaults::default()),
            Err(DesiredError::MissingMeta("uid"))
        );
    }

    #[test]
    fn desired_is_deterministic_and_follows_the_spec() {
        let a = desired(&ModelDeployment::test(), &AgentDefaults::default()).unwrap();
        let b = desired(&ModelDeployment::test(), &AgentDefaults::default()).unwrap();
        assert_eq!(a, b);
        let c = desired(
            &ModelDeployment::test().with_replicas(5),
            &AgentDefaults::default(),
        )
        .unwrap();
        assert_ne!(a, c);
        assert_eq!(a.service, c.service, "replicas do not change the Service");
        assert_eq!(a.disruption_budget, c.disruption_budget);
    }

    #[test]
    fn images_and_host_paths_outside_the_operators_allow_lists_are_refused() {
        let strict = AgentDefaults {
            allowed_image_prefixes: vec!["registry.example/kvroute/".into()],
            allowed_host_paths: vec!["/models".into()],
            ..AgentDefaults::default()
        };
        let host = |path: &str| {
            ModelDeployment::test().with_model(kvroute_crd::ModelSpec {
                name: "m".into(),
                host_path: Some(path.into()),
                ..Default::default()
            })
        };
        let image = |reference: &str| {
            ModelDeployment::test().with_model(kvroute_crd::ModelSpec {
                name: "m".into(),
                image: Some(kvroute_crd::ImageSource {
                    reference: reference.into(),
                    path: "model.gguf".into(),
                }),
                ..Default::default()
            })
        };
        let mut agent = ModelDeployment::test();
        agent.spec.agent_image = Some("evil.example/agent:1".into());
        let mut ours = ModelDeployment::test();
        ours.spec.agent_image = Some("registry.example/kvroute/agent:1".into());
        // Inside the lists (and a spec naming no image at all: the operator's own).
        for ok in [
            host("/models/a.gguf"),
            host("/models/sub/b.gguf"),
            image("registry.example/kvroute/models:smollm"),
            ours,
            ModelDeployment::test(),
        ] {
            assert!(desired(&ok, &strict).is_ok(), "{:?}", ok.spec);
        }
        for (bad, what) in [
            (host("/etc/shadow"), "hostPath"),
            (host("/models-old/a.gguf"), "hostPath"),
            (host("/models/../etc/shadow"), "hostPath"),
            (
                image("docker.io/library/busybox"),
                "spec.model.image.reference",
            ),
            (agent, "spec.agentImage"),
        ] {
            let e = desired(&bad, &strict).unwrap_err();
            assert!(
                matches!(
                    e,
                    DesiredError::ImageNotAllowed { .. } | DesiredError::HostPathNotAllowed { .. }
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains(what), "{e}");
            // Without lists, the same spec is accepted.
            assert!(desired(&bad, &AgentDefaults::default()).is_ok(), "{e}");
        }
    }

    #[test]
    fn with_an_agent_token_secret_agents_read_their_token_from_it() {
        let none = desired(&ModelDeployment::test(), &AgentDefaults::default()).unwrap();
        let pod = none.workload_pod().unwrap();
        let c = &pod.containers[0];
        assert!(c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| e.name != "KVROUTE_AUTH_TOKEN_FILE"));
        let with = AgentDefaults {
            agent_token: Some(("kvroute-agent-token".into(), "tok".into())),
            ..AgentDefaults::default()
        };
        let d = desired(&ModelDeployment::test(), &with).unwrap();
        let pod = d.workload_pod().unwrap();
        let vol = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "agent-token")
            .expect("a token volume");
        let secret = vol.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("kvroute-agent-token"));
        let item = &secret.items.as_ref().unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("tok", "token"));
        let c = &pod.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "agent-token")
            .unwrap();
        assert_eq!(mount.mount_path, AGENT_TOKEN_DIR);
        assert_eq!(mount.read_only, Some(true));
        let file = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "KVROUTE_AUTH_TOKEN_FILE")
            .and_then(|e| e.value.clone());
        assert_eq!(file, Some(format!("{AGENT_TOKEN_DIR}/token")));
    }

    #[test]
    fn agents_are_evicted_one_at_a_time_and_the_budget_selects_only_this_models() {
        let md = ModelDeployment::test().with_replicas(4);
        let d = desired(&md, &AgentDefaults::default()).unwrap();
        let pdb = &d.disruption_budget;
        assert_eq!(pdb.metadata.name.as_deref(), Some("smollm-agent"));
        assert_eq!(pdb.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            pdb.metadata.owner_references,
            Some(vec![owner_ref(&md).unwrap()]),
            "garbage-collected with its ModelDeployment"
        );
        let spec = pdb.spec.as_ref().unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        let selects = spec
            .selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap();
        assert_eq!(selects, &selector_labels("smollm"));
        let template = match &d.workload {
            Workload::Deployment(w) => &w.spec.template,
            Workload::DaemonSet(w) => &w.spec.template,
        };
        let pods = template.metadata.as_ref().unwrap().labels.clone().unwrap();
        assert!(
            selects.iter().all(|(k, v)| pods.get(k) == Some(v)),
            "{selects:?} must select the agent pods {pods:?}"
        );
        // Another ModelDeployment's agents are not in it.
        let mut other = ModelDeployment::test();
        other.metadata.name = Some("other".into());
        let o = desired(&other, &AgentDefaults::default()).unwrap();
        assert_ne!(
            o.disruption_budget.spec.unwrap().selector,
            spec.selector,
            "one budget per model"
        );
    }
}
