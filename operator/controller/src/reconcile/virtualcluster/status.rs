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
                format!("placing again after host loss: {}", o.recovering.join(", ")),
            ),
            1,
        );
    }
    if !o.unschedulable.is_empty() {
        return soon(
            Verdict::stalled(Reason::Unschedulable, o.unschedulable.join("; ")),
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
        return v(match f.power.next {
            Some((t, _)) => Verdict::progressing(
                Reason::ReservationPending,
                format!("nodes are created at {t}"),
            ),
            None => Verdict::ready(
                Reason::ReservationEnded,
                "the reservation ended; its nodes were deleted",
            ),
        });
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
