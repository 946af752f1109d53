//! The NetworkGroup reconciler against a mocked API server: what it reads,
//! what it writes, and what it does when a write conflicts.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use yukumo_api::net::Segment;

use super::*;
use crate::context::error_policy;
use crate::fixtures::{ApiMock, Fleet, ctx, obj, status_error};

fn site() -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": "a"},
           "spec": {"vniRange": {"start": 1000, "end": 1009}, "publicIPPool": ["203.0.113.16/28"],
                    "externalNetwork": {"cidr": "203.0.113.0/24", "gateway": "203.0.113.1", "interface": "ext0"}}})
}

fn host() -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Host", "metadata": {"name": "h1"},
           "spec": {"site": "a", "gateway": true},
           "status": {"addresses": ["10.255.0.1"], "conditions": [{"type": "Ready", "status": "True",
                      "reason": "AgentHeartbeating", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
}

fn group(name: &str, rv: &str) -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
           "metadata": {"name": name, "namespace": "t1", "uid": format!("uid-{name}"),
                        "resourceVersion": rv, "generation": 1},
           "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}})
}

fn fleet(groups: &[&str]) -> Fleet {
    Fleet {
        sites: vec![obj(site())],
        hosts: vec![obj(host())],
        groups: groups.iter().map(|g| obj(group(g, "1"))).collect(),
        ..Default::default()
    }
}

/// The object as written: the fresh one with the patch's status.
fn applied(fresh: &Value, patch: &Value) -> Value {
    let mut o = fresh.clone();
    o["status"] = patch["status"].clone();
    o
}

const PATH: &str = "/apis/yukumo.io/v1alpha1/namespaces/t1/networkgroups/";

#[tokio::test]
async fn allocates_and_writes_with_the_read_resource_version() {
    let (client, mut api) = ApiMock::new();
    let ctx = ctx(client, fleet(&["net"]));
    let cached = Arc::new(obj::<NetworkGroup>(group("net", "1")));
    let task = tokio::spawn(reconcile(cached, ctx.clone()));
    let fresh = group("net", "7");
    api.expect(Method::GET, &format!("{PATH}net"), |_| {
        (StatusCode::OK, fresh.clone())
    })
    .await;
    let patch = api
        .expect(Method::PATCH, &format!("{PATH}net/status"), |s| {
            (StatusCode::OK, applied(&fresh, &s.body))
        })
        .await;
    assert!(
        patch.path.contains("fieldManager=yukumo-controller"),
        "{}",
        patch.path
    );
    assert_eq!(
        patch.body["metadata"]["resourceVersion"], "7",
        "a precondition on the read"
    );
    assert_eq!(
        patch.body["status"]["segment"],
        json!({"type": "vxlan", "id": 1000})
    );
    assert_eq!(patch.body["status"]["router"]["host"], "h1");
    let action = api.finish(task).await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(api.event_reasons(), ["Allocated"]);
    // Claimed until the cache shows it.
    let pending = ctx.placements.lock().await;
    assert_eq!(pending.segments["t1/net"].1, Segment::vxlan(1000));
}

#[tokio::test]
async fn a_conflicting_write_releases_its_claims_and_retries_soon() {
    let (client, mut api) = ApiMock::new();
    let ctx = ctx(client, fleet(&["net"]));
    let cached = Arc::new(obj::<NetworkGroup>(group("net", "1")));
    let task = tokio::spawn(reconcile(cached.clone(), ctx.clone()));
    api.expect(Method::GET, &format!("{PATH}net"), |_| {
        (StatusCode::OK, group("net", "7"))
    })
    .await;
    api.expect(Method::PATCH, &format!("{PATH}net/status"), |_| {
        (
            StatusCode::CONFLICT,
            status_error(409, "Conflict", "the object has been modified"),
        )
    })
    .await;
    let err = api.finish(task).await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "conflict");
    assert_eq!(
        error_policy(cached, &err, ctx.clone()),
        Action::requeue(Duration::from_millis(200))
    );
    let pending = ctx.placements.lock().await;
    assert!(pending.segments.is_empty(), "{:?}", pending.segments);
    assert!(pending.public_ips.is_empty());
    assert!(
        api.events.is_empty(),
        "no Event for a write that did not happen"
    );
}

/// Two groups decided while the first one's write is still in flight (no
/// lock is held across it) get different segments.
#[tokio::test]
async fn a_decision_does_not_wait_for_another_groups_write_and_never_takes_its_claim() {
    let (client, mut api) = ApiMock::new();
    let ctx = ctx(client, fleet(&["a", "b"]));
    let first = tokio::spawn(reconcile(Arc::new(obj(group("a", "1"))), ctx.clone()));
    let fresh_a = group("a", "3");
    api.expect(Method::GET, &format!("{PATH}a"), |_| {
        (StatusCode::OK, fresh_a.clone())
    })
    .await;
    let (patch_a, held) = api.take(Method::PATCH, &format!("{PATH}a/status")).await;
    assert_eq!(patch_a.body["status"]["segment"]["id"], 1000);
    // While a's write hangs, b is decided and written.
    let second = tokio::spawn(reconcile(Arc::new(obj(group("b", "1"))), ctx.clone()));
    let fresh_b = group("b", "4");
    api.expect(Method::GET, &format!("{PATH}b"), |_| {
        (StatusCode::OK, fresh_b.clone())
    })
    .await;
    let patch_b = api
        .expect(Method::PATCH, &format!("{PATH}b/status"), |s| {
            (StatusCode::OK, applied(&fresh_b, &s.body))
        })
        .await;
    assert_eq!(patch_b.body["status"]["segment"]["id"], 1001);
    assert_ne!(
        patch_a.body["status"]["router"]["address"], patch_b.body["status"]["router"]["address"],
        "public IPs are claimed too"
    );
    api.finish(second).await.unwrap().unwrap();
    ApiMock::reply(held, StatusCode::OK, &applied(&fresh_a, &patch_a.body));
    api.finish(first).await.unwrap().unwrap();
}

/// A group deleted since the cache saw it is left alone.
#[tokio::test]
async fn a_group_gone_from_the_api_is_not_written() {
    let (client, mut api) = ApiMock::new();
    let ctx = ctx(client, fleet(&["net"]));
    let task = tokio::spawn(reconcile(Arc::new(obj(group("net", "1"))), ctx));
    api.expect(Method::GET, &format!("{PATH}net"), |_| {
        (StatusCode::NOT_FOUND, status_error(404, "NotFound", "gone"))
    })
    .await;
    assert_eq!(
        api.finish(task).await.unwrap().unwrap(),
        Action::await_change()
    );
}
