//! Quotas per namespace, the Kubernetes-native way: a `ResourceQuota` whose
//! `spec.hard` names yukumo resources (`yukumo.io/vcpus`, `yukumo.io/memory`,
//! `yukumo.io/nodes`, `yukumo.io/public-ips`, `yukumo.io/storage`). The fleet's
//! operator writes it (the built-in `admin` role can read quotas, not write
//! them); the controller enforces it and writes `status.used`, so
//! `kubectl get resourcequota` shows use against limit.
//!
//! What a namespace uses is what exists (its VirtualNodes, its Volumes'
//! capacity, its groups' public IPs) plus what was granted and is still
//! being made. A growth (a new cluster, more or larger nodes, a new or
//! larger Volume) is granted whole or refused whole, in a stable order:
//! objects whose current spec was granted before come first, then the
//! others oldest first — so two reconciles with the same view agree, and a
//! newer object never takes what an older one was granted. Public IPs are
//! granted one by one under the placement lock (see
//! [`public_ip_allowance`]).

pub mod status;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceQuota;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use yukumo_api::common::{Condition, condition_types};
use yukumo_api::quantity::parse_str;
use yukumo_api::{Reason, Site, VirtualCluster, VirtualNode, Volume};

/// A yukumo resource a quota can limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    Vcpus = 0,
    Memory = 1,
    Nodes = 2,
    PublicIps = 3,
    Storage = 4,
}

pub const DIMS: [Dim; 5] = [
    Dim::Vcpus,
    Dim::Memory,
    Dim::Nodes,
    Dim::PublicIps,
    Dim::Storage,
];

/// The prefix of every yukumo resource name in a ResourceQuota.
pub const PREFIX: &str = "yukumo.io/";

impl Dim {
    /// Its resource name in `ResourceQuota.spec.hard`.
    pub fn key(self) -> &'static str {
        match self {
            Dim::Vcpus => "yukumo.io/vcpus",
            Dim::Memory => "yukumo.io/memory",
            Dim::Nodes => "yukumo.io/nodes",
            Dim::PublicIps => "yukumo.io/public-ips",
            Dim::Storage => "yukumo.io/storage",
        }
    }
    pub fn from_key(k: &str) -> Option<Dim> {
        DIMS.into_iter().find(|d| d.key() == k)
    }
    fn bytes(self) -> bool {
        matches!(self, Dim::Memory | Dim::Storage)
    }
    /// `v` as a quantity string (binary units for bytes).
    pub fn show(self, v: u64) -> String {
        if self.bytes() {
            super::volume::decide::quantity(v).0
        } else {
            v.to_string()
        }
    }
}

/// Amounts of every [`Dim`], indexed by it (bytes for memory and storage).
pub type Amounts = [u64; 5];

/// One limit: `hard` of `dim`, from ResourceQuota `quota`.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub quota: String,
    pub dim: Dim,
    pub hard: u64,
}

/// The namespace's limits on yukumo resources, and the entries that cannot
/// be enforced (an unknown `yukumo.io/` name, a value that is not a whole
/// amount): those refuse every growth, never silently limit nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub limits: Vec<Limit>,
    pub problems: Vec<String>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.problems.is_empty()
    }
}

/// The limits of `quotas` (those of one namespace).
pub fn limits<'a>(quotas: impl IntoIterator<Item = &'a ResourceQuota>) -> Limits {
    let mut out = Limits::default();
    for q in quotas {
        let name = q.name_any();
        for (key, value) in q.spec.iter().flat_map(|s| s.hard.iter().flatten()) {
            if !key.starts_with(PREFIX) {
                continue;
            }
            let Some(dim) = Dim::from_key(key) else {
                out.problems.push(format!(
                    "ResourceQuota {name}: spec.hard[{key}] is not a yukumo resource (known: {})",
                    DIMS.map(|d| d.key()).join(", ")
                ));
                continue;
            };
            match parse_str(&value.0) {
                Ok(hard) if dim.bytes() || !value.0.contains(['m', '.']) => {
                    out.limits.push(Limit {
                        quota: name.clone(),
                        dim,
                        hard,
                    })
                }
                _ => out.problems.push(format!(
                    "ResourceQuota {name}: spec.hard[{key}] = {:?} is not a whole {}",
                    value.0,
                    if dim.bytes() { "quantity" } else { "number" }
                )),
            }
        }
    }
    out
}

/// Kinds that hold quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    VirtualCluster,
    NetworkGroup,
    Volume,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::VirtualCluster => "VirtualCluster",
            Kind::NetworkGroup => "NetworkGroup",
            Kind::Volume => "Volume",
        })
    }
}

/// An object's use and what its spec asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimant {
    pub kind: Kind,
    pub name: String,
    /// Its current spec was granted before (not refused for quota, at its
    /// current generation).
    pub granted_before: bool,
    pub created: Option<Timestamp>,
    /// What exists of it.
    pub actual: Amounts,
    /// What its spec asks for.
    pub desired: Amounts,
}

impl Claimant {
    fn growth(&self) -> Amounts {
        std::array::from_fn(|i| self.desired[i].saturating_sub(self.actual[i]))
    }
}

/// The namespace's account: what is used or granted, and why each refused
/// object was refused.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    pub used: Amounts,
    pub refused: BTreeMap<(Kind, String), String>,
    /// What each claimant not refused holds now: its spec's amounts.
    pub granted: BTreeMap<(Kind, String), Amounts>,
}

impl Ledger {
    /// What a cluster holds now: its last grant when refused (`old`), else
    /// its spec's total.
    pub fn cluster_grant(
        &self,
        name: &str,
        old: Option<yukumo_api::virtualcluster::QuotaGrant>,
    ) -> Option<yukumo_api::virtualcluster::QuotaGrant> {
        let key = (Kind::VirtualCluster, name.to_string());
        if self.refused.contains_key(&key) {
            return old;
        }
        self.granted
            .get(&key)
            .map(|a| yukumo_api::virtualcluster::QuotaGrant {
                cpu: a[Dim::Vcpus as usize],
                memory_mib: a[Dim::Memory as usize] >> 20,
                nodes: a[Dim::Nodes as usize],
            })
            .or(old)
    }

    /// Why `kind` `name` may not grow, if it may not.
    pub fn refusal(&self, kind: Kind, name: &str) -> Option<&String> {
        self.refused.get(&(kind, name.to_string()))
    }
}

/// Grant or refuse every claimant's growth against `limits` (see the module
/// doc for the order).
pub fn ledger(limits: &Limits, claimants: &[Claimant]) -> Ledger {
    let mut used: Amounts = [0; 5];
    // Per resource: who holds how much, for the refusals' messages.
    let mut holders: [Vec<(String, u64)>; 5] = Default::default();
    for c in claimants {
        for d in DIMS {
            let i = d as usize;
            used[i] += c.actual[i];
            if c.actual[i] > 0 {
                holders[i].push((format!("{} {}", c.kind, c.name), c.actual[i]));
            }
        }
    }
    let mut growing: Vec<&Claimant> = claimants
        .iter()
        .filter(|c| c.growth().iter().any(|g| *g > 0))
        .collect();
    growing.sort_by(|a, b| {
        (!a.granted_before, a.created, a.kind, &a.name).cmp(&(
            !b.granted_before,
            b.created,
            b.kind,
            &b.name,
        ))
    });
    let mut refused = BTreeMap::new();
    let mut granted: BTreeMap<(Kind, String), Amounts> = claimants
        .iter()
        .map(|c| ((c.kind, c.name.clone()), c.desired))
        .collect();
    for c in growing {
        let growth = c.growth();
        let mut why: Vec<String> = limits.problems.clone();
        for l in &limits.limits {
            let i = l.dim as usize;
            if growth[i] > 0 && used[i] + growth[i] > l.hard {
                let mut by = holders[i].clone();
                by.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let shown: Vec<String> = by
                    .iter()
                    .take(3)
                    .map(|(who, n)| format!("{who}: {}", l.dim.show(*n)))
                    .collect();
                let more = by.len().saturating_sub(shown.len());
                why.push(format!(
                    "ResourceQuota {}: {} limit {}, {} in use or granted{}; {} {} needs {} more",
                    l.quota,
                    l.dim.key(),
                    l.dim.show(l.hard),
                    l.dim.show(used[i]),
                    if shown.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({}{})",
                            shown.join(", "),
                            if more > 0 {
                                format!(" and {more} more")
                            } else {
                                String::new()
                            }
                        )
                    },
                    c.kind,
                    c.name,
                    l.dim.show(growth[i])
                ));
            }
        }
        if why.is_empty() {
            for d in DIMS {
                let i = d as usize;
                used[i] += growth[i];
                if growth[i] > 0 {
                    let who = format!("{} {}", c.kind, c.name);
                    match holders[i].iter_mut().find(|h| h.0 == who) {
                        Some(h) => h.1 += growth[i],
                        None => holders[i].push((who, growth[i])),
                    }
                }
            }
        } else {
            granted.remove(&(c.kind, c.name.clone()));
            refused.insert((c.kind, c.name.clone()), why.join("; "));
        }
    }
    Ledger {
        used,
        refused,
        granted,
    }
}

/// Whether `conditions` at `generation` record a quota refusal of the
/// current spec (else the spec was granted before, when observed).
fn granted_before(
    conditions: &[Condition],
    observed: Option<i64>,
    generation: Option<i64>,
) -> bool {
    observed.is_some()
        && observed == generation
        && !conditions
            .iter()
            .any(|c| c.type_ == condition_types::STALLED && c.reason == Reason::QuotaExceeded)
}

/// A cluster's claim: its nodes (those that exist, by their spec) or its
/// last grant, whichever is more, against the nodes its spec asks for.
pub fn cluster_claimant(vc: &VirtualCluster, nodes: &[&VirtualNode], sites: &[Site]) -> Claimant {
    let uid = vc.metadata.uid.clone().unwrap_or_default();
    let mut actual: Amounts = [0; 5];
    for n in nodes
        .iter()
        .filter(|n| n.owner_references().iter().any(|o| o.uid == uid))
    {
        actual[Dim::Vcpus as usize] += u64::from(n.spec.resources.cpu);
        actual[Dim::Memory as usize] += n.spec.resources.memory_mib << 20;
        actual[Dim::Nodes as usize] += 1;
    }
    if let Some(g) = vc.status.as_ref().and_then(|s| s.granted) {
        actual[Dim::Vcpus as usize] = actual[Dim::Vcpus as usize].max(g.cpu);
        actual[Dim::Memory as usize] = actual[Dim::Memory as usize].max(g.memory_mib << 20);
        actual[Dim::Nodes as usize] = actual[Dim::Nodes as usize].max(g.nodes);
    }
    // A size class is looked up at the Sites the nodes may run at (all,
    // when the spec does not say); a size that does not resolve counts
    // nothing (the cluster is refused for it anyway).
    let size = |s: &yukumo_api::common::NodeSize, at: &[&str]| {
        let sites: Vec<&Site> = sites
            .iter()
            .filter(|s| at.is_empty() || at.iter().any(|a| s.metadata.name.as_deref() == Some(*a)))
            .collect();
        super::nodes::resolve_size(s, &sites, "").unwrap_or_default()
    };
    let mut desired: Amounts = [0; 5];
    let mut add = |n: u64, r: yukumo_api::common::Resources| {
        desired[Dim::Vcpus as usize] += n * u64::from(r.cpu);
        desired[Dim::Memory as usize] += n * (r.memory_mib << 20);
        desired[Dim::Nodes as usize] += n;
    };
    let fe_site: Vec<&str> = vc.spec.frontend.site.iter().map(|s| s.as_str()).collect();
    add(1, size(&vc.spec.frontend.size, &fe_site));
    for p in &vc.spec.pools {
        let at: Vec<&str> = p.sites.iter().map(|s| s.0.as_str()).collect();
        add(p.replicas.max(0) as u64, size(&p.size, &at));
    }
    if vc.metadata.deletion_timestamp.is_some() {
        desired = [0; 5];
    }
    let st = vc.status.as_ref();
    Claimant {
        kind: Kind::VirtualCluster,
        name: vc.name_any(),
        granted_before: st.is_some_and(|s| {
            granted_before(&s.conditions, s.observed_generation, vc.metadata.generation)
        }),
        created: vc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        actual,
        desired,
    }
}

/// A Volume's claim: the capacity it was granted (what exists or is being
/// made) against its `spec.size`.
pub fn volume_claimant(v: &Volume) -> Claimant {
    let st = v.status.as_ref();
    let granted = st
        .and_then(|s| s.granted.as_ref())
        .and_then(|q| parse_str(&q.0).ok())
        .unwrap_or(0);
    let have = st
        .and_then(|s| s.backing.as_ref())
        .map(|b| b.capacity_bytes)
        .unwrap_or(0);
    let mut actual: Amounts = [0; 5];
    actual[Dim::Storage as usize] = granted.max(have);
    let mut desired: Amounts = [0; 5];
    if v.metadata.deletion_timestamp.is_none() {
        desired[Dim::Storage as usize] = parse_str(&v.spec.size.0).unwrap_or(0);
    }
    Claimant {
        kind: Kind::Volume,
        name: v.name_any(),
        granted_before: st.is_some_and(|s| {
            granted_before(&s.conditions, s.observed_generation, v.metadata.generation)
        }),
        created: v.metadata.creation_timestamp.as_ref().map(|t| t.0),
        actual,
        desired,
    }
}

/// A group's public IPs: those it holds (they are granted one by one).
pub fn group_claimant(g: &yukumo_api::NetworkGroup) -> Claimant {
    let mut actual: Amounts = [0; 5];
    actual[Dim::PublicIps as usize] = public_ips_held(g);
    Claimant {
        kind: Kind::NetworkGroup,
        name: g.name_any(),
        granted_before: true,
        created: g.metadata.creation_timestamp.as_ref().map(|t| t.0),
        actual,
        desired: actual,
    }
}

/// The public IPs group `g` holds: its mappings and its router's address.
pub fn public_ips_held(g: &yukumo_api::NetworkGroup) -> u64 {
    g.status.as_ref().map_or(0, |s| {
        s.public_ips.len() as u64
            + u64::from(s.router.as_ref().is_some_and(|r| r.address.is_some()))
    })
}

/// How many public IPs group `key` may hold in all, when a quota limits
/// them: the tightest limit less what the namespace's other groups hold
/// (`others`, including claims the caches do not show yet); the `Err` is the
/// refusal's text for an address beyond it.
pub fn public_ip_allowance(limits: &Limits, others: u64) -> Option<(u64, String)> {
    if !limits.problems.is_empty() {
        return Some((0, limits.problems.join("; ")));
    }
    limits
        .limits
        .iter()
        .filter(|l| l.dim == Dim::PublicIps)
        .map(|l| {
            (
                l.hard.saturating_sub(others),
                format!(
                    "ResourceQuota {}: {} limit {}, {others} held by the namespace's other NetworkGroups",
                    l.quota,
                    l.dim.key(),
                    l.hard
                ),
            )
        })
        .min_by_key(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceQuotaSpec;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn quota(name: &str, hard: &[(&str, &str)]) -> ResourceQuota {
        ResourceQuota {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ResourceQuotaSpec {
                hard: Some(
                    hard.iter()
                        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn claimant(name: &str, granted: bool, t: i64, actual: u64, desired: u64) -> Claimant {
        let mut a = [0; 5];
        let mut d = [0; 5];
        a[0] = actual;
        d[0] = desired;
        Claimant {
            kind: Kind::VirtualCluster,
            name: name.into(),
            granted_before: granted,
            created: Some(Timestamp::from_second(t).unwrap()),
            actual: a,
            desired: d,
        }
    }

    #[test]
    fn limits_read_only_yukumo_names_and_flag_the_unknown_and_fractional() {
        let l = limits([
            &quota(
                "team",
                &[
                    ("yukumo.io/vcpus", "16"),
                    ("yukumo.io/memory", "64Gi"),
                    ("pods", "10"),
                ],
            ),
            &quota(
                "typo",
                &[("yukumo.io/cpus", "4"), ("yukumo.io/nodes", "1500m")],
            ),
        ]);
        assert_eq!(l.limits.len(), 2);
        let memory = l.limits.iter().find(|l| l.dim == Dim::Memory).unwrap();
        assert_eq!(memory.hard, 64 << 30);
        assert_eq!(l.problems.len(), 2, "{:?}", l.problems);
        assert!(l.problems[0].contains("spec.hard[yukumo.io/cpus] is not a yukumo resource"));
        assert!(l.problems[1].contains("\"1500m\" is not a whole number"));
    }

    #[test]
    fn older_requests_are_granted_first_and_refusals_name_limit_use_and_holders() {
        let l = limits([&quota("team", &[("yukumo.io/vcpus", "8")])]);
        let c = [
            claimant("running", true, 1, 4, 4),
            claimant("newer", false, 3, 0, 4),
            claimant("older", false, 2, 0, 2),
        ];
        let led = ledger(&l, &c);
        assert!(led.refusal(Kind::VirtualCluster, "older").is_none());
        let why = led.refusal(Kind::VirtualCluster, "newer").unwrap();
        assert_eq!(
            why,
            "ResourceQuota team: yukumo.io/vcpus limit 8, 6 in use or granted \
             (VirtualCluster running: 4, VirtualCluster older: 2); VirtualCluster newer needs 4 more"
        );
        assert_eq!(led.used[0], 6);
    }

    #[test]
    fn a_spec_granted_before_keeps_its_grant_against_an_older_newcomer() {
        // "half" was granted 4 and has made 2; "old" (created earlier)
        // asks for 4 only now: the grant is kept, the newcomer refused.
        let l = limits([&quota("q", &[("yukumo.io/vcpus", "6")])]);
        let c = [
            claimant("half", true, 5, 2, 4),
            claimant("old", false, 1, 0, 4),
        ];
        let led = ledger(&l, &c);
        assert!(led.refusal(Kind::VirtualCluster, "half").is_none());
        assert!(led.refusal(Kind::VirtualCluster, "old").is_some());
        assert_eq!(led.used[0], 4);
    }

    #[test]
    fn a_refused_growth_keeps_what_was_granted_before() {
        // "small" was granted 2 (one node still waits) and now asks for 4:
        // refused, it still holds its 2, so "big" cannot take them.
        let l = limits([&quota("q", &[("yukumo.io/vcpus", "3")])]);
        let c = [
            claimant("small", false, 1, 2, 4),
            claimant("big", false, 2, 0, 2),
        ];
        let led = ledger(&l, &c);
        assert!(led.refusal(Kind::VirtualCluster, "small").is_some());
        assert!(led.refusal(Kind::VirtualCluster, "big").is_some());
        let old = yukumo_api::virtualcluster::QuotaGrant {
            cpu: 2,
            memory_mib: 0,
            nodes: 1,
        };
        assert_eq!(led.cluster_grant("small", Some(old)), Some(old));
        assert_eq!(led.used[0], 2);
    }

    #[test]
    fn shrinking_and_standing_still_are_never_refused_even_over_a_lowered_limit() {
        let l = limits([&quota("q", &[("yukumo.io/vcpus", "2")])]);
        let c = [
            claimant("big", true, 1, 8, 8),
            claimant("shrinks", false, 2, 4, 2),
        ];
        let led = ledger(&l, &c);
        assert!(led.refused.is_empty());
        assert_eq!(led.used[0], 12);
    }

    #[test]
    fn an_unenforceable_entry_refuses_every_growth() {
        let l = limits([&quota("q", &[("yukumo.io/gpus", "1")])]);
        let led = ledger(
            &l,
            &[claimant("a", false, 1, 0, 1), claimant("b", true, 1, 1, 1)],
        );
        assert!(
            led.refusal(Kind::VirtualCluster, "a")
                .unwrap()
                .contains("yukumo.io/gpus")
        );
        assert!(led.refusal(Kind::VirtualCluster, "b").is_none());
    }

    #[test]
    fn public_ip_allowance_is_the_tightest_limit_less_the_others() {
        let l = limits([
            &quota("a", &[("yukumo.io/public-ips", "5")]),
            &quota("b", &[("yukumo.io/public-ips", "3")]),
        ]);
        let (n, why) = public_ip_allowance(&l, 2).unwrap();
        assert_eq!(n, 1);
        assert!(why.starts_with("ResourceQuota b: yukumo.io/public-ips limit 3, 2 held"));
        assert_eq!(public_ip_allowance(&Limits::default(), 9), None);
        assert_eq!(public_ip_allowance(&l, 9).unwrap().0, 0);
    }
}
