//! The dataplane over the fake kernel: one pass converges a host, the next
//! changes nothing, damage is repaired, one public IP is one table and one
//! address, and an empty plan leaves nothing of yukumo.

use super::*;
use crate::network::fake::FakeKernel;
use crate::network::kernel::Namespaces;
use crate::network::observe::LinkKind;
use crate::network::testkit::plan_for;

fn dataplane() -> Dataplane<FakeKernel> {
    let k = FakeKernel::new();
    k.add_plain_link("ul0");
    k.add_plain_link("ext0");
    // The guest's tap, as libvirt makes it.
    k.add_plain_link("ykt0123abcdef45");
    Dataplane::new(
        k,
        "t-".into(),
        HostEnv {
            underlay: Some("10.255.0.1".parse().unwrap()),
            uplink: Some("ul0".into()),
        },
        None,
    )
}

#[tokio::test]
async fn one_pass_converges_and_the_next_changes_nothing() {
    let dp = dataplane();
    let plan = plan_for("t-", "ext0");
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert!(
        ch.links > 0 && ch.tables == 2 && ch.namespaces == 1 && ch.dhcp == 1,
        "{ch:?}"
    );
    assert_eq!(dp.apply(&plan, Pass::Changed).await.unwrap().total(), 0);
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().total(), 0);
    dp.kernel.with(|m| {
        let host = &m.host.state;
        assert_eq!(host.links["ykvx1000"].master.as_deref(), Some("ykbr1000"));
        assert_eq!(host.links["ykt0123abcdef45"].port, Some((false, false)));
        assert_eq!(host.remotes.len(), 1);
        assert_eq!(host.pinned.len(), 2, "the tap and the router's veth");
        let r = &m.named["t-r1000"];
        assert!(r.forwarding);
        assert_eq!(r.state.addrs["wan0"].len(), 2);
        assert!(r.state.default_route.is_some());
        assert!(r.dhcp.is_some());
        assert_eq!(
            m.announced.len(),
            1,
            "the router announced its addresses once"
        );
    });
}

#[tokio::test]
async fn damage_is_repaired() {
    let dp = dataplane();
    let plan = plan_for("t-", "ext0");
    dp.apply(&plan, Pass::Changed).await.unwrap();
    // The bridge deleted by hand: the segment, the router's veth and the
    // tap rejoin it.
    dp.kernel.with(|m| {
        m.host.state.links.remove("ykbr1000");
        for l in m.host.state.links.values_mut() {
            if l.master.as_deref() == Some("ykbr1000") {
                l.master = None;
                l.port = None;
            }
        }
        m.host.state.pinned.clear();
    });
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert!(ch.links >= 4, "{ch:?}");
    assert_eq!(dp.apply(&plan, Pass::Changed).await.unwrap().total(), 0);
    dp.kernel.with(|m| {
        assert_eq!(
            m.host.state.links["ykt0123abcdef45"].master.as_deref(),
            Some("ykbr1000")
        );
        assert_eq!(
            m.host.state.links["ykgw1000"].master.as_deref(),
            Some("ykbr1000")
        );
    });
    // Inside the router (no watch here to say so): the verification finds it.
    dp.kernel.with(|m| {
        let r = m.named.get_mut("t-r1000").unwrap();
        r.state.addrs.get_mut("wan0").unwrap().clear();
        r.tables.clear();
    });
    let ch = dp.apply(&plan, Pass::Verify).await.unwrap();
    assert_eq!((ch.addresses, ch.tables), (2, 1), "{ch:?}");
    // The router's namespace deleted by hand: made again.
    dp.kernel.delete("t-r1000").await.unwrap();
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert_eq!(ch.namespaces, 1, "{ch:?}");
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().total(), 0);
}

#[tokio::test]
async fn one_mapping_is_one_table_and_one_address() {
    let dp = dataplane();
    let plan = plan_for("t-", "ext0");
    dp.apply(&plan, Pass::Changed).await.unwrap();
    let fewer = crate::network::testkit::plan_with("t-", "ext0", |s| {
        s.public_ips.clear();
    });
    let before = dp.kernel.with(|m| m.log.len());
    let ch = dp.apply(&fewer, Pass::Changed).await.unwrap();
    assert_eq!((ch.tables, ch.addresses, ch.total()), (1, 1, 2), "{ch:?}");
    let log = dp.kernel.with(|m| m.log[before..].to_vec());
    assert_eq!(log.len(), 2, "{log:?}");
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert_eq!((ch.tables, ch.addresses, ch.total()), (1, 1, 2), "{ch:?}");
}

#[tokio::test]
async fn an_empty_plan_leaves_nothing_of_yukumo() {
    let dp = dataplane();
    dp.apply(&plan_for("t-", "ext0"), Pass::Changed)
        .await
        .unwrap();
    dp.apply(&HostPlan::default(), Pass::Changed).await.unwrap();
    dp.kernel.with(|m| {
        let names: Vec<&String> = m.host.state.links.keys().collect();
        assert_eq!(
            names,
            ["ext0", "ul0", "ykt0123abcdef45"],
            "only what yukumo did not make"
        );
        assert!(m.named.is_empty());
        assert!(m.host.tables.is_empty());
        assert!(m.dhcp_files.is_empty());
    });
    assert!(matches!(
        dp.kernel.with(|m| m.host.state.links["ul0"].kind.clone()),
        LinkKind::Other(_)
    ));
}

#[tokio::test]
async fn the_sites_tunnel_end_is_held_filtered_and_let_go() {
    use crate::network::testkit::plan_gateway;
    let dp = dataplane();
    dp.kernel.add_plain_link("wan0");
    let plan = plan_gateway("t-", true);
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert_eq!(ch.tables, 4, "guard, router, filter and shaper: {ch:?}");
    assert_eq!(dp.apply(&plan, Pass::Changed).await.unwrap().total(), 0);
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().total(), 0);
    dp.kernel.with(|m| {
        let host = &m.host.state;
        let w = &host.links["ykw1000"];
        assert_eq!(w.master.as_deref(), Some("ykbr1000"));
        assert_eq!(
            w.kind,
            LinkKind::Vxlan {
                vni: 1000,
                local: Some("100.64.0.101".parse().unwrap()),
                port: 4790
            }
        );
        let wan_remotes: Vec<String> = host
            .remotes
            .iter()
            .filter(|(d, _)| d == "ykw1000")
            .map(|(_, a)| a.to_string())
            .collect();
        assert_eq!(wan_remotes, vec!["100.64.0.102", "100.64.0.103"]);
        assert!(host.addrs["wan0"].contains(&"100.64.0.101/32".parse().unwrap()));
        assert!(m.host.tables["inet"].contains("ip saddr != @peers counter drop"));
        assert_eq!(m.host.shaping["wan0"], vec![(1, 200), (2, 1000)]);
        assert!(
            m.announced.contains(&(
                WAN_ENDPOINT.to_string(),
                vec!["100.64.0.101".parse().unwrap()]
            )),
            "{:?}",
            m.announced
        );
    });
    // The endpoint moved to another host: port, address and filter go.
    let plan = plan_gateway("t-", false);
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert!(
        ch.tables == 2 && ch.addresses == 1 && ch.links == 1 && ch.fdb == 0,
        "filter, shaper, address, port: {ch:?}"
    );
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().total(), 0);
    dp.kernel.with(|m| {
        let host = &m.host.state;
        assert!(!host.has("ykw1000"));
        assert!(host.remotes.iter().all(|(d, _)| d != "ykw1000"));
        assert!(host.addrs.get("wan0").is_none_or(|a| a.is_empty()));
        assert!(!m.host.tables["inet"].contains("@peers counter"));
        assert!(!m.host.shaping.contains_key("wan0"));
    });
    // Held again, then the Site has no WAN end any more (no tunnel plan at
    // all): endpoint, port, filter and shaper go all the same.
    dp.apply(&plan_gateway("t-", true), Pass::Changed)
        .await
        .unwrap();
    let none = plan_for("t-", "ext0");
    assert!(none.tunnel.is_none());
    dp.apply(&none, Pass::Changed).await.unwrap();
    assert_eq!(dp.apply(&none, Pass::Verify).await.unwrap().total(), 0);
    dp.kernel.with(|m| {
        let host = &m.host.state;
        assert!(!host.has("ykw1000"));
        assert!(host.addrs.get("wan0").is_none_or(|a| a.is_empty()));
        assert!(!m.host.tables.contains_key("inet"));
        assert!(!m.host.shaping.contains_key("wan0"));
    });
}

#[tokio::test]
async fn a_wireguard_sites_holder_makes_its_device_before_the_ports_inside_it_and_removes_it() {
    use crate::network::testkit::plan_gateway_with;
    use crate::network::wireguard::{FWMARK, WgOp, encode};
    let (kb, kc) = (encode(&[2u8; 32]), encode(&[3u8; 32]));
    let keys = [("b", Some(kb.as_str())), ("c", Some(kc.as_str()))];
    let mut k = FakeKernel::new();
    k.wireguard_key = Some([1u8; 32]);
    k.add_plain_link("ul0");
    k.add_plain_link("ext0");
    k.add_plain_link("ykt0123abcdef45");
    k.add_plain_link("wan0");
    let dp = Dataplane::new(
        k,
        "t-".into(),
        HostEnv {
            underlay: Some("10.255.0.1".parse().unwrap()),
            uplink: Some("ul0".into()),
        },
        None,
    );
    let plan = plan_gateway_with("t-", true, &[], Some(&keys));
    dp.apply(&plan, Pass::Changed).await.unwrap();
    let again = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert_eq!(
        again.total(),
        0,
        "{again:?} {:?}",
        dp.kernel.with(|m| m.log.clone())
    );
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().total(), 0);
    dp.kernel.with(|m| {
        let wg = m.host.wireguard.as_ref().expect("the device");
        assert_eq!(
            (wg.port, wg.mtu, wg.fwmark, wg.up),
            (4790, 1440, FWMARK, true)
        );
        assert_eq!(wg.public, Some([1u8; 32]));
        let routes: Vec<String> = wg.routes.iter().map(|a| a.to_string()).collect();
        assert_eq!(routes, ["100.64.0.102", "100.64.0.103"]);
        // The device first, then the WAN port inside it.
        let set = m.log.iter().position(|l| l.starts_with("Set(WgPlan"));
        let port = m.log.iter().position(|l| l.contains("ykw1000"));
        assert!(set.is_some() && set < port, "{:?}", m.log);
        assert_eq!(
            m.host.state.links["ykw1000"].kind,
            LinkKind::Vxlan {
                vni: 1000,
                local: Some("100.64.0.101".parse().unwrap()),
                port: 4791
            }
        );
    });
    // A peer's key changed by hand on the device: set again on a
    // verification pass.
    dp.kernel.with(|m| {
        let wg = m.host.wireguard.as_mut().unwrap();
        let p = wg.peers.remove(&[2u8; 32]).unwrap();
        wg.peers.insert([9u8; 32], p);
    });
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().links, 1);
    // The endpoint moves away: the device goes.
    dp.apply(
        &plan_gateway_with("t-", false, &[], Some(&keys)),
        Pass::Changed,
    )
    .await
    .unwrap();
    dp.kernel.with(|m| {
        assert!(m.host.wireguard.is_none());
        assert_eq!(
            m.log
                .iter()
                .filter(|l| *l == &format!("{:?}", WgOp::Remove))
                .count(),
            1
        );
        assert!(!m.host.state.has("ykw1000"));
    });
}
