//! The way to the API server and to a console endpoint: directly, or
//! through an HTTP proxy as a `CONNECT` tunnel — the kubeconfig cluster's
//! `proxy-url` for every host, else `HTTPS_PROXY`/`https_proxy` for hosts
//! `NO_PROXY`/`no_proxy` does not name: `*`, a host name (also matching its
//! subdomains; a leading dot is ignored), an IP address (IPv6 with or
//! without brackets) or a CIDR block ([`Proxies`]).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest proxy answer head read before giving up.
const MAX_HEAD: usize = 16 * 1024;

/// Whether `no_proxy` (comma separated) says `host` is reached directly.
pub fn bypass(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = host.parse::<IpAddr>().ok();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            if let (Some(ip), Some((net, bits))) = (ip, entry.split_once('/')) {
                return in_cidr(ip, net, bits);
            }
            // An entry with a port applies to the host whatever the port;
            // an IPv6 address may be in brackets (`[::1]`, `[fd00::1]:6443`).
            let name = match entry.rsplit_once(':') {
                Some((h, p))
                    if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) =>
                {
                    h
                }
                _ => entry,
            };
            let name = name.trim_start_matches('[').trim_end_matches(']');
            let name = name.trim_start_matches('.');
            if let (Some(ip), Ok(e)) = (ip, name.parse::<IpAddr>()) {
                return ip == e;
            }
            let host = host.to_ascii_lowercase();
            let name = name.to_ascii_lowercase();
            host == name || host.ends_with(&format!(".{name}"))
        })
}

fn in_cidr(ip: IpAddr, net: &str, bits: &str) -> bool {
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The `proxy-url` of the current context's cluster in `kc`, if any.
fn kubeconfig_proxy(kc: &kube::config::Kubeconfig) -> Option<String> {
    let ctx = kc.current_context.as_deref()?;
    let cluster = &kc
        .contexts
        .iter()
        .find(|c| c.name == ctx)?
        .context
        .as_ref()?
        .cluster;
    kc.clusters
        .iter()
        .find(|c| &c.name == cluster)?
        .cluster
        .as_ref()?
        .proxy_url
        .clone()
        .filter(|u| !u.is_empty())
}

fn env_var(keys: [&str; 2]) -> Option<String> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

fn parse(u: String) -> Result<hyper::Uri> {
    u.parse::<hyper::Uri>()
        .with_context(|| format!("proxy URL {u:?}"))
}

/// The proxies the configuration names, chosen per host as kubectl does.
///
/// kube-rs matches `NO_PROXY` against the proxy's own address, not the
/// host reached: a usual `NO_PROXY=localhost,127.0.0.1` dropped a proxy on
/// 127.0.0.1 altogether (and with it the console's way to the hosts), and a
/// `NO_PROXY` naming the API server was not honoured. So the plugin
/// chooses: the kubeconfig context's `proxy-url` is taken for everything
/// (as client-go does: the cluster is reached through it), `HTTPS_PROXY`
/// for any host `NO_PROXY` does not name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Proxies {
    /// The current context's cluster `proxy-url`.
    pub kubeconfig: Option<hyper::Uri>,
    /// `HTTPS_PROXY`/`https_proxy`.
    pub env: Option<hyper::Uri>,
    /// `NO_PROXY`/`no_proxy`.
    pub no_proxy: String,
}

impl Proxies {
    /// From the kubeconfig the configuration was loaded from (`None`:
    /// in-cluster, where no proxy is taken) and the environment.
    pub fn new(kc: Option<&kube::config::Kubeconfig>) -> Result<Proxies> {
        let Some(kc) = kc else {
            return Ok(Proxies::default());
        };
        Ok(Proxies {
            kubeconfig: kubeconfig_proxy(kc).map(parse).transpose()?,
            env: env_var(["HTTPS_PROXY", "https_proxy"])
                .map(parse)
                .transpose()?,
            no_proxy: env_var(["NO_PROXY", "no_proxy"]).unwrap_or_default(),
        })
    }

    /// The proxy for `host`, if any.
    pub fn for_host(&self, host: &str) -> Option<hyper::Uri> {
        self.kubeconfig
            .clone()
            .or_else(|| self.env.clone().filter(|_| !bypass(&self.no_proxy, host)))
    }
}

/// A TCP stream to `host:port`, through `proxy` when given.
pub async fn connect(proxy: Option<&hyper::Uri>, host: &str, port: u16) -> Result<TcpStream> {
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let Some(proxy) = proxy else {
        return timeout(TcpStream::connect((host, port)), &target).await;
    };
    if proxy.scheme_str() != Some("http") {
        bail!(
            "proxy {proxy}: only an http:// proxy can carry the console (a CONNECT tunnel); set NO_PROXY to reach {host} directly"
        );
    }
    let authority = proxy
        .authority()
        .with_context(|| format!("proxy {proxy} names no host"))?;
    let addr = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let mut tcp = timeout(TcpStream::connect(addr.as_str()), &format!("proxy {addr}")).await?;
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((userinfo, _)) = authority.as_str().rsplit_once('@') {
        use base64::Engine;
        let creds = base64::engine::general_purpose::STANDARD.encode(userinfo);
        head.push_str(&format!("Proxy-Authorization: Basic {creds}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes())
        .await
        .with_context(|| format!("writing to proxy {addr}"))?;
    // The answer's head, read byte by byte: nothing after it may be taken
    // from the tunnel (the TLS handshake follows).
    let mut answer = Vec::new();
    let read = async {
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= MAX_HEAD {
                bail!("proxy {addr} answered with a head over {MAX_HEAD} bytes");
            }
            let b = tcp.read_u8().await.with_context(|| {
                format!("proxy {addr} closed before answering CONNECT {target}")
            })?;
            answer.push(b);
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .with_context(|| format!("proxy {addr}: no answer to CONNECT {target} in 10 s"))??;
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') || code.len() != 3 {
        bail!("proxy {addr} refused CONNECT {target}: {status}");
    }
    Ok(tcp)
}

async fn timeout(
    f: impl Future<Output = std::io::Result<TcpStream>>,
    what: &str,
) -> Result<TcpStream> {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .with_context(|| format!("connecting to {what}: timed out"))?
        .with_context(|| format!("connecting to {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    #[test]
    fn the_current_contexts_cluster_names_the_proxy() {
        let kc = kube::config::Kubeconfig::from_yaml(
            "apiVersion: v1
kind: Config
current-context: b
clusters:
- name: one
  cluster: {server: 'https://127.0.0.1:6443', proxy-url: 'http://127.0.0.1:3128'}
- name: two
  cluster: {server: 'https://10.0.0.1:6443'}
contexts:
- name: a
  context: {cluster: one, user: u}
- name: b
  context: {cluster: two, user: u}
users:
- name: u
  user: {token: t}
",
        )
        .unwrap();
        assert_eq!(kubeconfig_proxy(&kc), None);
        let kc = kube::config::Kubeconfig {
            current_context: Some("a".into()),
            ..kc
        };
        assert_eq!(
            kubeconfig_proxy(&kc).as_deref(),
            Some("http://127.0.0.1:3128")
        );
    }

    #[test]
    fn the_kubeconfigs_proxy_serves_every_host_the_environments_not_those_no_proxy_names() {
        let uri = |u: &str| Some(u.parse::<hyper::Uri>().unwrap());
        let p = Proxies {
            kubeconfig: None,
            env: uri("http://proxy:3128"),
            no_proxy: "localhost,127.0.0.1".into(),
        };
        assert_eq!(p.for_host("127.0.0.1"), None);
        assert_eq!(p.for_host("10.255.0.2"), uri("http://proxy:3128"));
        let p = Proxies {
            kubeconfig: uri("http://127.0.0.1:8888"),
            ..p
        };
        assert_eq!(p.for_host("127.0.0.1"), uri("http://127.0.0.1:8888"));
        assert_eq!(p.for_host("10.255.0.2"), uri("http://127.0.0.1:8888"));
        assert_eq!(Proxies::default().for_host("10.255.0.2"), None);
    }

    #[test]
    fn no_proxy_entries() {
        let np = "localhost, .svc.cluster.local,example.com:8443,10.255.0.0/24,192.0.2.7,::1";
        for (host, direct) in [
            ("localhost", true),
            ("api.svc.cluster.local", true),
            ("svc.cluster.local", true),
            ("example.com", true),
            ("www.EXAMPLE.com", true),
            ("notexample.com", false),
            ("10.255.0.3", true),
            ("10.255.1.3", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("::1", true),
            ("[::1]", true),
            ("203.0.113.1", false),
        ] {
            assert_eq!(bypass(np, host), direct, "{host} with NO_PROXY={np}");
        }
        assert!(bypass("[::1]", "[::1]"));
        assert!(bypass("[fd00::1]:6443", "fd00::1"));
        assert!(!bypass("[fd00::1]:6443", "fd00::2"));
        assert!(bypass("*", "anything"));
        assert!(!bypass("", "10.255.0.3"));
        assert!(!bypass("10.0.0.0/99,bad/x", "10.0.0.1"));
        assert!(bypass("0.0.0.0/0", "10.0.0.1"));
    }

    /// A CONNECT proxy for one connection: answers `status`, then (on 200)
    /// echoes what comes through the tunnel. Returns its URL and the head it got.
    async fn proxy(status: &'static str) -> (hyper::Uri, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://user:pw@{}", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut s = s.into_inner();
            // The answer and the first tunnelled bytes in one write: the
            // client must not swallow what follows the head.
            let mut out = format!("HTTP/1.1 {status}\r\nX-Pad: y\r\n\r\n").into_bytes();
            if status.starts_with("200") {
                out.extend_from_slice(b"hello");
                s.write_all(&out).await.unwrap();
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
            } else {
                s.write_all(&out).await.unwrap();
            }
            head
        });
        (url.parse().unwrap(), task)
    }

    #[tokio::test]
    async fn connect_tunnels_through_the_proxy() {
        let (url, task) = proxy("200 Connection established").await;
        let mut s = connect(Some(&url), "10.255.0.1", 9443).await.unwrap();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(
            &hello, b"hello",
            "bytes after the proxy's head reach the caller"
        );
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        let head = task.await.unwrap();
        assert!(
            head.starts_with("CONNECT 10.255.0.1:9443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("Host: 10.255.0.1:9443\r\n"), "{head}");
        // user:pw
        assert!(
            head.contains("Proxy-Authorization: Basic dXNlcjpwdw==\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_refusal_names_the_proxy_and_its_answer() {
        let (url, task) = proxy("403 Forbidden").await;
        let err = connect(Some(&url), "192.0.2.1", 9443).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("refused CONNECT 192.0.2.1:9443: HTTP/1.1 403 Forbidden"),
            "{msg}"
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn only_http_proxies() {
        let url: hyper::Uri = "socks5://127.0.0.1:1080".parse().unwrap();
        let err = connect(Some(&url), "10.255.0.1", 9443).await.unwrap_err();
        assert!(format!("{err}").contains("only an http:// proxy"), "{err}");
    }

    #[tokio::test]
    async fn direct_without_a_proxy() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accept = tokio::spawn(async move { l.accept().await.unwrap() });
        connect(None, "127.0.0.1", port).await.unwrap();
        accept.await.unwrap();
    }
}
