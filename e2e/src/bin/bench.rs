//! yukumo-bench: the compute benchmark behind `make bench` (run by
//! `e2e/bench.sh`, which starts the environment it measures).
//!
//! Part 1, scale: 10 VirtualClusters × 200 nodes on the agents of site
//! `bench` (each on a libvirt test-driver instance of its own), from
//! apply to every cluster Ready; the baseline in the same run is raw
//! define+start of as many domains on the test driver plus raw creation of as
//! many objects with the kube client (same write concurrency as the
//! controller). API writes are counted from the API server's own metrics.
//! Not in the baseline but printed beside it: a status write of each raw
//! object, so the raw client's own two writes per node (create, status) give
//! a floor for the converge (`api_floor_ratio`); and the CPU seconds each
//! component and the machine used during the converge, and the API
//! requests it served, by verb and resource.
//! Then a 60 s steady state (writes counted), a forced full resync of every
//! agent (SIGHUP; mutating libvirt calls counted from the agents' metrics),
//! and peak RSS of the controller and the agents.
//!
//! Part 2, real guests: 10 tiny guests on the simulated libvirt hosts, from
//! apply to every guest's userspace printing its config on its console,
//! against raw `virsh define` + `start` of the same domains (same XML, fresh
//! overlays, the same config disks) to userspace.
//!
//! Prints figures with their targets and writes them as JSON (`--out`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use yukumo_api::{VirtualCluster, VirtualNode};
use yukumo_e2e::Env;

struct Opts {
    out: PathBuf,
    clusters: usize,
    nodes_per_cluster: usize,
    steady_secs: u64,
    real_guests: usize,
    skip_real: bool,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        out: PathBuf::from("target/bench/compute.json"),
        clusters: 10,
        nodes_per_cluster: 200,
        steady_secs: 60,
        real_guests: 10,
        skip_real: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().context(format!("{a} needs a value"));
        match a.as_str() {
            "--out" => o.out = PathBuf::from(val()?),
            "--clusters" => o.clusters = val()?.parse()?,
            "--nodes-per-cluster" => o.nodes_per_cluster = val()?.parse()?,
            "--steady-secs" => o.steady_secs = val()?.parse()?,
            "--real-guests" => o.real_guests = val()?.parse()?,
            "--skip-real" => o.skip_real = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

/// The API server's metrics text.
async fn api_metrics() -> Result<String> {
    tokio::task::spawn_blocking(|| sh("kubectl", &["get", "--raw", "/metrics"])).await?
}

/// The samples of metric `family` in a metrics text: each one's label
/// lookup (a missing label is empty) and value.
fn samples<'a>(
    text: &'a str,
    family: &'a str,
) -> impl Iterator<Item = (impl Fn(&str) -> String + 'a, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(family)?.strip_prefix('{')?;
        let (labels, value) = rest.rsplit_once("} ")?;
        let label = move |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        Some((label, value.trim().parse::<f64>().unwrap_or(0.0)))
    })
}

/// Writes the API server counted, by resource, from `apiserver_request_total`.
async fn api_writes() -> Result<BTreeMap<String, f64>> {
    Ok(writes_in(&api_metrics().await?))
}

fn writes_in(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (label, value) in samples(text, "apiserver_request_total") {
        let verb = label("verb");
        if ![
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
            "DELETECOLLECTION",
            "APPLY",
        ]
        .contains(&verb.as_str())
        {
            continue;
        }
        let (group, resource) = (label("group"), label("resource"));
        let key = if group == "yukumo.io" || resource == "events" {
            resource
        } else {
            continue;
        };
        *out.entry(key).or_default() += value;
    }
    out
}

/// Every request the API server served, by verb, resource and subresource
/// (`apiserver_request_total`), and the watch events it sent, by kind
/// (`apiserver_watch_events_total`): where its CPU goes.
async fn api_requests() -> Result<BTreeMap<String, f64>> {
    Ok(requests_in(&api_metrics().await?))
}

fn requests_in(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (label, value) in samples(text, "apiserver_request_total") {
        let sub = label("subresource");
        let key = format!(
            "{} {}{}{sub}",
            label("verb"),
            label("resource"),
            if sub.is_empty() { "" } else { "/" }
        );
        *out.entry(key).or_default() += value;
    }
    for (label, value) in samples(text, "apiserver_watch_events_total") {
        // `resource` in newer API servers, `kind` before.
        let key = format!("watch-event {}{}", label("resource"), label("kind"));
        *out.entry(key).or_default() += value;
    }
    out
}

/// Writes by yukumo's reconcilers: its kinds and Events, without Host
/// heartbeats (a fixed rate per host by design, reported separately).
fn reconciler_writes(m: &BTreeMap<String, f64>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.as_str() != "hosts")
        .map(|(_, v)| v)
        .sum()
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// Peak resident memory (VmHWM) of a process, in MB.
fn peak_rss_mb(pid: i32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

/// A memory figure of /proc/<pid>/status, in MB (`RssAnon:`: the process's
/// own heap and stacks, without the shared libraries' pages).
fn status_mb(pid: i32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn sha256_file(p: &Path) -> Result<String> {
    let out = sh("sha256sum", &[&p.to_string_lossy()])?;
    Ok(format!(
        "sha256:{}",
        out.split_whitespace().next().unwrap_or_default()
    ))
}

/// A domain like the agent's (disk overlay, config cdrom, serial log), for
/// the raw libvirt baseline.
fn baseline_domain_xml(i: usize, dir: &Path) -> String {
    let uuid = format!("00000000-0000-4000-8000-{i:012}");
    let d = dir.to_string_lossy();
    format!(
        "<domain type='qemu'><name>raw-{i}</name><uuid>{uuid}</uuid>
<memory unit='MiB'>16</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
<features><acpi/></features><on_crash>restart</on_crash>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{d}/raw-{i}/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{d}/raw-{i}/config.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
<serial type='file'><source path='{d}/raw-{i}/console.log' append='on'/><target port='0'/></serial>
</devices></domain>"
    )
}

/// Baseline part 1: raw define + start of `n` domains on a test-driver
/// instance of the environment's test libvirtd, as the agents have (libvirt's
/// own client library, through the same daemon).
fn raw_libvirt(uri: &str, n: usize) -> Result<Duration> {
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let mut conn = virt::connect::Connect::open(Some(uri))?;
    for i in 0..n {
        let d = virt::domain::Domain::define_xml(&conn, &baseline_domain_xml(i, dir.path()))?;
        d.create()?;
    }
    let took = t.elapsed();
    conn.close()?;
    Ok(took)
}

/// A VirtualNode as the controller writes it, but placed on no host.
fn baseline_node(ns: &str, i: usize, image: &Value) -> Result<VirtualNode> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
        "metadata": {"name": format!("raw-{i}"), "namespace": ns,
                     "labels": {"yukumo.io/host": "baseline-nowhere", "yukumo.io/cluster": "raw"}},
        "spec": {"cluster": "raw", "role": "worker", "pool": "worker", "index": i,
                 "hostname": format!("raw-{i}"), "host": "baseline-nowhere", "site": "bench",
                 "resources": {"cpu": 1, "memoryMiB": 16}, "image": image, "running": true}
    }))?)
}

/// The raw client's writes: the baseline's creates, then (not in the
/// baseline) a status write of each object (JSON merge patch); with the API
/// server's CPU seconds during each.
struct RawObjects {
    create: Duration,
    create_cpu: f64,
    status: Duration,
    status_cpu: f64,
}

/// Baseline part 2: raw creation of `n` objects with the kube client, 16 at a time.
async fn raw_objects(env: &Env, client: &Client, n: usize, image: &Value) -> Result<RawObjects> {
    let ns = "bench-baseline";
    apply_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
    ))?;
    let api: Api<VirtualNode> = Api::namespaced(client.clone(), ns);
    let nodes: Vec<VirtualNode> = (0..n)
        .map(|i| baseline_node(ns, i, image))
        .collect::<Result<_>>()?;
    let cpu_of = |name: &str| env.pid(name).map(cpu_seconds).unwrap_or(f64::NAN);
    let cpu0 = cpu_of("kube-apiserver");
    let t = Instant::now();
    let results: Vec<Result<VirtualNode, kube::Error>> = futures::stream::iter(nodes)
        .map(|vn| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &vn).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let took = t.elapsed();
    let create_cpu = cpu_of("kube-apiserver") - cpu0;
    for r in results {
        r?;
    }
    // Not part of the baseline: the second API write a node costs in
    // yukumo's design (its agent's status: DESIGN.md, desired state by the
    // controller, status by the agent), written here by the raw client with
    // nothing else running, as the cheapest write there is (a JSON merge
    // patch; the agent's server-side apply costs about 5% more). The two
    // together are a floor for the converge on this machine, before any
    // agent, libvirt or controller work.
    let cpu0 = cpu_of("kube-apiserver");
    let t = Instant::now();
    let status = json!({"status": {"observedGeneration": 1, "phase": "Running", "host": "baseline-nowhere",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                                   "message": "the domain is running", "observedGeneration": 1,
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let results: Vec<Result<VirtualNode, kube::Error>> = futures::stream::iter(0..n)
        .map(|i| {
            let (api, status) = (api.clone(), status.clone());
            async move {
                api.patch_status(
                    &format!("raw-{i}"),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&status),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let status_took = t.elapsed();
    for r in results {
        r?;
    }
    let status_cpu = cpu_of("kube-apiserver") - cpu0;
    // Gone before anything else is measured: its 2,000 deletions must not
    // run during the converge or the steady state.
    sh(
        "kubectl",
        &["delete", "namespace", ns, "--wait=true", "--timeout=300s"],
    )?;
    Ok(RawObjects {
        create: took,
        create_cpu,
        status: status_took,
        status_cpu,
    })
}

/// Server-side apply one object (a Namespace, a NetworkGroup, a
/// VirtualCluster) with the client.
async fn apply_doc(client: &Client, doc: &Value) -> Result<()> {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    let obj: DynamicObject = serde_json::from_value(doc.clone())?;
    let tm = obj.types.clone().context("apiVersion and kind")?;
    let (group, version) = match tm.api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), tm.api_version.clone()),
    };
    let plural = format!("{}s", tm.kind.to_lowercase());
    let ar = ApiResource {
        group,
        version,
        api_version: tm.api_version.clone(),
        kind: tm.kind.clone(),
        plural,
    };
    let name = obj.metadata.name.clone().context("name")?;
    let api: Api<DynamicObject> = match &obj.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.patch(
        &name,
        &PatchParams::apply("yukumo-bench"),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}

fn apply_yaml(text: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    child
        .stdin
        .as_mut()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let st = child.wait()?;
    if !st.success() {
        bail!("kubectl apply failed");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cluster_yaml(
    ns: &str,
    name: &str,
    site: &str,
    workers: usize,
    memory: &str,
    image_url: &str,
    checksum: &str,
    parallel: bool,
) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/16, segment: {{type: vxlan}}, homeSite: {site}}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: {name}, namespace: {ns}}}
spec:
  networkGroup: net
  startOrder: {}
  frontend:
    size: {{cpu: 1, memory: {memory}}}
    gatewayHost: false
    image: {{url: '{image_url}', checksum: '{checksum}'}}
  pools:
  - {{name: worker, replicas: {workers}, size: {{cpu: 1, memory: {memory}}}}}
",
        if parallel {
            "Parallel"
        } else {
            "FrontendFirst"
        }
    )
}

fn ready(vc: &VirtualCluster) -> bool {
    vc.status.as_ref().is_some_and(|s| {
        s.desired_nodes > 0
            && s.ready_nodes == s.desired_nodes
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == yukumo_api::ConditionStatus::True)
    })
}

/// Sum of a counter family over the agents' /metrics.
fn agents_metric(env: &Env, agents: &[String], name: &str) -> f64 {
    agents
        .iter()
        .filter_map(|a| env.metrics_port(&format!("agent-{a}")))
        .filter_map(|port| env.http_get(port, "/metrics").ok())
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum::<f64>()
        })
        .sum()
}

/// The agents `e2e/bench.sh` started (`bench-1` … `bench-N`).
fn agent_count() -> usize {
    std::env::var("YUKUMO_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

struct Scale {
    vms: usize,
    converge_s: f64,
    baseline_libvirt_s: f64,
    baseline_objects_s: f64,
    raw: RawObjects,
    converge_cpu: BTreeMap<String, f64>,
    api_writes: BTreeMap<String, f64>,
    steady_writes: BTreeMap<String, f64>,
    heartbeats_per_s: f64,
    resync_mutations: f64,
    resync_nodes: usize,
    controller_rss_mb: f64,
    agent_rss_mb: f64,
    controller_anon_mb: f64,
    agent_anon_mb: f64,
}

async fn scale(env: &Env, client: &Client, o: &Opts) -> Result<Scale> {
    let agents: Vec<String> = (1..=agent_count()).map(|i| format!("bench-{i}")).collect();
    let vms = o.clusters * o.nodes_per_cluster;
    let work = tempfile::tempdir()?;
    let image = work.path().join("bench.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &image.to_string_lossy(),
            "64M",
        ],
    )?;
    let checksum = sha256_file(&image)?;
    let url = format!("file://{}", image.display());
    let image_json = json!({"url": url, "checksum": checksum});

    println!("baseline: raw define+start of {vms} domains on libvirt's test driver ...");
    let baseline_libvirt = raw_libvirt(&env.test_libvirt_uri("bench-baseline"), vms)?;
    println!("  {:.2} s", baseline_libvirt.as_secs_f64());
    println!("baseline: raw creation of {vms} VirtualNode objects (16 in flight) ...");
    let raw = raw_objects(env, client, vms, &image_json).await?;
    let baseline_objects = raw.create;
    println!(
        "  {:.2} s (API server {:.1} CPU-s); then a status write of each (merge patch; not in the baseline): {:.2} s ({:.1} CPU-s)",
        raw.create.as_secs_f64(),
        raw.create_cpu,
        raw.status.as_secs_f64(),
        raw.status_cpu
    );

    let before = api_writes().await?;
    let requests0 = api_requests().await?;
    println!(
        "apply {} VirtualClusters x {} nodes on {} agents ...",
        o.clusters,
        o.nodes_per_cluster,
        agents.len()
    );
    // The clusters are applied with the client (as the baseline creates its
    // objects), and their readiness followed by a watch: the measurement
    // itself spawns no process and polls nothing.
    let docs: Vec<Value> = (0..o.clusters)
        .flat_map(|c| {
            serde_yaml::Deserializer::from_str(&cluster_yaml(
                &format!("bench-{c}"),
                "scale",
                "bench",
                o.nodes_per_cluster - 1,
                "16Mi",
                &url,
                &checksum,
                false,
            ))
            .map(|d| {
                serde_yaml::from_value::<Value>(serde_yaml::Value::deserialize(d).expect("yaml"))
            })
            .collect::<Vec<_>>()
        })
        .collect::<Result<_, _>>()?;
    let vcs: Api<VirtualCluster> = Api::all(client.clone());
    let (store, writer) = kube::runtime::reflector::store::<VirtualCluster>();
    let mut watch = std::pin::pin!(kube::runtime::reflector(
        writer,
        kube::runtime::watcher(vcs, kube::runtime::watcher::Config::default()),
    ));
    let cpu0 = cpu_by_component(env, &agents);
    let t = Instant::now();
    for d in &docs {
        apply_doc(client, d).await?;
    }
    let deadline = Duration::from_secs(900);
    let mut last_print = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
        if let Ok(Some(ev)) = next {
            ev?;
        }
        let mine: Vec<std::sync::Arc<VirtualCluster>> = store
            .state()
            .into_iter()
            .filter(|v| v.namespace().is_some_and(|n| n.starts_with("bench-")))
            .collect();
        let done = mine.iter().filter(|v| ready(v)).count();
        if done == o.clusters {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            let nodes: i32 = mine
                .iter()
                .filter_map(|v| v.status.as_ref().map(|s| s.ready_nodes))
                .sum();
            println!(
                "  {:.0} s: {done}/{} clusters ready, {nodes}/{vms} nodes",
                t.elapsed().as_secs_f64(),
                o.clusters
            );
            last_print = Instant::now();
        }
        if t.elapsed() > deadline {
            bail!("not converged after {deadline:?}");
        }
    }
    let converge = t.elapsed();
    println!("  all Ready after {:.2} s", converge.as_secs_f64());
    let cpu1 = cpu_by_component(env, &agents);
    let cpu: BTreeMap<String, f64> = cpu1
        .iter()
        .map(|(k, v)| (k.clone(), v - cpu0.get(k).copied().unwrap_or(0.0)))
        .collect();
    println!("  CPU seconds used meanwhile, by component: {cpu:.1?}");
    let mut requests: Vec<(String, f64)> = delta(&requests0, &api_requests().await?)
        .into_iter()
        .filter(|(_, v)| *v >= 10.0)
        .collect();
    requests.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("  API requests meanwhile (10 or more): {requests:?}");
    // Let the last status writes land before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = api_writes().await?;
    let writes = delta(&before, &after);
    let audit = audit_breakdown(env);
    println!("  VirtualNode writes in the audit log (who verb subresource code): {audit:?}");

    println!("steady state: {} s ...", o.steady_secs);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s0 = api_writes().await?;
    tokio::time::sleep(Duration::from_secs(o.steady_secs)).await;
    let s1 = api_writes().await?;
    let steady = delta(&s0, &s1);
    let heartbeats_per_s = steady.get("hosts").copied().unwrap_or(0.0) / o.steady_secs as f64;

    println!("forced full resync (SIGHUP) of every agent ...");
    let m0 = agents_metric(env, &agents, "yukumo_agent_libvirt_mutations_total");
    let r0 = agents_metric(env, &agents, "yukumo_agent_full_resyncs_total");
    for a in &agents {
        if let Some(pid) = env.pid(&format!("agent-{a}")) {
            yukumo_e2e::signal(pid, "HUP");
        }
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let m1 = agents_metric(env, &agents, "yukumo_agent_libvirt_mutations_total");
    let resynced = (agents_metric(env, &agents, "yukumo_agent_full_resyncs_total") - r0) as usize;
    let controller_rss = env
        .pid("controller-1")
        .and_then(peak_rss_mb)
        .unwrap_or(f64::NAN);
    let agent_rss = agents
        .iter()
        .filter_map(|a| env.pid(&format!("agent-{a}")).and_then(peak_rss_mb))
        .fold(0.0, f64::max);
    let controller_anon = env
        .pid("controller-1")
        .and_then(|p| status_mb(p, "RssAnon:"))
        .unwrap_or(f64::NAN);
    let agent_anon = agents
        .iter()
        .filter_map(|a| {
            env.pid(&format!("agent-{a}"))
                .and_then(|p| status_mb(p, "RssAnon:"))
        })
        .fold(0.0, f64::max);

    println!("cleanup: deleting the clusters ...");
    for c in 0..o.clusters {
        sh(
            "kubectl",
            &["delete", "namespace", &format!("bench-{c}"), "--wait=false"],
        )?;
    }
    Ok(Scale {
        vms,
        converge_s: converge.as_secs_f64(),
        baseline_libvirt_s: baseline_libvirt.as_secs_f64(),
        baseline_objects_s: baseline_objects.as_secs_f64(),
        raw,
        converge_cpu: cpu,
        api_writes: writes,
        steady_writes: steady,
        heartbeats_per_s,
        resync_mutations: m1 - m0,
        resync_nodes: resynced,
        controller_rss_mb: controller_rss,
        agent_rss_mb: agent_rss,
        controller_anon_mb: controller_anon,
        agent_anon_mb: agent_anon,
    })
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let ticks = 100.0; // USER_HZ
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) used so far by each component of the
/// environment: the API server, etcd, the controller, the agents (summed).
fn cpu_by_component(env: &Env, agents: &[String]) -> BTreeMap<String, f64> {
    let cpu = cpu_seconds;
    let mut out = BTreeMap::new();
    for (k, name) in [
        ("apiserver", "kube-apiserver"),
        ("etcd", "etcd"),
        ("controller", "controller-1"),
        ("kube-controller-manager", "kube-controller-manager"),
        ("libvirtd", "libvirtd-test"),
    ] {
        out.insert(k.to_string(), env.pid(name).map(cpu).unwrap_or(0.0));
    }
    out.insert(
        "agents".into(),
        agents
            .iter()
            .filter_map(|a| env.pid(&format!("agent-{a}")))
            .map(cpu)
            .sum(),
    );
    out.insert("bench".into(), cpu(std::process::id() as i32));
    // Every process of the machine (busy time of all CPUs).
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<f64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(f.iter().take(8).sum::<f64>() - f.get(3)? - f.get(4)?)
        })
        .unwrap_or(0.0);
    out.insert("machine".into(), machine / 100.0);
    out
}

/// A node's directory on a simulated host: `hosts/<host>/agent/nodes/<uid>`.
fn node_dir(dir: &Path, host: &str, uid: &str) -> PathBuf {
    dir.join(format!("hosts/{host}/agent/nodes/{uid}"))
}

/// A file in a node's directory.
fn node_file(dir: &Path, host: &str, uid: &str, file: &str) -> PathBuf {
    node_dir(dir, host, uid).join(file)
}

/// Writes of VirtualNodes in the audit log, by who, verb and subresource.
fn audit_breakdown(env: &Env) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(env.dir.join("logs/audit.log")) else {
        return out;
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["objectRef"]["resource"] != "virtualnodes"
            || !v["objectRef"]["namespace"]
                .as_str()
                .is_some_and(|n| n.starts_with("bench-") && n != "bench-baseline")
        {
            continue;
        }
        let who = v["user"]["username"]
            .as_str()
            .unwrap_or("")
            .rsplit(':')
            .next()
            .unwrap_or("")
            .to_string();
        let key = format!(
            "{who} {} {} {}",
            v["verb"].as_str().unwrap_or(""),
            v["objectRef"]["subresource"].as_str().unwrap_or("-"),
            v["responseStatus"]["code"]
        );
        *out.entry(key).or_default() += 1;
    }
    out
}

fn virsh(env: &Env, host: &str, args: &[&str]) -> Result<String> {
    let uri = format!(
        "qemu:///system?socket={}",
        env.dir
            .join(format!("hosts/{host}/run/libvirt-sock"))
            .display()
    );
    let mut a = vec!["-c", uri.as_str()];
    a.extend_from_slice(args);
    sh("virsh", &a)
}

/// Seconds until every console log has the guest's userspace line.
fn wait_consoles(consoles: &[PathBuf], since: Instant, limit: Duration) -> Result<f64> {
    loop {
        let up = consoles
            .iter()
            .filter(|p| {
                std::fs::read_to_string(p).is_ok_and(|s| s.contains("YUKUMO-GUEST hostname="))
            })
            .count();
        if up == consoles.len() {
            return Ok(since.elapsed().as_secs_f64());
        }
        if since.elapsed() > limit {
            bail!("{up}/{} guests reached userspace", consoles.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One captured domain: its host, XML, and files.
struct Captured {
    host: String,
    xml: String,
    dir: PathBuf,
    backing: String,
    size: u64,
}

/// Apply a cluster of `n` tiny guests on the simulated hosts and time it to
/// userspace; returns the time and the domains as defined.
async fn yukumo_guests(
    env: &Env,
    client: &Client,
    n: usize,
    run: &str,
) -> Result<(f64, Vec<Captured>)> {
    let tiny = std::env::var("YUKUMO_TINY_IMAGE").context("YUKUMO_TINY_IMAGE")?;
    let (path, checksum) = tiny.trim().split_once(' ').context("<path> <sum>")?;
    let ns = format!("bench-real-{run}");
    let t = Instant::now();
    apply_yaml(&cluster_yaml(
        &ns,
        "real",
        "local",
        n - 1,
        "128Mi",
        &format!("file://{path}"),
        checksum,
        true,
    ))?;
    let api: Api<VirtualNode> = Api::namespaced(client.clone(), &ns);
    let consoles = loop {
        let nodes = api.list(&ListParams::default()).await?.items;
        let placed: Vec<PathBuf> = nodes
            .iter()
            .filter_map(|vn| {
                Some(node_file(
                    &env.dir,
                    vn.spec.host.as_ref()?,
                    vn.metadata.uid.as_ref()?,
                    "console.log",
                ))
            })
            .collect();
        if placed.len() == n {
            break placed;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{}/{n} nodes placed", placed.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = wait_consoles(&consoles, t, Duration::from_secs(600))?;
    let mut captured = Vec::new();
    for vn in api.list(&ListParams::default()).await?.items {
        let host = vn.spec.host.clone().context("host")?;
        let uid = vn.metadata.uid.clone().context("uid")?;
        let name = virsh(env, &host, &["domname", &uid])?.trim().to_string();
        let xml = virsh(env, &host, &["dumpxml", "--inactive", &name])?;
        let dir = node_dir(&env.dir, &host, &uid);
        let info: Value = serde_json::from_str(&sh(
            "qemu-img",
            &[
                "info",
                "-U",
                "--output=json",
                &dir.join("root.qcow2").to_string_lossy(),
            ],
        )?)?;
        captured.push(Captured {
            host,
            xml,
            dir,
            backing: info["backing-filename"]
                .as_str()
                .context("backing file")?
                .to_string(),
            size: info["virtual-size"].as_u64().context("size")?,
        });
    }
    // Copy what the raw baseline reuses (config disks) before deletion.
    sh("kubectl", &["delete", "namespace", &ns, "--wait=true"])?;
    Ok((took, captured))
}

/// The raw baseline: the same domains, defined and started with virsh.
fn raw_guests(env: &Env, captured: &[Captured], configs: &[PathBuf]) -> Result<f64> {
    let base = env.dir.join("bench-raw");
    let mut defs = Vec::new();
    for (i, c) in captured.iter().enumerate() {
        let dir = base.join(format!("{i}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&configs[i], dir.join("cidata.iso"))?;
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                &c.backing,
                &dir.join("root.qcow2").to_string_lossy(),
                &c.size.to_string(),
            ],
        )?;
        // Same domain, other name/uuid/paths, without yukumo's marker, its
        // NIC on a bridge of the benchmark's own (the group's bridge went
        // with the yukumo cluster; the timing ends before the guest's DHCP).
        let mut xml = c
            .xml
            .replace(&c.dir.to_string_lossy().to_string(), &dir.to_string_lossy());
        xml = raw_nic(&xml);
        if let (Some(a), Some(b)) = (xml.find("<metadata>"), xml.find("</metadata>")) {
            xml.replace_range(a..b + "</metadata>".len(), "");
        }
        let name_start = xml.find("<name>").context("name")? + 6;
        let name_end = xml.find("</name>").context("name")?;
        xml.replace_range(name_start..name_end, &format!("bench-raw-{i}"));
        let uuid_start = xml.find("<uuid>").context("uuid")? + 6;
        let uuid_end = xml.find("</uuid>").context("uuid")?;
        xml.replace_range(
            uuid_start..uuid_end,
            &format!("00000000-0000-4000-9000-{i:012}"),
        );
        let file = dir.join("domain.xml");
        std::fs::write(&file, xml)?;
        defs.push((c.host.clone(), file, dir.join("console.log"), i));
    }
    let hosts: std::collections::BTreeSet<&String> = defs.iter().map(|d| &d.0).collect();
    for h in &hosts {
        let ns = host_netns(env, h)?;
        sh(
            "ip",
            &["-n", &ns, "link", "add", RAW_BRIDGE, "type", "bridge"],
        )?;
        sh("ip", &["-n", &ns, "link", "set", RAW_BRIDGE, "up"])?;
    }
    let t = Instant::now();
    for (host, file, _, i) in &defs {
        virsh(env, host, &["define", &file.to_string_lossy()])?;
        virsh(env, host, &["start", &format!("bench-raw-{i}")])?;
    }
    let consoles: Vec<PathBuf> = defs.iter().map(|d| d.2.clone()).collect();
    let took = wait_consoles(&consoles, t, Duration::from_secs(600));
    for (host, _, _, i) in &defs {
        let name = format!("bench-raw-{i}");
        let _ = virsh(env, host, &["destroy", &name]);
        let _ = virsh(env, host, &["undefine", &name]);
    }
    for h in &hosts {
        if let Ok(ns) = host_netns(env, h) {
            let _ = sh("ip", &["-n", &ns, "link", "del", RAW_BRIDGE]);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    took
}

/// The bridge the raw baseline's guests join on each host (not a name
/// yukumo's agent manages).
const RAW_BRIDGE: &str = "rawbench0";

/// A simulated host's network namespace.
fn host_netns(env: &Env, host: &str) -> Result<String> {
    Ok(
        std::fs::read_to_string(env.dir.join(format!("hosts/{host}/netns")))?
            .trim()
            .to_string(),
    )
}

/// The domain's NIC on [`RAW_BRIDGE`], its tap named by libvirt.
fn raw_nic(xml: &str) -> String {
    let mut out = String::new();
    for line in xml.lines() {
        let t = line.trim_start();
        if t.starts_with("<target dev='ykt") || t.starts_with("<target dev=\"ykt") {
            continue;
        }
        if t.starts_with("<source bridge=") {
            out.push_str(&format!("      <source bridge='{RAW_BRIDGE}'/>\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = opts()?;
    let env = Env::get();
    let client = Client::try_default().await?;
    let s = scale(&env, &client, &o).await?;
    let baseline_s = s.baseline_libvirt_s + s.baseline_objects_s;
    // The converge's two writes per node (create, status) by the raw client
    // alone: what the converge cannot go below here, whatever the agents
    // and the controller do.
    let api_floor_s = s.baseline_objects_s + s.raw.status.as_secs_f64();
    let total_writes = reconciler_writes(&s.api_writes);
    let steady = reconciler_writes(&s.steady_writes);

    let agents = agent_count();
    let mut real: Option<(f64, f64)> = None;
    if !o.skip_real {
        println!(
            "real guests: warm-up run of {} tiny guests ...",
            o.real_guests
        );
        let (_, _) = yukumo_guests(&env, &client, o.real_guests, "warmup").await?;
        println!("real guests: yukumo, apply -> userspace ...");
        let (t_yk, captured) = yukumo_guests_keep_configs(&env, &client, o.real_guests).await?;
        println!("  {t_yk:.1} s");
        println!("real guests: raw virsh define+start -> userspace ...");
        let t_raw = raw_guests(&env, &captured.0, &captured.1)?;
        println!("  {t_raw:.1} s");
        real = Some((t_yk, t_raw));
    }

    let result = json!({
        "vms": s.vms,
        "agents": agents,
        "converge_s": s.converge_s,
        "baseline_s": baseline_s,
        "baseline_libvirt_s": s.baseline_libvirt_s,
        "baseline_objects_s": s.baseline_objects_s,
        "converge_ratio": s.converge_s / baseline_s,
        "converge_cpu_s_by_component": s.converge_cpu,
        "baseline_objects_apiserver_cpu_s": s.raw.create_cpu,
        "raw_status_writes_s": s.raw.status.as_secs_f64(),
        "raw_status_writes_apiserver_cpu_s": s.raw.status_cpu,
        "api_floor_ratio": api_floor_s / baseline_s,
        "vms_per_second": s.vms as f64 / s.converge_s,
        "api_writes_per_vm": total_writes / s.vms as f64,
        "api_writes_by_resource": s.api_writes,
        "steady_state_writes": steady.abs(),
        "steady_state_secs": o.steady_secs,
        "host_heartbeat_writes_per_s": s.heartbeats_per_s,
        "resync_mutating_libvirt_calls": s.resync_mutations,
        "resync_agents": s.resync_nodes,
        "controller_rss_mb": s.controller_rss_mb,
        "agent_rss_mb": s.agent_rss_mb,
        "controller_rss_anon_mb": s.controller_anon_mb,
        "agent_rss_anon_mb": s.agent_anon_mb,
        "real_guests": if real.is_some() { o.real_guests } else { 0 },
        "real_guest_s": real.map(|r| r.0),
        "real_guest_baseline_s": real.map(|r| r.1),
        "real_guest_ratio": real.map(|r| r.0 / r.1),
    });
    println!();
    println!("== yukumo compute benchmark ==");
    let row = |what: &str, value: String, target: &str| {
        println!("{what:<44} {value:>14}   target {target}");
    };
    row(
        &format!("converge {} VMs (apply -> all Ready)", s.vms),
        format!("{:.2} s", s.converge_s),
        "",
    );
    row(
        "baseline (raw define+start + raw creates)",
        format!("{baseline_s:.2} s"),
        "",
    );
    row(
        "converge / baseline",
        format!("{:.2}x", s.converge_s / baseline_s),
        "<= 1.5x",
    );
    row(
        "  floor: raw creates + status writes / baseline",
        format!("{:.2}x", api_floor_s / baseline_s),
        "",
    );
    row(
        "VMs per second",
        format!("{:.1}", s.vms as f64 / s.converge_s),
        ">= 16",
    );
    row(
        "API writes per VM",
        format!("{:.2}", total_writes / s.vms as f64),
        "<= 3",
    );
    println!("   by resource: {:?}", s.api_writes);
    row(
        &format!("writes in {} s steady state", o.steady_secs),
        format!("{}", steady.abs()),
        "0",
    );
    println!(
        "   (host heartbeats, by design: {:.2} writes/s)",
        s.heartbeats_per_s
    );
    row(
        "mutating libvirt calls, forced full resync",
        format!("{}", s.resync_mutations),
        "0",
    );
    row(
        "controller peak RSS",
        format!("{:.1} MB", s.controller_rss_mb),
        "<= 64 MB",
    );
    row(
        &format!("agent peak RSS ({} VMs each)", s.vms / agents.max(1)),
        format!("{:.1} MB", s.agent_rss_mb),
        "<= 24 MB",
    );
    println!(
        "   (anonymous RSS at the end, without shared libraries: controller {:.1} MB, agent {:.1} MB)",
        s.controller_anon_mb, s.agent_anon_mb
    );
    if let Some((a, b)) = real {
        row(
            &format!("{} real guests to userspace: yukumo", o.real_guests),
            format!("{a:.1} s"),
            "",
        );
        row("  raw virsh define+start", format!("{b:.1} s"), "");
        row("  ratio", format!("{:.2}x", a / b), "<= 1.2x");
    }
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&result)?)?;
    println!("wrote {}", o.out.display());
    Ok(())
}

/// The measured yukumo run: like [`yukumo_guests`], keeping copies of the
/// config disks for the raw baseline.
async fn yukumo_guests_keep_configs(
    env: &Env,
    client: &Client,
    n: usize,
) -> Result<(f64, (Vec<Captured>, Vec<PathBuf>))> {
    let keep = env.dir.join("bench-configs");
    std::fs::create_dir_all(&keep)?;
    // Copy config disks as soon as the guests are up (before deletion).
    let copier = {
        let keep = keep.clone();
        let dir = env.dir.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let api: Api<VirtualNode> = Api::namespaced(client, "bench-real-measured");
            let mut copied: HashMap<String, PathBuf> = HashMap::new();
            for _ in 0..6000 {
                if let Ok(list) = api.list(&ListParams::default()).await {
                    for vn in list.items {
                        let (Some(h), Some(u)) = (vn.spec.host.clone(), vn.metadata.uid.clone())
                        else {
                            continue;
                        };
                        let src = node_file(&dir, &h, &u, "cidata.iso");
                        if !copied.contains_key(&u) && src.exists() {
                            let dst = keep.join(format!("{u}.iso"));
                            if std::fs::copy(&src, &dst).is_ok() {
                                copied.insert(u, dst);
                            }
                        }
                    }
                }
                if copied.len() >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            copied
        })
    };
    let (took, captured) = yukumo_guests(env, client, n, "measured").await?;
    let copied = copier.await?;
    let configs = captured
        .iter()
        .map(|c| {
            let uid = c
                .dir
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            copied
                .get(&uid)
                .cloned()
                .with_context(|| format!("config disk of {uid} not copied"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((took, (captured, configs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="yukumo.io",resource="virtualnodes",scope="resource",subresource="",verb="APPLY",version="v1alpha1"} 2000
apiserver_request_total{code="200",component="apiserver",dry_run="",group="yukumo.io",resource="virtualnodes",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 2003
apiserver_request_total{code="200",component="apiserver",dry_run="",group="yukumo.io",resource="networkgroups",scope="resource",subresource="",verb="GET",version="v1alpha1"} 229
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 42
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="configmaps",scope="resource",subresource="",verb="POST",version="v1"} 10
apiserver_request_total_other{verb="POST",group="yukumo.io",resource="hosts"} 99
apiserver_watch_events_total{group="yukumo.io",resource="virtualnodes",version="v1alpha1"} 12000
"#;

    #[test]
    fn writes_are_yukumo_kinds_and_events_by_resource() {
        let w = writes_in(METRICS);
        assert_eq!(
            w,
            BTreeMap::from([
                ("events".to_string(), 42.0),
                ("virtualnodes".to_string(), 4003.0)
            ])
        );
    }

    #[test]
    fn requests_are_by_verb_resource_and_subresource_with_watch_events() {
        let r = requests_in(METRICS);
        assert_eq!(r["APPLY virtualnodes"], 2000.0);
        assert_eq!(r["APPLY virtualnodes/status"], 2003.0);
        assert_eq!(r["GET networkgroups"], 229.0);
        assert_eq!(r["POST configmaps"], 10.0);
        assert_eq!(r["watch-event virtualnodes"], 12000.0);
        assert_eq!(r.len(), 6, "{r:?}");
    }
}
