//! The site agents' read scope: an authorization webhook.
//!
//! RBAC cannot limit reads by label or field, and admission never sees a
//! read, so without this a Site agent's credential could list every Host and
//! VirtualNode of the fleet. The API server passes a list's or watch's label
//! and field selectors to authorizers (AuthorizeWithSelectors, stable in
//! Kubernetes 1.34), and its structured authorization configuration calls
//! this webhook — before RBAC, only for a site agent's reads of yukumo
//! kinds (its `matchConditions`), failing closed — which **denies** what
//! reaches beyond the agent's own Host and Site and otherwise has **no
//! opinion**, leaving RBAC to allow it. It never allows anything itself.
//!
//! A site agent (`system:serviceaccount:yukumo-site-<site>:<host>`, made by
//! `kubectl yukumo site join`) may read:
//! - Hosts: its own by name, and the Hosts of its Site by the label
//!   `yukumo.io/site=<site>` (the storage ACL needs their addresses);
//! - VirtualNodes: those placed on its Host, by `yukumo.io/host=<host>`;
//! - Volumes: those its Host serves, by `yukumo.io/storage-host=<host>`;
//! - Sites: its own by name;
//! - NetworkGroups: all (it needs the groups that span its Host; they hold
//!   CIDRs and tunnel ends, no secret).
//!
//! Every decision is a pure function of the review, so the webhook holds no
//! state, runs in every controller replica (leader or not), and needs no
//! client authentication: a caller learns nothing it could not compute.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use tokio::sync::watch;
use yukumo_api::labels;

/// Site agents' ServiceAccounts live in `yukumo-site-<site>` namespaces.
pub const SA_PREFIX: &str = "system:serviceaccount:yukumo-site-";

/// What the webhook answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not ours to judge: the next authorizer (RBAC) decides.
    NoOpinion,
    /// Refused, whatever RBAC says, with the reason the caller sees.
    Deny(String),
}

/// The site and host of a site agent's user name.
pub fn site_agent(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix(SA_PREFIX)?;
    let (site, host) = rest.split_once(':')?;
    (!site.is_empty() && !host.is_empty() && !host.contains(':')).then_some((site, host))
}

/// One parsed selector requirement: key, operator, values.
type Requirement<'a> = (&'a str, &'a str, &'a [String]);

/// Whether a selector (its parsed requirements, or else its raw text)
/// limits `key` to exactly `value`: one requirement `key in (value)` (or
/// `key=value`), ANDed with anything else, can only narrow the answer.
fn pins(requirements: Option<Vec<Requirement>>, raw: Option<&str>, key: &str, value: &str) -> bool {
    if let Some(reqs) = requirements.filter(|r| !r.is_empty()) {
        return reqs.iter().any(|(k, op, vals)| {
            *k == key && *op == "In" && !vals.is_empty() && vals.iter().all(|v| v == value)
        });
    }
    // The raw form: comma-separated terms; only `k=v` / `k==v` is read.
    raw.is_some_and(|raw| {
        raw.split(',').any(|term| {
            let term = term.trim();
            let (k, v) = match term.split_once("==").or_else(|| term.split_once('=')) {
                Some(kv) => kv,
                None => return false,
            };
            !k.ends_with('!') && k.trim() == key && v.trim() == value
        })
    })
}

fn label_pins(ra: &ResourceAttributes, key: &str, value: &str) -> bool {
    ra.label_selector.as_ref().is_some_and(|s| {
        let reqs = s.requirements.as_ref().map(|r| {
            r.iter()
                .map(|r| {
                    (
                        r.key.as_str(),
                        r.operator.as_str(),
                        r.values.as_deref().unwrap_or_default(),
                    )
                })
                .collect()
        });
        pins(reqs, s.raw_selector.as_deref(), key, value)
    })
}

fn field_pins(ra: &ResourceAttributes, key: &str, value: &str) -> bool {
    ra.field_selector.as_ref().is_some_and(|s| {
        let reqs = s.requirements.as_ref().map(|r| {
            r.iter()
                .map(|r| {
                    (
                        r.key.as_str(),
                        r.operator.as_str(),
                        r.values.as_deref().unwrap_or_default(),
                    )
                })
                .collect()
        });
        pins(reqs, s.raw_selector.as_deref(), key, value)
    })
}

/// Whether the request is for the one object named `name`: a get of it,
/// or a list or watch with the field selector `metadata.name=<name>`.
fn names(ra: &ResourceAttributes, name: &str) -> bool {
    match ra.name.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => n == name,
        None => field_pins(ra, "metadata.name", name),
    }
}

/// The decision for one review.
pub fn decide(spec: &SubjectAccessReviewSpec) -> Decision {
    let Some((site, host)) = spec.user.as_deref().and_then(site_agent) else {
        return Decision::NoOpinion;
    };
    let Some(ra) = spec.resource_attributes.as_ref() else {
        return Decision::NoOpinion;
    };
    if ra.group.as_deref() != Some(yukumo_api::GROUP) {
        return Decision::NoOpinion;
    }
    let verb = ra.verb.as_deref().unwrap_or_default();
    if !matches!(verb, "get" | "list" | "watch") {
        // Writes are the admission policy's (yukumo-site-agent-scope).
        return Decision::NoOpinion;
    }
    let who = format!("the site agent of Host {host} at Site {site}");
    let resource = ra.resource.as_deref().unwrap_or_default();
    let ok = match resource {
        "hosts" => names(ra, host) || label_pins(ra, labels::SITE, site),
        "virtualnodes" => label_pins(ra, labels::HOST, host),
        "volumes" => label_pins(ra, labels::STORAGE_HOST, host),
        "sites" => names(ra, site),
        _ => return Decision::NoOpinion,
    };
    if ok {
        return Decision::NoOpinion;
    }
    Decision::Deny(match resource {
        "hosts" => format!(
            "{who} reads only its own Host by name, or its Site's Hosts by the label selector {}={site}",
            labels::SITE
        ),
        "virtualnodes" => format!(
            "{who} reads VirtualNodes only with the label selector {}={host} (those placed on it)",
            labels::HOST
        ),
        "volumes" => format!(
            "{who} reads Volumes only with the label selector {}={host} (those it serves)",
            labels::STORAGE_HOST
        ),
        _ => format!("{who} reads only its own Site, by name"),
    })
}

/// The review answered.
pub fn answer(review: SubjectAccessReview) -> SubjectAccessReview {
    let status = match decide(&review.spec) {
        Decision::NoOpinion => SubjectAccessReviewStatus {
            allowed: false,
            ..Default::default()
        },
        Decision::Deny(reason) => SubjectAccessReviewStatus {
            allowed: false,
            denied: Some(true),
            reason: Some(reason),
            ..Default::default()
        },
    };
    SubjectAccessReview {
        metadata: Default::default(),
        spec: review.spec,
        status: Some(status),
    }
}

/// Where and how the webhook is served.
#[derive(Debug, Clone)]
pub struct Serve {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often a handshake looks whether the files changed.
    pub reload_every: std::time::Duration,
}

/// Certificate files are looked at for a change this often.
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The certificate and key read from their files.
fn certified_key(cert: &Path, key: &Path) -> Result<Arc<rustls::sign::CertifiedKey>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificate {}", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        cert.display()
    );
    let der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(der)
        .with_context(|| format!("the private key {}", key.display()))?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match()
        .with_context(|| format!("{} and {} do not match", cert.display(), key.display()))?;
    Ok(Arc::new(ck))
}

/// When the files were last changed (both: a rotation writes both).
fn stamp(cert: &Path, key: &Path) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

/// The webhook's certificate, read again when its files change (a rotated
/// Secret, cert-manager): looked at on a handshake at most every `every`;
/// a rotation that does not load keeps the last good one, with a warning.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    every: std::time::Duration,
    state: std::sync::Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    stamp: Option<(std::time::SystemTime, std::time::SystemTime)>,
    checked: std::time::Instant,
    key: Arc<rustls::sign::CertifiedKey>,
}

impl Reloading {
    fn new(cert: &Path, key: &Path, every: std::time::Duration) -> Result<Self> {
        let stamp = stamp(cert, key);
        Ok(Self {
            state: std::sync::Mutex::new(Loaded {
                stamp,
                checked: std::time::Instant::now(),
                key: certified_key(cert, key)?,
            }),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            every,
        })
    }
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= self.every {
            s.checked = std::time::Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now.is_some() && now != s.stamp {
                match certified_key(&self.cert, &self.key) {
                    Ok(k) => {
                        s.key = k;
                        s.stamp = now;
                        tracing::info!(cert = %self.cert.display(), "authorization webhook: certificate reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %format!("{e:#}"),
                        "authorization webhook: the changed certificate does not load; keeping the last one"
                    ),
                }
            }
        }
        Some(s.key.clone())
    }
}

fn tls_config(serve: &Serve) -> Result<rustls::ServerConfig> {
    let certs = Reloading::new(&serve.cert, &serve.key, serve.reload_every)?;
    Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(certs)))
}

/// Bind the webhook's address. `SO_REUSEPORT`: replicas on one machine
/// (the local environment's controllers) share it, and while one is gone
/// the others take its connections.
pub fn bind(serve: &Serve) -> Result<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)> {
    let tls = tls_config(serve)?;
    let socket = if serve.addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket
        .bind(serve.addr)
        .with_context(|| format!("binding the authorization webhook to {}", serve.addr))?;
    Ok((
        socket.listen(128)?,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    ))
}

/// Serve `POST /authorize` until shutdown.
pub async fn run(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(addr = ?listener.local_addr(), "serving the site agents' authorization webhook");
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "authorization webhook: accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => return,
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream = match tls.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "authorization webhook: TLS handshake");
                    return;
                }
            };
            let service = hyper::service::service_fn(handle);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "authorization webhook: connection");
            }
        });
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::POST || req.uri().path() != "/authorize" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            br#"{"error":"POST a SubjectAccessReview to /authorize"}"#.to_vec(),
        ));
    }
    // A review is a few hundred bytes; 1 MiB bounds a hostile one.
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                serde_json::to_vec(&serde_json::json!({"error": format!("reading the body: {e}")}))
                    .unwrap_or_default(),
            ));
        }
    };
    let review: SubjectAccessReview = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                serde_json::to_vec(
                    &serde_json::json!({"error": format!("not a SubjectAccessReview: {e}")}),
                )
                .unwrap_or_default(),
            ));
        }
    };
    let user = review.spec.user.clone().unwrap_or_default();
    // A question asked on purpose (`site join` checking the scope) is no
    // read of the agent's: logged at debug. The answer is the same.
    let probe = review
        .spec
        .extra
        .as_ref()
        .is_some_and(|e| e.contains_key(yukumo_api::SCOPE_PROBE));
    let answered = answer(review);
    if let Some(reason) = answered.status.as_ref().and_then(|s| s.reason.as_ref()) {
        let ra = answered.spec.resource_attributes.as_ref();
        let what = format!(
            "{} {} name={:?} namespace={:?} labels={:?} fields={:?}",
            ra.and_then(|r| r.verb.as_deref()).unwrap_or_default(),
            ra.and_then(|r| r.resource.as_deref()).unwrap_or_default(),
            ra.and_then(|r| r.name.as_deref()).unwrap_or_default(),
            ra.and_then(|r| r.namespace.as_deref()).unwrap_or_default(),
            ra.and_then(|r| r.label_selector.as_ref()),
            ra.and_then(|r| r.field_selector.as_ref()),
        );
        if probe {
            tracing::debug!(%user, request = %what, %reason, "scope probe answered: denied");
        } else {
            tracing::info!(%user, request = %what, %reason, "site agent read denied");
        }
    }
    let mut v = serde_json::to_value(&answered).unwrap_or_default();
    // The API server wants the kind and version back.
    v["apiVersion"] = "authorization.k8s.io/v1".into();
    v["kind"] = "SubjectAccessReview".into();
    Ok(reply(
        StatusCode::OK,
        serde_json::to_vec(&v).unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authorization::v1::{FieldSelectorAttributes, LabelSelectorAttributes};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        FieldSelectorRequirement, LabelSelectorRequirement,
    };

    const AGENT: &str = "system:serviceaccount:yukumo-site-b:h1";

    fn review(
        user: &str,
        verb: &str,
        resource: &str,
        name: Option<&str>,
    ) -> SubjectAccessReviewSpec {
        SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(vec!["system:serviceaccounts".into()]),
            resource_attributes: Some(ResourceAttributes {
                group: Some("yukumo.io".into()),
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_labels(
        mut s: SubjectAccessReviewSpec,
        reqs: &[(&str, &str, &[&str])],
    ) -> SubjectAccessReviewSpec {
        s.resource_attributes.as_mut().unwrap().label_selector = Some(LabelSelectorAttributes {
            requirements: Some(
                reqs.iter()
                    .map(|(k, op, v)| LabelSelectorRequirement {
                        key: k.to_string(),
                        operator: op.to_string(),
                        values: Some(v.iter().map(|s| s.to_string()).collect()),
                    })
                    .collect(),
            ),
            raw_selector: None,
        });
        s
    }

    fn with_fields(
        mut s: SubjectAccessReviewSpec,
        reqs: &[(&str, &str, &[&str])],
    ) -> SubjectAccessReviewSpec {
        s.resource_attributes.as_mut().unwrap().field_selector = Some(FieldSelectorAttributes {
            requirements: Some(
                reqs.iter()
                    .map(|(k, op, v)| FieldSelectorRequirement {
                        key: k.to_string(),
                        operator: op.to_string(),
                        values: Some(v.iter().map(|s| s.to_string()).collect()),
                    })
                    .collect(),
            ),
            raw_selector: None,
        });
        s
    }

    fn denied(s: &SubjectAccessReviewSpec) -> bool {
        matches!(decide(s), Decision::Deny(_))
    }

    #[test]
    fn the_agent_is_read_from_its_service_account() {
        assert_eq!(site_agent(AGENT), Some(("b", "h1")));
        assert_eq!(site_agent("system:serviceaccount:yukumo-site-b:"), None);
        assert_eq!(
            site_agent("system:serviceaccount:yukumo-system:yukumo-agent"),
            None
        );
        assert_eq!(site_agent("system:serviceaccount:yukumo-site-b:h1:x"), None);
        assert_eq!(site_agent("admin"), None);
    }

    #[test]
    fn others_and_other_kinds_and_writes_are_not_its_business() {
        for user in ["admin", "system:serviceaccount:yukumo-system:yukumo-agent"] {
            assert_eq!(
                decide(&review(user, "list", "virtualnodes", None)),
                Decision::NoOpinion
            );
        }
        let mut pods = review(AGENT, "list", "pods", None);
        pods.resource_attributes.as_mut().unwrap().group = Some(String::new());
        assert_eq!(decide(&pods), Decision::NoOpinion);
        assert_eq!(
            decide(&review(AGENT, "list", "networkgroups", None)),
            Decision::NoOpinion
        );
        assert_eq!(
            decide(&review(AGENT, "patch", "hosts", Some("h2"))),
            Decision::NoOpinion
        );
        let mut nonresource = review(AGENT, "get", "hosts", None);
        nonresource.resource_attributes = None;
        assert_eq!(decide(&nonresource), Decision::NoOpinion);
    }

    #[test]
    fn hosts_its_own_by_name_or_its_sites_by_label() {
        assert!(!denied(&review(AGENT, "get", "hosts", Some("h1"))));
        let mut status = review(AGENT, "get", "hosts", Some("h1"));
        status.resource_attributes.as_mut().unwrap().subresource = Some("status".into());
        assert!(!denied(&status));
        assert!(denied(&review(AGENT, "get", "hosts", Some("h2"))));
        assert!(denied(&review(AGENT, "list", "hosts", None)));
        assert!(denied(&review(AGENT, "watch", "hosts", None)));
        let own = with_fields(
            review(AGENT, "watch", "hosts", None),
            &[("metadata.name", "In", &["h1"])],
        );
        assert!(!denied(&own));
        let other = with_fields(
            review(AGENT, "watch", "hosts", None),
            &[("metadata.name", "In", &["h2"])],
        );
        assert!(denied(&other));
        let site = with_labels(
            review(AGENT, "list", "hosts", None),
            &[("yukumo.io/site", "In", &["b"])],
        );
        assert!(!denied(&site));
        for reqs in [
            &[("yukumo.io/site", "In", &["a"][..])][..],
            &[("yukumo.io/site", "In", &["b", "a"][..])],
            &[("yukumo.io/site", "NotIn", &["a"][..])],
            &[("yukumo.io/site", "Exists", &[][..])],
            &[("yukumo.io/site", "In", &[][..])],
        ] {
            let s = with_labels(review(AGENT, "list", "hosts", None), reqs);
            assert!(denied(&s), "{reqs:?}");
        }
        // Narrowed further: still only its Site's.
        let narrower = with_labels(
            review(AGENT, "list", "hosts", None),
            &[("yukumo.io/site", "In", &["b"]), ("x", "NotIn", &["y"])],
        );
        assert!(!denied(&narrower));
        match decide(&review(AGENT, "list", "hosts", None)) {
            Decision::Deny(m) => assert_eq!(
                m,
                "the site agent of Host h1 at Site b reads only its own Host by name, or its Site's Hosts by the label selector yukumo.io/site=b"
            ),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn virtual_nodes_and_volumes_only_its_own_by_label() {
        assert!(denied(&review(AGENT, "list", "virtualnodes", None)));
        assert!(denied(&review(AGENT, "get", "virtualnodes", Some("n"))));
        let own = with_labels(
            review(AGENT, "watch", "virtualnodes", None),
            &[("yukumo.io/host", "In", &["h1"])],
        );
        assert!(!denied(&own));
        // A name as well narrows it further (the console's read).
        let named = with_fields(own.clone(), &[("metadata.name", "In", &["n"])]);
        assert!(!denied(&named));
        let other = with_labels(
            review(AGENT, "watch", "virtualnodes", None),
            &[("yukumo.io/host", "In", &["h2"])],
        );
        assert!(denied(&other));
        let own = with_labels(
            review(AGENT, "list", "volumes", None),
            &[("yukumo.io/storage-host", "In", &["h1"])],
        );
        assert!(!denied(&own));
        assert!(denied(&review(AGENT, "list", "volumes", None)));
        assert!(denied(&review(AGENT, "get", "volumes", Some("v"))));
    }

    #[test]
    fn sites_only_its_own() {
        assert!(!denied(&review(AGENT, "get", "sites", Some("b"))));
        assert!(denied(&review(AGENT, "get", "sites", Some("a"))));
        assert!(denied(&review(AGENT, "list", "sites", None)));
        let own = with_fields(
            review(AGENT, "watch", "sites", None),
            &[("metadata.name", "In", &["b"])],
        );
        assert!(!denied(&own));
    }

    #[test]
    fn raw_selectors_are_read_when_no_requirements_came() {
        let mut s = review(AGENT, "list", "virtualnodes", None);
        s.resource_attributes.as_mut().unwrap().label_selector = Some(LabelSelectorAttributes {
            requirements: None,
            raw_selector: Some("yukumo.io/cluster=c, yukumo.io/host=h1".into()),
        });
        assert!(!denied(&s));
        for raw in [
            "yukumo.io/host!=h1",
            "yukumo.io/host=h2",
            "yukumo.io/host in (h1)",
        ] {
            s.resource_attributes
                .as_mut()
                .unwrap()
                .label_selector
                .as_mut()
                .unwrap()
                .raw_selector = Some(raw.into());
            assert!(denied(&s), "{raw}");
        }
    }

    #[test]
    fn the_answer_says_denied_or_nothing_and_never_allowed() {
        let a = answer(SubjectAccessReview {
            spec: review(AGENT, "list", "virtualnodes", None),
            ..Default::default()
        });
        let s = a.status.unwrap();
        assert!(!s.allowed);
        assert_eq!(s.denied, Some(true));
        assert!(s.reason.unwrap().contains("yukumo.io/host=h1"));
        let a = answer(SubjectAccessReview {
            spec: review(AGENT, "get", "hosts", Some("h1")),
            ..Default::default()
        });
        let s = a.status.unwrap();
        assert!(!s.allowed);
        assert_eq!(s.denied, None);
    }

    /// The served webhook: HTTPS, a review in, the answer out (as the API
    /// server sends and reads it); anything else is a clear 4xx.
    #[tokio::test]
    async fn the_webhook_answers_over_https() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("yukumo-authz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        let serve = Serve {
            addr: "127.0.0.1:0".parse().unwrap(),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            reload_every: std::time::Duration::ZERO,
        };
        // A key that is not one is refused at start, naming the file.
        std::fs::write(dir.join("bad.key"), "nothing").unwrap();
        let bad = Serve {
            key: dir.join("bad.key"),
            ..serve.clone()
        };
        let err = format!("{:#}", bind(&bad).err().expect("a bad key refused"));
        assert!(err.contains("bad.key"), "{err}");
        let (listener, tls) = bind(&serve).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(run(listener, tls, stopped));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let post = |path: &'static str, body: String| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let mut s = connector.connect(name, tcp).await.unwrap();
                let req = format!(
                    "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out).await;
                let (head, body) = out.split_once("\r\n\r\n").unwrap();
                (head.lines().next().unwrap().to_string(), body.to_string())
            }
        };
        let review = serde_json::json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": AGENT,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:yukumo-site-b"],
                "resourceAttributes": {
                    "group": "yukumo.io", "version": "v1alpha1", "resource": "virtualnodes",
                    "verb": "list",
                    "labelSelector": {"requirements": [
                        {"key": "yukumo.io/host", "operator": "In", "values": ["h2"]}
                    ]}
                }
            }
        });
        let (status, body) = post("/authorize", review.to_string()).await;
        assert!(status.contains("200"), "{status}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["kind"], "SubjectAccessReview");
        assert_eq!(v["apiVersion"], "authorization.k8s.io/v1");
        assert_eq!(v["status"]["allowed"], false);
        assert_eq!(v["status"]["denied"], true);
        let mut own = review.clone();
        own["spec"]["resourceAttributes"]["labelSelector"]["requirements"][0]["values"][0] =
            "h1".into();
        let (_, body) = post("/authorize", own.to_string()).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"]["allowed"], false);
        assert!(v["status"].get("denied").is_none(), "{v}");
        let (status, _) = post("/authorize", "{".to_string()).await;
        assert!(status.contains("400"), "{status}");
        let (status, _) = post("/elsewhere", review.to_string()).await;
        assert!(status.contains("404"), "{status}");

        // Rotated files are served from the next handshake on; a broken
        // rotation keeps the last good certificate.
        let handshake = |trusted: rustls::pki_types::CertificateDer<'static>| async move {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(trusted).unwrap();
            let client = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .is_ok()
        };
        let key2 = rcgen::KeyPair::generate().unwrap();
        let cert2 = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key2)
            .unwrap();
        assert!(!handshake(cert2.der().clone()).await, "not served yet");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("tls.key"), key2.serialize_pem()).unwrap();
        std::fs::write(dir.join("tls.crt"), cert2.pem()).unwrap();
        assert!(
            handshake(cert2.der().clone()).await,
            "the rotated certificate served"
        );
        assert!(
            !handshake(cert.der().clone()).await,
            "the old one no longer"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("tls.crt"), "not a certificate").unwrap();
        assert!(
            handshake(cert2.der().clone()).await,
            "a broken rotation keeps the last good one"
        );
        stop.send(true).unwrap();
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
