//! Volumes on real storage: a `dir` pool of a simulated host (libvirt's
//! storage API, qcow2 files) and an `iscsi` pool (raw files exported by
//! the host's tgtd, attached by QEMU's initiator on other hosts), attached
//! to real software-emulated guests.
//! The guest is driven through its root shell on ttyS1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use yukumo_e2e::{Env, condition, guest_sh, tiny_image, wait_for};

const MI: u64 = 1 << 20;

fn volume(ns: &str, name: &str, size: &str) -> String {
    volume_in(ns, name, size, "default")
}

fn volume_in(ns: &str, name: &str, size: &str, pool: &str) -> String {
    format!(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{size: {size}, pool: {pool}}}\n"
    )
}

/// A namespace and its NetworkGroup.
fn namespace(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---
apiVersion: yukumo.io/v1alpha1
kind: NetworkGroup
metadata: {{name: net, namespace: {ns}}}
spec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}
"
    )
}

/// A cluster of one tiny frontend with `volumes`.
fn cluster(ns: &str, name: &str, volumes: &[&str], running: bool) -> String {
    let (path, sum) = tiny_image();
    let vols: Vec<String> = volumes.iter().map(|v| format!("{{name: {v}}}")).collect();
    format!(
        "apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: {name}, namespace: {ns}}}
spec:
  networkGroup: net
  running: {running}
  frontend:
    size: {{cpu: 1, memory: 160Mi}}
    image: {{url: 'file://{path}', checksum: '{sum}'}}
    volumes: [{}]
",
        vols.join(", ")
    )
}

/// Delete Volumes of `ns`, each waited for (at most 90 s: its storage freed).
fn delete_volumes(env: &Env, ns: &str, names: &[&str]) {
    for v in names {
        env.kubectl_ok(&[
            "-n",
            ns,
            "delete",
            "volume",
            v,
            "--wait=true",
            "--timeout=90s",
        ])
        .unwrap();
    }
}

fn get(env: &Env, ns: &str, what: &[&str]) -> Value {
    let mut args = vec!["-n", ns, "get"];
    args.extend_from_slice(what);
    env.get_json(&args)
}

fn wait_reason(env: &Env, ns: &str, what: &[&str], type_: &str, reason: &str, secs: u64) -> Value {
    wait_for(
        Duration::from_secs(secs),
        &format!("{what:?} {type_} reason {reason}"),
        || {
            let o = get(env, ns, what);
            match condition(&o, type_) {
                Some((_, r, _)) if r == reason => Ok(o),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .unwrap()
    .0
}

/// Wait until Volume `name` is `Ready` (`Available`): it, and how long that took.
fn available(env: &Env, ns: &str, name: &str, secs: u64) -> (Value, Duration) {
    wait_for(
        Duration::from_secs(secs),
        &format!("volume {name} Available"),
        || {
            let v = get(env, ns, &["volume", name]);
            match condition(&v, "Ready") {
                Some((s, r, _)) if s == "True" && r == "Available" => Ok(v),
                other => Err(format!("{other:?} {}", v["status"])),
            }
        },
    )
    .unwrap()
}

/// The frontend's shell: its socket and uid.
fn frontend(env: &Env, ns: &str, vc: &str) -> (PathBuf, String) {
    let (vn, took) = wait_for(Duration::from_secs(240), "frontend running", || {
        let vc_obj = get(env, ns, &["vc", vc]);
        if vc_obj["status"]["ready"] != "1/1" {
            return Err(format!(
                "{} {:?}",
                vc_obj["status"]["ready"],
                condition(&vc_obj, "Ready")
            ));
        }
        Ok(get(env, ns, &["vn", &format!("{vc}-frontend")]))
    })
    .unwrap();
    println!("{vc}: frontend running after {:.1}s", took.as_secs_f64());
    let uid = vn["metadata"]["uid"].as_str().unwrap().to_string();
    let host = vn["spec"]["host"].as_str().unwrap_or_default().to_string();
    let socket = PathBuf::from(format!("/run/yukumo/{uid}.sock"));
    // Userspace is up when the shell answers (a guest on a busy machine
    // may take long under TCG); if it never does, say what its console said.
    let shell = wait_for(Duration::from_secs(240), "guest shell", || {
        guest_sh(&socket, "true", Duration::from_secs(5))
            .map_err(|e| e.to_string())
            .and_then(|(_, c)| {
                if c == 0 {
                    Ok(())
                } else {
                    Err(format!("exit {c}"))
                }
            })
    });
    if let Err(e) = shell {
        let console = std::fs::read_to_string(
            env.dir
                .join(format!("hosts/{host}/agent/nodes/{uid}/console.log")),
        )
        .unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        let status = get(env, ns, &["vn", &format!("{vc}-frontend")])["status"].to_string();
        panic!(
            "{e}\nnode status: {status}\nconsole (last lines, newest first):\n{}",
            tail.join("\n")
        );
    }
    (socket, uid)
}

/// Run `cmd` in the guest: its output, without the shell's prompts (a
/// marker line comes first, and prompt lines are dropped).
fn sh(socket: &Path, cmd: &str) -> String {
    let (out, code) = guest_sh(
        socket,
        &format!("echo @@BEGIN; {cmd}"),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(code, 0, "{cmd}: {out}");
    let after = out
        .rsplit_once("@@BEGIN\n")
        .map_or(out.as_str(), |(_, a)| a);
    after
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "/ #" && *l != "#")
        .collect::<Vec<_>>()
        .join("\n")
}

/// The guest's view of a disk: (bytes, serial), or None when absent.
fn guest_disk(socket: &Path, dev: &str) -> Option<(u64, String)> {
    let (out, code) = guest_sh(
        socket,
        &format!("cat /sys/block/{dev}/size /sys/block/{dev}/serial && echo"),
        Duration::from_secs(30),
    )
    .ok()?;
    if code != 0 {
        return None;
    }
    let words: Vec<&str> = out
        .split_whitespace()
        .filter(|w| *w != "/" && *w != "#")
        .collect();
    let sectors: u64 = words.first()?.parse().ok()?;
    Some((sectors * 512, words.get(1).unwrap_or(&"").to_string()))
}

/// Write `blocks` random 64 KiB blocks at the start of the guest's `vdc`;
/// their checksum.
fn fill(sock: &Path, blocks: u32) -> String {
    sh(
        sock,
        &format!("dd if=/dev/urandom of=/dev/vdc bs=65536 count={blocks} 2>/dev/null && sync"),
    );
    let sum = checksum(sock, blocks);
    assert_eq!(sum.len(), 64, "{sum}");
    sum
}

/// The checksum of the first `blocks` 64 KiB blocks of the guest's `vdc`.
fn checksum(sock: &Path, blocks: u32) -> String {
    sh(
        sock,
        &format!("dd if=/dev/vdc bs=65536 count={blocks} 2>/dev/null | sha256sum | cut -c1-64"),
    )
}

/// Grow Volume `vol` of `ns` to `mib` MiB while the guest at `sock` has it
/// as `vdc`: the guest sees the new size without a reboot.
fn grow_online(env: &Env, ns: &str, vol: &str, sock: &Path, mib: u64) {
    let patch = format!(r#"{{"spec":{{"size":"{mib}Mi"}}}}"#);
    env.kubectl_ok(&[
        "-n", ns, "patch", "volume", vol, "--type", "merge", "-p", &patch,
    ])
    .unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(90),
        &format!("guest sees {mib}Mi"),
        || match guest_disk(sock, "vdc") {
            Some((b, _)) if b == mib * MI => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap();
    println!(
        "{vol}: online grow to {mib}Mi seen by the guest after {:.1}s",
        took.as_secs_f64()
    );
}

/// virtio-blk carries at most 20 bytes of serial: the guest sees the
/// uid's first 20 characters.
fn serial_of(uid: &str) -> &str {
    &uid[..20]
}

#[test]
fn a_volume_keeps_its_data_across_clusters_grows_online_hot_plugs_and_is_deleted_after_detach() {
    let env = Env::get();
    let ns = "storage";
    env.apply(&namespace(ns));
    env.apply(&volume(ns, "data", "64Mi"));
    let (vol, took) = available(&env, ns, "data", 60);
    println!("volume created in {:.1}s", took.as_secs_f64());
    let vuid = vol["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(vol["status"]["location"]["host"], "host-1");
    assert_eq!(vol["status"]["capacity"], "64Mi");
    assert_eq!(vol["status"]["backing"]["capacityBytes"], 64 * MI);
    let path = vol["status"]["backing"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(path.ends_with(&format!("{vuid}.qcow2")), "{path}");
    assert!(std::path::Path::new(&path).exists(), "{path}");
    assert_eq!(
        vol["status"]["observedGeneration"],
        vol["metadata"]["generation"]
    );
    // The pool shows in the Site's status, with the volume in it.
    let (pool, _) = wait_for(Duration::from_secs(30), "pool in the Site's status", || {
        let site = env.get_json(&["get", "site", "local"]);
        let pool = site["status"]["storagePools"][0].clone();
        if pool["capacityBytes"].as_u64().unwrap_or(0) > 0
            && pool["volumes"].as_u64().unwrap_or(0) >= 1
        {
            Ok(pool)
        } else {
            Err(pool.to_string())
        }
    })
    .unwrap();
    assert_eq!(pool["name"], "default");
    assert!(
        pool["provisionedBytes"].as_u64().unwrap() >= 64 * MI,
        "{pool}"
    );

    // Attached to a frontend, which is placed on the pool's host: the
    // guest sees exactly the size and the uid as serial, and writes data.
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (sock, node_uid) = frontend(&env, ns, "vc");
    let vn = get(&env, ns, &["vn", "vc-frontend"]);
    assert_eq!(
        vn["spec"]["host"], "host-1",
        "pinned to the dir pool's host"
    );
    assert_eq!(vn["spec"]["disks"][0]["target"], "vdc");
    assert_eq!(vn["status"]["disks"][0]["serial"], vuid.as_str());
    let vol = get(&env, ns, &["volume", "data"]);
    assert_eq!(vol["status"]["attachedTo"]["node"], "vc-frontend");
    assert_eq!(vol["status"]["phase"], "Attached");
    assert_eq!(
        guest_disk(&sock, "vdc"),
        Some((64 * MI, serial_of(&vuid).to_string()))
    );
    let sum = fill(&sock, 16);

    // Grown while attached: the running guest sees the new size.
    grow_online(&env, ns, "data", &sock, 96);
    let vol = wait_reason(&env, ns, &["volume", "data"], "Ready", "Attached", 60);
    assert_eq!(vol["status"]["capacity"], "96Mi");

    // The cluster deleted: the volume stays, released, with its data.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "vc", "--wait=true"])
        .unwrap();
    let (_, took) = wait_for(Duration::from_secs(90), "volume released", || {
        let v = get(&env, ns, &["volume", "data"]);
        if v["status"]["attachedTo"].is_null() && v["status"]["phase"] == "Available" {
            Ok(())
        } else {
            Err(v["status"].to_string())
        }
    })
    .unwrap();
    println!(
        "cluster deleted; volume released after {:.1}s",
        took.as_secs_f64()
    );
    assert!(std::path::Path::new(&path).exists());
    assert!(
        domain_serials(&env, "host-1", &node_uid).is_empty(),
        "the node's domain is gone, and with it its hold on the file"
    );

    // Recreated: the same data is there (checksum), at the grown size.
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (sock, _) = frontend(&env, ns, "vc");
    assert_eq!(
        guest_disk(&sock, "vdc"),
        Some((96 * MI, serial_of(&vuid).to_string()))
    );
    assert_eq!(checksum(&sock, 16), sum, "data survives the cluster");

    // Hot-plug a second volume into the running guest, at the next target.
    env.apply(&volume(ns, "extra", "32Mi"));
    let extra = wait_reason(&env, ns, &["volume", "extra"], "Ready", "Available", 60);
    let euid = extra["metadata"]["uid"].as_str().unwrap().to_string();
    env.apply(&cluster(ns, "vc", &["data", "extra"], true));
    let (_, took) = wait_for(
        Duration::from_secs(60),
        "hot-plugged vdd",
        || match guest_disk(&sock, "vdd") {
            Some(d) if d == (32 * MI, serial_of(&euid).to_string()) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap();
    println!(
        "hot-plug seen by the guest after {:.1}s",
        took.as_secs_f64()
    );

    // Deleting an attached volume waits, naming its holder...
    env.kubectl_ok(&["-n", ns, "delete", "volume", "extra", "--wait=false"])
        .unwrap();
    let v = wait_reason(&env, ns, &["volume", "extra"], "Ready", "DetachPending", 30);
    let (_, _, msg) = condition(&v, "Ready").unwrap();
    assert!(msg.contains("node vc-frontend of cluster vc"), "{msg}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        guest_disk(&sock, "vdd").is_some(),
        "still attached while the cluster lists it"
    );
    // ...and completes once the cluster lets go: hot-unplugged, storage gone.
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (_, took) = wait_for(
        Duration::from_secs(90),
        "extra deleted and unplugged",
        || {
            let gone = env
                .kubectl(&["-n", ns, "get", "volume", "extra"])
                .status
                .code()
                == Some(1);
            let unplugged = guest_disk(&sock, "vdd").is_none();
            if gone && unplugged {
                Ok(())
            } else {
                Err(format!("volume gone: {gone}, unplugged: {unplugged}"))
            }
        },
    )
    .unwrap();
    println!("detached and deleted after {:.1}s", took.as_secs_f64());
    let extra_file = PathBuf::from(path.replace(&vuid, &euid));
    assert!(!extra_file.exists(), "{extra_file:?} removed");
    assert!(guest_disk(&sock, "vdc").is_some(), "the other volume stays");

    env.kubectl_ok(&["-n", ns, "delete", "vc", "vc", "--wait=true"])
        .unwrap();
    delete_volumes(&env, ns, &["data"]);
    assert!(!std::path::Path::new(&path).exists(), "{path} removed");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn two_clusters_racing_for_one_volume_attach_it_exactly_once() {
    let env = Env::get();
    let ns = "storage-race";
    env.apply(&namespace(ns));
    env.apply(&volume(ns, "shared", "16Mi"));
    wait_reason(&env, ns, &["volume", "shared"], "Ready", "Available", 60);
    let mut winners = std::collections::BTreeMap::<String, u32>::new();
    for run in 0..20 {
        // Both clusters in one apply: their reconciles run concurrently.
        // Stopped clusters: the claim is what races, not the guests.
        env.apply(&format!(
            "{}---\n{}",
            cluster(ns, "a", &["shared"], false),
            cluster(ns, "b", &["shared"], false)
        ));
        let (winner, _) = wait_for(Duration::from_secs(30), "one claim and one refusal", || {
            let v = get(&env, ns, &["volume", "shared"]);
            let holder = v["status"]["attachedTo"]["cluster"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if holder.is_empty() {
                return Err("no holder yet".into());
            }
            let loser = if holder == "a" { "b" } else { "a" };
            match condition(&get(&env, ns, &["vc", loser]), "Ready") {
                Some((_, r, m))
                    if r == "VolumeInUse" && m.contains(&format!("cluster {holder}")) =>
                {
                    Ok(holder)
                }
                other => Err(format!("holder {holder}, loser {other:?}")),
            }
        })
        .unwrap();
        // Exactly one node lists the disk.
        let nodes = get(&env, ns, &["vn"]);
        let with_disk: Vec<&str> = nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["spec"]["disks"].as_array().is_some_and(|d| !d.is_empty()))
            .map(|n| n["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(with_disk, vec![format!("{winner}-frontend")], "run {run}");
        *winners.entry(winner).or_default() += 1;
        env.kubectl_ok(&["-n", ns, "delete", "vc", "a", "b", "--wait=true"])
            .unwrap();
        wait_for(Duration::from_secs(60), "released", || {
            let v = get(&env, ns, &["volume", "shared"]);
            if v["status"]["attachedTo"].is_null() {
                Ok(())
            } else {
                Err(v["status"]["attachedTo"].to_string())
            }
        })
        .unwrap();
    }
    println!("20 races, exactly one attachment each; winners {winners:?}");
    env.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "volume",
        "shared",
        "--wait=true",
        "--timeout=60s",
    ])
    .unwrap();
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn bad_volume_specs_and_other_tenants_volumes_are_refused_clearly() {
    let env = Env::get();
    env.apply(&namespace("team-a"));
    env.apply(&namespace("team-b"));
    // A team-b user (the built-in `edit` role, which the chart's
    // yukumo-edit/-view aggregate into) works with Volumes in team-b only,
    // and never writes VirtualNodes.
    env.kubectl_ok(&[
        "-n",
        "team-b",
        "create",
        "rolebinding",
        "team-b-edit",
        "--clusterrole=edit",
        "--user=bob",
    ])
    .unwrap();
    let can = |verb: &str, what: &str, ns: &str| {
        wait_for(Duration::from_secs(30), "aggregated roles", || {
            // `what` may carry `--subresource=status`.
            let mut args = vec!["auth", "can-i", verb];
            args.extend(what.split_whitespace());
            args.extend(["-n", ns, "--as", "bob"]);
            let out = env.kubectl(&args);
            Ok::<_, String>(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap()
        .0
    };
    wait_for(
        Duration::from_secs(30),
        "edit aggregates yukumo-edit",
        || match can("create", "volumes.yukumo.io", "team-b").as_str() {
            "yes" => Ok(()),
            o => Err(o.to_string()),
        },
    )
    .unwrap();
    for (verb, what, ns, want) in [
        ("list", "volumes.yukumo.io", "team-b", "yes"),
        ("get", "volumes.yukumo.io", "team-b", "yes"),
        ("create", "virtualclusters.yukumo.io", "team-b", "yes"),
        ("list", "volumes.yukumo.io", "team-a", "no"),
        ("get", "volumes.yukumo.io", "team-a", "no"),
        ("create", "virtualnodes.yukumo.io", "team-b", "no"),
        (
            "patch",
            "volumes.yukumo.io --subresource=status",
            "team-b",
            "no",
        ),
        (
            "patch",
            "virtualclusters.yukumo.io --subresource=status",
            "team-b",
            "no",
        ),
        ("get", "virtualnodes.yukumo.io", "team-b", "yes"),
        ("patch", "hosts.yukumo.io", "", "no"),
    ] {
        let ns = if ns.is_empty() { "default" } else { ns };
        assert_eq!(
            can(verb, what, ns),
            want,
            "bob: can-i {verb} {what} -n {ns}"
        );
    }
    // team-b's namespace admin: the built-in `admin` role only (which the
    // chart's yukumo-admin aggregates into), nothing of yukumo's own.
    env.kubectl_ok(&[
        "-n",
        "team-b",
        "create",
        "rolebinding",
        "team-b-admin",
        "--clusterrole=admin",
        "--user=carol",
    ])
    .unwrap();
    let carol = |verb: &str, what: &str, ns: &str| {
        let mut args = vec!["auth", "can-i", verb];
        args.extend(what.split_whitespace());
        args.extend(["-n", ns, "--as", "carol"]);
        String::from_utf8_lossy(&env.kubectl(&args).stdout)
            .trim()
            .to_string()
    };
    let mut wrong = Vec::new();
    let mut checks = 0;
    for kind in [
        "virtualclusters.yukumo.io",
        "networkgroups.yukumo.io",
        "volumes.yukumo.io",
    ] {
        for verb in ["create", "get", "list", "patch", "delete"] {
            for (ns, want) in [("team-b", "yes"), ("team-a", "no")] {
                checks += 1;
                let got = carol(verb, kind, ns);
                if got != want {
                    wrong.push(format!("carol {verb} {kind} -n {ns}: {got}, want {want}"));
                }
            }
        }
    }
    for (verb, what, ns, want) in [
        ("get", "virtualnodes.yukumo.io", "team-b", "yes"),
        ("create", "virtualnodes.yukumo.io", "team-b", "no"),
        ("delete", "virtualnodes.yukumo.io", "team-b", "no"),
        (
            "patch",
            "virtualclusters.yukumo.io --subresource=status",
            "team-b",
            "no",
        ),
        ("get", "resourcequotas", "team-b", "yes"),
        ("create", "resourcequotas", "team-b", "no"),
        ("get", "sites.yukumo.io", "default", "no"),
        ("patch", "hosts.yukumo.io", "default", "no"),
    ] {
        checks += 1;
        let got = carol(verb, what, ns);
        if got != want {
            wrong.push(format!("carol {verb} {what} -n {ns}: {got}, want {want}"));
        }
    }
    println!("team-b admin (built-in admin): {checks} can-i checks");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Refused by the API server, naming the field.
    let out = env.kubectl_stdin(&["apply", "-f", "-"], &volume("team-a", "bad", "lots"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("size"), "{err}");
    env.apply(&volume("team-a", "secret", "16Mi"));
    wait_reason(
        &env,
        "team-a",
        &["volume", "secret"],
        "Ready",
        "Available",
        60,
    );
    let out = env.kubectl(&[
        "-n",
        "team-a",
        "patch",
        "volume",
        "secret",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"size":"8Mi"}}"#,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("never shrink"),
        "{err}"
    );
    // Conditions naming the field.
    env.apply(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {name: nopool, namespace: team-a}\nspec: {size: 16Mi, pool: nope}\n",
    );
    let v = wait_reason(
        &env,
        "team-a",
        &["volume", "nopool"],
        "Stalled",
        "PoolNotFound",
        30,
    );
    assert!(
        condition(&v, "Ready")
            .unwrap()
            .2
            .starts_with("spec.pool: no Site declares")
    );
    env.apply(
        "apiVersion: yukumo.io/v1alpha1\nkind: Site\nmetadata: {name: elsewhere}\nspec:\n  storagePools: [{name: remote, type: dir, host: far-1}]\n---\napiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {name: wrongsite, namespace: team-a}\nspec: {size: 16Mi, pool: remote, site: local}\n",
    );
    let v = wait_reason(
        &env,
        "team-a",
        &["volume", "wrongsite"],
        "Stalled",
        "PoolNotFound",
        30,
    );
    let msg = condition(&v, "Ready").unwrap().2;
    assert!(
        msg.contains("Site local has no storage pool \"remote\"")
            && msg.contains("at Site elsewhere"),
        "{msg}"
    );
    env.apply(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {name: fromsnap, namespace: team-a}\nspec: {size: 16Mi, source: {snapshot: {volume: secret, name: none}}}\n",
    );
    let v = wait_reason(
        &env,
        "team-a",
        &["volume", "fromsnap"],
        "Stalled",
        "SourceNotFound",
        30,
    );
    assert_eq!(
        condition(&v, "Ready").unwrap().2,
        "spec.source.snapshot.name: Volume \"secret\" has no snapshot \"none\""
    );
    assert!(
        v["status"]["location"].is_null(),
        "never created blank instead"
    );
    // Tenant B names tenant A's volume: not found in its own namespace, an
    // Event, and no disk (no node at all).
    env.apply(&cluster("team-b", "thief", &["secret"], true));
    let vc = wait_reason(
        &env,
        "team-b",
        &["vc", "thief"],
        "Stalled",
        "VolumeNotFound",
        30,
    );
    let msg = condition(&vc, "Ready").unwrap().2;
    assert!(
        msg.contains("\"secret\"") && msg.contains("team-b"),
        "{msg}"
    );
    let events = env
        .kubectl_ok(&[
            "-n",
            "team-b",
            "get",
            "events",
            "--field-selector",
            "reason=VolumeNotFound",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(!events.trim().is_empty(), "an Event");
    assert_eq!(
        get(&env, "team-b", &["vn"])["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(get(&env, "team-a", &["volume", "secret"])["status"]["attachedTo"].is_null());
    for (ns, name) in [
        ("team-a", "nopool"),
        ("team-a", "wrongsite"),
        ("team-a", "fromsnap"),
        ("team-a", "secret"),
    ] {
        env.kubectl_ok(&[
            "-n",
            ns,
            "delete",
            "volume",
            name,
            "--wait=true",
            "--timeout=60s",
        ])
        .unwrap();
    }
    env.kubectl_ok(&["delete", "site", "elsewhere"]).unwrap();
    env.kubectl_ok(&["delete", "namespace", "team-a", "team-b", "--wait=false"])
        .unwrap();
}

/// The volume disks QEMU holds for a domain, by serial (from the host).
fn domain_serials(env: &Env, host: &str, uid: &str) -> Vec<String> {
    let sock = env.dir.join(format!("hosts/{host}/run/libvirt-sock"));
    let out = std::process::Command::new("virsh")
        .arg("-c")
        .arg(format!("qemu:///system?socket={}", sock.display()))
        .args(["dumpxml", uid])
        .output()
        .unwrap();
    let xml = String::from_utf8_lossy(&out.stdout);
    let mut serials: Vec<String> = xml
        .split("<serial>")
        .skip(1)
        .filter_map(|s| s.split("</serial>").next())
        .map(str::to_string)
        .collect();
    serials.sort();
    serials
}

#[test]
fn kill_9_of_the_agent_mid_attach_grow_and_snapshot_converges_with_one_attachment_and_the_data() {
    let env = Env::get();
    let ns = "storage-kill";
    env.apply(&namespace(ns));
    env.apply(&volume(ns, "data", "32Mi"));
    env.apply(&volume(ns, "more", "16Mi"));
    wait_reason(&env, ns, &["volume", "data"], "Ready", "Available", 60);
    let more = wait_reason(&env, ns, &["volume", "more"], "Ready", "Available", 60);
    let muid = more["metadata"]["uid"].as_str().unwrap().to_string();
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (sock, node_uid) = frontend(&env, ns, "vc");
    sh(
        &sock,
        "dd if=/dev/urandom of=/dev/vdc bs=65536 count=8 2>/dev/null && sync",
    );
    let sum = checksum(&sock, 8);
    let data_uid = get(&env, ns, &["volume", "data"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    // Rounds: a hot-plug (or unplug) and an online grow asked at once, and
    // the agent of the host killed while it carries them out, at a
    // different moment each time; then restarted.
    for (round, delay_ms) in [150u64, 450, 500, 550, 600, 650, 1000]
        .into_iter()
        .enumerate()
    {
        let plugged = round % 2 == 0;
        let size = 32 + 8 * (round as u64 + 1);
        let vols: &[&str] = if plugged {
            &["data", "more"]
        } else {
            &["data"]
        };
        env.apply(&cluster(ns, "vc", vols, true));
        let patch = format!(r#"{{"spec":{{"size":"{size}Mi"}}}}"#);
        env.kubectl_ok(&[
            "-n", ns, "patch", "volume", "data", "--type", "merge", "-p", &patch,
        ])
        .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        env.env_sh(&["stop", "agent-host-1", "--signal", "KILL"])
            .unwrap();
        let at_kill = (
            guest_disk(&sock, "vdc").map(|d| d.0),
            guest_disk(&sock, "vdd").is_some(),
        );
        env.env_sh(&["start-agent", "host-1"]).unwrap();
        let (_, took) = wait_for(
            Duration::from_secs(90),
            "converged after the restart",
            || {
                let grown = guest_disk(&sock, "vdc").map(|d| d.0);
                let more = guest_disk(&sock, "vdd");
                let want_more = plugged.then(|| (16 * MI, serial_of(&muid).to_string()));
                if grown == Some(size * MI) && more == want_more {
                    Ok(())
                } else {
                    Err(format!("vdc {grown:?}, vdd {more:?}"))
                }
            },
        )
        .unwrap();
        println!(
            "round {round}: killed {delay_ms} ms after the change (the guest then: vdc {:?} bytes, vdd {}); converged {:.1}s after the restart",
            at_kill.0,
            if at_kill.1 { "present" } else { "absent" },
            took.as_secs_f64()
        );
        // Each volume exactly once in the guest and in QEMU; the data intact.
        let devs = sh(&sock, "ls /sys/block | grep '^vd' | tr '\\n' ' ' && echo");
        let want_devs: &[&str] = if plugged {
            &["vda", "vdb", "vdc", "vdd"]
        } else {
            &["vda", "vdb", "vdc"]
        };
        assert_eq!(
            devs.split_whitespace().collect::<Vec<_>>(),
            want_devs,
            "round {round}"
        );
        let mut want = vec![data_uid.clone()];
        if plugged {
            want.push(muid.clone());
        }
        want.sort();
        assert_eq!(
            domain_serials(&env, "host-1", &node_uid),
            want,
            "round {round}"
        );
        assert_eq!(checksum(&sock, 8), sum, "round {round}");
    }
    wait_reason(&env, ns, &["volume", "data"], "Ready", "Attached", 60);
    env.kubectl_ok(&["-n", ns, "delete", "vc", "vc", "--wait=true"])
        .unwrap();
    wait_reason(&env, ns, &["volume", "data"], "Ready", "Available", 60);

    // Snapshots (taken while detached), the agent killed while it takes
    // each: after the restart every snapshot exists once, is listed in
    // status, and is a complete copy (qemu-img compare: same content).
    let path = get(&env, ns, &["volume", "data"])["status"]["backing"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let mut snaps: Vec<String> = Vec::new();
    for (round, delay_ms) in [20u64, 120, 300].into_iter().enumerate() {
        snaps.push(format!("s{round}"));
        let list: Vec<String> = snaps.iter().map(|s| format!("{{name: {s}}}")).collect();
        env.apply(&format!(
            "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: data, namespace: {ns}}}\nspec: {{size: {}Mi, pool: default, snapshots: [{}]}}\n",
            32 + 8 * 7,
            list.join(", ")
        ));
        std::thread::sleep(Duration::from_millis(delay_ms));
        env.env_sh(&["stop", "agent-host-1", "--signal", "KILL"])
            .unwrap();
        env.env_sh(&["start-agent", "host-1"]).unwrap();
        let (_, took) = wait_for(Duration::from_secs(90), "snapshot listed", || {
            let v = get(&env, ns, &["volume", "data"]);
            let have: Vec<&str> = v["status"]["snapshots"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
                .unwrap_or_default();
            if have == snaps.iter().map(String::as_str).collect::<Vec<_>>() {
                Ok(())
            } else {
                Err(format!("{have:?}"))
            }
        })
        .unwrap();
        let snap = path.replace(".qcow2", &format!("@s{round}.qcow2"));
        let cmp = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2", &path, &snap])
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "round {round}: snapshot differs from the volume: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
        println!(
            "snapshot round {round}: agent killed {delay_ms} ms after the change; listed {:.1}s after the restart, identical to the volume",
            took.as_secs_f64()
        );
    }
    let dir = std::path::Path::new(&path).parent().unwrap();
    let files = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&data_uid))
        .count();
    assert_eq!(files, 1 + snaps.len(), "the volume and each snapshot once");
    delete_volumes(&env, ns, &["data", "more"]);
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn storage_with_the_marker_but_no_volume_is_reported_and_never_deleted() {
    let env = Env::get();
    // The pool's folder exists once the agent reported it.
    let pool = env.dir.join("hosts/host-1/agent/pools/default");
    wait_for(Duration::from_secs(60), "pool folder", || {
        pool.is_dir()
            .then_some(())
            .ok_or_else(|| "no folder yet".to_string())
    })
    .unwrap();
    let orphan = pool.join("0badc0de-0000-4000-8000-00000000e2e0.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&orphan)
        .arg("1M")
        .status()
        .unwrap();
    assert!(made.success());
    let port = env.metrics_port("agent-host-1").unwrap();
    let (_, took) = wait_for(
        Duration::from_secs(90),
        "orphan counted and reported",
        || {
            let (_, metrics) = env.http_get(port, "/metrics").map_err(|e| e.to_string())?;
            let counted = metrics
                .lines()
                .any(|l| l.starts_with("yukumo_agent_orphaned_volumes ") && !l.ends_with(" 0"));
            let events = env
                .kubectl_ok(&[
                    "get",
                    "events",
                    "-A",
                    "--field-selector",
                    "reason=OrphanedStorage",
                    "-o",
                    "json",
                ])
                .map_err(|e| e.to_string())?;
            let reported = events.contains("0badc0de-0000-4000-8000-00000000e2e0.qcow2");
            if counted && reported {
                Ok(())
            } else {
                Err(format!("metric {counted}, event {reported}"))
            }
        },
    )
    .unwrap();
    println!("orphan reported after {:.1}s", took.as_secs_f64());
    // Still there after further passes: reported, never deleted.
    std::thread::sleep(Duration::from_secs(3));
    assert!(orphan.exists(), "an orphan is never deleted by yukumo");
    std::fs::remove_file(&orphan).unwrap();
}

#[test]
fn snapshot_write_more_restore_gives_the_original_back_and_a_copy_from_the_snapshot() {
    let env = Env::get();
    let ns = "storage-snap";
    env.apply(&namespace(ns));
    env.apply(&volume(ns, "data", "32Mi"));
    let vol = wait_reason(&env, ns, &["volume", "data"], "Ready", "Available", 60);
    let path = vol["status"]["backing"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (sock, _) = frontend(&env, ns, "vc");
    let sum_of = |dev: &str| {
        sh(
            &sock,
            &format!("dd if=/dev/{dev} bs=65536 count=8 2>/dev/null | sha256sum | cut -c1-64"),
        )
    };
    sh(
        &sock,
        "dd if=/dev/urandom of=/dev/vdc bs=65536 count=8 2>/dev/null && sync",
    );
    let original = sum_of("vdc");
    // A snapshot asked while a running guest writes the volume waits...
    let snap = |names: &str, restore: Option<&str>| {
        let restore = restore.map_or("null".to_string(), |r| format!("\"{r}\""));
        let patch = format!(r#"{{"spec":{{"snapshots":[{names}],"restoreFrom":{restore}}}}}"#);
        env.kubectl_ok(&[
            "-n", ns, "patch", "volume", "data", "--type", "merge", "-p", &patch,
        ])
        .unwrap();
    };
    snap(r#"{"name":"s1"}"#, None);
    let v = wait_reason(
        &env,
        ns,
        &["volume", "data"],
        "Ready",
        "SnapshotPending",
        30,
    );
    assert!(
        v["status"]["snapshots"]
            .as_array()
            .is_none_or(|a| a.is_empty())
    );
    // ...and is taken once it is detached (hot-unplugged).
    env.apply(&cluster(ns, "vc", &[], true));
    let (v, took) = wait_for(Duration::from_secs(60), "snapshot taken", || {
        let v = get(&env, ns, &["volume", "data"]);
        match (
            condition(&v, "Ready"),
            v["status"]["snapshots"][0]["name"].as_str(),
        ) {
            (Some((s, r, _)), Some("s1")) if s == "True" && r == "Available" => Ok(v),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    println!("snapshot taken {:.1}s after the detach", took.as_secs_f64());
    assert_eq!(v["status"]["snapshots"][0]["size"], (32 * MI).to_string());
    assert!(std::path::Path::new(&path.replace(".qcow2", "@s1.qcow2")).exists());
    // Write more.
    env.apply(&cluster(ns, "vc", &["data"], true));
    wait_for(Duration::from_secs(60), "re-attached", || {
        guest_disk(&sock, "vdc")
            .map(|_| ())
            .ok_or_else(|| "no vdc".to_string())
    })
    .unwrap();
    sh(
        &sock,
        "dd if=/dev/urandom of=/dev/vdc bs=65536 count=8 2>/dev/null && sync",
    );
    assert_ne!(sum_of("vdc"), original);
    // Restore asked while attached: it waits (and the data stays).
    snap(r#"{"name":"s1"}"#, Some("s1"));
    let v = wait_reason(&env, ns, &["volume", "data"], "Ready", "RestorePending", 30);
    let (_, _, msg) = condition(&v, "Ready").unwrap();
    assert!(
        msg.contains("waits until it is let go of (attached to node vc-frontend"),
        "{msg}"
    );
    // Detached: restored in place; a new volume is made from the snapshot.
    env.apply(&cluster(ns, "vc", &[], true));
    env.apply(&format!(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: copy, namespace: {ns}}}\nspec: {{size: 48Mi, pool: default, source: {{snapshot: {{volume: data, name: s1}}}}}}\n"
    ));
    let (_, took) = wait_for(Duration::from_secs(90), "restored", || {
        let v = get(&env, ns, &["volume", "data"]);
        match (condition(&v, "Ready"), v["status"]["restoredFrom"].as_str()) {
            (Some((s, _, _)), Some("s1")) if s == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    println!(
        "restored in place {:.1}s after the detach",
        took.as_secs_f64()
    );
    let copy = wait_reason(&env, ns, &["volume", "copy"], "Ready", "Available", 60);
    assert_eq!(copy["status"]["capacity"], "48Mi");
    // Both attached again: the original content is back, and in the copy.
    env.apply(&cluster(ns, "vc", &["data", "copy"], true));
    wait_for(Duration::from_secs(60), "both attached", || {
        match (guest_disk(&sock, "vdc"), guest_disk(&sock, "vdd")) {
            (Some(_), Some(d)) if d.0 == 48 * MI => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    assert_eq!(sum_of("vdc"), original, "restored");
    assert_eq!(sum_of("vdd"), original, "copied from the snapshot");
    // No drift: the restore is not repeated while restoreFrom stays.
    std::thread::sleep(Duration::from_secs(3));
    let v = get(&env, ns, &["volume", "data"]);
    assert_eq!(condition(&v, "Ready").unwrap().1, "Attached");
    // Retention: a snapshot removed from the list is deleted.
    snap("", None);
    wait_for(Duration::from_secs(60), "snapshot deleted", || {
        let gone = !std::path::Path::new(&path.replace(".qcow2", "@s1.qcow2")).exists();
        let v = get(&env, ns, &["volume", "data"]);
        if gone
            && v["status"]["snapshots"]
                .as_array()
                .is_none_or(|a| a.is_empty())
        {
            Ok(())
        } else {
            Err(format!("file gone {gone}, {}", v["status"]["snapshots"]))
        }
    })
    .unwrap();
    env.kubectl_ok(&["-n", ns, "delete", "vc", "vc", "--wait=true"])
        .unwrap();
    delete_volumes(&env, ns, &["data", "copy"]);
    assert!(!std::path::Path::new(&path).exists());
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn a_volume_from_an_image_holds_the_verified_image_at_its_size() {
    let env = Env::get();
    let ns = "storage-image";
    env.apply(&namespace(ns));
    let (path, sum) = tiny_image();
    let image_volume = |name: &str, checksum: &str| {
        format!(
            "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{size: 64Mi, pool: default, source: {{image: {{url: 'file://{path}', checksum: '{checksum}'}}}}}}\n"
        )
    };
    // A wrong checksum: refused, and nothing is created.
    env.apply(&image_volume("bad", &format!("sha256:{}", "0".repeat(64))));
    let v = wait_reason(
        &env,
        ns,
        &["volume", "bad"],
        "Stalled",
        "ImagePullFailed",
        60,
    );
    assert!(
        v["status"]["backing"]["path"]
            .as_str()
            .unwrap_or("")
            .is_empty()
    );
    env.apply(&image_volume("img", &sum));
    let (_, took) = wait_for(Duration::from_secs(90), "volume from the image", || {
        let v = get(&env, ns, &["volume", "img"]);
        match condition(&v, "Ready") {
            Some((s, r, _)) if s == "True" && r == "Available" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    println!(
        "volume from the image Ready after {:.1}s",
        took.as_secs_f64()
    );
    env.apply(&cluster(ns, "vc", &["img"], true));
    let (sock, _) = frontend(&env, ns, "vc");
    assert_eq!(guest_disk(&sock, "vdc").map(|d| d.0), Some(64 * MI));
    // Its first MiB is the image's: the same as the root disk's (an
    // overlay on that image the guest never writes there).
    let first_mib = |dev: &str| {
        sh(
            &sock,
            &format!("dd if=/dev/{dev} bs=65536 count=16 2>/dev/null | sha256sum | cut -c1-64"),
        )
    };
    assert_eq!(first_mib("vdc"), first_mib("vda"));
    env.kubectl_ok(&["-n", ns, "delete", "vc", "vc", "--wait=true"])
        .unwrap();
    delete_volumes(&env, ns, &["img", "bad"]);
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// The targets host-1's tgtd serves (`tgtadm --op show`).
fn host1_targets(env: &Env) -> String {
    let tgt = std::fs::read_to_string(env.dir.join("hosts/host-1/tgt")).unwrap();
    let port = tgt.split_whitespace().next().unwrap();
    let out = std::process::Command::new("tgtadm")
        .args([
            "-C", port, "--lld", "iscsi", "--op", "show", "--mode", "target",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Host-1 takes no new nodes while this lives (restored on drop, also
/// when the test fails).
struct Cordon<'a>(&'a Env, &'static str);

impl<'a> Cordon<'a> {
    fn new(env: &'a Env, host: &'static str) -> Self {
        env.kubectl_ok(&[
            "patch",
            "host",
            host,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"schedulable":false}}"#,
        ])
        .unwrap();
        Cordon(env, host)
    }
}

impl Drop for Cordon<'_> {
    fn drop(&mut self) {
        let _ = self.0.kubectl_ok(&[
            "patch",
            "host",
            self.1,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"schedulable":true}}"#,
        ]);
    }
}

/// `host` is lost: its agent and libvirtd die, its guests keep running (a
/// host cut off, not powered off). Returns the frontend `vc-frontend` of
/// `ns` once it runs anew elsewhere: (its uid, its host).
fn lose_host(env: &Env, ns: &str, host: &str, node_uid: &str) -> (String, String) {
    env.set_site_grace(6);
    env.env_sh(&["stop", &format!("agent-{host}"), "--signal", "KILL"])
        .unwrap();
    env.env_sh(&["stop", &format!("libvirtd-{host}"), "--signal", "KILL"])
        .unwrap();
    let (moved, took) = wait_for(
        Duration::from_secs(180),
        "node running on another host",
        || {
            // Deleted and made anew meanwhile: absent for a moment.
            let out = env.kubectl(&["-n", ns, "get", "vn", "vc-frontend", "-o", "json"]);
            let n: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let h = n["spec"]["host"].as_str().unwrap_or("").to_string();
            let uid = n["metadata"]["uid"].as_str().unwrap_or("").to_string();
            if n["status"]["phase"] == "Running" && !h.is_empty() && h != host && uid != node_uid {
                Ok((uid, h))
            } else {
                Err(format!("{h} {}", n["status"]["phase"]))
            }
        },
    )
    .unwrap();
    println!(
        "frontend running on {} {:.1}s after {host} was lost",
        moved.1,
        took.as_secs_f64()
    );
    moved
}

/// The lost `host` returns (its stale domains are swept), host-1 takes
/// nodes again, and cluster `vc` of `ns` is deleted.
fn host_returns_and_cluster_goes(env: &Env, ns: &str, host: &str, cordon: Cordon<'_>) {
    env.env_sh(&["start-libvirtd", host]).unwrap();
    env.env_sh(&["start-agent", host]).unwrap();
    drop(cordon);
    env.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "vc",
        "vc",
        "--wait=true",
        "--timeout=120s",
    ])
    .unwrap();
}

#[test]
fn an_iscsi_volume_serves_a_guest_on_another_host_grows_online_and_follows_it_after_host_loss() {
    let env = Env::get();
    let ns = "san";
    env.apply(&namespace(ns));
    env.apply(&volume_in(ns, "shared", "64Mi", "san"));
    let (vol, took) = available(&env, ns, "shared", 60);
    println!(
        "iSCSI volume created and exported in {:.1}s",
        took.as_secs_f64()
    );
    let vuid = vol["metadata"]["uid"].as_str().unwrap().to_string();
    let iqn = format!("iqn.2026-12.io.yukumo:san.{vuid}");
    let b = &vol["status"]["backing"];
    assert_eq!(b["iscsi"]["portal"], "10.255.0.1:3260", "{b}");
    assert_eq!(b["iscsi"]["iqn"], iqn.as_str());
    assert!(
        b["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{vuid}.raw")),
        "{b}"
    );
    let targets = host1_targets(&env);
    assert!(targets.contains(&iqn), "{targets}");
    assert!(targets.contains("SCSI SN: yk67108864"), "{targets}");

    // Not on the storage host: QEMU's initiator reaches it over the underlay.
    let cordon = Cordon::new(&env, "host-1");
    env.apply(&cluster(ns, "vc", &["shared"], true));
    let (sock, node_uid) = frontend(&env, ns, "vc");
    let vn = get(&env, ns, &["vn", "vc-frontend"]);
    let host = vn["spec"]["host"].as_str().unwrap().to_string();
    assert_ne!(host, "host-1", "placed away from the storage host");
    assert_eq!(vn["spec"]["disks"][0]["iscsi"]["iqn"], iqn.as_str());
    assert_eq!(
        guest_disk(&sock, "vdc"),
        Some((64 * MI, serial_of(&vuid).to_string()))
    );
    let targets = host1_targets(&env);
    let session = format!("IP Address: 10.255.0.{}", &host["host-".len()..]);
    assert!(
        targets.contains(&session),
        "a session from {host}: {targets}"
    );
    let sum = fill(&sock, 16);

    // Grown while attached: the target re-reads the file, QEMU the capacity.
    grow_online(&env, ns, "shared", &sock, 96);

    // The node's host is lost: its agent and libvirtd die, its guest keeps
    // running (a host cut off, not powered off). The node restarts on the
    // remaining host, with the volume and its data, and the target fences
    // the host it left.
    let old_sock = sock.clone();
    let (new_uid, new_host) = lose_host(&env, ns, &host, &node_uid);
    assert_ne!(new_host, "host-1", "still cordoned");
    let (sock, _) = frontend(&env, ns, "vc");
    assert_eq!(sock, PathBuf::from(format!("/run/yukumo/{new_uid}.sock")));
    assert_eq!(
        guest_disk(&sock, "vdc"),
        Some((96 * MI, serial_of(&vuid).to_string()))
    );
    let again = checksum(&sock, 16);
    assert_eq!(again, sum, "the data followed the node");
    let vol = get(&env, ns, &["volume", "shared"]);
    assert_eq!(vol["status"]["attachedTo"]["node"], "vc-frontend");
    assert_eq!(vol["status"]["attachedTo"]["host"], new_host.as_str());
    // Fenced: the target admits only the new host, and the old host's
    // session is gone; the old guest's writes never reach the volume.
    let addr = |h: &str| format!("10.255.0.{}", &h["host-".len()..]);
    let targets = host1_targets(&env);
    let acl = targets
        .rsplit_once("ACL information:")
        .unwrap()
        .1
        .trim()
        .to_string();
    assert_eq!(acl, addr(&new_host), "{targets}");
    assert!(
        !targets.contains(&format!("IP Address: {}", addr(&host))),
        "no session from {host}: {targets}"
    );
    let wrote = guest_sh(
        &old_sock,
        "dd if=/dev/urandom of=/dev/vdc bs=65536 count=16 oflag=direct 2>&1; sync",
        Duration::from_secs(20),
    );
    let wrote = wrote.map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string());
    println!("the fenced guest's write: {wrote:?}");
    let after = sh(
        &sock,
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdc bs=65536 count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64",
    );
    assert_eq!(after, sum, "the fenced guest changed nothing");

    // The host returns (its stale domain is swept); the cluster and the
    // volume go, and nothing of the volume is left on the target or disk.
    host_returns_and_cluster_goes(&env, ns, &host, cordon);
    env.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "volume",
        "shared",
        "--wait=true",
        "--timeout=120s",
    ])
    .unwrap();
    let targets = host1_targets(&env);
    assert!(!targets.contains(&iqn), "target removed: {targets}");
    let file = env
        .dir
        .join(format!("hosts/host-1/agent/pools/san/{vuid}.raw"));
    assert!(!file.exists(), "{} removed", file.display());
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn a_node_booted_from_an_iscsi_volume_keeps_its_root_file_system_when_restarted_elsewhere() {
    let env = Env::get();
    let ns = "bootvol";
    env.apply(&namespace(ns));
    // Away from the storage host, and after the loss on the third host.
    let cordon = Cordon::new(&env, "host-1");
    let (path, sum) = tiny_image();
    env.apply(&format!(
        "apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: vc, namespace: {ns}}}
spec:
  networkGroup: net
  frontend:
    size: {{cpu: 1, memory: 160Mi}}
    image: {{url: 'file://{path}', checksum: '{sum}'}}
    rootVolume: {{pool: san, size: 64Mi}}
"
    ));
    let (sock, node_uid) = frontend(&env, ns, "vc");
    let vn = get(&env, ns, &["vn", "vc-frontend"]);
    let host = vn["spec"]["host"].as_str().unwrap().to_string();
    assert_ne!(host, "host-1");
    assert_eq!(vn["spec"]["disks"][0]["target"], "vda", "{}", vn["spec"]);
    let vol = get(&env, ns, &["volume", "vc-frontend-root"]);
    let vuid = vol["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(vol["metadata"]["labels"]["yukumo.io/root-of"], "vc");
    assert_eq!(
        vol["metadata"]["ownerReferences"][0]["kind"],
        "VirtualCluster"
    );
    assert_eq!(vol["spec"]["source"]["image"]["checksum"], sum.as_str());
    assert_eq!(vol["status"]["attachedTo"]["target"], "vda");
    assert_eq!(vol["status"]["attachedTo"]["host"], host.as_str());
    // The guest booted from the volume: its boot disk is the volume, at
    // the volume's size, with the volume's uid as serial.
    assert_eq!(
        guest_disk(&sock, "vda"),
        Some((64 * MI, serial_of(&vuid).to_string()))
    );
    let marker = format!("written-on-{host}-{}", &node_uid[..8]);
    sh(
        &sock,
        &format!(
            "mkdir -p /mnt && mount -t vfat /dev/vda /mnt && echo {marker} > /mnt/marker.txt && sync && umount /mnt"
        ),
    );

    // The host is lost; the node boots on the remaining host from the same
    // volume, with the file in its root file system.
    lose_host(&env, ns, &host, &node_uid);
    let (sock, _) = frontend(&env, ns, "vc");
    let read = sh(
        &sock,
        "mkdir -p /mnt && mount -t vfat /dev/vda /mnt && cat /mnt/marker.txt && umount /mnt",
    );
    assert_eq!(read, marker, "the root file system came along");

    // The host returns; the cluster goes and its boot volume with it
    // (owned by the cluster), leaving nothing on the target.
    host_returns_and_cluster_goes(&env, ns, &host, cordon);
    wait_for(Duration::from_secs(120), "boot volume gone", || {
        let out = env.kubectl(&["-n", ns, "get", "volume", "vc-frontend-root"]);
        if out.status.success() {
            Err("still there".to_string())
        } else {
            Ok(())
        }
    })
    .unwrap();
    let targets = host1_targets(&env);
    assert!(!targets.contains(&vuid), "target removed: {targets}");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// The images of the environment's Ceph pool `yukumo`, as Ceph's admin
/// lists them (`rbd ls -l`, snapshots included).
fn ceph_images(env: &Env) -> String {
    let ns =
        std::fs::read_to_string(env.dir.join("ceph/netns")).expect("the environment runs Ceph");
    let conf = env.dir.join("ceph/ceph.conf");
    let out = std::process::Command::new("timeout")
        .args(["60", "ip", "netns", "exec", ns.trim(), "rbd", "-c"])
        .arg(&conf)
        .args(["ls", "-l", "-p", "yukumo"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The environment declares the `ceph` pool on the Site `local`, but a
/// test that re-applies examples/local-site.yaml replaces the Site's
/// pools: declare it again if it is gone.
fn ensure_ceph_pool(env: &Env) {
    let site = env.get_json(&["get", "site", "local"]);
    let pools = site["spec"]["storagePools"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !pools.iter().any(|p| p["name"] == "ceph") {
        let ip =
            std::fs::read_to_string(env.dir.join("ceph/ip")).expect("the environment runs Ceph");
        let patch = format!(
            r#"[{{"op":"add","path":"/spec/storagePools/-","value":{{"name":"ceph","type":"rbd","host":"host-1","ceph":{{"monitors":["{}:6789"],"pool":"yukumo","user":"yukumo"}}}}}}]"#,
            ip.trim()
        );
        env.kubectl_ok(&["patch", "site", "local", "--type", "json", "-p", &patch])
            .unwrap();
    }
}

#[test]
fn an_rbd_volume_attached_read_only_serves_several_guests_at_once_and_keeps_writers_out() {
    ensure_ceph_pool(&Env::get());
    readers_share_and_exclude_a_writer("ceph");
}

#[test]
fn an_rbd_volume_in_a_real_ceph_serves_a_guest_on_any_host_grows_online_snapshots_live_and_restores()
 {
    let env = Env::get();
    let ns = "rbd";
    ensure_ceph_pool(&env);
    env.apply(&namespace(ns));
    env.apply(&volume_in(ns, "data", "64Mi", "ceph"));
    let (vol, took) = available(&env, ns, "data", 90);
    println!("RBD volume created in {:.1}s", took.as_secs_f64());
    let vuid = vol["metadata"]["uid"].as_str().unwrap().to_string();
    let image = format!("{vuid}.raw");
    let b = &vol["status"]["backing"];
    assert_eq!(b["rbd"]["pool"], "yukumo", "{b}");
    assert_eq!(b["rbd"]["image"], image.as_str(), "{b}");
    assert_eq!(b["rbd"]["user"], "yukumo", "{b}");
    assert_eq!(b["rbd"]["monitors"][0], "10.255.0.250:6789", "{b}");
    assert_eq!(b["capacityBytes"], 64 * MI);
    let images = ceph_images(&env);
    assert!(
        images.contains(&image) && images.contains("64 MiB"),
        "{images}"
    );
    // Ceph's capacity and free space in the Site's status.
    let (pool, _) = wait_for(
        Duration::from_secs(60),
        "ceph pool in the Site's status",
        || {
            let site = env.get_json(&["get", "site", "local"]);
            let pools = site["status"]["storagePools"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            match pools.into_iter().find(|p| p["name"] == "ceph") {
                Some(p)
                    if p["capacityBytes"].as_u64().unwrap_or(0) > 0
                        && p["volumes"].as_u64().unwrap_or(0) >= 1 =>
                {
                    Ok(p)
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .unwrap();
    println!("ceph pool: {pool}");
    assert!(pool["availableBytes"].as_u64().unwrap() > 0, "{pool}");
    assert!(pool["error"].is_null(), "{pool}");

    // Not on the pool's host: QEMU's librbd reaches Ceph over the underlay
    // with the key of its host's libvirt secret.
    let cordon = Cordon::new(&env, "host-1");
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (sock, _) = frontend(&env, ns, "vc");
    let vn = get(&env, ns, &["vn", "vc-frontend"]);
    let host = vn["spec"]["host"].as_str().unwrap().to_string();
    assert_ne!(host, "host-1", "placed away from the pool's host");
    assert_eq!(vn["spec"]["disks"][0]["rbd"]["image"], image.as_str());
    assert_eq!(
        guest_disk(&sock, "vdc"),
        Some((64 * MI, serial_of(&vuid).to_string()))
    );
    let original = fill(&sock, 16);

    // Grown while attached.
    grow_online(&env, ns, "data", &sock, 96);
    assert!(ceph_images(&env).contains("96 MiB"));

    // A snapshot of the live volume (a point-in-time copy: RBD snapshots
    // while QEMU writes), then more data.
    let patch = |body: &str| {
        env.kubectl_ok(&[
            "-n", ns, "patch", "volume", "data", "--type", "merge", "-p", body,
        ])
        .unwrap();
    };
    patch(r#"{"spec":{"snapshots":[{"name":"s1"}]}}"#);
    let (v, took) = wait_for(
        Duration::from_secs(60),
        "snapshot of the attached volume",
        || {
            let v = get(&env, ns, &["volume", "data"]);
            match v["status"]["snapshots"][0]["name"].as_str() {
                Some("s1") => Ok(v),
                _ => Err(v["status"].to_string()),
            }
        },
    )
    .unwrap();
    println!("live snapshot taken in {:.1}s", took.as_secs_f64());
    assert_eq!(v["status"]["snapshots"][0]["size"], (96 * MI).to_string());
    assert!(ceph_images(&env).contains(&format!("{vuid}+s1.raw")));
    let more = fill(&sock, 16);
    assert_ne!(more, original);

    // Detached (hot-unplugged), restored in place, attached again: the
    // snapshot's data.
    env.apply(&cluster(ns, "vc", &[], true));
    wait_reason(&env, ns, &["volume", "data"], "Ready", "Available", 60);
    patch(r#"{"spec":{"restoreFrom":"s1"}}"#);
    wait_for(Duration::from_secs(60), "restored", || {
        let v = get(&env, ns, &["volume", "data"]);
        match (v["status"]["restoredFrom"].as_str(), condition(&v, "Ready")) {
            (Some("s1"), Some((s, r, _))) if s == "True" && r == "Available" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    env.apply(&cluster(ns, "vc", &["data"], true));
    wait_for(Duration::from_secs(60), "re-attached", || {
        guest_disk(&sock, "vdc")
            .map(|_| ())
            .ok_or_else(|| "no vdc".to_string())
    })
    .unwrap();
    assert_eq!(checksum(&sock, 16), original, "the snapshot's data");

    // A volume from the (verified) image, copied into Ceph, hot-plugged:
    // its first MiB is the image's, as on the root disk.
    let (path, sum) = tiny_image();
    env.apply(&format!(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: img, namespace: {ns}}}\nspec: {{size: 64Mi, pool: ceph, source: {{image: {{url: 'file://{path}', checksum: '{sum}'}}}}}}\n"
    ));
    let img = wait_reason(&env, ns, &["volume", "img"], "Ready", "Available", 120);
    let img_uid = img["metadata"]["uid"].as_str().unwrap().to_string();
    env.apply(&cluster(ns, "vc", &["data", "img"], true));
    let first_mib = |dev: &str| {
        sh(
            &sock,
            &format!("dd if=/dev/{dev} bs=65536 count=16 2>/dev/null | sha256sum | cut -c1-64"),
        )
    };
    wait_for(
        Duration::from_secs(60),
        "image volume plugged",
        || match guest_disk(&sock, "vdd") {
            Some((b, _)) if b == 64 * MI => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap();
    assert_eq!(first_mib("vdd"), first_mib("vda"));

    // The cluster and the volumes go; nothing of them is left in Ceph.
    drop(cordon);
    env.kubectl_ok(&[
        "-n",
        ns,
        "delete",
        "vc",
        "vc",
        "--wait=true",
        "--timeout=120s",
    ])
    .unwrap();
    for v in ["data", "img"] {
        env.kubectl_ok(&[
            "-n",
            ns,
            "delete",
            "volume",
            v,
            "--wait=true",
            "--timeout=120s",
        ])
        .unwrap();
    }
    let images = ceph_images(&env);
    assert!(
        !images.contains(&vuid) && !images.contains(&img_uid),
        "{images}"
    );
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn a_volume_attached_read_only_serves_several_guests_at_once_and_keeps_writers_out() {
    readers_share_and_exclude_a_writer("san");
}

#[test]
fn a_dir_volume_attached_read_only_serves_several_guests_on_its_host() {
    readers_share_and_exclude_a_writer("default");
}

/// Read-only multi-attach in `pool`: a writer fills the volume and lets
/// go, two clusters read it at once (and cannot write it), a writer waits
/// for them and attaches, with the data, once they are gone.
fn readers_share_and_exclude_a_writer(pool: &str) {
    let env = Env::get();
    let ns = &format!("readers-{pool}");
    env.apply(&namespace(ns));
    env.apply(&volume_in(ns, "ref", "64Mi", pool));
    available(&env, ns, "ref", 60);
    let with_ro = |name: &str| {
        cluster(ns, name, &["ref"], true).replace("{name: ref}", "{name: ref, readOnly: true}")
    };
    let set_volumes = |vc: &str, vols: &str| {
        let patch = format!(r#"{{"spec":{{"frontend":{{"volumes":{vols}}}}}}}"#);
        env.kubectl_ok(&["-n", ns, "patch", "vc", vc, "--type", "merge", "-p", &patch])
            .unwrap();
    };
    // A writer fills it, then lets go of it (hot-unplug).
    env.apply(&cluster(ns, "rw", &["ref"], true));
    let (sw, _) = frontend(&env, ns, "rw");
    let sum = fill(&sw, 16);
    set_volumes("rw", "[]");
    wait_for(Duration::from_secs(90), "writer released", || {
        let v = get(&env, ns, &["volume", "ref"]);
        if v["status"]["attachedTo"].is_null() {
            Ok(())
        } else {
            Err(v["status"]["attachedTo"].to_string())
        }
    })
    .unwrap();

    // Two clusters hold it read-only at once; each guest reads the data
    // and cannot write it.
    env.apply(&with_ro("ro-a"));
    env.apply(&with_ro("ro-b"));
    for vc in ["ro-a", "ro-b"] {
        let (s, _) = frontend(&env, ns, vc);
        assert_eq!(
            wait_for(Duration::from_secs(60), "the disk", || guest_disk(
                &s, "vdc"
            )
            .ok_or_else(|| "no vdc yet".to_string()))
            .unwrap()
            .0
            .0,
            64 * MI
        );
        assert_eq!(checksum(&s, 16), sum, "{vc} reads what the writer wrote");
        assert_eq!(sh(&s, "cat /sys/block/vdc/ro"), "1", "{vc}: read-only");
        let (out, code) = guest_sh(
            &s,
            "dd if=/dev/zero of=/dev/vdc bs=4096 count=1 conv=fsync 2>&1",
            Duration::from_secs(30),
        )
        .unwrap();
        assert_ne!(code, 0, "{vc} wrote a read-only volume: {out}");
    }
    let v = get(&env, ns, &["volume", "ref"]);
    let readers: Vec<&str> = v["status"]["readers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(readers.len(), 2, "{readers:?}");
    assert!(readers.contains(&"ro-a-frontend") && readers.contains(&"ro-b-frontend"));
    assert!(v["status"]["attachedTo"].is_null());
    let (_, reason, msg) = condition(&v, "Ready").unwrap();
    assert_eq!(reason, "Attached");
    assert!(msg.contains("attached to read-only node"), "{msg}");
    // The target admits every reader's host; a dir volume's readers all
    // run on its host.
    let hosts: Vec<String> = v["status"]["readers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap().to_string())
        .collect();
    // (rbd: any host, through librbd with the pool's Ceph user.)
    let targets = match pool {
        "san" => host1_targets(&env),
        "default" => {
            assert!(hosts.iter().all(|h| h == "host-1"), "{hosts:?}");
            String::new()
        }
        _ => String::new(),
    };
    for h in hosts.iter().filter(|_| pool == "san") {
        assert!(
            targets.contains(&format!("10.255.0.{}", &h["host-".len()..])),
            "ACL admits {h}: {targets}"
        );
    }

    // A writer waits for the readers, naming them, and gets no disk.
    set_volumes("rw", r#"[{"name":"ref"}]"#);
    let vc = wait_reason(&env, ns, &["vc", "rw"], "Ready", "VolumeInUse", 30);
    let (_, _, msg) = condition(&vc, "Ready").unwrap();
    assert!(
        msg.contains("is held read-only by node ro-a-frontend of cluster ro-a"),
        "{msg}"
    );
    assert_eq!(guest_disk(&sw, "vdc"), None, "no disk for the writer");
    // The readers let go: the writer attaches, with the data.
    for vc in ["ro-a", "ro-b"] {
        env.kubectl_ok(&["-n", ns, "delete", "vc", vc, "--wait=false"])
            .unwrap();
    }
    let (_, took) = wait_for(Duration::from_secs(120), "writer attached", || {
        guest_disk(&sw, "vdc").ok_or_else(|| "no vdc yet".to_string())
    })
    .unwrap();
    println!(
        "writer attached {:.1}s after the readers were deleted",
        took.as_secs_f64()
    );
    assert_eq!(checksum(&sw, 16), sum);
    let v = get(&env, ns, &["volume", "ref"]);
    assert_eq!(v["status"]["attachedTo"]["node"], "rw-frontend");
    assert!(
        v["status"]["readers"]
            .as_array()
            .is_none_or(|r| r.is_empty()),
        "{}",
        v["status"]
    );
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=180s"])
        .unwrap();
}

/// A storage host with an LVM volume group (e2e/lib/vm-host.sh with a
/// disk: a VM with the Debian kernel, which has device-mapper, running its
/// own agent and tgtd) in the Site `local`, cordoned before it registers so
/// that no VM is placed on it; on drop (also when the test fails) its pool
/// is taken out of the Site, the VM stopped and its Host deleted.
struct StorageVm<'a> {
    env: &'a Env,
    name: &'static str,
    shell: PathBuf,
}

impl<'a> StorageVm<'a> {
    fn start(env: &'a Env, name: &'static str, index: u32, mib: u32) -> StorageVm<'a> {
        env.apply(&format!(
            "apiVersion: yukumo.io/v1alpha1\nkind: Host\nmetadata: {{name: {name}}}\nspec: {{site: local, schedulable: false}}\n"
        ));
        // Stopped by the guard also when the start fails half way.
        let mut vm = StorageVm {
            env,
            name,
            shell: PathBuf::new(),
        };
        env.env_sh(&[
            "start-vm-host",
            name,
            "local",
            &index.to_string(),
            &mib.to_string(),
        ])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let shell = std::fs::read_to_string(env.dir.join(format!("hosts/{name}/shell")))
            .unwrap_or_else(|e| panic!("{name} has no shell socket: {e}"));
        vm.shell = PathBuf::from(shell.trim());
        vm
    }

    /// A shell command in the VM (LVM's configuration in its environment).
    fn ok(&self, cmd: &str) -> String {
        let full = format!("export LVM_SYSTEM_DIR=/run/lvm-etc LVM_SUPPRESS_FD_WARNINGS=1; {cmd}");
        let (out, rc) = guest_sh(&self.shell, &full, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        assert_eq!(rc, 0, "{}: `{cmd}` failed: {out}", self.name);
        out
    }

    /// The volume group's logical volumes: "name size tags" lines.
    fn lvs(&self) -> String {
        self.ok("lvm lvs --noheadings --units b --nosuffix -o lv_name,lv_size,lv_tags yukumo")
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for StorageVm<'_> {
    fn drop(&mut self) {
        let site = self.env.get_json(&["get", "site", "local"]);
        let pools: Vec<Value> = site["spec"]["storagePools"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["host"] != self.name)
            .collect();
        let patch =
            serde_json::json!([{"op": "replace", "path": "/spec/storagePools", "value": pools}]);
        let _ = self.env.kubectl(&[
            "patch",
            "site",
            "local",
            "--type",
            "json",
            "-p",
            &patch.to_string(),
        ]);
        if let Err(e) = self.env.env_sh(&["stop-vm-host", self.name]) {
            eprintln!("stopping {}: {e}", self.name);
        }
        let _ = self.env.kubectl(&[
            "delete",
            "host",
            self.name,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

/// The sha256 of `mib` MiB of zeros.
fn zeros_sum(mib: usize) -> String {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("head -c {} /dev/zero | sha256sum | cut -c1-64", mib << 20),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn an_lvm_backed_iscsi_pool_zeroes_what_it_hands_out_grows_snapshots_copies_and_frees() {
    let env = Env::get();
    let ns = "lvm";
    let vm = StorageVm::start(&env, "store-1", 20, 512);
    let (_, took) = wait_for(Duration::from_secs(180), "store-1 Ready", || {
        let h = env.get_json(&["get", "host", "store-1"]);
        match condition(&h, "Ready") {
            Some((s, _, _)) if s == "True" => Ok(h),
            c => Err(format!("{c:?}")),
        }
    })
    .unwrap();
    println!("storage VM host Ready after {:.1}s", took.as_secs_f64());
    assert_eq!(
        env.get_json(&["get", "host", "store-1"])["spec"]["schedulable"],
        false,
        "the operator's cordon survives the agent's registration"
    );
    // The operator's own logical volume (not yukumo's: never touched, its
    // room not the pool's), then 128 MiB of another tenant's bytes on the
    // extents after it, freed: the pool's first volume and its growth get
    // exactly those extents.
    vm.ok("lvm lvcreate -q -y -L 32m -n other yukumo");
    vm.ok(
        "lvm lvcreate -q -y --zero n -L 128m -n junk yukumo && tr '\\000' '\\253' </dev/zero | dd of=/dev/yukumo/junk bs=1M count=128 2>/dev/null; sync; lvm lvremove -q -y yukumo/junk",
    );
    // Refused by the API server, naming the field.
    for (bad, says) in [
        (
            r#"{"name":"bad","type":"dir","host":"store-1","lvm":{"volumeGroup":"yukumo"}}"#,
            "only allowed with type iscsi",
        ),
        (
            r#"{"name":"bad","type":"iscsi","host":"store-1","path":"/x","lvm":{"volumeGroup":"yukumo"}}"#,
            "logical volumes of its volume group",
        ),
    ] {
        let patch = format!(r#"[{{"op":"add","path":"/spec/storagePools/-","value":{bad}}}]"#);
        let out = env.kubectl(&[
            "patch",
            "site",
            "local",
            "--type",
            "json",
            "-p",
            &patch,
            "--dry-run=server",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{bad}: {err}");
    }
    env.kubectl_ok(&[
        "patch",
        "site",
        "local",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/spec/storagePools/-","value":{"name":"lvm","type":"iscsi","host":"store-1","lvm":{"volumeGroup":"yukumo"}}}]"#,
    ])
    .unwrap();
    let (pool, took) = wait_for(Duration::from_secs(60), "the lvm pool's capacity", || {
        let s = env.get_json(&["get", "site", "local"]);
        let p = s["status"]["storagePools"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == "lvm"))
            .cloned();
        match p {
            Some(p) if p["capacityBytes"].as_u64().unwrap_or(0) > 0 => Ok(p),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    println!(
        "lvm pool in the Site's status after {:.1}s: {pool}",
        took.as_secs_f64()
    );
    let cap = pool["capacityBytes"].as_u64().unwrap();
    // 512 MiB less LVM's metadata, less the operator's 32 MiB.
    assert!(cap > 440 * MI && cap <= 480 * MI, "{pool}");
    assert_eq!(pool["availableBytes"].as_u64().unwrap(), cap, "{pool}");

    env.apply(&namespace(ns));
    env.apply(&volume_in(ns, "data", "64Mi", "lvm"));
    // Not a whole number of 1 MiB extents: refused, naming both.
    env.apply(&volume_in(ns, "odd", "3584Ki", "lvm"));
    let (vol, took) = available(&env, ns, "data", 90);
    println!(
        "LVM volume created, zeroed and exported in {:.1}s",
        took.as_secs_f64()
    );
    let vuid = vol["metadata"]["uid"].as_str().unwrap().to_string();
    let b = &vol["status"]["backing"];
    assert_eq!(b["path"], format!("/dev/yukumo/{vuid}.raw").as_str(), "{b}");
    assert_eq!(b["iscsi"]["portal"], "10.255.0.20:3260", "{b}");
    let (_, took) = wait_for(Duration::from_secs(60), "odd refused", || {
        let v = get(&env, ns, &["volume", "odd"]);
        let c = condition(&v, "Ready");
        match &c {
            Some((s, _, m)) if s == "False" && m.contains("not a multiple of the extent size") => {
                Ok(())
            }
            _ => Err(format!("{c:?}")),
        }
    })
    .unwrap();
    println!("odd size refused after {:.1}s", took.as_secs_f64());
    let lvs = vm.lvs();
    assert!(
        lvs.contains(&format!("{vuid}.raw 67108864 yukumo")),
        "{lvs}"
    );
    assert!(lvs.lines().any(|l| l == "other 33554432"), "{lvs}");

    // A guest on a simulated host (store-1 is cordoned) reads zeros where
    // another tenant's bytes were, writes, and sees an online grow whose
    // new extents (more of those bytes) read as zeros too.
    env.apply(&cluster(ns, "vc", &["data"], true));
    let (sock, _) = frontend(&env, ns, "vc");
    assert_eq!(
        guest_disk(&sock, "vdc"),
        Some((64 * MI, serial_of(&vuid).to_string()))
    );
    assert_eq!(
        sh(
            &sock,
            "dd if=/dev/vdc bs=1048576 count=64 2>/dev/null | sha256sum | cut -c1-64"
        ),
        zeros_sum(64),
        "a new volume reads as zeros"
    );
    let sum = fill(&sock, 16);
    grow_online(&env, ns, "data", &sock, 96);
    assert_eq!(
        sh(
            &sock,
            "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdc bs=1048576 skip=64 count=32 iflag=direct 2>/dev/null | sha256sum | cut -c1-64"
        ),
        zeros_sum(32),
        "the grown part reads as zeros"
    );
    assert_eq!(checksum(&sock, 16), sum);

    // Detached, a snapshot is taken; a new volume is made from it, and one
    // from the tiny guest's image.
    env.apply(&cluster(ns, "vc", &[], true));
    env.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "volume",
        "data",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"snapshots":[{"name":"s1"}]}}"#,
    ])
    .unwrap();
    let (_, took) = wait_for(Duration::from_secs(90), "snapshot taken", || {
        let v = get(&env, ns, &["volume", "data"]);
        match v["status"]["snapshots"][0]["name"].as_str() {
            Some("s1") => Ok(()),
            _ => Err(format!("{}", v["status"])),
        }
    })
    .unwrap();
    println!("LVM snapshot taken in {:.1}s", took.as_secs_f64());
    let (path, isum) = tiny_image();
    env.apply(&format!(
        "apiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: copy, namespace: {ns}}}\nspec: {{size: 128Mi, pool: lvm, source: {{snapshot: {{volume: data, name: s1}}}}}}\n---\napiVersion: yukumo.io/v1alpha1\nkind: Volume\nmetadata: {{name: img, namespace: {ns}}}\nspec: {{size: 64Mi, pool: lvm, source: {{image: {{url: 'file://{path}', checksum: '{isum}'}}}}}}\n"
    ));
    let (copy, took) = available(&env, ns, "copy", 120);
    println!(
        "LVM volume copied from the snapshot in {:.1}s",
        took.as_secs_f64()
    );
    let (img, took) = available(&env, ns, "img", 120);
    println!("LVM volume from the image in {:.1}s", took.as_secs_f64());
    let lvs = vm.lvs();
    assert!(
        lvs.contains(&format!("{vuid}+s1.raw 100663296 yukumo")),
        "{lvs}"
    );
    assert!(
        !lvs.contains("yk-copy-") && !lvs.contains("yk-zero") && !lvs.contains("yk-copying"),
        "{lvs}"
    );

    // All three attached: the data, the snapshot's copy (grown to its
    // size, zeros after), and the image's bytes.
    env.apply(&cluster(ns, "vc", &["data", "copy", "img"], true));
    let serial = |v: &Value| serial_of(v["metadata"]["uid"].as_str().unwrap()).to_string();
    let want = [serial(&vol), serial(&copy), serial(&img)];
    let (devs, _) = wait_for(Duration::from_secs(90), "three volumes attached", || {
        let seen: Vec<(String, u64, String)> = ["vdc", "vdd", "vde"]
            .iter()
            .filter_map(|d| guest_disk(&sock, d).map(|(b, s)| (d.to_string(), b, s)))
            .collect();
        let dev = |s: &str| seen.iter().find(|d| d.2 == s).cloned();
        match (dev(&want[0]), dev(&want[1]), dev(&want[2])) {
            (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
            _ => Err(format!("{seen:?}")),
        }
    })
    .unwrap();
    assert_eq!(
        (devs[0].1, devs[1].1, devs[2].1),
        (96 * MI, 128 * MI, 64 * MI)
    );
    let first = |dev: &str, blocks: u32| {
        sh(
            &sock,
            &format!(
                "dd if=/dev/{dev} bs=65536 count={blocks} 2>/dev/null | sha256sum | cut -c1-64"
            ),
        )
    };
    assert_eq!(first(&devs[0].0, 16), sum, "the data");
    assert_eq!(first(&devs[1].0, 16), sum, "the copy from the snapshot");
    assert_eq!(
        sh(
            &sock,
            &format!(
                "dd if=/dev/{} bs=1048576 skip=96 count=32 2>/dev/null | sha256sum | cut -c1-64",
                devs[1].0
            )
        ),
        zeros_sum(32),
        "the copy's growth reads as zeros"
    );
    assert_eq!(first(&devs[2].0, 16), first("vda", 16), "the image");

    // Everything goes: the logical volumes are removed (the operator's
    // stays), the targets too, and the pool's room is whole again.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "vc", "--wait=true"])
        .unwrap();
    delete_volumes(&env, ns, &["data", "copy", "img", "odd"]);
    let lvs = vm.lvs();
    assert_eq!(
        lvs, "other 33554432",
        "only the operator's logical volume is left"
    );
    let targets = vm.ok("tgtadm --lld iscsi --mode target --op show");
    assert!(!targets.contains("iqn."), "{targets}");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
    drop(vm);
}
