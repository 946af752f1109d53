//! Pure parts of the plugin: the status tree and the scale patch.

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::Event;
use serde::Serialize;
use serde_json::{Value, json};
use std::fmt::Write;
use yukumo_api::{NetworkGroup, VirtualCluster, VirtualNode, Volume, labels};

/// How many of the newest Events the tree shows.
const EVENTS: usize = 8;

fn val<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// The Volumes the cluster's spec names.
pub fn volume_names(vc: &VirtualCluster) -> Vec<String> {
    vc.spec
        .frontend
        .volumes
        .iter()
        .chain(vc.spec.pools.iter().flat_map(|p| p.volumes.iter()))
        .map(|v| v.name.clone())
        .collect()
}

/// `Ready=True (Reason): message` for each condition.
fn conditions(status: &Value) -> Vec<String> {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}={} ({}): {}",
                s(&c["type"]),
                s(&c["status"]),
                s(&c["reason"]),
                s(&c["message"])
            )
        })
        .collect()
}

/// Append `items` under `prefix` as tree branches.
fn branch(out: &mut String, prefix: &str, items: &[String]) {
    for (i, item) in items.iter().enumerate() {
        let last = i + 1 == items.len();
        let (head, tail) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        let mut lines = item.lines();
        let _ = writeln!(out, "{prefix}{head}{}", lines.next().unwrap_or_default());
        for l in lines {
            let _ = writeln!(out, "{prefix}{tail}{l}");
        }
    }
}

/// The cluster as a tree: nodes by pool (phase, host, site, address, the
/// node's last error), its network, volumes, conditions and its and its
/// nodes' newest Events.
pub fn status(
    ns: &str,
    vc: &VirtualCluster,
    nodes: &[VirtualNode],
    group: Option<&NetworkGroup>,
    volumes: &[Volume],
    events: &[Event],
) -> String {
    let name = vc.metadata.name.clone().unwrap_or_default();
    let st = val(&vc.status);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "VirtualCluster {ns}/{name}: {} nodes ready{}{}",
        if st.is_null() {
            "no status yet; 0/?".to_string()
        } else {
            format!("{}/{}", s(&st["readyNodes"]), s(&st["desiredNodes"]))
        },
        if vc.spec.running {
            ""
        } else {
            ", stopped (spec.running: false)"
        },
        match st["revision"].as_str() {
            Some(r) => format!(", revision {r} ({} updated)", s(&st["updatedNodes"])),
            None => String::new(),
        }
    );
    let mut top: Vec<String> = Vec::new();

    // Nodes, by pool (the frontend first), from the cluster's summary; a
    // VirtualNode adds its pool and last error.
    let summary: Vec<Value> = st["nodes"].as_array().cloned().unwrap_or_default();
    let node_of = |n: &str| nodes.iter().find(|v| v.metadata.name.as_deref() == Some(n));
    let line = |n: &Value| {
        let node = node_of(n["name"].as_str().unwrap_or_default());
        let mut l = format!("{} {}", s(&n["name"]), s(&n["phase"]));
        if let Some(h) = n["host"].as_str() {
            let _ = write!(l, " on {h}");
            if let Some(site) = n["site"].as_str() {
                let _ = write!(l, " (site {site})");
            }
        }
        if let Some(ip) = n["ip"].as_str() {
            let _ = write!(l, " {ip}");
        }
        if let Some(e) = node
            .and_then(|v| v.status.as_ref())
            .and_then(|s| s.last_error.as_deref())
        {
            let _ = write!(l, "\nlast error: {e}");
        }
        l
    };
    let pool_of = |n: &Value| -> Option<String> {
        node_of(n["name"].as_str().unwrap_or_default())
            .and_then(|v| v.metadata.labels.as_ref()?.get(labels::POOL).cloned())
            .or_else(|| {
                // Not made yet: its name is `<cluster>-<pool>-<i>`.
                let rest = n["name"].as_str()?.strip_prefix(&format!("{name}-"))?;
                vc.spec
                    .pools
                    .iter()
                    .find(|p| {
                        rest.rsplit_once('-')
                            .is_some_and(|(pool, _)| pool == p.name)
                    })
                    .map(|p| p.name.clone())
            })
    };
    for n in summary.iter().filter(|n| n["role"] == "frontend") {
        top.push(format!("frontend {}", line(n)));
    }
    for p in &vc.spec.pools {
        let members: Vec<String> = summary
            .iter()
            .filter(|n| n["role"] != "frontend" && pool_of(n).as_deref() == Some(&p.name))
            .map(line)
            .collect();
        let size = match (&p.size.size_class, p.size.cpu, &p.size.memory) {
            (Some(c), _, _) => c.clone(),
            (None, cpu, mem) => format!(
                "{} cpu, {}",
                cpu.map(|c| c.to_string()).unwrap_or("?".into()),
                mem.as_ref()
                    .map(|m| m.0.clone())
                    .unwrap_or("? memory".into())
            ),
        };
        let mut b = format!("pool {} ({} replicas, {size})", p.name, p.replicas);
        let mut sub = String::new();
        branch(&mut sub, "", &members);
        if !sub.is_empty() {
            b.push('\n');
            b.push_str(sub.trim_end());
        }
        top.push(b);
    }
    if let Some(fe) = st["frontend"].as_object() {
        let mut l = "access:".to_string();
        if let Some(a) = fe.get("publicIP").and_then(Value::as_str) {
            let _ = write!(l, " public {a}");
        }
        if let Some(a) = fe.get("ssh").and_then(Value::as_str) {
            let _ = write!(l, " ssh: {a}");
        }
        if l != "access:" {
            top.push(l);
        }
    }

    // Network.
    top.push(match group {
        None => format!("network group {} (not found)", vc.spec.network_group),
        Some(g) => {
            let gs = val(&g.status);
            let seg = &gs["segment"];
            let mut l = format!("network group {}", vc.spec.network_group);
            if !seg.is_null() {
                let _ = write!(l, " ({} {})", s(&seg["type"]), s(&seg["id"]));
            }
            if let Some(gw) = gs["gateway"].as_str() {
                let _ = write!(l, " gateway {gw}");
            }
            if let Some(m) = gs["mtu"].as_u64() {
                let _ = write!(l, " mtu {m}");
            }
            for c in conditions(&gs)
                .iter()
                .filter(|c| !c.starts_with("Ready=True"))
            {
                let _ = write!(l, "\n{c}");
            }
            l
        }
    });

    // Volumes.
    for want in volume_names(vc) {
        let Some(v) = volumes
            .iter()
            .find(|v| v.metadata.name.as_deref() == Some(&want))
        else {
            top.push(format!("volume {want} (not found)"));
            continue;
        };
        let vs = val(&v.status);
        let mut l = format!("volume {want} {}", s(&val(&v.spec.size)));
        if let Some(p) = vs["phase"].as_str() {
            let _ = write!(l, " {p}");
        }
        if let Some(a) = vs["attachedTo"]["node"].as_str() {
            let _ = write!(l, ", attached to {a}");
        }
        let readers: Vec<String> = vs["readers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["node"].as_str().map(str::to_string))
            .collect();
        if !readers.is_empty() {
            let _ = write!(l, ", read by {}", readers.join(", "));
        }
        top.push(l);
    }

    // Conditions.
    let conds = conditions(&st);
    if !conds.is_empty() {
        let mut sub = String::new();
        branch(&mut sub, "", &conds);
        top.push(format!("conditions\n{}", sub.trim_end()));
    }

    // The newest Events of the cluster and its nodes.
    let mine = |e: &&Event| {
        let o = &e.involved_object;
        (o.kind.as_deref() == Some("VirtualCluster") && o.name.as_deref() == Some(&name))
            || (o.kind.as_deref() == Some("VirtualNode")
                && nodes.iter().any(|n| n.metadata.name == o.name))
    };
    let when = |e: &Event| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
    };
    let mut ev: Vec<&Event> = events.iter().filter(mine).collect();
    ev.sort_by_key(|e| std::cmp::Reverse(when(e)));
    let lines: Vec<String> = ev
        .iter()
        .take(EVENTS)
        .map(|e| {
            format!(
                "{} {} {}/{}: {}{}",
                when(e).map(|t| t.to_string()).unwrap_or_default(),
                e.type_.as_deref().unwrap_or_default(),
                e.involved_object.kind.as_deref().unwrap_or_default(),
                e.involved_object.name.as_deref().unwrap_or_default(),
                e.reason.as_deref().unwrap_or_default(),
                e.message
                    .as_deref()
                    .map(|m| format!(" {m}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if !lines.is_empty() {
        let mut sub = String::new();
        branch(&mut sub, "", &lines);
        top.push(format!("events (newest first)\n{}", sub.trim_end()));
    }
    branch(&mut out, "", &top);
    out
}

/// The merge patch that sets `pool`'s replicas: the whole pool list (a
/// merge patch replaces lists) with only that pool changed, conditional on
/// the cluster's resourceVersion (a concurrent edit makes it fail with a
/// conflict instead of being overwritten).
pub fn scale_patch(vc: &VirtualCluster, pool: &str, replicas: i32) -> Result<Value> {
    if replicas < 0 {
        bail!("replicas must be 0 or more, not {replicas}");
    }
    let at = crate::power::pool_index(vc, pool)?;
    let mut pools = val(&vc.spec.pools);
    pools[at]["replicas"] = json!(replicas);
    // Nodes stopped one by one beyond the new count go with them (the API
    // server refuses entries naming no node).
    let stopped = crate::power::stopped_after_scale(vc, pool, replicas);
    Ok(json!({
        "metadata": { "resourceVersion": vc.metadata.resource_version },
        "spec": { "pools": pools, "stoppedNodes": crate::power::stopped_value(&stopped) },
    }))
}

#[cfg(test)]
mod tests;
