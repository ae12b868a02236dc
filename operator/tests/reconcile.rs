#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `reconcile` and `error_policy` against a mocked API server (kube-rs's `tower_test::mock`
//! pattern): each [`Scenario`] names the exact conversation the controller must have, and the
//! [`ApiServerVerifier`] answers it step by step, asserting method, path and body. A missing or
//! extra call fails the scenario (an unexpected call finds no answer and the reconcile never
//! finishes; the verifier's guard then fails the test).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use kvroute_crd::fixtures::ModelDeploymentFixture;
use kvroute_crd::{ModelDeployment, ModelDeploymentStatus, ModelSpec};
use kvroute_operator::controller::capacity::{CapacityError, CapacityProbe};
use kvroute_operator::controller::desired::AgentDefaults;
use kvroute_operator::controller::metrics::Metrics;
use kvroute_operator::controller::{error_policy, reconcile, Context, Error};
use kvroute_proto::CapacityReport;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

/// Answers `GetCapacity` from a table; records who was asked.
#[derive(Default)]
struct FakeCapacity {
    reports: HashMap<String, CapacityReport>,
    asked: std::sync::Mutex<Vec<String>>,
}

impl CapacityProbe for FakeCapacity {
    fn get_capacity(
        &self,
        endpoint: String,
    ) -> BoxFuture<'static, Result<CapacityReport, CapacityError>> {
        self.asked.lock().unwrap().push(endpoint.clone());
        let r = self.reports.get(&endpoint).cloned();
        Box::pin(async move { r.ok_or(CapacityError::Timeout(Duration::from_millis(1))) })
    }
}

fn context(capacity: FakeCapacity) -> (Arc<Context>, ApiServerVerifier, Arc<FakeCapacity>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let capacity = Arc::new(capacity);
    let defaults = AgentDefaults {
        gateway_endpoint: Some("http://kvroute-gateway.kvroute.svc:80/v1".into()),
        ..Default::default()
    };
    let ctx = Context::new(
        client,
        defaults,
        Arc::new(Metrics::default()),
        capacity.clone(),
        "kvroute-operator".to_string().into(),
    );
    (Arc::new(ctx), ApiServerVerifier(handle), capacity)
}

/// The conversations the controller must have with the API server.
enum Scenario {
    /// A new ModelDeployment: Service and Deployment applied, no stale DaemonSet, pods listed,
    /// status written (not ready yet). No Event: nothing transitioned from a known state.
    Create(ModelDeployment),
    /// Spec changed (replicas 1 → 3, generation 2): the Deployment is re-applied with 3 replicas,
    /// status carries the new observedGeneration, and Ready True → False emits a NotReady Event.
    SpecChange(ModelDeployment),
    /// Two ready agents answer GetCapacity: status has summed KV capacity, Ready Event.
    StatusWithCapacity(ModelDeployment),
    /// perNode switched on: DaemonSet applied and the Deployment this object owns is deleted.
    PerNodeSwitch(ModelDeployment),
    /// Invalid spec: no children touched; status Degraded/InvalidSpec and a warning Event.
    InvalidSpec(ModelDeployment),
    /// A periodic resync that observes nothing new: children re-applied (idempotent), no
    /// status write and no Event.
    Unchanged,
    /// The API server fails the first apply with a 500.
    ApiError,
    /// `spec.autoscaling` with one ready agent whose queue needs more room than it has: the
    /// children are applied, then `replicas` is raised through the scale subresource to `want`
    /// with a Scaled Event, then the status (with the decision) is written.
    Autoscale { md: ModelDeployment, want: u32 },
}

struct ApiServerVerifier(Handle);

fn reply(send: Send, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn not_found(send: Send, name: &str) {
    reply(
        send,
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{name} not found")}),
    );
}

fn pod(name: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
    })
}

impl ApiServerVerifier {
    async fn next(&mut self, method: Method, path: &str) -> (Value, Send, Request<()>) {
        let (req, send) = self
            .0
            .next_request()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, got no request"));
        assert_eq!(
            (req.method(), req.uri().path()),
            (&method, path),
            "unexpected call {} {}",
            req.method(),
            req.uri()
        );
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (v, send, Request::from_parts(parts, ()))
    }

    async fn apply(&mut self, path: &str) -> (Value, Send) {
        let (body, send, req) = self.next(Method::PATCH, path).await;
        let q = req.uri().query().unwrap_or("").to_string();
        assert!(
            q.contains("fieldManager=kvroute-operator") && q.contains("force=true"),
            "not a forced server-side apply: {q}"
        );
        assert_eq!(
            req.headers()["content-type"],
            "application/apply-patch+yaml"
        );
        (body, send)
    }

    async fn service(&mut self) -> Value {
        let (body, send) = self
            .apply("/api/v1/namespaces/default/services/smollm-agents")
            .await;
        assert_eq!(body["spec"]["clusterIP"], "None");
        assert_eq!(
            body["metadata"]["ownerReferences"][0]["kind"],
            "ModelDeployment"
        );
        reply(send, 200, &body);
        body
    }

    /// The agents' PodDisruptionBudget: one agent evicted at a time.
    async fn disruption_budget(&mut self) {
        let (body, send) = self
            .apply("/apis/policy/v1/namespaces/default/poddisruptionbudgets/smollm-agent")
            .await;
        assert_eq!(body["spec"]["maxUnavailable"], 1);
        assert_eq!(
            body["spec"]["selector"]["matchLabels"]["kvroute.dev/model-deployment"],
            "smollm"
        );
        assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
        reply(send, 200, &body);
    }

    async fn deployment(&mut self, status: Value) -> Value {
        let (mut body, send) = self
            .apply("/apis/apps/v1/namespaces/default/deployments/smollm-agent")
            .await;
        assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
        let sent = body.clone();
        body["status"] = status;
        reply(send, 200, &body);
        sent
    }

    async fn no_stale(&mut self, path: &str) {
        let (_, send, _) = self.next(Method::GET, path).await;
        not_found(send, path);
    }

    async fn pods(&mut self, items: Vec<Value>) {
        let (_, send, req) = self
            .next(Method::GET, "/api/v1/namespaces/default/pods")
            .await;
        let q = req.uri().query().unwrap_or("").to_string();
        assert!(
            q.contains("labelSelector=") && q.contains("kvroute.dev%2Fmodel-deployment%3Dsmollm"),
            "{q}"
        );
        reply(
            send,
            200,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}),
        );
    }

    async fn status(&mut self, md: &ModelDeployment) -> ModelDeploymentStatus {
        let (body, send) = self
            .apply("/apis/kvroute.dev/v1alpha1/namespaces/default/modeldeployments/smollm/status")
            .await;
        assert_eq!(body["apiVersion"], "kvroute.dev/v1alpha1");
        assert_eq!(body["kind"], "ModelDeployment");
        assert!(
            body.get("spec").is_none(),
            "status apply must not carry the spec"
        );
        let status: ModelDeploymentStatus = serde_json::from_value(body["status"].clone()).unwrap();
        let mut full = serde_json::to_value(md).unwrap();
        full["status"] = body["status"].clone();
        reply(send, 200, &full);
        status
    }

    async fn event(&mut self, type_: &str, reason: &str) {
        let (body, send, _) = self
            .next(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
            )
            .await;
        assert_eq!(
            (body["type"].as_str(), body["reason"].as_str()),
            (Some(type_), Some(reason)),
            "{body}"
        );
        assert_eq!(body["regarding"]["kind"], "ModelDeployment");
        reply(send, 201, &body);
    }

    /// Answers the scenario's conversation; returns the statuses written, and itself: the mock
    /// stays open until the reconcile finished, so any extra call hangs it (and fails the test)
    /// instead of erroring quietly.
    async fn run(mut self, scenario: Scenario) -> (Vec<ModelDeploymentStatus>, Self) {
        let mut written = Vec::new();
        match scenario {
            Scenario::Create(md) => {
                self.service().await;
                self.disruption_budget().await;
                let dep = self
                    .deployment(json!({"replicas": 1, "updatedReplicas": 1, "readyReplicas": 0}))
                    .await;
                assert_eq!(dep["spec"]["replicas"], 1);
                self.no_stale("/apis/apps/v1/namespaces/default/daemonsets/smollm-agent")
                    .await;
                self.pods(vec![pod("smollm-agent-a", "10.0.0.1", false)])
                    .await;
                written.push(self.status(&md).await);
            }
            Scenario::SpecChange(md) => {
                self.service().await;
                self.disruption_budget().await;
                let dep = self
                    .deployment(json!({"replicas": 3, "updatedReplicas": 1, "readyReplicas": 1}))
                    .await;
                assert_eq!(
                    dep["spec"]["replicas"], 3,
                    "the new replica count is applied"
                );
                self.no_stale("/apis/apps/v1/namespaces/default/daemonsets/smollm-agent")
                    .await;
                self.pods(vec![]).await;
                written.push(self.status(&md).await);
                self.event("Warning", "NotReady").await;
            }
            Scenario::StatusWithCapacity(md) => {
                self.service().await;
                self.disruption_budget().await;
                self.deployment(json!({"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}))
                    .await;
                self.no_stale("/apis/apps/v1/namespaces/default/daemonsets/smollm-agent")
                    .await;
                self.pods(vec![
                    pod("a", "10.0.0.1", true),
                    pod("b", "10.0.0.2", true),
                    pod("c", "10.0.0.3", false),
                ])
                .await;
                written.push(self.status(&md).await);
                self.event("Normal", "Ready").await;
            }
            Scenario::PerNodeSwitch(md) => {
                self.service().await;
                self.disruption_budget().await;
                let (mut body, send) = self
                    .apply("/apis/apps/v1/namespaces/default/daemonsets/smollm-agent")
                    .await;
                assert_eq!(body["kind"], "DaemonSet");
                body["status"] = json!({"currentNumberScheduled": 1, "desiredNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": 0});
                reply(send, 200, &body);
                let (_, send, _) = self
                    .next(
                        Method::GET,
                        "/apis/apps/v1/namespaces/default/deployments/smollm-agent",
                    )
                    .await;
                let owned = json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "smollm-agent", "namespace": "default", "ownerReferences": [{
                        "apiVersion": "kvroute.dev/v1alpha1", "kind": "ModelDeployment", "name": "smollm",
                        "uid": md.metadata.uid.clone().unwrap(), "controller": true}]},
                    "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {}}
                });
                reply(send, 200, &owned);
                let (_, send, _) = self
                    .next(
                        Method::DELETE,
                        "/apis/apps/v1/namespaces/default/deployments/smollm-agent",
                    )
                    .await;
                reply(
                    send,
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
                );
                self.pods(vec![]).await;
                written.push(self.status(&md).await);
            }
            Scenario::InvalidSpec(md) => {
                written.push(self.status(&md).await);
                self.event("Warning", "InvalidSpec").await;
            }
            Scenario::Unchanged => {
                self.service().await;
                self.disruption_budget().await;
                self.deployment(json!({"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}))
                    .await;
                self.no_stale("/apis/apps/v1/namespaces/default/daemonsets/smollm-agent")
                    .await;
                self.pods(vec![pod("a", "10.0.0.1", true), pod("b", "10.0.0.2", true)])
                    .await;
            }
            Scenario::Autoscale { md, want } => {
                self.service().await;
                self.disruption_budget().await;
                self.deployment(json!({"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}))
                    .await;
                self.no_stale("/apis/apps/v1/namespaces/default/daemonsets/smollm-agent")
                    .await;
                self.pods(vec![pod("a", "10.0.0.1", true)]).await;
                let (body, send, req) = self
                    .next(
                        Method::PATCH,
                        "/apis/kvroute.dev/v1alpha1/namespaces/default/modeldeployments/smollm/scale",
                    )
                    .await;
                assert_eq!(
                    req.headers()["content-type"],
                    "application/merge-patch+json"
                );
                assert_eq!(body, json!({"spec": {"replicas": want}}));
                reply(
                    send,
                    200,
                    &json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                            "metadata": {"name": "smollm", "namespace": "default"},
                            "spec": {"replicas": want}, "status": {"replicas": 1}}),
                );
                self.event("Normal", "Scaled").await;
                written.push(self.status(&md).await);
                self.event("Normal", "Ready").await;
            }
            Scenario::ApiError => {
                let (_, send) = self
                    .apply("/api/v1/namespaces/default/services/smollm-agents")
                    .await;
                reply(
                    send,
                    500,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd is sad"}),
                );
            }
        }
        (written, self)
    }
}

/// Runs reconcile against the verifier; both must finish (guarded so a hang fails, not hangs).
async fn converse(
    md: ModelDeployment,
    ctx: Arc<Context>,
    verifier: ApiServerVerifier,
    scenario: Scenario,
) -> (Result<Action, Error>, Vec<ModelDeploymentStatus>) {
    let server = tokio::spawn(verifier.run(scenario));
    let result = tokio::time::timeout(Duration::from_secs(20), reconcile(Arc::new(md), ctx))
        .await
        .expect("reconcile hung: it made a call the scenario does not answer");
    let (written, _open_until_now) = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("verifier hung: reconcile skipped an expected call")
        .unwrap();
    (result, written)
}

fn cond<'a>(
    s: &'a ModelDeploymentStatus,
    t: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    s.conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[tokio::test]
async fn create_applies_children_and_writes_status() {
    let md = ModelDeployment::test();
    let (ctx, verifier, capacity) = context(FakeCapacity::default());
    let (res, written) = converse(md.clone(), ctx.clone(), verifier, Scenario::Create(md)).await;
    assert_eq!(res.unwrap(), Action::requeue(ctx.timing.progressing));
    let s = &written[0];
    assert_eq!(
        (s.replicas, s.ready_replicas, s.observed_generation),
        (1, 0, Some(1))
    );
    assert_eq!(cond(s, "Ready").status, "False");
    assert_eq!(cond(s, "Progressing").status, "True");
    assert_eq!(
        s.endpoint.as_deref(),
        Some("http://kvroute-gateway.kvroute.svc:80/v1")
    );
    assert!(
        capacity.asked.lock().unwrap().is_empty(),
        "an unready pod is not asked for capacity"
    );
    assert_eq!(ctx.metrics.reconciles(), 1);
}

#[tokio::test]
async fn spec_change_updates_the_deployment_and_emits_not_ready() {
    let ready_before = {
        let (ctx, verifier, _) = context(two_agents());
        let md = ModelDeployment::test().with_replicas(1);
        let (_, written) =
            converse(md.clone(), ctx, verifier, Scenario::StatusWithCapacity(md)).await;
        written[0].clone()
    };
    assert_eq!(cond(&ready_before, "Ready").status, "True");
    let mut md = ModelDeployment::test().with_replicas(3).with_generation(2);
    md.status = Some(ready_before);
    let (ctx, verifier, _) = context(FakeCapacity::default());
    let (res, written) =
        converse(md.clone(), ctx.clone(), verifier, Scenario::SpecChange(md)).await;
    assert_eq!(res.unwrap(), Action::requeue(ctx.timing.progressing));
    assert_eq!(written[0].observed_generation, Some(2));
    assert_eq!(cond(&written[0], "Ready").reason, "AgentsNotReady");
}

/// Agents at 10.0.0.1 and 10.0.0.2 with 1000 blocks each, 250 and 750 free.
fn two_agents() -> FakeCapacity {
    let report = |total, free| CapacityReport {
        block_size: 16,
        total_blocks: total,
        free_blocks: free,
        ..Default::default()
    };
    FakeCapacity {
        reports: HashMap::from([
            ("http://10.0.0.1:50051".to_string(), report(1000, 250)),
            ("http://10.0.0.2:50051".to_string(), report(1000, 750)),
        ]),
        ..Default::default()
    }
}

#[tokio::test]
async fn status_aggregates_capacity_of_ready_agents() {
    let fake = two_agents();
    let md = ModelDeployment::test().with_replicas(2);
    let (ctx, verifier, capacity) = context(fake);
    let (res, written) = converse(
        md.clone(),
        ctx.clone(),
        verifier,
        Scenario::StatusWithCapacity(md),
    )
    .await;
    assert_eq!(res.unwrap(), Action::requeue(ctx.timing.resync));
    let mut asked = capacity.asked.lock().unwrap().clone();
    asked.sort();
    assert_eq!(
        asked,
        ["http://10.0.0.1:50051", "http://10.0.0.2:50051"],
        "only ready pods, on the gRPC port"
    );
    let kv = written[0].kv.clone().unwrap();
    assert_eq!(
        (
            kv.block_size,
            kv.total_blocks,
            kv.free_blocks,
            kv.agents_reporting
        ),
        (16, 2000, 1000, 2)
    );
    assert_eq!(kv.usage, "50.0%");
    assert_eq!(cond(&written[0], "Ready").status, "True");
    assert_eq!(cond(&written[0], "Degraded").status, "False");
}

#[tokio::test]
async fn autoscaling_raises_replicas_through_the_scale_subresource_when_kv_runs_short() {
    let mut md = ModelDeployment::test().with_replicas(1);
    md.spec.autoscaling = Some(kvroute_crd::AutoscalingSpec {
        min_replicas: 1,
        max_replicas: 4,
        target_kv_utilization: Some(0.5),
        scale_up_window: Some("30s".into()),
        scale_down_window: Some("5m".into()),
    });
    // One agent: 100 blocks, all in use, 5 requests waiting whose prompts need 200 blocks.
    let fake = FakeCapacity {
        reports: HashMap::from([(
            "http://10.0.0.1:50051".to_string(),
            CapacityReport {
                block_size: 16,
                total_blocks: 100,
                free_blocks: 0,
                waiting_requests: 5,
                waiting_prefill_tokens: 3200,
                ..Default::default()
            },
        )]),
        ..Default::default()
    };
    let (ctx, verifier, _) = context(fake);
    // Demand 100 + 200 blocks over 50 per replica → 6, capped at maxReplicas 4.
    let (res, written) = converse(
        md.clone(),
        ctx,
        verifier,
        Scenario::Autoscale { md, want: 4 },
    )
    .await;
    res.unwrap();
    let a = written[0].autoscaling.clone().unwrap();
    assert_eq!(
        (a.desired_replicas, a.demand_blocks, a.shortfall_blocks),
        (4, 300, 200)
    );
    assert!(a.reason.contains("needs 4 replicas"), "{}", a.reason);
}

#[tokio::test]
async fn switching_to_per_node_deletes_the_owned_deployment() {
    let md = ModelDeployment::test().with_per_node(&[]);
    let (ctx, verifier, _) = context(FakeCapacity::default());
    let (res, written) = converse(md.clone(), ctx, verifier, Scenario::PerNodeSwitch(md)).await;
    res.unwrap();
    assert_eq!(written[0].replicas, 1);
}

#[tokio::test]
async fn invalid_spec_touches_no_children() {
    let md = ModelDeployment::test().with_model(ModelSpec {
        name: "m".into(),
        url: Some("https://example.com/a".into()),
        host_path: Some("/a".into()),
        ..Default::default()
    });
    let (ctx, verifier, _) = context(FakeCapacity::default());
    let (res, written) =
        converse(md.clone(), ctx.clone(), verifier, Scenario::InvalidSpec(md)).await;
    assert_eq!(res.unwrap(), Action::requeue(ctx.timing.resync));
    assert_eq!(cond(&written[0], "Degraded").reason, "InvalidSpec");
    assert!(cond(&written[0], "Degraded")
        .message
        .contains("exactly one source"));
}

#[tokio::test]
async fn deletion_makes_no_api_calls() {
    let mut md = ModelDeployment::test();
    md.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let (ctx, _verifier, _) = context(FakeCapacity::default());
    // Any API call would wait forever for an answer that never comes, so finishing proves none.
    let res = tokio::time::timeout(Duration::from_secs(20), reconcile(Arc::new(md), ctx))
        .await
        .expect("reconcile of a deleted object called the API");
    assert_eq!(res.unwrap(), Action::await_change());
}

#[tokio::test]
async fn api_errors_back_off_exponentially_and_are_counted() {
    let md = Arc::new(ModelDeployment::test());
    let (ctx, verifier, _) = context(FakeCapacity::default());
    let (res, _) = converse(
        md.as_ref().clone(),
        ctx.clone(),
        verifier,
        Scenario::ApiError,
    )
    .await;
    let err = res.unwrap_err();
    assert_eq!(err.metric_label(), "kube_api");
    assert_eq!(
        error_policy(md.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(md.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(md.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
    assert_eq!(ctx.metrics.failures("kube_api"), 3);
    assert!(ctx
        .metrics
        .render()
        .contains("kvroute_operator_reconcile_errors_total{error=\"kube_api\"} 3"));
    // Another object has its own backoff.
    let other = Arc::new(ModelDeployment::test().with_replicas(2));
    let mut other_md = other.as_ref().clone();
    other_md.metadata.name = Some("other".into());
    assert_eq!(
        error_policy(Arc::new(other_md), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn a_success_resets_the_backoff() {
    let md = ModelDeployment::test();
    let (ctx, verifier, _) = context(FakeCapacity::default());
    let (res, _) = converse(md.clone(), ctx.clone(), verifier, Scenario::ApiError).await;
    let err = res.unwrap_err();
    error_policy(Arc::new(md.clone()), &err, ctx.clone());
    assert_eq!(
        error_policy(Arc::new(md.clone()), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    // Same context, a fresh mock for the next conversation is not possible (one client per
    // context), so succeed on a deleted copy: reconcile returns Ok without calls and clears.
    let mut deleted = md.clone();
    deleted.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    reconcile(Arc::new(deleted), ctx.clone()).await.unwrap();
    assert_eq!(
        error_policy(Arc::new(md), &err, ctx),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn an_unchanged_status_is_not_rewritten() {
    let md = ModelDeployment::test().with_replicas(2);
    let (ctx, verifier, _) = context(two_agents());
    let (_, written) = converse(
        md.clone(),
        ctx,
        verifier,
        Scenario::StatusWithCapacity(md.clone()),
    )
    .await;
    let mut settled = md;
    settled.status = Some(written[0].clone());
    let (ctx, verifier, _) = context(two_agents());
    let (res, written) =
        converse(settled.clone(), ctx.clone(), verifier, Scenario::Unchanged).await;
    assert_eq!(res.unwrap(), Action::requeue(ctx.timing.resync));
    assert!(written.is_empty());
}
