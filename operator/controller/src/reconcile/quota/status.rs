//! A ResourceQuota's yukumo entries in its status: `status.hard` (as the
//! quota controller of kube-controller-manager writes it for its own
//! resources; it keeps ours) and `status.used` from the namespace's
//! [`super::Ledger`], so `kubectl get resourcequota` shows use against
//! limit. An entry that cannot be enforced is a Warning Event on the quota.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ResourceQuota;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use yukumo_api::Reason;

use super::{Dim, PREFIX};
use crate::context::{Ctx, Error, Result};

/// The `status` entries (`hard`, `used`) for the yukumo limits of `rq`,
/// given the namespace's use.
pub fn entries(
    rq: &ResourceQuota,
    used: &super::Amounts,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut hard = BTreeMap::new();
    let mut use_ = BTreeMap::new();
    for (k, v) in rq.spec.iter().flat_map(|s| s.hard.iter().flatten()) {
        if let Some(d) = Dim::from_key(k) {
            hard.insert(k.clone(), v.0.clone());
            use_.insert(k.clone(), d.show(used[d as usize]));
        }
    }
    (hard, use_)
}

pub async fn reconcile(rq: Arc<ResourceQuota>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("ResourceQuota");
    let ns = rq
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let ours = rq
        .spec
        .iter()
        .flat_map(|s| s.hard.iter().flatten())
        .any(|(k, _)| k.starts_with(PREFIX));
    if !ours {
        return Ok(Action::await_change());
    }
    let mine = super::limits([rq.as_ref()]);
    for p in &mine.problems {
        ctx.event(rq.as_ref(), EventType::Warning, &Reason::QuotaExceeded, format!(
            "{p}: every growth of a yukumo object in namespace {ns} is refused until it is fixed"
        ))
        .await;
    }
    let used = ctx
        .stores
        .quota_ledger(&ns)
        .map(|l| l.used)
        .unwrap_or([0; 5]);
    let (hard, used) = entries(&rq, &used);
    let st = rq.status.clone().unwrap_or_default();
    let same = |want: &BTreeMap<String, String>,
                have: &Option<
        BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >| {
        want.iter().all(|(k, v)| {
            have.as_ref().and_then(|h| h.get(k)).is_some_and(|q| {
                yukumo_api::quantity::parse_str(&q.0).ok()
                    == yukumo_api::quantity::parse_str(v).ok()
            })
        })
    };
    if !(same(&hard, &st.hard) && same(&used, &st.used)) {
        let patch = serde_json::json!({"status": {"hard": hard, "used": used}});
        Api::<ResourceQuota>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &rq.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        ctx.count_status_write("ResourceQuota");
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceQuotaSpec;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn entries_show_only_yukumo_limits_with_their_use_in_their_units() {
        let rq = ResourceQuota {
            spec: Some(ResourceQuotaSpec {
                hard: Some(
                    [
                        ("pods", "10"),
                        ("yukumo.io/memory", "8Gi"),
                        ("yukumo.io/vcpus", "4"),
                        ("yukumo.io/typo", "1"),
                    ]
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (hard, used) = entries(&rq, &[3, 3 << 30, 2, 0, 0]);
        assert_eq!(hard.len(), 2);
        assert_eq!(used["yukumo.io/memory"], "3Gi");
        assert_eq!(used["yukumo.io/vcpus"], "3");
    }
}
