//! NetworkGroup: allocate what the group needs (segment, addresses, public
//! IPs, router placement) and report it.
//!
//! Observe → decide → write: the group is read fresh from the API server
//! (allocations are never decided on a stale view), the decision
//! ([`decide::decide`]) is taken under the placement lock against the
//! caches plus what other reconciles have just claimed, and the lock is
//! released before the status is written — with the read's resourceVersion
//! as a precondition, so a concurrent change makes the write fail (and the
//! group is decided again) rather than hand something out twice.

pub mod decide;
pub mod router;
pub mod segment;
pub mod tunnels;

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use yukumo_api::NetworkGroup;
use yukumo_api::managers;

use crate::context::{Ctx, Result};

pub async fn reconcile(ng: Arc<NetworkGroup>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("NetworkGroup");
    let ns = ng.namespace().unwrap_or_default();
    let api = Api::<NetworkGroup>::namespaced(ctx.client.clone(), &ns);
    let Some(fresh) = api.get_opt(&ng.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if fresh.metadata.uid != ng.metadata.uid || fresh.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let key = decide::key_of(&fresh);
    let namespace_labels = ctx.namespace_labels(&ns).await?;
    let limits = ctx.stores.quota_limits(&ns);
    let decision = {
        let mut pending = ctx.placements.lock().await;
        pending.prune(&ctx.stores);
        let claims = pending.network_claims();
        let d = decide::decide(&decide::Inputs {
            group: &fresh,
            sites: &ctx.stores.all_sites(),
            hosts: &ctx.stores.hosts.state(),
            groups: &ctx.stores.network_groups.state(),
            clusters: &ctx.stores.clusters.state(),
            nodes: &ctx.stores.nodes.state(),
            claims: &claims,
            namespace_labels: &namespace_labels,
            limits: &limits,
        });
        let span: Vec<String> = fresh.spec.span().iter().map(|s| s.to_string()).collect();
        pending.claim_network(&key, span, d.segment, &d.public_ips);
        d
    };
    let old = fresh.status.clone().unwrap_or_default();
    if decision.status != old {
        let mut patch = yukumo_api::status_apply_patch::<NetworkGroup, _>(&decision.status);
        patch["metadata"] = serde_json::json!({
            "resourceVersion": fresh.metadata.resource_version,
        });
        let written = api
            .patch_status(
                &fresh.name_any(),
                &PatchParams::apply(managers::CONTROLLER).force(),
                &Patch::Apply(&patch),
            )
            .await;
        if let Err(e) = written {
            // Not taken: what the group holds is what the API says.
            ctx.placements.lock().await.release_network(&key);
            return Err(e.into());
        }
        ctx.count_status_write("NetworkGroup");
    }
    ctx.announce(&fresh, &old.conditions, &decision.verdict)
        .await;
    Ok(Action::requeue(decision.requeue))
}

#[cfg(test)]
mod tests;
