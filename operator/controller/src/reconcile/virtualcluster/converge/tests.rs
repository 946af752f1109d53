use super::*;
use crate::fixtures::obj;
use crate::reconcile::nodes::desired_nodes;
use crate::reconcile::virtualcluster::tests::{cluster, group, host, site};
use kube::Resource;
use yukumo_api::{NetworkGroup, Site};

struct World {
    vc: VirtualCluster,
    owner: OwnerReference,
    desired: Vec<DesiredNode>,
    hosts: Vec<Arc<Host>>,
    nodes: Vec<Arc<VirtualNode>>,
    pending: HashMap<NodeKey, PendingNode>,
}

fn world(workers: i32, allocated: &[&str]) -> World {
    let vc: VirtualCluster = obj(cluster(workers));
    let ng: NetworkGroup = obj(group(allocated));
    let sites: Vec<Site> = vec![obj(site())];
    let desired = desired_nodes(&vc, &ng, &sites).unwrap();
    World {
        owner: vc.controller_owner_ref(&()).unwrap(),
        vc,
        desired,
        hosts: vec![Arc::new(obj(host("h1", 8))), Arc::new(obj(host("h2", 8)))],
        nodes: vec![],
        pending: HashMap::new(),
    }
}

fn plan(w: &World, running: bool) -> NodePlan {
    plan_nodes(&PlanInputs {
        cluster: &w.vc,
        owner: &w.owner,
        desired: &w.desired,
        cluster_running: running,
        all_nodes: &w.nodes,
        hosts: &w.hosts,
        pending: &w.pending,
        calendar: &Calendar::default(),
        asleep: &HashSet::new(),
        own_windows: None,
        now: Instant::now(),
        wall: k8s_openapi::jiff::Timestamp::now(),
    })
}

/// The nodes the plan applies, as the cache would show them once written.
fn written(p: &NodePlan) -> Vec<Arc<VirtualNode>> {
    p.writes
        .iter()
        .filter_map(|w| match w {
            Write::Apply { vn, .. } => {
                let mut vn = (**vn).clone();
                vn.metadata.uid = Some(format!("uid-{}", vn.metadata.name.clone().unwrap()));
                Some(Arc::new(vn))
            }
            Write::Delete { .. } => None,
        })
        .collect()
}

fn names(writes: &[Write]) -> Vec<String> {
    let mut v: Vec<String> = writes.iter().map(Write::name).collect();
    v.sort();
    v
}

#[test]
fn a_new_cluster_is_placed_spread_and_written_once() {
    let mut w = world(3, &["c-frontend", "c-w-0", "c-w-1", "c-w-2"]);
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-frontend", "c-w-0", "c-w-1", "c-w-2"]);
    assert!(
        p.writes
            .iter()
            .all(|w| matches!(w, Write::Apply { new: true, .. }))
    );
    let hosts: std::collections::BTreeSet<String> = written(&p)
        .iter()
        .map(|n| n.spec.host.clone().unwrap())
        .collect();
    assert_eq!(hosts.len(), 2, "spread over both hosts");
    assert_eq!(p.placed.len(), 4);
    // Moments later, before the cache shows them: nothing is written twice.
    w.pending = p.placed.iter().cloned().collect();
    let again = plan(&w, true);
    assert!(again.writes.is_empty());
    assert_eq!(again.waiting_for_cache, 4);
    // Once the cache shows them: nothing to do.
    w.nodes = written(&p);
    w.pending.clear();
    let steady = plan(&w, true);
    assert!(steady.writes.is_empty(), "{:?}", names(&steady.writes));
    assert_eq!(steady.unchanged.len(), 4);
}

#[test]
fn nodes_without_an_address_wait_with_their_role() {
    let w = world(1, &["c-w-0"]);
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-w-0"]);
    assert_eq!(
        p.waiting_network,
        [("c-frontend".to_string(), NodeRole::Frontend)]
    );
}

#[test]
fn power_scale_down_and_host_loss() {
    let mut w = world(2, &["c-frontend", "c-w-0", "c-w-1"]);
    w.nodes = written(&plan(&w, true));
    // Stopped: every node is written with running: false.
    let p = plan(&w, false);
    assert_eq!(p.writes.len(), 3);
    assert!(written(&p).iter().all(|n| !n.spec.running));
    // Scaled down to one worker: the highest index goes.
    let mut fewer = world(1, &["c-frontend", "c-w-0", "c-w-1"]);
    fewer.nodes = w.nodes.clone();
    let p = plan(&fewer, true);
    assert_eq!(p.writes.len(), 1);
    assert!(matches!(&p.writes[0], Write::Delete { name, recovering: false } if name == "c-w-1"));
    // h1 lost: its nodes are deleted (finalizer released) to be placed anew.
    let lost_host = w.nodes[0].spec.host.clone().unwrap();
    let mut lost: Host = obj(host(&lost_host, 8));
    lost.status.as_mut().unwrap().conditions[0].status = yukumo_api::ConditionStatus::False;
    lost.status.as_mut().unwrap().conditions[0].reason = Reason::HeartbeatLost;
    w.hosts = w
        .hosts
        .iter()
        .map(|h| {
            if h.name_any() == lost_host {
                Arc::new(lost.clone())
            } else {
                h.clone()
            }
        })
        .collect();
    let p = plan(&w, true);
    let on_lost: Vec<String> = w
        .nodes
        .iter()
        .filter(|n| n.spec.host.as_deref() == Some(lost_host.as_str()))
        .map(|n| n.name_any())
        .collect();
    assert!(!on_lost.is_empty());
    for n in &on_lost {
        assert!(
            p.writes
                .iter()
                .any(|w| matches!(w, Write::Delete { name, recovering: true } if name == n)),
            "{n} is recovered"
        );
    }
    assert_eq!(p.recovering.len(), on_lost.len());
    assert_eq!(p.forget.len(), on_lost.len());
}

#[test]
fn frontend_first_defers_workers_and_another_owner_is_not_adopted() {
    let mut w = world(1, &["c-frontend", "c-w-0"]);
    w.vc.spec.start_order = yukumo_api::virtualcluster::StartOrder::FrontendFirst;
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-frontend"]);
    assert_eq!(p.waiting, ["c-w-0"]);
    // Nodes of a predecessor of the same name (another uid) are not ours.
    let mut old: VirtualNode = (*written(&p)[0]).clone();
    old.metadata.owner_references.as_mut().unwrap()[0].uid = "old-uid".into();
    w.nodes = vec![Arc::new(old)];
    let p = plan(&w, true);
    assert!(matches!(&p.writes[0], Write::Apply { new: true, .. }));
}
