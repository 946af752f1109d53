//! WireGuard between the gateways of two Sites, on VM hosts.
//!
//! This machine's kernel has neither WireGuard nor netem; the VM hosts
//! (e2e/lib/vm-host.sh: the Debian kernel of /boot) have both. Two VM
//! hosts, each the gateway of its own Site (`wga`, `wgb`, both asking for
//! `encryption: wireguard`), have their WAN interfaces on the environment's
//! WAN bridge, each delayed 10 ms by netem (a round trip of ~20 ms, as
//! between the seed's sites). A group homed at `wga` and stretched to
//! `wgb` has its frontend at wga and a worker at wgb; the VM hosts run
//! libvirt's test driver, so each node's network endpoint is a namespace in
//! its VM host behind a veth named like its tap (as in vlan.rs).
//!
//! Proven here: each gateway publishes its WireGuard key and holds its
//! Site's endpoint; the group's ends carry the keys and its MTU leaves room
//! for WireGuard; the worker at wgb gets its address by DHCP from the home
//! router through the tunnel, and pings the frontend; what crosses the WAN
//! bridge between the two is WireGuard only — no VXLAN header and no inner
//! IP header in any frame; the tunnel's status (Up, RTT ~20 ms, bytes); and
//! a third Site asking for WireGuard whose only gateway (a simulated host
//! of this machine) has no WireGuard gets a condition naming it, no holder,
//! and no packet — plaintext or other — towards its endpoint.

use std::time::{Duration, Instant};

use serde_json::Value;
use yukumo_agent::network::plan::tap_name;
use yukumo_e2e::net::{Sniffer, in_ns};
use yukumo_e2e::vm::{DHCP_SCRIPT, VmHosts, placeholder_image};
use yukumo_e2e::{Env, condition, wait_for};

const NS: &str = "wgt";

/// Sites, and a simulated host, of this test: removed when dropped (after
/// the VM hosts), also when the test fails.
struct Sites<'a> {
    env: &'a Env,
    names: Vec<&'static str>,
    hosts: Vec<&'static str>,
}

impl Drop for Sites<'_> {
    fn drop(&mut self) {
        for h in &self.hosts {
            if let Err(e) = self.env.env_sh(&["stop-site-host", h]) {
                eprintln!("{e}");
            }
            let _ = self
                .env
                .kubectl(&["delete", "host", h, "--ignore-not-found", "--timeout=60s"]);
        }
        for s in &self.names {
            let _ = self
                .env
                .kubectl(&["delete", "site", s, "--ignore-not-found", "--timeout=60s"]);
        }
    }
}

/// The average of `ping`'s summary line ("min/avg/max"), in ms.
fn avg_ms(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    line.split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn a_wireguard_tunnel_between_vm_host_gateways_carries_the_group_and_nothing_in_the_clear() {
    let env = Env::get();
    let p = env.netns_prefix();
    let wan = format!("{p}-wan");
    let site = |name: &str, ep: &str| {
        format!(
            "apiVersion: yukumo.io/v1alpha1\nkind: Site\nmetadata: {{name: {name}}}\nspec: {{vniRange: {{start: 2000, end: 2999}}, gateway: {{wanEndpoint: '{ep}'}}, tunnel: {{encryption: wireguard}}}}\n"
        )
    };
    // No caps here: the agent's shaper would replace the netem qdisc that
    // gives the WAN its delay (the caps' rules under WireGuard are checked
    // by the plan's unit tests).
    env.apply(
        &[
            site("wga", "100.64.0.121:4790"),
            site("wgb", "100.64.0.122:4790"),
            site("wgc", "100.64.0.141:4790"),
        ]
        .join("---\n"),
    );
    let mut sites = Sites {
        env: &env,
        names: vec!["wga", "wgb", "wgc"],
        hosts: vec![],
    };
    let started = Instant::now();
    let vms = VmHosts::start(&env, NS, &[("vmwg-1", "wga", 21), ("vmwg-2", "wgb", 22)]);
    // Each gateway registers with its key and holds its Site's endpoint.
    let (keys, took) = wait_for(
        Duration::from_secs(300),
        "the VM hosts Ready with WireGuard, holding their Sites' endpoints",
        || {
            let mut keys = Vec::new();
            for (h, s) in [("vmwg-1", "wga"), ("vmwg-2", "wgb")] {
                let v = env.get_json(&["get", "site", s]);
                let c = condition(&v, "WanTunnels").unwrap_or_default();
                if v["status"]["activeGateway"] != h || c.1 != "GatewayActive" {
                    return Err(format!("{s}: {} {c:?}", v["status"]["activeGateway"]));
                }
                let host = env.get_json(&["get", "host", h]);
                let key = host["status"]["wireguardPublicKey"].as_str().unwrap_or("");
                if host["status"]["capabilities"]["wireguard"] != true || key.is_empty() {
                    return Err(format!("{h}: {}", host["status"]["capabilities"]));
                }
                keys.push(key.to_string());
            }
            Ok(keys)
        },
    )
    .unwrap();
    println!(
        "VM hosts Ready with WireGuard keys, holding wga's and wgb's endpoints, {took:?} after start ({:?} in all)",
        started.elapsed()
    );
    // ~20 ms between the Sites: each WAN interface delays by 10 ms.
    for h in &vms.names {
        vms.ok(h, "tc qdisc replace dev wan0 root netem delay 10ms");
    }
    // A Site asking for WireGuard whose gateway has none: a condition
    // naming it, and no holder.
    sites.hosts.push("wgc-1");
    env.env_sh(&["start-site-host", "wgc-1", "wgc", "41"])
        .unwrap();
    let (msg, _) = wait_for(Duration::from_secs(90), "wgc's condition", || {
        let v = env.get_json(&["get", "site", "wgc"]);
        let c = condition(&v, "WanTunnels").unwrap_or_default();
        if c.1 == "WireguardUnavailable" && v["status"]["activeGateway"].is_null() {
            Ok(c.2)
        } else {
            Err(format!("{c:?} {}", v["status"]["activeGateway"]))
        }
    })
    .unwrap();
    assert!(msg.contains("wgc-1"), "{msg}");
    println!("wgc (gateway wgc-1, this machine's kernel): WireguardUnavailable: {msg}");

    let (url, sum) = placeholder_image(&env, "wg-node.qcow2");
    env.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {NS}}}
spec:
  cidr: 10.0.0.0/24
  segment: {{type: vxlan}}
  homeSite: wga
  sites: [wgb, wgc]
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: c, namespace: {NS}}}
spec:
  networkGroup: net
  startOrder: Parallel
  frontend:
    site: wga
    size: {{cpu: 1, memory: 128Mi}}
    image: {{url: '{url}', checksum: '{sum}'}}
  pools:
  - {{name: w, replicas: 1, sites: [wgb], size: {{cpu: 1, memory: 128Mi}}}}
"#
    ));
    let (st, _) = wait_for(Duration::from_secs(120), "the group's tunnel ends", || {
        let v = env.get_json(&["-n", NS, "get", "ng", "net"]);
        let st = v["status"].clone();
        let ends = st["tunnels"].as_array().cloned().unwrap_or_default();
        if ends.len() == 3 && ends[..2].iter().all(|e| e["publicKey"].is_string()) {
            Ok(st)
        } else {
            Err(format!("{st}"))
        }
    })
    .unwrap();
    let ends = st["tunnels"].as_array().unwrap();
    assert_eq!(ends[0]["publicKey"], keys[0].as_str());
    assert_eq!(ends[1]["publicKey"], keys[1].as_str());
    assert!(ends.iter().all(|e| e["encryption"] == "wireguard"), "{st}");
    assert!(
        ends[2]["gateway"].is_null() && ends[2]["publicKey"].is_null(),
        "wgc's end has no holder: {st}"
    );
    assert_eq!(st["mtu"], 1390, "1500 less VXLAN's 50 and WireGuard's 60");
    let vni = st["segment"]["id"].as_u64().unwrap();

    // The nodes' endpoints in their VM hosts (frontend at wga, worker at wgb).
    let (nodes, _) = wait_for(Duration::from_secs(120), "both nodes placed", || {
        let v = env.get_json(&["-n", NS, "get", "vn"]);
        let ns: Vec<Value> = v["items"].as_array().cloned().unwrap_or_default();
        if ns.len() == 2 && ns.iter().all(|n| n["spec"]["host"].is_string()) {
            Ok(ns)
        } else {
            Err(format!("{} nodes", ns.len()))
        }
    })
    .unwrap();
    let node = |name: &str| {
        nodes
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .unwrap()
    };
    let (fe, w) = (node("c-frontend"), node("c-w-0"));
    assert_eq!(fe["spec"]["host"], "vmwg-1");
    assert_eq!(w["spec"]["host"], "vmwg-2");
    let guest = |n: &Value| format!("guest-{}", n["metadata"]["name"].as_str().unwrap());
    for n in [fe, w] {
        let h = n["spec"]["host"].as_str().unwrap();
        vms.ok(h, DHCP_SCRIPT);
        vms.ok(
            h,
            &format!(
                "ip netns add {g} && ip link add {tap} type veth peer name eth0 netns {g} && ip -n {g} link set lo up && ip -n {g} link set eth0 address {mac} mtu 1390 up",
                g = guest(n),
                tap = tap_name(n["metadata"]["uid"].as_str().unwrap()),
                mac = n["spec"]["network"]["mac"].as_str().unwrap()
            ),
        );
    }
    let in_guest = |n: &Value, cmd: &str| {
        vms.sh(
            n["spec"]["host"].as_str().unwrap(),
            &format!("ip netns exec {} {cmd}", guest(n)),
        )
    };
    // The worker's address by DHCP from the home router, through the tunnel.
    let (lease, took) = wait_for(Duration::from_secs(120), "the worker's lease", || {
        let (out, rc) = in_guest(
            w,
            "busybox udhcpc -i eth0 -n -q -t 5 -T 2 -s /run/yk-dhcp 2>&1",
        );
        let want = format!(
            "lease ip={} router=10.0.0.1",
            w["spec"]["network"]["ip"].as_str().unwrap()
        );
        if rc == 0 && out.contains(&want) {
            Ok(want)
        } else {
            Err(out)
        }
    })
    .unwrap();
    println!("c-w-0 at wgb: {lease} from the router at wga, through WireGuard ({took:?})");
    let (out, rc) = in_guest(
        fe,
        "busybox udhcpc -i eth0 -n -q -t 5 -T 2 -s /run/yk-dhcp 2>&1",
    );
    assert_eq!(rc, 0, "frontend DHCP: {out}");
    let fe_ip = fe["spec"]["network"]["ip"].as_str().unwrap().to_string();

    // What crosses the WAN between the gateways while the worker pings the
    // frontend: WireGuard only.
    let wan_port = format!("{p}v{}w", vms.index("vmwg-2"));
    let sniff = Sniffer::start(&wan, &wan_port, 12);
    let (ping, rc) = in_guest(w, &format!("busybox ping -c 5 -W 2 {fe_ip}"));
    if rc != 0 {
        // What each side holds, for the failure's message.
        for (n, h) in [(fe, "vmwg-1"), (w, "vmwg-2")] {
            let g = guest(n);
            let (out, _) = vms.sh(
                h,
                &format!(
                    "ip -n {g} -br addr; ip -n {g} neigh; bridge fdb show | grep -v permanent; ip -s -br link; nft list ruleset; ip rule; ip route show table 31083; ip -d link show ykw{vni}"
                ),
            );
            eprintln!("--- {h}:\n{out}");
        }
    }
    assert_eq!(rc, 0, "worker (wgb) → frontend (wga): {ping}");
    let rtt_tunnel = avg_ms(&ping);
    let (ping, rc) = vms.sh("vmwg-2", "ping -c 5 -W 2 100.64.0.21");
    assert_eq!(rc, 0, "the WAN between the gateways: {ping}");
    let rtt_underlay = avg_ms(&ping);
    let frames = sniff.frames();
    // The gateways' addresses: their own and their Sites' endpoints.
    let gw = |a: &Value| {
        ["100.64.0.21", "100.64.0.22", "100.64.0.121", "100.64.0.122"]
            .contains(&a.as_str().unwrap_or(""))
    };
    let between = |f: &&Value| gw(&f["src_ip"]) && gw(&f["dst_ip"]);
    let udp: Vec<&Value> = frames
        .iter()
        .filter(between)
        .filter(|f| f["proto"] == 17)
        .collect();
    let wg_data = udp
        .iter()
        .filter(|f| f["udp_head"] == "04000000" && (f["dport"] == 4790 || f["sport"] == 4790))
        .count();
    let clear: Vec<&&Value> = udp
        .iter()
        .filter(|f| {
            f.get("inner_src").is_some()
                || f["udp_head"].as_str().is_some_and(|h| h.starts_with("08"))
                || f["dport"] == 4791
                || f["sport"] == 4791
        })
        .collect();
    let inner_ip = frames
        .iter()
        .filter(|f| {
            f["src_ip"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.0.0."))
        })
        .count();
    assert!(wg_data >= 10, "WireGuard data both ways: {frames:?}");
    // WireGuard's packets leave from the Sites' endpoints (source NAT), as
    // the peers' filters and caps expect.
    let off_endpoint = udp
        .iter()
        .filter(|f| f["sport"] == 4790 || f["dport"] == 4790)
        .filter(|f| !(f["src_ip"] == "100.64.0.121" || f["src_ip"] == "100.64.0.122"))
        .count();
    assert_eq!(
        off_endpoint, 0,
        "WireGuard from a host's own address: {frames:?}"
    );
    assert!(clear.is_empty(), "VXLAN in the clear on the WAN: {clear:?}");
    assert_eq!(inner_ip, 0, "a guest's IP header on the WAN: {frames:?}");
    println!(
        "WAN capture: {} frames between the gateways, {wg_data} WireGuard data messages, 0 VXLAN headers, 0 inner IP headers",
        frames.iter().filter(between).count()
    );
    println!(
        "RTT: WAN between the gateways {rtt_underlay:?} ms, guest to guest through WireGuard {rtt_tunnel:?} ms"
    );
    assert!(
        rtt_underlay.is_some_and(|r| r >= 15.0),
        "netem's 20 ms: {rtt_underlay:?}"
    );

    // The gateways' devices, routes and rule, as the agent made them.
    let link = vms.ok("vmwg-1", "ip -d -j link show ykwg");
    assert!(
        link.contains("\"info_kind\":\"wireguard\"") && link.contains("\"mtu\":1440"),
        "{link}"
    );
    let rules = vms.ok("vmwg-1", "ip rule show");
    assert!(
        rules.contains("not from all fwmark 0x796b lookup 31083"),
        "{rules}"
    );
    let routes = vms.ok("vmwg-1", "ip route show table 31083");
    assert!(routes.contains("100.64.0.122 dev ykwg"), "{routes}");
    assert!(
        !routes.contains("100.64.0.141"),
        "wgc's end is closed: {routes}"
    );
    let fdb = vms.ok("vmwg-1", &format!("bridge fdb show dev ykw{vni}"));
    assert!(
        fdb.contains("dst 100.64.0.122") && !fdb.contains("100.64.0.141"),
        "{fdb}"
    );

    // The tunnel's status at wga: Up, its RTT, its bytes; wgc closed.
    let (peers, took) = wait_for(Duration::from_secs(60), "wga's tunnel status", || {
        let v = env.get_json(&["get", "site", "wga"]);
        let peers = v["status"]["peers"].as_array().cloned().unwrap_or_default();
        let b = peers.iter().find(|p| p["site"] == "wgb");
        let c = peers.iter().find(|p| p["site"] == "wgc");
        match (b, c) {
            (Some(b), Some(c))
                if b["state"] == "Up"
                    && b["rttMs"].as_f64().is_some_and(|r| r >= 15.0)
                    && b["rxBytes"].as_u64().unwrap_or(0) > 0
                    && b["txBytes"].as_u64().unwrap_or(0) > 0
                    && c["state"] == "Down" =>
            {
                Ok(peers)
            }
            _ => Err(format!("{peers:?}")),
        }
    })
    .unwrap();
    println!(
        "wga's peers after {took:?}: {}",
        serde_json::to_string(&peers).unwrap()
    );

    // A cap on the tunnel: WireGuard's packets to the peer go to its class
    // of the shaper (which replaces netem on wga's WAN interface).
    env.kubectl_ok(&[
        "patch",
        "site",
        "wga",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"tunnel":{"bandwidthMbps":50}}}"#,
    ])
    .unwrap();
    wait_for(Duration::from_secs(60), "the cap on wga's WAN", || {
        let (out, _) = vms.sh("vmwg-1", "tc class show dev wan0");
        if out.contains("rate 50Mbit") {
            Ok(())
        } else {
            Err(out)
        }
    })
    .unwrap();
    let (ping, rc) = in_guest(
        fe,
        &format!(
            "busybox ping -c 3 -W 2 {}",
            w["spec"]["network"]["ip"].as_str().unwrap()
        ),
    );
    assert_eq!(rc, 0, "frontend (wga) → worker (wgb), capped: {ping}");
    let classes = vms.ok("vmwg-1", "tc -s class show dev wan0");
    let sent: u64 = classes
        .split("Sent ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    assert!(
        classes.contains("class htb 796b:1") && sent > 0,
        "{classes}"
    );
    println!("capped at 50 Mbit/s: class 796b:1 sent {sent} bytes of WireGuard to wgb");

    // Nothing at all goes to wgc's endpoint (never a plaintext tunnel).
    let sniff = Sniffer::start(&wan, "h41", 8);
    let (out, _) = in_guest(w, "busybox ping -c 3 -W 1 10.0.0.1");
    let to_wgc = sniff
        .frames()
        .iter()
        .filter(|f| f["dst_ip"] == "100.64.0.141" && f["proto"] == 17)
        .count();
    assert_eq!(to_wgc, 0, "UDP towards wgc's endpoint ({out})");
    let (_, ok) = in_ns(&wan, &["ip", "link", "show", "h41"]);
    assert!(ok, "wgc-1's WAN link was watched");
    println!("wgc's endpoint: 0 UDP packets sent to it");
    // The VM hosts' agents run with Site credentials, whose reads the
    // controller's authorization webhook scopes: everything they did here
    // (nodes, groups, their Site, tunnels) was within it.
    let authz = std::fs::read_to_string(env.dir.join("logs/authz.log")).unwrap_or_default();
    let denied: Vec<&str> = authz
        .lines()
        .filter(|l| l.contains("site agent read denied") && l.contains("vmwg-"))
        .collect();
    assert!(
        denied.is_empty(),
        "the VM hosts' agents were refused reads: {denied:#?}"
    );
    for n in [fe, w] {
        let h = n["spec"]["host"].as_str().unwrap();
        vms.ok(h, &format!("ip netns del {}", guest(n)));
    }
    drop(vms);
    drop(sites);
}
