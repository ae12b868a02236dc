#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Leader election rounds (`LeaseLock::try_acquire`) against a mocked API server: create when
//! absent, follow a live holder without writing, take over an expired lease with optimistic
//! concurrency (the `resourceVersion` read is the one written), lose a race on 409, surface other
//! errors.

use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Api, Client};
use kvroute_operator::k8s::lease::LeaseLock;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kvroute/leases/kvroute-operator";

fn lock() -> (LeaseLock, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "kvroute");
    let lock = LeaseLock {
        api: Api::<Lease>::namespaced(client, "kvroute"),
        name: "kvroute-operator".into(),
        holder: "me".into(),
        duration: Duration::from_secs(15),
    };
    (lock, handle)
}

async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    code: u16,
    answer: Value,
) -> Value {
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!((req.method(), req.uri().path()), (&method, path));
    let body = req.into_body().collect_bytes().await.unwrap();
    let sent = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap(),
    );
    sent
}

fn lease(holder: &str, renewed: &str, rv: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "kvroute-operator", "namespace": "kvroute", "resourceVersion": rv},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed, "leaseTransitions": 4}})
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

fn now() -> Timestamp {
    "2026-01-01T00:01:00Z".parse().unwrap()
}

#[tokio::test]
async fn creates_an_absent_lease() {
    let (lock, mut h) = lock();
    let server = tokio::spawn(async move {
        expect(&mut h, Method::GET, PATH, 404, status(404, "NotFound")).await;
        let sent = expect(
            &mut h,
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/kvroute/leases",
            201,
            lease("me", "2026-01-01T00:01:00Z", "1"),
        )
        .await;
        assert_eq!(sent["spec"]["holderIdentity"], "me");
        assert_eq!(sent["spec"]["leaseDurationSeconds"], 15);
        h
    });
    assert!(lock.try_acquire(now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn follows_a_live_holder_without_writing() {
    let (lock, mut h) = lock();
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            Method::GET,
            PATH,
            200,
            lease("other", "2026-01-01T00:00:55Z", "7"),
        )
        .await;
        h // kept open: a write would hang try_acquire and fail the guard below
    });
    let won = tokio::time::timeout(Duration::from_secs(20), lock.try_acquire(now()))
        .await
        .expect("tried to write a lease held by someone else");
    assert!(!won.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_its_resource_version() {
    let (lock, mut h) = lock();
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            Method::GET,
            PATH,
            200,
            lease("other", "2026-01-01T00:00:00Z", "7"),
        )
        .await;
        let sent = expect(
            &mut h,
            Method::PUT,
            PATH,
            200,
            lease("me", "2026-01-01T00:01:00Z", "8"),
        )
        .await;
        assert_eq!(
            sent["metadata"]["resourceVersion"], "7",
            "replace must be conditional on what was read"
        );
        assert_eq!(sent["spec"]["holderIdentity"], "me");
        assert_eq!(sent["spec"]["leaseTransitions"], 5);
        h
    });
    assert!(lock.try_acquire(now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn renewing_keeps_transitions_and_a_lost_race_is_not_an_error() {
    let (lock, mut h) = lock();
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            Method::GET,
            PATH,
            200,
            lease("me", "2026-01-01T00:00:50Z", "9"),
        )
        .await;
        let sent = expect(
            &mut h,
            Method::PUT,
            PATH,
            200,
            lease("me", "2026-01-01T00:01:00Z", "10"),
        )
        .await;
        assert_eq!(
            sent["spec"]["leaseTransitions"], 4,
            "a renewal is no transition"
        );
        expect(
            &mut h,
            Method::GET,
            PATH,
            200,
            lease("other", "2026-01-01T00:00:00Z", "11"),
        )
        .await;
        expect(&mut h, Method::PUT, PATH, 409, status(409, "Conflict")).await;
        expect(&mut h, Method::GET, PATH, 500, status(500, "InternalError")).await;
        h
    });
    assert!(lock.try_acquire(now()).await.unwrap());
    assert!(
        !lock.try_acquire(now()).await.unwrap(),
        "409 means someone else won"
    );
    assert!(lock.try_acquire(now()).await.is_err(), "a 500 is an error");
    server.await.unwrap();
}

#[tokio::test]
async fn release_clears_only_our_own_holder() {
    let (lock, mut h) = lock();
    let server = tokio::spawn(async move {
        expect(
            &mut h,
            Method::GET,
            PATH,
            200,
            lease("me", "2026-01-01T00:00:50Z", "3"),
        )
        .await;
        let sent = expect(
            &mut h,
            Method::PUT,
            PATH,
            200,
            lease("", "2026-01-01T00:00:50Z", "4"),
        )
        .await;
        assert!(
            sent["spec"]
                .get("holderIdentity")
                .is_none_or(|h| h.is_null()),
            "{sent}"
        );
        assert_eq!(sent["metadata"]["resourceVersion"], "3");
        // Held by someone else: released without a write (a write would hang, failing the guard).
        expect(
            &mut h,
            Method::GET,
            PATH,
            200,
            lease("other", "2026-01-01T00:00:50Z", "5"),
        )
        .await;
        h
    });
    lock.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), lock.release())
        .await
        .expect("wrote a lease it does not hold")
        .unwrap();
    server.await.unwrap();
}
