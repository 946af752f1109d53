use super::*;
use serde_json::json;
use yukumo_api::common::Conditions;
use yukumo_api::networkgroup::NetworkGroupSpec;
use yukumo_api::site::IdRange;

fn site(v: serde_json::Value) -> Site {
    serde_json::from_value(json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": "a"}, "spec": v
    }))
    .unwrap()
}

fn group(name: &str, spec: serde_json::Value, status: Option<serde_json::Value>) -> NetworkGroup {
    serde_json::from_value(json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
        "metadata": {"name": name, "namespace": "t1", "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec, "status": status
    }))
    .unwrap()
}

fn host(name: &str, gateway: bool, vlan: bool, ready: bool) -> Arc<Host> {
    Arc::new(
        serde_json::from_value::<Host>(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Host", "metadata": {"name": name},
            "spec": {"site": "a", "gateway": gateway},
            "status": {"capabilities": {"vlan8021q": vlan, "vxlan": true, "bridge": true},
                       "addresses": [format!("10.255.0.{}", name.len())],
                       "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"},
                                       "reason": "AgentHeartbeating", "message": "",
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap(),
    )
}

fn cluster(name: &str, workers: i32, public_ip: bool) -> Arc<VirtualCluster> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
            "metadata": {"name": name, "namespace": "t1", "uid": format!("vc-{name}")},
            "spec": {"networkGroup": "net",
                     "frontend": {"size": {"cpu": 1, "memory": "128Mi"}, "publicIP": public_ip,
                                  "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}},
                     "pools": [{"name": "w", "replicas": workers, "size": {"cpu": 1, "memory": "128Mi"}}]}
        }))
        .unwrap(),
    )
}

fn no_claims() -> Claims {
    Claims {
        segments: vec![],
        public_ips: vec![],
    }
}

fn spec(v: serde_json::Value) -> NetworkGroupSpec {
    serde_json::from_value(v).unwrap()
}

#[test]
fn segment_ids_are_unique_per_site_and_named_when_not() {
    let mut spec =
        spec(json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}));
    let range = Some(IdRange {
        start: 1000,
        end: 1002,
    });
    let mut taken = BTreeMap::new();
    assert_eq!(choose_segment(&spec, None, range, &taken), Ok(1000));
    taken.insert(1000, ("t1/net".to_string(), "a".to_string()));
    assert_eq!(choose_segment(&spec, None, range, &taken), Ok(1001));
    // What was allocated before is kept.
    assert_eq!(choose_segment(&spec, Some(1002), range, &taken), Ok(1002));
    taken.insert(1001, ("t2/net".to_string(), "a".to_string()));
    taken.insert(1002, ("t3/net".to_string(), "a".to_string()));
    let v = choose_segment(&spec, None, range, &taken).unwrap_err();
    assert_eq!(v.reason(), &Reason::SegmentRangeExhausted);
    assert!(
        v.message()
            .contains("all 3 ids of Site \"a\" vniRange 1000-1002"),
        "{}",
        v.message()
    );
    let v = choose_segment(&spec, None, None, &taken).unwrap_err();
    assert_eq!(v.reason(), &Reason::NoSegmentRange);
    spec.segment.id = Some(1001);
    let v = choose_segment(&spec, None, range, &taken).unwrap_err();
    assert_eq!(v.reason(), &Reason::SegmentIdInUse);
    assert!(
        v.message()
            .contains("spec.segment.id: 1001 is already used by NetworkGroup t2/net")
    );
    spec.segment.id = Some(1500);
    assert_eq!(choose_segment(&spec, None, range, &taken), Ok(1500));
}

#[test]
fn a_vlan_router_goes_only_to_a_gateway_host_that_offers_8021q() {
    let hosts = [
        host("plain", true, false, true),
        host("vlan-worker", false, true, true),
        host("vlan-gw", true, true, true),
    ];
    let refs: Vec<&Arc<Host>> = hosts.iter().collect();
    let names = |kind| {
        router_candidates(&refs, kind)
            .into_iter()
            .map(|(h, ready)| {
                assert!(ready);
                h
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(names(SegmentType::Vxlan), vec!["plain", "vlan-gw"]);
    assert_eq!(names(SegmentType::Vlan), vec!["vlan-gw"]);
    assert_eq!(
        place_router(
            Some("plain"),
            &router_candidates(&refs, SegmentType::Vlan),
            &BTreeMap::new()
        ),
        Some("vlan-gw".to_string()),
        "a VLAN router on a host without 802.1Q moves"
    );
}

#[test]
fn segment_range_checked_against_home_site_with_a_default_for_vxlan() {
    let s =
        site(json!({"vniRange": {"start": 1000, "end": 1999}, "publicIPPool": ["203.0.113.0/28"]}));
    let mut sp = spec(
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan", "id": 5000}, "homeSite": "a"}),
    );
    let v = validate(&sp, std::slice::from_ref(&s));
    assert_eq!(v.reason(), &Reason::SegmentOutOfRange);
    assert!(v.message().contains("spec.segment.id"));
    sp.segment.id = Some(1500);
    assert_eq!(
        validate(&sp, std::slice::from_ref(&s)).reason(),
        &Reason::ReferencesResolved
    );
    sp.segment.type_ = SegmentType::Vlan;
    assert_eq!(
        validate(&sp, std::slice::from_ref(&s)).reason(),
        &Reason::SegmentOutOfRange
    );
    // A Site without a vniRange hands out the documented default range.
    let bare = site(json!({}));
    sp.segment.type_ = SegmentType::Vxlan;
    sp.segment.id = Some(5000);
    assert_eq!(
        validate(&sp, std::slice::from_ref(&bare)).reason(),
        &Reason::ReferencesResolved
    );
    sp.segment.id = Some(1_000_000);
    let v = validate(&sp, std::slice::from_ref(&bare));
    assert!(
        v.message().contains("1000-999999 (the default)"),
        "{}",
        v.message()
    );
    // A public IP outside the pool names the field.
    let sp = spec(
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a",
                         "publicIPs": [{"address": "198.51.100.1", "node": "x"}]}),
    );
    let v = validate(&sp, std::slice::from_ref(&s));
    assert_eq!(v.reason(), &Reason::PublicIPOutsidePool);
    assert!(v.message().starts_with("spec.publicIPs[0].address"));
}

fn fleet() -> (Vec<Site>, Vec<Arc<Host>>) {
    let s = site(json!({"publicIPPool": ["203.0.113.16/30"],
                        "externalNetwork": {"cidr": "203.0.113.0/24", "gateway": "203.0.113.17", "interface": "ext0"}}));
    (
        vec![s],
        vec![
            host("h1", true, false, true),
            host("hh2", false, false, true),
        ],
    )
}

/// A group with a cluster of a frontend (public IP) and two workers, on a
/// Site without a vniRange: a default VNI, three addresses, a router on
/// the gateway host with an egress address, the frontend's public IP.
#[test]
fn a_group_gets_everything_it_needs_in_one_decision() {
    let (sites, hosts) = fleet();
    let g = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}),
        None,
    );
    let clusters = vec![cluster("c", 2, true)];
    let inp = Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[],
        clusters: &clusters,
        nodes: &[],
        claims: &no_claims(),
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    };
    let d = decide(&inp);
    let untimed = |mut d: Decision| {
        for c in &mut d.status.conditions {
            c.last_transition_time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            );
        }
        d
    };
    assert_eq!(untimed(d.clone()), untimed(decide(&inp)), "pure");
    assert_eq!(
        d.verdict.reason(),
        &Reason::Allocated,
        "{}",
        d.verdict.message()
    );
    assert_eq!(d.status.segment, Some(Segment::vxlan(1000)));
    assert_eq!(d.segment, d.status.segment);
    assert_eq!(d.status.gateway, Some("10.0.0.1".parse().unwrap()));
    assert_eq!(d.status.mtu, Some(1450));
    assert_eq!(d.status.allocations.len(), 3);
    assert_eq!(
        d.status
            .allocations
            .iter()
            .filter(|a| a.role == Some(NodeRole::Frontend))
            .count(),
        1
    );
    let router = d.status.router.clone().unwrap();
    assert_eq!(router.host, "h1");
    // .17 is the upstream gateway: the pool's free addresses are .16, .18, .19.
    assert_eq!(router.address, Some("203.0.113.16".parse().unwrap()));
    assert_eq!(d.status.public_ips.len(), 1);
    assert_eq!(d.status.public_ips[0].node, "c-frontend");
    assert_eq!(d.public_ips.len(), 2, "both public addresses are claimed");
    assert_eq!(
        d.status.hosts.len(),
        1,
        "the router's host; no node placed yet"
    );
    assert!(d.status.conditions.is_true("Ready"));
    assert_eq!(d.requeue, Duration::from_secs(300));
}

/// What another group holds or has just claimed is not handed out again,
/// and a refusal names the holder.
#[test]
fn claims_of_others_are_respected() {
    let (sites, hosts) = fleet();
    let other = Arc::new(group(
        "other",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}),
        Some(json!({"segment": {"type": "vxlan", "id": 1000},
                    "router": {"host": "h1", "site": "a", "address": "203.0.113.16"}})),
    ));
    let g = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a",
               "publicIPs": [{"address": "203.0.113.18", "node": "c-frontend"}]}),
        None,
    );
    let claims = Claims {
        segments: vec![("t9/late".into(), vec!["a".into()], Segment::vxlan(1001))],
        public_ips: vec![("203.0.113.18".parse().unwrap(), "t9/late".into())],
    };
    let clusters = vec![cluster("c", 0, false)];
    let d = decide(&Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[other],
        clusters: &clusters,
        nodes: &[],
        claims: &claims,
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    });
    assert_eq!(d.status.segment, Some(Segment::vxlan(1002)));
    assert_eq!(d.verdict.reason(), &Reason::PublicIPConflict);
    assert!(
        d.verdict
            .message()
            .contains("203.0.113.18 is already used by NetworkGroup t9/late"),
        "{}",
        d.verdict.message()
    );
    // The router's own address: .16 is held, .18 claimed, .17 the gateway.
    assert_eq!(
        d.status.router.as_ref().and_then(|r| r.address),
        Some("203.0.113.19".parse().unwrap())
    );
    assert!(d.verdict.is_stalled());
    assert_eq!(
        d.requeue,
        Duration::from_secs(10),
        "a conflict may clear soon"
    );
}

#[test]
fn a_vlan_group_without_capable_hosts_and_a_lost_router_host() {
    let (sites, _) = fleet();
    let hosts = vec![host("h1", true, false, true)];
    let g = group(
        "lan",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vlan", "id": 5}, "homeSite": "a"}),
        None,
    );
    let mut sites = sites;
    sites[0].spec.vlan_range = Some(IdRange { start: 1, end: 10 });
    let d = decide(&Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[],
        clusters: &[],
        nodes: &[],
        claims: &no_claims(),
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    });
    assert_eq!(d.verdict.reason(), &Reason::NoCapableHost);
    assert!(
        d.verdict.message().contains("h1: not probed"),
        "{}",
        d.verdict.message()
    );
    // A VXLAN group whose only gateway host is lost: NoGatewayHost, retried.
    let hosts = vec![host("h1", true, false, false)];
    let g = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}),
        Some(json!({"router": {"host": "h1", "site": "a"}})),
    );
    let d = decide(&Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[],
        clusters: &[],
        nodes: &[],
        claims: &no_claims(),
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    });
    assert_eq!(d.verdict.reason(), &Reason::NoGatewayHost);
    assert_eq!(d.requeue, Duration::from_secs(10));
}

#[test]
fn a_mapping_to_an_unknown_node_is_named() {
    let (sites, hosts) = fleet();
    let g = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a",
               "publicIPs": [{"node": "ghost"}]}),
        None,
    );
    let d = decide(&Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[],
        clusters: &[],
        nodes: &[],
        claims: &no_claims(),
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    });
    assert_eq!(d.verdict.reason(), &Reason::PublicIPNodeUnknown);
    assert!(
        d.verdict
            .message()
            .contains("spec.publicIPs[0].node: ghost")
    );
}

/// A group spanning several Sites holds its id at each of them: an id a
/// group homed at another Site it spans holds is not handed out again
/// (else both would share a bridge on that Site's hosts), nor taken when
/// asked for, and the refusal names the other group and the Site.
#[test]
fn segment_ids_are_unique_at_every_site_a_group_spans() {
    let (mut sites, hosts) = fleet();
    let mut b = site(json!({"vniRange": {"start": 1000, "end": 1099}}));
    b.metadata.name = Some("b".into());
    sites.push(b);
    let at_b = Arc::new(group(
        "at-b",
        json!({"cidr": "10.1.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "b"}),
        Some(json!({"segment": {"type": "vxlan", "id": 1000}})),
    ));
    let decide_for = |g: &NetworkGroup| {
        decide(&Inputs {
            group: g,
            sites: &sites,
            hosts: &hosts,
            groups: std::slice::from_ref(&at_b),
            clusters: &[],
            nodes: &[],
            claims: &no_claims(),
            namespace_labels: &Default::default(),
            limits: &Default::default(),
        })
    };
    // Homed at a only: 1000 is free there.
    let home_only = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a"}),
        None,
    );
    assert_eq!(
        decide_for(&home_only).status.segment,
        Some(Segment::vxlan(1000))
    );
    // Spanning b too: 1000 is at-b's there.
    let spanning = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a", "sites": ["b"]}),
        Some(json!({"segment": {"type": "vxlan", "id": 1000}})),
    );
    assert_eq!(
        decide_for(&spanning).status.segment,
        Some(Segment::vxlan(1001))
    );
    let asked = group(
        "net",
        json!({"cidr": "10.0.0.0/24", "segment": {"type": "vxlan", "id": 1000}, "homeSite": "a", "sites": ["b"]}),
        None,
    );
    let d = decide_for(&asked);
    assert_eq!(d.verdict.reason(), &Reason::SegmentIdInUse);
    assert_eq!(
        d.verdict.message(),
        "spec.segment.id: 1000 is already used by NetworkGroup t1/at-b at Site \"b\""
    );
}

#[test]
fn a_group_across_sites_lists_their_tunnel_ends_their_gateways_and_the_mtu_they_carry() {
    let named = |name: &str, spec: serde_json::Value, active: Option<&str>| -> Site {
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "Site", "metadata": {"name": name},
            "spec": spec, "status": {"activeGateway": active}
        }))
        .unwrap()
    };
    let sites = vec![
        named(
            "a",
            json!({"vniRange": {"start": 1000, "end": 1009}, "gateway": {"wanEndpoint": "100.64.0.101"}}),
            Some("ga"),
        ),
        named(
            "b",
            json!({"gateway": {"wanEndpoint": "100.64.0.102"}, "tunnel": {"mtu": 1400}}),
            Some("gb"),
        ),
    ];
    let at = |name: &str, site: &str, i: u8| -> Arc<Host> {
        let mut h = (*host(name, true, false, true)).clone();
        h.spec.site = site.into();
        h.status.as_mut().unwrap().addresses = vec![std::net::Ipv4Addr::new(10, 255, 0, i)];
        Arc::new(h)
    };
    let hosts = vec![
        at("ga", "a", 1),
        at("a2", "a", 2),
        at("gb", "b", 3),
        at("b2", "b", 4),
    ];
    let g = group(
        "net",
        json!({"cidr": "10.30.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a", "sites": ["b"]}),
        None,
    );
    let d = decide(&Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[],
        clusters: &[],
        nodes: &[],
        claims: &no_claims(),
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    });
    assert_eq!(d.verdict.reason(), &Reason::Allocated, "{:?}", d.verdict);
    let ends: Vec<String> = d
        .status
        .tunnels
        .iter()
        .map(|t| format!("{} {}:{}", t.site, t.address, t.port))
        .collect();
    assert_eq!(ends, vec!["a 100.64.0.101:4790", "b 100.64.0.102:4790"]);
    // The router's host and both Sites' endpoint holders, with their Sites.
    let span: Vec<String> = d
        .status
        .hosts
        .iter()
        .map(|h| format!("{} {}", h.name, h.site.as_deref().unwrap_or("-")))
        .collect();
    assert!(
        span.contains(&"ga a".to_string()) && span.contains(&"gb b".to_string()),
        "{span:?}"
    );
    assert!(!span.iter().any(|s| s.starts_with("b2")), "{span:?}");
    // Site b's tunnel carries 1400 - 50.
    assert_eq!(d.status.mtu, Some(1350));
    // Asking more is refused, naming the field.
    let g = group(
        "net",
        json!({"cidr": "10.30.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a", "sites": ["b"], "mtu": 1400}),
        None,
    );
    let d = decide(&Inputs {
        group: &g,
        sites: &sites,
        hosts: &hosts,
        groups: &[],
        clusters: &[],
        nodes: &[],
        claims: &no_claims(),
        namespace_labels: &Default::default(),
        limits: &Default::default(),
    });
    assert_eq!(d.verdict.reason(), &Reason::MtuTooLarge);
    assert!(
        d.verdict.message().starts_with("spec.mtu 1400 is larger"),
        "{}",
        d.verdict.message()
    );
}
