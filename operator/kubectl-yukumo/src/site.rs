//! `kubectl yukumo site join|revoke`: the credential of one host's agent at
//! a remote Site.
//!
//! Each host of a remote Site gets a ServiceAccount named after its Host in
//! the namespace `yukumo-site-<site>`; one ClusterRoleBinding per Site gives
//! that namespace's ServiceAccounts the chart's `yukumo-site-agent` role,
//! and the chart's ValidatingAdmissionPolicy `yukumo-site-agent-scope`
//! narrows their writes to their own Host (at that Site), the VirtualNodes
//! placed on it and the Volumes it serves. The token is a TokenRequest
//! bound to the ServiceAccount: `revoke` deletes the ServiceAccount, and
//! every token of it stops working at once.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, Patch, PostParams};
use kube::{Api, Client, Config};
use yukumo_api::{Site, labels};

/// The namespaces of the Sites' agents start with this (the admission
/// policy reads the Site from the rest of the name).
pub const NS_PREFIX: &str = "yukumo-site-";
/// The chart's ClusterRole for site agents.
pub const ROLE: &str = "yukumo-site-agent";
/// The chart's policy that keeps a site agent to its own Host.
pub const POLICY: &str = "yukumo-site-agent-scope";

/// What `site join` was asked.
#[derive(clap::Args)]
pub struct Join {
    pub site: String,
    pub host: String,
    /// The API server as the Site's hosts reach it (default: this kubeconfig's).
    #[arg(long)]
    pub server: Option<String>,
    /// PEM file of the CA that signed the API server's certificate
    /// (default: this kubeconfig's).
    #[arg(long)]
    pub certificate_authority: Option<std::path::PathBuf>,
    /// The token's lifetime (s, m, h or d); run join again to renew it.
    #[arg(long, default_value = "8760h", value_parser = parse_token_duration)]
    pub duration: Duration,
    /// Where to write the kubeconfig (default: yukumo-agent-SITE-HOST.kubeconfig).
    #[arg(short, long)]
    pub output: Option<std::path::PathBuf>,
}

/// The namespace of `site`'s agents; a Site whose name would make it too
/// long for a namespace is refused, naming the limit.
pub fn namespace(site: &str) -> Result<String> {
    let ns = format!("{NS_PREFIX}{site}");
    if site.is_empty() || ns.len() > 63 || !yukumo_api::is_dns_label(site) {
        bail!(
            "site {site:?}: its agents' namespace {ns:?} must be a DNS label of at most 63 \
             characters (a Site name of at most {} lower-case letters, digits and '-')",
            63 - NS_PREFIX.len()
        );
    }
    Ok(ns)
}

/// A Host name is a ServiceAccount name: a DNS subdomain.
pub fn check_host(host: &str) -> Result<()> {
    if host.is_empty() || host.len() > 253 || !host.split('.').all(yukumo_api::is_dns_label) {
        bail!(
            "host {host:?}: a Host (and its agent's ServiceAccount) is named by a DNS subdomain \
             (lower-case letters, digits, '-' and '.', at most 253 characters)"
        );
    }
    Ok(())
}

/// `90s`, `30m`, `12h`, `365d`: a token's lifetime.
pub fn parse_token_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    // The API server's floor for a TokenRequest.
    if d.as_secs() < 600 {
        return Err(format!("{s:?}: a token lives at least 10m"));
    }
    Ok(d)
}

/// A duration as `<number><s|m|h|d>`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number then s, m, h or d (e.g. 8760h)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: a number then s, m, h or d (e.g. 8760h)")),
    };
    Ok(Duration::from_secs(secs))
}

/// A kubeconfig with one cluster, user and context: the agent's.
pub fn kubeconfig(server: &str, ca_pem: &[u8], token: &str, site: &str, host: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let name = format!("yukumo-site-{site}-{host}");
    format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: yukumo\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: {name}\n  user:\n    token: {token}\n\
         contexts:\n- name: {name}\n  context:\n    cluster: yukumo\n    user: {name}\n\
         current-context: {name}\n"
    )
}

/// How the site admin starts the agent on the host.
pub fn agent_command(site: &str, host: &str) -> String {
    format!("KUBECONFIG=/etc/yukumo/kubeconfig yukumo-agent --host-name {host} --site {site}")
}

/// The CA to trust: the file given, or the kubeconfig's own.
fn ca_pem(config: &Config, file: Option<&std::path::Path>) -> Result<Vec<u8>> {
    if let Some(f) = file.or(config.root_cert_file.as_deref()) {
        return std::fs::read(f).with_context(|| format!("reading the CA {}", f.display()));
    }
    let Some(certs) = config.root_cert.as_ref().filter(|c| !c.is_empty()) else {
        bail!(
            "the kubeconfig names no CA for the API server: pass --certificate-authority with \
             the PEM file of the CA that signed its certificate"
        );
    };
    let mut pem = String::new();
    for der in certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    Ok(pem.into_bytes())
}

fn apply_params() -> kube::api::PatchParams {
    kube::api::PatchParams::apply("kubectl-yukumo")
}

/// Make (or renew) the credential of `host`'s agent at `site`, write its
/// kubeconfig and say how to start the agent.
pub async fn join(client: Client, config: &Config, j: Join) -> Result<()> {
    let ns = namespace(&j.site)?;
    check_host(&j.host)?;
    if Api::<Site>::all(client.clone())
        .get_opt(&j.site)
        .await
        .with_context(|| format!("reading site {}", j.site))?
        .is_none()
    {
        bail!("site {} not found (kubectl get sites)", j.site);
    }
    // Without the chart's role and policy, the credential would be either
    // useless or unbounded: refuse rather than hand out either.
    if Api::<ClusterRole>::all(client.clone())
        .get_opt(ROLE)
        .await
        .with_context(|| format!("reading ClusterRole {ROLE}"))?
        .is_none()
    {
        bail!("ClusterRole {ROLE} not found: install or upgrade the yukumo chart first");
    }
    if Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .get_opt(POLICY)
        .await
        .with_context(|| format!("reading ValidatingAdmissionPolicy {POLICY}"))?
        .is_none()
    {
        bail!(
            "ValidatingAdmissionPolicy {POLICY} not found (chart value admissionPolicy.enabled): \
             without it a site agent could write every Host, so no credential is made"
        );
    }
    let ca = ca_pem(config, j.certificate_authority.as_deref())?;
    let server = j.server.clone().unwrap_or_else(|| {
        config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string()
    });

    let meta_labels = serde_json::json!({
        labels::SITE: j.site,
        labels::MANAGED_BY: labels::MANAGED_BY_VALUE,
    });
    Api::<Namespace>::all(client.clone())
        .patch(
            &ns,
            &apply_params(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": ns, "labels": meta_labels },
            })),
        )
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    sas.patch(
        &j.host,
        &apply_params(),
        &Patch::Apply(serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {
                "name": j.host,
                "labels": { labels::SITE: j.site, labels::HOST: j.host,
                            labels::MANAGED_BY: labels::MANAGED_BY_VALUE },
            },
            "automountServiceAccountToken": false,
        })),
    )
    .await
    .with_context(|| format!("creating ServiceAccount {ns}/{}", j.host))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            &ns,
            &apply_params(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": { "name": ns, "labels": meta_labels },
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io",
                             "kind": "ClusterRole", "name": ROLE },
                "subjects": [{ "apiGroup": "rbac.authorization.k8s.io",
                               "kind": "Group", "name": format!("system:serviceaccounts:{ns}") }],
            })),
        )
        .await
        .with_context(|| format!("binding ClusterRole {ROLE} to namespace {ns}"))?;
    let req = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(j.duration.as_secs() as i64),
            ..Default::default()
        },
        ..Default::default()
    };
    let tr = sas
        .create_token_request(&j.host, &PostParams::default(), &req)
        .await
        .with_context(|| format!("requesting a token for {ns}/{}", j.host))?;
    let Some(status) = tr.status else {
        bail!("the API server returned no token for {ns}/{}", j.host);
    };
    let file = j
        .output
        .clone()
        .unwrap_or_else(|| format!("yukumo-agent-{}-{}.kubeconfig", j.site, j.host).into());
    write_private(
        &file,
        kubeconfig(&server, &ca, &status.token, &j.site, &j.host).as_bytes(),
    )?;
    println!(
        "site {}: host {} may run its agent as ServiceAccount {ns}/{} (token valid until {}).",
        j.site, j.host, j.host, status.expiration_timestamp.0
    );
    println!(
        "Its kubeconfig is {} (a credential: copy it to the host as /etc/yukumo/kubeconfig, mode 0600), then start the agent there:",
        file.display()
    );
    println!("  {}", agent_command(&j.site, &j.host));
    println!(
        "Add --gateway --uplink IFACE on the Site's gateway hosts. `kubectl yukumo site revoke {} {}` withdraws it; running join again renews it.",
        j.site, j.host
    );
    if is_loopback(&server) {
        eprintln!(
            "note: {server} is this machine's loopback: pass --server with the address the Site's hosts reach"
        );
    }
    match reads_unscoped(&client, &ns, &j.host).await {
        Ok(false) => {}
        Ok(true) => eprintln!(
            "warning: this API server lets the agent list every VirtualNode of the fleet: its \
             reads are not scoped (configure the API server with docs/authorization-config.yaml, \
             the controller's authorization webhook)"
        ),
        Err(e) => eprintln!("note: could not check the agent's read scope: {e:#}"),
    }
    Ok(())
}

/// Whether the API server would let the agent `ns/host` list every
/// VirtualNode (no site-agent authorization webhook in its chain).
async fn reads_unscoped(client: &Client, ns: &str, host: &str) -> Result<bool> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{ns}:{host}")),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ]),
            // Not a read of the agent's: the webhook logs it quietly.
            extra: Some(
                [(
                    yukumo_api::SCOPE_PROBE.to_string(),
                    vec!["site-join".to_string()],
                )]
                .into(),
            ),
            resource_attributes: Some(ResourceAttributes {
                group: Some(yukumo_api::GROUP.into()),
                resource: Some("virtualnodes".into()),
                verb: Some("list".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .context("asking the API server (SubjectAccessReview)")?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

fn is_loopback(server: &str) -> bool {
    let rest = server.split("://").nth(1).unwrap_or(server);
    rest.starts_with("127.") || rest.starts_with("localhost") || rest.starts_with("[::1]")
}

/// Written with mode 0600 from the start (a token is in it).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Withdraw `host`'s credential (its ServiceAccount: every token of it
/// stops working), or with `host: None` every credential of the Site (its
/// namespace and binding). The Host objects stay: the controller marks
/// them NotReady once their heartbeats stop.
pub async fn revoke(client: Client, site: &str, host: Option<&str>) -> Result<()> {
    let ns = namespace(site)?;
    match host {
        Some(host) => {
            check_host(host)?;
            let sas: Api<ServiceAccount> = Api::namespaced(client, &ns);
            match sas.delete(host, &DeleteParams::default()).await {
                Ok(_) => println!("site {site}: the credential of host {host} is revoked"),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    bail!("site {site}: host {host} has no credential ({ns}/{host} not found)")
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("deleting ServiceAccount {ns}/{host}"));
                }
            }
        }
        None => {
            let mut found = false;
            for res in [
                Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&ns, &DeleteParams::default())
                    .await
                    .map(|_| ()),
                Api::<Namespace>::all(client)
                    .delete(&ns, &DeleteParams::default())
                    .await
                    .map(|_| ()),
            ] {
                match res {
                    Ok(()) => found = true,
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e).context(format!("revoking site {site}")),
                }
            }
            if !found {
                bail!("site {site} has no agent credentials (namespace {ns} not found)");
            }
            println!("site {site}: every agent credential is revoked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `join` asks the API server (a SubjectAccessReview for the agent's
    /// account, with its groups) whether the agent could list every
    /// VirtualNode: allowed means no webhook scopes its reads.
    #[tokio::test]
    async fn join_checks_whether_the_agents_reads_are_scoped() {
        use http::{Method, Request, Response};
        use kube::client::Body;
        for allowed in [true, false] {
            let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(service, "t");
            let server = tokio::spawn(async move {
                let (req, send) = handle.next_request().await.expect("a request");
                assert_eq!(req.method(), Method::POST);
                assert_eq!(
                    req.uri().path(),
                    "/apis/authorization.k8s.io/v1/subjectaccessreviews"
                );
                let b = req.into_body().collect_bytes().await.unwrap();
                let mut review: serde_json::Value = serde_json::from_slice(&b).unwrap();
                review["status"] = serde_json::json!({"allowed": allowed});
                send.send_response(
                    Response::builder()
                        .status(201)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&review).unwrap()))
                        .unwrap(),
                );
                review
            });
            let unscoped = reads_unscoped(&client, "yukumo-site-b", "h1")
                .await
                .unwrap();
            assert_eq!(unscoped, allowed);
            let review = server.await.unwrap();
            assert_eq!(
                review["spec"]["user"],
                "system:serviceaccount:yukumo-site-b:h1"
            );
            assert!(
                review["spec"]["groups"]
                    .as_array()
                    .unwrap()
                    .contains(&"system:serviceaccounts:yukumo-site-b".into())
            );
            assert_eq!(
                review["spec"]["resourceAttributes"]["resource"],
                "virtualnodes"
            );
            assert_eq!(review["spec"]["resourceAttributes"]["verb"], "list");
            assert_eq!(
                review["spec"]["extra"]["yukumo.io/scope-probe"][0],
                "site-join"
            );
        }
    }

    #[test]
    fn a_sites_namespace_is_a_dns_label() {
        assert_eq!(namespace("b").unwrap(), "yukumo-site-b");
        let long = "s".repeat(52);
        let err = namespace(&long).unwrap_err().to_string();
        assert!(err.contains("at most 51"), "{err}");
        assert!(namespace("B_1").is_err());
        assert!(namespace("").is_err());
        assert!(namespace(&"s".repeat(51)).is_ok());
    }

    #[test]
    fn a_host_is_a_dns_subdomain() {
        check_host("host-1").unwrap();
        check_host("h1.site-b.example").unwrap();
        for bad in ["", "Host1", "h_1", "a..b", "-a", "a:b"] {
            let err = check_host(bad).unwrap_err().to_string();
            assert!(err.contains("DNS subdomain"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("8760h").unwrap().as_secs(), 8760 * 3600);
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 30 * 86400);
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert!(
            parse_token_duration("5m")
                .unwrap_err()
                .contains("at least 10m")
        );
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }

    /// kube-rs (as the agent) reads the kubeconfig back: server, CA, token.
    #[test]
    fn the_kubeconfig_reads_back() {
        let pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let text = kubeconfig("https://192.0.2.10:6443", pem, "eyJ.tok.en", "b", "h1");
        let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("yukumo-site-b-h1"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://192.0.2.10:6443"));
        let ca = base64::engine::general_purpose::STANDARD
            .decode(cluster.certificate_authority_data.as_ref().unwrap())
            .unwrap();
        assert_eq!(ca, pem);
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
        assert!(is_loopback("https://127.0.0.1:6443"));
        assert!(!is_loopback("https://192.0.2.10:6443"));
    }

    #[test]
    fn the_agent_command_names_host_and_site() {
        let c = agent_command("b", "h1");
        assert!(c.contains("--host-name h1 --site b"), "{c}");
    }
}
