//! The network dataplane with real guests: two tenants on the same CIDR,
//! DHCP seen from inside the guests, a ping matrix across hosts, SNAT and
//! DNAT through the outside namespace, the inbound firewall, anti-spoofing
//! (MAC, IP, ARP, rogue DHCP, 802.1Q tags, IPv6; frames recorded on both
//! taps by `e2e/lib/sniff.py`), zero loss while agents and controller are
//! killed -9, repair of hand-made damage, the same addresses across a
//! stop/start and a recreation, and a teardown that leaves nothing behind.
//!
//! Guests are driven through their second serial port (a root shell on
//! ttyS1), never through the network under test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use yukumo_agent::network::plan::tap_name;
use yukumo_e2e::net::{
    Sniffer, first_peer_listener, in_ns, router_advertisement, udp_frame, wait_repaired,
};
use yukumo_e2e::{Env, condition, guest_sh, tiny_image, wait_for};

fn tenant(ns: &str) -> String {
    let (path, sum) = tiny_image();
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec:
  cidr: 10.0.0.0/24
  segment: {{type: vxlan}}
  homeSite: local
  firewall:
  - {{protocol: tcp, ports: "8080"}}
  - {{protocol: icmp}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: c, namespace: {ns}}}
spec:
  networkGroup: net
  frontend:
    size: {{cpu: 1, memory: 128Mi}}
    image: {{url: 'file://{path}', checksum: '{sum}'}}
    publicIP: true
  pools:
  - {{name: w, replicas: 1, size: {{cpu: 1, memory: 128Mi}}}}
"#
    )
}

/// A running guest: where it is and what it was given.
#[derive(Debug, Clone)]
struct Guest {
    host: String,
    uid: String,
    ip: String,
    mac: String,
}

impl Guest {
    fn socket(&self) -> PathBuf {
        PathBuf::from(format!("/run/yukumo/{}.sock", self.uid))
    }
    fn sh(&self, cmd: &str) -> (String, i32) {
        guest_sh(&self.socket(), cmd, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("guest {}: {e}", self.ip))
    }
    fn pings(&self, ip: &str) -> bool {
        self.sh(&format!("ping -c 2 -W 2 {ip} >/dev/null")).1 == 0
    }
}

fn guests(env: &Env, ns: &str) -> BTreeMap<String, Guest> {
    let v: Value = env.get_json(&["-n", ns, "get", "vn"]);
    let mut out = BTreeMap::new();
    for n in v["items"].as_array().unwrap() {
        let net = &n["spec"]["network"];
        out.insert(
            n["metadata"]["name"].as_str().unwrap().to_string(),
            Guest {
                host: n["spec"]["host"].as_str().unwrap_or_default().to_string(),
                uid: n["metadata"]["uid"].as_str().unwrap().to_string(),
                ip: net["ip"].as_str().unwrap_or_default().to_string(),
                mac: net["mac"].as_str().unwrap_or_default().to_string(),
            },
        );
    }
    out
}

fn console(env: &Env, g: &Guest) -> String {
    std::fs::read_to_string(env.dir.join(format!(
        "hosts/{}/agent/nodes/{}/console.log",
        g.host, g.uid
    )))
    .unwrap_or_default()
}

/// Wait until both nodes of a tenant run and report their DHCP address.
fn wait_dhcp(env: &Env, ns: &str) -> BTreeMap<String, Guest> {
    wait_dhcp_n(env, ns, 2)
}

/// Wait until the `n` nodes of a tenant run and report their DHCP address.
fn wait_dhcp_n(env: &Env, ns: &str, n: usize) -> BTreeMap<String, Guest> {
    let (gs, took) = wait_for(
        Duration::from_secs(360),
        &format!("{ns}: DHCP in guests"),
        || {
            let gs = guests(env, ns);
            if gs.len() != n {
                return Err(format!("{} nodes", gs.len()));
            }
            for (name, g) in &gs {
                let c = console(env, g);
                if !c.contains(&format!("YUKUMO-GUEST dhcp={}/24", g.ip)) {
                    return Err(format!(
                        "{name} ({}) has no DHCP lease for {} yet",
                        g.host, g.ip
                    ));
                }
                if !c.contains("YUKUMO-GUEST ready") {
                    return Err(format!("{name} not ready"));
                }
            }
            Ok(gs)
        },
    )
    .unwrap();
    println!("{ns}: {n} guests got their address by DHCP after {took:?}");
    gs
}

fn ng_status(env: &Env, ns: &str) -> Value {
    env.get_json(&["-n", ns, "get", "ng", "net"])["status"].clone()
}

#[test]
fn two_tenants_on_one_cidr_get_dhcp_isolation_nat_firewall_antispoofing_and_repair() {
    let env = Env::get();
    let p = env.netns_prefix();
    let (outside, client) = (format!("{p}-out"), format!("{p}-client"));
    env.apply(&(tenant("neta") + "---\n" + &tenant("netb")));
    let a = wait_dhcp(&env, "neta");
    let b = wait_dhcp(&env, "netb");
    let (afe, aw) = (&a["c-frontend"], &a["c-w-0"]);
    let (bfe, bw) = (&b["c-frontend"], &b["c-w-0"]);
    assert_ne!(
        afe.host, aw.host,
        "the tenant's nodes are spread over hosts"
    );
    // Inside the guest: the address the group allocated, on eth0.
    let (out, _) = afe.sh("ip -4 -o addr show eth0");
    assert!(out.contains(&format!("{}/24", afe.ip)), "{out}");

    // Ping matrix: within a group across hosts, never across groups (the
    // same CIDR on both sides).
    assert!(afe.pings(&aw.ip), "neta frontend -> worker across hosts");
    assert!(aw.pings(&afe.ip), "neta worker -> frontend");
    assert!(bfe.pings(&bw.ip), "netb frontend -> worker");
    for (g, other) in [(afe, bw), (aw, bfe), (bfe, aw)] {
        let mine = if a.values().any(|x| x.ip == g.ip) {
            &a
        } else {
            &b
        };
        if mine.values().any(|x| x.ip == other.ip) {
            continue; // the same address exists in both groups: not a cross-group probe
        }
        assert!(
            !g.pings(&other.ip),
            "{} reached {} across groups",
            g.ip,
            other.ip
        );
    }
    println!("ping matrix: 3 in-group pairs reach each other, cross-group pairs do not");
    // Every guest's port: pinned to its MAC, no learning, no flooding of
    // unknown unicast to it.
    for g in [afe, aw, bfe, bw] {
        let hns = env.host_netns(&g.host);
        let t = tap_name(&g.uid);
        let (port, _) = in_ns(&hns, &["bridge", "-d", "link", "show", "dev", &t]);
        assert!(
            port.contains("learning off") && port.contains(" flood off"),
            "{t}: {port}"
        );
        let (fdb, _) = in_ns(&hns, &["bridge", "fdb", "show", "dev", &t]);
        assert!(
            fdb.lines()
                .any(|l| l.starts_with(&g.mac) && l.ends_with(" static")),
            "{t}: {fdb}"
        );
    }
    println!(
        "bridge ports: each guest's tap pinned to its MAC, learning and unknown-unicast flooding off"
    );

    // Egress: the outside sees the router's address (SNAT).
    let router_a = ng_status(&env, "neta")["router"]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let l = first_peer_listener(&outside, "203.0.113.1", 7777);
    std::thread::sleep(Duration::from_millis(500));
    aw.sh("echo hi | nc 203.0.113.1 7777");
    let out = l.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        seen, router_a,
        "egress is masqueraded to the router's address"
    );
    println!("SNAT: the outside saw {seen}");

    // Inbound: the frontend's public IP, on an allowed port and not on another.
    let pub_a = ng_status(&env, "neta")["publicIPs"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    afe.sh("mkdir -p /www && echo yukumo-neta > /www/index.html && httpd -p 8080 -h /www && httpd -p 9090 -h /www");
    let (body, ok) = in_ns(
        &client,
        &[
            "timeout",
            "5",
            "wget",
            "-qO-",
            &format!("http://{pub_a}:8080/"),
        ],
    );
    assert!(ok && body.contains("yukumo-neta"), "allowed port: {body}");
    let (_, ok) = in_ns(
        &client,
        &[
            "timeout",
            "4",
            "wget",
            "-qO-",
            &format!("http://{pub_a}:9090/"),
        ],
    );
    assert!(!ok, "a port the firewall does not open is closed");
    println!("DNAT: {pub_a}:8080 reached the frontend, :9090 was dropped");

    // Anti-spoofing: a changed MAC, a neighbour's IP, a forged ARP reply.
    let (_, rc) = aw.sh(&format!(
        "ip link set eth0 address 02:de:ad:be:ef:01; ping -c 2 -W 2 {} >/dev/null; r=$?; ip link set eth0 address {}; exit_code=$r; [ $r -ne 0 ]",
        afe.ip, aw.mac
    ));
    assert_eq!(rc, 0, "a changed MAC must not get through");
    let (_, rc) = aw.sh(&format!(
        "ip addr add 10.0.0.250/32 dev eth0; ping -c 2 -W 2 -I 10.0.0.250 {} >/dev/null; r=$?; ip addr del 10.0.0.250/32 dev eth0; [ $r -ne 0 ]",
        afe.ip
    ));
    assert_eq!(rc, 0, "another IP must not get through");
    aw.sh(&format!(
        "arping -U -c 3 -s {} -I eth0 10.0.0.1 >/dev/null 2>&1; true",
        afe.ip
    ));
    let router_ns = format!(
        "{}-r{}",
        env.host_netns(ng_status(&env, "neta")["router"]["host"].as_str().unwrap()),
        ng_status(&env, "neta")["segment"]["id"]
    );
    let (neigh, _) = in_ns(&router_ns, &["ip", "neigh", "show", &afe.ip]);
    assert!(
        !neigh.contains(&aw.mac),
        "the router learnt a forged ARP reply: {neigh}"
    );
    assert!(aw.pings(&afe.ip), "the spoofer's own traffic still works");
    assert!(afe.pings("10.0.0.1"), "the victim keeps working");
    println!("anti-spoofing: changed MAC, foreign IP and forged ARP were dropped; victim fine");

    // A rogue DHCP server, 802.1Q-tagged frames and IPv6 from the worker:
    // seen leaving the attacker (its tap, on its host), never reaching the
    // victim (the frontend's tap, on the other host).
    let (att_tap, vic_tap) = (tap_name(&aw.uid), tap_name(&afe.uid));
    let att = Sniffer::start(&env.host_netns(&aw.host), &att_tap, 30);
    let vic = Sniffer::start(&env.host_netns(&afe.host), &vic_tap, 30);
    aw.sh(concat!(
        "printf 'start 10.0.0.200\\nend 10.0.0.210\\ninterface eth0\\nlease_file /tmp/rogue.leases\\n",
        "option subnet 255.255.255.0\\noption router 10.0.0.66\\n' > /tmp/rogue.conf; ",
        "touch /tmp/rogue.leases; udhcpd /tmp/rogue.conf"
    ));
    let (offers, _) = afe.sh(concat!(
        "printf '#!/bin/sh\\n[ \"$1\" = bound ] && echo offer server=$serverid ip=$ip router=$router\\n' > /tmp/rec; ",
        "chmod +x /tmp/rec; for i in 1 2 3; do udhcpc -i eth0 -n -q -t 3 -T 1 -s /tmp/rec 2>/dev/null; done"
    ));
    aw.sh(concat!(
        "vconfig add eth0 5 >/dev/null; ip addr add 10.0.5.2/24 dev eth0.5; ip link set eth0.5 up; ",
        "ping -c 3 -W 1 10.0.5.3 >/dev/null; ping6 -c 3 -I eth0 ff02::1 >/dev/null; ",
        "vconfig rem eth0.5 >/dev/null; kill $(pidof udhcpd); true"
    ));
    // A crafted IPv6 router advertisement (rawsend: the frame as given),
    // offering 2001:db8:bad::/64 and itself as the default router.
    let ra = router_advertisement(&aw.mac, [0x2001, 0xdb8, 0xbad, 0]);
    let (out, rc) = aw.sh(&format!("rawsend eth0 {ra} 3"));
    assert_eq!(rc, 0, "rawsend: {out}");
    // Unicast to a MAC no bridge knows (from the worker's own MAC and IP, so
    // the guard lets it out): flooded across the segment, but never to a
    // guest's port.
    let unknown = "02:00:00:99:99:99";
    let frame = udp_frame(
        unknown,
        &aw.mac,
        aw.ip.parse().unwrap(),
        afe.ip.parse().unwrap(),
        9,
    );
    let (out, rc) = aw.sh(&format!("rawsend eth0 {frame} 3"));
    assert_eq!(rc, 0, "rawsend: {out}");
    let (att, vic) = (att.frames(), vic.frames());
    let rogue_dhcp = |f: &Value| f["src"] == aw.mac.as_str() && f["sport"] == 67;
    let tagged = |f: &Value| f["src"] == aw.mac.as_str() && !f["vlan"].is_null();
    let ipv6 = |f: &Value| f["src"] == aw.mac.as_str() && f["type"] == 0x86dd;
    let router_adv = |f: &Value| ipv6(f) && f["icmp6_type"] == 134;
    let unknown_unicast = |f: &Value| f["src"] == aw.mac.as_str() && f["dst"] == unknown;
    for (what, is) in [
        ("rogue DHCP replies", &rogue_dhcp as &dyn Fn(&Value) -> bool),
        ("802.1Q-tagged frames", &tagged),
        ("IPv6 frames", &ipv6),
        ("IPv6 router advertisements", &router_adv),
        ("frames to an unknown MAC", &unknown_unicast),
    ] {
        let sent = att.iter().filter(|f| f["dir"] == "rx" && is(f)).count();
        let leaked = vic.iter().filter(|f| is(f)).count();
        assert!(sent > 0, "the attacker sent no {what}: {att:?}");
        assert_eq!(leaked, 0, "{what} reached the victim: {vic:?}");
        println!("anti-spoofing: {sent} {what} left the attacker, 0 reached the victim");
    }
    let offers: Vec<&str> = offers.lines().filter(|l| l.starts_with("offer")).collect();
    assert_eq!(offers.len(), 3, "the victim got 3 leases: {offers:?}");
    for o in &offers {
        assert!(
            o.contains("server=10.0.0.1 ") && o.contains(&format!("ip={} ", afe.ip)),
            "every lease came from the group's router: {o}"
        );
    }
    assert!(afe.pings("10.0.0.1"), "the victim keeps working");
    println!("rogue DHCP: the victim's 3 leases all came from 10.0.0.1 with its own address");
    // Its addresses, and any IPv6 default route via eth0 (::/0 in the
    // kernel's route table).
    let (v6, _) = afe.sh(concat!(
        "ip -6 addr show dev eth0; ",
        "awk '$1==\"00000000000000000000000000000000\" && $2==\"00\" && $10==\"eth0\" {print \"default-route\"}' /proc/net/ipv6_route"
    ));
    assert!(
        !v6.contains("2001:db8:bad") && !v6.contains("default-route"),
        "the victim took the rogue advertisement: {v6}"
    );
    println!("rogue RA: the victim has no address in 2001:db8:bad::/64 and no IPv6 default route");

    // Zero loss while every agent and the controller are killed -9 and
    // restarted: a guest-to-guest ping and an outside-to-public-IP ping.
    aw.sh(&format!(
        "(ping -c 100 -i 0.1 {} > /tmp/ping.out 2>&1 &)",
        afe.ip
    ));
    let outside_ping = Command::new("ip")
        .args([
            "netns", "exec", &client, "busybox", "ping", "-c", "100", "-i", "0.1", &pub_a,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut procs = vec!["controller-1".to_string()];
    for h in env.hosts() {
        procs.push(format!("agent-{h}"));
    }
    for name in &procs {
        if let Some(pid) = env.pid(name) {
            yukumo_e2e::signal(pid, "KILL");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    env.env_sh(&["start-controller", "1"]).unwrap();
    for h in env.hosts() {
        env.env_sh(&["start-agent", &h]).unwrap();
    }
    let out = outside_ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("100 packets received"),
        "outside -> public IP lost packets: {text}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (guest_ping, _) = aw.sh("cat /tmp/ping.out | tail -n 3");
    assert!(
        guest_ping.contains("100 packets received"),
        "guest -> guest lost packets: {guest_ping}"
    );
    println!(
        "kill -9 of the controller and every agent: 0/100 lost outside->public IP, 0/100 lost guest->guest"
    );

    // Repair of hand-made damage, each within 5 s.
    let hns = env.host_netns(&aw.host);
    let seg = ng_status(&env, "neta")["segment"]["id"].as_u64().unwrap();
    assert!(
        in_ns(&hns, &["nft", "flush", "ruleset"]).1,
        "flushed the host"
    );
    wait_repaired("nft flush ruleset on a host", || {
        let (t, ok) = in_ns(&hns, &["nft", "list", "table", "bridge", "yukumo"]);
        ok && t.contains(&aw.mac)
    });
    assert!(
        in_ns(&hns, &["ip", "link", "del", &format!("ykbr{seg}")]).1,
        "deleted the bridge"
    );
    wait_repaired("a deleted bridge", || {
        in_ns(&hns, &["ip", "link", "show", &format!("ykbr{seg}")]).1
            && in_ns(
                &hns,
                &[
                    "sh",
                    "-c",
                    &format!("ip -o link show master ykbr{seg} | grep -q ykt"),
                ],
            )
            .1
    });
    assert!(
        aw.pings(&afe.ip),
        "traffic flows again after the bridge was rebuilt"
    );
    assert!(
        in_ns(&router_ns, &["nft", "flush", "ruleset"]).1,
        "flushed the router"
    );
    wait_repaired("nft flush ruleset in a router namespace", || {
        let (t, ok) = in_ns(&router_ns, &["nft", "list", "table", "ip", "yukumo"]);
        ok && t.contains(&pub_a)
    });
    assert!(
        Command::new("ip")
            .args(["netns", "del", &router_ns])
            .status()
            .unwrap()
            .success(),
        "deleted the router namespace"
    );
    // The agent recreates the namespace (the old one lives on only while
    // its DHCP server holds it; the agent stops that server) and traffic to
    // the public IP flows through the new one.
    wait_repaired("a deleted router namespace", || {
        std::path::Path::new(&format!("/run/netns/{router_ns}")).exists()
            && in_ns(&router_ns, &["nft", "list", "table", "ip", "yukumo"])
                .0
                .contains(&pub_a)
            && in_ns(
                &client,
                &[
                    "timeout",
                    "2",
                    "wget",
                    "-qO-",
                    &format!("http://{pub_a}:8080/"),
                ],
            )
            .1
    });

    // Stop and start: the same nodes come back with the same addresses,
    // by DHCP in the new boot.
    let before = guests(&env, "neta");
    let boots: BTreeMap<String, (usize, usize)> = before
        .iter()
        .map(|(name, g)| {
            let c = console(&env, g);
            let line = format!("YUKUMO-GUEST dhcp={}/24", g.ip);
            (
                name.clone(),
                (
                    c.matches(&line).count(),
                    c.matches("YUKUMO-GUEST ready").count(),
                ),
            )
        })
        .collect();
    set_running(&env, "neta", false);
    wait_for(Duration::from_secs(90), "neta stopped", || {
        let vc = env.get_json(&["-n", "neta", "get", "vc", "c"]);
        match condition(&vc, "Ready") {
            Some((status, reason, _)) if status == "True" && reason == "Stopped" => Ok(()),
            c => Err(format!("{c:?}")),
        }
    })
    .unwrap();
    set_running(&env, "neta", true);
    for (name, g) in &before {
        // The console log is appended across boots: the new boot's DHCP
        // line is one more.
        let line = format!("YUKUMO-GUEST dhcp={}/24", g.ip);
        let (_, took) = wait_for(
            Duration::from_secs(180),
            &format!("{name} booted again with its address"),
            || {
                let c = console(&env, g);
                let (dhcp, ready) = (
                    c.matches(&line).count(),
                    c.matches("YUKUMO-GUEST ready").count(),
                );
                if dhcp > boots[name].0 && ready > boots[name].1 {
                    Ok(())
                } else {
                    Err(format!("{dhcp} DHCP lines, {ready} boots"))
                }
            },
        )
        .unwrap();
        println!(
            "stop/start: {name} booted again on {} and got {} by DHCP ({:.1}s after start)",
            g.host,
            g.ip,
            took.as_secs_f64()
        );
    }
    let after = guests(&env, "neta");
    for (name, g) in &before {
        assert_eq!(after[name].uid, g.uid, "{name} is the same VirtualNode");
        assert_eq!(
            (&after[name].ip, &after[name].mac),
            (&g.ip, &g.mac),
            "{name} kept its address across stop/start"
        );
    }

    // Recreated under the same name: new VirtualNodes, the same addresses
    // and MACs, delivered by DHCP.
    env.kubectl_ok(&["-n", "neta", "delete", "vc", "c", "--wait=true"])
        .unwrap();
    wait_for(Duration::from_secs(120), "neta's old nodes gone", || {
        let n = guests(&env, "neta").len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} nodes left"))
        }
    })
    .unwrap();
    env.apply(&tenant("neta"));
    let again = wait_dhcp(&env, "neta");
    for (name, g) in &before {
        assert_ne!(again[name].uid, g.uid, "{name} is a new VirtualNode");
        assert_eq!(
            (&again[name].ip, &again[name].mac),
            (&g.ip, &g.mac),
            "{name} kept its address across recreation"
        );
    }
    println!("recreated cluster: both nodes got their old IP and MAC again, by DHCP");

    // Deleting everything leaves no yukumo link, table, namespace, lease
    // file or DHCP server on any host.
    env.kubectl_ok(&["delete", "namespace", "neta", "netb", "--wait=false"])
        .unwrap();
    let hosts = env.hosts();
    let (_, took) = wait_for(
        Duration::from_secs(120),
        "nothing left on the hosts",
        || {
            for h in &hosts {
                let hns = env.host_netns(h);
                let (links, _) = in_ns(&hns, &["ip", "-o", "link", "show"]);
                if let Some(l) = links.lines().find(|l| l.contains(": yk")) {
                    return Err(format!("{h}: link {l}"));
                }
                let (tables, _) = in_ns(&hns, &["nft", "list", "tables"]);
                if tables.contains("yukumo") {
                    return Err(format!("{h}: {tables}"));
                }
                let router_prefix = format!("{hns}-r");
                if let Some(n) = std::fs::read_dir("/run/netns")
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with(&router_prefix))
                {
                    return Err(format!("{h}: router namespace {n}"));
                }
                let net_dir = env.dir.join(format!("hosts/{h}/agent/net"));
                if let Ok(rd) = std::fs::read_dir(&net_dir)
                    && let Some(e) = rd.flatten().next()
                {
                    return Err(format!("{h}: {} left", e.path().display()));
                }
            }
            Ok(())
        },
    )
    .unwrap();
    println!(
        "teardown: no yukumo link, table, router namespace or lease file left, {took:?} after the namespaces were deleted"
    );
}

fn set_running(env: &Env, ns: &str, running: bool) {
    env.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "vc",
        "c",
        "--type",
        "merge",
        "-p",
        &format!("{{\"spec\":{{\"running\":{running}}}}}"),
    ])
    .unwrap();
}

/// A router host is lost (its agent killed, its external and underlay
/// links down): the group's router moves to another gateway host, egress
/// and DNAT work again through it, and when the host returns its stale
/// router namespace is removed.
#[test]
fn a_router_moves_when_its_host_is_lost() {
    let env = Env::get();
    let grace: u64 = 6;
    env.set_site_grace(grace);
    let p = env.netns_prefix();
    let client = format!("{p}-client");
    // Both nodes get a public IP (the worker's by `spec.publicIPs`) and
    // answer pings from outside, so DNAT can be shown through the new router
    // to whichever node is not on the lost host.
    let yaml = tenant("netmove").replace(
        "  - {protocol: icmp}\n",
        "  - {protocol: icmp, to: All}\n  publicIPs:\n  - {node: c-w-0}\n",
    );
    assert!(yaml.contains("publicIPs:\n  - {node: c-w-0}"), "{yaml}");
    env.apply(&yaml);
    let gs = wait_dhcp(&env, "netmove");
    let st = ng_status(&env, "netmove");
    let seg = st["segment"]["id"].as_u64().unwrap();
    let lost = st["router"]["host"].as_str().unwrap().to_string();
    // A guest that is not on the router's host probes egress, and is
    // probed through its public IP.
    let (probe_name, probe) = gs
        .iter()
        .find(|(_, g)| g.host != lost)
        .map(|(n, g)| (n.clone(), g.clone()))
        .expect("a guest off the router's host");
    let pub_ip = st["publicIPs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == probe_name.as_str())
        .and_then(|p| p["address"].as_str())
        .unwrap_or_else(|| panic!("no public IP for {probe_name}: {st}"))
        .to_string();
    assert!(probe.pings("203.0.113.1"), "egress before the loss");
    assert!(
        in_ns(&client, &["busybox", "ping", "-c", "1", "-W", "2", &pub_ip]).1,
        "DNAT to {probe_name} before the loss"
    );

    let lost_ns = env.host_netns(&lost);
    env.env_sh(&["stop", &format!("agent-{lost}"), "--signal", "KILL"])
        .unwrap();
    for l in ["ext0", "ul0"] {
        assert!(in_ns(&lost_ns, &["ip", "link", "set", l, "down"]).1);
    }
    let start = Instant::now();
    let (moved_to, took) = wait_for(
        Duration::from_secs(grace + 60),
        "the router on another host",
        || {
            let h = ng_status(&env, "netmove")["router"]["host"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !h.is_empty() && h != lost {
                Ok(h)
            } else {
                Err(h)
            }
        },
    )
    .unwrap();
    println!(
        "router moved from {lost} to {moved_to} {:.1}s after the host was lost (grace {grace}s)",
        took.as_secs_f64()
    );
    wait_for(
        Duration::from_secs(60),
        "egress through the new router",
        || {
            if probe.sh("ping -c 1 -W 1 203.0.113.1 >/dev/null").1 == 0 {
                Ok(())
            } else {
                Err("no reply".into())
            }
        },
    )
    .unwrap();
    println!(
        "egress from {} ({}) works again {:.1}s after the loss",
        probe.ip,
        probe.host,
        start.elapsed().as_secs_f64()
    );
    let (_, took) = wait_for(
        Duration::from_secs(30),
        "DNAT through the new router",
        || {
            if in_ns(&client, &["busybox", "ping", "-c", "1", "-W", "1", &pub_ip]).1 {
                Ok(())
            } else {
                Err("no reply".into())
            }
        },
    )
    .unwrap();
    println!(
        "the outside reaches {pub_ip} ({probe_name} on {}) through the new router ({:.1}s more)",
        probe.host,
        took.as_secs_f64()
    );

    // The host returns: its agent removes the router it no longer runs.
    for l in ["ext0", "ul0"] {
        assert!(in_ns(&lost_ns, &["ip", "link", "set", l, "up"]).1);
    }
    env.env_sh(&["start-agent", &lost]).unwrap();
    let stale = format!("/run/netns/{lost_ns}-r{seg}");
    let (_, took) = wait_for(Duration::from_secs(60), "the stale router removed", || {
        if std::path::Path::new(&stale).exists() {
            Err(stale.clone())
        } else {
            Ok(())
        }
    })
    .unwrap();
    println!(
        "{lost} returned: its stale router namespace was removed after {:.1}s",
        took.as_secs_f64()
    );
    assert!(probe.pings("203.0.113.1"), "egress still works");
    env.set_site_grace(20);
    env.kubectl_ok(&["delete", "namespace", "netmove", "--wait=false"])
        .unwrap();
    wait_for(Duration::from_secs(30), "the lost host Ready again", || {
        let h = env.get_json(&["get", "host", &lost]);
        match condition(&h, "Ready") {
            Some((s, _, _)) if s == "True" => Ok(()),
            c => Err(format!("{c:?}")),
        }
    })
    .unwrap();
}

#[test]
fn bad_network_specs_get_a_condition_and_an_event() {
    let env = Env::get();
    let (path, sum) = tiny_image();
    env.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: badnet}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: one, namespace: badnet}}
spec: {{cidr: 10.1.0.0/24, segment: {{type: vxlan}}, homeSite: local, publicIPs: [{{address: 203.0.113.100, node: x-frontend}}]}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: small, namespace: badnet}}
spec: {{cidr: 10.2.0.0/29, segment: {{type: vxlan}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: vlan, namespace: badnet}}
spec: {{cidr: 10.3.0.0/24, segment: {{type: vlan}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: far, namespace: badnet}}
spec: {{cidr: 10.4.0.0/24, segment: {{type: vxlan, id: 9999}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: x, namespace: badnet}}
spec:
  networkGroup: one
  running: false
  frontend: {{size: {{cpu: 1, memory: 128Mi}}, image: {{url: 'file://{path}', checksum: '{sum}'}}}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: big, namespace: badnet}}
spec:
  networkGroup: small
  running: false
  frontend: {{size: {{cpu: 1, memory: 128Mi}}, image: {{url: 'file://{path}', checksum: '{sum}'}}}}
  pools: [{{name: w, replicas: 6, size: {{cpu: 1, memory: 128Mi}}}}]
"#
    ));
    let reason_of = |name: &str| {
        let v: Value = env.get_json(&["-n", "badnet", "get", "ng", name]);
        let (_, r, m) = condition(&v, "Ready").unwrap_or_default();
        (r, m)
    };
    for (name, want, text) in [
        (
            "small",
            "AddressesExhausted",
            "spec.cidr: 10.2.0.0/29 has 5 addresses",
        ),
        (
            "vlan",
            "NoCapableHost",
            "spec.segment.type: vlan needs hosts",
        ),
        (
            "far",
            "SegmentOutOfRange",
            "spec.segment.id: 9999 is outside",
        ),
    ] {
        let (msg, took) = wait_for(Duration::from_secs(30), &format!("{name}: {want}"), || {
            let (r, m) = reason_of(name);
            if r == want {
                Ok(m)
            } else {
                Err(format!("{r}: {m}"))
            }
        })
        .unwrap();
        assert!(msg.contains(text), "{name}: {msg}");
        println!("{name}: {want} after {took:?}: {msg}");
    }
    // Overlapping public IPs: a second group asks for the address the first holds.
    wait_for(Duration::from_secs(30), "one holds 203.0.113.100", || {
        let s = env.get_json(&["-n", "badnet", "get", "ng", "one"])["status"].clone();
        if s.to_string().contains("203.0.113.100") {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .unwrap();
    env.apply(
        "apiVersion: yukumo.io/v1alpha1\nkind: NetworkGroup\nmetadata: {name: two, namespace: badnet}\nspec: {cidr: 10.5.0.0/24, segment: {type: vxlan}, homeSite: local, publicIPs: [{address: 203.0.113.100, node: vc-two-frontend}]}\n---\napiVersion: yukumo.io/v1alpha1\nkind: VirtualCluster\nmetadata: {name: vc-two, namespace: badnet}\nspec:\n  networkGroup: two\n  running: false\n  frontend: {size: {cpu: 1, memory: 128Mi}, image: {url: 'file:///nonexistent', checksum: 'sha256:0000000000000000000000000000000000000000000000000000000000000000'}}\n",
    );
    let (msg, _) = wait_for(Duration::from_secs(30), "two: PublicIPConflict", || {
        let (r, m) = reason_of("two");
        if r == "PublicIPConflict" {
            Ok(m)
        } else {
            Err(format!("{r}: {m}"))
        }
    })
    .unwrap();
    assert!(
        msg.contains("203.0.113.100 is already used by NetworkGroup badnet/one"),
        "{msg}"
    );
    println!("two: PublicIPConflict: {msg}");
    wait_for(Duration::from_secs(15), "Events for each", || {
        let ev = env
            .kubectl_ok(&["-n", "badnet", "get", "events", "-o", "json"])
            .unwrap();
        let missing: Vec<&str> = [
            "AddressesExhausted",
            "NoCapableHost",
            "SegmentOutOfRange",
            "PublicIPConflict",
        ]
        .into_iter()
        .filter(|r| !ev.contains(r))
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?}"))
        }
    })
    .unwrap();
    env.kubectl_ok(&["delete", "namespace", "badnet", "--wait=false"])
        .unwrap();
}

/// A second Site, `far`, with two hosts on an underlay of their own, and
/// both Sites' WAN endpoints on the WAN namespace (100.64.0.0/24); removed
/// with the tenant, its Hosts, a stranger on the WAN and the Sites' WAN
/// settings when dropped, also when the test fails.
struct FarSite<'a> {
    env: &'a Env,
    ns: &'static str,
    hosts: Vec<&'static str>,
    /// The Sites it made (deleted), besides `local` (its WAN settings
    /// removed).
    sites: Vec<&'static str>,
    stranger: String,
}

impl<'a> FarSite<'a> {
    /// The Sites `sites` (name, spec) made, `local`'s WAN endpoint
    /// 100.64.0.101, and the hosts (name, Site, index) started and Ready.
    fn up(
        env: &'a Env,
        ns: &'static str,
        sites: &[(&'static str, &str)],
        hosts: &[(&'static str, &str, &str)],
    ) -> FarSite<'a> {
        let lab = FarSite {
            env,
            ns,
            hosts: hosts.iter().map(|h| h.0).collect(),
            sites: sites.iter().map(|s| s.0).collect(),
            stranger: format!("{}-stranger", env.netns_prefix()),
        };
        let yaml: Vec<String> = sites
            .iter()
            .map(|(name, spec)| {
                format!("apiVersion: yukumo.io/v1alpha1\nkind: Site\nmetadata: {{name: {name}}}\nspec: {spec}\n")
            })
            .collect();
        env.apply(&yaml.join("---\n"));
        env.kubectl_ok(&[
            "patch",
            "site",
            "local",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"gateway":{"wanEndpoint":"100.64.0.101"}}}"#,
        ])
        .unwrap();
        let started = Instant::now();
        for (h, site, i) in hosts {
            env.env_sh(&["start-site-host", h, site, i]).unwrap();
        }
        let names: Vec<String> = hosts.iter().map(|h| format!("host/{}", h.0)).collect();
        let mut wait = vec!["wait", "--for", "condition=Ready", "--timeout", "90s"];
        wait.extend(names.iter().map(String::as_str));
        env.kubectl_ok(&wait).unwrap();
        println!("{names:?} Ready {:?} after start", started.elapsed());
        lab
    }
}

impl Drop for FarSite<'_> {
    fn drop(&mut self) {
        let env = self.env;
        let _ = env.kubectl(&[
            "delete",
            "namespace",
            self.ns,
            "--wait=true",
            "--timeout=120s",
        ]);
        for h in &self.hosts {
            if let Err(e) = env.env_sh(&["stop-site-host", h]) {
                eprintln!("{e}");
            }
            let _ = env.kubectl(&["delete", "host", h, "--ignore-not-found", "--timeout=60s"]);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.stranger])
            .stderr(std::process::Stdio::null())
            .status();
        for s in &self.sites {
            let _ = env.kubectl(&["delete", "site", s, "--ignore-not-found"]);
        }
        for field in ["gateway", "tunnel"] {
            let _ = env.kubectl(&[
                "patch",
                "site",
                "local",
                "--type",
                "json",
                "-p",
                &format!(r#"[{{"op":"remove","path":"/spec/{field}"}}]"#),
            ]);
        }
    }
}

/// VXLAN (VNI `vni`) around a broadcast UDP frame from `src_mac`, as hex.
fn vxlan_broadcast(vni: u64, src_mac: &str) -> String {
    let inner = udp_frame(
        "ff:ff:ff:ff:ff:ff",
        src_mac,
        "10.0.0.200".parse().unwrap(),
        "10.0.0.255".parse().unwrap(),
        9,
    );
    format!("08000000{:06x}00{inner}", vni)
}

/// Send `hex` as one UDP datagram from `src` (an address of namespace
/// `ns`) to `dst:port`.
fn send_udp(ns: &str, src: &str, dst: &str, port: u16, hex: &str) {
    let (out, ok) = in_ns(
        ns,
        &[
            "python3",
            "-c",
            &format!(
                "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('{src}',0));s.sendto(bytes.fromhex('{hex}'),('{dst}',{port}))"
            ),
        ],
    );
    assert!(ok, "send from {src} in {ns}: {out}");
}

#[test]
fn a_group_across_two_sites_is_one_segment_through_their_gateways_filtered_tunnel() {
    let env = Env::get();
    let p = env.netns_prefix();
    let ns = "sites";
    let far = FarSite::up(
        &env,
        ns,
        &[(
            "far",
            "{vniRange: {start: 1000, end: 1999}, gateway: {wanEndpoint: 100.64.0.102}}",
        )],
        &[("far-1", "far", "31"), ("far-2", "far", "32")],
    );
    // Each Site's endpoint is held by its first gateway host, on its WAN
    // interface, and the Site says so.
    for (site, holder, endpoint) in [
        ("local", "host-1", "100.64.0.101"),
        ("far", "far-1", "100.64.0.102"),
    ] {
        let (_, took) = wait_for(
            Duration::from_secs(60),
            &format!("{site}'s gateway"),
            || {
                let s = env.get_json(&["get", "site", site]);
                let c = condition(&s, "WanTunnels").unwrap_or_default();
                let held = in_ns(
                    &env.host_netns(holder),
                    &["ip", "-4", "-o", "addr", "show", "wan0"],
                )
                .0;
                if s["status"]["activeGateway"] == holder
                    && c.1 == "GatewayActive"
                    && held.contains(&format!("{endpoint}/32"))
                {
                    Ok(())
                } else {
                    Err(format!("{} {c:?} {held}", s["status"]["activeGateway"]))
                }
            },
        )
        .unwrap();
        println!("{site}: {holder} holds {endpoint} ({took:?})");
    }
    let (path, sum) = tiny_image();
    env.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec:
  cidr: 10.0.0.0/24
  segment: {{type: vxlan}}
  homeSite: local
  sites: [far]
  firewall:
  - {{protocol: icmp}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: c, namespace: {ns}}}
spec:
  networkGroup: net
  frontend:
    site: local
    size: {{cpu: 1, memory: 128Mi}}
    image: {{url: 'file://{path}', checksum: '{sum}'}}
  pools:
  - {{name: w, replicas: 1, sites: [far], size: {{cpu: 1, memory: 128Mi}}}}
"#
    ));
    // The worker at far got its address by DHCP from the home router,
    // through the tunnel.
    let g = wait_dhcp(&env, ns);
    let (fe, w) = (&g["c-frontend"], &g["c-w-0"]);
    assert!(fe.host.starts_with("host-"), "frontend on {}", fe.host);
    assert!(w.host.starts_with("far-"), "worker on {}", w.host);
    let st = ng_status(&env, ns);
    let vni = st["segment"]["id"].as_u64().unwrap();
    let ends: Vec<String> = st["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{} {}:{}",
                t["site"].as_str().unwrap(),
                t["address"].as_str().unwrap(),
                t["port"]
            )
        })
        .collect();
    assert_eq!(
        ends,
        vec!["local 100.64.0.101:4790", "far 100.64.0.102:4790"]
    );
    assert_eq!(st["mtu"], 1450);
    // One segment: both ways, and the router from the far Site.
    let started = Instant::now();
    assert!(fe.pings(&w.ip), "frontend → far worker");
    assert!(w.pings(&fe.ip), "far worker → frontend");
    assert!(w.pings("10.0.0.1"), "far worker → home router");
    println!("pings across the Sites took {:?}", started.elapsed());
    // It crossed the WAN, through far-1's WAN port; far-2 floods only
    // within its Site (to far-1), never to the other Site's hosts.
    let stats = in_ns(
        &env.host_netns("far-1"),
        &["ip", "-s", "-j", "link", "show", &format!("ykw{vni}")],
    )
    .0;
    let v: Value = serde_json::from_str(&stats).unwrap_or_else(|e| panic!("{e}: {stats}"));
    let (rx, tx) = (
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap(),
        v[0]["stats64"]["tx"]["packets"].as_u64().unwrap(),
    );
    println!("far-1's WAN port ykw{vni}: {rx} packets in, {tx} out");
    assert!(rx > 0 && tx > 0);
    // Tunnel status: each Site's endpoint holder measures its tunnel (RTT,
    // bytes each way) into the Site's status.
    let peer = |site: &str| -> Value {
        let s = env.get_json(&["get", "site", site]);
        s["status"]["peers"]
            .as_array()
            .and_then(|p| p.first().cloned())
            .unwrap_or_default()
    };
    for (site, other) in [("local", "far"), ("far", "local")] {
        let (p, took) = wait_for(
            Duration::from_secs(60),
            &format!("{site}'s tunnel status"),
            || {
                let p = peer(site);
                let c = condition(&env.get_json(&["get", "site", site]), "TunnelsReady")
                    .unwrap_or_default();
                if p["site"] == other
                    && p["state"] == "Up"
                    && p["rttMs"].as_f64().is_some()
                    && p["rxBytes"].as_u64().unwrap_or(0) > 0
                    && p["txBytes"].as_u64().unwrap_or(0) > 0
                    && c.1 == "TunnelsUp"
                {
                    Ok(p)
                } else {
                    Err(format!("{p} {c:?}"))
                }
            },
        )
        .unwrap();
        println!(
            "{site} → {other}: Up, RTT {} ms, {} bytes in, {} out, via {} ({took:?})",
            p["rttMs"], p["rxBytes"], p["txBytes"], p["via"]
        );
    }
    // The WAN cut between them: Down, a condition and a Warning; back: Up.
    let wan_ns = format!("{p}-wan");
    let cut = |up: &str| {
        let (out, ok) = in_ns(&wan_ns, &["ip", "link", "set", "h31", up]);
        assert!(ok, "{out}");
    };
    cut("down");
    let down = wait_for(Duration::from_secs(60), "the tunnel seen down", || {
        let s = env.get_json(&["get", "site", "local"]);
        let c = condition(&s, "TunnelsReady").unwrap_or_default();
        if peer("local")["state"] == "Down" && c.1 == "TunnelDown" {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    });
    cut("up");
    let (_, took) = down.unwrap();
    println!("the WAN to far cut: local's tunnel Down after {took:?}");
    let ev = env
        .kubectl_ok(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            "involvedObject.kind=Site,involvedObject.name=local,reason=TunnelDown",
            "-o",
            "json",
        ])
        .unwrap();
    assert!(ev.contains("\"Warning\""), "{ev}");
    let (_, took) = wait_for(Duration::from_secs(60), "the tunnel back up", || {
        if peer("local")["state"] == "Up" {
            Ok(())
        } else {
            Err(peer("local").to_string())
        }
    })
    .unwrap();
    println!("the WAN back: Up after {took:?}");
    // Both Sites cap their tunnels: each gateway shapes the pair at the
    // smaller cap.
    let cap = |site: &str, mbps: u32| {
        env.kubectl_ok(&[
            "patch",
            "site",
            site,
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"tunnel":{{"bandwidthMbps":{mbps}}}}}}}"#),
        ])
        .unwrap()
    };
    cap("local", 300);
    cap("far", 100);
    for holder in ["host-1", "far-1"] {
        let (_, took) = wait_for(
            Duration::from_secs(30),
            &format!("{holder}'s shaper"),
            || {
                let c = in_ns(
                    &env.host_netns(holder),
                    &["tc", "class", "show", "dev", "wan0"],
                )
                .0;
                if c.contains("class htb 796b:1 ") && c.contains("rate 100Mbit") {
                    Ok(())
                } else {
                    Err(c)
                }
            },
        )
        .unwrap();
        println!("{holder} caps its tunnel at 100 Mbit/s ({took:?} after the Sites' caps)");
    }
    assert!(w.pings(&fe.ip), "far worker → frontend, capped");
    if w.host == "far-2" {
        let fdb = in_ns(
            &env.host_netns("far-2"),
            &["bridge", "fdb", "show", "dev", &format!("ykvx{vni}")],
        )
        .0;
        assert!(fdb.contains("dst 10.255.0.31 "), "{fdb}");
        assert!(
            !fdb.contains("dst 10.255.0.1 ") && !fdb.contains("dst 10.255.0.2 "),
            "{fdb}"
        );
    }
    // Only peer gateways may inject: the same VXLAN packet, sent to the
    // home endpoint from a stranger on the WAN, is dropped (counted by the
    // gateway's filter); from the peer gateway's address it arrives.
    let stranger = &far.stranger;
    for cmd in [
        vec!["ip", "netns", "add", stranger.as_str()],
        vec![
            "ip",
            "-n",
            &format!("{p}-wan"),
            "link",
            "add",
            "hx250",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            stranger.as_str(),
        ],
        vec![
            "ip",
            "-n",
            &format!("{p}-wan"),
            "link",
            "set",
            "hx250",
            "master",
            "br0",
            "up",
        ],
        vec![
            "ip",
            "-n",
            stranger.as_str(),
            "addr",
            "add",
            "100.64.0.250/24",
            "dev",
            "eth0",
        ],
        vec!["ip", "-n", stranger.as_str(), "link", "set", "eth0", "up"],
    ] {
        let st = Command::new(cmd[0]).args(&cmd[1..]).status().unwrap();
        assert!(st.success(), "{cmd:?}");
    }
    let home = env.host_netns("host-1");
    let fe_ns = env.host_netns(&fe.host);
    let sniffer = Sniffer::start(&fe_ns, &tap_name(&fe.uid), 8);
    for _ in 0..3 {
        send_udp(
            stranger,
            "100.64.0.250",
            "100.64.0.101",
            4790,
            &vxlan_broadcast(vni, "02:de:ad:be:ef:01"),
        );
    }
    send_udp(
        &env.host_netns("far-1"),
        "100.64.0.102",
        "100.64.0.101",
        4790,
        &vxlan_broadcast(vni, "02:de:ad:be:ef:02"),
    );
    let frames = sniffer.frames();
    let from = |mac: &str| frames.iter().filter(|f| f["src"] == mac).count();
    println!(
        "frontend's tap: {} frames from the stranger, {} from the peer gateway",
        from("02:de:ad:be:ef:01"),
        from("02:de:ad:be:ef:02")
    );
    assert_eq!(
        from("02:de:ad:be:ef:01"),
        0,
        "a stranger's tunnel packet got through"
    );
    assert!(
        from("02:de:ad:be:ef:02") >= 1,
        "the peer's tunnel packet did not arrive"
    );
    let table = in_ns(&home, &["nft", "list", "table", "inet", "yukumo"]).0;
    assert!(table.contains("counter packets 3 "), "{table}");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"])
        .unwrap();
    drop(far);
    // Local without WAN settings again: host-1 lets its endpoint, filter
    // and shaper go.
    let (_, took) = wait_for(Duration::from_secs(30), "host-1's WAN end gone", || {
        let ns = env.host_netns("host-1");
        let a = in_ns(&ns, &["ip", "-4", "-o", "addr", "show", "wan0"]).0;
        let q = in_ns(&ns, &["tc", "qdisc", "show", "dev", "wan0"]).0;
        let t = in_ns(&ns, &["nft", "list", "tables"]).0;
        if !a.contains("100.64.0.101") && !q.contains("796b:") && !t.contains("inet yukumo") {
            Ok(())
        } else {
            Err(format!("{a} {q} {t}"))
        }
    })
    .unwrap();
    println!("host-1 let its WAN end go {took:?} after the Site's gateway went");
}

#[test]
fn a_full_mesh_of_three_sites_forwards_nothing_from_one_sites_tunnel_to_anothers() {
    let env = Env::get();
    let p = env.netns_prefix();
    let ns = "mesh";
    let lab = FarSite::up(
        &env,
        ns,
        &[
            ("far", "{gateway: {wanEndpoint: 100.64.0.102}}"),
            ("third", "{gateway: {wanEndpoint: 100.64.0.103}}"),
        ],
        &[("far-1", "far", "31"), ("third-1", "third", "33")],
    );
    // One group across the three Sites, no node: its gateways alone carry
    // its segment (and its router at home).
    env.apply(&format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local, sites: [far, third]}}
"
    ));
    let holders = [
        ("host-1", "100.64.0.101"),
        ("far-1", "100.64.0.102"),
        ("third-1", "100.64.0.103"),
    ];
    let (vni, took) = wait_for(Duration::from_secs(60), "the mesh's WAN ports", || {
        let st = ng_status(&env, ns);
        let vni = st["segment"]["id"].as_u64().ok_or("no segment yet")?;
        for (h, _) in holders {
            let fdb = in_ns(
                &env.host_netns(h),
                &["bridge", "fdb", "show", "dev", &format!("ykw{vni}")],
            )
            .0;
            let peers = holders
                .iter()
                .filter(|(o, a)| *o != h && fdb.contains(&format!("dst {a} ")))
                .count();
            if peers != 2 {
                return Err(format!("{h}: {fdb}"));
            }
        }
        Ok(vni)
    })
    .unwrap();
    println!("three Sites' gateways each flood to the two others ({took:?})");
    // The storm: 300 broadcasts into the group from each of far and third
    // to local's endpoint, and from third to far's. Each is delivered
    // inside the Site it reaches; none may leave it again over the WAN.
    let wan = format!("{p}-wan");
    let sniff: Vec<(String, Sniffer)> = ["h1", "h31", "h33"]
        .iter()
        .map(|port| (port.to_string(), Sniffer::start(&wan, port, 8)))
        .collect();
    let router =
        yukumo_agent::network::plan::router_veth_name(yukumo_api::net::Segment::vxlan(vni as u32));
    let at_router = Sniffer::start(&env.host_netns("host-1"), &router, 8);
    let started = Instant::now();
    for (from, src, to) in [
        ("far-1", "100.64.0.102", "100.64.0.101"),
        ("third-1", "100.64.0.103", "100.64.0.101"),
        ("third-1", "100.64.0.103", "100.64.0.102"),
    ] {
        let hex = vxlan_broadcast(vni, "02:de:ad:be:ef:05");
        let (out, ok) = in_ns(
            &env.host_netns(from),
            &[
                "python3",
                "-c",
                &format!(
                    "import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('{src}',0));m=bytes.fromhex('{hex}')\ns.sendto(m,('{to}',4790));time.sleep(0.3)\nfor _ in range(299): s.sendto(m,('{to}',4790))"
                ),
            ],
        );
        assert!(ok, "{out}");
    }
    println!("900 tunnel broadcasts sent in {:?}", started.elapsed());
    // Each gateway's own per-peer tunnel counters (its filter table):
    // bytes received from and sent to each peer endpoint.
    let counters = |h: &str| {
        yukumo_agent::network::ruleset::tunnel_counters(
            &in_ns(
                &env.host_netns(h),
                &["nft", "list", "table", "inet", "yukumo"],
            )
            .0,
        )
    };
    let ip = |a: &str| -> std::net::Ipv4Addr { a.parse().unwrap() };
    let (local_c, far_c, third_c) = (counters("host-1"), counters("far-1"), counters("third-1"));
    println!(
        "tunnel bytes (received, sent) by peer: host-1 {local_c:?}, far-1 {far_c:?}, third-1 {third_c:?}"
    );
    let delivered = at_router
        .frames()
        .iter()
        .filter(|f| f["src"] == "02:de:ad:be:ef:05")
        .count();
    let mut tunnel_frames = BTreeMap::new();
    for (port, s) in sniff {
        for f in s.frames() {
            // The storm's own frames (what the gateways send of their
            // own, e.g. their bridges' IPv6 multicast, is not counted).
            if f["dport"] == 4790 && f["inner_src"] == "02:de:ad:be:ef:05" {
                *tunnel_frames
                    .entry(format!(
                        "{port} {} -> {}",
                        f["src_ip"].as_str().unwrap_or("?"),
                        f["dst_ip"].as_str().unwrap_or("?")
                    ))
                    .or_insert(0u32) += 1;
            }
        }
    }
    println!(
        "local's router got {delivered} of the 600 broadcasts sent to local; tunnel packets on the WAN: {tunnel_frames:?}"
    );
    assert!(
        delivered >= 300,
        "the broadcasts did not arrive at local ({delivered})"
    );
    // Only what was sent crosses the WAN: out of far's port towards local
    // (300), out of third's towards local and far (600), into local's and
    // far's ports; nothing from local's endpoint, nothing from far's.
    for (k, n) in &tunnel_frames {
        assert!(
            !k.contains("100.64.0.101 ->") && !k.contains("100.64.0.102 -> 100.64.0.103"),
            "forwarded WAN→WAN: {n} × {k}"
        );
    }
    // The storm arrived (each batch is about 30 kB: 300 × ~101 bytes)...
    assert!(
        local_c[&ip("100.64.0.102")].0 >= 28_000,
        "far's storm did not reach local"
    );
    assert!(
        local_c[&ip("100.64.0.103")].0 >= 28_000,
        "third's storm did not reach local"
    );
    assert!(
        far_c[&ip("100.64.0.103")].0 >= 28_000,
        "third's storm did not reach far"
    );
    // ... and went no further: local sent its peers only its own few
    // frames, far sent local its own 300 and third only its own few.
    for peer in ["100.64.0.102", "100.64.0.103"] {
        assert!(
            local_c[&ip(peer)].1 < 15_000,
            "local forwarded the storm to {peer}: {local_c:?}"
        );
    }
    assert!(
        far_c[&ip("100.64.0.101")].1 < 45_000,
        "far forwarded third's storm to local: {far_c:?}"
    );
    assert!(
        far_c[&ip("100.64.0.103")].1 < 15_000,
        "far forwarded local-bound frames to third: {far_c:?}"
    );
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=120s"])
        .unwrap();
    drop(lab);
}

#[test]
fn a_lost_sites_nodes_restart_at_the_next_site_and_its_return_runs_nothing_twice() {
    let env = Env::get();
    let p = env.netns_prefix();
    let ns = "siteloss";
    let grace = 6;
    let far = FarSite::up(
        &env,
        ns,
        &[(
            "far",
            &format!(
                "{{vniRange: {{start: 1000, end: 1999}}, gateway: {{wanEndpoint: 100.64.0.102}}, hostGraceSeconds: {grace}}}"
            ),
        )],
        &[("far-1", "far", "31"), ("far-2", "far", "32")],
    );
    // The workers prefer far and may restart at local.
    let (path, sum) = tiny_image();
    env.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec:
  cidr: 10.0.0.0/24
  segment: {{type: vxlan}}
  homeSite: local
  sites: [far]
  firewall:
  - {{protocol: icmp, to: All}}
  publicIPs:
  - {{node: c-w-0}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: c, namespace: {ns}}}
spec:
  networkGroup: net
  startOrder: Parallel
  frontend:
    site: local
    size: {{cpu: 1, memory: 128Mi}}
    image: {{url: 'file://{path}', checksum: '{sum}'}}
  pools:
  - {{name: w, replicas: 2, sites: [far, local], size: {{cpu: 1, memory: 128Mi}}}}
"#
    ));
    let before = wait_dhcp_n(&env, ns, 3);
    let fe = before["c-frontend"].clone();
    let workers: Vec<Guest> = ["c-w-0", "c-w-1"]
        .iter()
        .map(|n| before[*n].clone())
        .collect();
    for w in &workers {
        assert!(w.host.starts_with("far-"), "a worker on {}", w.host);
        assert!(fe.pings(&w.ip), "frontend → {}", w.ip);
    }
    // A public IP stays at the home Site and reaches its node wherever it
    // runs: c-w-0 at far, through the home router's DNAT and the tunnel.
    let client = format!("{p}-client");
    let pub_ip = ng_status(&env, ns)["publicIPs"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["node"] == "c-w-0"))
        .and_then(|x| x["address"].as_str())
        .expect("a public IP for c-w-0")
        .to_string();
    let reach = |when: &str| {
        let host = guests(&env, ns)["c-w-0"].host.clone();
        let (_, took) = wait_for(Duration::from_secs(30), "DNAT to c-w-0", || {
            if in_ns(&client, &["busybox", "ping", "-c", "1", "-W", "1", &pub_ip]).1 {
                Ok(())
            } else {
                Err("no reply".into())
            }
        })
        .unwrap();
        println!("{when}: the outside reaches {pub_ip} at home, c-w-0 on {host} ({took:?})");
    };
    reach("both Sites up");
    let vni = ng_status(&env, ns)["segment"]["id"].as_u64().unwrap();
    let wan_port = format!("ykw{vni}");
    let home = env.host_netns("host-1");
    let has_port = |netns: &str| {
        // (in_ns's output has stderr too: "Device … does not exist")
        in_ns(netns, &["ip", "-o", "link", "show", &wan_port]).1
    };
    assert!(has_port(&home), "host-1 has no WAN port {wan_port}");

    // A far host lost: its agent and libvirtd die and its WAN link is cut;
    // its guests keep running, unfenced.
    let wan_ns = format!("{p}-wan");
    let link = |h: &str, up: &str| {
        let l = if h == "far-1" { "h31" } else { "h32" };
        let (out, ok) = in_ns(&wan_ns, &["ip", "link", "set", l, up]);
        assert!(ok, "{out}");
    };
    let lose = |h: &str| {
        env.env_sh(&["stop", &format!("agent-{h}"), "--signal", "KILL"])
            .unwrap();
        env.env_sh(&["stop", &format!("libvirtd-{h}"), "--signal", "KILL"])
            .unwrap();
        link(h, "down");
    };
    // Every guest that ran at far, by name (stale once far is lost).
    let mut at_far: Vec<(String, Guest)> = ["c-w-0", "c-w-1"]
        .iter()
        .map(|n| (n.to_string(), before[*n].clone()))
        .collect();

    // First far's active gateway alone: the endpoint moves to far's other
    // host, and a worker that ran on the lost one restarts there (far is
    // still its first Site), its address from the home router through the
    // moved end.
    let first = env.get_json(&["get", "site", "far"])["status"]["activeGateway"]
        .as_str()
        .unwrap()
        .to_string();
    let second = if first == "far-1" { "far-2" } else { "far-1" };
    let lost_at = Instant::now();
    lose(&first);
    let (_, took) = wait_for(
        Duration::from_secs(grace + 60),
        "far's endpoint moved",
        || {
            let s = env.get_json(&["get", "site", "far"]);
            let held = in_ns(
                &env.host_netns(second),
                &["ip", "-4", "-o", "addr", "show", "wan0"],
            )
            .0;
            if s["status"]["activeGateway"] == second && held.contains("100.64.0.102/32") {
                Ok(())
            } else {
                Err(format!("{} {held}", s["status"]["activeGateway"]))
            }
        },
    )
    .unwrap();
    println!("{first} lost: far's endpoint held by {second} {took:?} after (grace {grace}s)");
    let moved: Vec<String> = at_far
        .iter()
        .filter(|(_, g)| g.host == first)
        .map(|(n, _)| n.clone())
        .collect();
    let (now, _) = wait_for(
        Duration::from_secs(grace + 180),
        "the lost gateway's worker running on the other far host",
        || {
            let gs = guests(&env, ns);
            for n in &moved {
                let Some(g) = gs.get(n) else {
                    return Err(format!("{n} not made again yet"));
                };
                let c = console(&env, g);
                if g.host != second
                    || !c.contains(&format!("YUKUMO-GUEST dhcp={}/24", g.ip))
                    || !c.contains("YUKUMO-GUEST ready")
                {
                    return Err(format!("{n} on {} not up yet", g.host));
                }
            }
            Ok(gs)
        },
    )
    .unwrap();
    for n in &moved {
        assert!(fe.pings(&now[n].ip), "frontend → {n} on {second}");
        at_far.push((n.clone(), now[n].clone()));
    }
    println!(
        "{moved:?} running on {second} with its address by DHCP through the moved end {:.1}s after {first} was lost",
        lost_at.elapsed().as_secs_f64()
    );

    reach(&format!("{first} lost"));
    // Then far's last host: Site far lost.
    let lost_at = Instant::now();
    lose(second);
    // The workers restart at local, the next of their Sites, and get their
    // addresses from the home router.
    let (after, _) = wait_for(
        Duration::from_secs(grace + 180),
        "the workers running at local",
        || {
            let gs = guests(&env, ns);
            for w in &workers {
                let name = gs
                    .iter()
                    .find(|(_, g)| g.ip == w.ip)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default();
                let Some(g) = gs.get(&name) else {
                    return Err(format!("no node with {}", w.ip));
                };
                if g.uid == w.uid || !g.host.starts_with("host-") {
                    return Err(format!("{name} on {}", g.host));
                }
                let c = console(&env, g);
                if !c.contains(&format!("YUKUMO-GUEST dhcp={}/24", g.ip))
                    || !c.contains("YUKUMO-GUEST ready")
                {
                    return Err(format!("{name} on {} not up yet", g.host));
                }
            }
            Ok(gs)
        },
    )
    .unwrap();
    println!(
        "far lost: both workers running at local with their addresses by DHCP {:.1}s after the loss (grace {grace}s)",
        lost_at.elapsed().as_secs_f64()
    );
    for name in ["c-w-0", "c-w-1"] {
        assert!(fe.pings(&after[name].ip), "frontend → {name} at local");
    }
    reach("far lost");
    wait_for(Duration::from_secs(60), "the cluster Ready", || {
        let vc = env.get_json(&["-n", ns, "get", "vc", "c"]);
        if vc["status"]["ready"] == "3/3" {
            Ok(())
        } else {
            Err(vc["status"]["ready"].to_string())
        }
    })
    .unwrap();
    // Status while far is lost: far has no ready host and no gateway; the
    // group's far end has no holder; local's tunnel to far is closed, and
    // host-1 has no WAN port for the group (nothing from far enters it).
    let (_, took) = wait_for(Duration::from_secs(60), "the loss in status", || {
        let s = env.get_json(&["get", "site", "far"]);
        let ready = condition(&s, "Ready").unwrap_or_default();
        let wan = condition(&s, "WanTunnels").unwrap_or_default();
        let ends = ng_status(&env, ns)["tunnels"].clone();
        let far_end = ends
            .as_array()
            .and_then(|e| e.iter().find(|t| t["site"] == "far").cloned())
            .unwrap_or_default();
        let local = env.get_json(&["get", "site", "local"]);
        let peer = local["status"]["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|x| x["site"] == "far").cloned())
            .unwrap_or_default();
        let tunnels = condition(&local, "TunnelsReady").unwrap_or_default();
        let ok = ready.1 == "NoReadyHosts"
            && s["status"]["hostsReady"] == "0/2"
            && s["status"]["activeGateway"].is_null()
            && wan.1 == "NoWanGateway"
            && far_end["address"] == "100.64.0.102"
            && far_end["gateway"].is_null()
            && peer["state"] == "Down"
            && peer["message"]
                .as_str()
                .is_some_and(|m| m.contains("the tunnel is closed"))
            && tunnels.1 == "TunnelDown"
            && !has_port(&home);
        if ok {
            Ok(())
        } else {
            Err(format!("{ready:?} {wan:?} {far_end} {peer} {tunnels:?}"))
        }
    })
    .unwrap();
    println!(
        "far's loss in status (far: 0/2, NoWanGateway; local: tunnel to far Down, closed; no WAN port on host-1) ({took:?})"
    );
    // The old guests still run at far, unfenced (their hosts cannot be
    // reached to stop them).
    for (name, w) in &at_far {
        let pid = std::fs::read_to_string(
            env.dir
                .join(format!("hosts/{}/run/qemu/yk-{ns}-{name}.pid", w.host)),
        );
        let alive = pid
            .ok()
            .is_some_and(|p| PathBuf::from(format!("/proc/{}", p.trim())).exists());
        assert!(
            alive,
            "the old guest of {name} at {} is not running",
            w.host
        );
    }

    // far returns, its WAN first (the stale guests' tunnel reaches local
    // again), then libvirtd and agents. Nothing runs twice: a far host is
    // Ready only once its stale domains are gone, and until then nothing of
    // theirs crosses to local — the stale guests ping the frontend all the
    // while, and the frontend's tap sees none of it.
    for (_, w) in &at_far {
        w.sh(&format!(
            "(i=0; while [ $i -lt 120 ]; do ping -c 1 -W 1 {} >/dev/null 2>&1; i=$((i+1)); done) >/dev/null 2>&1 &",
            fe.ip
        ));
    }
    let fe_ns = env.host_netns(&fe.host);
    let sniffer = Sniffer::start(&fe_ns, &tap_name(&fe.uid), 60);
    link("far-1", "up");
    link("far-2", "up");
    let back_at = Instant::now();
    for h in ["far-1", "far-2"] {
        env.env_sh(&["start-libvirtd", h]).unwrap();
        env.env_sh(&["start-agent", h]).unwrap();
    }
    let mut checked: BTreeMap<String, Duration> = BTreeMap::new();
    wait_for(
        Duration::from_secs(120),
        "far's hosts Ready and its tunnel open",
        || {
            for h in ["far-1", "far-2"] {
                if checked.contains_key(h) {
                    continue;
                }
                let ready = condition(&env.get_json(&["get", "host", h]), "Ready")
                    .is_some_and(|c| c.0 == "True");
                if ready {
                    // Ready: its stale domains are gone already.
                    let list = env.virsh(h, &["list", "--all", "--uuid"]);
                    let stale: Vec<&String> = at_far
                        .iter()
                        .map(|(_, w)| &w.uid)
                        .filter(|u| list.contains(u.as_str()))
                        .collect();
                    assert!(stale.is_empty(), "{h} Ready with stale domains {stale:?}");
                    checked.insert(h.to_string(), back_at.elapsed());
                }
            }
            if checked.len() == 2 && has_port(&home) {
                Ok(())
            } else {
                Err(format!("Ready: {checked:?}"))
            }
        },
    )
    .unwrap();
    println!(
        "far back: hosts Ready (no stale domain left) after {checked:?}, its tunnel open {:.1}s after it returned",
        back_at.elapsed().as_secs_f64()
    );
    let (_, took) = wait_for(
        Duration::from_secs(90),
        "far's status after its return",
        || {
            let s = env.get_json(&["get", "site", "far"]);
            let local = env.get_json(&["get", "site", "local"]);
            let up =
                |site: &Value| condition(site, "TunnelsReady").is_some_and(|c| c.1 == "TunnelsUp");
            let ends = ng_status(&env, ns)["tunnels"].clone();
            let held = ends
                .as_array()
                .is_some_and(|e| e.iter().all(|t| t["gateway"].is_string()));
            if s["status"]["hostsReady"] == "2/2"
                && s["status"]["activeGateway"]
                    .as_str()
                    .is_some_and(|h| h.starts_with("far-"))
                && up(&s)
                && up(&local)
                && held
            {
                Ok(())
            } else {
                Err(format!(
                    "{} {:?} {:?} {ends}",
                    s["status"]["hostsReady"],
                    condition(&s, "TunnelsReady"),
                    condition(&local, "TunnelsReady")
                ))
            }
        },
    )
    .unwrap();
    println!(
        "far back: 2/2 hosts, tunnels Up at both Sites {took:?} later ({:.1}s after it returned)",
        back_at.elapsed().as_secs_f64()
    );
    let stale_ips: Vec<&str> = at_far.iter().map(|(_, w)| w.ip.as_str()).collect();
    let echo = |frames: &[Value]| {
        frames
            .iter()
            .filter(|f| {
                f["dir"] == "tx"
                    && f["proto"] == 1
                    && f["icmp_type"] == 8
                    && f["dst_ip"] == fe.ip.as_str()
                    && f["src_ip"]
                        .as_str()
                        .is_some_and(|ip| stale_ips.contains(&ip))
            })
            .count()
    };
    let frames = sniffer.frames();
    assert_eq!(
        echo(&frames),
        0,
        "a stale guest's echo request reached the frontend while far returned"
    );
    println!(
        "the frontend's tap over the 60 s of far's return: {} frames, no echo request from the stale guests",
        frames.len()
    );
    // (Control: the same requests from a worker that runs are seen.)
    let sniffer = Sniffer::start(&fe_ns, &tap_name(&fe.uid), 6);
    assert!(after["c-w-0"].pings(&fe.ip), "c-w-0 → frontend");
    assert!(
        echo(&sniffer.frames()) >= 1,
        "the control's echo requests not seen"
    );
    // The workers stay where they run; one of each, reachable.
    let now = guests(&env, ns);
    for name in ["c-w-0", "c-w-1"] {
        assert_eq!(now[name].uid, after[name].uid, "{name} moved again");
        assert!(fe.pings(&now[name].ip), "frontend → {name}");
    }
    for h in ["far-1", "far-2"] {
        let doms = env.virsh(h, &["list", "--all", "--name"]);
        assert!(doms.trim().is_empty(), "{h} runs {doms}");
    }
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"])
        .unwrap();
    drop(far);
}

/// Deletes a namespace when dropped (also when the test fails).
struct Namespace<'a>(&'a Env, &'static str);

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl(&[
            "delete",
            "namespace",
            self.1,
            "--wait=true",
            "--timeout=120s",
        ]);
    }
}

/// The seeds' intercloud example at its size, from one apply: 3 small
/// nodes (the frontend and a pool of 2) at `local`, 2 large at `far`, one
/// private network through a tunnel capped at 1 Gbit/s; and in the same
/// apply a second tenant whose group has the same CIDR at both Sites. Every
/// guest got its address by DHCP from its home router; the seed's guests
/// reach each other across the Sites; and neither tenant's broadcasts
/// reach the other's guests at either Site (frames recorded on their taps),
/// while each tenant's own cross the tunnel.
#[test]
fn the_seeds_example_comes_up_across_two_sites_and_a_tenant_on_its_cidr_sees_none_of_its_frames() {
    let env = Env::get();
    let (ns, ns2) = ("seed", "seed2");
    // `large` at far is 1 vCPU / 512 MiB (the built-in is 4/8Gi; a TCG
    // guest with more than one vCPU stalls at boot on this machine's 2
    // busy cores); `small` is the built-in (1/1Gi).
    let far = FarSite::up(
        &env,
        ns,
        &[(
            "far",
            "{vniRange: {start: 1000, end: 1999}, gateway: {wanEndpoint: 100.64.0.102}, tunnel: {bandwidthMbps: 1000}, sizeClasses: [{name: large, cpu: 1, memory: 512Mi}]}",
        )],
        &[("far-1", "far", "31"), ("far-2", "far", "32")],
    );
    let _second = Namespace(&env, ns2);
    env.kubectl_ok(&[
        "patch",
        "site",
        "local",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"tunnel":{"bandwidthMbps":1000}}}"#,
    ])
    .unwrap();
    let (path, sum) = tiny_image();
    let image = format!("{{url: 'file://{path}', checksum: '{sum}'}}");
    let started = Instant::now();
    env.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: intercloud-net, namespace: {ns}}}
spec:
  cidr: 10.30.0.0/24
  segment: {{type: vxlan}}
  homeSite: local
  sites: [far]
  firewall:
  - {{protocol: icmp}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: intercloud, namespace: {ns}}}
spec:
  networkGroup: intercloud-net
  startOrder: Parallel
  frontend:
    site: local
    size: {{sizeClass: small}}
    image: {image}
  pools:
  - {{name: small, replicas: 2, sites: [local], size: {{sizeClass: small}}}}
  - {{name: large, replicas: 2, sites: [far, local], size: {{sizeClass: large}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {ns2}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns2}}}
spec:
  cidr: 10.30.0.0/24
  segment: {{type: vxlan}}
  homeSite: local
  sites: [far]
  firewall:
  - {{protocol: icmp}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: other, namespace: {ns2}}}
spec:
  networkGroup: net
  startOrder: Parallel
  frontend:
    site: local
    size: {{cpu: 1, memory: 128Mi}}
    image: {image}
  pools:
  - {{name: w, replicas: 1, sites: [far], size: {{cpu: 1, memory: 128Mi}}}}
"#
    ));
    let g = wait_dhcp_n(&env, ns, 5);
    let g2 = wait_dhcp_n(&env, ns2, 2);
    println!(
        "the seed's 5 and the other tenant's 2 guests up with DHCP {:?} after the apply",
        started.elapsed()
    );
    for (name, guest) in g.iter().chain(g2.iter()) {
        let at_far = name.contains("-large-") || name == "other-w-0";
        assert_eq!(
            guest.host.starts_with("far-"),
            at_far,
            "{name} on {}",
            guest.host
        );
        println!("  {name}: {} on {}", guest.ip, guest.host);
    }
    // The classes as resolved: small the built-in, large far's.
    for (node, cpu, mib) in [
        ("intercloud-small-0", 1, 1024),
        ("intercloud-large-1", 1, 512),
    ] {
        let vn = env.get_json(&["-n", ns, "get", "vn", node]);
        let r = &vn["spec"]["resources"];
        assert_eq!(
            (&r["cpu"], &r["memoryMiB"]),
            (&cpu.into(), &Value::from(mib)),
            "{node}: {r}"
        );
    }
    // Two groups, two segments, each held at both Sites; the tunnel capped
    // at the Sites' 1 Gbit/s on each endpoint's holder.
    let (st, st2) = (
        env.get_json(&["-n", ns, "get", "ng", "intercloud-net"])["status"].clone(),
        ng_status(&env, ns2),
    );
    let (vni, vni2) = (
        st["segment"]["id"].as_u64().unwrap(),
        st2["segment"]["id"].as_u64().unwrap(),
    );
    assert_ne!(vni, vni2);
    for st in [&st, &st2] {
        let sites: Vec<&str> = st["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["site"].as_str().unwrap())
            .collect();
        assert_eq!(sites, ["local", "far"], "{st}");
    }
    for holder in ["host-1", "far-1"] {
        let (classes, _) = in_ns(
            &env.host_netns(holder),
            &["tc", "class", "show", "dev", "wan0"],
        );
        assert!(classes.contains("rate 1Gbit"), "{holder}: {classes}");
    }
    // The seed's guests reach each other across the Sites.
    let fe = &g["intercloud-frontend"];
    let large = &g["intercloud-large-0"];
    let pinged = Instant::now();
    for n in [
        "intercloud-small-0",
        "intercloud-small-1",
        "intercloud-large-0",
        "intercloud-large-1",
    ] {
        assert!(fe.pings(&g[n].ip), "frontend → {n}");
    }
    for n in [
        "intercloud-small-0",
        "intercloud-small-1",
        "intercloud-large-1",
    ] {
        assert!(large.pings(&g[n].ip), "large-0 (far) → {n}");
    }
    assert!(large.pings("10.30.0.1"), "large-0 (far) → the home router");
    let (fe2, w2) = (&g2["other-frontend"], &g2["other-w-0"]);
    assert!(fe2.pings(&w2.ip) && w2.pings(&fe2.ip), "the other tenant");
    println!("pings across the Sites took {:?}", pinged.elapsed());
    // Isolation with frames: each tenant, from its node at far, asks by ARP
    // (broadcast, flooded over its whole segment and through the tunnel)
    // for an address no one has; the recorders on the taps of the other
    // tenant's guests at both Sites see none of it, those of the tenant's
    // own guest at the home Site see it arrive through the tunnel.
    let tap = |g: &Guest| (env.host_netns(&g.host), tap_name(&g.uid));
    let sniff = |g: &Guest| {
        let (ns, tap) = tap(g);
        Sniffer::start(&ns, &tap, 14)
    };
    let (at_fe, at_large, at_fe2, at_w2) = (sniff(fe), sniff(large), sniff(fe2), sniff(w2));
    large.sh("ping -c 3 -W 1 10.30.0.250 >/dev/null");
    w2.sh("ping -c 3 -W 1 10.30.0.251 >/dev/null");
    let (at_fe, at_large, at_fe2, at_w2) = (
        at_fe.frames(),
        at_large.frames(),
        at_fe2.frames(),
        at_w2.frames(),
    );
    let macs = |gs: &BTreeMap<String, Guest>| -> Vec<String> {
        gs.values().map(|g| g.mac.to_lowercase()).collect()
    };
    let (seed_macs, other_macs) = (macs(&g), macs(&g2));
    let from = |frames: &[Value], macs: &[String]| {
        frames
            .iter()
            .filter(|f| macs.iter().any(|m| f["src"] == m.as_str()))
            .count()
    };
    // ARP requests for `tpa` sent (rx on a guest's tap) or received (tx).
    let asks = |frames: &[Value], dir: &str, tpa: &str| {
        frames
            .iter()
            .filter(|f| f["dir"] == dir && f["tpa"] == tpa)
            .count()
    };
    // Controls: each ARP left its sender, and crossed the tunnel to its
    // tenant's frontend at local.
    assert!(
        asks(&at_large, "rx", "10.30.0.250") > 0,
        "large-0 sent no ARP: {at_large:?}"
    );
    assert!(
        asks(&at_w2, "rx", "10.30.0.251") > 0,
        "other-w-0 sent no ARP: {at_w2:?}"
    );
    let seed_across = asks(&at_fe, "tx", "10.30.0.250");
    let other_across = asks(&at_fe2, "tx", "10.30.0.251");
    assert!(
        seed_across > 0,
        "the seed's ARP never reached its frontend: {at_fe:?}"
    );
    assert!(
        other_across > 0,
        "the other tenant's ARP never reached its frontend: {at_fe2:?}"
    );
    // Nothing from one tenant on the other's taps, at either Site.
    for (what, frames, strangers) in [
        ("the other tenant's frontend (local)", &at_fe2, &seed_macs),
        ("the other tenant's worker (far)", &at_w2, &seed_macs),
        ("the seed's frontend (local)", &at_fe, &other_macs),
        ("the seed's large-0 (far)", &at_large, &other_macs),
    ] {
        let crossed = from(frames, strangers);
        let foreign_arp = frames
            .iter()
            .filter(|f| f["tpa"] == "10.30.0.250" || f["tpa"] == "10.30.0.251")
            .filter(|f| !strangers.iter().any(|m| f["src"] == m.as_str()))
            .count();
        assert_eq!(
            crossed, 0,
            "{crossed} frames of the other tenant reached {what}: {frames:?}"
        );
        println!(
            "{what}: {} frames recorded, 0 from the other tenant ({foreign_arp} of its own tenant's ARP)",
            frames.len()
        );
    }
    println!(
        "ARP through the tunnel: the seed's reached its frontend {seed_across}×, the other's {other_across}×"
    );
    drop(_second);
    drop(far);
}
