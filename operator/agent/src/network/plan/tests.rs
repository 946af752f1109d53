use super::*;
use crate::network::ruleset::{guard_ruleset, rule_count, ruleset_hash};

use crate::network::testkit::{fixture, vn};

#[test]
fn host_plan_is_deterministic_and_complete() {
    let (groups, nodes, ext) = fixture();
    let inp = Inputs {
        host: "h1",
        netns_prefix: "yk-",
        groups: &groups,
        nodes: &nodes,
        external: Some(&ext),
        underlay: Some("10.255.0.1".parse().unwrap()),
        site: "a",
        gateway: None,
    };
    let p = plan(&inp);
    assert_eq!(p, plan(&inp), "pure and deterministic");
    let seg = &p.segments["ykbr1000"];
    assert_eq!(
        (seg.bridge.as_str(), seg.link.as_str()),
        ("ykbr1000", "ykvx1000")
    );
    assert_eq!(
        seg.remotes
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        vec!["10.255.0.2"]
    );
    assert_eq!(p.taps[0].name, "ykt0123abcdef45");
    assert!(p.guard.contains("ether saddr != 02:00:00:00:00:09 drop"));
    assert!(p.guard.contains("ip saddr 10.0.0.9 accept"));
    let r = &p.routers["yk-r1000"];
    assert_eq!(r.netns, "yk-r1000");
    assert_eq!(r.lan.to_string(), "10.0.0.1/24");
    let wan = r.wan.as_ref().unwrap();
    let addrs: Vec<String> = wan.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(addrs, vec!["203.0.113.16/24", "203.0.113.17/32"]);
    assert!(r.ruleset.contains("elements = { 203.0.113.17 : 10.0.0.7 }"));
    assert!(
        r.ruleset
            .contains("ip saddr 10.0.0.0/24 snat to 203.0.113.16")
    );
    assert!(
        r.ruleset
            .contains("ip daddr { 10.0.0.7 } tcp dport 22 accept")
    );
    assert!(
        r.ruleset
            .contains("ip daddr { 10.0.0.7 } icmp type echo-request accept")
    );
    let dhcp = r.dhcp.as_ref().unwrap();
    assert!(dhcp.hosts.contains("02:00:00:00:00:09,10.0.0.9,c-w-0"));
    assert!(
        dhcp.args
            .contains(&"--dhcp-range=10.0.0.0,static,255.255.255.0,3600".to_string())
    );
    assert_eq!(ruleset_hash(&r.ruleset).map(str::len), Some(16));
    assert!(rule_count(&p.guard) >= 7, "{}", p.guard);
    // The router's legs have MACs of their own, locally administered,
    // the same on any host that runs it (a moved router keeps them).
    assert!(r.lan_mac.is_local_unicast() && r.wan_mac.is_local_unicast());
    assert_ne!(r.lan_mac, r.wan_mac);
    let moved = Inputs {
        host: "h9",
        netns_prefix: "h9-",
        nodes: &[],
        ..inp
    };
    let mut g = (*groups[0]).clone();
    g.status.as_mut().unwrap().router.as_mut().unwrap().host = "h9".into();
    let moved_groups = [Arc::new(g)];
    let moved = plan(&Inputs {
        groups: &moved_groups,
        ..moved
    });
    let m = &moved.routers["h9-r1000"];
    assert_eq!((&m.lan_mac, &m.wan_mac), (&r.lan_mac, &r.wan_mac));
    // Another host with no member and no router has nothing.
    let other = Inputs {
        host: "h9",
        nodes: &[],
        ..inp
    };
    assert_eq!(plan(&other).segments.len(), 0);
}

/// A VLAN group and a VXLAN group may hold the same id (separate
/// ranges): their bridges, links, router veths and namespaces differ.
#[test]
fn a_vlan_and_a_vxlan_group_with_the_same_id_share_no_name() {
    let (groups, _, ext) = fixture();
    let mut vlan = (*groups[0]).clone();
    vlan.metadata.name = Some("lan".into());
    vlan.metadata.uid = Some("g2".into());
    vlan.spec.segment.type_ = SegmentType::Vlan;
    vlan.status.as_mut().unwrap().segment = Some(Segment::vlan(1000));
    let both = vec![groups[0].clone(), Arc::new(vlan)];
    let mut on_lan = (*vn(
        "c-w-1",
        "4567abcd-ef45-6789",
        "10.0.0.8",
        "02:00:00:00:00:08",
    ))
    .clone();
    on_lan.spec.network.as_mut().unwrap().group = "lan".into();
    on_lan.spec.network.as_mut().unwrap().segment = Segment::vlan(1000);
    let nodes = vec![Arc::new(on_lan.clone())];
    let p = plan(&Inputs {
        host: "h1",
        netns_prefix: "yk-",
        groups: &both,
        nodes: &nodes,
        external: Some(&ext),
        underlay: Some("10.255.0.1".parse().unwrap()),
        site: "a",
        gateway: None,
    });
    let names: Vec<(&str, &str)> = p
        .segments
        .values()
        .map(|s| (s.bridge.as_str(), s.link.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![("ykbr1000", "ykvx1000"), ("ykbv1000", "ykvl1000")]
    );
    assert!(
        p.segments["ykbv1000"].remotes.is_empty(),
        "no FDB on a VLAN"
    );
    let routers: Vec<(&str, &str, &str)> = p
        .routers
        .values()
        .map(|r| (r.netns.as_str(), r.host_veth.as_str(), r.bridge.as_str()))
        .collect();
    assert_eq!(
        routers,
        vec![
            ("yk-r1000", "ykgw1000", "ykbr1000"),
            ("yk-v1000", "ykgv1000", "ykbv1000")
        ]
    );
    assert_eq!(
        p.taps[0].bridge, "ykbv1000",
        "the node joins its own group's bridge"
    );
    assert_eq!(
        bridge_name(on_lan.spec.network.unwrap().segment),
        "ykbv1000"
    );
    assert_eq!(bridge_name(Segment::vxlan(7)), "ykbr7");
    assert!(is_router_netns("yk-", "yk-r7") && is_router_netns("yk-", "yk-v7"));
    assert!(!is_router_netns("yk-", "yk-x7") && !is_router_netns("yk-", "yk-r"));
}

/// The rendered tables are valid nftables (checked by `nft -c`, which
/// changes nothing); skipped, saying so, without root or nft.
#[test]
fn rendered_tables_pass_nft_check() {
    use std::io::Write;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: nft -c needs CAP_NET_ADMIN");
        return;
    }
    let (groups, nodes, ext) = fixture();
    let p = plan(&Inputs {
        host: "h1",
        netns_prefix: "yk-",
        groups: &groups,
        nodes: &nodes,
        external: Some(&ext),
        underlay: None,
        site: "a",
        gateway: None,
    });
    let keys = [("b", Some("AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="))];
    let tunnels = [
        crate::network::testkit::plan_gateway("yk-", true),
        crate::network::testkit::plan_gateway_with("yk-", true, &[], Some(&keys)),
    ]
    .map(|p| p.tunnel.expect("a tunnel").ruleset);
    for table in [
        &p.guard,
        &p.routers["yk-r1000"].ruleset,
        &guard_ruleset(&[]),
        &tunnels[0],
        &tunnels[1],
    ] {
        let mut child = match std::process::Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: nft: {e}");
                return;
            }
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(table.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}\n{table}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The memo gives what `plan` gives: unchanged groups' routers are reused,
/// a group written since (a new resourceVersion) or other host inputs are
/// planned again, and groups that went away are forgotten.
#[test]
fn the_memo_plans_what_plan_plans() {
    let (groups, nodes, ext) = fixture();
    let with_rv = |g: &NetworkGroup, rv: &str| {
        let mut g = g.clone();
        g.metadata.uid = Some("uid-1".into());
        g.metadata.resource_version = Some(rv.into());
        Arc::new(g)
    };
    let v1 = [with_rv(&groups[0], "1")];
    let inp = Inputs {
        host: "h1",
        netns_prefix: "yk-",
        groups: &v1,
        nodes: &nodes,
        external: Some(&ext),
        underlay: Some("10.255.0.1".parse().unwrap()),
        site: "a",
        gateway: None,
    };
    let mut memo = PlanMemo::default();
    assert_eq!(plan_memo(&inp, &mut memo), plan(&inp));
    assert_eq!(plan_memo(&inp, &mut memo), plan(&inp), "reused");
    // The group written: one mapping fewer, a new resourceVersion.
    let mut fewer = (*v1[0]).clone();
    fewer.status.as_mut().unwrap().public_ips.clear();
    let v2 = [with_rv(&fewer, "2")];
    let inp2 = Inputs { groups: &v2, ..inp };
    let p2 = plan_memo(&inp2, &mut memo);
    assert_eq!(p2, plan(&inp2));
    assert!(!p2.routers["yk-r1000"].ruleset.contains("203.0.113.17 :"));
    // Another namespace prefix: planned again.
    let inp3 = Inputs {
        netns_prefix: "h1-",
        ..inp2
    };
    assert_eq!(plan_memo(&inp3, &mut memo), plan(&inp3));
    // No groups: nothing kept.
    let inp4 = Inputs {
        groups: &[],
        ..inp3
    };
    assert_eq!(plan_memo(&inp4, &mut memo), plan(&inp4));
    assert!(memo.routers.is_empty());
}

#[test]
fn the_gateway_holding_its_sites_end_stretches_the_group_to_each_peer_site_through_one_port() {
    use crate::network::testkit::plan_gateway;
    let p = plan_gateway("yk-", true);
    let seg = &p.segments["ykbr1000"];
    // Hosts of its own Site and of Sites without a tunnel: directly; those
    // of a tunneled Site (h3 at b): through the gateways only.
    let remotes: Vec<String> = seg.remotes.iter().map(|a| a.to_string()).collect();
    assert_eq!(remotes, vec!["10.255.0.2", "10.255.0.4"]);
    let wan = seg.wan.as_ref().expect("a WAN port");
    assert_eq!(wan.link, "ykw1000");
    let peers: Vec<String> = wan.peers.iter().map(|a| a.to_string()).collect();
    assert_eq!(peers, vec!["100.64.0.102", "100.64.0.103"]);
    let t = p.tunnel.as_ref().unwrap();
    assert_eq!(
        (t.dev.as_str(), t.endpoint.to_string(), t.port, t.active),
        ("wan0", "100.64.0.101/32".into(), 4790, true)
    );
    let r = &t.ruleset;
    assert!(r.starts_with("table inet yukumo {"), "{r}");
    assert!(
        r.contains("elements = { 100.64.0.102, 100.64.0.103 }"),
        "{r}"
    );
    assert!(
        r.contains("ip daddr 100.64.0.101 udp dport 4790 ip saddr != @peers counter drop"),
        "{r}"
    );
    assert!(
        r.contains("iifname \"wan0\" udp dport 4789 counter drop"),
        "{r}"
    );
    // Capped: to b at the smaller of the two Sites' caps, to c (no cap of
    // its own) at this Site's.
    let caps: Vec<String> = t.caps.iter().map(|(a, m)| format!("{a} {m}")).collect();
    assert_eq!(caps, vec!["100.64.0.102 200", "100.64.0.103 1000"]);
    assert!(
        r.contains("ip saddr 100.64.0.101 ip daddr 100.64.0.102 udp dport 4790 counter meta priority set 796b:1"),
        "{r}"
    );
    assert!(
        r.contains("ip saddr 100.64.0.101 ip daddr 100.64.0.103 udp dport 4790 counter meta priority set 796b:2"),
        "{r}"
    );
    assert!(
        r.contains("ip daddr 100.64.0.101 ip saddr 100.64.0.102 udp dport 4790 counter\n"),
        "{r}"
    );
    // Underlay VXLAN only from the hosts it floods to.
    assert!(
        r.contains("set span {\n    type ipv4_addr;\n    elements = { 10.255.0.2, 10.255.0.4 }"),
        "{r}"
    );
    assert!(
        r.contains("udp dport 4789 ip saddr != @span counter drop"),
        "{r}"
    );
    // The filters, the 4789 drop, a byte counter each way per peer.
    assert_eq!(rule_count(r), 7);
    // Another host of the Site (or this one, no longer holding the end):
    // no WAN port, no filter, the endpoint to be let go; still no direct
    // flooding to the tunneled Site.
    let p = plan_gateway("yk-", false);
    let seg = &p.segments["ykbr1000"];
    assert!(seg.wan.is_none());
    assert_eq!(seg.remotes.len(), 2);
    let t = p.tunnel.as_ref().unwrap();
    assert!(!t.active && !t.ruleset.contains("@peers counter") && rule_count(&t.ruleset) == 1);
    assert!(t.caps.is_empty());
}

#[test]
fn a_lost_sites_end_is_closed_but_measured_and_its_hosts_still_not_flooded_to() {
    use crate::network::testkit::plan_gateway_lost;
    let p = plan_gateway_lost("yk-", true, &["c"]);
    let seg = &p.segments["ykbr1000"];
    let peers: Vec<String> = seg
        .wan
        .as_ref()
        .unwrap()
        .peers
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(
        peers,
        vec!["100.64.0.102"],
        "no FDB entry to the closed end"
    );
    let remotes: Vec<String> = seg.remotes.iter().map(|a| a.to_string()).collect();
    assert_eq!(remotes, vec!["10.255.0.2", "10.255.0.4"]);
    let t = p.tunnel.as_ref().unwrap();
    assert!(
        t.ruleset.contains("elements = { 100.64.0.102 }"),
        "{}",
        t.ruleset
    );
    assert!(!t.ruleset.contains("100.64.0.103"), "{}", t.ruleset);
    let caps: Vec<String> = t.caps.iter().map(|(a, m)| format!("{a} {m}")).collect();
    assert_eq!(caps, vec!["100.64.0.102 200"]);
    let probed: Vec<String> = t.peers.iter().map(|(a, s)| format!("{a} {s}")).collect();
    assert_eq!(probed, vec!["100.64.0.102 b", "100.64.0.103 c"]);
    let closed: Vec<String> = t.closed.iter().map(|a| a.to_string()).collect();
    assert_eq!(closed, vec!["100.64.0.103"]);
    // Every peer lost: no WAN port at all, nothing accepted from the WAN.
    let p = plan_gateway_lost("yk-", true, &["b", "c"]);
    assert!(p.segments["ykbr1000"].wan.is_none());
    let t = p.tunnel.as_ref().unwrap();
    assert!(!t.ruleset.contains("100.64.0.102") && !t.ruleset.contains("100.64.0.103"));
    assert_eq!(t.closed.len(), 2);
}

#[test]
fn with_wireguard_the_wan_port_goes_through_the_device_and_an_end_without_a_key_is_closed() {
    use crate::network::testkit::plan_gateway_with;
    use crate::network::wireguard::{WgPlan, decode, encode};
    let kb = encode(&[2u8; 32]);
    // b's holder has a key; c's has none (its kernel has no WireGuard).
    let keys = [
        ("a", Some(encode(&[1u8; 32]))),
        ("b", Some(kb.clone())),
        ("c", None),
    ];
    let keys: Vec<(&str, Option<&str>)> = keys.iter().map(|(s, k)| (*s, k.as_deref())).collect();
    let p = plan_gateway_with("yk-", true, &[], Some(&keys));
    let wan = p.segments["ykbr1000"].wan.as_ref().expect("a WAN port");
    let peers: Vec<String> = wan.peers.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        peers,
        vec!["100.64.0.102"],
        "c is closed: never a plaintext tunnel"
    );
    // Inside the device: the next port, bound to no interface.
    assert_eq!((wan.port, wan.dev.as_deref()), (4791, None));
    let t = p.tunnel.as_ref().unwrap();
    assert_eq!(
        t.wireguard,
        Some(WgPlan {
            port: 4790,
            mtu: 1440,
            peers: [("100.64.0.102".parse().unwrap(), decode(&kb).unwrap())].into(),
        })
    );
    let closed: Vec<String> = t.closed.iter().map(|a| a.to_string()).collect();
    assert_eq!(closed, vec!["100.64.0.103"]);
    let r = &t.ruleset;
    for rule in [
        // The inner VXLAN only from the device, never out on the WAN.
        "udp dport 4791 iifname != \"ykwg\" counter drop",
        "oifname \"wan0\" udp dport 4791 counter drop",
        "ip daddr 100.64.0.101 udp dport 4791 ip saddr != @peers counter drop",
        // Its bytes each way per peer, and the cap on WireGuard's packets.
        "ip daddr 100.64.0.101 ip saddr 100.64.0.102 udp dport 4791 counter\n",
        "ip saddr 100.64.0.101 ip daddr 100.64.0.102 udp dport 4791 counter\n",
        "ip daddr 100.64.0.102 udp dport 4790 meta priority set 796b:1",
    ] {
        assert!(r.contains(rule), "{rule} in {r}");
    }
    // WireGuard's own port from peers only, its packets from the endpoint.
    assert!(
        r.contains("ip daddr 100.64.0.101 udp dport 4790 ip saddr != @peers counter drop"),
        "{r}"
    );
    assert!(
        r.contains(
            "oifname \"wan0\" udp sport 4790 ip saddr != 100.64.0.101 snat ip to 100.64.0.101"
        ),
        "{r}"
    );
    // Not the holder: no device.
    let p = plan_gateway_with("yk-", false, &[], Some(&keys));
    assert_eq!(p.tunnel.as_ref().unwrap().wireguard, None);
}

#[test]
fn without_tunnels_every_host_of_the_span_is_flooded_to_directly() {
    let p = crate::network::testkit::plan_with("yk-", "ext0", |st| {
        st.hosts = serde_json::from_value(serde_json::json!([
            {"name": "h1", "underlay": "10.255.0.1", "site": "a"},
            {"name": "h3", "underlay": "10.255.0.3", "site": "b"}]))
        .unwrap();
    });
    let seg = &p.segments["ykbr1000"];
    assert_eq!(seg.remotes.len(), 1);
    assert!(seg.wan.is_none() && p.tunnel.is_none());
}
