//! Site: aggregate its Hosts into status (counts, capacity, allocatable).

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use yukumo_api::common::{Conditions, Resources, condition_types as ct};
use yukumo_api::host::Host;
use yukumo_api::site::{
    Encryption, PeerStatus, PoolStatus, Site, SiteStatus, StoragePool, TunnelState,
};
use yukumo_api::{Condition, ConditionStatus, Reason};

use super::verdict::{Verdict, apply_verdict, reason_changed};
use crate::context::{Ctx, Result};

/// Each declared pool as its host reported it (or why there is no report).
pub fn pools(declared: &[StoragePool], hosts: &[Host]) -> Vec<PoolStatus> {
    declared
        .iter()
        .map(|p| {
            let host = hosts.iter().find(|h| h.name_any() == p.host);
            let reported = host
                .and_then(|h| h.status.as_ref())
                .and_then(|s| s.storage_pools.iter().find(|r| r.name == p.name));
            match (host, reported) {
                (_, Some(r)) => r.clone(),
                (None, _) => PoolStatus {
                    name: p.name.clone(),
                    host: p.host.clone(),
                    error: Some(format!("host {} is not registered at this Site", p.host)),
                    ..Default::default()
                },
                (Some(_), None) => PoolStatus {
                    name: p.name.clone(),
                    host: p.host.clone(),
                    error: Some(format!("host {} has not reported the pool yet", p.host)),
                    ..Default::default()
                },
            }
        })
        .collect()
}

/// Pure aggregation of a Site's hosts into its status fields and verdict.
pub fn aggregate(hosts: &[Host]) -> (SiteStatus, Verdict) {
    let mut names: Vec<String> = hosts.iter().map(|h| h.name_any()).collect();
    names.sort();
    let ready: Vec<&Host> = hosts
        .iter()
        .filter(|h| {
            h.status
                .as_ref()
                .is_some_and(|s| s.conditions.is_true(ct::READY))
        })
        .collect();
    let sum = |f: fn(&yukumo_api::host::HostStatus) -> Option<Resources>| {
        ready
            .iter()
            .filter_map(|h| h.status.as_ref().and_then(f))
            .fold(Resources::default(), Resources::plus)
    };
    let status = SiteStatus {
        hosts: hosts.len() as i32,
        ready_hosts: ready.len() as i32,
        hosts_ready: Some(format!("{}/{}", ready.len(), hosts.len())),
        host_names: names,
        capacity: Some(sum(|s| s.capacity)),
        allocatable: Some(sum(|s| s.allocatable)),
        ..Default::default()
    };
    let verdict = if ready.is_empty() {
        Verdict::progressing(
            Reason::NoReadyHosts,
            format!("0/{} hosts ready", hosts.len()),
        )
    } else {
        Verdict::ready(
            Reason::HostsReady,
            format!("{}/{} hosts ready", ready.len(), hosts.len()),
        )
    };
    (status, verdict)
}

/// The Site's condition type that says whether its WAN settings are acted on.
pub const WAN_TUNNELS: &str = "WanTunnels";

/// The WAN settings a Site sets that this version does not act on, as the
/// message of its `WanTunnels` condition (`None`: it sets none).
pub fn wan_settings_unbuilt(spec: &yukumo_api::SiteSpec) -> Option<String> {
    let set: Vec<&str> = [(
        "spec.credentialsSecretRef (agents use their own credentials)",
        spec.credentials_secret_ref.is_some(),
    )]
    .into_iter()
    .filter_map(|(f, on)| on.then_some(f))
    .collect();
    (!set.is_empty()).then(|| format!("not acted on by this version: {}", set.join("; ")))
}

/// The Site's condition type that says whether its tunnels answer.
pub const TUNNELS_READY: &str = "TunnelsReady";

/// The tunnels to peer Sites as the endpoint's holder measures them;
/// `lost(site)` says a peer Site has no host holding its endpoint (its
/// tunnels are closed until one is Ready again).
pub fn peers(active: Option<&str>, hosts: &[Host], lost: impl Fn(&str) -> bool) -> Vec<PeerStatus> {
    let Some(holder) = active.and_then(|a| hosts.iter().find(|h| h.name_any() == a)) else {
        return Vec::new();
    };
    holder
        .status
        .iter()
        .flat_map(|s| &s.tunnels)
        .map(|t| PeerStatus {
            site: t.site.clone(),
            state: t.state,
            via: Some(holder.name_any()),
            address: Some(t.address),
            rtt_ms: t.rtt_ms,
            rx_bytes: t.rx_bytes,
            tx_bytes: t.tx_bytes,
            last_change: Some(t.last_change.clone()),
            message: (t.state == TunnelState::Down).then(|| {
                if lost(&t.site) {
                    format!(
                        "Site {} has no Ready gateway host to hold its WAN endpoint {}: the tunnel is closed (nothing sent to it or accepted from it) until one is Ready again",
                        t.site, t.address
                    )
                } else {
                    format!(
                        "no answer from Site {}'s WAN endpoint {} to ICMP echo from {}",
                        t.site,
                        t.address,
                        holder.name_any()
                    )
                }
            }),
        })
        .collect()
}

/// The Site's `TunnelsReady` condition (None: no tunnel).
pub fn tunnels_condition(peers: &[PeerStatus]) -> Option<(ConditionStatus, Reason, String)> {
    if peers.is_empty() {
        return None;
    }
    let up = peers.iter().filter(|p| p.state == TunnelState::Up).count();
    let down: Vec<String> = peers
        .iter()
        .filter(|p| p.state == TunnelState::Down)
        .map(|p| {
            format!(
                "{} ({})",
                p.site,
                p.address.map(|a| a.to_string()).unwrap_or_default()
            )
        })
        .collect();
    Some(if down.is_empty() {
        (
            ConditionStatus::True,
            Reason::TunnelsUp,
            format!("{up}/{} tunnels up", peers.len()),
        )
    } else {
        (
            ConditionStatus::False,
            Reason::TunnelDown,
            format!(
                "{up}/{} tunnels up; down: tunnel to Site {}",
                peers.len(),
                down.join(", Site ")
            ),
        )
    })
}

/// Whether a Host may hold its Site's WAN endpoint: a Ready gateway host
/// whose agent has a WAN interface.
pub fn can_hold_endpoint(h: &Host) -> bool {
    h.spec.gateway
        && h.status
            .as_ref()
            .is_some_and(|s| s.wan_interface.is_some() && s.conditions.is_true(ct::READY))
}

/// Whether the Site's tunnels are WireGuard.
pub fn wants_wireguard(spec: &yukumo_api::SiteSpec) -> bool {
    spec.tunnel
        .as_ref()
        .is_some_and(|t| t.encryption == Encryption::Wireguard)
}

/// Whether a host has published a WireGuard key (its kernel has
/// WireGuard and its agent made its key).
fn has_wireguard(h: &Host) -> bool {
    h.status
        .as_ref()
        .is_some_and(|s| s.wireguard_public_key.is_some())
}

/// The host holding the Site's WAN endpoint: the current one while it can,
/// else the first that can by name; none without `spec.gateway`. A Site
/// asking for WireGuard has its endpoint held only by a host with it.
pub fn active_gateway(
    spec: &yukumo_api::SiteSpec,
    hosts: &[Host],
    current: Option<&str>,
) -> Option<String> {
    spec.gateway.as_ref()?;
    let wireguard = wants_wireguard(spec);
    let mut able: Vec<String> = hosts
        .iter()
        .filter(|h| can_hold_endpoint(h) && (!wireguard || has_wireguard(h)))
        .map(|h| h.name_any())
        .collect();
    able.sort();
    match current {
        Some(c) if able.iter().any(|h| h == c) => Some(c.to_string()),
        _ => able.into_iter().next(),
    }
}

/// The Site's `WanTunnels` condition: settings not acted on first, then
/// whether a host holds the endpoint; `None` when the Site sets no WAN
/// setting.
pub fn wan_condition(
    spec: &yukumo_api::SiteSpec,
    active: Option<&str>,
    hosts: &[Host],
) -> Option<(ConditionStatus, Reason, String)> {
    if let Some(msg) = wan_settings_unbuilt(spec) {
        return Some((ConditionStatus::False, Reason::WanTunnelsNotBuilt, msg));
    }
    let endpoint = spec.gateway.as_ref()?.wan_endpoint.as_str();
    let without: Vec<String> = hosts
        .iter()
        .filter(|h| can_hold_endpoint(h) && !has_wireguard(h))
        .map(|h| h.name_any())
        .collect();
    Some(match active {
        Some(h) => (
            ConditionStatus::True,
            Reason::GatewayActive,
            format!(
                "host {h} holds the WAN endpoint {endpoint}{}",
                if wants_wireguard(spec) {
                    " (WireGuard)"
                } else {
                    ""
                }
            ),
        ),
        None if wants_wireguard(spec) && !without.is_empty() => (
            ConditionStatus::False,
            Reason::WireguardUnavailable,
            format!(
                "spec.tunnel.encryption: wireguard, and no Ready gateway host with a WAN interface has WireGuard in its kernel ({} {} none): no tunnel is made to or from this Site, never a plaintext one",
                without.join(", "),
                if without.len() == 1 { "has" } else { "have" }
            ),
        ),
        None => (
            ConditionStatus::False,
            Reason::NoWanGateway,
            format!(
                "spec.gateway.wanEndpoint {endpoint}: no Ready gateway host with a WAN interface (agent --wan-interface) can hold it; no tunnel reaches this Site"
            ),
        ),
    })
}

pub async fn reconcile(site: Arc<Site>, ctx: Arc<Ctx>) -> Result<Action> {
    let _timer = ctx.measure("Site");
    let name = site.name_any();
    let hosts: Vec<Host> = ctx
        .stores
        .hosts
        .state()
        .iter()
        .filter(|h| h.spec.site == name)
        .map(|h| (**h).clone())
        .collect();
    let (agg, verdict) = aggregate(&hosts);
    let old = site.status.clone().unwrap_or_default();
    let mut conditions = apply_verdict(&old.conditions, site.metadata.generation, &verdict);
    let active = active_gateway(&site.spec, &hosts, old.active_gateway.as_deref());
    let wan = wan_condition(&site.spec, active.as_deref(), &hosts);
    match &wan {
        Some((st, reason, msg)) => conditions.set_condition(Condition::new(
            WAN_TUNNELS,
            *st,
            reason.clone(),
            msg.clone(),
            site.metadata.generation,
        )),
        None => conditions.retain(|c| c.type_ != WAN_TUNNELS),
    }
    let peers = peers(active.as_deref(), &hosts, |peer| {
        ctx.stores.site(peer).is_some_and(|s| {
            s.status
                .as_ref()
                .is_none_or(|st| st.active_gateway.is_none())
        })
    });
    let tunnels = tunnels_condition(&peers);
    match &tunnels {
        Some((st, reason, msg)) => conditions.set_condition(Condition::new(
            TUNNELS_READY,
            *st,
            reason.clone(),
            msg.clone(),
            site.metadata.generation,
        )),
        None => conditions.retain(|c| c.type_ != TUNNELS_READY),
    }
    let status = SiteStatus {
        observed_generation: site.metadata.generation,
        conditions,
        active_gateway: active,
        peers,
        storage_pools: pools(&site.spec.storage_pools, &hosts),
        ..agg
    };
    if status != old {
        ctx.apply_status(
            &Api::<Site>::all(ctx.client.clone()),
            site.as_ref(),
            &status,
        )
        .await?;
    }
    // An Event when which tunnels are up changes (the message names them).
    let had_tunnels = old
        .conditions
        .get_condition(TUNNELS_READY)
        .map(|c| c.message.as_str());
    if let Some((st, reason, msg)) = tunnels
        .as_ref()
        .filter(|(_, _, m)| had_tunnels != Some(m.as_str()))
    {
        let kind = if *st == ConditionStatus::True {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(site.as_ref(), kind, reason, msg.clone()).await;
    }
    let had = old
        .conditions
        .get_condition(WAN_TUNNELS)
        .map(|c| c.message.as_str());
    if let Some((st, reason, msg)) = wan.as_ref().filter(|(_, _, m)| had != Some(m.as_str())) {
        let kind = if *st == ConditionStatus::True {
            EventType::Normal
        } else {
            EventType::Warning
        };
        ctx.event(site.as_ref(), kind, reason, msg.clone()).await;
    }
    if reason_changed(&old.conditions, &verdict) {
        ctx.event(
            site.as_ref(),
            EventType::Normal,
            verdict.reason(),
            verdict.message().to_string(),
        )
        .await;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> yukumo_api::SiteSpec {
        let mut v = serde_json::json!({"publicIPPool": ["203.0.113.64/26"]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn wan_settings_are_said_to_be_unbuilt_naming_each_field() {
        assert_eq!(wan_settings_unbuilt(&spec(serde_json::json!({}))), None);
        // A gateway and an uncapped plain tunnel are built.
        assert_eq!(
            wan_settings_unbuilt(&spec(serde_json::json!({
                "gateway": {"wanEndpoint": "192.0.2.10"},
                "tunnel": {"mtu": 1500, "encryption": "none"},
            }))),
            None
        );
        // WireGuard is built (by hosts with it).
        assert_eq!(
            wan_settings_unbuilt(&spec(serde_json::json!({
                "gateway": {"wanEndpoint": "192.0.2.10:4790"},
                "tunnel": {"bandwidthMbps": 1000, "encryption": "wireguard"},
            }))),
            None
        );
        // A cap alone is built.
        assert_eq!(
            wan_settings_unbuilt(&spec(serde_json::json!({
                "gateway": {"wanEndpoint": "192.0.2.10"},
                "tunnel": {"bandwidthMbps": 1000},
            }))),
            None
        );
        let msg = wan_settings_unbuilt(&spec(serde_json::json!({
            "credentialsSecretRef": {"name": "c", "namespace": "yukumo-system"},
        })))
        .unwrap();
        assert!(msg.contains("spec.credentialsSecretRef"), "{msg}");
    }

    fn host(name: &str, gateway: bool, wan: bool, ready: bool) -> Host {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Host",
            "metadata": {"name": name},
            "spec": {"site": "a", "gateway": gateway},
            "status": {
                "wanInterface": if wan { Some("wan0") } else { None },
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                    "reason": "AgentHeartbeating", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_wan_endpoint_stays_on_its_host_while_it_can_hold_it_and_moves_when_it_cannot() {
        let with_gw = spec(serde_json::json!({"gateway": {"wanEndpoint": "192.0.2.10"}}));
        let hosts = vec![
            host("h1", true, true, true),
            host("h2", true, true, true),
            host("h3", false, true, true),
            host("h4", true, false, true),
        ];
        // None without a gateway, whatever the hosts.
        assert_eq!(
            active_gateway(&spec(serde_json::json!({})), &hosts, None),
            None
        );
        assert_eq!(
            active_gateway(&with_gw, &hosts, None).as_deref(),
            Some("h1")
        );
        // Kept while it can (no flapping back to h1).
        assert_eq!(
            active_gateway(&with_gw, &hosts, Some("h2")).as_deref(),
            Some("h2")
        );
        // Not a gateway, or without a WAN interface: moved.
        assert_eq!(
            active_gateway(&with_gw, &hosts, Some("h3")).as_deref(),
            Some("h1")
        );
        assert_eq!(
            active_gateway(&with_gw, &hosts, Some("h4")).as_deref(),
            Some("h1")
        );
        // h1 lost: h2.
        let lost = vec![host("h1", true, true, false), host("h2", true, true, true)];
        assert_eq!(
            active_gateway(&with_gw, &lost, Some("h1")).as_deref(),
            Some("h2")
        );
        let none = vec![host("h1", true, true, false)];
        assert_eq!(active_gateway(&with_gw, &none, Some("h1")), None);
        let (st, reason, msg) = wan_condition(&with_gw, None, &[]).unwrap();
        assert_eq!((st, reason), (ConditionStatus::False, Reason::NoWanGateway));
        assert!(
            msg.starts_with("spec.gateway.wanEndpoint 192.0.2.10: no Ready gateway host"),
            "{msg}"
        );
        let (st, reason, msg) = wan_condition(&with_gw, Some("h2"), &hosts).unwrap();
        assert_eq!((st, reason), (ConditionStatus::True, Reason::GatewayActive));
        assert_eq!(msg, "host h2 holds the WAN endpoint 192.0.2.10");
        assert_eq!(wan_condition(&spec(serde_json::json!({})), None, &[]), None);
    }

    #[test]
    fn a_wireguard_sites_endpoint_is_held_only_by_a_host_with_wireguard() {
        let wg = spec(serde_json::json!({
            "gateway": {"wanEndpoint": "192.0.2.10"},
            "tunnel": {"encryption": "wireguard"},
        }));
        let with_key = |mut h: Host| {
            h.status.as_mut().unwrap().wireguard_public_key = Some("k".into());
            h
        };
        // h1 (first by name) has no WireGuard: h2 holds it.
        let hosts = vec![
            host("h1", true, true, true),
            with_key(host("h2", true, true, true)),
        ];
        assert_eq!(
            active_gateway(&wg, &hosts, Some("h1")).as_deref(),
            Some("h2")
        );
        let (st, reason, msg) = wan_condition(&wg, Some("h2"), &hosts).unwrap();
        assert_eq!((st, reason), (ConditionStatus::True, Reason::GatewayActive));
        assert_eq!(msg, "host h2 holds the WAN endpoint 192.0.2.10 (WireGuard)");
        // None has it: no holder, and the condition says why, naming them.
        let without = vec![host("h1", true, true, true), host("h2", true, true, true)];
        assert_eq!(active_gateway(&wg, &without, None), None);
        let (st, reason, msg) = wan_condition(&wg, None, &without).unwrap();
        assert_eq!(
            (st, reason),
            (ConditionStatus::False, Reason::WireguardUnavailable)
        );
        assert_eq!(
            msg,
            "spec.tunnel.encryption: wireguard, and no Ready gateway host with a WAN interface has WireGuard in its kernel (h1, h2 have none): no tunnel is made to or from this Site, never a plaintext one"
        );
    }

    #[test]
    fn peers_come_from_the_endpoint_holder_and_a_down_tunnel_is_named() {
        let mut h = host("h1", true, true, true);
        h.status.as_mut().unwrap().tunnels = serde_json::from_value(serde_json::json!([
            {"site": "b", "address": "100.64.0.102", "state": "Up", "rttMs": 0.5,
             "rxBytes": 10, "txBytes": 20, "lastChange": "2026-01-01T00:00:00Z"},
            {"site": "c", "address": "100.64.0.103", "state": "Down",
             "rxBytes": 0, "txBytes": 0, "lastChange": "2026-01-01T00:00:05Z"}]))
        .unwrap();
        let hosts = vec![h, host("h2", true, true, true)];
        let up = |_: &str| false;
        assert!(peers(None, &hosts, up).is_empty());
        assert!(
            peers(Some("h2"), &hosts, up).is_empty(),
            "only the holder's count"
        );
        let p = peers(Some("h1"), &hosts, up);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].via.as_deref(), p[0].rtt_ms, p[0].tx_bytes),
            (Some("h1"), Some(0.5), 20)
        );
        assert_eq!(
            p[1].message.as_deref(),
            Some("no answer from Site c's WAN endpoint 100.64.0.103 to ICMP echo from h1")
        );
        let (st, reason, msg) = tunnels_condition(&p).unwrap();
        assert_eq!((st, reason), (ConditionStatus::False, Reason::TunnelDown));
        assert_eq!(msg, "1/2 tunnels up; down: tunnel to Site c (100.64.0.103)");
        let (st, reason, msg) = tunnels_condition(&p[..1]).unwrap();
        assert_eq!(
            (st, reason, msg.as_str()),
            (ConditionStatus::True, Reason::TunnelsUp, "1/1 tunnels up")
        );
        assert_eq!(tunnels_condition(&[]), None);
        // Site c lost (no host holds its endpoint): its tunnel is closed.
        let p = peers(Some("h1"), &hosts, |s| s == "c");
        assert_eq!(
            p[1].message.as_deref(),
            Some(
                "Site c has no Ready gateway host to hold its WAN endpoint 100.64.0.103: the tunnel is closed (nothing sent to it or accepted from it) until one is Ready again"
            )
        );
    }
}
