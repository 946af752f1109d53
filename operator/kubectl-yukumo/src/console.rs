//! `console NODE`: the node's serial console through its host agent's
//! console endpoint (`VirtualNode.status.console`), as the user.
//!
//! The endpoint's certificate is checked against the CA the node's status
//! names (read through the API server); the user's bearer token goes with
//! the request and the agent has the API server check it and the user's
//! right to `get` `virtualnodes/console`. With a terminal on stdin it is put
//! in raw mode and `Ctrl-]` ends the session; otherwise stdin is sent as it
//! comes and, at its end, output is read for one more second. The endpoint
//! is reached the way the API server is: through the kubeconfig's
//! `proxy-url` or `HTTPS_PROXY` (a CONNECT tunnel) unless `NO_PROXY` names
//! its host (proxy.rs).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use kube::Api;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yukumo_api::VirtualNode;
use yukumo_api::virtualnode::ConsoleEndpoint;

/// The byte that ends an interactive session (`Ctrl-]`, as telnet's).
const ESCAPE: u8 = 0x1d;

/// The user's bearer token from the kubeconfig (a token or a token file).
fn bearer(config: &kube::Config) -> Result<String> {
    use secrecy::ExposeSecret;
    let a = &config.auth_info;
    if let Some(t) = &a.token {
        return Ok(t.expose_secret().to_string());
    }
    if let Some(f) = &a.token_file {
        return std::fs::read_to_string(f)
            .map(|t| t.trim().to_string())
            .with_context(|| format!("reading the kubeconfig's token file {f}"));
    }
    bail!(
        "console needs a bearer token in the kubeconfig (a ServiceAccount or OIDC token): the agent has the API server check it; client certificates and exec plugins cannot be passed on"
    )
}

pub async fn run(
    client: kube::Client,
    config: &kube::Config,
    proxies: &crate::proxy::Proxies,
    ns: &str,
    node: &str,
) -> Result<()> {
    let vn = Api::<VirtualNode>::namespaced(client, ns)
        .get_opt(node)
        .await
        .with_context(|| format!("reading virtualnode {ns}/{node}"))?
        .with_context(|| format!("virtualnode {ns}/{node} not found"))?;
    let status = vn.status.unwrap_or_default();
    let Some(endpoint) = status.console else {
        bail!(
            "virtualnode {ns}/{node} has no console endpoint: it is {:?}{}",
            status.phase,
            match &vn.spec.host {
                Some(h) => format!(
                    " on host {h} (a running node's agent publishes it when it serves consoles)"
                ),
                None => " and not placed".to_string(),
            }
        );
    };
    let token = bearer(config)?;
    let (host, port) = ConsoleEndpoint::host_port(&endpoint.url)
        .map_err(|e| anyhow::anyhow!("virtualnode {ns}/{node}'s console URL {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(endpoint.ca_certificate.as_bytes()) {
        roots
            .add(c.context("the node's console CA")?)
            .context("the node's console CA")?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let proxy = proxies.for_host(&host);
    let tcp = crate::proxy::connect(proxy.as_ref(), &host, port)
        .await
        .with_context(|| format!("console endpoint {}", endpoint.url))?;
    let name = ServerName::try_from(host.clone())
        .with_context(|| format!("console URL {:?}", endpoint.url))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {}", endpoint.url))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::get(format!("/v1/console/{ns}/{node}"))
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, "yukumo-console")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await.context("console request")?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        bail!(
            "console of {ns}/{node} refused ({status}): {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let up = hyper::upgrade::on(resp).await.context("console upgrade")?;
    session(TokioIo::new(up)).await
}

/// Copy between the terminal (or stdin/stdout) and the console.
async fn session<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(io: S) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty {
        eprintln!("(console: Ctrl-] to leave)\r");
        Some(RawMode::enter()?)
    } else {
        None
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut stdout = tokio::io::stdout();
    let output = async {
        let mut buf = vec![0u8; 8192];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            stdout.write_all(&buf[..n]).await?;
            stdout.flush().await?;
        }
    };
    let input = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                // Piped input ended: what it asked for may still come.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok::<_, std::io::Error>(());
            }
            let chunk = &buf[..n];
            if tty && let Some(at) = chunk.iter().position(|b| *b == ESCAPE) {
                wr.write_all(&chunk[..at]).await?;
                return Ok(());
            }
            wr.write_all(chunk).await?;
            wr.flush().await?;
        }
    };
    tokio::select! {
        r = output => r.context("console output")?,
        r = input => r.context("console input")?,
    }
    if tty {
        eprintln!("\r\n(console closed)\r");
    }
    Ok(())
}

/// The terminal in raw mode until dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Result<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let old = tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut raw = old.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).context("raw terminal")?;
        Ok(RawMode(old))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}
