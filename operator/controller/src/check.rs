//! `yukumo-controller --check`: the chart's `helm test`. Reads what a
//! working installation shows and says what it found, failing (exit 1) with
//! the cause when something is not so:
//! - the controller's Lease has a holder that renewed it within twice the
//!   lease duration (a leader is acting);
//! - at least one Host is registered (else: no node is labelled for the
//!   agent DaemonSet), and every Host is Ready (else: each one's reason and
//!   message).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, api::ListParams};
use yukumo_api::Host;
use yukumo_api::common::ConditionStatus;

/// What the check found: lines saying what is fine, and failures.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub ok: Vec<String>,
    pub failed: Vec<String>,
}

/// The verdict on a Lease and the Hosts at `now`.
pub fn judge(
    lease: Option<&Lease>,
    hosts: &[Host],
    lease_duration: Duration,
    now: Timestamp,
) -> Report {
    let mut r = Report::default();
    let spec = lease.and_then(|l| l.spec.as_ref());
    match spec.and_then(|s| s.holder_identity.as_deref().filter(|h| !h.is_empty())) {
        None => r.failed.push(
            "no controller leads: Lease yukumo-controller has no holder (are the controller pods running? kubectl get pods -l app.kubernetes.io/component=controller)".into(),
        ),
        Some(holder) => {
            let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
            match renewed {
                Some(t) if now.duration_since(t).unsigned_abs() <= lease_duration * 2 => r.ok.push(format!(
                    "leader {holder} (Lease renewed {:.1} s ago)",
                    now.duration_since(t).as_secs_f64().max(0.0)
                )),
                Some(t) => r.failed.push(format!(
                    "leader {holder} last renewed its Lease {:.0} s ago (lease {} s): it is not acting",
                    now.duration_since(t).as_secs_f64(),
                    lease_duration.as_secs()
                )),
                None => r.failed.push(format!("leader {holder} never renewed its Lease")),
            }
        }
    }
    if hosts.is_empty() {
        r.failed.push(
            "no Host registered: no agent runs (label hypervisor nodes yukumo.io/hypervisor=true; kubectl get pods -l app.kubernetes.io/component=agent)".into(),
        );
    }
    let mut ready = 0;
    for h in hosts {
        let name = h.metadata.name.as_deref().unwrap_or_default();
        let cond = h
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        match cond {
            Some(c) if c.status == ConditionStatus::True => ready += 1,
            Some(c) => r.failed.push(format!(
                "host {name} is not Ready: {}: {}",
                c.reason, c.message
            )),
            None => r
                .failed
                .push(format!("host {name} has no Ready condition yet")),
        }
    }
    if ready > 0 {
        r.ok.push(format!("{ready}/{} Hosts Ready", hosts.len()));
    }
    r
}

/// Runs the check against the API server: prints every finding, errs if
/// any failed.
pub async fn run(client: Client, namespace: &str, lease_duration: Duration) -> anyhow::Result<()> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt("yukumo-controller")
        .await?;
    let hosts = Api::<Host>::all(client)
        .list(&ListParams::default())
        .await?
        .items;
    let r = judge(lease.as_ref(), &hosts, lease_duration, Timestamp::now());
    for l in &r.ok {
        println!("ok: {l}");
    }
    for l in &r.failed {
        println!("FAILED: {l}");
    }
    if r.failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} check(s) failed", r.failed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed_secs_ago: i64, now: Timestamp) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(
                    now - jiff::SignedDuration::from_secs(renewed_secs_ago),
                )),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn host(name: &str, ready: Option<bool>) -> Host {
        let conditions = match ready {
            None => "[]".to_string(),
            Some(r) => format!(
                r#"[{{"type":"Ready","status":"{}","reason":"{}","message":"m","lastTransitionTime":"2026-01-01T00:00:00Z"}}]"#,
                if r { "True" } else { "False" },
                if r {
                    "AgentHeartbeating"
                } else {
                    "HypervisorNotReady"
                }
            ),
        };
        serde_json::from_str(&format!(
            r#"{{"apiVersion":"yukumo.io/v1alpha1","kind":"Host","metadata":{{"name":"{name}"}},"spec":{{"site":"s"}},"status":{{"conditions":{conditions}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_working_installation_passes() {
        let now = Timestamp::now();
        let r = judge(
            Some(&lease("c-1", 3, now)),
            &[host("h1", Some(true)), host("h2", Some(true))],
            Duration::from_secs(15),
            now,
        );
        assert!(r.failed.is_empty(), "{r:?}");
        assert!(r.ok[0].starts_with("leader c-1"), "{r:?}");
        assert_eq!(r.ok[1], "2/2 Hosts Ready");
    }

    #[test]
    fn each_failure_names_its_cause() {
        let now = Timestamp::now();
        let d = Duration::from_secs(15);
        let r = judge(None, &[], d, now);
        assert!(r.failed[0].contains("no holder"), "{r:?}");
        assert!(r.failed[1].contains("no Host registered"), "{r:?}");
        let r = judge(
            Some(&lease("c-1", 31, now)),
            &[host("h1", Some(false)), host("h2", None)],
            d,
            now,
        );
        assert!(r.failed[0].contains("not acting"), "{r:?}");
        assert!(
            r.failed[1].contains("host h1 is not Ready: HypervisorNotReady: m"),
            "{r:?}"
        );
        assert!(
            r.failed[2].contains("host h2 has no Ready condition"),
            "{r:?}"
        );
        assert!(r.ok.is_empty(), "{r:?}");
        let r = judge(Some(&lease("", 1, now)), &[host("h1", Some(true))], d, now);
        assert!(r.failed[0].contains("no holder"), "{r:?}");
    }
}
