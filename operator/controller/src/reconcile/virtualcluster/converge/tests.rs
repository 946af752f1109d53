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
    replacing: HashMap<NodeKey, String>,
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
        replacing: HashMap::new(),
    }
}

fn plan(w: &World, running: bool) -> NodePlan {
    plan_with(w, running, &HashSet::new())
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
            Write::Delete { .. } | Write::Replace { .. } => None,
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

/// The nodes as the cache shows them once their agents run them.
fn ready(nodes: &[Arc<VirtualNode>]) -> Vec<Arc<VirtualNode>> {
    nodes
        .iter()
        .map(|n| {
            let mut n = (**n).clone();
            n.status = Some(
                serde_json::from_value(serde_json::json!({
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                        "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
                }))
                .unwrap(),
            );
            Arc::new(n)
        })
        .collect()
}

fn replaced(p: &NodePlan) -> Vec<String> {
    p.writes
        .iter()
        .filter(|w| matches!(w, Write::Replace { .. }))
        .map(Write::name)
        .collect()
}

/// A pool's image changes: its outdated nodes are replaced one at a time
/// (`maxUnavailable: 1`), the next only once the replacement is ready;
/// the others keep their image meanwhile; the frontend (whose image did
/// not change) is left alone; applying the old spec again rolls back.
#[test]
fn a_rollout_replaces_outdated_nodes_within_the_budget() {
    let all = ["c-frontend", "c-w-0", "c-w-1", "c-w-2", "c-w-3"];
    let w0 = world(4, &all);
    let old_revision = crate::reconcile::nodes::cluster_revision(&w0.desired);
    let mut w = world(4, &all);
    w.nodes = ready(&written(&plan(&w, true)));
    let old_image = w.nodes[1].spec.image.clone();
    let new_image = yukumo_api::common::ImageSource {
        url: "file:///j".into(),
        ..old_image.clone()
    };
    let pool_image = |w: &mut World, image: &yukumo_api::common::ImageSource| {
        w.vc.spec.pools[0].image = Some(image.clone());
        let ng: NetworkGroup = obj(group(&all));
        w.desired = desired_nodes(&w.vc, &ng, &[obj(site())]).unwrap();
    };
    pool_image(&mut w, &new_image);
    assert_ne!(
        crate::reconcile::nodes::cluster_revision(&w.desired),
        old_revision
    );
    let p = plan(&w, true);
    assert_eq!(replaced(&p), ["c-w-0"]);
    assert_eq!(p.outdated, ["c-w-1", "c-w-2", "c-w-3"]);
    assert_eq!(p.updated, 1, "the frontend is at the new revision");
    // The outdated nodes keep their image (no write for them at all).
    assert!(p.writes.iter().all(|w| matches!(w, Write::Replace { .. })));
    assert_eq!(p.unchanged.len(), 4);
    // Moments later, before the cache shows c-w-0 deleting: not again, and
    // nothing else (c-w-0 counts as unavailable).
    w.replacing = p.replaced.iter().cloned().collect();
    let again = plan(&w, true);
    assert!(replaced(&again).is_empty(), "{:?}", replaced(&again));
    assert_eq!(again.replacing, ["c-w-0"]);
    // c-w-0 is gone: made again from the new image; still nothing else.
    w.replacing.clear();
    w.nodes.retain(|n| n.name_any() != "c-w-0");
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-w-0"]);
    let made = written(&p);
    assert_eq!(made[0].spec.image, new_image);
    // Made but not ready yet: the budget is used.
    w.nodes.extend(made.iter().cloned());
    assert!(replaced(&plan(&w, true)).is_empty());
    // Ready: the next one goes.
    w.nodes = ready(&w.nodes);
    assert_eq!(replaced(&plan(&w, true)), ["c-w-1"]);
    // A budget of 2 lets two go at once.
    w.vc.spec.pools[0].max_unavailable = 2;
    pool_image(&mut w, &new_image);
    assert_eq!(replaced(&plan(&w, true)), ["c-w-1", "c-w-2"]);
    // Rolled back (the old spec applied again): only c-w-0, the one node
    // made from the new image, is outdated now.
    w.vc.spec.pools[0].max_unavailable = 1;
    w.vc.spec.pools[0].image = None;
    let ng: NetworkGroup = obj(group(&all));
    w.desired = desired_nodes(&w.vc, &ng, &[obj(site())]).unwrap();
    assert_eq!(
        crate::reconcile::nodes::cluster_revision(&w.desired),
        old_revision
    );
    let p = plan(&w, true);
    assert_eq!(replaced(&p), ["c-w-0"]);
    assert!(p.outdated.is_empty());
    // A stopped cluster's nodes are unavailable anyway: all go at once.
    pool_image(&mut w, &new_image);
    let mut stopped = w.nodes.clone();
    for n in &mut stopped {
        let mut m = (**n).clone();
        m.spec.running = false;
        *n = Arc::new(m);
    }
    w.nodes = stopped;
    assert_eq!(replaced(&plan(&w, false)), ["c-w-1", "c-w-2", "c-w-3"]);
}

/// A size or user-data change is a new revision too; ssh keys (rewritten
/// in the config disk) and power are not.
#[test]
fn what_makes_a_new_revision() {
    use crate::reconcile::nodes::template_revision;
    let w = world(1, &["c-frontend", "c-w-0"]);
    let base = w.desired[1].spec.clone();
    let r = |s: &yukumo_api::virtualnode::VirtualNodeSpec| template_revision(s, false);
    let mut s = base.clone();
    s.running = true;
    s.ssh_keys = vec!["ssh-ed25519 AAAA k".into()];
    s.host = Some("h1".into());
    assert_eq!(r(&s), r(&base));
    for change in [
        |s: &mut yukumo_api::virtualnode::VirtualNodeSpec| s.resources.cpu += 1,
        |s: &mut yukumo_api::virtualnode::VirtualNodeSpec| s.user_data = Some("#!/bin/sh".into()),
        |s: &mut yukumo_api::virtualnode::VirtualNodeSpec| s.disk_bytes = 1 << 30,
        |s: &mut yukumo_api::virtualnode::VirtualNodeSpec| {
            s.image.checksum = Some("sha256:1".into())
        },
        |s: &mut yukumo_api::virtualnode::VirtualNodeSpec| {
            s.image.checksum_url = Some("https://example.com/SHA256SUMS".into())
        },
    ] {
        let mut s = base.clone();
        change(&mut s);
        assert_ne!(r(&s), r(&base));
    }
    // Booting from a Volume, the image only seeded it once.
    let mut s = base.clone();
    s.image.url = "file:///other".into();
    assert_eq!(template_revision(&s, true), template_revision(&base, true));
    assert_eq!(r(&base).len(), 10);
}

/// A node of another cluster using `cpu` of `host` (running).
fn filler(host: &str, cpu: u32) -> Arc<VirtualNode> {
    let mut n: VirtualNode = (*written(&plan(&world(0, &["c-frontend"]), true))[0]).clone();
    n.metadata.name = Some(format!("other-{host}"));
    n.metadata.owner_references.as_mut().unwrap()[0].uid = "other-uid".into();
    n.spec.host = Some(host.into());
    n.spec.resources.cpu = cpu;
    n.spec.running = true;
    Arc::new(n)
}

/// A cluster stopped with `running: false` holds nothing: others may take
/// its hosts; when it starts, each node holds its host again if there is
/// room, else it waits there (its boot disk is there), naming what is
/// free, or, booting from a network Volume, is placed again elsewhere.
#[test]
fn a_parked_cluster_holds_nothing_and_its_nodes_start_where_there_is_room() {
    let mut w = world(1, &["c-frontend", "c-w-0"]);
    w.nodes = written(&plan(&w, true));
    w.nodes = written(&plan_with(&w, false, &HashSet::new()));
    assert!(w.nodes.iter().all(|n| !n.spec.running));
    let (fe_host, w_host) = (
        w.nodes[0].spec.host.clone().unwrap(),
        w.nodes[1].spec.host.clone().unwrap(),
    );
    assert_ne!(fe_host, w_host, "spread");
    // Parked: its stopped nodes are not in the hosts' use.
    let parked: HashSet<String> = ["vc-uid".to_string()].into();
    let views = host_views(&w.hosts, &w.nodes, &HashMap::new(), &parked);
    assert!(views.iter().all(|v| v.used == Resources::default()));
    let views = host_views(&w.hosts, &w.nodes, &HashMap::new(), &HashSet::new());
    assert!(views.iter().all(|v| v.used.cpu == 1));
    // Meanwhile another cluster took all of the worker's host.
    let mut all = w.nodes.clone();
    all.push(filler(&w_host, 8));
    w.nodes = all;
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-frontend"], "the frontend starts");
    assert_eq!(p.unschedulable.len(), 1, "{:?}", p.unschedulable);
    let msg = &p.unschedulable[0];
    assert!(
        msg.starts_with(&format!("c-w-0 cannot start on {w_host}, where its boot disk is: 0 cpu, 7936 MiB free there for 1 cpu, 256 MiB")),
        "{msg}"
    );
    // Room again: it starts where it was.
    w.nodes
        .retain(|n| n.name_any() != format!("other-{w_host}"));
    w.nodes.push(filler(&w_host, 7));
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-frontend", "c-w-0"]);
    assert!(written(&p).iter().all(|n| n.spec.running));
    assert_eq!(written(&p)[1].spec.host.as_deref(), Some(w_host.as_str()));
    // Booting from a network Volume, a node without room moves.
    w.nodes
        .retain(|n| n.name_any() != format!("other-{w_host}"));
    w.nodes.push(filler(&w_host, 8));
    w.desired[1].boots_from_volume = true;
    let p = plan(&w, true);
    assert!(
        p.writes
            .iter()
            .any(|x| matches!(x, Write::Replace { name, moving: true } if name == "c-w-0")),
        "{:?}",
        p.writes
    );
    assert!(p.unschedulable.is_empty());
}

fn plan_with(w: &World, running: bool, asleep: &HashSet<String>) -> NodePlan {
    plan_nodes(&PlanInputs {
        cluster: &w.vc,
        owner: &w.owner,
        desired: &w.desired,
        cluster_running: running,
        all_nodes: &w.nodes,
        hosts: &w.hosts,
        pending: &w.pending,
        replacing: &w.replacing,
        calendar: &Calendar::default(),
        asleep,
        own_windows: None,
        now: Instant::now(),
        wall: k8s_openapi::jiff::Timestamp::now(),
    })
}

/// The desired nodes of `w`'s cluster after `edit` changes its spec.
fn redesire(w: &mut World, allocated: &[&str], edit: impl FnOnce(&mut VirtualCluster)) {
    edit(&mut w.vc);
    let ng: NetworkGroup = obj(group(allocated));
    w.desired = desired_nodes(&w.vc, &ng, &[obj(site())]).unwrap();
}

/// A pool or one node switched off while the cluster runs: written
/// stopped (new ones created stopped, not deferred), their room not held;
/// switched on again, they start where they are. A switched-off frontend
/// does not hold `FrontendFirst` workers back.
#[test]
fn a_pool_or_one_node_is_switched_off_while_the_cluster_runs() {
    let all = ["c-frontend", "c-w-0", "c-w-1"];
    let mut w = world(2, &all);
    w.nodes = written(&plan(&w, true));
    redesire(&mut w, &all, |vc| {
        vc.spec.stopped_nodes = vec![yukumo_api::virtualcluster::StoppedNode("w-1".into())]
    });
    assert!(w.desired[2].switched_off && !w.desired[1].switched_off);
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-w-1"]);
    assert!(!written(&p)[0].spec.running);
    w.nodes = w
        .nodes
        .iter()
        .map(|n| {
            written(&p)
                .into_iter()
                .find(|x| x.name_any() == n.name_any())
                .unwrap_or_else(|| n.clone())
        })
        .collect();
    // Its room is given back: the host views count only the running two.
    let views = host_views(
        &w.hosts,
        &w.nodes,
        &HashMap::new(),
        &["vc-uid".into()].into(),
    );
    assert_eq!(views.iter().map(|v| v.used.cpu).sum::<u32>(), 2);
    // The whole pool off, and scaled up meanwhile: the new node is created
    // stopped (not deferred as a worker waiting for its frontend).
    let all3 = ["c-frontend", "c-w-0", "c-w-1", "c-w-2"];
    let mut w3 = world(3, &all3);
    w3.nodes = w.nodes.clone();
    redesire(&mut w3, &all3, |vc| vc.spec.pools[0].running = false);
    let p = plan(&w3, true);
    assert_eq!(names(&p.writes), ["c-w-0", "c-w-2"]);
    assert!(written(&p).iter().all(|n| !n.spec.running));
    assert!(p.waiting.is_empty());
    // Switched on again: both start, on the hosts they had.
    let before = w.nodes.clone();
    redesire(&mut w, &all, |vc| vc.spec.stopped_nodes.clear());
    let p = plan(&w, true);
    assert_eq!(names(&p.writes), ["c-w-1"]);
    let n = &written(&p)[0];
    assert!(n.spec.running);
    assert_eq!(n.spec.host, before[2].spec.host);
    // The frontend off, FrontendFirst: workers start all the same.
    let mut f = world(1, &["c-frontend", "c-w-0"]);
    f.vc.spec.start_order = yukumo_api::virtualcluster::StartOrder::FrontendFirst;
    redesire(&mut f, &["c-frontend", "c-w-0"], |vc| {
        vc.spec.stopped_nodes = vec![yukumo_api::virtualcluster::StoppedNode("frontend".into())]
    });
    let p = plan(&f, true);
    assert_eq!(names(&p.writes), ["c-frontend", "c-w-0"]);
    let ws = written(&p);
    assert!(!ws[0].spec.running && ws[1].spec.running);
    assert!(p.waiting.is_empty());
}
