//! What a Volume needs, as a pure function of the Volume, the Sites and
//! its holder: where it is placed (once: its data lives there), whether
//! its claim can be released, and its kstatus verdict.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;
use yukumo_api::Reason;
use yukumo_api::quantity::parse_quantity;
use yukumo_api::site::Site;
use yukumo_api::volume::{Volume, VolumeLocation, VolumePhase};

use crate::reconcile::verdict::Verdict;

/// What the holder named in `status.attachedTo` still does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Its cluster exists, is not being deleted, and lists the Volume for that node.
    pub cluster_wants: bool,
    /// Its VirtualNode lists the disk (spec, or the agent's status).
    pub node_holds: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Where the Volume is placed (kept once set).
    pub location: Option<VolumeLocation>,
    /// The claim can be released: nobody holds the Volume any more.
    pub release: bool,
    pub verdict: Verdict,
    pub phase: VolumePhase,
    pub capacity: Option<Quantity>,
    /// `status.granted`: see [`apply_quota`].
    pub granted: Option<Quantity>,
}

/// The namespace's quota on the decision: once placed, the Volume is
/// granted its `spec.size`, unless the quota refuses the growth (`refusal`):
/// then a Volume not yet placed stays unplaced, a placed one keeps the size
/// it was granted, and either says why.
pub fn apply_quota(d: &mut Decision, vol: &Volume, refusal: Option<&str>) {
    let Some(asked) = parse_quantity(&vol.spec.size).ok().filter(|b| *b > 0) else {
        return;
    };
    let placed_before = vol.status.as_ref().is_some_and(|s| s.location.is_some());
    match refusal {
        None if d.location.is_some() => d.granted = Some(quantity(asked)),
        None => {}
        Some(_) if vol.metadata.deletion_timestamp.is_some() => {}
        Some(why) => {
            if !placed_before {
                d.location = None;
                d.phase = VolumePhase::Pending;
            }
            d.verdict = Verdict::stalled(
                Reason::QuotaExceeded,
                format!("spec.size: {} not granted: {why}", vol.spec.size.0),
            );
        }
    }
}

/// `bytes` as a quantity: binary units when exact.
pub fn quantity(bytes: u64) -> Quantity {
    for (unit, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1u64 << shift) {
            return Quantity(format!("{}{unit}", bytes >> shift));
        }
    }
    Quantity(bytes.to_string())
}

/// The location of a Volume not yet placed, or why it cannot be placed.
fn place(vol: &Volume, sites: &[Site]) -> Result<VolumeLocation, Verdict> {
    let pool = &vol.spec.pool;
    let at = |s: &Site| s.spec.storage_pool(pool).is_some();
    let with_pool: Vec<&Site> = sites.iter().filter(|s| at(s)).collect();
    let site = match &vol.spec.site {
        Some(name) => {
            let Some(site) = sites.iter().find(|s| &s.name_any() == name) else {
                return Err(Verdict::stalled(
                    Reason::SiteNotFound,
                    format!("spec.site: Site {name:?} not found"),
                ));
            };
            if !at(site) {
                let elsewhere: Vec<String> = with_pool.iter().map(|s| s.name_any()).collect();
                let theirs: Vec<&str> = site
                    .spec
                    .storage_pools
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect();
                return Err(Verdict::stalled(
                    Reason::PoolNotFound,
                    format!(
                        "spec.pool: Site {name} has no storage pool {pool:?} (its pools: {}){}",
                        if theirs.is_empty() {
                            "none".into()
                        } else {
                            theirs.join(", ")
                        },
                        if elsewhere.is_empty() {
                            String::new()
                        } else {
                            format!("; pool {pool:?} is at Site {}", elsewhere.join(", "))
                        }
                    ),
                ));
            }
            site
        }
        None => match with_pool.as_slice() {
            [] => {
                return Err(Verdict::stalled(
                    Reason::PoolNotFound,
                    format!("spec.pool: no Site declares a storage pool {pool:?}"),
                ));
            }
            [one] => *one,
            many => {
                let names: Vec<String> = many.iter().map(|s| s.name_any()).collect();
                return Err(Verdict::stalled(
                    Reason::PoolNotFound,
                    format!(
                        "spec.site: storage pool {pool:?} exists at Sites {}: name one",
                        names.join(", ")
                    ),
                ));
            }
        },
    };
    let p = site.spec.storage_pool(pool).expect("checked");
    Ok(VolumeLocation {
        site: site.name_any(),
        pool: p.name.clone(),
        host: p.host.clone(),
    })
}

/// `restoreFrom` names a snapshot the spec does not keep.
fn restore_unknown(vol: &Volume) -> Option<String> {
    let r = vol.spec.restore_from.as_ref()?;
    (!vol.spec.snapshots.iter().any(|s| &s.name == r))
        .then(|| format!("spec.restoreFrom: no snapshot {r:?} in spec.snapshots"))
}

/// A restore asked and not yet done.
pub fn restore_pending(vol: &Volume) -> Option<&str> {
    let r = vol.spec.restore_from.as_deref()?;
    let done = vol.status.as_ref().and_then(|s| s.restored_from.as_deref());
    (done != Some(r)).then_some(r)
}

pub fn decide(
    vol: &Volume,
    sites: &[Site],
    volumes: &[&Volume],
    holder: Option<Holder>,
    namespace_labels: &std::collections::BTreeMap<String, String>,
) -> Decision {
    let status = vol.status.clone().unwrap_or_default();
    let deleting = vol.metadata.deletion_timestamp.is_some();
    let release = holder.is_some_and(|h| !h.cluster_wants && !h.node_holds);
    // Who holds it: its writer, or its readers.
    let attached = status
        .attached_to
        .as_ref()
        .filter(|_| !release)
        .map(|a| format!("node {} of cluster {} as {}", a.node, a.cluster, a.target))
        .or_else(|| {
            (!status.readers.is_empty()).then(|| {
                let by: Vec<String> = status
                    .readers
                    .iter()
                    .map(|a| format!("node {} of cluster {} as {}", a.node, a.cluster, a.target))
                    .collect();
                format!("read-only {}", by.join(", "))
            })
        });
    let attached = attached.as_deref();
    let mut d = Decision {
        location: status.location.clone(),
        release,
        verdict: Verdict::progressing(Reason::WaitingForPool, "waiting for placement"),
        phase: VolumePhase::Pending,
        capacity: status
            .backing
            .as_ref()
            .filter(|b| b.capacity_bytes > 0)
            .map(|b| quantity(b.capacity_bytes)),
        granted: status.granted.clone(),
    };
    let bytes = match parse_quantity(&vol.spec.size) {
        Ok(b) if b > 0 => b,
        _ => {
            d.verdict = Verdict::stalled(
                Reason::InvalidSize,
                format!(
                    "spec.size: {:?} is not a positive quantity such as 20Gi",
                    vol.spec.size.0
                ),
            );
            d.phase = VolumePhase::Failed;
            return d;
        }
    };
    if let Some(msg) = restore_unknown(vol)
        && !deleting
    {
        d.verdict = Verdict::stalled(Reason::SnapshotNotFound, msg);
        return d;
    }
    if let Some(src) = vol.spec.source.as_ref().and_then(|s| s.snapshot.as_ref())
        && d.location.is_none()
        && !deleting
    {
        // The source must exist and keep that snapshot (the agent checks
        // the pool and copies it).
        let found = volumes
            .iter()
            .find(|v| v.name_any() == src.volume && v.namespace() == vol.namespace());
        let msg = match found {
            None => Some(format!(
                "spec.source.snapshot.volume: Volume {:?} not found in namespace {}",
                src.volume,
                vol.namespace().unwrap_or_default()
            )),
            Some(v) if !v.spec.snapshots.iter().any(|s| s.name == src.name) => Some(format!(
                "spec.source.snapshot.name: Volume {:?} has no snapshot {:?}",
                src.volume, src.name
            )),
            Some(v) if v.spec.pool != vol.spec.pool => Some(format!(
                "spec.source.snapshot: Volume {:?} is in pool {:?}, this one in {:?}: a volume is made from a snapshot in the same pool",
                src.volume, v.spec.pool, vol.spec.pool
            )),
            Some(_) => None,
        };
        if let Some(msg) = msg {
            d.verdict = Verdict::stalled(Reason::SourceNotFound, msg);
            d.phase = VolumePhase::Failed;
            return d;
        }
    }
    let loc = match &d.location {
        Some(l) => l.clone(),
        None if deleting => {
            d.verdict =
                Verdict::progressing(Reason::WaitingForPool, "deleted before it was placed");
            return d;
        }
        None => match place(vol, sites) {
            Ok(l) => {
                // Storage at a Site is the Site's to give: only to the
                // namespaces it admits.
                let ns = vol.namespace().unwrap_or_default();
                if let Some(Err(why)) = sites
                    .iter()
                    .find(|s| s.name_any() == l.site)
                    .map(|s| s.admits(&ns, namespace_labels))
                {
                    d.verdict =
                        Verdict::stalled(Reason::SiteAccessDenied, format!("spec.pool: {why}"));
                    d.phase = VolumePhase::Failed;
                    return d;
                }
                d.location = Some(l.clone());
                d.verdict = Verdict::progressing(
                    Reason::WaitingForPool,
                    format!(
                        "placed in pool {} on host {} (Site {}); waiting for its agent to create it",
                        l.pool, l.host, l.site
                    ),
                );
                return d;
            }
            Err(v) => {
                d.verdict = v;
                d.phase = VolumePhase::Failed;
                return d;
            }
        },
    };
    if let Some(a) = attached {
        d.phase = VolumePhase::Attached;
        if deleting {
            d.verdict = Verdict::progressing(
                Reason::DetachPending,
                format!(
                    "deletion waits: attached to {a}; remove it from that cluster's spec (or delete the cluster) to finish"
                ),
            );
            return d;
        }
    } else if deleting {
        d.verdict = Verdict::progressing(
            Reason::DetachPending,
            format!(
                "detached; host {} removes its storage from pool {}",
                loc.host, loc.pool
            ),
        );
        return d;
    }
    let Some(b) = &status.backing else {
        d.verdict = Verdict::progressing(
            Reason::WaitingForPool,
            format!(
                "waiting for host {} to create it in pool {}",
                loc.host, loc.pool
            ),
        );
        return d;
    };
    match (&b.error, &b.reason) {
        // Waits that resolve by themselves: said below, or as the agent says.
        (Some(_), Some(Reason::RestorePending)) => {}
        (Some(err), Some(Reason::SnapshotPending)) => {
            d.verdict = Verdict::progressing(Reason::SnapshotPending, err.clone());
            return d;
        }
        (Some(err), reason) => {
            d.verdict =
                Verdict::stalled(reason.clone().unwrap_or(Reason::StorageFailed), err.clone());
            if attached.is_none() {
                d.phase = VolumePhase::Failed;
            }
            return d;
        }
        (None, _) => {}
    }
    if let Some(r) = restore_pending(vol) {
        d.verdict = Verdict::progressing(
            Reason::RestorePending,
            match attached {
                Some(a) => format!(
                    "restoring from snapshot {r:?} waits until it is let go of (attached to {a})"
                ),
                None => format!("restoring from snapshot {r:?}"),
            },
        );
        return d;
    }
    if b.capacity_bytes != bytes && !status.readers.is_empty() {
        d.verdict = Verdict::progressing(
            Reason::Provisioning,
            format!(
                "growing from {} to {bytes} bytes waits until its read-only holders let go ({})",
                b.capacity_bytes,
                attached.unwrap_or_default()
            ),
        );
        return d;
    }
    if b.capacity_bytes != bytes {
        d.verdict = Verdict::progressing(
            Reason::Provisioning,
            format!(
                "growing from {} to {bytes} bytes{}",
                b.capacity_bytes,
                if attached.is_some() {
                    " (online, by the node's agent)"
                } else {
                    ""
                }
            ),
        );
        return d;
    }
    let missing: Vec<&str> = vol
        .spec
        .snapshots
        .iter()
        .filter(|s| !status.snapshots.iter().any(|t| t.name == s.name))
        .map(|s| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        d.verdict = Verdict::progressing(
            Reason::SnapshotPending,
            format!("taking snapshot {}", missing.join(", ")),
        );
        return d;
    }
    d.verdict = match attached {
        Some(a) => Verdict::ready(
            Reason::Attached,
            format!(
                "{bytes} bytes in pool {} on host {}; attached to {a}",
                loc.pool, loc.host
            ),
        ),
        None => {
            d.phase = VolumePhase::Available;
            Verdict::ready(
                Reason::Available,
                format!("{bytes} bytes in pool {} on host {}", loc.pool, loc.host),
            )
        }
    };
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn site(name: &str, pools: &[&str]) -> Site {
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": name},
            "spec": {"storagePools": pools.iter().map(|p| json!({"name": p, "type": "dir", "host": format!("{name}-h1")})).collect::<Vec<_>>()}
        }))
        .unwrap()
    }

    fn vol(extra: serde_json::Value) -> Volume {
        let mut v = json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Volume",
            "metadata": {"name": "data", "namespace": "a", "uid": "u1"},
            "spec": {"size": "64Mi", "pool": "local"}
        });
        for (k, x) in extra.as_object().unwrap() {
            if k == "spec" {
                for (sk, sx) in x.as_object().unwrap() {
                    v["spec"][sk] = sx.clone();
                }
            } else {
                v[k] = x.clone();
            }
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn placed_in_the_one_site_with_the_pool_then_ready_at_its_size() {
        let sites = [site("s1", &["local"]), site("s2", &["fast"])];
        let d = decide(&vol(json!({})), &sites, &[], None, &Default::default());
        assert_eq!(
            d.location,
            Some(VolumeLocation {
                site: "s1".into(),
                pool: "local".into(),
                host: "s1-h1".into()
            })
        );
        assert_eq!(d.verdict.reason(), &Reason::WaitingForPool);
        let placed = vol(
            json!({"status": {"location": {"site": "s1", "pool": "local", "host": "s1-h1"},
            "backing": {"path": "/p/u1.qcow2", "capacityBytes": 67108864}}}),
        );
        let d = decide(&placed, &sites, &[], None, &Default::default());
        assert_eq!(d.verdict.reason(), &Reason::Available);
        assert!(matches!(d.verdict, Verdict::Ready { .. }));
        assert_eq!(d.capacity, Some(Quantity("64Mi".into())));
        assert_eq!(d.phase, VolumePhase::Available);
        // Grown in the spec: progressing until the storage has the size.
        let grown = vol(json!({"spec": {"size": "96Mi"}, "status": placed.status}));
        assert_eq!(
            decide(&grown, &sites, &[], None, &Default::default())
                .verdict
                .reason(),
            &Reason::Provisioning
        );
    }

    #[test]
    fn bad_pools_and_sites_are_refused_naming_the_field() {
        let sites = [site("s1", &["local"]), site("s2", &["local", "fast"])];
        let d = decide(
            &vol(json!({"spec": {"pool": "nope"}})),
            &sites,
            &[],
            None,
            &Default::default(),
        );
        assert_eq!(d.verdict.reason(), &Reason::PoolNotFound);
        assert!(d.verdict.message().starts_with("spec.pool: no Site"));
        let d = decide(&vol(json!({})), &sites, &[], None, &Default::default());
        assert!(
            d.verdict
                .message()
                .starts_with("spec.site: storage pool \"local\" exists at Sites s1, s2")
        );
        let d = decide(
            &vol(json!({"spec": {"pool": "fast", "site": "s1"}})),
            &sites,
            &[],
            None,
            &Default::default(),
        );
        assert_eq!(
            d.verdict.message(),
            "spec.pool: Site s1 has no storage pool \"fast\" (its pools: local); pool \"fast\" is at Site s2"
        );
        let d = decide(
            &vol(json!({"spec": {"site": "mars"}})),
            &sites,
            &[],
            None,
            &Default::default(),
        );
        assert_eq!(d.verdict.reason(), &Reason::SiteNotFound);
        let gone = json!({"spec": {"source": {"snapshot": {"volume": "gone", "name": "s"}}}});
        let d = decide(&vol(gone), &sites, &[], None, &Default::default());
        assert_eq!(d.verdict.reason(), &Reason::SourceNotFound);
        assert!(
            d.verdict
                .message()
                .starts_with("spec.source.snapshot.volume")
        );
        assert!(d.location.is_none());
        let d = decide(
            &vol(json!({"spec": {"restoreFrom": "s"}})),
            &sites,
            &[],
            None,
            &Default::default(),
        );
        assert_eq!(d.verdict.reason(), &Reason::SnapshotNotFound);
    }

    #[test]
    fn snapshots_and_restores_that_wait_are_progressing_with_what_they_wait_for() {
        let sites = [site("s1", &["local"])];
        let v = vol(json!({
            "spec": {"snapshots": [{"name": "s1"}], "restoreFrom": "s1"},
            "status": {"location": {"site": "s1", "pool": "local", "host": "s1-h1"},
                "backing": {"path": "/p/u1.qcow2", "capacityBytes": 67108864,
                            "error": "spec.restoreFrom: waits", "reason": "RestorePending"},
                "snapshots": [{"name": "s1", "created": "2026-01-01T00:00:00Z", "size": "64Mi"}],
                "attachedTo": {"cluster": "vc", "node": "vc-frontend", "target": "vdc"}}}));
        let d = decide(&v, &sites, &[], None, &Default::default());
        assert!(matches!(d.verdict, Verdict::Progressing { .. }));
        assert_eq!(d.verdict.reason(), &Reason::RestorePending);
        assert!(
            d.verdict.message().contains(
                "waits until it is let go of (attached to node vc-frontend of cluster vc"
            )
        );
        // Done once: restoredFrom names it, and the field may stay.
        let mut done = v.clone();
        let st = done.status.as_mut().unwrap();
        st.restored_from = Some("s1".into());
        st.backing.as_mut().unwrap().error = None;
        st.backing.as_mut().unwrap().reason = None;
        assert_eq!(
            decide(&done, &sites, &[], None, &Default::default())
                .verdict
                .reason(),
            &Reason::Attached
        );
        // A snapshot not taken yet.
        let mut pending = done.clone();
        pending.status.as_mut().unwrap().snapshots.clear();
        let d = decide(&pending, &sites, &[], None, &Default::default());
        assert_eq!(d.verdict.reason(), &Reason::SnapshotPending);
        assert_eq!(d.verdict.message(), "taking snapshot s1");
    }

    #[test]
    fn deletion_waits_for_the_holder_and_the_claim_goes_only_when_nobody_holds_it() {
        let sites = [site("s1", &["local"])];
        let held = vol(json!({
            "metadata": {"name": "data", "namespace": "a", "uid": "u1", "deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["x"]},
            "status": {"location": {"site": "s1", "pool": "local", "host": "s1-h1"},
                "backing": {"path": "/p/u1.qcow2", "capacityBytes": 67108864},
                "attachedTo": {"cluster": "vc", "node": "vc-frontend", "target": "vdc"}}}));
        let busy = Holder {
            cluster_wants: true,
            node_holds: true,
        };
        let d = decide(&held, &sites, &[], Some(busy), &Default::default());
        assert!(!d.release);
        assert_eq!(d.verdict.reason(), &Reason::DetachPending);
        assert!(
            d.verdict
                .message()
                .contains("node vc-frontend of cluster vc")
        );
        // The cluster let go but the agent still reports the disk: kept.
        let d = decide(
            &held,
            &sites,
            &[],
            Some(Holder {
                cluster_wants: false,
                node_holds: true,
            }),
            &Default::default(),
        );
        assert!(!d.release);
        let d = decide(
            &held,
            &sites,
            &[],
            Some(Holder {
                cluster_wants: false,
                node_holds: false,
            }),
            &Default::default(),
        );
        assert!(d.release);
        assert!(d.verdict.message().starts_with("detached"));
    }

    #[test]
    fn a_pool_at_a_site_that_does_not_admit_the_namespace_is_refused() {
        let mut site: Site = serde_json::from_value(json!({
            "metadata": {"name": "lab"},
            "spec": {"storagePools": [{"name": "local", "type": "dir", "host": "h1"}],
                     "access": {"namespaceSelector": {"matchLabels": {"lab": "yes"}}}}
        }))
        .unwrap();
        site.metadata.name = Some("lab".into());
        let sites = vec![site];
        let d = decide(&vol(json!({})), &sites, &[], None, &Default::default());
        assert_eq!(d.verdict.reason(), &Reason::SiteAccessDenied);
        assert!(d.location.is_none());
        assert!(
            d.verdict.message().starts_with("spec.pool: namespace "),
            "{}",
            d.verdict.message()
        );
        let labels = [("lab".to_string(), "yes".to_string())].into();
        let d = decide(&vol(json!({})), &sites, &[], None, &labels);
        assert_eq!(d.location.unwrap().site, "lab");
    }
}
