//! The dataplane on the real kernel, in throwaway namespaces (root only):
//! it converges, a second pass changes nothing, the kernel ends up holding
//! what the fake kernel holds for the same plan, one public IP is one
//! table and one address, and an empty plan leaves nothing behind.

use super::dhcp::signal;
use super::*;
use crate::network::dataplane::{Dataplane, Pass};
use crate::network::decide::HostEnv;
use crate::network::fake::FakeKernel;
use crate::network::kernel::Dhcp;
use crate::network::observe::LinkKind;
use crate::network::plan::HostPlan;
use crate::network::testkit::{plan_for, plan_with};

fn have(prog: &str) -> bool {
    std::process::Command::new(prog)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Namespaces of the test, removed (with their DHCP servers) also when an
/// assertion fails.
struct Sandbox {
    host: String,
    outside: String,
    state: tempfile::TempDir,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let pids = std::fs::read_dir(self.state.path().join("net"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("dnsmasq.pid")).ok())
                    .filter_map(|p| p.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for pid in pids {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        for ns in netns::list() {
            if ns.starts_with(&format!("{}-", self.host)) {
                let _ = netns::delete(&ns);
            }
        }
        let _ = netns::delete(&self.host);
        let _ = netns::delete(&self.outside);
    }
}

/// Delete a link of the host namespace, as a person would, outside a pass.
async fn delete_link(k: &RealKernel, name: &str) {
    k.ns(None)
        .await
        .unwrap()
        .apply(&NsOps {
            links: vec![LinkOp::Delete(name.into())],
            ..Default::default()
        })
        .await
        .unwrap();
}

fn veth(name: &str, peer: &str, peer_netns: &str) -> LinkOp {
    LinkOp::AddVeth {
        name: name.into(),
        mtu: 1500,
        peer: peer.into(),
        peer_mac: MacAddr([2, 0, 0, 0, 0x77, name.len() as u8]),
        peer_netns: peer_netns.into(),
    }
}

/// The yukumo part of a namespace's state, comparable between kernels:
/// yukumo's links and the taps (kind, up, MTU, master), the FDB, the
/// addresses and the route.
fn comparable(s: &NsState) -> String {
    let mut out = String::new();
    for l in s.links.values() {
        if crate::network::decide::is_ours(&l.name)
            || l.name.starts_with("ykt")
            || l.name.starts_with("gw")
            || l.name.starts_with("wan")
        {
            // Taps are libvirt's (here: test veths): their kind is not ours.
            let kind = match &l.kind {
                _ if l.name.starts_with("ykt") => "tap".to_string(),
                LinkKind::Other(_) => "other".to_string(),
                k => format!("{k:?}"),
            };
            out.push_str(&format!(
                "{} {kind} up={} mtu={} master={:?} port={:?}\n",
                l.name, l.up, l.mtu, l.master, l.port
            ));
        }
    }
    out.push_str(&format!("remotes {:?}\npinned {:?}\n", s.remotes, s.pinned));
    for (dev, a) in &s.addrs {
        if dev != "lo" {
            out.push_str(&format!("addr {dev} {a:?}\n"));
        }
    }
    out.push_str(&format!("route {:?}\n", s.default_route));
    out
}

/// A host namespace with an uplink, an external interface and a guest's
/// tap, and the dataplane of that host; None (saying so) without root,
/// nft or dnsmasq. `tag` keeps concurrent tests' namespaces apart.
async fn sandbox(tag: &str) -> Option<(Sandbox, Dataplane<RealKernel>, HostEnv, String)> {
    if !nix::unistd::geteuid().is_root() || !have("nft") || !have("dnsmasq") {
        eprintln!("skipped: needs root, nft and dnsmasq");
        return None;
    }
    let id = format!("{}{tag}", std::process::id() % 100_000);
    let sb = Sandbox {
        host: format!("ykrt{id}h"),
        outside: format!("ykrt{id}o"),
        state: tempfile::tempdir().unwrap(),
    };
    netns::create(&sb.host).unwrap();
    netns::create(&sb.outside).unwrap();
    // The host's uplink, external interface and a guest's tap: veths into
    // the outside namespace.
    let k = RealKernel::new(Some(sb.host.clone()), sb.state.path().to_path_buf());
    let host = k.ns(None).await.unwrap();
    host.apply(&NsOps {
        links: vec![
            veth("ul0", "ulp", &sb.outside),
            veth("ext0", "extp", &sb.outside),
            veth("ykt0123abcdef45", "guest", &sb.outside),
            LinkOp::up("lo"),
            LinkOp::up("ul0"),
            LinkOp::up("ext0"),
            LinkOp::up("ykt0123abcdef45"),
        ],
        addrs: vec![AddrOp::Add {
            dev: "ul0".into(),
            net: "10.255.0.1/24".parse().unwrap(),
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let prefix = format!("{}-", sb.host);
    let env = HostEnv {
        underlay: Some("10.255.0.1".parse().unwrap()),
        uplink: Some("ul0".into()),
    };
    let dp = Dataplane::new(k, prefix.clone(), env.clone(), Some(sb.host.clone()));
    Some((sb, dp, env, prefix))
}

/// A router's macvlan beside a host link of its name (a WAN interface
/// called `wan0`): made by its name where the kernel allows it (this
/// machine's), and under a temporary name renamed in the router's namespace
/// where it answers EEXIST (Debian 12's 6.1: the VM hosts of
/// `e2e/lib/vm-host.sh` prove that path; here it is called directly), a
/// leftover of a creation cut short replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routers_macvlan_is_made_beside_a_host_link_of_its_name() {
    let Some((sb, dp, _env, prefix)) = sandbox("m").await else {
        return;
    };
    let router = format!("{prefix}r7");
    netns::create(&router).unwrap();
    let birth = macvlan_birth_name(&router);
    let host = dp.kernel.ns(None).await.unwrap();
    // The host's own wan0, and a leftover under the birth name in the router.
    host.apply(&NsOps {
        links: vec![
            veth("wan0", "wanp", &sb.outside),
            veth("ykleft0", &birth, &router),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let mac = MacAddr([2, 0, 0, 0, 0x42, 7]);
    let op = |netns: &str| LinkOp::AddMacvlan {
        name: "wan0".into(),
        parent: "ext0".into(),
        mac,
        netns: netns.to_string(),
    };
    let idx = host.indices().await.unwrap();
    add_macvlan_beside_its_name(&host.nl, &op(&router), &idx)
        .await
        .unwrap();
    // And by the pass's own path, into a second router.
    let second = format!("{prefix}r8");
    netns::create(&second).unwrap();
    host.apply(&NsOps {
        links: vec![op(&second)],
        ..Default::default()
    })
    .await
    .unwrap();
    for r in [&router, &second] {
        let r = dp
            .kernel
            .ns(Some(r))
            .await
            .unwrap()
            .observe(Want::ROUTER)
            .await
            .unwrap();
        assert_eq!(r.links["wan0"].kind, LinkKind::Macvlan, "{:?}", r.links);
        assert_eq!(r.links["wan0"].mac, Some(mac));
        assert!(!r.links.contains_key(&birth), "{:?}", r.links);
    }
    let h = host.observe(Want::HOST).await.unwrap();
    assert!(
        matches!(h.links["wan0"].kind, LinkKind::Veth),
        "{:?}",
        h.links
    );
    assert!(
        !h.links.contains_key("ykleft0"),
        "the leftover's peer went with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_converges_like_the_fake() {
    let Some((_sb, dp, env, prefix)) = sandbox("c").await else {
        return;
    };
    let plan = plan_for(&prefix, "ext0");
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert!(
        ch.links > 0 && ch.tables == 2 && ch.namespaces == 1 && ch.dhcp == 1,
        "{ch:?}"
    );
    let again = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert_eq!(again.total(), 0, "a converged pass changed {again:?}");
    let verify = dp.apply(&plan, Pass::Verify).await.unwrap();
    assert_eq!(verify.total(), 0, "a verification changed {verify:?}");

    // The fake, given the same plan on the same links, holds the same.
    let fake = FakeKernel::new();
    for l in ["ul0", "ext0", "ykt0123abcdef45"] {
        fake.add_plain_link(l);
    }
    fake.with(|m| {
        m.host
            .state
            .addrs
            .entry("ul0".into())
            .or_default()
            .insert("10.255.0.1/24".parse().unwrap());
    });
    let fdp = Dataplane::new(fake, prefix.clone(), env, None);
    fdp.apply(&plan, Pass::Changed).await.unwrap();
    let real_host = dp
        .kernel
        .ns(None)
        .await
        .unwrap()
        .observe(Want::HOST)
        .await
        .unwrap();
    let fake_host = fdp
        .kernel
        .ns(None)
        .await
        .unwrap()
        .observe(Want::HOST)
        .await
        .unwrap();
    assert_eq!(comparable(&real_host), comparable(&fake_host));
    let router = format!("{prefix}r1000");
    let real_r = dp
        .kernel
        .ns(Some(&router))
        .await
        .unwrap()
        .observe(Want::ROUTER)
        .await
        .unwrap();
    let fake_r = fdp
        .kernel
        .ns(Some(&router))
        .await
        .unwrap()
        .observe(Want::ROUTER)
        .await
        .unwrap();
    assert_eq!(comparable(&real_r), comparable(&fake_r));
    assert!(dp.kernel.forwarding(&router).await.unwrap());
    assert!(
        dp.kernel.seen(&router).running,
        "dnsmasq runs in the router"
    );
    let table = dp
        .kernel
        .table(Some(&router), Family::Ip)
        .await
        .unwrap()
        .unwrap();
    assert!(crate::network::ruleset::listing_is(
        &table,
        &plan.routers[&router].ruleset
    ));

    // One mapping removed and put back: one table and one address each.
    let fewer = plan_with(&prefix, "ext0", |s| s.public_ips.clear());
    for p in [&fewer, &plan] {
        let ch = dp.apply(p, Pass::Changed).await.unwrap();
        assert_eq!((ch.tables, ch.addresses, ch.total()), (1, 1, 2), "{ch:?}");
    }

    // Damage by hand: the bridge deleted; the router's table flushed.
    delete_link(&dp.kernel, "ykbr1000").await;
    dp.kernel
        .apply_table(
            Some(&router),
            &TableOp::Replace {
                family: Family::Ip,
                ruleset: "table ip yukumo {\n}\n".into(),
            },
        )
        .await
        .unwrap();
    let ch = dp.apply(&plan, Pass::Verify).await.unwrap();
    assert!(ch.links >= 4 && ch.tables == 1, "{ch:?}");
    assert_eq!(dp.apply(&plan, Pass::Verify).await.unwrap().total(), 0);

    // Nothing of yukumo after an empty plan.
    dp.apply(&HostPlan::default(), Pass::Changed).await.unwrap();
    let left = dp
        .kernel
        .ns(None)
        .await
        .unwrap()
        .observe(Want::HOST)
        .await
        .unwrap();
    let yk: Vec<&String> = left
        .links
        .keys()
        .filter(|n| crate::network::decide::is_ours(n))
        .collect();
    assert!(yk.is_empty(), "{yk:?}");
    assert!(!netns::list().contains(&router));
    assert_eq!(dp.kernel.table(None, Family::Bridge).await.unwrap(), None);
}

/// With kernel events followed (as in the agent), a pass on a watch event
/// reuses the host state the last pass left instead of dumping it again,
/// and a hand-made change in the host namespace is still repaired by the
/// pass its event queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_host_is_not_read_again_until_something_changes_it() {
    let Some((sb, dp, _env, prefix)) = sandbox("w").await else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let watches = crate::network::watch::RouterWatches::new(tx);
    let dp = dp.with_watches(watches);
    let plan = plan_for(&prefix, "ext0");
    assert!(dp.apply(&plan, Pass::Changed).await.unwrap().links > 0);
    // The pass that changed the host reads it again; the next one reuses it.
    for _ in 0..3 {
        assert_eq!(dp.apply(&plan, Pass::Changed).await.unwrap().total(), 0);
    }
    while rx.try_recv().is_ok() {}

    // By hand, outside any pass: the bridge goes.
    let hand = RealKernel::new(Some(sb.host.clone()), sb.state.path().to_path_buf());
    delete_link(&hand, "ykbr1000").await;
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .expect("the host's event queues a pass within 5 s");
    let ch = dp.apply(&plan, Pass::Changed).await.unwrap();
    assert!(ch.links >= 4, "the deleted bridge was not rebuilt: {ch:?}");
    assert_eq!(dp.apply(&plan, Pass::Changed).await.unwrap().total(), 0);
    dp.apply(&HostPlan::default(), Pass::Changed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_takes_and_lets_go_the_sites_tunnel_end() {
    let Some((_sb, dp, _env, prefix)) = sandbox("t").await else {
        return;
    };
    let host = dp.kernel.ns(None).await.unwrap();
    host.apply(&NsOps {
        links: vec![veth("wan0", "wanp", &_sb.outside), LinkOp::up("wan0")],
        addrs: vec![AddrOp::Add {
            dev: "wan0".into(),
            net: "100.64.0.11/24".parse().unwrap(),
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let plan = crate::network::testkit::plan_gateway(&prefix, true);
    dp.apply(&plan, Pass::Changed).await.unwrap();
    let again = dp.apply(&plan, Pass::Verify).await.unwrap();
    assert_eq!(again.total(), 0, "a converged pass changed {again:?}");
    let s = host.observe(Want::HOST).await.unwrap();
    assert_eq!(
        s.links["ykw1000"].kind,
        LinkKind::Vxlan {
            vni: 1000,
            local: Some("100.64.0.101".parse().unwrap()),
            port: 4790
        }
    );
    assert_eq!(s.links["ykw1000"].master.as_deref(), Some("ykbr1000"));
    assert!(
        s.remotes
            .contains(&("ykw1000".into(), "100.64.0.103".parse().unwrap()))
    );
    assert!(s.addrs["wan0"].contains(&"100.64.0.101/32".parse().unwrap()));
    let listed = dp.kernel.table(None, Family::Inet).await.unwrap().unwrap();
    assert!(listed.contains("100.64.0.102"), "{listed}");
    assert!(listed.contains("meta priority set 796b:2"), "{listed}");
    // Its per-peer counters read back from the listing.
    let counters = crate::network::ruleset::tunnel_counters(&listed);
    assert_eq!(counters.len(), 2, "{listed}");
    assert_eq!(
        dp.kernel.shaping("wan0").await.unwrap(),
        Some(vec![(1, 200), (2, 1000)])
    );
    let plan = crate::network::testkit::plan_gateway(&prefix, false);
    dp.apply(&plan, Pass::Changed).await.unwrap();
    let again = dp.apply(&plan, Pass::Verify).await.unwrap();
    assert_eq!(again.total(), 0, "a converged pass changed {again:?}");
    let s = host.observe(Want::HOST).await.unwrap();
    assert!(!s.has("ykw1000"));
    assert!(!s.addrs["wan0"].contains(&"100.64.0.101/32".parse().unwrap()));
    let listed = dp.kernel.table(None, Family::Inet).await.unwrap().unwrap();
    assert!(
        listed.contains("udp dport 4789") && !listed.contains("@peers counter"),
        "{listed}"
    );
    assert_eq!(dp.kernel.shaping("wan0").await.unwrap(), None);
}

#[test]
fn tc_classes_are_read_in_mbit_by_minor() {
    let text = "class htb 796b:2 root prio 0 rate 1Gbit ceil 1Gbit burst 1375b cburst 1375b \nclass htb 796b:1 root prio 0 rate 200Mbit ceil 200Mbit burst 1600b cburst 1600b \nclass htb 1:1 root prio 0 rate 5Mbit ceil 5Mbit burst 1600b cburst 1600b \nclass htb 796b:a root prio 0 rate 1500Kbit ceil 1500Kbit burst 1600b cburst 1600b \n";
    assert_eq!(parse_classes(text), vec![(1, 200), (2, 1000), (10, 2)]);
}

#[test]
fn tunnel_counters_are_read_per_peer_each_way() {
    let listing = "table inet yukumo {\n\tcomment \"yukumo:0123456789abcdef\"\n\tset peers {\n\t\ttype ipv4_addr\n\t\telements = { 100.64.0.102 }\n\t}\n\n\tchain wan {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tiifname \"wan0\" udp dport 4789 counter packets 1 bytes 50 drop\n\t\tip daddr 100.64.0.101 udp dport 4790 ip saddr != @peers counter packets 3 bytes 300 drop\n\t\tip daddr 100.64.0.101 ip saddr 100.64.0.102 udp dport 4790 counter packets 7 bytes 7000\n\t}\n\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t\tip saddr 100.64.0.101 ip daddr 100.64.0.102 udp dport 4790 counter packets 5 bytes 5500 meta priority set 796b:1\n\t}\n}\n";
    let c = crate::network::ruleset::tunnel_counters(listing);
    assert_eq!(c.len(), 1);
    assert_eq!(c[&"100.64.0.102".parse().unwrap()], (7000, 5500));
}
