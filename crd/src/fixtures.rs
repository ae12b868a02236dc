//! Test fixtures: `ModelDeployment::test().with_replicas(2)`, for the tests of every crate that
//! reads ModelDeployments.

use crate::{EngineSpec, ModelDeployment, ModelDeploymentSpec, ModelSpec, Placement, PvcSource};

/// Builder-style fixtures for tests (here and in `operator/tests/`).
pub trait ModelDeploymentFixture: Sized {
    /// A valid CPU deployment `smollm` in namespace `default` with one replica.
    fn test() -> Self;
    fn with_replicas(self, n: i32) -> Self;
    fn with_gpus(self, n: u32) -> Self;
    fn with_per_node(self, node_selector: &[(&str, &str)]) -> Self;
    fn with_engine(self, engine: EngineSpec) -> Self;
    fn with_generation(self, g: i64) -> Self;
    fn with_model(self, model: ModelSpec) -> Self;
}

impl ModelDeploymentFixture for ModelDeployment {
    fn test() -> Self {
        let mut md = ModelDeployment::new(
            "smollm",
            ModelDeploymentSpec {
                model: ModelSpec {
                    name: "smollm2-135m".into(),
                    pvc: Some(PvcSource {
                        claim_name: "models".into(),
                        path: "smollm2/model.gguf".into(),
                    }),
                    ..Default::default()
                },
                replicas: 1,
                placement: None,
                resources: None,
                engine: None,
                routing: None,
                admission: None,
                agent_image: None,
                autoscaling: None,
            },
        );
        md.metadata.namespace = Some("default".into());
        md.metadata.uid = Some("6f0c2c4e-0000-4000-8000-000000000001".into());
        md.metadata.generation = Some(1);
        md
    }
    fn with_replicas(mut self, n: i32) -> Self {
        self.spec.replicas = n;
        self
    }
    fn with_gpus(mut self, n: u32) -> Self {
        let mut r = self.spec.resources.take().unwrap_or_default();
        r.gpus = Some(n);
        self.spec.resources = Some(r);
        self
    }
    fn with_per_node(mut self, node_selector: &[(&str, &str)]) -> Self {
        self.spec.placement = Some(Placement {
            per_node: true,
            node_selector: node_selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        self
    }
    fn with_engine(mut self, engine: EngineSpec) -> Self {
        self.spec.engine = Some(engine);
        self
    }
    fn with_generation(mut self, g: i64) -> Self {
        self.metadata.generation = Some(g);
        self
    }
    fn with_model(mut self, model: ModelSpec) -> Self {
        self.spec.model = model;
        self
    }
}
