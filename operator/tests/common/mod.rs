//! A small fake Kubernetes API server on 127.0.0.1 for watch / re-list tests: LIST and WATCH
//! (newline-delimited watch events over a streaming body) for any resource path, server-side
//! apply PATCH (echoes the object back), GET, DELETE, POST (events) — and a scripted `410 Gone`
//! on a resource's next WATCH, which forces kube's watcher to re-list.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One stored object: the JSON, and from which LIST (1-based count) on it becomes visible.
struct Stored {
    obj: Value,
    visible_from_list: usize,
}

#[derive(Default)]
struct Inner {
    /// resource plural → (namespace, name) → object
    objects: BTreeMap<String, BTreeMap<(String, String), Stored>>,
    lists: BTreeMap<String, usize>,
    watches: BTreeMap<String, usize>,
    gone_next_watch: BTreeMap<String, usize>,
    /// Every request: "METHOD path".
    log: Vec<String>,
    resource_version: u64,
}

#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<(String, Value)>,
    pub addr: SocketAddr,
}

/// (plural, namespace, name, subresource) of a request path.
type Target = (String, Option<String>, Option<String>, Option<String>);

fn parse(path: &str) -> Option<Target> {
    let rest = if let Some(r) = path.strip_prefix("/api/v1/") {
        r.to_string()
    } else {
        let r = path.strip_prefix("/apis/")?;
        let mut it = r.splitn(3, '/');
        let (_group, _version, rest) = (it.next()?, it.next()?, it.next()?);
        rest.to_string()
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (ns, parts) = if parts.first() == Some(&"namespaces") && parts.len() >= 3 {
        (Some(parts[1].to_string()), &parts[2..])
    } else {
        (None, &parts[..])
    };
    let plural = parts.first()?.to_string();
    Some((
        plural,
        ns,
        parts.get(1).map(|s| s.to_string()),
        parts.get(2).map(|s| s.to_string()),
    ))
}

fn query_has(q: &str, key: &str, value: &str) -> bool {
    q.split('&').any(|kv| kv == format!("{key}={value}"))
}

fn respond(code: StatusCode, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn status(code: u16, reason: &str, msg: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "message": msg, "code": code})
}

impl FakeApiServer {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, _) = broadcast::channel(64);
        let server = FakeApiServer {
            inner: Arc::default(),
            events,
            addr,
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        server
    }

    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Stores `obj` under `plural`, visible from LIST number `visible_from_list` on (1 = all),
    /// without a watch event: only a (re-)LIST can reveal it.
    pub fn insert_silently(&self, plural: &str, obj: Value, visible_from_list: usize) {
        let mut g = self.inner.lock().unwrap();
        g.resource_version += 1;
        let mut obj = obj;
        obj["metadata"]["resourceVersion"] = json!(g.resource_version.to_string());
        let key = (
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            obj["metadata"]["name"].as_str().unwrap().to_string(),
        );
        g.objects.entry(plural.into()).or_default().insert(
            key,
            Stored {
                obj,
                visible_from_list,
            },
        );
    }

    /// Stores `obj` and sends a watch event (`ADDED`/`MODIFIED`/`DELETED`) to open watches.
    pub fn event(&self, plural: &str, kind: &str, obj: Value) {
        let mut obj = obj;
        {
            let mut g = self.inner.lock().unwrap();
            g.resource_version += 1;
            obj["metadata"]["resourceVersion"] = json!(g.resource_version.to_string());
            let key = (
                obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                obj["metadata"]["name"].as_str().unwrap().to_string(),
            );
            let m = g.objects.entry(plural.into()).or_default();
            if kind == "DELETED" {
                m.remove(&key);
            } else {
                m.insert(
                    key,
                    Stored {
                        obj: obj.clone(),
                        visible_from_list: 1,
                    },
                );
            }
        }
        let _ = self
            .events
            .send((plural.into(), json!({"type": kind, "object": obj})));
    }

    /// The next `n` WATCHes of `plural` answer with a `410 Gone` (Expired) error event.
    pub fn gone_on_next_watch(&self, plural: &str, n: usize) {
        self.inner
            .lock()
            .unwrap()
            .gone_next_watch
            .insert(plural.into(), n);
    }

    pub fn lists(&self, plural: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .lists
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    pub fn watches(&self, plural: &str) -> usize {
        self.inner
            .lock()
            .unwrap()
            .watches
            .get(plural)
            .copied()
            .unwrap_or(0)
    }

    /// A stored object, if any.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .get(plural)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .map(|st| st.obj.clone())
    }

    /// A kubeconfig file that points kube clients (and `kvroute` processes) at this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn log(&self) -> Vec<String> {
        self.inner.lock().unwrap().log.clone()
    }
}

async fn handle(State(s): State<FakeApiServer>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    s.inner.lock().unwrap().log.push(format!("{method} {path}"));
    let Some((plural, ns, name, sub)) = parse(&path) else {
        return respond(StatusCode::NOT_FOUND, &status(404, "NotFound", &path));
    };
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    match (method, name) {
        (Method::GET, None) if query_has(&query, "watch", "true") => watch(&s, &plural, ns),
        (Method::GET, None) => list(&s, &plural, ns),
        (Method::GET, Some(name)) => {
            let g = s.inner.lock().unwrap();
            match g
                .objects
                .get(&plural)
                .and_then(|m| m.get(&(ns.unwrap_or_default(), name.clone())))
            {
                Some(st) => respond(StatusCode::OK, &st.obj),
                None => respond(StatusCode::NOT_FOUND, &status(404, "NotFound", &name)),
            }
        }
        (Method::PATCH, Some(name)) => {
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let ns = ns.unwrap_or_default();
            let mut g = s.inner.lock().unwrap();
            g.resource_version += 1;
            let rv = g.resource_version.to_string();
            let m = g.objects.entry(plural.clone()).or_default();
            let mut obj = m
                .get(&(ns.clone(), name.clone()))
                .map(|st| st.obj.clone())
                .unwrap_or_else(|| patch.clone());
            if sub.as_deref() == Some("status") {
                obj["status"] = patch["status"].clone();
            } else {
                let keep_status = obj.get("status").cloned();
                obj = patch.clone();
                if let Some(st) = keep_status {
                    obj["status"] = st;
                }
            }
            obj["metadata"]["name"] = json!(name);
            obj["metadata"]["namespace"] = json!(ns);
            obj["metadata"]["resourceVersion"] = json!(rv);
            m.insert(
                (ns, name),
                Stored {
                    obj: obj.clone(),
                    visible_from_list: 1,
                },
            );
            respond(StatusCode::OK, &obj)
        }
        (Method::POST, None) => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut g = s.inner.lock().unwrap();
            g.resource_version += 1;
            if obj["metadata"]["name"].is_null() {
                obj["metadata"]["name"] = json!(format!("generated-{}", g.resource_version));
            }
            obj["metadata"]["resourceVersion"] = json!(g.resource_version.to_string());
            let key = (
                ns.unwrap_or_default(),
                obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
            );
            let m = g.objects.entry(plural).or_default();
            if m.contains_key(&key) {
                return respond(StatusCode::CONFLICT, &status(409, "AlreadyExists", &key.1));
            }
            m.insert(
                key,
                Stored {
                    obj: obj.clone(),
                    visible_from_list: 1,
                },
            );
            respond(StatusCode::CREATED, &obj)
        }
        (Method::PUT, Some(name)) => {
            // Replace with optimistic concurrency, as the API server does.
            let mut obj: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut g = s.inner.lock().unwrap();
            g.resource_version += 1;
            let rv = g.resource_version.to_string();
            let key = (ns.unwrap_or_default(), name.clone());
            let m = g.objects.entry(plural).or_default();
            let Some(current) = m.get(&key) else {
                return respond(StatusCode::NOT_FOUND, &status(404, "NotFound", &name));
            };
            if obj["metadata"]["resourceVersion"] != current.obj["metadata"]["resourceVersion"] {
                return respond(
                    StatusCode::CONFLICT,
                    &status(409, "Conflict", "the object has been modified"),
                );
            }
            obj["metadata"]["resourceVersion"] = json!(rv);
            m.insert(
                key,
                Stored {
                    obj: obj.clone(),
                    visible_from_list: 1,
                },
            );
            respond(StatusCode::OK, &obj)
        }
        (Method::DELETE, Some(name)) => {
            let mut g = s.inner.lock().unwrap();
            g.objects
                .get_mut(&plural)
                .and_then(|m| m.remove(&(ns.unwrap_or_default(), name)));
            respond(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
            )
        }
        _ => respond(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", &path),
        ),
    }
}

fn list(s: &FakeApiServer, plural: &str, ns: Option<String>) -> Response {
    let mut g = s.inner.lock().unwrap();
    let n = {
        let c = g.lists.entry(plural.into()).or_insert(0);
        *c += 1;
        *c
    };
    let items: Vec<Value> = g
        .objects
        .get(plural)
        .map(|m| {
            m.iter()
                .filter(|((o_ns, _), st)| {
                    st.visible_from_list <= n && ns.as_ref().is_none_or(|ns| ns == o_ns)
                })
                .map(|(_, st)| st.obj.clone())
                .collect()
        })
        .unwrap_or_default();
    let rv = g.resource_version.to_string();
    respond(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

fn watch(s: &FakeApiServer, plural: &str, ns: Option<String>) -> Response {
    let gone = {
        let mut g = s.inner.lock().unwrap();
        *g.watches.entry(plural.into()).or_insert(0) += 1;
        match g.gone_next_watch.get_mut(plural) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    let head = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json");
    if gone {
        let ev =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        return head.body(Body::from(format!("{ev}\n"))).unwrap();
    }
    let plural = plural.to_string();
    let rx = s.events.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
        let plural = plural.clone();
        let ns = ns.clone();
        async move {
            let (p, ev) = item.ok()?;
            let obj_ns = ev["object"]["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            (p == plural && ns.is_none_or(|n| n == obj_ns))
                .then(|| Ok::<_, Infallible>(Bytes::from(format!("{ev}\n"))))
        }
    });
    head.body(Body::from_stream(stream)).unwrap()
}

/// A ModelDeployment as the API server would hold it.
pub fn model_deployment(ns: &str, name: &str, model: &str) -> Value {
    json!({
        "apiVersion": "kvroute.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "generation": 1},
        "spec": {"model": {"name": model, "hostPath": "/models/m.gguf"}, "replicas": 1,
                 "admission": {"maxQueue": 8, "queueTimeout": "5s"}}
    })
}

/// The EndpointSlice the endpoint controller would make for a deployment's agent Service.
pub fn endpoint_slice(ns: &str, deployment: &str, endpoints: &[(&str, bool)]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{deployment}-agents-abcde"), "namespace": ns, "labels": {
            "kvroute.dev/model-deployment": deployment, "app.kubernetes.io/component": "agent",
            "app.kubernetes.io/part-of": "kvroute", "kubernetes.io/service-name": format!("{deployment}-agents")}},
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(ip, ready)| json!({
            "addresses": [ip], "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "name": format!("{deployment}-agent-{}", ip.replace('.', "-")), "namespace": ns}
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}, {"name": "grpc", "port": 50051, "protocol": "TCP"}]
    })
}
