//! Networking end-to-end tests (issue 4): allocation of segment ids.

use std::time::Duration;

use serde_json::Value;
use yukumo_e2e::{Env, condition, wait_for};

fn ng(name: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: yukumo.io/v1alpha1\nkind: NetworkGroup\nmetadata: {{name: {name}, namespace: segs}}\nspec: {{cidr: 10.0.0.0/24, segment: {{type: vxlan{extra}}}, homeSite: segs}}\n"
    )
}

/// (Ready reason, message, segment id) of a NetworkGroup.
fn state(env: &Env, name: &str) -> (String, String, Option<u64>) {
    let v: Value = env.get_json(&["-n", "segs", "get", "ng", name]);
    let (_, reason, msg) = condition(&v, "Ready").unwrap_or_default();
    (reason, msg, v["status"]["segment"]["id"].as_u64())
}

fn wait_reason(env: &Env, name: &str, want: &str) -> (String, Option<u64>) {
    let ((msg, id), took) = wait_for(Duration::from_secs(30), &format!("{name} {want}"), || {
        let (r, m, id) = state(env, name);
        if r == want {
            Ok((m, id))
        } else {
            Err(format!("{r}: {m}"))
        }
    })
    .unwrap();
    println!("{name}: {want} after {took:?} (segment {id:?}) {msg}");
    (msg, id)
}

#[test]
fn segment_ids_are_allocated_once_unique_per_site_and_refused_when_exhausted_or_taken() {
    let env = Env::get();
    // A Site with room for two VXLAN groups.
    env.apply(
        "apiVersion: yukumo.io/v1alpha1\nkind: Site\nmetadata: {name: segs}\nspec: {vniRange: {start: 5000, end: 5001}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: segs}\n",
    );
    env.apply(&(ng("a", "") + &ng("b", "")));
    // The Site has no hosts: the ids are allocated, the router cannot be placed.
    let (_, a) = wait_reason(&env, "a", "NoGatewayHost");
    let (_, b) = wait_reason(&env, "b", "NoGatewayHost");
    let (a, b) = (a.expect("a has a VNI"), b.expect("b has a VNI"));
    assert_ne!(a, b, "two groups of one Site never share a VNI");
    assert!((5000..=5001).contains(&a) && (5000..=5001).contains(&b));
    // A third: the range is exhausted, said with the Site and the range.
    env.apply(&ng("c", ""));
    let (msg, id) = wait_reason(&env, "c", "SegmentRangeExhausted");
    assert!(msg.contains("vniRange 5000-5001"), "{msg}");
    assert_eq!(id, None);
    // An explicit id another group holds: refused, naming that group.
    env.apply(&ng("d", &format!(", id: {a}")));
    let (msg, _) = wait_reason(&env, "d", "SegmentIdInUse");
    assert!(msg.contains("segs/a"), "{msg}");
    wait_for(Duration::from_secs(10), "Events for both", || {
        let events = env
            .kubectl_ok(&["-n", "segs", "get", "events", "-o", "json"])
            .unwrap();
        if events.contains("SegmentRangeExhausted") && events.contains("SegmentIdInUse") {
            Ok(())
        } else {
            Err("missing".to_string())
        }
    })
    .unwrap();
    // Allocations survive a controller restart unchanged.
    let pid = env.pid("controller-1").expect("controller-1");
    yukumo_e2e::signal(pid, "KILL");
    env.env_sh(&["start-controller", "1"]).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(state(&env, "a").2, Some(a));
    assert_eq!(state(&env, "b").2, Some(b));
    // When a goes, its VNI is free again: c gets it.
    env.kubectl_ok(&["-n", "segs", "delete", "ng", "a", "d"])
        .unwrap();
    let (_, c) = wait_reason(&env, "c", "NoGatewayHost");
    assert_eq!(c, Some(a));
    env.kubectl_ok(&["delete", "namespace", "segs", "--wait=false"])
        .unwrap();
    env.kubectl_ok(&["delete", "site", "segs"]).unwrap();
}
