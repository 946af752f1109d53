//! The VirtualCluster reconciler against a mocked API server, and its pure
//! parts.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::*;
use crate::fixtures::{ApiMock, Fleet, ctx, obj, status_error};

#[test]
fn the_frontend_endpoint_names_its_public_ip() {
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
    let node = |name: &str, role, addr: &str| NodeSummary {
        ip: Some(ip(addr)),
        ..NodeSummary::waiting(
            name.into(),
            role,
            yukumo_api::virtualcluster::NodeState::Running,
        )
    };
    let nodes = vec![
        node("c-w-0", NodeRole::Worker, "10.0.0.9"),
        node("c-frontend", NodeRole::Frontend, "10.0.0.7"),
    ];
    let mut g: NetworkGroup = obj(
        json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
        "metadata": {"name": "net", "namespace": "t1"},
        "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}}),
    );
    let private = frontend_endpoint(&nodes, Some(&g)).unwrap();
    assert_eq!(private.address, Some(ip("10.0.0.7")));
    assert_eq!(private.public_ip, None);
    assert_eq!(private.ssh.as_deref(), Some("ssh root@10.0.0.7"));
    g.status = Some(obj(json!({
        "publicIPs": [{"address": "203.0.113.17", "node": "c-frontend"},
                      {"address": "203.0.113.18", "node": "c-w-0"}]
    })));
    let public = frontend_endpoint(&nodes, Some(&g)).unwrap();
    assert_eq!(public.public_ip, Some(ip("203.0.113.17")));
    assert_eq!(public.ssh.as_deref(), Some("ssh root@203.0.113.17"));
    assert_eq!(frontend_endpoint(&nodes[..1], Some(&g)), None);
}

pub fn site() -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": "a"}, "spec": {}})
}

pub fn host(name: &str, cpu: u32) -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Host", "metadata": {"name": name},
           "spec": {"site": "a", "gateway": true},
           "status": {"allocatable": {"cpu": cpu, "memoryMiB": 8192},
                      "conditions": [{"type": "Ready", "status": "True", "reason": "AgentHeartbeating",
                                      "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
}

/// A group that has allocated addresses for `nodes`.
pub fn group(nodes: &[&str]) -> Value {
    let allocations: Vec<Value> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"node": n, "ip": format!("10.0.0.{}", 10 + i), "mac": format!("02:00:00:00:00:{:02x}", i)}))
        .collect();
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
           "metadata": {"name": "net", "namespace": "t1", "uid": "ng-uid"},
           "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"},
           "status": {"segment": {"type": "vxlan", "id": 1000}, "gateway": "10.0.0.1", "mtu": 1450,
                      "allocations": allocations}})
}

pub fn cluster(workers: i32) -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
           "metadata": {"name": "c", "namespace": "t1", "uid": "vc-uid", "generation": 1},
           "spec": {"networkGroup": "net", "startOrder": "Parallel",
                    "frontend": {"size": {"cpu": 1, "memory": "256Mi"},
                                 "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}},
                    "pools": [{"name": "w", "replicas": workers, "size": {"cpu": 1, "memory": "256Mi"}}]}})
}

const NODES: &str = "/apis/yukumo.io/v1alpha1/namespaces/t1/virtualnodes/";
const CLUSTER: &str = "/apis/yukumo.io/v1alpha1/namespaces/t1/virtualclusters/c/status";

fn fleet() -> Fleet {
    Fleet {
        sites: vec![obj(site())],
        hosts: vec![obj(host("h1", 8))],
        groups: vec![obj(group(&["c-frontend", "c-w-0"]))],
        clusters: vec![obj(cluster(1))],
        ..Default::default()
    }
}

/// The cluster after a status patch.
fn with_status(patch: &Value) -> Value {
    let mut o = cluster(1);
    o["status"] = patch["status"].clone();
    o
}

/// The node an apply patch makes (the API server echoes it with a uid).
fn created(patch: &Value) -> Value {
    let mut o = patch.clone();
    o["metadata"]["uid"] = json!(format!("uid-{}", o["metadata"]["name"].as_str().unwrap()));
    o
}

#[tokio::test]
async fn places_and_creates_every_node_then_reports() {
    let (client, mut api) = ApiMock::new();
    let ctx = ctx(client, fleet());
    let task = tokio::spawn(reconcile(Arc::new(obj(cluster(1))), ctx.clone()));
    // The two creates are in flight together: answer them in arrival order.
    let mut names = Vec::new();
    for _ in 0..2 {
        let seen = api
            .expect(Method::PATCH, NODES, |s| {
                (StatusCode::CREATED, created(&s.body))
            })
            .await;
        assert!(
            seen.path.contains("fieldManager=yukumo-controller"),
            "{}",
            seen.path
        );
        assert!(seen.path.contains("force=true"));
        let vn = &seen.body;
        assert_eq!(vn["spec"]["host"], "h1");
        assert_eq!(vn["metadata"]["labels"]["yukumo.io/host"], "h1");
        assert_eq!(
            vn["metadata"]["finalizers"],
            json!(["yukumo.io/host-cleanup"])
        );
        assert_eq!(vn["metadata"]["ownerReferences"][0]["uid"], "vc-uid");
        assert_eq!(
            vn["spec"]["network"]["segment"],
            json!({"type": "vxlan", "id": 1000})
        );
        assert_eq!(vn["spec"]["running"], true);
        names.push(vn["metadata"]["name"].as_str().unwrap().to_string());
    }
    names.sort();
    assert_eq!(names, ["c-frontend", "c-w-0"]);
    let status = api
        .expect(Method::PATCH, CLUSTER, |s| {
            (StatusCode::OK, with_status(&s.body))
        })
        .await;
    assert_eq!(status.body["status"]["ready"], "0/2");
    assert_eq!(status.body["status"]["nodes"][0]["role"], "frontend");
    assert_eq!(status.body["status"]["nodes"][0]["phase"], "Pending");
    let action = api.finish(task).await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let mut reasons = api.event_reasons();
    reasons.sort();
    assert_eq!(reasons, ["NodesScheduled", "NodesStarting"]);
    assert_eq!(
        ctx.placements.lock().await.nodes.len(),
        2,
        "pending until the cache shows them"
    );
}

/// A create that fails is forgotten (and decided again on the retry); the
/// one that succeeded is not written twice.
#[tokio::test]
async fn a_failed_create_is_decided_again_and_a_written_one_is_not_repeated() {
    let (client, mut api) = ApiMock::new();
    let ctx = ctx(client, fleet());
    let vc = Arc::new(obj::<VirtualCluster>(cluster(1)));
    let task = tokio::spawn(reconcile(vc.clone(), ctx.clone()));
    for _ in 0..2 {
        api.expect(Method::PATCH, NODES, |s| {
            if s.path.contains("c-w-0") {
                (
                    StatusCode::CONFLICT,
                    status_error(409, "Conflict", "Operation cannot be fulfilled"),
                )
            } else {
                (StatusCode::CREATED, created(&s.body))
            }
        })
        .await;
    }
    let err = api.finish(task).await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "conflict");
    {
        let pending = ctx.placements.lock().await;
        let names: Vec<&str> = pending.nodes.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["c-frontend"], "the failed write is forgotten");
    }
    // The retry (the cache does not show the frontend yet): only the worker.
    let task = tokio::spawn(reconcile(vc, ctx.clone()));
    let seen = api
        .expect(Method::PATCH, NODES, |s| {
            (StatusCode::CREATED, created(&s.body))
        })
        .await;
    assert!(seen.path.contains("c-w-0"), "{}", seen.path);
    api.expect(Method::PATCH, CLUSTER, |s| {
        (StatusCode::OK, with_status(&s.body))
    })
    .await;
    api.finish(task).await.unwrap().unwrap();
}

/// Without a host that fits, nothing is written but the status, which
/// names the node and why.
#[tokio::test]
async fn no_host_that_fits_is_stalled_naming_the_node() {
    let (client, mut api) = ApiMock::new();
    let mut f = fleet();
    f.hosts = vec![obj(host("h1", 1))];
    let ctx = ctx(client, f);
    let task = tokio::spawn(reconcile(Arc::new(obj(cluster(1))), ctx));
    // The frontend fits (1 cpu); the worker does not.
    api.expect(Method::PATCH, NODES, |s| {
        (StatusCode::CREATED, created(&s.body))
    })
    .await;
    let status = api
        .expect(Method::PATCH, CLUSTER, |s| {
            (StatusCode::OK, with_status(&s.body))
        })
        .await;
    let ready = status.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["reason"], "Unschedulable");
    assert!(
        ready["message"].as_str().unwrap().contains("c-w-0"),
        "{ready}"
    );
    let action = api.finish(task).await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

/// A placed, provisioned Volume `data` of the dir pool on host h1.
fn data_volume() -> Value {
    json!({"apiVersion": "yukumo.io/v1alpha1", "kind": "Volume",
           "metadata": {"name": "data", "namespace": "t1", "uid": "vol-uid", "resourceVersion": "41"},
           "spec": {"size": "64Mi", "pool": "local"},
           "status": {"location": {"site": "a", "pool": "local", "host": "h1"},
                      "backing": {"path": "/pools/local/vol-uid.qcow2", "capacityBytes": 67108864}}})
}

fn with_volume(f: &mut Fleet) {
    let mut c = cluster(0);
    c["spec"]["frontend"]["volumes"] = json!([{"name": "data"}]);
    f.clusters = vec![obj(c)];
    f.volumes = vec![obj(data_volume())];
    f.hosts = vec![obj(host("h0", 8)), obj(host("h1", 8))];
}

const VOLUME: &str = "/apis/yukumo.io/v1alpha1/namespaces/t1/volumes/data/status";

/// The claim is written first, with the Volume's resourceVersion as a
/// precondition; the node then lists the disk and is pinned to the pool's host.
#[tokio::test]
async fn a_volume_is_claimed_before_the_node_lists_its_disk() {
    let (client, mut api) = ApiMock::new();
    let mut f = fleet();
    with_volume(&mut f);
    let vc = f.clusters[0].clone();
    let ctx = ctx(client, f);
    let task = tokio::spawn(reconcile(Arc::new(vc), ctx));
    let claim = api
        .expect(Method::PATCH, VOLUME, |s| {
            let mut v = data_volume();
            v["status"]["attachedTo"] = s.body["status"]["attachedTo"].clone();
            (StatusCode::OK, v)
        })
        .await;
    assert_eq!(claim.body["metadata"]["resourceVersion"], "41");
    assert_eq!(
        claim.body["status"]["attachedTo"],
        json!({"cluster": "c", "node": "c-frontend", "target": "vdc"})
    );
    let node = api
        .expect(Method::PATCH, NODES, |s| {
            (StatusCode::CREATED, created(&s.body))
        })
        .await;
    assert_eq!(
        node.body["spec"]["host"], "h1",
        "pinned to the dir pool's host"
    );
    assert_eq!(
        node.body["spec"]["disks"],
        json!([{"volume": "data", "target": "vdc", "readOnly": false, "serial": "vol-uid",
                "path": "/pools/local/vol-uid.qcow2", "bytes": 67108864}])
    );
    api.expect(Method::PATCH, CLUSTER, |s| {
        (StatusCode::OK, with_status(&s.body))
    })
    .await;
    api.finish(task).await.unwrap().unwrap();
}

/// A claim that loses the race (the Volume changed since it was read)
/// writes no node: the reconcile fails and is decided again.
#[tokio::test]
async fn a_claim_that_loses_the_race_writes_no_node() {
    let (client, mut api) = ApiMock::new();
    let mut f = fleet();
    with_volume(&mut f);
    let vc = f.clusters[0].clone();
    let ctx = ctx(client, f);
    let task = tokio::spawn(reconcile(Arc::new(vc), ctx));
    api.expect(Method::PATCH, VOLUME, |_| {
        (
            StatusCode::CONFLICT,
            status_error(409, "Conflict", "the object has been modified"),
        )
    })
    .await;
    let err = api.finish(task).await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "conflict");
}

/// A Volume another cluster holds: no claim, no node, Stalled naming the holder.
#[tokio::test]
async fn a_volume_held_by_another_cluster_is_not_taken() {
    let (client, mut api) = ApiMock::new();
    let mut f = fleet();
    with_volume(&mut f);
    let mut v = data_volume();
    v["status"]["attachedTo"] =
        json!({"cluster": "other", "node": "other-frontend", "target": "vdc"});
    f.volumes = vec![obj(v)];
    let vc = f.clusters[0].clone();
    let ctx = ctx(client, f);
    let task = tokio::spawn(reconcile(Arc::new(vc), ctx));
    let status = api
        .expect(Method::PATCH, CLUSTER, |s| {
            (StatusCode::OK, with_status(&s.body))
        })
        .await;
    let ready = status.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["reason"], "VolumeInUse");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("node other-frontend of cluster other"),
        "{ready}"
    );
    assert_eq!(
        status.body["status"]["nodes"][0]["phase"],
        "WaitingForVolume"
    );
    api.finish(task).await.unwrap().unwrap();
    assert!(api.event_reasons().contains(&"VolumeInUse".to_string()));
}

/// A reservation ending sooner than a capacity wait's retry: the requeue
/// comes at the end, not at the retry (nodes are deleted on time).
#[tokio::test]
async fn a_capacity_wait_never_postpones_the_reservations_end() {
    let (client, mut api) = ApiMock::new();
    let mut f = fleet();
    f.hosts = vec![obj(host("h1", 1))];
    let ctx = ctx(client, f);
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let at = |s: i64| {
        k8s_openapi::jiff::Timestamp::from_second(now + s)
            .unwrap()
            .to_string()
    };
    let mut c = cluster(1);
    c["spec"]["reservation"] = json!({"start": at(-60), "end": at(3), "endAction": "Delete"});
    c["status"] = json!({"capacityAdmittedAt": at(-120)});
    let task = tokio::spawn(reconcile(Arc::new(obj(c)), ctx));
    // The frontend fits (1 cpu); the worker does not: a capacity wait.
    api.expect(Method::PATCH, NODES, |s| {
        (StatusCode::CREATED, created(&s.body))
    })
    .await;
    api.expect(Method::PATCH, CLUSTER, |s| {
        (StatusCode::OK, with_status(&s.body))
    })
    .await;
    let action = api.finish(task).await.unwrap().unwrap();
    // `Action` has no accessor: its Debug form names the delay.
    let shown = format!("{action:?}");
    let secs: f64 = shown
        .split_once("Some(")
        .and_then(|(_, r)| r.split_once("s)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        (1.0..=3.3).contains(&secs),
        "{shown}: at the reservation's end, not the capacity retry (10 s)"
    );
}
