//! The engine's contract at run time: the agent drives the kernel by
//! netlink, writes disks and fetches images in-process, so a cluster's
//! whole life — create, scale up and down, a network change, delete —
//! starts no `ip`, `bridge`, `qemu-img`, `genisoimage` or `curl` process.
//! Every program an agent executes is recorded with `strace -f -e execve`
//! attached to it (its threads and any child it forks).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use yukumo_e2e::{Env, tiny_image, wait_for};

/// Programs the agent must never start.
const FORBIDDEN: [&str; 5] = ["ip", "bridge", "qemu-img", "genisoimage", "curl"];

/// `strace` attached to a process; stopped (detached) on drop.
struct Tracer {
    child: Child,
    out: PathBuf,
}

impl Tracer {
    fn attach(pid: i32, out: &Path) -> Tracer {
        let child = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=execve", "-s", "256", "-o"])
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace is installed by e2e/lib/tools.sh");
        Tracer {
            child,
            out: out.to_path_buf(),
        }
    }

    /// Detach, and count the programs executed, by file name.
    fn programs(mut self) -> BTreeMap<String, usize> {
        yukumo_e2e::signal(self.child.id() as i32, "INT");
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            // `<pid> execve("/usr/sbin/nft", ["nft", …], …) = 0`
            let Some(rest) = line.split("execve(\"").nth(1) else {
                continue;
            };
            let Some(path) = rest.split('"').next() else {
                continue;
            };
            let name = path.rsplit('/').next().unwrap_or(path).to_string();
            *out.entry(name).or_default() += 1;
        }
        out
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            yukumo_e2e::signal(self.child.id() as i32, "INT");
            let _ = self.child.wait();
        }
    }
}

fn cluster(ns: &str, workers: u32, firewall: &str) -> String {
    let (path, sum) = tiny_image();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec:
  cidr: 10.0.0.0/24
  segment: {{type: vxlan}}
  homeSite: local
  firewall: [{firewall}]
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: eng, namespace: {ns}}}
spec:
  networkGroup: net
  startOrder: Parallel
  frontend:
    size: {{cpu: 1, memory: 128Mi}}
    publicIP: true
    image: {{url: 'file://{path}', checksum: '{sum}'}}
  pools:
  - {{name: w, replicas: {workers}, size: {{cpu: 1, memory: 128Mi}}}}
"
    )
}

fn wait_ready(env: &Env, ns: &str, want: &str) {
    wait_for(Duration::from_secs(300), want, || {
        let vc = env.get_json(&["-n", ns, "get", "vc", "eng"]);
        let ready = vc["status"]["ready"].as_str().unwrap_or("").to_string();
        if ready == want {
            Ok(())
        } else {
            Err(format!("{ready} {}", vc["status"]["conditions"]))
        }
    })
    .unwrap();
}

#[test]
fn a_clusters_whole_life_starts_no_ip_bridge_qemu_img_genisoimage_or_curl() {
    let env = Env::get();
    let ns = "engine";
    let dir = tempfile::tempdir().unwrap();
    let tracers: Vec<(String, Tracer)> = env
        .hosts()
        .into_iter()
        .map(|h| {
            let pid = env.pid(&format!("agent-{h}")).expect("agent pid");
            let t = Tracer::attach(pid, &dir.path().join(format!("{h}.trace")));
            (h, t)
        })
        .collect();
    // strace needs a moment to attach to every thread.
    std::thread::sleep(Duration::from_secs(1));
    env.apply(&cluster(ns, 2, "{protocol: tcp, ports: '22'}"));
    wait_ready(&env, ns, "3/3");
    env.apply(&cluster(ns, 3, "{protocol: tcp, ports: '22'}"));
    wait_ready(&env, ns, "4/4");
    // A network change: a firewall rule more (a router table replaced).
    env.apply(&cluster(
        ns,
        3,
        "{protocol: tcp, ports: '22'}, {protocol: tcp, ports: '8080', to: All}",
    ));
    std::thread::sleep(Duration::from_secs(3));
    env.apply(&cluster(ns, 1, "{protocol: tcp, ports: '22'}"));
    wait_ready(&env, ns, "2/2");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"])
        .unwrap();
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for (host, t) in tracers {
        let progs = t.programs();
        println!("{host}: programs executed by the agent: {progs:?}");
        for (k, v) in progs {
            *total.entry(k).or_default() += v;
        }
    }
    println!("all agents: {total:?}");
    for p in FORBIDDEN {
        assert_eq!(total.get(p), None, "the agent ran {p}: {total:?}");
    }
    // What may still run: nft (one transaction per table) and dnsmasq;
    // and, for host-1's periodic report of the environment's `rbd` pool,
    // `rbd` and the agent itself as its librados helper (`/proc/self/exe
    // rados-mon-command`, traced as `exe`: the monitors' `df`, in a child
    // so that a client library's abort cannot take the agent down).
    for p in total.keys() {
        assert!(
            ["nft", "dnsmasq", "rbd", "exe"].contains(&p.as_str()),
            "unexpected program {p}: {total:?}"
        );
    }
    assert!(
        total.get("nft").copied().unwrap_or(0) > 0,
        "the trace saw the agents' nft: {total:?}"
    );
}
