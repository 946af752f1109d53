//! VLAN segments, on hosts whose kernel has 802.1Q.
//!
//! This machine's kernel has no 802.1Q, so two VM hosts (e2e/lib/vm-host.sh:
//! TCG VMs with the Debian kernel of /boot, each running its own agent) join
//! the local Site beside the three simulated hosts. The agents probe their
//! kernels for real; the controller allocates a VLAN id from the Site's
//! range, places the group's nodes and its router on the VM hosts only (the
//! only ones that offer 802.1Q), and the VM hosts' agents build the bridge,
//! the 802.1Q sub-interface of their uplink, the anti-spoofing table and the
//! router (NAT, firewall, dnsmasq). The VM hosts run libvirt's test driver
//! (a TCG guest inside a TCG VM would take minutes to boot), so each node's
//! network endpoint is a namespace inside its VM host behind a veth named
//! like the node's tap, set up by this test; the agent attaches it to the
//! group's bridge and guards it as it does a libvirt tap.
//!
//! Proven here: the capabilities as probed; placement only on capable
//! hosts; DHCP from the router across the VLAN trunk; a ping between the
//! two VM hosts carried in frames tagged with the group's VLAN id on the
//! underlay; no frame of a guest's own 802.1Q tag reaching the trunk (VLAN
//! hopping); SNAT and DNAT with the firewall through the outside namespace;
//! a hand-deleted VLAN link and a hand-deleted public address restored
//! (within 10 s on these emulated hosts, where a pass takes about a second;
//! the 5 s bound is held on the simulated hosts, in dataplane.rs; the
//! address announced by gratuitous ARP, which corrects a
//! stale neighbour entry upstream); and nothing of yukumo left on the VM
//! hosts after the group is deleted.

use std::time::Duration;

use serde_json::Value;
use yukumo_agent::network::plan::tap_name;
use yukumo_e2e::net::{Sniffer, first_peer_listener, in_ns, wait_repaired_within};
use yukumo_e2e::vm::{DHCP_SCRIPT, VmHosts, placeholder_image};
use yukumo_e2e::{Env, condition, wait_for};

const NS: &str = "vlant";
/// Repairs on a VM host (software-emulated: a pass there takes about 1 s).
const VM_REPAIR_BOUND: Duration = Duration::from_secs(10);

/// A node of the group, where it is and what it was given.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    host: String,
    uid: String,
    ip: String,
    mac: String,
}

impl Node {
    /// The namespace standing for the guest inside its VM host.
    fn netns(&self) -> String {
        format!("guest-{}", self.name)
    }
    fn tap(&self) -> String {
        tap_name(&self.uid)
    }
}

fn nodes(env: &Env) -> Vec<Node> {
    let v: Value = env.get_json(&["-n", NS, "get", "vn"]);
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| Node {
            name: n["metadata"]["name"].as_str().unwrap().to_string(),
            host: n["spec"]["host"].as_str().unwrap_or_default().to_string(),
            uid: n["metadata"]["uid"].as_str().unwrap().to_string(),
            ip: n["spec"]["network"]["ip"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            mac: n["spec"]["network"]["mac"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect()
}

fn host_caps(env: &Env, host: &str) -> Value {
    env.get_json(&["get", "host", host])["status"]["capabilities"].clone()
}

fn manifest(url: &str, sum: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {NS}}}
spec:
  cidr: 10.0.0.0/24
  segment: {{type: vlan}}
  homeSite: local
  firewall:
  - {{protocol: tcp, ports: "8080"}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: c, namespace: {NS}}}
spec:
  networkGroup: net
  frontend:
    size: {{cpu: 1, memory: 128Mi}}
    image: {{url: '{url}', checksum: '{sum}'}}
    publicIP: true
  pools:
  - {{name: w, replicas: 1, size: {{cpu: 1, memory: 128Mi}}}}
"#
    )
}

#[test]
fn vlan_segments_on_hosts_with_8021q() {
    let env = Env::get();
    let p = env.netns_prefix();
    let (outside, client, underlay) =
        (format!("{p}-out"), format!("{p}-client"), format!("{p}-ul"));
    let vms = VmHosts::start(
        &env,
        NS,
        &[("vmhost-1", "local", 11), ("vmhost-2", "local", 12)],
    );

    // The agents probe their kernels: 802.1Q on the VM hosts, not here.
    let (_, took) = wait_for(
        Duration::from_secs(300),
        "VM hosts Ready with 802.1Q",
        || {
            for h in &vms.names {
                let out = env.kubectl(&["get", "host", h, "-o", "json"]);
                if !out.status.success() {
                    return Err(format!("{h} not registered yet"));
                }
                let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                match condition(&v, "Ready") {
                    Some((s, _, _)) if s == "True" => {}
                    c => return Err(format!("{h}: Ready {c:?}")),
                }
                if v["status"]["capabilities"]["vlan8021q"] != true {
                    return Err(format!("{h}: {}", v["status"]["capabilities"]));
                }
            }
            Ok(())
        },
    )
    .unwrap();
    println!("VM hosts registered, Ready and offering 802.1Q after {took:?}");
    for h in &vms.names {
        let kernel = env.jsonpath(&["host", h], "{.status.kernel}");
        println!("{h}: kernel {kernel}, {}", host_caps(&env, h)["notes"]);
    }
    for h in env.hosts() {
        let caps = host_caps(&env, &h);
        assert_eq!(caps["vlan8021q"], false, "{h}: {caps}");
        println!("{h}: no 802.1Q: {}", caps["notes"]);
    }

    let (url, sum) = placeholder_image(&env, "vlan-node.qcow2");
    env.apply(&manifest(&url, &sum));
    let (st, took) = wait_for(Duration::from_secs(120), "the VLAN group allocated", || {
        let v = env.get_json(&["-n", NS, "get", "ng", "net"]);
        match condition(&v, "Ready") {
            Some((s, _, _)) if s == "True" => Ok(v["status"].clone()),
            c => Err(format!("{c:?}")),
        }
    })
    .unwrap();
    let id = st["segment"]["id"].as_u64().expect("a VLAN id");
    let router_host = st["router"]["host"].as_str().unwrap().to_string();
    let router_addr = st["router"]["address"].as_str().unwrap().to_string();
    let public = st["publicIPs"][0]["address"].as_str().unwrap().to_string();
    println!(
        "group allocated after {took:?}: {} (VLAN {id}), router on {router_host} at {router_addr}, public IP {public}, MTU {}",
        st["segment"], st["mtu"]
    );
    assert!((100..=199).contains(&id), "from the Site's vlanRange: {id}");
    assert_eq!(st["segment"]["type"], "vlan");
    assert_eq!(st["mtu"], 1500, "a VLAN carries full 1500-byte frames");
    assert!(
        vms.names.contains(&router_host),
        "the router is on a host with 802.1Q: {router_host}"
    );
    let (ns, _) = wait_for(Duration::from_secs(120), "both nodes placed", || {
        let ns = nodes(&env);
        if ns.len() == 2 && ns.iter().all(|n| !n.host.is_empty() && !n.ip.is_empty()) {
            Ok(ns)
        } else {
            Err(format!("{ns:?}"))
        }
    })
    .unwrap();
    for n in &ns {
        assert!(
            vms.names.contains(&n.host),
            "{} is on {}, a host without 802.1Q",
            n.name,
            n.host
        );
    }
    assert_ne!(
        ns[0].host, ns[1].host,
        "the nodes are spread over both VM hosts"
    );
    println!(
        "nodes placed only on hosts with 802.1Q: {}",
        ns.iter()
            .map(|n| format!("{} on {} ({})", n.name, n.host, n.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The segment on every VM host: the bridge and an 802.1Q sub-interface
    // of the uplink with the group's id.
    let (bridge, link) = (format!("ykbv{id}"), format!("ykvl{id}"));
    for h in &vms.names {
        let (out, _) = wait_for(Duration::from_secs(60), &format!("{link} on {h}"), || {
            let (out, rc) = vms.sh(h, &format!("ip -d -j link show {link}"));
            let json = out.find('[').map(|i| &out[i..]).unwrap_or_default();
            let v: Value = serde_json::from_str(json.trim()).unwrap_or(Value::Null);
            let l = &v[0];
            if rc == 0
                && l["link"] == "ul0"
                && l["master"] == bridge.as_str()
                && l["linkinfo"]["info_kind"] == "vlan"
                && l["linkinfo"]["info_data"]["id"] == id
                && l["linkinfo"]["info_data"]["protocol"] == "802.1Q"
            {
                Ok(out)
            } else {
                Err(out)
            }
        })
        .unwrap();
        assert!(out.contains("\"mtu\":1500"), "{out}");
    }
    println!("{link}@ul0 (802.1Q id {id}) on {bridge}, on both VM hosts");

    // Each node's network endpoint, where libvirt would have made its tap.
    vms.ok(&vms.names[0], DHCP_SCRIPT);
    vms.ok(&vms.names[1], DHCP_SCRIPT);
    for n in &ns {
        vms.ok(
            &n.host,
            &format!(
                "ip netns add {g} && ip link add {tap} type veth peer name eth0 netns {g} && ip -n {g} link set lo up && ip -n {g} link set eth0 address {mac} mtu 1500 up",
                g = n.netns(),
                tap = n.tap(),
                mac = n.mac
            ),
        );
    }
    for n in &ns {
        wait_for(
            Duration::from_secs(30),
            &format!("{} on {bridge}", n.tap()),
            || {
                let (out, _) = vms.sh(&n.host, &format!("ip -o link show master {bridge}"));
                if out.contains(&n.tap()) {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        )
        .unwrap();
        let (out, rc) = vms.sh(
            &n.host,
            &format!(
                "ip netns exec {} busybox udhcpc -i eth0 -n -q -t 10 -T 2 -s /run/yk-dhcp 2>&1",
                n.netns()
            ),
        );
        assert!(
            rc == 0 && out.contains(&format!("lease ip={} router=10.0.0.1", n.ip)),
            "{} ({}): DHCP: {out}",
            n.name,
            n.host
        );
        println!(
            "{} on {}: leased {} from the router on {router_host} over VLAN {id}",
            n.name, n.host, n.ip
        );
    }
    let fe = ns.iter().find(|n| n.name == "c-frontend").unwrap().clone();
    let w = ns.iter().find(|n| n.name != "c-frontend").unwrap().clone();
    let in_guest =
        |n: &Node, cmd: &str| vms.sh(&n.host, &format!("ip netns exec {} {cmd}", n.netns()));

    // Across the trunk: a ping between the VM hosts travels tagged with the
    // group's id; a frame the guest tags itself (VLAN hopping, e.g. into
    // VLAN 150) never reaches the trunk.
    let w_uplink = format!("{p}v{}u", vms.index(&w.host));
    let sniff = Sniffer::start(&underlay, &w_uplink, 12);
    let (out, rc) = in_guest(&w, &format!("busybox ping -c 3 -W 2 {}", fe.ip));
    assert_eq!(rc, 0, "worker -> frontend across VM hosts: {out}");
    let (out, _) = in_guest(
        &w,
        "sh -c 'ip link add link eth0 name eth0.150 type vlan id 150 && ip addr add 10.0.150.2/24 dev eth0.150 && ip link set eth0.150 up && busybox ping -c 3 -W 1 10.0.150.3; ip link del eth0.150'",
    );
    assert!(
        out.contains("3 packets transmitted"),
        "the hop attempt ran: {out}"
    );
    let frames = sniff.frames();
    let from_w: Vec<&Value> = frames
        .iter()
        .filter(|f| f["src"] == w.mac.as_str() && f["dir"] == "rx")
        .collect();
    let tagged_ok = from_w
        .iter()
        .filter(|f| f["vlans"] == serde_json::json!([id]))
        .count();
    let hopped = from_w
        .iter()
        .filter(|f| {
            f["vlans"]
                .as_array()
                .is_some_and(|v| v.contains(&150.into()))
        })
        .count();
    let untagged = from_w
        .iter()
        .filter(|f| f["vlans"].as_array().is_some_and(|v| v.is_empty()))
        .count();
    assert!(
        tagged_ok >= 3,
        "the ping crossed the trunk tagged {id}: {frames:?}"
    );
    assert_eq!(
        hopped, 0,
        "a guest-tagged frame reached the trunk: {frames:?}"
    );
    assert_eq!(untagged, 0, "a guest frame left untagged: {frames:?}");
    let (out, rc) = in_guest(&fe, &format!("busybox ping -c 2 -W 2 {}", w.ip));
    assert_eq!(rc, 0, "frontend -> worker: {out}");
    println!(
        "trunk: {tagged_ok} frames of the worker carried VLAN {id}, 0 carried its own tag 150, 0 were untagged"
    );

    // SNAT and DNAT through the router, with the firewall.
    let l = first_peer_listener(&outside, "203.0.113.1", 7778);
    std::thread::sleep(Duration::from_millis(500));
    in_guest(&w, "sh -c 'echo hi | busybox nc -w 3 203.0.113.1 7778'");
    let seen = String::from_utf8_lossy(&l.wait_with_output().unwrap().stdout)
        .trim()
        .to_string();
    assert_eq!(
        seen, router_addr,
        "egress is masqueraded to the router's address"
    );
    in_guest(
        &fe,
        "sh -c 'mkdir -p /run/www && echo yukumo-vlan > /run/www/index.html && busybox httpd -p 8080 -h /run/www && busybox httpd -p 9090 -h /run/www'",
    );
    let url = |port: u16| format!("http://{public}:{port}/");
    let (body, ok) = in_ns(&client, &["timeout", "10", "wget", "-qO-", &url(8080)]);
    assert!(ok && body.contains("yukumo-vlan"), "allowed port: {body}");
    let (_, ok) = in_ns(&client, &["timeout", "4", "wget", "-qO-", &url(9090)]);
    assert!(!ok, "a port the firewall does not open is closed");
    println!(
        "SNAT: the outside saw {seen}; DNAT: {public}:8080 reached the frontend, :9090 was dropped"
    );
    // A public address deleted by hand inside the router is restored and
    // announced by gratuitous ARP: a wrong (stale) neighbour entry for it at
    // the upstream gateway is corrected with no traffic sent to it.
    let router_ns = format!("yk-v{id}");
    let wan: Value = serde_json::from_str(
        vms.ok(
            &router_host,
            &format!("ip -n {router_ns} -j link show wan0"),
        )
        .trim_start_matches(|c| c != '['),
    )
    .unwrap();
    let wan_mac = wan[0]["address"].as_str().unwrap().to_string();
    let bogus = "02:de:ad:00:00:01";
    assert!(
        in_ns(
            &outside,
            &[
                "ip", "neigh", "replace", &public, "lladdr", bogus, "dev", "br0", "nud", "stale"
            ]
        )
        .1
    );
    vms.ok(
        &router_host,
        &format!("ip -n {router_ns} addr del {public}/32 dev wan0"),
    );
    // The VM host is emulated (TCG): every command there runs many times
    // slower than on the simulated hosts, and a verification pass takes
    // about a second; the 5 s bound is held on those (dataplane.rs).
    wait_repaired_within(
        "a deleted public address, announced to the upstream gateway",
        VM_REPAIR_BOUND,
        || {
            let (neigh, _) = in_ns(&outside, &["ip", "neigh", "show", &public, "dev", "br0"]);
            neigh.contains(&wan_mac)
                && vms
                    .sh(
                        &router_host,
                        &format!("ip -n {router_ns} -o addr show dev wan0"),
                    )
                    .0
                    .contains(&format!("{public}/32"))
        },
    );
    let (body, ok) = in_ns(&client, &["timeout", "10", "wget", "-qO-", &url(8080)]);
    assert!(
        ok && body.contains("yukumo-vlan"),
        "after the repair: {body}"
    );
    let endpoint = env.get_json(&["-n", NS, "get", "vc", "c"])["status"]["frontend"].clone();
    assert_eq!(endpoint["publicIP"], public.as_str(), "{endpoint}");
    assert_eq!(endpoint["ssh"], format!("ssh root@{public}"), "{endpoint}");

    // A hand-deleted VLAN link is restored (the agent's ip monitor) and
    // traffic flows again.
    vms.ok(&w.host, &format!("ip link del {link}"));
    wait_repaired_within("a deleted VLAN link in a VM host", VM_REPAIR_BOUND, || {
        vms.sh(
            &w.host,
            &format!("ip -o link show master {bridge} | grep -q {link}"),
        )
        .1 == 0
    });
    let (out, rc) = in_guest(&w, &format!("busybox ping -c 2 -W 2 {}", fe.ip));
    assert_eq!(rc, 0, "traffic after the repair: {out}");

    // Deleting the group and its cluster leaves nothing of yukumo on the
    // VM hosts (the endpoints were the test's: it removes them first).
    for n in &ns {
        // The endpoint's servers (the test's httpd) would keep it alive.
        vms.ok(
            &n.host,
            &format!(
                "ip netns pids {g} | xargs -r kill; ip netns del {g}",
                g = n.netns()
            ),
        );
    }
    env.kubectl_ok(&["delete", "namespace", NS, "--wait=false"])
        .unwrap();
    let (_, took) = wait_for(Duration::from_secs(120), "nothing left on the VM hosts", || {
        for h in &vms.names {
            let (out, _) = vms.sh(
                h,
                "ip -o link show | grep ': yk'; nft list tables | grep yukumo; ls /run/netns; ls /run/yukumo-agent/net 2>/dev/null",
            );
            if !out.trim().is_empty() {
                return Err(format!("{h}: {out}"));
            }
        }
        Ok(())
    })
    .unwrap();
    println!(
        "teardown: no yukumo link, table, router namespace or lease file on the VM hosts after {took:?}"
    );
    wait_for(Duration::from_secs(120), "the namespace gone", || {
        if env.kubectl(&["get", "namespace", NS]).status.success() {
            Err("still there".into())
        } else {
            Ok(())
        }
    })
    .unwrap();
}
