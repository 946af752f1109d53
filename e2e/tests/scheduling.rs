//! Scheduling end-to-end tests: VirtualClusters become VirtualNodes placed
//! on the simulated hosts, with owner references, spread, scale up/down,
//! start order, capacity errors and garbage collection.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use yukumo_e2e::{Env, wait_for};

fn json(env: &Env, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&env.kubectl_ok(&a).expect("kubectl get")).expect("json")
}

fn ready_reason(env: &Env, ns: &str, vc: &str) -> (String, String) {
    let v = json(env, &["-n", ns, "get", "vc", vc]);
    v["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .map(|c| {
            (
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .unwrap_or_default()
}

fn nodes(env: &Env, ns: &str, vc: &str) -> Vec<Value> {
    let list = json(
        env,
        &[
            "-n",
            ns,
            "get",
            "vn",
            "-l",
            &format!("yukumo.io/cluster={vc}"),
        ],
    );
    list["items"].as_array().cloned().unwrap_or_default()
}

fn setup(env: &Env, ns: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\napiVersion: yukumo.io/v1alpha1\nkind: NetworkGroup\nmetadata: {{name: net, namespace: {ns}}}\nspec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan}}, homeSite: local}}\n"
    );
    let out = env.kubectl_stdin(&["apply", "-f", "-"], &text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cluster(ns: &str, name: &str, workers: u32, worker_mem: &str) -> String {
    format!(
        "apiVersion: yukumo.io/v1alpha1
kind: VirtualCluster
metadata: {{name: {name}, namespace: {ns}}}
spec:
  networkGroup: net
  startOrder: Parallel
  frontend:
    size: {{cpu: 1, memory: 128Mi}}
    image: {{url: 'file:///img.qcow2', checksum: 'sha256:eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee'}}
  pools:
  - {{name: worker, replicas: {workers}, size: {{cpu: 1, memory: {worker_mem}}}}}
"
    )
}

fn wait_count(env: &Env, ns: &str, vc: &str, n: usize) -> Vec<Value> {
    wait_count_for(env, ns, vc, n, Duration::from_secs(30))
}

fn wait_count_for(env: &Env, ns: &str, vc: &str, n: usize, limit: Duration) -> Vec<Value> {
    let (v, took) = wait_for(limit, &format!("{n} nodes of {vc}"), || {
        let ns_nodes: Vec<Value> = nodes(env, ns, vc)
            .into_iter()
            .filter(|n| n["metadata"]["deletionTimestamp"].is_null())
            .collect();
        if ns_nodes.len() == n {
            Ok(ns_nodes)
        } else {
            Err(format!("{} nodes", ns_nodes.len()))
        }
    })
    .unwrap();
    println!("{vc}: {n} nodes after {took:?}");
    v
}

#[test]
fn nodes_are_placed_spread_owned_and_scaled() {
    let env = Env::get();
    let ns = "sched";
    setup(&env, ns);
    env.apply(&cluster(ns, "spread", 3, "128Mi"));
    let ns_nodes = wait_count(&env, ns, "spread", 4);
    let vc = json(&env, &["-n", ns, "get", "vc", "spread"]);
    let uid = vc["metadata"]["uid"].as_str().unwrap().to_string();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for n in &ns_nodes {
        let name = n["metadata"]["name"].as_str().unwrap();
        let host = n["spec"]["host"].as_str().expect("placed");
        assert_eq!(
            n["metadata"]["labels"]["yukumo.io/host"], host,
            "{name}: label matches spec.host"
        );
        assert_eq!(
            n["metadata"]["ownerReferences"][0]["uid"],
            uid.as_str(),
            "{name}: owned by its cluster"
        );
        assert_eq!(n["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(n["spec"]["resources"]["memoryMiB"], 128);
        *per_host.entry(host.to_string()).or_default() += 1;
        // Parallel: every node may run at once (FrontendFirst is covered
        // with real guests in guests.rs).
        assert_eq!(n["spec"]["running"], true, "{name}");
    }
    // 4 nodes over the hosts: as even as it gets.
    let hosts = env.hosts().len();
    assert_eq!(
        per_host.len(),
        hosts.min(4),
        "spread over the hosts: {per_host:?}"
    );
    let (lo, hi) = (
        per_host.values().min().unwrap(),
        per_host.values().max().unwrap(),
    );
    assert!(hi - lo <= 1, "{per_host:?}");
    let names: Vec<String> = ns_nodes
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for want in [
        "spread-frontend",
        "spread-worker-0",
        "spread-worker-1",
        "spread-worker-2",
    ] {
        assert!(names.contains(&want.to_string()), "{names:?}");
    }
    // Placed: its nodes start (or fail: its image is a placeholder).
    let r = ready_reason(&env, ns, "spread").0;
    assert!(r == "NodesStarting" || r == "ImagePullFailed", "{r}");

    // Placement is persisted: a controller restart changes nothing.
    let before: BTreeMap<String, String> = ns_nodes
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap().to_string(),
                // Generation and spec: what the controller writes (agents
                // write status, which bumps only resourceVersion).
                format!("{} {}", n["metadata"]["generation"], n["spec"]),
            )
        })
        .collect();
    let pid = env.pid("controller-1").expect("controller-1");
    yukumo_e2e::signal(pid, "KILL");
    env.env_sh(&["start-controller", "1"]).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let after: BTreeMap<String, String> = nodes(&env, ns, "spread")
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap().to_string(),
                // Generation and spec: what the controller writes (agents
                // write status, which bumps only resourceVersion).
                format!("{} {}", n["metadata"]["generation"], n["spec"]),
            )
        })
        .collect();
    assert_eq!(
        before, after,
        "a restarted controller must not rewrite placed nodes"
    );

    // Scale 3 -> 5 -> 2 workers: the highest indexes go first.
    env.apply(&cluster(ns, "spread", 5, "128Mi"));
    wait_count(&env, ns, "spread", 6);
    env.apply(&cluster(ns, "spread", 2, "128Mi"));
    let left = wait_count(&env, ns, "spread", 3);
    let mut names: Vec<String> = left
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["spread-frontend", "spread-worker-0", "spread-worker-1"]
    );

    // Deleting the cluster garbage-collects its nodes (owner references).
    env.kubectl_ok(&["-n", ns, "delete", "vc", "spread"])
        .unwrap();
    wait_count(&env, ns, "spread", 0);

    // Recreated under the same name: fresh nodes owned by the new object.
    env.apply(&cluster(ns, "spread", 1, "128Mi"));
    let fresh = wait_count(&env, ns, "spread", 2);
    let new_uid = json(&env, &["-n", ns, "get", "vc", "spread"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_uid, uid);
    assert!(
        fresh
            .iter()
            .all(|n| n["metadata"]["ownerReferences"][0]["uid"] == new_uid.as_str())
    );
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn a_cluster_that_does_not_fit_says_which_resource_and_where() {
    let env = Env::get();
    let ns = "toobig";
    setup(&env, ns);
    env.apply(&cluster(ns, "huge", 1, "512Gi"));
    let ((reason, msg), took) = wait_for(Duration::from_secs(30), "Unschedulable", || {
        let r = ready_reason(&env, ns, "huge");
        if r.0 == "Unschedulable" {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .unwrap();
    println!("{reason} after {took:?}: {msg}");
    assert!(
        msg.contains("huge-worker-0 needs 1 cpu and 524288 MiB at site local"),
        "{msg}"
    );
    assert!(msg.contains("insufficient free cpu or memory"), "{msg}");
    // The frontend that fits is placed; the worker is not.
    let ns_nodes = wait_count(&env, ns, "huge", 1);
    assert_eq!(ns_nodes[0]["metadata"]["name"], "huge-frontend");
    let events = env
        .kubectl_ok(&["-n", ns, "get", "events", "-o", "json"])
        .unwrap();
    assert!(events.contains("Unschedulable"), "an Event says so");
    // Capacity appears (the spec shrinks): it is placed without further action.
    env.apply(&cluster(ns, "huge", 1, "128Mi"));
    wait_count(&env, ns, "huge", 2);
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_reservation_starts_and_ends_on_time() {
    let env = Env::get();
    let ns = "reserved";
    setup(&env, ns);
    // Whole seconds, as the API stores them.
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = std::time::UNIX_EPOCH + Duration::from_secs(now_secs + 30);
    let end = start + Duration::from_secs(30);
    let text = format!(
        "{}  reservation: {{start: '{}', end: '{}', endAction: Delete}}\n",
        cluster(ns, "window", 1, "128Mi"),
        rfc3339(start),
        rfc3339(end)
    );
    env.apply(&text);
    let (reason, _) = wait_for(Duration::from_secs(20), "ReservationPending", || {
        let r = ready_reason(&env, ns, "window");
        if r.0 == "ReservationPending" {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .unwrap();
    println!("before start: {reason:?}");
    let vc = json(&env, &["-n", ns, "get", "vc", "window"]);
    assert_eq!(vc["status"]["nextTransition"]["action"], "Start");
    assert!(
        nodes(&env, ns, "window").is_empty(),
        "no nodes before the reservation starts"
    );
    // Nodes appear at the start, not before (whole seconds: the API's
    // timestamps); the wait runs past the start so that a late start is
    // measured and reported below rather than cut off by the wait.
    let until_start = start
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    wait_count_for(&env, ns, "window", 2, until_start + Duration::from_secs(30));
    let late = std::time::SystemTime::now()
        .duration_since(start)
        .map(|d| d.as_secs_f64())
        .unwrap_or_else(|e| -e.duration().as_secs_f64());
    println!("nodes created {late:.1}s after the reservation start");
    assert!(
        late > -1.0 && late < 5.0,
        "created {late:.1}s from the start"
    );
    let vc = json(&env, &["-n", ns, "get", "vc", "window"]);
    assert_eq!(vc["status"]["nextTransition"]["action"], "Delete");
    // And go at the end.
    wait_for(Duration::from_secs(60), "nodes deleted at the end", || {
        let n = nodes(&env, ns, "window")
            .into_iter()
            .filter(|n| n["metadata"]["deletionTimestamp"].is_null())
            .count();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} nodes"))
        }
    })
    .unwrap();
    let late = std::time::SystemTime::now()
        .duration_since(end)
        .map(|d| d.as_secs_f64())
        .unwrap_or(-1.0);
    println!("nodes deleted {late:.1}s after the reservation end");
    assert!(late > -1.0 && late < 5.0, "deleted {late:.1}s from the end");
    assert_eq!(ready_reason(&env, ns, "window").0, "ReservationEnded");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// The schedulable hosts of site `local`: how many, and the smallest one's
/// allocatable memory (MiB).
fn local_hosts(env: &Env) -> (u32, u64) {
    let hosts = json(env, &["get", "hosts"]);
    let mibs: Vec<u64> = hosts["items"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter(|h| {
            h["spec"]["site"] == "local"
                && h["spec"]["schedulable"] != false
                && yukumo_e2e::condition(h, "Ready").is_some_and(|c| c.0 == "True")
        })
        .filter_map(|h| h["status"]["allocatable"]["memoryMiB"].as_u64())
        .collect();
    (
        mibs.len() as u32,
        mibs.iter().copied().min().expect("a host"),
    )
}

/// Sets up `ns`; returns the number of local hosts, 60% of the smallest
/// one's memory (MiB) and the time now (Unix seconds).
fn sixty_percent(env: &Env, ns: &str) -> (u32, u64, u64) {
    setup(env, ns);
    let (n, host_mib) = local_hosts(env);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (n, host_mib * 6 / 10, now)
}

fn dated_cluster(
    ns: &str,
    name: &str,
    workers: u32,
    worker_mib: u64,
    start: u64,
    end: u64,
) -> String {
    format!(
        "{}  reservation: {{start: '{}', end: '{}', endAction: Delete}}\n",
        cluster(ns, name, workers, &format!("{worker_mib}Mi")),
        rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(start)),
        rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(end))
    )
}

fn wait_reason(env: &Env, ns: &str, vc: &str, want: &str) -> String {
    let ((_, msg), took) = wait_for(Duration::from_secs(30), &format!("{vc} {want}"), || {
        let r = ready_reason(env, ns, vc);
        if r.0 == want {
            Ok(r)
        } else {
            Err(format!("{r:?}"))
        }
    })
    .unwrap();
    println!("{vc}: {want} after {took:?}: {msg}");
    msg
}

#[test]
fn an_overbooking_reservation_is_refused_with_site_resource_and_window() {
    let env = Env::get();
    let ns = "overbook";
    // Each reservation takes 60% of every host's memory (one worker per
    // host): one fits, two overlapping do not.
    let (n, big, now) = sixty_percent(&env, ns);
    let (a_start, a_end) = (now + 600, now + 1200);
    env.apply(&dated_cluster(ns, "first", n, big, a_start, a_end));
    wait_reason(&env, ns, "first", "ReservationPending");
    let first = json(&env, &["-n", ns, "get", "vc", "first"]);
    assert!(
        first["status"]["capacityAdmittedAt"].is_string(),
        "the first reservation is admitted: {}",
        first["status"]
    );
    // Its status says what is guaranteed, for which window, until when.
    let g = &first["status"]["guarantee"];
    let at = |s: u64| rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(g["basis"], "Reservation", "{g}");
    assert_eq!(g["nodes"], n + 1, "{g}");
    assert_eq!(g["memoryMiB"], big * u64::from(n) + 128, "{g}");
    assert_eq!(g["window"]["start"], at(a_start), "{g}");
    assert_eq!(g["until"], at(a_end), "{g}");
    // Overlapping the second half of the first: refused, naming site, resource, window.
    env.apply(&dated_cluster(
        ns,
        "second",
        n,
        big,
        a_start + 300,
        a_end + 300,
    ));
    let msg = wait_reason(&env, ns, "second", "InsufficientCapacity");
    assert!(msg.contains("site local"), "{msg}");
    assert!(msg.contains("memory short by"), "{msg}");
    assert!(
        msg.contains(&rfc3339(
            std::time::UNIX_EPOCH + Duration::from_secs(a_start + 300)
        )),
        "the window is named: {msg}"
    );
    let second = json(&env, &["-n", ns, "get", "vc", "second"]);
    assert!(second["status"]["capacityAdmittedAt"].is_null());
    assert!(
        second["status"]["guarantee"].is_null(),
        "nothing guaranteed"
    );
    assert!(
        yukumo_e2e::condition(&second, "Ready").is_some_and(|c| c.0 == "False"),
        "Ready=False"
    );
    let events = env
        .kubectl_ok(&["-n", ns, "get", "events", "-o", "json"])
        .unwrap();
    assert!(events.contains("InsufficientCapacity"), "an Event says so");
    // Back to back with the first (ending when it starts): admitted.
    env.apply(&dated_cluster(ns, "third", n, big, a_start - 300, a_start));
    wait_reason(&env, ns, "third", "ReservationPending");
    // The first is cancelled: the second now fits and is admitted on its retry.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "first"])
        .unwrap();
    let (_, took) = wait_for(Duration::from_secs(30), "second admitted", || {
        let r = ready_reason(&env, ns, "second");
        if r.0 == "ReservationPending" {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    })
    .unwrap();
    println!("second admitted {took:?} after the first was deleted");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

#[test]
fn a_permanent_cluster_may_not_take_capacity_reserved_for_a_later_window() {
    let env = Env::get();
    let ns = "calendar";
    let (n, big, now) = sixty_percent(&env, ns);
    // A course reserves 60% of every host from in 10 minutes, for 10 minutes.
    env.apply(&dated_cluster(ns, "course", n, big, now + 600, now + 1200));
    wait_reason(&env, ns, "course", "ReservationPending");
    assert!(
        nodes(&env, ns, "course").is_empty(),
        "no node before the window"
    );
    // A permanent cluster that fits now but would hold those hosts for ever:
    // its small frontend is placed, its big workers are refused, naming the
    // reservation, its window and the instant.
    env.apply(&cluster(ns, "squatter", n, &format!("{big}Mi")));
    let msg = wait_reason(&env, ns, "squatter", "Unschedulable");
    let window = format!(
        "capacity reserved for {ns}/course from {} to {} (at {})",
        rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(now + 600)),
        rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(now + 1200)),
        rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(now + 600)),
    );
    assert!(msg.contains(&window), "{msg}");
    assert!(msg.contains("squatter-worker-0 needs 1 cpu"), "{msg}");
    let placed = wait_count(&env, ns, "squatter", 1);
    assert_eq!(placed[0]["metadata"]["name"], "squatter-frontend");
    // A small permanent cluster still fits beside the reservation.
    env.apply(&cluster(ns, "small", 1, "128Mi"));
    wait_count(&env, ns, "small", 2);
    // Without a reservation, what is placed is held while the cluster exists.
    wait_for(Duration::from_secs(30), "small's guarantee", || {
        let g = json(&env, &["-n", ns, "get", "vc", "small"])["status"]["guarantee"].clone();
        if g["basis"] == "Placed" && g["nodes"] == 2 && g["until"].is_null() {
            Ok(())
        } else {
            Err(g.to_string())
        }
    })
    .unwrap();
    // The course is cancelled: the permanent cluster is placed by itself.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "course"])
        .unwrap();
    let (_, took) = wait_for(Duration::from_secs(60), "squatter placed", || {
        let placed = nodes(&env, ns, "squatter")
            .iter()
            .filter(|n| n["spec"]["host"].is_string())
            .count();
        if placed == n as usize + 1 {
            Ok(())
        } else {
            Err(format!("{placed} placed"))
        }
    })
    .unwrap();
    println!("squatter placed {took:?} after the course was cancelled");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// A cluster of `n` workers of `mib` MiB, running on `day` (UTC) only.
fn weekly_cluster(ns: &str, name: &str, n: u32, mib: u64, day: &str) -> String {
    format!(
        "{}  reservation: {{timeZone: UTC, weekly: [{{days: [{day}], start: '00:00', end: '23:59'}}]}}\n",
        cluster(ns, name, n, &format!("{mib}Mi"))
    )
}

#[test]
fn weekly_clusters_on_alternate_days_share_hosts() {
    let env = Env::get();
    let ns = "alternate";
    let (n, big, now) = sixty_percent(&env, ns);
    // 1970-01-01 was a Thursday.
    let day = |offset: u64| {
        ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
            [((now / 86_400 + 3 + offset) % 7) as usize]
    };
    // Today's class runs now on 60% of every host.
    env.apply(&weekly_cluster(ns, "today", n, big, day(0)));
    wait_count(&env, ns, "today", n as usize + 1);
    // The class of the day after tomorrow sleeps on the same hosts: its
    // stopped nodes hold nothing now, and its day never meets today's.
    env.apply(&weekly_cluster(ns, "later", n, big, day(2)));
    let later = wait_count(&env, ns, "later", n as usize + 1);
    assert!(
        later
            .iter()
            .all(|v| v["spec"]["host"].is_string() && v["spec"]["running"] == false),
        "every node of the sleeping class is placed, stopped"
    );
    // Both are admitted; each status shows the window its capacity is held
    // in now or next: today's, and the one of the day after tomorrow.
    let midnight = now / 86_400 * 86_400;
    for (vc, days) in [("today", 0), ("later", 2)] {
        let v = json(&env, &["-n", ns, "get", "vc", vc]);
        assert!(
            v["status"]["capacityAdmittedAt"].is_string(),
            "{vc} is admitted: {}",
            v["status"]
        );
        let g = &v["status"]["guarantee"];
        assert_eq!(g["basis"], "Weekly", "{g}");
        assert_eq!(g["nodes"], n + 1, "{g}");
        assert_eq!(
            g["window"]["start"],
            rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(midnight + days * 86_400)),
            "{vc}: {g}"
        );
    }
    // A third class on the same day as the sleeping one does not fit: its
    // day is held for `later`.
    env.apply(&weekly_cluster(ns, "clash", n, big, day(2)));
    let msg = wait_reason(&env, ns, "clash", "InsufficientCapacity");
    assert!(msg.contains("site local"), "{msg}");
    assert!(msg.contains("reserved then by alternate/later"), "{msg}");
    assert!(nodes(&env, ns, "clash").is_empty(), "nothing placed");

    // A controller killed (-9) in the middle of this re-derives the same
    // calendar from the API alone: compared object for object, at one
    // instant, before and after.
    let at = rfc3339(std::time::SystemTime::now());
    let calendar = |env: &Env| -> Result<Value, String> {
        let port = env.metrics_port("controller-1").ok_or("no port")?;
        match env.http_get(port, &format!("/calendar?at={at}")) {
            Ok((200, body)) => serde_json::from_str(&body).map_err(|e| e.to_string()),
            Ok((code, body)) => Err(format!("{code} {body}")),
            Err(e) => Err(e.to_string()),
        }
    };
    let before = calendar(&env).unwrap();
    let held: Vec<&str> = before["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["who"].as_str())
        .collect();
    assert!(
        held.contains(&"alternate/today") && held.contains(&"alternate/later"),
        "{before}"
    );
    env.env_sh(&["stop", "controller-1", "--signal", "KILL"])
        .unwrap();
    env.env_sh(&["start-controller", "1"]).unwrap();
    let (after, took) = wait_for(
        Duration::from_secs(60),
        "the restarted leader's calendar",
        || calendar(&env),
    )
    .unwrap();
    println!(
        "calendar after kill -9 and restart ({took:?}): {} reservations, identical: {}",
        held.len(),
        after == before
    );
    assert_eq!(after, before, "the calendar re-derived after a restart");
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// Restores a host whose agent a test killed (and the Site's grace), also
/// when the test fails.
struct Revive<'a> {
    env: &'a Env,
    host: String,
}

impl Drop for Revive<'_> {
    fn drop(&mut self) {
        let _ = self.env.env_sh(&["start-agent", &self.host]);
        self.env.set_site_grace(20);
        let _ = wait_for(Duration::from_secs(60), "the lost host Ready again", || {
            let h = json(self.env, &["get", "host", &self.host]);
            match yukumo_e2e::condition(&h, "Ready") {
                Some(c) if c.0 == "True" => Ok(()),
                c => Err(format!("{c:?}")),
            }
        });
    }
}

#[test]
fn a_reservations_nodes_on_a_lost_host_are_re_placed_before_other_clusters() {
    let env = Env::get();
    let ns = "preempt";
    let (n, sixty, now) = sixty_percent(&env, ns);
    let third = sixty / 2; // 30% of a host
    // A reservation running now, a permanent cluster and a filler, each
    // with 30%-of-a-host workers spread one per host: every host is at 60%,
    // and all but one (`spare`) at 90%.
    env.apply(&dated_cluster(ns, "course", n, third, now, now + 1800));
    wait_count(&env, ns, "course", n as usize + 1);
    env.apply(&cluster(ns, "perm", n, &format!("{third}Mi")));
    wait_count(&env, ns, "perm", n as usize + 1);
    env.apply(&cluster(ns, "filler", n - 1, &format!("{third}Mi")));
    let filler = wait_count(&env, ns, "filler", n as usize);
    let host_of = |v: &Value| v["spec"]["host"].as_str().unwrap_or("").to_string();
    let worker_hosts: Vec<String> = filler
        .iter()
        .filter(|v| v["spec"]["role"] == "worker")
        .map(host_of)
        .collect();
    let (n_hosts, _) = local_hosts(&env);
    assert_eq!(n_hosts, n, "every host Ready");
    let all_hosts: Vec<String> = json(&env, &["get", "hosts"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["spec"]["site"] == "local")
        .map(|h| h["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let spare = all_hosts
        .iter()
        .find(|h| !worker_hosts.contains(h))
        .expect("one host without a filler worker")
        .clone();
    // Lose a host with a filler worker: its course, perm and filler workers
    // need a new host, and only `spare` has room for one of them.
    let lost = worker_hosts[0].clone();
    let course_node = nodes(&env, ns, "course")
        .into_iter()
        .find(|v| v["spec"]["role"] == "worker" && host_of(v) == lost)
        .expect("a course worker on the lost host");
    let course_name = course_node["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let perm_name = nodes(&env, ns, "perm")
        .into_iter()
        .find(|v| v["spec"]["role"] == "worker" && host_of(v) == lost)
        .and_then(|v| v["metadata"]["name"].as_str().map(str::to_string))
        .expect("a perm worker on the lost host");
    env.set_site_grace(6);
    let _revive = Revive {
        env: &env,
        host: lost.clone(),
    };
    env.env_sh(&["stop", &format!("agent-{lost}"), "--signal", "KILL"])
        .unwrap();
    // The reservation's node takes the spare room, whichever cluster is
    // reconciled first: the others may not take what it needs.
    let (_, took) = wait_for(Duration::from_secs(120), "course node re-placed", || {
        let out = env.kubectl(&["-n", ns, "get", "vn", &course_name, "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if host_of(&v) == spare {
            Ok(())
        } else {
            Err(format!("on {:?}", host_of(&v)))
        }
    })
    .unwrap();
    println!("{course_name} re-placed on {spare} {took:?} after {lost}'s agent was killed");
    // The permanent cluster's node waits: no host has room for it.
    let msg = wait_reason(&env, ns, "perm", "Unschedulable");
    assert!(msg.contains(&perm_name), "{msg}");
    let out = env.kubectl(&["-n", ns, "get", "vn", &perm_name, "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_ne!(
        host_of(&v),
        spare,
        "{perm_name} did not take the spare room"
    );
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// `running: false` gives a cluster's hosts back: its stopped nodes hold
/// nothing (another cluster is placed where they are, and no guarantee is
/// shown); started again, each node holds its host only if there is room
/// (`Unschedulable`, naming the host and what is free, while there is
/// not), and starts there, the same node on the same host, once there is.
#[test]
fn a_stopped_cluster_gives_its_hosts_back_and_starts_where_there_is_room() {
    let env = Env::get();
    let ns = "parked";
    let (n, big, _) = sixty_percent(&env, ns);
    env.apply(&cluster(ns, "sleeper", n, &format!("{big}Mi")));
    let before: BTreeMap<String, (String, String)> =
        wait_count(&env, ns, "sleeper", n as usize + 1)
            .iter()
            .map(|v| {
                (
                    v["metadata"]["name"].as_str().unwrap().to_string(),
                    (
                        v["metadata"]["uid"].as_str().unwrap().to_string(),
                        v["spec"]["host"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect();
    let power = |on: bool| {
        env.kubectl_ok(&[
            "-n",
            ns,
            "patch",
            "vc",
            "sleeper",
            "--type",
            "merge",
            "-p",
            &format!("{{\"spec\":{{\"running\":{on}}}}}"),
        ])
        .unwrap();
    };
    // (60 s: once the other cluster is deleted, its nodes go when their
    // agents have cleaned up, and a capacity wait is retried every 10 s.)
    let all_running = |on: bool| {
        let (_, took) = wait_for(
            Duration::from_secs(60),
            &format!("every node running: {on}"),
            || {
                let ns_nodes = nodes(&env, ns, "sleeper");
                if ns_nodes.len() == n as usize + 1
                    && ns_nodes.iter().all(|v| v["spec"]["running"] == on)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "{:?}",
                        ns_nodes
                            .iter()
                            .map(|v| v["spec"]["running"].clone())
                            .collect::<Vec<_>>()
                    ))
                }
            },
        )
        .unwrap();
        took
    };
    power(false);
    all_running(false);
    let (_, took) = wait_for(
        Duration::from_secs(30),
        "no guarantee while stopped",
        || {
            let g = json(&env, &["-n", ns, "get", "vc", "sleeper"])["status"]["guarantee"].clone();
            if g.is_null() {
                Ok(())
            } else {
                Err(g.to_string())
            }
        },
    )
    .unwrap();
    println!("stopped: guarantee gone after {took:?}");
    // Another cluster of 60%-of-a-host workers is placed on the same hosts.
    env.apply(&cluster(ns, "taker", n, &format!("{big}Mi")));
    let taken = wait_count(&env, ns, "taker", n as usize + 1);
    let taken_hosts: std::collections::BTreeSet<&str> = taken
        .iter()
        .filter_map(|v| v["spec"]["host"].as_str())
        .collect();
    assert_eq!(taken_hosts.len(), n as usize, "spread over every host");
    // Started again: no room on their hosts.
    power(true);
    let msg = wait_reason(&env, ns, "sleeper", "Unschedulable");
    assert!(msg.contains("cannot start on host-"), "{msg}");
    assert!(msg.contains("where its boot disk is"), "{msg}");
    assert!(msg.contains("MiB free there for 1 cpu"), "{msg}");
    let workers_running = nodes(&env, ns, "sleeper")
        .iter()
        .filter(|v| v["spec"]["pool"] == "worker" && v["spec"]["running"] == true)
        .count();
    assert_eq!(workers_running, 0, "no worker overbooks its host");
    // Room again: every node starts, the same node on the same host.
    env.kubectl_ok(&["-n", ns, "delete", "vc", "taker", "--wait=false"])
        .unwrap();
    let took = all_running(true);
    println!("started on their hosts {took:?} after the other cluster was deleted");
    for v in nodes(&env, ns, "sleeper") {
        let name = v["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            (
                v["metadata"]["uid"].as_str().unwrap(),
                v["spec"]["host"].as_str().unwrap()
            ),
            (before[name].0.as_str(), before[name].1.as_str()),
            "{name}"
        );
    }
    let g = json(&env, &["-n", ns, "get", "vc", "sleeper"])["status"]["guarantee"].clone();
    let _ = wait_for(Duration::from_secs(10), "guarantee back", || {
        let g = json(&env, &["-n", ns, "get", "vc", "sleeper"])["status"]["guarantee"].clone();
        if g["basis"] == "Placed" {
            Ok(())
        } else {
            Err(g.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e} {g}"));
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}

/// The kubectl plugin against the real API server: a pool scaled (and an
/// unknown pool refused, naming the pools), the status tree, a pool and one
/// node stopped and started while the rest runs (an entry naming no node
/// refused by the API server; scaling below a stopped node drops it), the
/// cluster stopped and started. (Real guests switched off, the cluster's
/// Ready meanwhile, and `restart`: the guests test.)
#[test]
fn the_kubectl_plugin_scales_shows_stops_and_starts_a_cluster_a_pool_and_a_node() {
    let env = Env::get();
    let ns = "plugin";
    setup(&env, ns);
    env.apply(&cluster(ns, "pc", 1, "128Mi"));
    wait_count(&env, ns, "pc", 2);

    let out = env.plugin(&["-n", ns, "scale", "pc", "worker", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "virtualcluster plugin/pc: pool worker scaled to 3"
    );
    wait_count(&env, ns, "pc", 4);

    let out = env.plugin(&["-n", ns, "scale", "pc", "workers", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no pool \"workers\" (its pools: worker)"),
        "{err}"
    );
    let out = env.plugin(&["-n", ns, "scale", "nope", "worker", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("virtualcluster plugin/nope not found"));

    // The tree: every node under its pool, the group, the conditions.
    let (tree, _) = wait_for(Duration::from_secs(30), "status shows 4 nodes", || {
        let out = env.plugin(&["-n", ns, "status", "pc"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success()
            && text.contains("pool worker (3 replicas")
            && text.contains("pc-worker-2")
        {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    })
    .unwrap();
    println!("{tree}");
    assert!(tree.starts_with("VirtualCluster plugin/pc: "), "{tree}");
    assert!(tree.contains("├─ frontend pc-frontend"), "{tree}");
    assert!(tree.contains("network group net (vxlan "), "{tree}");
    assert!(tree.contains("conditions\n│  ├─ Ready="), "{tree}");

    // One pool, then one node, switched off and on while the cluster runs.
    let ok = |args: &[&str]| env.plugin_ok(ns, args);
    // Which nodes are off (spec.running). (These nodes' image does not
    // exist, so they never run: their Ready is the guests test's.)
    let settle = |what: &str, off: &[&str]| {
        let (_, took) = wait_for(Duration::from_secs(60), what, || {
            let ns_nodes = nodes(&env, ns, "pc");
            let mut off_now: Vec<String> = ns_nodes
                .iter()
                .filter(|n| n["spec"]["running"] == false)
                .map(|n| {
                    n["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            off_now.sort();
            if off_now == off && ns_nodes.len() == 4 {
                Ok(())
            } else {
                Err(format!("off {off_now:?}"))
            }
        })
        .unwrap();
        println!("kubectl yukumo {what}: nodes followed after {took:?}");
    };
    assert_eq!(
        ok(&["stop", "pc", "--pool", "worker"]),
        "pool worker of virtualcluster plugin/pc stopped (disks kept)"
    );
    settle(
        "stop --pool worker",
        &["pc-worker-0", "pc-worker-1", "pc-worker-2"],
    );
    ok(&["start", "pc", "--pool", "worker"]);
    settle("start --pool worker", &[]);
    assert_eq!(
        ok(&["stop", "pc", "--node", "pc-worker-1"]),
        "node pc-worker-1 of virtualcluster plugin/pc stopped (disks kept)"
    );
    settle("stop --node pc-worker-1", &["pc-worker-1"]);
    let out = env.plugin(&["-n", ns, "start", "pc", "--node", "worker-9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(
                "has no node \"worker-9\" (its nodes: frontend, worker-0, worker-1, worker-2)"
            ),
        "{err}"
    );
    let spec = json(&env, &["-n", ns, "get", "vc", "pc"])["spec"].clone();
    assert_eq!(spec["stoppedNodes"], serde_json::json!(["worker-1"]));
    // The API server refuses an entry naming no node, by field.
    let out = env.kubectl(&[
        "-n",
        ns,
        "patch",
        "vc",
        "pc",
        "--type=merge",
        "-p",
        r#"{"spec":{"stoppedNodes":["worker-1","worker-7"]}}"#,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("spec.stoppedNodes")
            && err.contains("must name a node of this cluster"),
        "{err}"
    );
    // Scaling below a stopped node drops its entry in the same change.
    ok(&["scale", "pc", "worker", "1"]);
    wait_count(&env, ns, "pc", 2);
    let spec = json(&env, &["-n", ns, "get", "vc", "pc"])["spec"].clone();
    assert!(spec["stoppedNodes"].is_null(), "{spec}");
    ok(&["scale", "pc", "worker", "3"]);
    wait_count(&env, ns, "pc", 4);

    // Stop: every node's spec.running follows; start: back.
    for (verb, running) in [("stop", false), ("start", true)] {
        let out = env.plugin(&["-n", ns, verb, "pc"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, took) = wait_for(
            Duration::from_secs(30),
            &format!("{verb}: nodes follow"),
            || {
                let ns_nodes = nodes(&env, ns, "pc");
                let following = ns_nodes
                    .iter()
                    .filter(|n| n["spec"]["running"] == running)
                    .count();
                if ns_nodes.len() == 4 && following == 4 {
                    Ok(())
                } else {
                    Err(format!(
                        "{following}/{} nodes running={running}",
                        ns_nodes.len()
                    ))
                }
            },
        )
        .unwrap();
        println!("kubectl yukumo {verb}: every node's spec.running={running} after {took:?}");
    }
    env.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])
        .unwrap();
}
