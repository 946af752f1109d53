//! The guests' serial consoles, served to their users over TLS.
//!
//! `GET /v1/console/<namespace>/<node>` with `Authorization: Bearer <token>`
//! and `Upgrade: yukumo-console`: the token is checked by the API server
//! (TokenReview), then the caller — not the agent — must be allowed `get`
//! on `virtualnodes/console` of that node (SubjectAccessReview, with the
//! caller's user, groups, uid and extra), and the node must be placed on
//! this host. Then the connection is switched (101) to raw bytes both ways
//! with the guest's first serial port (ttyS0, whose output is also kept in
//! the node's `console.log`). A refusal is an HTTP status with a one-line
//! reason: 401 (no or bad token), 403 (not allowed), 404 (no such node
//! here), 409 (not running, its console is a log only, or another session
//! holds it: QEMU serves one client per serial port, so a second would
//! wait unseen — it is told who holds it instead).
//!
//! The certificate is made when the agent starts (a CA of its own and a
//! leaf for the host in `--console-url`); the CA's PEM is published in
//! `Host.status.console`, so clients trust it through the API server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use yukumo_api::VirtualNode;
use yukumo_api::virtualnode::ConsoleEndpoint;

use crate::compute::domain::NodePaths;

/// The protocol named in `Upgrade`.
pub const PROTOCOL: &str = "yukumo-console";

/// A console endpoint, its certificate made.
pub struct Console {
    pub endpoint: ConsoleEndpoint,
    tls: tokio_rustls::TlsAcceptor,
    listener: std::net::TcpListener,
}

/// The CA's key, kept in `<state>/console/ca.key` (0600), so the CA — and
/// the nodes' statuses that name it — stay the same across restarts: with
/// Ed25519 (deterministic signatures) and fixed fields, the same key gives
/// the same certificate.
fn ca_key(state_dir: &std::path::Path) -> Result<rcgen::KeyPair> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = state_dir.join("console");
    let path = dir.join("ca.key");
    match std::fs::read_to_string(&path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem)
            .with_context(|| format!("{}: not a key in PEM", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let key =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("console CA key")?;
            let tmp = dir.join("ca.key.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Bind `addr` and make the endpoint's certificate for `url`'s host, signed
/// by the host's console CA.
pub fn prepare(addr: SocketAddr, url: &str, state_dir: &std::path::Path) -> Result<Console> {
    let (host, _) =
        ConsoleEndpoint::host_port(url).map_err(|e| anyhow::anyhow!("--console-url {e}"))?;
    let host = host.as_str();
    let ca_key = ca_key(state_dir)?;
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "yukumo agent console CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key).context("console CA certificate")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("console key")?;
    let mut leaf =
        rcgen::CertificateParams::new(vec![host.to_string()]).context("console certificate")?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, host.to_string());
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf
        .signed_by(&key, &ca_cert, &ca_key)
        .context("console certificate")?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .context("console TLS configuration")?;
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--console-addr {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(Console {
        endpoint: ConsoleEndpoint {
            url: url.trim_end_matches('/').to_string(),
            ca_certificate: ca_cert.pem(),
        },
        tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        listener,
    })
}

/// What a request needs besides itself.
#[derive(Clone)]
struct Ctx {
    client: Client,
    host: String,
    state_dir: PathBuf,
    sessions: Sessions,
}

/// The open console sessions, by node (`ns/name`): who holds each, since
/// when. One per node.
#[derive(Clone, Default)]
struct Sessions(
    Arc<std::sync::Mutex<std::collections::HashMap<String, (String, std::time::Instant)>>>,
);

/// A held session; dropping it frees the node's console.
struct Session {
    sessions: Sessions,
    node: String,
}

impl Sessions {
    /// Take `node`'s console for `user`, or say who holds it.
    fn claim(&self, node: &str, user: &str) -> Result<Session, String> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((holder, since)) = m.get(node) {
            return Err(format!(
                "node {node}: its console is in use by {holder} (for {}s); one session at a time — it ends when they leave (Ctrl-])",
                since.elapsed().as_secs()
            ));
        }
        m.insert(
            node.to_string(),
            (user.to_string(), std::time::Instant::now()),
        );
        Ok(Session {
            sessions: self.clone(),
            node: node.to_string(),
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut m = self.sessions.0.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&self.node);
    }
}

/// Serve until `shutdown` flips to true.
pub async fn serve(
    console: Console,
    client: Client,
    host: String,
    state_dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(console.listener)?;
    tracing::info!(addr = ?listener.local_addr(), url = %console.endpoint.url, "serving guests' consoles");
    let ctx = Ctx {
        client,
        host,
        state_dir,
        sessions: Sessions::default(),
    };
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "console: accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => return Ok(()),
        };
        let (tls, ctx) = (console.tls.clone(), ctx.clone());
        tokio::spawn(async move {
            let stream = match tls.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "console: TLS handshake");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |req| handle(ctx.clone(), peer, req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "console: connection");
            }
        });
    }
}

fn reply(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg + "\n")));
    *r.status_mut() = status;
    r
}

async fn handle(
    ctx: Ctx,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    Ok(match authorize(&ctx, &req).await {
        Err((status, msg)) => {
            tracing::info!(%peer, path = %req.uri().path(), %status, reason = %msg, "console refused");
            reply(status, msg)
        }
        Ok((user, node, socket)) => {
            let session = match ctx.sessions.claim(&node, &user) {
                Ok(s) => s,
                Err(msg) => {
                    tracing::info!(%peer, %user, %node, reason = %msg, "console refused");
                    return Ok(reply(StatusCode::CONFLICT, msg));
                }
            };
            let guest = match tokio::net::UnixStream::connect(&socket).await {
                Ok(g) => g,
                Err(e) => {
                    return Ok(reply(
                        StatusCode::CONFLICT,
                        format!(
                            "node {node}: its console is not open ({e}); a node defined before interactive consoles gets one at its next start"
                        ),
                    ));
                }
            };
            tracing::info!(%peer, %user, %node, "console opened");
            let mut req = req;
            tokio::spawn(async move {
                let _session = session;
                match hyper::upgrade::on(&mut req).await {
                    Ok(up) => {
                        let mut up = TokioIo::new(up);
                        let mut guest = guest;
                        let r = tokio::io::copy_bidirectional(&mut up, &mut guest).await;
                        tracing::info!(%peer, %user, %node, result = ?r, "console closed");
                    }
                    Err(e) => tracing::info!(%peer, error = %e, "console: upgrade"),
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert(
                hyper::header::UPGRADE,
                hyper::header::HeaderValue::from_static(PROTOCOL),
            );
            r.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("Upgrade"),
            );
            r
        }
    })
}

/// `/v1/console/<namespace>/<node>` → (namespace, node).
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v1/console/")?;
    let (ns, name) = rest.split_once('/')?;
    let ok = |s: &str| yukumo_api::is_dns_label(s) || is_dns_subdomain(s);
    (yukumo_api::is_dns_label(ns) && ok(name)).then_some((ns, name))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(yukumo_api::is_dns_label)
}

type Refusal = (StatusCode, String);

/// Who asks for which node's console, and its socket; or why not.
async fn authorize(
    ctx: &Ctx,
    req: &Request<Incoming>,
) -> Result<(String, String, PathBuf), Refusal> {
    let (ns, name) = parse_path(req.uri().path()).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            "the path is /v1/console/<namespace>/<node>".to_string(),
        )
    })?;
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(PROTOCOL) {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            format!("Upgrade: {PROTOCOL} is required"),
        ));
    }
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            (
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (Authorization: Bearer …)".to_string(),
            )
        })?;
    let internal = |what: &str, e: kube::Error| {
        tracing::warn!(error = %e, "console: {what}");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent cannot reach the API server for {what}"),
        )
    };
    let review = Api::<TokenReview>::all(ctx.client.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: None,
                },
                ..Default::default()
            },
        )
        .await
        .map_err(|e| internal("the token review", e))?;
    let status = review.status.unwrap_or_default();
    let user = match (status.authenticated, status.user) {
        (Some(true), Some(u)) => u,
        _ => {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!(
                    "the token is not valid{}",
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ));
        }
    };
    let username = user.username.clone().unwrap_or_default();
    let access = Api::<SubjectAccessReview>::all(ctx.client.clone())
        .create(
            &PostParams::default(),
            &SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: user.username.clone(),
                    uid: user.uid.clone(),
                    groups: user.groups.clone(),
                    extra: user.extra.clone(),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some("yukumo.io".into()),
                        resource: Some("virtualnodes".into()),
                        subresource: Some("console".into()),
                        verb: Some("get".into()),
                        namespace: Some(ns.into()),
                        name: Some(name.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .map_err(|e| internal("the access review", e))?;
    if !access.status.as_ref().is_some_and(|s| s.allowed) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "{username:?} may not get virtualnodes/console of {ns}/{name}{}",
                access
                    .status
                    .and_then(|s| s.reason)
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        ));
    }
    // Read as this host's (a site agent may read no other node): one on
    // another host is not found here.
    let on_host = format!("{}={}", yukumo_api::labels::HOST, ctx.host);
    let vn = crate::scoped::get(
        &Api::<VirtualNode>::namespaced(ctx.client.clone(), ns),
        name,
        &on_host,
    )
    .await
    .map_err(|e| internal("reading the node", e))?
    .ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("no VirtualNode {ns}/{name} on host {}", ctx.host),
        )
    })?;
    if vn.spec.host.as_deref() != Some(ctx.host.as_str()) {
        return Err((
            StatusCode::NOT_FOUND,
            format!(
                "VirtualNode {ns}/{name} is not on host {} (it is on {})",
                ctx.host,
                vn.spec.host.as_deref().unwrap_or("no host")
            ),
        ));
    }
    if !vn.spec.running {
        return Err((
            StatusCode::CONFLICT,
            format!("VirtualNode {ns}/{name} is stopped"),
        ));
    }
    let uid = vn.uid().unwrap_or_default();
    let paths = NodePaths::new(&ctx.state_dir, &uid);
    Ok((username, format!("{ns}/{name}"), paths.console_socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_per_node_freed_when_it_ends() {
        let s = Sessions::default();
        let first = s.claim("t/n1", "alice").unwrap();
        let e = s.claim("t/n1", "bob").err().unwrap();
        assert!(
            e.starts_with("node t/n1: its console is in use by alice (for 0s)"),
            "{e}"
        );
        // Another node's console is free.
        let other = s.claim("t/n2", "bob").unwrap();
        drop(first);
        let again = s.claim("t/n1", "bob").unwrap();
        drop((other, again));
        assert!(s.0.lock().unwrap().is_empty());
    }

    #[test]
    fn paths_name_a_namespace_and_a_node() {
        assert_eq!(
            parse_path("/v1/console/demo/qs-worker-1"),
            Some(("demo", "qs-worker-1"))
        );
        assert_eq!(parse_path("/v1/console/demo/a.b"), Some(("demo", "a.b")));
        assert_eq!(parse_path("/v1/console/demo"), None);
        assert_eq!(parse_path("/v1/console/demo/x/y"), None);
        assert_eq!(parse_path("/v1/console/De/x"), None);
        assert_eq!(parse_path("/v1/console/../x"), None);
        assert_eq!(parse_path("/metrics"), None);
    }

    #[test]
    fn the_ca_survives_a_restart_and_a_bad_url_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let any = "127.0.0.1:0".parse().unwrap();
        let c = prepare(any, "https://192.0.2.7:9443/", dir.path()).unwrap();
        assert_eq!(c.endpoint.url, "https://192.0.2.7:9443");
        assert!(
            c.endpoint
                .ca_certificate
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        let again = prepare(any, "https://192.0.2.7:9443", dir.path()).unwrap();
        assert_eq!(again.endpoint.ca_certificate, c.endpoint.ca_certificate);
        let other = tempfile::tempdir().unwrap();
        let fresh = prepare(any, "https://192.0.2.7:9443", other.path()).unwrap();
        assert_ne!(fresh.endpoint.ca_certificate, c.endpoint.ca_certificate);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("console/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = prepare(any, "http://x", dir.path())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, "--console-url \"http://x\": not https://HOST[:PORT]");
    }
}
