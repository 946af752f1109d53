use super::*;

fn cluster() -> VirtualCluster {
    serde_json::from_value(json!({
        "apiVersion": "yukumo.io/v1alpha1",
        "kind": "VirtualCluster",
        "metadata": {"name": "demo", "namespace": "team", "resourceVersion": "42"},
        "spec": {
            "networkGroup": "net",
            "frontend": {"size": {"sizeClass": "tiny"}, "volumes": [{"name": "home"}],
                "image": {"url": "file:///i.qcow2", "checksum": "sha256:00"}},
            "pools": [
                {"name": "worker", "replicas": 2, "size": {"cpu": 2, "memory": "1Gi"}},
                {"name": "gpu-big", "replicas": 1, "size": {"sizeClass": "large"}}
            ]
        },
        "status": {
            "readyNodes": 2, "desiredNodes": 4, "revision": "abc123", "updatedNodes": 3,
            "nodes": [
                {"name": "demo-fe", "role": "frontend", "host": "h1", "site": "local", "ip": "10.0.0.2", "phase": "Running"},
                {"name": "demo-worker-0", "role": "worker", "host": "h2", "site": "local", "ip": "10.0.0.3", "phase": "Running"},
                {"name": "demo-worker-1", "role": "worker", "phase": "Failed"},
                {"name": "demo-gpu-big-0", "role": "worker", "phase": "Pending"}
            ],
            "frontend": {"publicIP": "198.51.100.7", "ssh": "ssh user@198.51.100.7"},
            "conditions": [{"type": "Ready", "status": "False", "reason": "Unschedulable",
                "message": "demo-gpu-big-0: no host has room", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }
    }))
    .unwrap()
}

fn node(name: &str, pool: &str, last_error: Option<&str>) -> VirtualNode {
    serde_json::from_value(json!({
        "apiVersion": "yukumo.io/v1alpha1",
        "kind": "VirtualNode",
        "metadata": {"name": name, "namespace": "team", "labels": {"yukumo.io/pool": pool}},
        "spec": {"cluster": "demo", "role": "worker", "hostname": name, "resources": {"cpu": 2, "memoryMiB": 1024},
                 "image": {"url": "file:///i.qcow2", "checksum": "sha256:00"}},
        "status": {"phase": "Failed", "lastError": last_error}
    }))
    .unwrap()
}

fn event(kind: &str, name: &str, reason: &str, at: &str) -> Event {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{name}.{reason}"), "namespace": "team"},
        "involvedObject": {"kind": kind, "name": name},
        "reason": reason, "message": format!("{reason} happened"), "type": "Normal",
        "lastTimestamp": at
    }))
    .unwrap()
}

#[test]
fn the_tree_shows_nodes_by_pool_access_network_volumes_conditions_and_newest_events() {
    let vc = cluster();
    let nodes = vec![node(
        "demo-worker-1",
        "worker",
        Some("image checksum mismatch"),
    )];
    let events = vec![
        event("VirtualCluster", "demo", "Old", "2026-01-01T00:00:00Z"),
        event(
            "VirtualNode",
            "demo-worker-1",
            "NodeFailed",
            "2026-01-01T00:02:00Z",
        ),
        event("VirtualCluster", "other", "NotMine", "2026-01-01T00:03:00Z"),
    ];
    let out = status("team", &vc, &nodes, None, &[], &events);
    println!("{out}");
    assert!(
        out.starts_with("VirtualCluster team/demo: 2/4 nodes ready, revision abc123 (3 updated)\n")
    );
    assert!(out.contains("├─ frontend demo-fe Running on h1 (site local) 10.0.0.2\n"));
    assert!(
        out.contains("pool worker (2 replicas, 2 cpu, 1Gi)\n│  ├─ demo-worker-0 Running on h2")
    );
    // The failed node's last error, under it.
    assert!(
        out.contains("│  └─ demo-worker-1 Failed\n│     last error: image checksum mismatch\n")
    );
    // A node not made yet is found in its pool by name (pool names may have dashes).
    assert!(out.contains("pool gpu-big (1 replicas, large)\n│  └─ demo-gpu-big-0 Pending\n"));
    assert!(out.contains("access: public 198.51.100.7 ssh: ssh user@198.51.100.7"));
    assert!(out.contains("network group net (not found)"));
    assert!(out.contains("volume home (not found)"));
    assert!(out.contains("Ready=False (Unschedulable): demo-gpu-big-0: no host has room"));
    // Newest first; another cluster's Events left out.
    let failed = out.find("NodeFailed").unwrap();
    let old = out.find(" Old ").unwrap();
    assert!(failed < old, "{out}");
    assert!(!out.contains("NotMine"));
    // The tree's last branch closes it.
    assert!(
        out.lines()
            .any(|l| l.starts_with("└─ events (newest first)")),
        "{out}"
    );
}

#[test]
fn a_cluster_without_status_or_stopped_says_so() {
    let mut vc = cluster();
    vc.status = None;
    vc.spec.running = false;
    let out = status("team", &vc, &[], None, &[], &[]);
    assert!(
        out.starts_with("VirtualCluster team/demo: no status yet; 0/? nodes ready, stopped (spec.running: false)\n"),
        "{out}"
    );
}

#[test]
fn scale_changes_one_pool_only_conditional_on_the_resource_version() {
    let vc = cluster();
    let p = scale_patch(&vc, "gpu-big", 5).unwrap();
    assert_eq!(p["metadata"]["resourceVersion"], "42");
    let pools = p["spec"]["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 2);
    assert_eq!(pools[0]["name"], "worker");
    assert_eq!(pools[0]["replicas"], 2);
    assert_eq!(pools[1]["replicas"], 5);
    // The other fields of the pools are kept as they are.
    assert_eq!(pools[0]["size"]["memory"], "1Gi");
    assert_eq!(pools[1]["size"]["sizeClass"], "large");
}

#[test]
fn scale_refuses_an_unknown_pool_naming_the_pools_and_a_negative_count() {
    let vc = cluster();
    let e = scale_patch(&vc, "workers", 3).unwrap_err().to_string();
    assert_eq!(
        e,
        "virtualcluster demo has no pool \"workers\" (its pools: worker, gpu-big)"
    );
    let e = scale_patch(&vc, "worker", -1).unwrap_err().to_string();
    assert_eq!(e, "replicas must be 0 or more, not -1");
}
