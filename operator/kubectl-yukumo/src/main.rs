//! `kubectl yukumo`: what a user of a virtual cluster does by hand.
//!
//! - `status CLUSTER`: the cluster as a tree (nodes by pool, hosts,
//!   addresses, its network and volumes, conditions, recent Events);
//! - `scale CLUSTER POOL N`: a pool's replicas (a JSON patch that first
//!   tests the pool's name, so a concurrent edit of the list fails
//!   instead of scaling another pool);
//! - `start|stop|restart CLUSTER [--pool P | --node N]`: the cluster's
//!   `spec.running`, a pool's `running`, or one node's entry in
//!   `spec.stoppedNodes` (stopped nodes keep their disks); `restart` stops,
//!   waits until they are stopped, and starts them again (`power.rs`).
//! - `ssh CLUSTER [NODE]`: OpenSSH to the frontend's public IP, or to a
//!   worker through the frontend (`ssh.rs`);
//! - `console NODE`: the node's serial console through its host agent's
//!   authenticated endpoint (`console.rs`);
//! - `site join SITE HOST` / `site revoke SITE [HOST]`: the credential of a
//!   remote Site's host agent (a fleet operator's command, see `site.rs`).
//!
//! Installed as `kubectl-yukumo` on the `PATH` (kubectl finds plugins by
//! name); it uses the current kubeconfig context and its namespace unless
//! `-n` says otherwise. Every request is the user's own: RBAC decides.

mod console;
mod power;
mod proxy;
mod render;
mod site;
mod ssh;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use yukumo_api::virtualnode::NodePhase;
use yukumo_api::{NetworkGroup, VirtualCluster, VirtualNode, Volume, labels};

#[derive(Parser)]
#[command(
    name = "kubectl yukumo",
    version,
    about = "Use yukumo virtual clusters"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The cluster as a tree: nodes by pool, hosts, addresses, network,
    /// volumes, conditions and recent Events.
    Status { cluster: String },
    /// Set a pool's number of workers.
    Scale {
        cluster: String,
        pool: String,
        replicas: i32,
    },
    /// Run the cluster, one pool or one node again.
    Start {
        cluster: String,
        #[command(flatten)]
        which: Which,
    },
    /// Stop the cluster, one pool or one node, keeping their disks.
    Stop {
        cluster: String,
        #[command(flatten)]
        which: Which,
    },
    /// Stop the cluster, one pool or one node, wait until they are
    /// stopped, and start them again.
    Restart {
        cluster: String,
        #[command(flatten)]
        which: Which,
        /// How long to wait for the nodes to stop (s, m or h).
        #[arg(long, default_value = "5m", value_parser = site::parse_duration)]
        timeout: std::time::Duration,
    },
    /// The node's serial console (ttyS0), through its host agent; the API
    /// server checks your token and your right to `get`
    /// virtualnodes/console. `Ctrl-]` leaves.
    Console {
        /// The VirtualNode, e.g. `quickstart-worker-0`.
        node: String,
    },
    /// OpenSSH to a node: the frontend at its public IP, a worker through
    /// the frontend. `-F`, `-i` and `-o` apply to both hops; a command
    /// after `--` runs instead of a shell.
    Ssh(ssh::Ssh),
    /// Credentials of a remote Site's agents (for the fleet's operator).
    #[command(subcommand)]
    Site(SiteCommand),
}

#[derive(Subcommand)]
enum SiteCommand {
    /// Make (or renew) the credential of HOST's agent at SITE, write its
    /// kubeconfig and print how to start the agent on that host.
    Join(site::Join),
    /// Withdraw HOST's credential, or without HOST every credential of SITE.
    Revoke { site: String, host: Option<String> },
}

/// What `start`, `stop` and `restart` act on (neither: the whole cluster).
#[derive(clap::Args, Clone)]
struct Which {
    /// One pool.
    #[arg(long, conflicts_with = "node")]
    pool: Option<String>,
    /// One node: `frontend`, `POOL-INDEX` or its full name.
    #[arg(long)]
    node: Option<String>,
}

/// Writes are made as this field manager.
fn params() -> PatchParams {
    PatchParams {
        field_manager: Some("kubectl-yukumo".into()),
        ..Default::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    // As `Config::infer`: the kubeconfig (KUBECONFIG or ~/.kube/config),
    // else in-cluster — read once, so its proxy is the configuration's own.
    let (mut config, kubeconfig) = match kube::config::Kubeconfig::read() {
        Ok(kc) => match kube::Config::from_custom_kubeconfig(kc.clone(), &Default::default()).await {
            Ok(c) => (c, Some(kc)),
            Err(e) => match kube::Config::incluster() {
                Ok(c) => (c, None),
                Err(_) => return Err(anyhow::Error::new(e).context("loading the kubeconfig")),
            },
        },
        Err(e) => (
            kube::Config::incluster().map_err(|ie| {
                anyhow::anyhow!(
                    "no Kubernetes configuration: kubeconfig (KUBECONFIG or ~/.kube/config): {e}; in-cluster: {ie}"
                )
            })?,
            None,
        ),
    };
    // The API server's proxy, chosen by its own host (proxy.rs says why).
    let proxies = proxy::Proxies::new(kubeconfig.as_ref())?;
    let api_host = config.cluster_url.host().unwrap_or_default().to_string();
    config.proxy_url = proxies.for_host(&api_host);
    let client = Client::try_from(config.clone()).context("connecting to the API server")?;
    let ns = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    let vcs: Api<VirtualCluster> = Api::namespaced(client.clone(), &ns);
    match cli.command {
        Command::Status { cluster } => {
            let vc = get(&vcs, &ns, &cluster).await?;
            let nodes: Api<VirtualNode> = Api::namespaced(client.clone(), &ns);
            let nodes = nodes
                .list(&ListParams::default().labels(&format!("{}={cluster}", labels::CLUSTER)))
                .await
                .context("listing the cluster's VirtualNodes")?
                .items;
            let group = Api::<NetworkGroup>::namespaced(client.clone(), &ns)
                .get_opt(&vc.spec.network_group)
                .await
                .context("reading the cluster's NetworkGroup")?;
            let wanted = render::volume_names(&vc);
            let volumes: Vec<Volume> = Api::<Volume>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .context("listing Volumes")?
                .items
                .into_iter()
                .filter(|v| wanted.contains(&v.metadata.name.clone().unwrap_or_default()))
                .collect();
            let events: Vec<Event> = Api::<Event>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .context("listing Events")?
                .items;
            print!(
                "{}",
                render::status(&ns, &vc, &nodes, group.as_ref(), &volumes, &events)
            );
        }
        Command::Scale {
            cluster,
            pool,
            replicas,
        } => {
            patch_fresh(&vcs, &ns, &cluster, |vc| {
                render::scale_patch(vc, &pool, replicas)
            })
            .await
            .with_context(|| format!("scaling pool {pool:?} of {ns}/{cluster}"))?;
            println!("virtualcluster {ns}/{cluster}: pool {pool} scaled to {replicas}");
        }
        Command::Start { cluster, which } => {
            power(&vcs, &ns, &cluster, which, true).await?;
        }
        Command::Stop { cluster, which } => {
            power(&vcs, &ns, &cluster, which, false).await?;
        }
        Command::Restart {
            cluster,
            which,
            timeout,
        } => {
            let nodes = power(&vcs, &ns, &cluster, which.clone(), false).await?;
            wait_stopped(
                &Api::<VirtualNode>::namespaced(client.clone(), &ns),
                &cluster,
                &nodes,
                timeout,
            )
            .await?;
            power(&vcs, &ns, &cluster, which, true).await?;
        }
        Command::Ssh(args) => {
            let vc = get(&vcs, &ns, &args.cluster).await?;
            let nodes = Api::<VirtualNode>::namespaced(client.clone(), &ns)
                .list(&ListParams::default().labels(&format!(
                    "{}={}",
                    labels::CLUSTER,
                    args.cluster
                )))
                .await
                .context("listing the cluster's VirtualNodes")?
                .items;
            let argv = ssh::plan(&vc, &nodes, &args)?;
            if args.print {
                let words: Vec<String> = argv.iter().map(|a| ssh::quote(a)).collect();
                println!("ssh {}", words.join(" "));
            } else {
                use std::os::unix::process::CommandExt;
                let e = std::process::Command::new("ssh").args(&argv).exec();
                bail!("running ssh (the OpenSSH client): {e}");
            }
        }
        Command::Console { node } => console::run(client, &config, &proxies, &ns, &node).await?,
        Command::Site(SiteCommand::Join(j)) => site::join(client, &config, j).await?,
        Command::Site(SiteCommand::Revoke { site, host }) => {
            site::revoke(client, &site, host.as_deref()).await?
        }
    }
    Ok(())
}

async fn get(vcs: &Api<VirtualCluster>, ns: &str, name: &str) -> Result<VirtualCluster> {
    match vcs.get_opt(name).await {
        Ok(Some(vc)) => Ok(vc),
        Ok(None) => bail!("virtualcluster {ns}/{name} not found"),
        Err(e) => Err(e).with_context(|| format!("reading virtualcluster {ns}/{name}")),
    }
}

/// How many times a conditional patch is recomputed from a fresh read
/// when the cluster changed between the read and the patch.
const CONFLICT_RETRIES: u32 = 5;

/// Apply `make`'s patch, computed from the cluster as read. Patches carry
/// the resource version they were computed from, so a concurrent change
/// (the controller's status writes among them) is a 409 Conflict, never a
/// lost edit: the cluster is then read again and the patch recomputed
/// from it, a bounded number of times. Returns the cluster as patched.
async fn patch_fresh(
    vcs: &Api<VirtualCluster>,
    ns: &str,
    name: &str,
    make: impl Fn(&VirtualCluster) -> Result<serde_json::Value>,
) -> Result<VirtualCluster> {
    let mut attempt = 0;
    loop {
        let vc = get(vcs, ns, name).await?;
        let patch = make(&vc)?;
        match vcs.patch(name, &params(), &Patch::Merge(&patch)).await {
            Ok(done) => return Ok(done),
            Err(kube::Error::Api(e)) if e.code == 409 && attempt < CONFLICT_RETRIES => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                    .await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Switch the cluster, a pool or a node on or off; the VirtualNodes it
/// covers, by name.
async fn power(
    vcs: &Api<VirtualCluster>,
    ns: &str,
    name: &str,
    which: Which,
    running: bool,
) -> Result<Vec<String>> {
    let vc = get(vcs, ns, name).await?;
    let target = power::Target::parse(&vc, which.pool, which.node)?;
    let what = target.describe(ns, name);
    let vc = patch_fresh(vcs, ns, name, |vc| power::patch(vc, &target, running))
        .await
        .with_context(|| format!("{} {what}", if running { "starting" } else { "stopping" }))?;
    let (verb, note) = if running {
        ("started", "")
    } else {
        ("stopped", " (disks kept)")
    };
    println!("{what} {verb}{note}");
    Ok(target.nodes(&vc))
}

/// Wait until every one of `nodes` (of `cluster`) that exists is stopped.
async fn wait_stopped(
    api: &Api<VirtualNode>,
    cluster: &str,
    nodes: &[String],
    timeout: std::time::Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let lp = ListParams::default().labels(&format!("{}={cluster}", labels::CLUSTER));
    loop {
        let running: Vec<String> = api
            .list(&lp)
            .await
            .context("listing the cluster's VirtualNodes")?
            .items
            .into_iter()
            .filter(|vn| nodes.contains(&vn.metadata.name.clone().unwrap_or_default()))
            .filter(|vn| {
                vn.spec.running || vn.status.as_ref().map(|s| s.phase) != Some(NodePhase::Stopped)
            })
            .filter_map(|vn| vn.metadata.name)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "not stopped after {}s: {} (they stay stopped; start them with `start`)",
                timeout.as_secs(),
                running.join(", ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};

    fn cluster(rv: &str, stopped: &[&str]) -> Value {
        json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
            "metadata": {"name": "demo", "namespace": "t", "resourceVersion": rv},
            "spec": {
                "networkGroup": "net",
                "frontend": {"size": {"sizeClass": "tiny"},
                             "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}},
                "pools": [{"name": "w", "replicas": 2, "size": {"sizeClass": "tiny"}}],
                "stoppedNodes": stopped,
            }
        })
    }

    fn reply(code: u16, body: &Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// A power command whose patch meets a concurrent change (409) reads
    /// the cluster again and sends a patch computed from the new version,
    /// keeping what the other writer changed; a conflict that never ends
    /// is an error after a bounded number of tries.
    #[tokio::test]
    async fn a_conflicting_patch_is_recomputed_from_a_fresh_read_a_bounded_number_of_times() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let vcs: Api<VirtualCluster> = Api::namespaced(Client::new(service, "t"), "t");
        let server = tokio::spawn(async move {
            let mut patches = Vec::new();
            // First read (the target), then read + patch refused, then a
            // read that shows another writer's change, then the patch.
            let plan: [(&Method, u16, Value); 5] = [
                (&Method::GET, 200, cluster("1", &[])),
                (&Method::GET, 200, cluster("1", &[])),
                (
                    &Method::PATCH,
                    409,
                    json!({"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409,
                    "message": "the object has been modified"}),
                ),
                (&Method::GET, 200, cluster("2", &["w-0"])),
                (&Method::PATCH, 200, cluster("3", &["w-0", "w-1"])),
            ];
            for (method, code, body) in plan {
                let (req, send) = handle.next_request().await.expect("a request");
                assert_eq!(req.method(), method);
                if method == Method::PATCH {
                    let b = req.into_body().collect_bytes().await.unwrap();
                    patches.push(serde_json::from_slice::<Value>(&b).unwrap());
                }
                send.send_response(reply(code, &body));
            }
            patches
        });
        let which = Which {
            pool: None,
            node: Some("w-1".into()),
        };
        let nodes = power(&vcs, "t", "demo", which, false).await.unwrap();
        assert_eq!(nodes, ["demo-w-1"]);
        let patches = server.await.unwrap();
        assert_eq!(patches[0]["metadata"]["resourceVersion"], "1");
        assert_eq!(patches[0]["spec"]["stoppedNodes"], json!(["w-1"]));
        // Recomputed: version 2, and w-0 (stopped by the other writer) kept.
        assert_eq!(patches[1]["metadata"]["resourceVersion"], "2");
        assert_eq!(patches[1]["spec"]["stoppedNodes"], json!(["w-0", "w-1"]));

        // Conflicts without end: 1 + CONFLICT_RETRIES patches, then the error.
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let vcs: Api<VirtualCluster> = Api::namespaced(Client::new(service, "t"), "t");
        let server = tokio::spawn(async move {
            let mut patches = 0;
            while let Some((req, send)) = handle.next_request().await {
                if req.method() == Method::PATCH {
                    patches += 1;
                    send.send_response(reply(
                        409,
                        &json!({"kind": "Status", "apiVersion": "v1",
                        "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409,
                        "message": "the object has been modified"}),
                    ));
                } else {
                    send.send_response(reply(200, &cluster("1", &[])));
                }
            }
            patches
        });
        let e = patch_fresh(&vcs, "t", "demo", |vc| render::scale_patch(vc, "w", 3))
            .await
            .unwrap_err();
        drop(vcs);
        assert!(format!("{e:#}").contains("modified"), "{e:#}");
        assert_eq!(server.await.unwrap(), 1 + CONFLICT_RETRIES);
    }
}
