use super::*;
use crate::network::observe::LinkState;
use crate::network::testkit::plan_for;

fn env() -> HostEnv {
    HostEnv {
        underlay: Some("10.255.0.1".parse().unwrap()),
        uplink: Some("ul0".into()),
    }
}

fn l(name: &str, kind: LinkKind, up: bool, mtu: u32, master: Option<&str>) -> LinkState {
    LinkState {
        mac: None,
        name: name.into(),
        kind,
        up,
        mtu,
        master: master.map(str::to_string),
        parent: None,
        port: master.map(|_| (false, false)),
    }
}

/// A host namespace that holds exactly what the fixture's plan asks.
fn converged_host(plan: &HostPlan) -> NsState {
    let mut s = NsState::default();
    let vx = LinkKind::Vxlan {
        vni: 1000,
        local: env().underlay,
        port: VXLAN_PORT,
    };
    for link in [
        l("ykbr1000", LinkKind::Bridge, true, 1450, None),
        l("ykvx1000", vx, true, 1450, Some("ykbr1000")),
        l("ykgw1000", LinkKind::Veth, true, 1450, Some("ykbr1000")),
        l(
            "ykt0123abcdef45",
            LinkKind::Other("tun".into()),
            true,
            1450,
            Some("ykbr1000"),
        ),
        l("ul0", LinkKind::Veth, true, 1500, None),
        l("ext0", LinkKind::Veth, true, 1500, None),
    ] {
        s.links.insert(link.name.clone(), link);
    }
    s.remotes
        .insert(("ykvx1000".into(), "10.255.0.2".parse().unwrap()));
    s.pinned
        .insert(("ykt0123abcdef45".into(), plan.taps[0].mac));
    s.pinned
        .insert(("ykgw1000".into(), plan.routers["yk-r1000"].lan_mac));
    s
}

#[test]
fn an_empty_host_gets_its_segments_and_a_converged_one_nothing() {
    let plan = plan_for("yk-", "ext0");
    let ops = host_links(&plan, &NsState::default(), &env()).unwrap();
    assert_eq!(
        ops,
        [
            LinkOp::AddBridge {
                name: "ykbr1000".into(),
                mtu: 1450
            },
            LinkOp::AddVxlan {
                name: "ykvx1000".into(),
                vni: 1000,
                local: env().underlay,
                dev: Some("ul0".into()),
                port: 4789,
                mtu: 1450
            },
            LinkOp::Set {
                name: "ykvx1000".into(),
                master: Some("ykbr1000".into()),
                mtu: Some(1450)
            },
        ]
    );
    let have = converged_host(&plan);
    assert!(host_links(&plan, &have, &env()).unwrap().is_empty());
    assert!(tap_ops(&plan, &have).is_empty());
    assert_eq!(bridge_ops(&plan, &have), (vec![], vec![]));
}

#[test]
fn stale_and_wrong_links_are_replaced_and_foreign_ones_kept() {
    let plan = plan_for("yk-", "ext0");
    let mut have = converged_host(&plan);
    have.links.insert(
        "ykbr9".into(),
        l("ykbr9", LinkKind::Bridge, true, 1450, None),
    );
    have.links
        .insert("eth9".into(), l("eth9", LinkKind::Bridge, true, 1500, None));
    // A VXLAN device from another underlay address, and a bridge gone down.
    have.links.get_mut("ykvx1000").unwrap().kind = LinkKind::Vxlan {
        vni: 1000,
        local: Some("10.9.9.9".parse().unwrap()),
        port: VXLAN_PORT,
    };
    have.links.get_mut("ykbr1000").unwrap().up = false;
    let ops = host_links(&plan, &have, &env()).unwrap();
    assert!(ops.contains(&LinkOp::Delete("ykbr9".into())));
    assert!(
        !ops.iter().any(|o| o == &LinkOp::Delete("eth9".into())),
        "not ours"
    );
    assert!(ops.contains(&LinkOp::Delete("ykvx1000".into())));
    assert!(
        ops.iter()
            .any(|o| matches!(o, LinkOp::AddVxlan { name, .. } if name == "ykvx1000"))
    );
    assert!(ops.contains(&LinkOp::Set {
        name: "ykbr1000".into(),
        master: None,
        mtu: Some(1450)
    }));
    // A tap that left its (recreated) bridge rejoins it; its pin and port
    // flags follow.
    have.links.get_mut("ykt0123abcdef45").unwrap().master = None;
    assert_eq!(tap_ops(&plan, &have).len(), 1);
    let tap = have.links.get_mut("ykt0123abcdef45").unwrap();
    tap.master = Some("ykbr1000".into());
    tap.port = Some((true, true));
    have.pinned.clear();
    have.remotes
        .insert(("ykvx1000".into(), "10.255.0.77".parse().unwrap()));
    let (fdb, ports) = bridge_ops(&plan, &have);
    assert_eq!(ports.len(), 1);
    assert!(fdb.contains(&FdbOp::DelRemote {
        dev: "ykvx1000".into(),
        dst: "10.255.0.77".parse().unwrap()
    }));
    assert_eq!(
        fdb.iter()
            .filter(|f| matches!(f, FdbOp::Pin { .. }))
            .count(),
        2
    );
}

#[test]
fn a_vlan_segment_needs_an_uplink() {
    let mut plan = plan_for("yk-", "ext0");
    let seg = plan.segments.values_mut().next().unwrap();
    seg.segment = yukumo_api::net::Segment::vlan(10);
    let e = host_links(&plan, &NsState::default(), &HostEnv::default()).unwrap_err();
    assert!(e.0.contains("needs an uplink"), "{e}");
}

fn router_seen<'a>(
    inner: Option<&'a NsState>,
    table: &'a TableSeen,
    dhcp: &'a DhcpSeen,
) -> RouterSeen<'a> {
    RouterSeen {
        inner,
        fresh: false,
        forwarding: Some(true),
        table,
        dhcp,
    }
}

#[test]
fn a_router_is_built_then_left_alone_and_repaired_where_broken() {
    let plan = plan_for("yk-", "ext0");
    let r = &plan.routers["yk-r1000"];
    let host = converged_host(&plan);
    let args = vec!["--x".to_string()];
    // A namespace that was missing (made again): everything, from scratch.
    let none = DhcpSeen::default();
    let ops = router_ops(
        r,
        &host,
        &router_seen(None, &TableSeen::Absent, &none),
        &args,
    );
    assert!(ops.forwarding);
    assert_eq!(
        ops.host.len(),
        4,
        "stale veth, veth, master, macvlan: {:?}",
        ops.host
    );
    assert_eq!(ops.inner.addrs.len(), 3, "gw0, router and public address");
    assert!(ops.inner.route.is_some());
    assert!(matches!(
        ops.table,
        Some(TableOp::Replace {
            family: Family::Ip,
            ..
        })
    ));
    assert!(matches!(ops.dhcp, Some(DhcpOp::Start { .. })));
    assert_eq!(
        ops.announce.len(),
        2,
        "the external addresses are announced"
    );
    // What it then holds: nothing to do.
    let mut inner = NsState::default();
    for link in [
        l("lo", LinkKind::Other("loopback".into()), true, 65536, None),
        l(ROUTER_LAN, LinkKind::Veth, true, 1450, None),
        l(ROUTER_WAN, LinkKind::Macvlan, true, 1500, None),
    ] {
        inner.links.insert(link.name.clone(), link);
    }
    inner.addrs.insert(ROUTER_LAN.into(), [r.lan].into());
    let wan = r.wan.as_ref().unwrap();
    inner
        .addrs
        .insert(ROUTER_WAN.into(), wan.addresses.iter().copied().collect());
    inner.default_route = Some((wan.gateway.unwrap(), ROUTER_WAN.into()));
    let dhcp = DhcpSeen {
        running: true,
        args: Some(args.clone()),
        hosts: Some(r.dhcp.as_ref().unwrap().hosts.clone()),
    };
    let listed = TableSeen::Listed(crate::network::fake::listing_of(&r.ruleset));
    let ops = router_ops(r, &host, &router_seen(Some(&inner), &listed, &dhcp), &args);
    assert_eq!(ops, RouterOps::default());
    assert_eq!(
        router_ops(
            r,
            &host,
            &router_seen(Some(&inner), &TableSeen::Unchanged, &dhcp),
            &args
        ),
        RouterOps::default()
    );
    // A public IP removed by hand comes back (and is announced); a flushed
    // table is replaced; a new lease is reread, not restarted.
    let mut broken = inner.clone();
    let public = *wan.addresses.last().unwrap();
    broken.addrs.get_mut(ROUTER_WAN).unwrap().remove(&public);
    let flushed = TableSeen::Listed("table ip yukumo {\n}\n".into());
    let stale_hosts = DhcpSeen {
        hosts: Some(String::new()),
        ..dhcp.clone()
    };
    let ops = router_ops(
        r,
        &host,
        &router_seen(Some(&broken), &flushed, &stale_hosts),
        &args,
    );
    assert_eq!(
        ops.inner.addrs,
        [AddrOp::Add {
            dev: ROUTER_WAN.into(),
            net: public
        }]
    );
    assert_eq!(ops.announce, [public.addr()]);
    assert!(ops.table.is_some());
    assert!(matches!(ops.dhcp, Some(DhcpOp::Reload { .. })));
    // The LAN leg lost inside the namespace: both ends are made again, and
    // the gateway address with them.
    let mut no_lan = inner.clone();
    no_lan.links.remove(ROUTER_LAN);
    no_lan.addrs.remove(ROUTER_LAN);
    let ops = router_ops(
        r,
        &host,
        &router_seen(Some(&no_lan), &TableSeen::Unchanged, &dhcp),
        &args,
    );
    assert_eq!(ops.host[0], LinkOp::Delete(r.host_veth.clone()));
    assert!(ops.inner.addrs.contains(&AddrOp::Add {
        dev: ROUTER_LAN.into(),
        net: r.lan
    }));
}

#[test]
fn dhcp_and_the_guard_table() {
    let plan = plan_for("yk-", "ext0");
    let d = plan.routers["yk-r1000"].dhcp.clone().unwrap();
    let args = vec!["a".to_string()];
    let running = DhcpSeen {
        running: true,
        args: Some(args.clone()),
        hosts: Some(d.hosts.clone()),
    };
    assert_eq!(dhcp_op(Some(&d), &running, &args), None);
    assert!(matches!(
        dhcp_op(Some(&d), &running, &["b".into()]),
        Some(DhcpOp::Start { .. })
    ));
    assert_eq!(dhcp_op(None, &running, &args), Some(DhcpOp::Stop));
    assert_eq!(dhcp_op(None, &DhcpSeen::default(), &args), None);
    // The guard table: replaced when absent, outdated or flushed; deleted
    // when the host has no segment left.
    assert!(guard_op(&plan, &TableSeen::Absent).is_some());
    assert!(guard_op(&plan, &TableSeen::Outdated).is_some());
    assert_eq!(guard_op(&plan, &TableSeen::Unchanged), None);
    let listed = TableSeen::Listed(crate::network::fake::listing_of(&plan.guard));
    assert_eq!(guard_op(&plan, &listed), None);
    let empty = HostPlan::default();
    assert_eq!(
        guard_op(&empty, &listed),
        Some(TableOp::Delete {
            family: Family::Bridge
        })
    );
    assert_eq!(guard_op(&empty, &TableSeen::Absent), None);
}
