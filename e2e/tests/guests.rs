//! Real guests: a VirtualCluster boots software-emulated VMs on the
//! simulated hosts' libvirtd, each reading its own hostname and ssh key from
//! its config disk (proved by what the guest prints on its serial console).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use yukumo_e2e::{Env, wait_for};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHl5a3Vtby1ndWVzdC10ZXN0LWtleS0wMDAwMDAwMDAw e2e@yukumo";

fn json(env: &Env, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&env.kubectl_ok(&a).expect("kubectl get")).expect("json")
}

fn sha256_hex(s: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn virsh(env: &Env, host: &str, args: &[&str]) -> String {
    let sock = env.dir.join(format!("hosts/{host}/run/libvirt-sock"));
    let out = std::process::Command::new("virsh")
        .arg("-c")
        .arg(format!("qemu:///system?socket={}", sock.display()))
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn console(env: &Env, host: &str, uid: &str) -> String {
    std::fs::read_to_string(
        env.dir
            .join(format!("hosts/{host}/agent/nodes/{uid}/console.log")),
    )
    .unwrap_or_default()
}

#[test]
fn quickstart_shaped_cluster_boots_real_guests_that_read_their_config() {
    let env = Env::get();
    let tiny = std::env::var("YUKUMO_TINY_IMAGE").expect("YUKUMO_TINY_IMAGE (set by e2e/run.sh)");
    let (path, checksum) = tiny.trim().split_once(' ').unwrap();
    let ns = "guests";
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: tiny, namespace: {ns}}}
spec:
  networkGroup: net
  sshKeys: ['{KEY}']
  frontend:
    size: {{cpu: 1, memory: 160Mi}}
    image: {{url: 'file://{path}', checksum: '{checksum}'}}
  pools:
  - {{name: worker, replicas: 2, size: {{cpu: 1, memory: 160Mi}}}}
"
    );
    let out = env.kubectl_stdin(&["apply", "-f", "-"], &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, took) = wait_for(Duration::from_secs(240), "all 3 nodes ready", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "tiny"]);
        let ready = vc["status"]["ready"].as_str().unwrap_or("").to_string();
        if ready == "3/3" {
            Ok(())
        } else {
            Err(format!("{ready} {}", vc["status"]["conditions"]))
        }
    })
    .unwrap();
    println!("apply -> 3/3 nodes Running: {:.1}s", took.as_secs_f64());
    let nodes = json(&env, &["-n", ns, "get", "vn"])["items"]
        .as_array()
        .cloned()
        .unwrap();
    let mut boots = BTreeMap::new();
    let mut hosts = BTreeMap::new();
    let key_sha = sha256_hex(KEY);
    for n in &nodes {
        let name = n["metadata"]["name"].as_str().unwrap().to_string();
        let uid = n["metadata"]["uid"].as_str().unwrap().to_string();
        let host = n["spec"]["host"].as_str().unwrap().to_string();
        assert_eq!(n["status"]["phase"], "Running", "{name}");
        assert_eq!(
            n["status"]["domainUUID"]
                .as_str()
                .or(n["status"]["domainUuid"].as_str()),
            Some(uid.as_str())
        );
        boots.insert(
            name.clone(),
            n["status"]["bootTime"].as_str().unwrap().to_string(),
        );
        hosts.insert(name.clone(), host.clone());
        let (line, took) = wait_for(
            Duration::from_secs(120),
            &format!("{name} guest userspace"),
            || {
                let log = console(&env, &host, &uid);
                log.lines()
                    .find(|l| l.contains("YUKUMO-GUEST hostname="))
                    .map(str::to_string)
                    .ok_or_else(|| "no line yet".to_string())
            },
        )
        .unwrap();
        println!("{name} on {host}: {line} (+{:.1}s)", took.as_secs_f64());
        assert!(line.contains(&format!("hostname={name} ")), "{line}");
        assert!(line.contains(&format!("instance={uid}")), "{line}");
        assert!(line.contains(&format!("sshkey0={key_sha}")), "{line}");
    }
    let distinct: std::collections::BTreeSet<_> = hosts.values().collect();
    assert_eq!(distinct.len(), 2, "spread over hosts: {hosts:?}");
    let fe = &boots["tiny-frontend"];
    for w in ["tiny-worker-0", "tiny-worker-1"] {
        assert!(&boots[w] >= fe, "frontend first: {boots:?}");
    }

    // A domain destroyed by hand is noticed and restarted within seconds.
    let victim = nodes
        .iter()
        .find(|n| n["metadata"]["name"] == "tiny-worker-0")
        .unwrap();
    let (vhost, vuid) = (
        victim["spec"]["host"].as_str().unwrap(),
        victim["metadata"]["uid"].as_str().unwrap(),
    );
    virsh(&env, vhost, &["destroy", vuid]);
    let (_, took) = wait_for(Duration::from_secs(30), "restart after destroy", || {
        if virsh(&env, vhost, &["domstate", vuid]).trim() == "running" {
            Ok(())
        } else {
            Err("not running".into())
        }
    })
    .unwrap();
    println!(
        "domain destroyed by hand restarted after {:.1}s",
        took.as_secs_f64()
    );

    // Stop the cluster (disks kept), then start it again.
    env.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "vc",
        "tiny",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"running\":false}}",
    ])
    .unwrap();
    let (_, took) = wait_for(Duration::from_secs(60), "cluster stopped", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "tiny"]);
        let stopped = vc["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["reason"] == "Stopped" && c["status"] == "True")
        });
        if stopped {
            Ok(())
        } else {
            Err(vc["status"]["conditions"].to_string())
        }
    })
    .unwrap();
    println!("cluster stopped in {:.1}s", took.as_secs_f64());
    for n in &nodes {
        let (host, uid) = (
            n["spec"]["host"].as_str().unwrap(),
            n["metadata"]["uid"].as_str().unwrap(),
        );
        assert_eq!(virsh(&env, host, &["domstate", uid]).trim(), "shut off");
        assert!(
            env.dir
                .join(format!("hosts/{host}/agent/nodes/{uid}/root.qcow2"))
                .exists(),
            "disk kept"
        );
    }
    env.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "vc",
        "tiny",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"running\":true}}",
    ])
    .unwrap();
    let (_, took) = wait_for(Duration::from_secs(120), "cluster running again", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "tiny"]);
        if vc["status"]["ready"] == "3/3" {
            Ok(())
        } else {
            Err(vc["status"]["ready"].to_string())
        }
    })
    .unwrap();
    println!("cluster started again in {:.1}s", took.as_secs_f64());

    // Deleting the cluster removes every domain and file from every host.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "tiny", "--wait=true"])
        .unwrap();
    let (_, took) = wait_for(Duration::from_secs(90), "domains and files gone", || {
        for h in ["host-1", "host-2"] {
            let list = virsh(&env, h, &["list", "--all", "--name"]);
            if list.lines().any(|l| l.starts_with("yk-")) {
                return Err(format!("{h}: {list}"));
            }
            let dir = env.dir.join(format!("hosts/{h}/agent/nodes"));
            let left: Vec<_> = std::fs::read_dir(&dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            if !left.is_empty() {
                return Err(format!("{h}: files left {left:?}"));
            }
        }
        Ok(())
    })
    .unwrap();
    println!(
        "cluster deleted: no domain or file left after {:.1}s",
        took.as_secs_f64()
    );
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn a_wrong_image_checksum_is_reported_and_leaves_no_file() {
    let env = Env::get();
    let tiny = std::env::var("YUKUMO_TINY_IMAGE").expect("YUKUMO_TINY_IMAGE (set by e2e/run.sh)");
    let (path, _) = tiny.trim().split_once(' ').unwrap();
    let ns = "badimage";
    let wrong = format!("sha256:{}", "1".repeat(64));
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: bad, namespace: {ns}}}
spec:
  networkGroup: net
  frontend:
    size: {{cpu: 1, memory: 160Mi}}
    image: {{url: 'file://{path}', checksum: '{wrong}'}}
"
    );
    assert!(
        env.kubectl_stdin(&["apply", "-f", "-"], &text)
            .status
            .success()
    );
    let (msg, _) = wait_for(Duration::from_secs(60), "ImagePullFailed", || {
        let out = env.kubectl(&["-n", ns, "get", "vn", "bad-frontend", "-o", "json"]);
        let vn: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let c = vn["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned());
        match c {
            Some(c) if c["reason"] == "ImagePullFailed" => {
                Ok(c["message"].as_str().unwrap_or("").to_string())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    println!("ImagePullFailed: {msg}");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    for h in ["host-1", "host-2"] {
        let images = env.dir.join(format!("hosts/{h}/agent/images"));
        let bad: Vec<_> = std::fs::read_dir(&images)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.contains(&"1".repeat(64)))
                    .collect()
            })
            .unwrap_or_default();
        assert!(bad.is_empty(), "{h}: partial or unverified files {bad:?}");
    }
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn nodes_of_a_lost_host_restart_elsewhere_and_its_stale_domains_are_swept() {
    let env = Env::get();
    let tiny = std::env::var("YUKUMO_TINY_IMAGE").expect("YUKUMO_TINY_IMAGE (set by e2e/run.sh)");
    let (path, checksum) = tiny.trim().split_once(' ').unwrap();
    let grace = 6;
    env.kubectl_ok(&[
        "patch",
        "site",
        "local",
        "--type",
        "merge",
        "-p",
        &format!("{{\"spec\":{{\"hostGraceSeconds\":{grace}}}}}"),
    ])
    .unwrap();
    let ns = "hostloss";
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: lossy, namespace: {ns}}}
spec:
  networkGroup: net
  startOrder: Parallel
  frontend:
    size: {{cpu: 1, memory: 160Mi}}
    image: {{url: 'file://{path}', checksum: '{checksum}'}}
  pools:
  - {{name: worker, replicas: 1, size: {{cpu: 1, memory: 160Mi}}}}
"
    );
    assert!(
        env.kubectl_stdin(&["apply", "-f", "-"], &text)
            .status
            .success()
    );
    wait_for(Duration::from_secs(240), "2/2 ready", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "lossy"]);
        if vc["status"]["ready"] == "2/2" {
            Ok(())
        } else {
            Err(vc["status"]["ready"].to_string())
        }
    })
    .unwrap();
    let nodes = json(&env, &["-n", ns, "get", "vn"])["items"]
        .as_array()
        .cloned()
        .unwrap();
    let victim = nodes
        .iter()
        .find(|n| n["spec"]["host"] == "host-2")
        .expect("a node on host-2")
        .clone();
    let vname = victim["metadata"]["name"].as_str().unwrap().to_string();
    let old_uid = victim["metadata"]["uid"].as_str().unwrap().to_string();

    // Lose host-2: its agent and its libvirtd die (its guest keeps running, unfenced).
    env.env_sh(&["stop", "agent-host-2", "--signal", "KILL"])
        .unwrap();
    env.env_sh(&["stop", "libvirtd-host-2", "--signal", "KILL"])
        .unwrap();
    let (new_uid, took) = wait_for(
        Duration::from_secs(grace + 120),
        "node running on host-1",
        || {
            let out = env.kubectl(&["-n", ns, "get", "vn", &vname, "-o", "json"]);
            let n: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let ready = n["status"]["phase"] == "Running" && n["spec"]["host"] == "host-1";
            let uid = n["metadata"]["uid"].as_str().unwrap_or("").to_string();
            if ready && uid != old_uid {
                Ok(uid)
            } else {
                Err(format!("{} {}", n["spec"]["host"], n["status"]["phase"]))
            }
        },
    )
    .unwrap();
    println!(
        "{vname} running on host-1 {:.1}s after host-2 was lost (grace {grace}s)",
        took.as_secs_f64()
    );
    wait_for(Duration::from_secs(60), "guest up on host-1", || {
        if console(&env, "host-1", &new_uid).contains(&format!("hostname={vname} ")) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .unwrap();

    // host-2 returns: its stale domain is removed by the orphan sweep.
    env.env_sh(&["start-libvirtd", "host-2"]).unwrap();
    env.env_sh(&["start-agent", "host-2"]).unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(60),
        "stale domain swept on host-2",
        || {
            let list = virsh(&env, "host-2", &["list", "--all", "--uuid"]);
            if list.contains(&old_uid) {
                Err(list)
            } else {
                Ok(())
            }
        },
    )
    .unwrap();
    println!(
        "stale domain of {vname} removed from host-2 {:.1}s after it returned",
        took.as_secs_f64()
    );
    env.kubectl_ok(&[
        "patch",
        "site",
        "local",
        "--type",
        "merge",
        "-p",
        "{\"spec\":{\"hostGraceSeconds\":20}}",
    ])
    .unwrap();
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
    wait_for(Duration::from_secs(30), "host-2 Ready again", || {
        let h = json(&env, &["get", "host", "host-2"]);
        let ok = h["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if ok { Ok(()) } else { Err("not ready".into()) }
    })
    .unwrap();
}
