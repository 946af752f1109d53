//! Volume: check the Site and the snapshot source it names.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use yukumo_api::Reason;
use yukumo_api::site::Site;
use yukumo_api::volume::{Volume, VolumeStatus};

use super::verdict::{Verdict, apply_verdict};
use crate::context::{Ctx, Error, Result};

pub async fn reconcile(vol: Arc<Volume>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("Volume");
    let ns = vol
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let mut verdict = Verdict::progressing(
        Reason::ReferencesResolved,
        "waiting for placement on a host's storage pool",
    );
    if let Some(site) = &vol.spec.site
        && Api::<Site>::all(ctx.client.clone())
            .get_opt(site)
            .await?
            .is_none()
    {
        verdict = Verdict::stalled(
            Reason::SiteNotFound,
            format!("spec.site: Site {site:?} not found"),
        );
    }
    if let Some(snap) = vol.spec.source.as_ref().and_then(|s| s.snapshot.as_ref()) {
        match Api::<Volume>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&snap.volume)
            .await?
        {
            None => {
                verdict = Verdict::stalled(
                    Reason::SourceNotFound,
                    format!(
                        "spec.source.snapshot.volume: Volume {:?} not found in namespace {ns}",
                        snap.volume
                    ),
                )
            }
            Some(src) if !src.spec.snapshots.iter().any(|s| s.name == snap.name) => {
                verdict = Verdict::stalled(
                    Reason::SourceNotFound,
                    format!(
                        "spec.source.snapshot.name: Volume {:?} has no snapshot {:?}",
                        snap.volume, snap.name
                    ),
                )
            }
            Some(_) => {}
        }
    }
    if let Some(r) = &vol.spec.restore_from
        && !vol.spec.snapshots.iter().any(|s| &s.name == r)
    {
        verdict = Verdict::stalled(
            Reason::SnapshotNotFound,
            format!("spec.restoreFrom: no snapshot {r:?} in spec.snapshots"),
        );
    }
    let old = vol.status.clone().unwrap_or_default();
    let status = VolumeStatus {
        observed_generation: vol.metadata.generation,
        conditions: apply_verdict(&old.conditions, vol.metadata.generation, &verdict),
        ..old.clone()
    };
    if status != old {
        ctx.apply_status(
            &Api::<Volume>::namespaced(ctx.client.clone(), &ns),
            vol.as_ref(),
            &status,
        )
        .await?;
    }
    ctx.announce(vol.as_ref(), &old.conditions, &verdict).await;
    Ok(Action::requeue(Duration::from_secs(300)))
}
