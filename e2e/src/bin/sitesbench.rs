//! `make bench`, sites: what a group stretched between two Sites gets
//! through their gateways' tunnel, against the WAN under it, measured in
//! one run.
//!
//! Two gateway hosts (network namespaces, one per Site) on a WAN namespace
//! whose ports are 1 Gbit/s links (`tbf`: the seed's sites were joined by
//! 1 Gbit/s), each with one guest (a namespace on a veth "tap" of the
//! group's bridge, with the node's MAC, address and the group's MTU). The
//! gateways' network is made by the agent's own dataplane on the real
//! kernel from the plans it would compute (WAN port, filter, endpoint
//! address, shaper), nothing by hand. Measured with iperf3 (TCP) and ping:
//! gateway to gateway over the WAN (`underlay_*`), guest to guest through
//! the tunnel (`tunnel_*`), then guest to guest with both Sites capping
//! the tunnel at `--cap-mbps` (`capped_mbps`). Results: `--out` JSON.
//! Everything it made is removed at the end, also on failure.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use yukumo_agent::network::dataplane::{Dataplane, Pass};
use yukumo_agent::network::decide::HostEnv;
use yukumo_agent::network::plan::{self, GatewayInputs, HostPlan, tap_name};
use yukumo_agent::network::real::RealKernel;
use yukumo_api::{NetworkGroup, VirtualNode};

struct Opts {
    out: String,
    seconds: u32,
    cap_mbps: u32,
    wan_mbps: u32,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        out: "target/bench/sites.json".into(),
        seconds: 5,
        cap_mbps: 200,
        wan_mbps: 1000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => o.out = val()?,
            "--seconds" => o.seconds = val()?.parse()?,
            "--cap-mbps" => o.cap_mbps = val()?.parse()?,
            "--wan-mbps" => o.wan_mbps = val()?.parse()?,
            other => {
                bail!("unknown argument {other} (--out F, --seconds N, --cap-mbps N, --wan-mbps N)")
            }
        }
    }
    Ok(o)
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    run(&v)
}

/// The namespaces, the processes and the state directory of one run;
/// removed when dropped.
struct Lab {
    prefix: String,
    names: Vec<String>,
    servers: Vec<Child>,
    state: tempfile::TempDir,
}

impl Lab {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Site, gateway, its WAN address and endpoint, its guest's address and MAC.
const SITES: [(&str, &str, &str, &str, &str, &str); 2] = [
    (
        "a",
        "ga",
        "100.64.0.1",
        "100.64.0.101",
        "10.0.0.9",
        "02:00:00:00:00:09",
    ),
    (
        "b",
        "gb",
        "100.64.0.2",
        "100.64.0.102",
        "10.0.0.10",
        "02:00:00:00:00:0a",
    ),
];

fn group(cap: Option<u32>) -> Result<Arc<NetworkGroup>> {
    let tunnels: Vec<serde_json::Value> = SITES
        .iter()
        .map(|(site, gw, _, ep, _, _)| {
            // Held by the Site's gateway (an end without one is closed).
            serde_json::json!({"site": site, "address": ep, "port": 4790, "bandwidthMbps": cap, "gateway": gw})
        })
        .collect();
    Ok(Arc::new(serde_json::from_value(serde_json::json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "NetworkGroup",
        "metadata": {"name": "net", "namespace": "bench", "uid": "g1", "resourceVersion": "1"},
        "spec": {"cidr": "10.0.0.0/24", "segment": {"type": "vxlan"}, "homeSite": "a", "sites": ["b"]},
        "status": {
            "segment": {"type": "vxlan", "id": 1000}, "gateway": "10.0.0.1", "mtu": 1450,
            "hosts": [{"name": "ga", "underlay": "10.255.0.1", "site": "a"},
                      {"name": "gb", "underlay": "10.255.0.2", "site": "b"}],
            "tunnels": tunnels
        }
    }))?))
}

fn node(host: &str, ip: &str, mac: &str) -> Result<Arc<VirtualNode>> {
    Ok(Arc::new(serde_json::from_value(serde_json::json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
        "metadata": {"name": format!("c-{host}"), "namespace": "bench",
                     "uid": format!("{:0>12}", mac.replace(':', ""))},
        "spec": {"cluster": "c", "role": "worker", "hostname": host, "host": host,
                 "resources": {"cpu": 1, "memoryMiB": 128},
                 "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))},
                 "network": {"group": "net", "ip": ip, "prefix": 24, "gateway": "10.0.0.1",
                             "mac": mac, "segment": {"type": "vxlan", "id": 1000}, "mtu": 1450}}
    }))?))
}

fn plan_of(lab: &Lab, i: usize, cap: Option<u32>) -> Result<HostPlan> {
    let (site, gw, _, ep, ip, mac) = SITES[i];
    let groups = vec![group(cap)?];
    let nodes = vec![node(gw, ip, mac)?];
    let g = GatewayInputs {
        dev: "wan0".into(),
        endpoint: format!("{ep}:4790").parse()?,
        bandwidth_mbps: cap,
        active: true,
        encryption: Default::default(),
        wan_mtu: 1500,
    };
    Ok(plan::plan(&plan::Inputs {
        host: gw,
        netns_prefix: &format!("{}-", lab.ns(gw)),
        groups: &groups,
        nodes: &nodes,
        external: None,
        underlay: None,
        site,
        gateway: Some(&g),
    }))
}

/// iperf3 from namespace `from` to `to` (a server in `server_ns`), Mbit/s
/// received.
fn iperf(lab: &mut Lab, server_ns: &str, from: &str, to: &str, seconds: u32) -> Result<f64> {
    let server = Command::new("ip")
        .args(["netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 -s")?;
    lab.servers.push(server);
    let t = Instant::now();
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", from, "iperf3", "-J", "-c", to, "-t"])
            .arg(seconds.to_string())
            .output()?;
        // (iperf3 -J may exit 0 with an "error", e.g. before its server
        // listens.)
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64()
            && out.status.success()
        {
            return Ok(bps / 1e6);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "iperf3 {from} -> {to}: {} {}",
            v["error"],
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Mean round trip (ms) of 50 pings from namespace `from` to `to`.
fn rtt(from: &str, to: &str) -> Result<f64> {
    let out = in_ns(
        from,
        &["ping", "-q", "-c", "50", "-i", "0.01", "-W", "1", to],
    )?;
    let line = out
        .lines()
        .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))
        .with_context(|| format!("ping {to}: {out}"))?;
    let avg = line
        .split('=')
        .nth(1)
        .and_then(|v| v.trim().split('/').nth(1))
        .with_context(|| format!("ping summary {line}"))?;
    Ok(avg.parse()?)
}

async fn apply_both(lab: &Lab, dps: &[Dataplane<RealKernel>], cap: Option<u32>) -> Result<()> {
    for (i, dp) in dps.iter().enumerate() {
        let p = plan_of(lab, i, cap)?;
        dp.apply(&p, Pass::Changed).await?;
        let again = dp.apply(&p, Pass::Verify).await?;
        ensure!(
            again.total() == 0,
            "{}: a converged pass changed {again:?}",
            SITES[i].1
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = opts()?;
    let mut lab = Lab {
        prefix: format!("yks{}", std::process::id() % 100_000),
        names: Vec::new(),
        servers: Vec::new(),
        state: tempfile::tempdir()?,
    };
    for n in ["wan", "ga", "gb", "va", "vb"] {
        let ns = lab.ns(n);
        run(&["ip", "netns", "add", &ns])?;
        lab.names.push(ns.clone());
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    }
    let wan = lab.ns("wan");
    run(&["ip", "-n", &wan, "link", "add", "br0", "type", "bridge"])?;
    run(&["ip", "-n", &wan, "link", "set", "br0", "up"])?;
    let burst = format!("{}kb", (o.wan_mbps / 8).max(64));
    for (i, (_, gw, addr, _, ip, mac)) in SITES.iter().enumerate() {
        let (g, v) = (lab.ns(gw), lab.ns(if i == 0 { "va" } else { "vb" }));
        let port = format!("p{i}");
        run(&[
            "ip", "-n", &wan, "link", "add", &port, "type", "veth", "peer", "name", "wan0",
            "netns", &g,
        ])?;
        run(&[
            "ip", "-n", &wan, "link", "set", &port, "master", "br0", "up",
        ])?;
        // The WAN link: o.wan_mbps towards each gateway.
        in_ns(
            &wan,
            &[
                "tc",
                "qdisc",
                "add",
                "dev",
                &port,
                "root",
                "tbf",
                "rate",
                &format!("{}mbit", o.wan_mbps),
                "burst",
                &burst,
                "latency",
                "50ms",
            ],
        )?;
        run(&[
            "ip",
            "-n",
            &g,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "wan0",
        ])?;
        run(&["ip", "-n", &g, "link", "set", "wan0", "up"])?;
        // The guest: a veth named as its tap, on the group's bridge.
        let tap = tap_name(&format!("{:0>12}", mac.replace(':', "")));
        run(&[
            "ip", "-n", &g, "link", "add", &tap, "type", "veth", "peer", "name", "eth0", "netns",
            &v,
        ])?;
        run(&["ip", "-n", &g, "link", "set", &tap, "up"])?;
        run(&[
            "ip", "-n", &v, "link", "set", "eth0", "address", mac, "mtu", "1450", "up",
        ])?;
        run(&[
            "ip",
            "-n",
            &v,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ])?;
    }
    let dps: Vec<Dataplane<RealKernel>> = SITES
        .iter()
        .map(|(_, gw, ..)| {
            let ns = lab.ns(gw);
            Dataplane::new(
                RealKernel::new(Some(ns.clone()), lab.state.path().join(gw)),
                format!("{ns}-"),
                HostEnv {
                    underlay: None,
                    uplink: None,
                },
                Some(ns),
            )
        })
        .collect();
    let t = Instant::now();
    apply_both(&lab, &dps, None).await?;
    println!(
        "sites bench: two gateways' tunnel made by the agent's dataplane in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let (va, vb, ga, gb) = (lab.ns("va"), lab.ns("vb"), lab.ns("ga"), lab.ns("gb"));
    let t = Instant::now();
    while in_ns(&va, &["ping", "-c", "1", "-W", "1", "10.0.0.10"]).is_err() {
        if t.elapsed() > Duration::from_secs(15) {
            if std::env::var_os("YUKUMO_SITESBENCH_KEEP").is_some() {
                eprintln!("kept for a look: namespaces {:?}", lab.names);
                std::mem::forget(lab);
            }
            bail!("the guests do not reach each other through the tunnel");
        }
    }
    let rtt_underlay = rtt(&ga, "100.64.0.2")?;
    let rtt_tunnel = rtt(&va, "10.0.0.10")?;
    let underlay = iperf(&mut lab, &gb, &ga, "100.64.0.2", o.seconds)?;
    let tunnel = iperf(&mut lab, &vb, &va, "10.0.0.10", o.seconds)?;
    // Both Sites cap their tunnels.
    apply_both(&lab, &dps, Some(o.cap_mbps)).await?;
    let capped = iperf(&mut lab, &vb, &va, "10.0.0.10", o.seconds)?;
    // The agent's teardown: nothing of yukumo left in the gateways.
    for dp in &dps {
        dp.apply(&HostPlan::default(), Pass::Changed).await?;
    }
    let ratio = tunnel / underlay;
    let capped_ratio = capped / f64::from(o.cap_mbps);
    println!(
        "WAN (emulated {} Mbit/s links): {underlay:.0} Mbit/s, RTT {rtt_underlay:.3} ms",
        o.wan_mbps
    );
    println!(
        "tunnel (guest to guest, MTU 1450): {tunnel:.0} Mbit/s = {ratio:.3} of the WAN (target >= 0.9: {}), RTT {rtt_tunnel:.3} ms",
        if ratio >= 0.9 { "met" } else { "NOT met" }
    );
    println!(
        "capped at {} Mbit/s: {capped:.0} Mbit/s = {capped_ratio:.3} of the cap (target <= 1.05: {})",
        o.cap_mbps,
        if capped_ratio <= 1.05 {
            "met"
        } else {
            "NOT met"
        }
    );
    let json = serde_json::json!({
        "underlay_mbps": underlay,
        "tunnel_mbps": tunnel,
        "tunnel_ratio": ratio,
        "cap_mbps": o.cap_mbps,
        "capped_mbps": capped,
        "capped_ratio": capped_ratio,
        "rtt_underlay_ms": rtt_underlay,
        "rtt_tunnel_ms": rtt_tunnel,
        "wan_link_mbps": o.wan_mbps,
        "seconds_per_measurement": o.seconds,
    });
    if let Some(dir) = std::path::Path::new(&o.out).parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", o.out);
    drop(lab);
    Ok(())
}
