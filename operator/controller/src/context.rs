//! What every reconciler shares: the client, the event recorder, metrics and
//! health, and the error type with its policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::Ipv4Addr;

use yukumo_api::net::Segment;
use yukumo_api::{Host, NetworkGroup, Site, VirtualCluster, VirtualNode, Volume, managers};

use crate::reconcile::networkgroup::decide::Claims;
use yukumo_telemetry::Health;

/// Errors of the controller. Each has a metric label; permanent ones (bad
/// spec) are reported as conditions instead and are not errors here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization error: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
}

impl Error {
    /// Label for the `yukumo_reconcile_errors_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(_) => "kube",
            Error::Serialize(_) => "serialize",
            Error::MissingField(_) => "missing_field",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub kind: String,
    pub error: String,
}

/// Controller metrics.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<KindLabel, Counter>,
    pub errors: Family<ErrorLabel, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub status_writes: Family<KindLabel, Counter>,
    pub leader: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            status_writes: Family::default(),
            leader: Gauge::default(),
        };
        registry.register(
            "yukumo_reconciles",
            "Reconciles run, by kind",
            m.reconciles.clone(),
        );
        registry.register(
            "yukumo_reconcile_errors",
            "Reconcile errors, by kind and error",
            m.errors.clone(),
        );
        registry.register(
            "yukumo_reconcile_duration_seconds",
            "Reconcile duration, by kind",
            m.duration.clone(),
        );
        registry.register(
            "yukumo_status_writes",
            "Status writes, by kind",
            m.status_writes.clone(),
        );
        registry.register(
            "yukumo_leader",
            "1 while this controller holds the leader Lease",
            m.leader.clone(),
        );
        m
    }
}

/// Reflector caches of every kind the reconcilers read, filled by one watch
/// each (reads never list the API server). Reconcilers start only once every
/// store holds a complete initial list.
#[derive(Clone)]
pub struct Stores {
    pub clusters: Store<VirtualCluster>,
    pub nodes: Store<VirtualNode>,
    pub hosts: Store<Host>,
    pub sites: Store<Site>,
    pub network_groups: Store<NetworkGroup>,
    pub volumes: Store<Volume>,
    pub quotas: Store<k8s_openapi::api::core::v1::ResourceQuota>,
}

impl Stores {
    pub fn site(&self, name: &str) -> Option<Arc<Site>> {
        self.sites.get(&ObjectRef::new(name))
    }
    pub fn all_sites(&self) -> Vec<Site> {
        let mut v: Vec<Site> = self.sites.state().iter().map(|s| (**s).clone()).collect();
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        v
    }
    pub fn network_group(&self, ns: &str, name: &str) -> Option<Arc<NetworkGroup>> {
        self.network_groups.get(&ObjectRef::new(name).within(ns))
    }
    /// The limits the ResourceQuotas of namespace `ns` set on yukumo
    /// resources (empty: none).
    pub fn quota_limits(&self, ns: &str) -> crate::reconcile::quota::Limits {
        let all = self.quotas.state();
        crate::reconcile::quota::limits(
            all.iter()
                .map(|q| q.as_ref())
                .filter(|q| q.metadata.namespace.as_deref() == Some(ns)),
        )
    }

    /// The quota account of namespace `ns` (see [`crate::reconcile::quota`]),
    /// `None` when no quota limits its yukumo resources.
    pub fn quota_ledger(&self, ns: &str) -> Option<crate::reconcile::quota::Ledger> {
        use crate::reconcile::quota;
        let limits = self.quota_limits(ns);
        if limits.is_empty() {
            return None;
        }
        let in_ns = |m: &kube::api::ObjectMeta| m.namespace.as_deref() == Some(ns);
        let nodes = self.nodes.state();
        let nodes: Vec<&VirtualNode> = nodes
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| in_ns(&n.metadata))
            .collect();
        let sites = self.all_sites();
        let mut claimants: Vec<quota::Claimant> = self
            .clusters
            .state()
            .iter()
            .filter(|c| in_ns(&c.metadata))
            .map(|c| quota::cluster_claimant(c, &nodes, &sites))
            .collect();
        claimants.extend(
            self.volumes
                .state()
                .iter()
                .filter(|v| in_ns(&v.metadata))
                .map(|v| quota::volume_claimant(v)),
        );
        claimants.extend(
            self.network_groups
                .state()
                .iter()
                .filter(|g| in_ns(&g.metadata))
                .map(|g| quota::group_claimant(g)),
        );
        Some(quota::ledger(&limits, &claimants))
    }

    pub fn volume_exists(&self, ns: &str, name: &str) -> bool {
        self.volumes.get(&ObjectRef::new(name).within(ns)).is_some()
    }
}

/// A VirtualNode written by the controller that its store may not show yet.
#[derive(Debug, Clone)]
pub struct PendingNode {
    pub owner_uid: String,
    pub host: String,
    pub site: String,
    pub resources: yukumo_api::common::Resources,
    pub since: Instant,
}

/// What placement decisions must see before the stores catch up: nodes just
/// written and reservations just admitted. Held (locked) while a reconciler
/// places nodes or admits a reservation, so two clusters never take the same
/// capacity.
#[derive(Debug, Default)]
pub struct Placements {
    /// By (namespace, name).
    pub nodes: std::collections::HashMap<(String, String), PendingNode>,
    /// Uids of clusters admitted but maybe not yet shown so by the store.
    pub admitted: std::collections::HashMap<String, Instant>,
    /// Segments chosen, by NetworkGroup `namespace/name`: (home Site,
    /// segment, when); the caches show them moments later.
    pub segments: std::collections::HashMap<String, (Vec<String>, Segment, Instant)>,
    /// Nodes deleted to be replaced (a rollout), by (namespace, name):
    /// (their uid, when), until the store shows them deleting or gone.
    pub replacing: std::collections::HashMap<(String, String), (String, Instant)>,
    /// Public IPs granted, by address: (NetworkGroup `namespace/name`, when).
    pub public_ips: std::collections::HashMap<Ipv4Addr, (String, Instant)>,
}

impl Placements {
    /// Forget what the stores now show (and anything older than a minute).
    pub fn prune(&mut self, stores: &Stores) {
        self.nodes.retain(|(ns, name), p| {
            let in_store = stores
                .nodes
                .get(&ObjectRef::new(name).within(ns))
                .is_some_and(|n| {
                    n.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.uid == p.owner_uid)
                });
            !in_store && p.since.elapsed() < Duration::from_secs(60)
        });
        self.admitted
            .retain(|_, t| t.elapsed() < Duration::from_secs(60));
        self.replacing.retain(|(ns, name), (uid, t)| {
            let unchanged = stores
                .nodes
                .get(&ObjectRef::new(name).within(ns))
                .is_some_and(|n| {
                    n.metadata.uid.as_ref() == Some(uid) && n.metadata.deletion_timestamp.is_none()
                });
            unchanged && t.elapsed() < Duration::from_secs(60)
        });
        // A chosen segment id is pending until the cache shows it in the
        // group's status; a group gone from the cache holds nothing.
        self.segments.retain(|key, (_, seg, t)| {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let shown = stores
                .network_groups
                .get(&ObjectRef::new(name).within(ns))
                .map(|g| g.status.as_ref().and_then(|s| s.segment) == Some(*seg));
            shown == Some(false) && t.elapsed() < Duration::from_secs(60)
        });
        self.public_ips.retain(|addr, (key, t)| {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let shown = stores
                .network_groups
                .get(&ObjectRef::new(name).within(ns))
                .map(|g| {
                    g.status.as_ref().is_some_and(|s| {
                        s.public_ips.iter().any(|p| &p.address == addr)
                            || s.router.as_ref().and_then(|r| r.address.as_ref()) == Some(addr)
                    })
                });
            shown == Some(false) && t.elapsed() < Duration::from_secs(60)
        });
    }

    /// The segments and public IPs NetworkGroups have claimed and the caches
    /// may not show yet.
    pub fn network_claims(&self) -> Claims {
        Claims {
            segments: self
                .segments
                .iter()
                .map(|(k, (sites, seg, _))| (k.clone(), sites.clone(), *seg))
                .collect(),
            public_ips: self
                .public_ips
                .iter()
                .map(|(a, (k, _))| (*a, k.clone()))
                .collect(),
        }
    }

    /// Record what group `key` now holds (replacing its earlier claims).
    pub fn claim_network(
        &mut self,
        key: &str,
        sites: Vec<String>,
        segment: Option<Segment>,
        ips: &[Ipv4Addr],
    ) {
        self.release_network(key);
        let now = Instant::now();
        if let Some(seg) = segment {
            self.segments.insert(key.to_string(), (sites, seg, now));
        }
        for ip in ips {
            self.public_ips.insert(*ip, (key.to_string(), now));
        }
    }

    /// Forget what group `key` claimed (its status write failed: what it
    /// holds is what the API says).
    pub fn release_network(&mut self, key: &str) {
        self.segments.remove(key);
        self.public_ips.retain(|_, (k, _)| k != key);
    }
}

/// Shared state of all reconcilers.
pub struct Ctx {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub health: Health,
    pub stores: Stores,
    pub placements: tokio::sync::Mutex<Placements>,
}

impl Ctx {
    pub fn new(
        client: Client,
        identity: &str,
        metrics: Metrics,
        health: Health,
        stores: Stores,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: managers::CONTROLLER.into(),
            instance: Some(identity.to_string()),
        };
        Arc::new(Ctx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            health,
            stores,
            placements: Default::default(),
        })
    }

    /// The labels of namespace `ns`, for the Sites' access selectors: read
    /// from the API server only while some Site restricts access (else
    /// none are needed and none are read).
    pub async fn namespace_labels(
        &self,
        ns: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        if !self
            .stores
            .sites
            .state()
            .iter()
            .any(|s| s.spec.access.is_some())
        {
            return Ok(Default::default());
        }
        let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        Ok(api
            .get_opt(ns)
            .await?
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default())
    }

    /// Start timing a reconcile of `kind`; the guard records duration on drop.
    pub fn measure(&self, kind: &str) -> ReconcileTimer {
        let label = KindLabel { kind: kind.into() };
        self.metrics.reconciles.get_or_create(&label).inc();
        self.health.beat("reconcile-loop", Duration::from_secs(600));
        ReconcileTimer {
            hist: self.metrics.duration.get_or_create(&label).clone(),
            start: Instant::now(),
        }
    }

    /// Publish an Event about `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &yukumo_api::Reason,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, %reason, "failed to publish event");
        }
    }

    /// Publish an Event for a verdict whose reason or message differs from the
    /// previous `Ready` condition (Warning when stalled): one Event per change,
    /// none on a re-reconcile with nothing new.
    pub async fn announce<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        previous: &[yukumo_api::Condition],
        verdict: &crate::reconcile::verdict::Verdict,
    ) {
        if crate::reconcile::verdict::reason_changed(previous, verdict) {
            let t = if verdict.is_stalled() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.event(obj, t, verdict.reason(), verdict.message().to_string())
                .await;
        }
    }

    /// Server-side apply `status` onto `obj`'s status subresource, as the
    /// controller's field manager.
    pub async fn apply_status<K, S>(&self, api: &Api<K>, obj: &K, status: &S) -> Result<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
        S: Serialize,
    {
        let patch = yukumo_api::status_apply_patch::<K, S>(status);
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(managers::CONTROLLER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        self.count_status_write(&K::kind(&()));
        Ok(())
    }

    /// Count one status write of `kind`.
    pub fn count_status_write(&self, kind: &str) {
        self.metrics
            .status_writes
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    hist: Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Shared error policy: count, log, back off.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    err: &Error,
    ctx: Arc<Ctx>,
) -> Action {
    let kind = K::kind(&()).to_string();
    ctx.metrics
        .errors
        .get_or_create(&ErrorLabel {
            kind: kind.clone(),
            error: err.metric_label().into(),
        })
        .inc();
    tracing::warn!(%kind, name = %obj.name_any(), error = %err, "reconcile failed; retrying");
    let backoff = if matches!(err, Error::Kube(kube::Error::Api(e)) if e.code == 409) {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    Action::requeue(backoff)
}
