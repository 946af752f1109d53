//! Power of a cluster, a pool or one node: the merge patches `start`,
//! `stop` and `restart` send (pure, so they are tested without a server).
//!
//! Every patch carries the resource version it was computed from, so a
//! concurrent edit of the same lists fails instead of being overwritten
//! (the plugin then reads the cluster again and recomputes the patch).

use anyhow::{Result, bail};
use serde_json::{Value, json};
use yukumo_api::VirtualCluster;
use yukumo_api::virtualcluster::NodeEntry;

/// What a power command acts on.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Cluster,
    Pool(String),
    /// `frontend` or `POOL-INDEX` (the node's `stoppedNodes` entry).
    Node(String),
}

impl Target {
    /// From the command line: `--pool P`, `--node N` (N is `frontend`,
    /// `POOL-INDEX`, or the node's full name `CLUSTER-…`), or neither.
    pub fn parse(vc: &VirtualCluster, pool: Option<String>, node: Option<String>) -> Result<Self> {
        let cluster = vc.metadata.name.as_deref().unwrap_or_default();
        Ok(match (pool, node) {
            (Some(_), Some(_)) => bail!("give --pool or --node, not both"),
            (Some(p), None) => {
                pool_index(vc, &p)?;
                Target::Pool(p)
            }
            (None, Some(n)) => match node_entry(vc, &n) {
                Some(entry) => Target::Node(entry.to_string()),
                None => bail!(
                    "virtualcluster {cluster} has no node {n:?} (its nodes: {})",
                    vc.spec.node_entries().join(", ")
                ),
            },
            (None, None) => Target::Cluster,
        })
    }

    /// The VirtualNodes it covers, by name.
    pub fn nodes(&self, vc: &VirtualCluster) -> Vec<String> {
        let cluster = vc.metadata.name.as_deref().unwrap_or_default();
        vc.spec
            .node_entries()
            .into_iter()
            .filter(|e| self.covers(e))
            // node_entries writes only entries that read back.
            .filter_map(|e| NodeEntry::parse(&e).map(|n| n.node_name(cluster)))
            .collect()
    }

    /// How the command's output names it.
    pub fn describe(&self, ns: &str, cluster: &str) -> String {
        match self {
            Target::Cluster => format!("virtualcluster {ns}/{cluster}"),
            Target::Pool(p) => format!("pool {p} of virtualcluster {ns}/{cluster}"),
            Target::Node(n) => format!("node {cluster}-{n} of virtualcluster {ns}/{cluster}"),
        }
    }
}

pub fn pool_index(vc: &VirtualCluster, pool: &str) -> Result<usize> {
    vc.spec
        .pools
        .iter()
        .position(|p| p.name == pool)
        .ok_or_else(|| {
            let names: Vec<&str> = vc.spec.pools.iter().map(|p| p.name.as_str()).collect();
            anyhow::anyhow!(
                "virtualcluster {} has no pool {pool:?} (its pools: {})",
                vc.metadata.name.as_deref().unwrap_or_default(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
}

/// A node given as `frontend`, `POOL-INDEX` or its full name `CLUSTER-…`,
/// as its `stoppedNodes` entry; `None` when the spec has no such node.
pub fn node_entry<'a>(vc: &VirtualCluster, given: &'a str) -> Option<&'a str> {
    let cluster = vc.metadata.name.as_deref().unwrap_or_default();
    let entries = vc.spec.node_entries();
    let is_node = |e: &str| entries.iter().any(|x| x == e);
    given
        .strip_prefix(cluster)
        .and_then(|r| r.strip_prefix('-'))
        .filter(|e| is_node(e))
        .or_else(|| is_node(given).then_some(given))
}

/// `stoppedNodes` in a merge patch: `null` (the field removed) when empty.
pub fn stopped_value<S: AsRef<str>>(entries: &[S]) -> Value {
    if entries.is_empty() {
        Value::Null
    } else {
        json!(entries.iter().map(AsRef::as_ref).collect::<Vec<&str>>())
    }
}

/// The merge patch that turns `target` on or off.
pub fn patch(vc: &VirtualCluster, target: &Target, running: bool) -> Result<Value> {
    let rv = &vc.metadata.resource_version;
    Ok(match target {
        Target::Cluster => json!({
            "metadata": { "resourceVersion": rv },
            "spec": { "running": running },
        }),
        Target::Pool(p) => {
            let at = pool_index(vc, p)?;
            let mut pools = serde_json::to_value(&vc.spec.pools)?;
            pools[at]["running"] = json!(running);
            // Starting a pool starts its nodes switched off one by one too.
            let stopped: Vec<&str> = vc
                .spec
                .stopped_nodes
                .iter()
                .map(|n| n.0.as_str())
                .filter(|e| !running || !Target::Pool(p.clone()).covers(e))
                .collect();
            json!({
                "metadata": { "resourceVersion": rv },
                "spec": { "pools": pools, "stoppedNodes": stopped_value(&stopped) },
            })
        }
        Target::Node(n) => {
            if running
                && let Some(p) = vc
                    .spec
                    .pools
                    .iter()
                    .find(|p| !p.running && Target::Pool(p.name.clone()).covers(n))
            {
                bail!(
                    "node {n}'s pool {} is stopped: start the pool (--pool {})",
                    p.name,
                    p.name
                );
            }
            let mut stopped: Vec<&str> = vc
                .spec
                .stopped_nodes
                .iter()
                .map(|x| x.0.as_str())
                .filter(|x| x != n)
                .collect();
            if !running {
                stopped.push(n);
            }
            json!({
                "metadata": { "resourceVersion": rv },
                "spec": { "stoppedNodes": stopped_value(&stopped) },
            })
        }
    })
}

impl Target {
    /// Whether a `stoppedNodes` entry is one of this pool's nodes.
    fn covers(&self, entry: &str) -> bool {
        match self {
            Target::Pool(p) => NodeEntry::parse(entry).and_then(|e| e.pool()) == Some(p.as_str()),
            Target::Node(n) => entry == n,
            Target::Cluster => true,
        }
    }
}

/// `stoppedNodes` without the entries of `pool` at `replicas` and above
/// (what scaling it down must drop in the same change).
pub fn stopped_after_scale(vc: &VirtualCluster, pool: &str, replicas: i32) -> Vec<String> {
    vc.spec
        .stopped_nodes
        .iter()
        .map(|n| n.0.clone())
        .filter(|e| match NodeEntry::parse(e) {
            Some(NodeEntry::Worker { pool: p, index }) if p == pool => {
                i64::from(index) < i64::from(replicas)
            }
            _ => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vc(stopped: &[&str]) -> VirtualCluster {
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
            "metadata": {"name": "demo", "namespace": "t", "resourceVersion": "7"},
            "spec": {
                "networkGroup": "net",
                "frontend": {"size": {"sizeClass": "tiny"},
                             "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}},
                "pools": [{"name": "w", "replicas": 3, "size": {"sizeClass": "tiny"}},
                          {"name": "w-big", "replicas": 1, "size": {"sizeClass": "tiny"}}],
                "stoppedNodes": stopped,
            }
        }))
        .unwrap()
    }

    #[test]
    fn targets_are_named_as_entries_or_full_names_and_unknown_ones_are_refused() {
        let v = vc(&[]);
        let t = |p: Option<&str>, n: Option<&str>| {
            Target::parse(&v, p.map(Into::into), n.map(Into::into))
        };
        assert_eq!(t(None, None).unwrap(), Target::Cluster);
        assert_eq!(t(None, Some("w-1")).unwrap(), Target::Node("w-1".into()));
        assert_eq!(
            t(None, Some("demo-w-1")).unwrap(),
            Target::Node("w-1".into())
        );
        assert_eq!(
            t(None, Some("demo-frontend")).unwrap(),
            Target::Node("frontend".into())
        );
        assert_eq!(
            t(None, Some("w-3")).unwrap_err().to_string(),
            "virtualcluster demo has no node \"w-3\" (its nodes: frontend, w-0, w-1, w-2, w-big-0)"
        );
        assert!(
            t(Some("x"), None)
                .unwrap_err()
                .to_string()
                .contains("no pool \"x\"")
        );
        assert!(t(Some("w"), Some("w-1")).is_err());
        // A pool's nodes, not those of a pool whose name extends it.
        assert_eq!(
            Target::Pool("w".into()).nodes(&v),
            ["demo-w-0", "demo-w-1", "demo-w-2"]
        );
        assert_eq!(Target::Cluster.nodes(&v).len(), 5);
    }

    #[test]
    fn node_and_pool_patches_keep_the_rest_and_are_conditional() {
        let v = vc(&["w-big-0"]);
        let p = patch(&v, &Target::Node("w-1".into()), false).unwrap();
        assert_eq!(p["metadata"]["resourceVersion"], "7");
        assert_eq!(p["spec"]["stoppedNodes"], json!(["w-big-0", "w-1"]));
        let v = vc(&["w-big-0", "w-1"]);
        let p = patch(&v, &Target::Node("w-1".into()), true).unwrap();
        assert_eq!(p["spec"]["stoppedNodes"], json!(["w-big-0"]));
        // Stopping a pool keeps its entries; starting it clears them (not
        // those of w-big, whose name extends w).
        let p = patch(&v, &Target::Pool("w".into()), false).unwrap();
        assert_eq!(p["spec"]["pools"][0]["running"], false);
        assert_eq!(p["spec"]["pools"][1]["replicas"], 1);
        assert_eq!(p["spec"]["stoppedNodes"], json!(["w-big-0", "w-1"]));
        let p = patch(&v, &Target::Pool("w".into()), true).unwrap();
        assert_eq!(p["spec"]["stoppedNodes"], json!(["w-big-0"]));
        // A node of a stopped pool cannot start alone.
        let mut off = vc(&[]);
        off.spec.pools[0].running = false;
        let e = patch(&off, &Target::Node("w-0".into()), true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "node w-0's pool w is stopped: start the pool (--pool w)"
        );
        let p = patch(&v, &Target::Cluster, false).unwrap();
        assert_eq!(p["spec"], json!({"running": false}));
    }

    #[test]
    fn scaling_down_drops_the_pools_stopped_entries_beyond_it() {
        let v = vc(&["w-0", "w-2", "w-big-0", "frontend"]);
        assert_eq!(
            stopped_after_scale(&v, "w", 2),
            ["w-0", "w-big-0", "frontend"]
        );
        assert_eq!(stopped_after_scale(&v, "w", 3).len(), 4);
    }
}
