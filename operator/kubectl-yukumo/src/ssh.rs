//! `ssh CLUSTER [NODE]`: OpenSSH to a node of the cluster. The frontend is
//! reached at its public IP; a worker at its private address through the
//! frontend (an ssh `-W` hop through it, which every option given here also
//! applies to). The plan — the `ssh` command line — is pure, so it is
//! tested without a server; `--print` shows it instead of running it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use yukumo_api::virtualcluster::NodeEntry;
use yukumo_api::virtualnode::NodePhase;
use yukumo_api::{VirtualCluster, VirtualNode};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct Ssh {
    pub cluster: String,
    /// `frontend` (default), `POOL-INDEX` or the node's full name.
    pub node: Option<String>,
    /// The guest user.
    #[arg(short = 'l', long, default_value = "root")]
    pub user: String,
    /// ssh's identity file (`-i`), for both hops.
    #[arg(short = 'i', long)]
    pub identity: Option<PathBuf>,
    /// ssh's configuration file (`-F`), for both hops.
    #[arg(short = 'F', long)]
    pub config: Option<PathBuf>,
    /// An ssh option (`-o KEY=VALUE`), for both hops; repeatable.
    #[arg(short = 'o', long = "option")]
    pub options: Vec<String>,
    /// Print the ssh command line instead of running it.
    #[arg(long)]
    pub print: bool,
    /// A command to run there instead of a login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl Ssh {
    /// `-F`, `-i` and `-o` as given, for every hop.
    fn common(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(f) = &self.config {
            out.extend(["-F".to_string(), f.display().to_string()]);
        }
        if let Some(i) = &self.identity {
            out.extend(["-i".to_string(), i.display().to_string()]);
        }
        for o in &self.options {
            out.extend(["-o".to_string(), o.clone()]);
        }
        out
    }
}

/// The `ssh` arguments (without `ssh` itself) that reach the node `args`
/// names, given the cluster and its VirtualNodes.
pub fn plan(vc: &VirtualCluster, nodes: &[VirtualNode], args: &Ssh) -> Result<Vec<String>> {
    let ns = vc.metadata.namespace.as_deref().unwrap_or_default();
    let cluster = vc.metadata.name.as_deref().unwrap_or_default();
    let given = args.node.as_deref().unwrap_or("frontend");
    let Some(entry_str) = crate::power::node_entry(vc, given) else {
        bail!(
            "virtualcluster {ns}/{cluster} has no node {given:?} (its nodes: {})",
            vc.spec.node_entries().join(", ")
        );
    };
    let Some(entry) = NodeEntry::parse(entry_str) else {
        bail!("{given:?} is not a node name");
    };
    let name = entry.node_name(cluster);
    let running = |name: &str| -> Result<&VirtualNode> {
        let Some(vn) = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
        else {
            bail!(
                "virtualnode {ns}/{name} does not exist yet (see `kubectl yukumo status {cluster}`)"
            );
        };
        let phase = vn.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if phase != NodePhase::Running {
            bail!(
                "virtualnode {ns}/{name} is {phase:?}, not Running (see `kubectl yukumo status {cluster}`)"
            );
        }
        Ok(vn)
    };
    // Every hop goes through the frontend's public IP.
    running(&NodeEntry::Frontend.node_name(cluster))?;
    let frontend = vc.status.as_ref().and_then(|s| s.frontend.as_ref());
    let Some(public) = frontend.and_then(|f| f.public_ip) else {
        bail!(
            "virtualcluster {ns}/{cluster} has no public IP{}: ssh reaches nodes through the frontend's (spec.frontend.publicIP: true)",
            match frontend.and_then(|f| f.address) {
                Some(a) => format!(" (its frontend's address {a} is private to its network)"),
                None => String::new(),
            }
        );
    };
    let mut argv = args.common();
    let user = &args.user;
    let target = match entry {
        NodeEntry::Frontend => public,
        NodeEntry::Worker { .. } => {
            let vn = running(&name)?;
            let Some(ip) = vn.spec.network.as_ref().map(|n| n.ip) else {
                bail!("virtualnode {ns}/{name} has no address on a network");
            };
            argv.extend(["-o".to_string(), proxy_through(args, user, public)]);
            ip
        }
    };
    argv.push(format!("{user}@{target}"));
    if !args.command.is_empty() {
        argv.push("--".into());
        argv.extend(args.command.iter().cloned());
    }
    Ok(argv)
}

/// `ProxyCommand=ssh … -W %h:%p USER@PUBLIC`: the hop through the frontend
/// with the same `-F`/`-i`/`-o` (ssh's own `-J` would not pass `-i` and
/// `-o` on to the hop).
fn proxy_through(args: &Ssh, user: &str, public: Ipv4Addr) -> String {
    let mut hop = vec!["ssh".to_string()];
    hop.extend(args.common());
    hop.extend([
        "-W".to_string(),
        "%h:%p".to_string(),
        format!("{user}@{public}"),
    ]);
    format!(
        "ProxyCommand={}",
        hop.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
    )
}

/// `s` as one word of a POSIX shell (ssh runs ProxyCommand with `sh -c`).
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster(public: Option<&str>) -> VirtualCluster {
        let mut status = json!({"frontend": {"address": "10.0.0.2"}});
        if let Some(p) = public {
            status["frontend"]["publicIP"] = json!(p);
        }
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualCluster",
            "metadata": {"name": "qs", "namespace": "demo"},
            "spec": {
                "networkGroup": "net",
                "frontend": {"size": {"sizeClass": "tiny"}, "publicIP": true,
                             "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}},
                "pools": [{"name": "worker", "replicas": 2, "size": {"sizeClass": "tiny"}}],
            },
            "status": status,
        }))
        .unwrap()
    }

    fn node(name: &str, ip: &str, phase: &str) -> VirtualNode {
        serde_json::from_value(json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {
                "cluster": "qs", "role": "worker", "hostname": name,
                "resources": {"cpu": 1, "memoryMiB": 128},
                "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))},
                "network": {"group": "net", "ip": ip, "prefix": 24, "gateway": "10.0.0.1",
                            "mac": "52:54:00:00:00:02", "mtu": 1450,
                            "segment": {"type": "vxlan", "id": 1000}},
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn nodes() -> Vec<VirtualNode> {
        vec![
            node("qs-frontend", "10.0.0.2", "Running"),
            node("qs-worker-0", "10.0.0.3", "Running"),
            node("qs-worker-1", "10.0.0.4", "Stopped"),
        ]
    }

    fn args(node: Option<&str>) -> Ssh {
        Ssh {
            cluster: "qs".into(),
            node: node.map(str::to_string),
            user: "root".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_frontend_at_its_public_ip() {
        let vc = cluster(Some("203.0.113.70"));
        assert_eq!(
            plan(&vc, &nodes(), &args(None)).unwrap(),
            ["root@203.0.113.70"]
        );
        let a = Ssh {
            config: Some("/tmp/my config".into()),
            command: vec!["uname".into(), "-a".into()],
            ..args(Some("qs-frontend"))
        };
        assert_eq!(
            plan(&vc, &nodes(), &a).unwrap(),
            [
                "-F",
                "/tmp/my config",
                "root@203.0.113.70",
                "--",
                "uname",
                "-a"
            ]
        );
    }

    #[test]
    fn a_worker_through_the_frontend_with_the_same_options() {
        let vc = cluster(Some("203.0.113.70"));
        let a = Ssh {
            identity: Some("/k/id".into()),
            options: vec!["StrictHostKeyChecking=no".into()],
            ..args(Some("worker-0"))
        };
        assert_eq!(
            plan(&vc, &nodes(), &a).unwrap(),
            [
                "-i",
                "/k/id",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "ProxyCommand=ssh -i /k/id -o StrictHostKeyChecking=no -W %h:%p root@203.0.113.70",
                "root@10.0.0.3",
            ]
        );
        // By full name too.
        assert_eq!(
            plan(&vc, &nodes(), &args(Some("qs-worker-0")))
                .unwrap()
                .last()
                .unwrap(),
            "root@10.0.0.3"
        );
    }

    #[test]
    fn refusals_say_why() {
        let vc = cluster(Some("203.0.113.70"));
        let err = |a: &Ssh, vc: &VirtualCluster, n: &[VirtualNode]| {
            plan(vc, n, a).unwrap_err().to_string()
        };
        assert_eq!(
            err(&args(Some("worker-1")), &vc, &nodes()),
            "virtualnode demo/qs-worker-1 is Stopped, not Running (see `kubectl yukumo status qs`)"
        );
        assert_eq!(
            err(&args(Some("worker-7")), &vc, &nodes()),
            "virtualcluster demo/qs has no node \"worker-7\" (its nodes: frontend, worker-0, worker-1)"
        );
        assert_eq!(
            err(&args(None), &cluster(None), &nodes()),
            "virtualcluster demo/qs has no public IP (its frontend's address 10.0.0.2 is private to its network): ssh reaches nodes through the frontend's (spec.frontend.publicIP: true)"
        );
        assert_eq!(
            err(&args(Some("worker-0")), &vc, &nodes()[1..]),
            "virtualnode demo/qs-frontend does not exist yet (see `kubectl yukumo status qs`)"
        );
    }

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(quote("root@10.0.0.3"), "root@10.0.0.3");
        assert_eq!(quote("%h:%p"), "%h:%p");
        assert_eq!(quote("/tmp/my config"), "'/tmp/my config'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a;rm -rf /"), "'a;rm -rf /'");
    }
}
