//! Real guests: a VirtualCluster boots software-emulated VMs on the
//! simulated hosts' libvirtd, each reading its own hostname and ssh key from
//! its config disk (proved by what the guest prints on its serial console).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use yukumo_e2e::{Env, tiny_image, wait_for};

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHl5a3Vtby1ndWVzdC10ZXN0LWtleS0wMDAwMDAwMDAw e2e@yukumo";

fn json(env: &Env, args: &[&str]) -> Value {
    env.get_json(args)
}

/// A namespace, a NetworkGroup and a VirtualCluster of tiny guests:
/// `spec_extra` holds extra spec lines, `checksum` overrides the image's.
fn tiny_cluster(
    ns: &str,
    name: &str,
    spec_extra: &str,
    workers: u32,
    memory: &str,
    checksum: Option<&str>,
) -> String {
    let (path, real) = tiny_image();
    let checksum = checksum.unwrap_or(&real);
    let pools = if workers == 0 {
        String::new()
    } else {
        format!(
            "  pools:\n  - {{name: worker, replicas: {workers}, size: {{cpu: 1, memory: {memory}}}}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}
---
apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: {name}, namespace: {ns}}}
spec:
  networkGroup: net
{spec_extra}  frontend:
    size: {{cpu: 1, memory: {memory}}}
    image: {{url: 'file://{path}', checksum: '{checksum}'}}
{pools}"
    )
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
    let ns = "guests";
    // As the quickstart: a public IP with ssh open to the frontend, and the
    // environment's own key besides (`kubectl yukumo ssh` below).
    let own_key = std::fs::read_to_string(env.dir.join("ssh/id_ed25519.pub")).unwrap();
    env.apply(
        &tiny_cluster(
            ns,
            "tiny",
            &format!("  sshKeys: ['{KEY}', '{}']\n", own_key.trim()),
            2,
            "160Mi",
            None,
        )
        .replace(
            "homeSite: local}",
            "homeSite: local, firewall: [{protocol: tcp, ports: '22', to: Frontend}]}",
        )
        .replace("  frontend:\n", "  frontend:\n    publicIP: true\n"),
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
    // 3 nodes: one per host, as far as the hosts go.
    assert_eq!(
        distinct.len(),
        env.hosts().len().min(3),
        "spread over hosts: {hosts:?}"
    );
    // The README's way into a guest: `e2e/env.sh guest NS NODE COMMAND`
    // prints the command's output and exits with its status.
    let guest = |cmd: &str| {
        std::process::Command::new(env.root.join("e2e/env.sh"))
            .args(["guest", ns, "tiny-frontend", cmd, "--dir"])
            .arg(&env.dir)
            .output()
            .expect("run e2e/env.sh guest")
    };
    // (Booted: its shell on ttyS1 starts moments after the line above; a
    // command sent before that is lost, so the wait allows a few tries.)
    let (keys, took) = wait_for(Duration::from_secs(180), "a shell in the frontend", || {
        let out = guest("cat /root/.ssh/authorized_keys");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    })
    .unwrap();
    assert!(keys.contains(KEY), "{keys}");
    println!("e2e/env.sh guest: a shell in the frontend after {took:?}");
    assert_eq!(guest("exit 7").status.code(), Some(7));

    // `kubectl yukumo ssh`: OpenSSH from the outside network (the ssh
    // configuration reaches public IPs from the client namespace) to the
    // frontend's public IP and its dropbear, and to a worker through it.
    let config = env.dir.join("ssh/config");
    let config = config.to_str().unwrap();
    for (node, want) in [
        (None, "tiny-frontend"),
        (Some("worker-1"), "tiny-worker-1"),
        (Some("tiny-worker-0"), "tiny-worker-0"),
    ] {
        let mut args = vec!["ssh", "tiny"];
        args.extend(node);
        args.extend(["-F", config, "--", "hostname; ip -4 -o addr show eth0"]);
        let (out, took) = wait_for(Duration::from_secs(120), &format!("ssh to {want}"), || {
            let mut a = vec!["-n", ns];
            a.extend_from_slice(&args);
            let out = env.plugin(&a);
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).to_string())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).to_string())
            }
        })
        .unwrap();
        assert_eq!(out.lines().next(), Some(want), "{out}");
        println!(
            "kubectl yukumo ssh tiny {}: {} (+{:.1}s)",
            node.unwrap_or(""),
            out.trim().replace('\n', " | "),
            took.as_secs_f64()
        );
    }
    // The same with --print: the command line, for scripts and other hops.
    let printed = env.plugin_ok(ns, &["ssh", "tiny", "worker-0", "-F", config, "--print"]);
    assert!(
        printed.starts_with(&format!(
            "ssh -F {config} -o 'ProxyCommand=ssh -F {config} -W %h:%p root@203.0.113."
        )),
        "{printed}"
    );
    // A key the guest does not hold is refused.
    let other = env.dir.join("ssh/other_key");
    if !other.exists() {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&other)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let other_config = env.dir.join("ssh/config-other-key");
    std::fs::write(
        &other_config,
        std::fs::read_to_string(config)
            .unwrap()
            .replace("ssh/id_ed25519", "ssh/other_key"),
    )
    .unwrap();
    let refused = env.plugin(&[
        "-n",
        ns,
        "ssh",
        "tiny",
        "-F",
        other_config.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "a foreign key was let in");
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
    env.virsh(vhost, &["destroy", vuid]);
    let (_, took) = wait_for(Duration::from_secs(30), "restart after destroy", || {
        if env.virsh(vhost, &["domstate", vuid]).trim() == "running" {
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
        assert_eq!(env.virsh(host, &["domstate", uid]).trim(), "shut off");
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

    // One node switched off while the rest runs, with `kubectl yukumo`:
    // its domain shuts off, the cluster is Ready and says which is off.
    let plugin = |args: &[&str]| env.plugin_ok(ns, args);
    let node = |name: &str| {
        let n = nodes
            .iter()
            .find(|n| n["metadata"]["name"] == name)
            .unwrap();
        (
            n["spec"]["host"].as_str().unwrap().to_string(),
            n["metadata"]["uid"].as_str().unwrap().to_string(),
        )
    };
    let ready_says = |want: &str| {
        wait_for(Duration::from_secs(120), want, || {
            let vc = json(&env, &["-n", ns, "get", "vc", "tiny"]);
            let ready = vc["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .cloned()
                .unwrap_or_default();
            if ready["status"] == "True" && ready["message"] == want {
                Ok(())
            } else {
                Err(ready.to_string())
            }
        })
        .unwrap()
        .1
    };
    plugin(&["stop", "tiny", "--node", "worker-1"]);
    let took = ready_says("2/2 running nodes ready; 1 node switched off: tiny-worker-1");
    let (h1, u1) = node("tiny-worker-1");
    assert_eq!(env.virsh(&h1, &["domstate", &u1]).trim(), "shut off");
    for w in ["tiny-frontend", "tiny-worker-0"] {
        let (h, u) = node(w);
        assert_eq!(env.virsh(&h, &["domstate", &u]).trim(), "running", "{w}");
    }
    println!(
        "kubectl yukumo stop --node worker-1: Ready, that domain shut off, after {:.1}s",
        took.as_secs_f64()
    );
    // Restart the frontend: stopped, waited for, started — a new qemu
    // process for the same node.
    let (fh, _) = node("tiny-frontend");
    let fe_dom = format!("yk-{ns}-tiny-frontend");
    let pid_before = qemu_pids(&env, &fh).get(&fe_dom).cloned();
    assert!(pid_before.is_some(), "{:?}", qemu_pids(&env, &fh));
    let t = std::time::Instant::now();
    assert_eq!(
        plugin(&["restart", "tiny", "--node", "frontend", "--timeout", "120s"]),
        format!(
            "node tiny-frontend of virtualcluster {ns}/tiny stopped (disks kept)\nnode tiny-frontend of virtualcluster {ns}/tiny started"
        )
    );
    ready_says("2/2 running nodes ready; 1 node switched off: tiny-worker-1");
    let pid_after = qemu_pids(&env, &fh).get(&fe_dom).cloned();
    assert!(
        pid_after.is_some() && pid_after != pid_before,
        "{pid_before:?} → {pid_after:?}"
    );
    println!(
        "kubectl yukumo restart --node frontend: running and Ready again after {:.1}s (qemu {} → {})",
        t.elapsed().as_secs_f64(),
        pid_before.unwrap_or_default(),
        pid_after.unwrap_or_default()
    );
    // Starting the pool starts its node switched off one by one.
    plugin(&["start", "tiny", "--pool", "worker"]);
    let took = ready_says("3/3 nodes ready");
    assert_eq!(env.virsh(&h1, &["domstate", &u1]).trim(), "running");
    println!(
        "kubectl yukumo start --pool worker: 3/3 ready after {:.1}s",
        took.as_secs_f64()
    );

    // The serial console as a user: an editor (built-in `edit`) gets the
    // worker's shell through its agent; a viewer is refused (403), and so
    // is a request without a token (401); the endpoint's certificate is
    // the one the node's status names.
    let alice = env.token_kubeconfig(ns, "console-alice", "edit");
    let bob = env.token_kubeconfig(ns, "console-bob", "view");
    let (endpoint, _) = wait_for(
        Duration::from_secs(30),
        "worker-0's console endpoint",
        || {
            let vn = json(&env, &["-n", ns, "get", "vn", "tiny-worker-0"]);
            let c = vn["status"]["console"].clone();
            if c["url"].is_string() {
                Ok(c)
            } else {
                Err(vn["status"].to_string())
            }
        },
    )
    .unwrap();
    let url = endpoint["url"].as_str().unwrap().to_string();
    let ca = env.dir.join("console-ca.pem");
    std::fs::write(&ca, endpoint["caCertificate"].as_str().unwrap()).unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: yukumo-console"])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{url}/v1/console/{ns}/tiny-worker-0"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success()
            && text.ends_with("\n401")
            && text.contains("bearer token is required"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env
        .plugin_command(&bob, &["console", "tiny-worker-0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains("refused (403 Forbidden)")
            && err.contains(&format!(
                "\"system:serviceaccount:{ns}:console-bob\" may not get virtualnodes/console of {ns}/tiny-worker-0"
            )),
        "{err}"
    );
    let t = std::time::Instant::now();
    let mut child = env
        .plugin_command(&alice, &["console", "tiny-worker-0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    // The answer, not the echoed command, holds "42-<hostname>".
    let answered = wait_for(
        Duration::from_secs(30),
        "a shell answers on the console",
        || {
            use std::io::Write;
            let _ = stdin.write_all(b"echo $((6*7))-$(hostname)\n");
            let _ = stdin.flush();
            std::thread::sleep(Duration::from_millis(300));
            let text = String::from_utf8_lossy(&seen.lock().unwrap()).to_string();
            if text.contains("42-tiny-worker-0") {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
    // A second session while this one is open is refused, naming who holds
    // it (QEMU serves one client: it would otherwise wait unseen).
    let second = env
        .plugin_command(&alice, &["console", "tiny-worker-0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let _ = child.kill();
    let status = child.wait().unwrap();
    drop(stdin);
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    answered.unwrap_or_else(|e| panic!("{e}; plugin {status}: {err}"));
    let second_err = String::from_utf8_lossy(&second.stderr);
    assert!(
        second.status.code() == Some(1)
            && second_err.contains("409")
            && second_err.contains(&format!(
                "its console is in use by system:serviceaccount:{ns}:console-alice"
            )),
        "{second_err}"
    );
    // Once it is closed, the console is free again: a new session stays
    // open (it is not refused) until it is ended.
    let (_, took) = wait_for(Duration::from_secs(20), "the console freed", || {
        let mut c = env
            .plugin_command(&alice, &["console", "tiny-worker-0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        match c.try_wait().unwrap() {
            None => {
                let _ = c.kill();
                let _ = c.wait();
                Ok(())
            }
            Some(st) => {
                let mut e = String::new();
                use std::io::Read;
                let _ = c.stderr.take().unwrap().read_to_string(&mut e);
                Err(format!("{st}: {e}"))
            }
        }
    })
    .unwrap();
    println!(
        "a second console session: 409 naming the holder; free again {:.1}s after it closed",
        took.as_secs_f64()
    );
    println!(
        "kubectl yukumo console tiny-worker-0: the guest's shell answered after {:.1}s (editor); viewer 403, no token 401",
        t.elapsed().as_secs_f64()
    );

    // Deleting the cluster removes every domain and file from every host.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "tiny", "--wait=true"])
        .unwrap();
    let (_, took) = wait_for(Duration::from_secs(90), "domains and files gone", || {
        for h in env.hosts().iter().map(String::as_str) {
            let list = env.virsh(h, &["list", "--all", "--name"]);
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
    let ns = "badimage";
    let wrong = format!("sha256:{}", "1".repeat(64));
    env.apply(&tiny_cluster(ns, "bad", "", 0, "160Mi", Some(&wrong)));
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
    // The agent retries the fetch while the node exists (each attempt's
    // partial file is removed when its checksum fails): once the node is
    // gone, nothing of that image is left on any host.
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=120s"])
        .unwrap();
    let files = |h: &str| -> Vec<String> {
        let images = env.dir.join(format!("hosts/{h}/agent/images"));
        std::fs::read_dir(&images)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.contains(&"1".repeat(64)))
                    .collect()
            })
            .unwrap_or_default()
    };
    for h in env.hosts().iter().map(String::as_str) {
        // An attempt under way when the node went ends within seconds.
        let left = wait_for(Duration::from_secs(20), "no partial file", || {
            let bad = files(h);
            if bad.is_empty() {
                Ok(())
            } else {
                Err(format!("{bad:?}"))
            }
        });
        assert!(
            left.is_ok(),
            "{h}: partial or unverified files left: {left:?}"
        );
    }
}

#[test]
fn nodes_of_a_lost_host_restart_elsewhere_and_its_stale_domains_are_swept() {
    let env = Env::get();
    let grace: u64 = 6;
    env.set_site_grace(grace);
    let ns = "hostloss";
    env.apply(&tiny_cluster(
        ns,
        "lossy",
        "  startOrder: Parallel\n",
        1,
        "160Mi",
        None,
    ));
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
    // The worker's host is lost (the frontend is on a gateway host, and
    // every host here is one: any other host can take the worker).
    let victim = nodes
        .iter()
        .find(|n| n["spec"]["role"] != "frontend")
        .expect("a worker")
        .clone();
    let vname = victim["metadata"]["name"].as_str().unwrap().to_string();
    let old_uid = victim["metadata"]["uid"].as_str().unwrap().to_string();
    let lost = victim["spec"]["host"].as_str().unwrap().to_string();

    // Lose the host: its agent and its libvirtd die (its guest keeps running, unfenced).
    env.env_sh(&["stop", &format!("agent-{lost}"), "--signal", "KILL"])
        .unwrap();
    env.env_sh(&["stop", &format!("libvirtd-{lost}"), "--signal", "KILL"])
        .unwrap();
    let ((new_uid, new_host), took) = wait_for(
        Duration::from_secs(grace + 120),
        "node running on another host",
        || {
            let out = env.kubectl(&["-n", ns, "get", "vn", &vname, "-o", "json"]);
            let n: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let host = n["spec"]["host"].as_str().unwrap_or("").to_string();
            let ready = n["status"]["phase"] == "Running" && !host.is_empty() && host != lost;
            let uid = n["metadata"]["uid"].as_str().unwrap_or("").to_string();
            if ready && uid != old_uid {
                Ok((uid, host))
            } else {
                Err(format!("{} {}", n["spec"]["host"], n["status"]["phase"]))
            }
        },
    )
    .unwrap();
    println!(
        "{vname} running on {new_host} {:.1}s after {lost} was lost (grace {grace}s)",
        took.as_secs_f64()
    );
    wait_for(Duration::from_secs(60), "guest up on its new host", || {
        if console(&env, &new_host, &new_uid).contains(&format!("hostname={vname} ")) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .unwrap();

    // The host returns: its stale domain is removed by the orphan sweep.
    env.env_sh(&["start-libvirtd", &lost]).unwrap();
    env.env_sh(&["start-agent", &lost]).unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(60),
        "stale domain swept on the returned host",
        || {
            let list = env.virsh(&lost, &["list", "--all", "--uuid"]);
            if list.contains(&old_uid) {
                Err(list)
            } else {
                Ok(())
            }
        },
    )
    .unwrap();
    println!(
        "stale domain of {vname} removed from {lost} {:.1}s after it returned",
        took.as_secs_f64()
    );
    env.set_site_grace(20);
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
    wait_for(Duration::from_secs(30), "the lost host Ready again", || {
        let h = json(&env, &["get", "host", &lost]);
        let ok = h["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if ok { Ok(()) } else { Err("not ready".into()) }
    })
    .unwrap();
}

/// PIDs of the running qemu processes of a host, by domain name.
fn qemu_pids(env: &Env, host: &str) -> BTreeMap<String, String> {
    let dir = env.dir.join(format!("hosts/{host}/run/qemu"));
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    // Guests' PID files are named after their domain (yk-…);
                    // driver.pid is libvirt's own.
                    let dom = name
                        .strip_suffix(".pid")
                        .filter(|d| d.starts_with("yk-"))?
                        .to_string();
                    let pid = std::fs::read_to_string(e.path()).ok()?.trim().to_string();
                    std::path::Path::new(&format!("/proc/{pid}"))
                        .exists()
                        .then_some((dom, pid))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn kill_9_of_controller_and_agents_mid_apply_converges_without_duplicates_or_restarts() {
    let env = Env::get();
    let ns = "crashy";
    let hosts = env.hosts();
    env.apply(&tiny_cluster(
        ns,
        "ten",
        "  startOrder: Parallel\n",
        9,
        "128Mi",
        None,
    ));
    // Mid-apply: some domains run, others do not yet.
    wait_for(Duration::from_secs(120), "a first domain running", || {
        let n: usize = hosts.iter().map(|h| qemu_pids(&env, h).len()).sum();
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("{n} running"))
        }
    })
    .unwrap();
    env.env_sh(&["stop", "controller-1", "--signal", "KILL"])
        .unwrap();
    for h in &hosts {
        env.env_sh(&["stop", &format!("agent-{h}"), "--signal", "KILL"])
            .unwrap();
    }
    let before: BTreeMap<String, String> = hosts.iter().flat_map(|h| qemu_pids(&env, h)).collect();
    println!(
        "killed controller and agents with {} of 10 domains running",
        before.len()
    );
    env.env_sh(&["start-controller", "1"]).unwrap();
    for h in &hosts {
        env.env_sh(&["start-agent", h]).unwrap();
    }
    let (_, took) = wait_for(Duration::from_secs(300), "10/10 ready", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "ten"]);
        if vc["status"]["ready"] == "10/10" {
            Ok(())
        } else {
            Err(vc["status"]["ready"].to_string())
        }
    })
    .unwrap();
    println!(
        "converged to 10/10 {:.1}s after the restart",
        took.as_secs_f64()
    );
    let after: BTreeMap<String, String> = hosts.iter().flat_map(|h| qemu_pids(&env, h)).collect();
    for (dom, pid) in &before {
        assert_eq!(
            after.get(dom),
            Some(pid),
            "{dom} was restarted (qemu pid changed)"
        );
    }
    // No duplicates, nothing leaked: one domain and one directory per node.
    let nodes = json(&env, &["-n", ns, "get", "vn"])["items"]
        .as_array()
        .cloned()
        .unwrap();
    assert_eq!(nodes.len(), 10);
    for h in hosts.iter().map(String::as_str) {
        let mine: Vec<&Value> = nodes.iter().filter(|n| n["spec"]["host"] == h).collect();
        let doms: Vec<String> = env
            .virsh(h, &["list", "--all", "--name"])
            .lines()
            .filter(|l| l.starts_with("yk-"))
            .map(str::to_string)
            .collect();
        assert_eq!(doms.len(), mine.len(), "{h}: domains {doms:?}");
        let dirs = std::fs::read_dir(env.dir.join(format!("hosts/{h}/agent/nodes")))
            .unwrap()
            .count();
        assert_eq!(dirs, mine.len(), "{h}: node directories");
    }
    env.kubectl_ok(&["-n", ns, "delete", "vc", "ten", "--wait=true"])
        .unwrap();
    wait_for(Duration::from_secs(90), "guests gone", || {
        let n: usize = hosts.iter().map(|h| qemu_pids(&env, h).len()).sum();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} qemu left"))
        }
    })
    .unwrap();
}

/// Seconds since the epoch, now.
fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `date -u` formatting of an epoch second.
fn utc(secs: u64, fmt: &str) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), fmt])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_weekly_window_powers_the_cluster_on_and_off_at_its_boundaries() {
    let env = Env::get();
    let ns = "weekly";
    // A one-minute window starting at the next minute boundary (at least 10 s
    // ahead, so the state before it is observed), in UTC on today's weekday.
    let now = epoch() as u64;
    let mut t0 = (now / 60 + 1) * 60;
    if t0 - now < 10 {
        t0 += 60;
    }
    let t1 = t0 + 60;
    let day = utc(t0, "+%a");
    let extra = format!(
        "  reservation: {{timeZone: UTC, weekly: [{{days: [{day}], start: '{}', end: '{}'}}]}}\n",
        utc(t0, "+%H:%M"),
        utc(t1, "+%H:%M")
    );
    env.apply(&tiny_cluster(ns, "weekly", &extra, 0, "128Mi", None));
    let phase = |env: &Env| -> String {
        let out = env.kubectl(&["-n", ns, "get", "vn", "weekly-frontend", "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_default()["status"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    // Before the window: the node exists, its domain is defined but stopped.
    wait_for(Duration::from_secs(30), "defined and stopped", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "weekly"]);
        let next = vc["status"]["nextTransition"]["action"].clone();
        match (phase(&env).as_str(), next.as_str()) {
            ("Stopped", Some("Start")) => Ok(()),
            (p, n) => Err(format!("phase {p:?}, next {n:?}")),
        }
    })
    .unwrap();
    assert!(epoch() < t0 as f64, "observed before the window opened");
    // At the start boundary it powers on...
    wait_for(
        Duration::from_secs(90),
        "running in the window",
        || match phase(&env).as_str() {
            "Running" => Ok(()),
            p => Err(p.to_string()),
        },
    )
    .unwrap();
    let on = epoch() - t0 as f64;
    println!("powered on {on:.1}s after the window start");
    assert!(on > -1.0 && on < 10.0, "on {on:.1}s from the start");
    let vc = json(&env, &["-n", ns, "get", "vc", "weekly"]);
    assert_eq!(vc["status"]["nextTransition"]["action"], "Stop");
    // ... and off at the end boundary.
    wait_for(
        Duration::from_secs(90),
        "stopped after the window",
        || match phase(&env).as_str() {
            "Stopped" => Ok(()),
            p => Err(p.to_string()),
        },
    )
    .unwrap();
    let off = epoch() - t1 as f64;
    println!("powered off {off:.1}s after the window end");
    assert!(off > -1.0 && off < 15.0, "off {off:.1}s from the end");
    let vc = json(&env, &["-n", ns, "get", "vc", "weekly"]);
    assert_eq!(vc["status"]["nextTransition"]["action"], "Start");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// Which of `names` run now, per libvirt on every host (a domain is
/// `yk-<namespace>-<node>`).
fn running_domains(env: &Env, ns: &str, names: &[String]) -> Vec<String> {
    let mut up: Vec<String> = env
        .hosts()
        .iter()
        .flat_map(|h| {
            env.virsh(h, &["list", "--name"])
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|d| d.strip_prefix(&format!("yk-{ns}-")).map(str::to_string))
        .filter(|n| names.contains(n))
        .collect();
    up.sort();
    up.dedup();
    up
}

/// The pool's nodes: name → (uid, image url, host).
fn pool_nodes(env: &Env, ns: &str) -> BTreeMap<String, (String, String, String)> {
    json(env, &["-n", ns, "get", "vn", "-l", "yukumo.io/pool=worker"])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap_or("").to_string(),
                (
                    n["metadata"]["uid"].as_str().unwrap_or("").to_string(),
                    n["spec"]["image"]["url"].as_str().unwrap_or("").to_string(),
                    n["spec"]["host"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Apply the cluster's `manifest` (its pool's image changed), wait until
/// every node is at the cluster's new revision and ready, sampling libvirt
/// meanwhile: returns (revision, the fewest pool domains seen running,
/// seconds, samples).
fn roll_to(env: &Env, ns: &str, manifest: &str, names: &[String]) -> (String, usize, f64, usize) {
    let before = json(env, &["-n", ns, "get", "vc", "roll"])["status"]["revision"].clone();
    env.apply(manifest);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let (ns, names) = (ns.to_string(), names.to_vec());
        std::thread::spawn(move || {
            let env = Env::get();
            let (mut fewest, mut samples) = (usize::MAX, 0);
            let start = std::time::Instant::now();
            // Bounded: the wait below gives up after 300 s.
            while !done.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(330)
            {
                fewest = fewest.min(running_domains(&env, &ns, &names).len());
                samples += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (fewest, samples)
        })
    };
    let waited = wait_for(Duration::from_secs(300), "rollout done", || {
        let vc = json(env, &["-n", ns, "get", "vc", "roll"]);
        let st = &vc["status"];
        let ready = st["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready").cloned())
            .unwrap_or_default();
        if st["revision"] != before
            && st["updatedNodes"] == 5
            && st["ready"] == "5/5"
            && ready["status"] == "True"
        {
            Ok(st["revision"].as_str().unwrap_or("").to_string())
        } else {
            Err(format!(
                "{} {} {}",
                st["revision"], st["updatedNodes"], ready["message"]
            ))
        }
    });
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (fewest, samples) = sampler.join().unwrap();
    let (revision, took) = waited.unwrap();
    (revision, fewest, took.as_secs_f64(), samples)
}

/// Versioned server sets: a pool of 4 rolled to another image keeps at
/// least 3 of its VMs running throughout (libvirt sampled every 0.1 s on
/// every host), every node ends up made again from the new image (new uid,
/// its overlay on the new image), under its name and address; applying
/// the previous spec again rolls back the same way, to the same revision.
#[test]
fn a_rolling_image_change_keeps_three_of_four_running_and_rolls_back() {
    let env = Env::get();
    let ns = "rollout";
    let (path, _) = tiny_image();
    // The second image: the same guest as a raw file (another checksum,
    // another format).
    let raw = env.dir.join("tiny-guest.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", &path])
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let raw_sum = {
        let out = std::process::Command::new("sha256sum")
            .arg(&raw)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    };
    let original = tiny_cluster(ns, "roll", "", 4, "128Mi", None);
    env.apply(&original);
    let names: Vec<String> = (0..4).map(|i| format!("roll-worker-{i}")).collect();
    let (_, took) = wait_for(Duration::from_secs(240), "5/5 nodes ready", || {
        let vc = json(&env, &["-n", ns, "get", "vc", "roll"]);
        if vc["status"]["ready"] == "5/5" {
            Ok(())
        } else {
            Err(format!(
                "{} {}",
                vc["status"]["ready"], vc["status"]["conditions"]
            ))
        }
    })
    .unwrap();
    println!("apply -> 5/5 ready: {:.1}s", took.as_secs_f64());
    let first = pool_nodes(&env, ns);
    let ips = |env: &Env| -> BTreeMap<String, String> {
        json(env, &["-n", ns, "get", "vc", "roll"])["status"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or("").to_string(),
                    n["ip"].to_string(),
                )
            })
            .collect()
    };
    let first_ips = ips(&env);
    let rev0 = json(&env, &["-n", ns, "get", "vc", "roll"])["status"]["revision"]
        .as_str()
        .unwrap()
        .to_string();
    let fe = |env: &Env| env.jsonpath(&["-n", ns, "get", "vn", "roll-frontend"], "{.metadata.uid}");
    let fe_uid = fe(&env);

    let image = format!(
        "replicas: 4, image: {{url: 'file://{}', checksum: 'sha256:{raw_sum}', format: raw}}, ",
        raw.display()
    );
    assert_eq!(original.matches("replicas: 4, ").count(), 1);
    let changed = original.replace("replicas: 4, ", &image);
    let (rev1, fewest, took, samples) = roll_to(&env, ns, &changed, &names);
    println!(
        "rolled to {rev1} in {took:.1}s; fewest pool VMs running: {fewest}/4 ({samples} samples)"
    );
    assert!(fewest >= 3, "only {fewest} of 4 ran at one point");
    assert!(samples > 10, "{samples} samples");
    let second = pool_nodes(&env, ns);
    for n in &names {
        let (uid, url, host) = &second[n];
        assert_ne!(uid, &first[n].0, "{n} was made again");
        assert_eq!(url, &format!("file://{}", raw.display()), "{n}");
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(
                env.dir
                    .join(format!("hosts/{host}/agent/nodes/{uid}/root.qcow2")),
            )
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
        let backing = info["backing-filename"].as_str().unwrap_or("");
        assert!(backing.contains(&raw_sum), "{n}: overlay on {backing:?}");
        assert_eq!(info["backing-filename-format"], "raw", "{n}");
    }
    assert_eq!(ips(&env), first_ips, "names and addresses kept");

    // Rollback: the previous spec applied again (the pool takes the
    // frontend's image, as it did).
    let (rev2, fewest, took, samples) = roll_to(&env, ns, &original, &names);
    println!(
        "rolled back to {rev2} in {took:.1}s; fewest pool VMs running: {fewest}/4 ({samples} samples)"
    );
    assert_eq!(rev2, rev0, "rolled back to the first revision");
    assert!(fewest >= 3, "only {fewest} of 4 ran at one point");
    let third = pool_nodes(&env, ns);
    for n in &names {
        assert_eq!(third[n].1, format!("file://{path}"), "{n}");
        assert_ne!(third[n].0, second[n].0, "{n} was made again");
    }
    // The frontend's image never changed: it was never replaced.
    assert_eq!(fe(&env), fe_uid, "the frontend was left alone");
    let events = env
        .kubectl_ok(&[
            "-n",
            ns,
            "get",
            "events",
            "--field-selector",
            "reason=NodesReplaced",
            "-o",
            "jsonpath={.items[*].message}",
        ])
        .unwrap();
    // (Events of one reason are one series: its note is the first one's.)
    assert!(events.contains(&rev1), "{events}");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
    let _ = std::fs::remove_file(&raw);
}
