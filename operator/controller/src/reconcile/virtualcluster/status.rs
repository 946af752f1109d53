//! A VirtualCluster's status from what converging its nodes found, as pure
//! functions: per-node summaries, the ready count, and the verdict.

use std::time::Duration;

use kube::ResourceExt;
use yukumo_api::common::{ConditionStatus, Conditions, condition_types};
use yukumo_api::virtualcluster::{NodeState, NodeSummary};
use yukumo_api::virtualnode::{NodePhase, NodeRole, VirtualNode};
use yukumo_api::{NetworkGroup, Reason};

use super::super::reservation::PowerPlan;
use super::super::verdict::Verdict;
use super::NodesOutcome;

/// A node as its cluster reports it.
pub fn summary(n: &VirtualNode) -> NodeSummary {
    NodeSummary {
        name: n.name_any(),
        role: n.spec.role,
        host: n.spec.host.clone(),
        site: n.spec.site.clone(),
        ip: n.spec.network.as_ref().map(|net| net.ip),
        phase: Some(
            n.status
                .as_ref()
                .map(|s| s.phase)
                .unwrap_or_default()
                .into(),
        ),
    }
}

/// Every node: those that exist, then those waiting for their frontend or
/// their address.
pub fn summaries(o: &NodesOutcome) -> Vec<NodeSummary> {
    let mut out: Vec<NodeSummary> = o.nodes.iter().map(summary).collect();
    out.extend(o.waiting.iter().map(|name| {
        NodeSummary::waiting(
            name.clone(),
            NodeRole::Worker,
            NodeState::WaitingForFrontend,
        )
    }));
    out.extend(o.waiting_network.iter().map(|(name, role)| {
        NodeSummary::waiting(name.clone(), *role, NodeState::WaitingForAddress)
    }));
    out.extend(o.waiting_volumes.iter().map(|(name, role)| {
        NodeSummary::waiting(name.clone(), *role, NodeState::WaitingForVolume)
    }));
    out
}

fn node_ready(n: &VirtualNode) -> bool {
    n.status
        .as_ref()
        .is_some_and(|s| s.conditions.is_true(condition_types::READY))
}

/// Nodes that run and are ready.
pub fn ready_count(o: &NodesOutcome) -> i32 {
    o.nodes.iter().filter(|n| node_ready(n)).count() as i32
}

/// What the verdict is computed from.
pub struct Facts<'a> {
    pub outcome: &'a NodesOutcome,
    pub group: &'a NetworkGroup,
    pub group_name: &'a str,
    pub power: &'a PowerPlan,
    /// `spec.running`.
    pub spec_running: bool,
    /// Whether the nodes should run now (spec and reservation).
    pub running_now: bool,
    pub desired: i32,
    pub ready: i32,
    /// The spec's revision.
    pub revision: &'a str,
    /// Nodes the user switched off while the cluster runs (a pool's
    /// `running: false`, `stoppedNodes`).
    pub switched_off: &'a [String],
}

/// The verdict, and a sooner requeue where the state moves by itself.
pub struct StatusVerdict {
    pub verdict: Verdict,
    pub requeue: Option<Duration>,
}

pub fn verdict(f: &Facts) -> StatusVerdict {
    let o = f.outcome;
    let soon = |verdict, secs| StatusVerdict {
        verdict,
        requeue: Some(Duration::from_secs(secs)),
    };
    let v = |verdict| StatusVerdict {
        verdict,
        requeue: None,
    };
    if !o.recovering.is_empty() {
        return soon(
            Verdict::progressing(
                Reason::RecoveringNodes,
                format!("placing again elsewhere: {}", o.recovering.join(", ")),
            ),
            1,
        );
    }
    // A capacity wait is progress (capacity can free up at any time), with
    // its reason; never "failed".
    if !o.unschedulable.is_empty() {
        return soon(
            Verdict::progressing(Reason::Unschedulable, o.unschedulable.join("; ")),
            10,
        );
    }
    if !o.waiting_network.is_empty() {
        // The group's status change triggers this cluster again.
        let why = f
            .group
            .status
            .as_ref()
            .and_then(|s| s.conditions.get_condition(condition_types::READY))
            .filter(|c| c.status != ConditionStatus::True)
            .map(|c| format!(" (NetworkGroup {}: {})", c.reason, c.message))
            .unwrap_or_default();
        let names: Vec<&str> = o.waiting_network.iter().map(|(n, _)| n.as_str()).collect();
        return v(Verdict::progressing(
            Reason::WaitingForNetwork,
            format!(
                "NetworkGroup {:?} has no address yet for {}{why}",
                f.group_name,
                names.join(", ")
            ),
        ));
    }
    if !f.power.exists {
        // Waiting for its window is done, as far as GitOps goes: nothing
        // is left to do until then (it says when).
        return v(match f.power.next {
            Some((t, _)) => Verdict::ready(
                Reason::ReservationPending,
                format!("reserved; nodes are created at {t}"),
            ),
            None => Verdict::ready(
                Reason::ReservationEnded,
                "the reservation ended; its nodes were deleted",
            ),
        });
    }
    // A node that failed (its image cannot be fetched or is not what its
    // checksum says, its host cannot run it) fails the cluster, by name.
    let failed: Vec<&VirtualNode> = o
        .nodes
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .is_some_and(|s| s.phase == NodePhase::Failed)
        })
        .collect();
    if let Some(n) = failed.first() {
        let st = n.status.as_ref();
        let ready = st.and_then(|s| s.conditions.get_condition(condition_types::READY));
        let reason = ready
            .map(|c| c.reason.clone())
            .unwrap_or(Reason::NodesStarting);
        let msg = ready
            .map(|c| c.message.clone())
            .or_else(|| st.and_then(|s| s.last_error.clone()))
            .unwrap_or_default();
        let more = match failed.len() {
            1 => String::new(),
            k => format!(" (and {} more failed nodes)", k - 1),
        };
        return soon(
            Verdict::stalled(reason, format!("node {}: {msg}{more}", n.name_any())),
            30,
        );
    }
    if !o.outdated.is_empty() || !o.replacing.is_empty() {
        // A rollout moves by itself (each replacement's progress triggers
        // the cluster); the requeue is a safety net.
        let mut doing = String::new();
        if !o.replacing.is_empty() {
            doing = format!("; replacing {}", o.replacing.join(", "));
        }
        return soon(
            Verdict::progressing(
                Reason::RollingOut,
                format!(
                    "rolling out revision {}: {}/{} nodes updated{doing}",
                    f.revision, o.updated, f.desired
                ),
            ),
            5,
        );
    }
    if !f.running_now {
        let stopped = o
            .nodes
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .is_some_and(|s| s.phase == NodePhase::Stopped)
            })
            .count() as i32;
        return v(if stopped == f.desired {
            Verdict::ready(
                Reason::Stopped,
                format!(
                    "all {} nodes stopped ({})",
                    f.desired,
                    if f.spec_running {
                        f.power.why
                    } else {
                        "spec.running is false"
                    }
                ),
            )
        } else {
            Verdict::progressing(
                Reason::Stopping,
                format!("{stopped}/{} nodes stopped", f.desired),
            )
        });
    }
    if !f.switched_off.is_empty() {
        // Ready once every other node runs and is ready and these are
        // stopped: the state the user asked for.
        let meant = f.desired - f.switched_off.len() as i32;
        let still_up: Vec<&str> = o
            .nodes
            .iter()
            .filter(|n| f.switched_off.contains(&n.name_any()))
            .filter(|n| {
                n.spec.running
                    || n.status
                        .as_ref()
                        .is_none_or(|s| s.phase != NodePhase::Stopped)
            })
            .map(|n| n.metadata.name.as_deref().unwrap_or_default())
            .collect();
        let ready = o
            .nodes
            .iter()
            .filter(|n| !f.switched_off.contains(&n.name_any()) && node_ready(n))
            .count() as i32;
        let off = super::abbreviated("switched off", f.switched_off);
        return v(if ready == meant && still_up.is_empty() {
            Verdict::ready(
                Reason::AllNodesReady,
                format!("{ready}/{meant} running nodes ready; {off}"),
            )
        } else if ready == meant {
            Verdict::progressing(
                Reason::Stopping,
                format!("stopping {} ({off})", still_up.join(", ")),
            )
        } else {
            Verdict::progressing(
                Reason::NodesStarting,
                format!("{}/{meant} running nodes ready; {off}", f.ready),
            )
        });
    }
    v(if f.ready == f.desired {
        Verdict::ready(
            Reason::AllNodesReady,
            format!("{}/{} nodes ready", f.ready, f.desired),
        )
    } else {
        Verdict::progressing(
            Reason::NodesStarting,
            format!("{}/{} nodes ready", f.ready, f.desired),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, phase: &str, reason: &str, msg: &str) -> VirtualNode {
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": name, "namespace": "t1"},
            "spec": {"cluster": "c", "role": "frontend", "index": 0, "hostname": name,
                     "resources": {"cpu": 1, "memoryMiB": 64},
                     "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "False",
                "reason": reason, "message": msg, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap()
    }

    fn facts<'a>(o: &'a NodesOutcome, g: &'a NetworkGroup, p: &'a PowerPlan) -> Facts<'a> {
        Facts {
            outcome: o,
            group: g,
            group_name: "net",
            power: p,
            spec_running: true,
            running_now: true,
            desired: 2,
            ready: 0,
            revision: "0123456789",
            switched_off: &[],
        }
    }

    /// A group, and a power plan that runs the cluster now.
    fn group_and_power() -> (NetworkGroup, PowerPlan) {
        let g = serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
            "metadata": {"name": "net", "namespace": "t1"},
            "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}
        }))
        .unwrap();
        let power = PowerPlan {
            exists: true,
            run: true,
            next: None,
            why: "",
        };
        (g, power)
    }

    /// What GitOps tools read: a failed node fails its cluster, by name; a
    /// capacity wait is progress; a reservation waiting for its window is
    /// done and says when.
    #[test]
    fn failed_nodes_fail_capacity_waits_progress_pending_reservations_are_done() {
        let (g, power) = group_and_power();
        let o = NodesOutcome {
            nodes: vec![
                node(
                    "c-frontend",
                    "Failed",
                    "ImagePullFailed",
                    "checksum mismatch",
                ),
                node("c-w-0", "Failed", "ImagePullFailed", "checksum mismatch"),
            ],
            ..Default::default()
        };
        let v = verdict(&facts(&o, &g, &power)).verdict;
        assert!(v.is_stalled());
        assert_eq!(v.reason(), &Reason::ImagePullFailed);
        assert_eq!(
            v.message(),
            "node c-frontend: checksum mismatch (and 1 more failed nodes)"
        );
        let o = NodesOutcome {
            unschedulable: vec!["c-w-0 needs 1 cpu".into()],
            ..Default::default()
        };
        let v = verdict(&facts(&o, &g, &power)).verdict;
        assert!(!v.is_stalled());
        assert_eq!(v.reason(), &Reason::Unschedulable);
        let t: k8s_openapi::jiff::Timestamp = "2030-01-01T09:00:00Z".parse().unwrap();
        let pending = PowerPlan {
            exists: false,
            run: false,
            next: Some((t, yukumo_api::virtualcluster::TransitionAction::Create)),
            why: "",
        };
        let v = verdict(&facts(&NodesOutcome::default(), &g, &pending)).verdict;
        assert!(matches!(v, Verdict::Ready { .. }), "{v:?}");
        assert_eq!(
            v.message(),
            "reserved; nodes are created at 2030-01-01T09:00:00Z"
        );
    }

    /// Nodes switched off while the cluster runs: Ready once the others are
    /// ready and these are stopped, saying which; until then, progress.
    #[test]
    fn switched_off_nodes_are_ready_when_stopped() {
        let (g, power) = group_and_power();
        let mut up = node("c-frontend", "Running", "Running", "");
        up.status.as_mut().unwrap().conditions[0].status = ConditionStatus::True;
        up.spec.running = true;
        let mut w0 = node("c-w-0", "Running", "Running", "");
        w0.status.as_mut().unwrap().conditions[0].status = ConditionStatus::True;
        w0.spec.running = true;
        let off = ["c-w-0".to_string()];
        let o = NodesOutcome {
            nodes: vec![up.clone(), w0.clone()],
            ..Default::default()
        };
        let mut f = facts(&o, &g, &power);
        f.ready = 2;
        f.switched_off = &off;
        let v = verdict(&f).verdict;
        assert_eq!(v.reason(), &Reason::Stopping, "{v:?}");
        assert_eq!(v.message(), "stopping c-w-0 (1 node switched off: c-w-0)");
        w0.spec.running = false;
        w0.status.as_mut().unwrap().phase = NodePhase::Stopped;
        w0.status.as_mut().unwrap().conditions[0].status = ConditionStatus::False;
        let o = NodesOutcome {
            nodes: vec![up, w0],
            ..Default::default()
        };
        let mut f = facts(&o, &g, &power);
        f.ready = 1;
        f.switched_off = &off;
        let v = verdict(&f).verdict;
        assert!(matches!(v, Verdict::Ready { .. }), "{v:?}");
        assert_eq!(
            v.message(),
            "1/1 running nodes ready; 1 node switched off: c-w-0"
        );
    }
}
