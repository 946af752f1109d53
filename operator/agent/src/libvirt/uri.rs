//! Which socket a libvirt URI names, and the URI the daemon is asked to
//! open (transport and socket parameters removed, as libvirt's own remote
//! driver does).

use super::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The daemon's unix socket.
    pub socket: String,
    /// What `CONNECT_OPEN` asks the daemon for, e.g. `qemu:///system`.
    pub name: String,
}

/// Query parameters that belong to the client's transport, not the driver.
const TRANSPORT_PARAMS: &[&str] = &[
    "socket",
    "mode",
    "name",
    "command",
    "netcat",
    "no_verify",
    "no_tty",
    "pkipath",
    "keyfile",
    "sshauth",
    "known_hosts",
    "known_hosts_verify",
    "proxy",
    "tls_priority",
];

pub fn parse(uri: &str) -> Result<Target, Error> {
    let bad = |why: &str| Error::new(-1, format!("libvirt URI {uri:?}: {why}"));
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| bad("expected DRIVER[+unix]://[/PATH][?socket=SOCKET]"))?;
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if driver.is_empty() {
        return Err(bad("no driver"));
    }
    let (authority_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (host, path) = match authority_path.find('/') {
        Some(i) => (&authority_path[..i], &authority_path[i..]),
        None => (authority_path, ""),
    };
    match transport {
        None | Some("unix") => {}
        Some(t) => {
            return Err(bad(&format!(
                "the {t} transport is not supported; the agent talks to the local daemon's unix socket"
            )));
        }
    }
    if !host.is_empty() {
        return Err(bad(
            "a remote host is not supported; the agent talks to the local daemon's unix socket",
        ));
    }
    let mut socket = None;
    let mut name = None;
    let mut kept = Vec::new();
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "socket" => socket = Some(v.to_string()),
            "name" => name = Some(v.to_string()),
            _ if TRANSPORT_PARAMS.contains(&k) => {}
            _ => kept.push(kv),
        }
    }
    let name = name.unwrap_or_else(|| {
        let mut n = format!("{driver}://{path}");
        if !kept.is_empty() {
            n.push('?');
            n.push_str(&kept.join("&"));
        }
        n
    });
    let socket = match socket {
        Some(s) => s,
        None => default_socket(driver, path).ok_or_else(|| {
            bad(&format!(
                "no daemon socket is known for it; name one: {driver}+unix://{path}?socket=PATH"
            ))
        })?,
    };
    Ok(Target { socket, name })
}

/// The socket of the system or session daemon: libvirtd's, or the modular
/// driver daemon's when libvirtd's does not exist.
fn default_socket(driver: &str, path: &str) -> Option<String> {
    let dir = match path {
        "/system" => "/run/libvirt".to_string(),
        "/session" => format!("{}/libvirt", std::env::var("XDG_RUNTIME_DIR").ok()?),
        _ => return None,
    };
    if driver == "test" {
        return None;
    }
    let monolithic = format!("{dir}/libvirt-sock");
    let modular = format!("{dir}/virt{driver}d-sock");
    Some(
        if std::path::Path::new(&monolithic).exists() || !std::path::Path::new(&modular).exists() {
            monolithic
        } else {
            modular
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(uri: &str) -> (String, String) {
        let t = parse(uri).unwrap();
        (t.socket, t.name)
    }

    #[test]
    fn sockets_and_names() {
        assert_eq!(
            t("qemu:///system?socket=/h/run/libvirt-sock"),
            ("/h/run/libvirt-sock".into(), "qemu:///system".into())
        );
        assert_eq!(
            t("test+unix:///default?socket=/s"),
            ("/s".into(), "test:///default".into())
        );
        assert_eq!(
            t("test+unix:///tmp/a.xml?socket=/s&mode=direct"),
            ("/s".into(), "test:///tmp/a.xml".into())
        );
        assert_eq!(t("qemu:///system").1, "qemu:///system");
        assert!(t("qemu:///system").0.starts_with("/run/libvirt/"));
    }

    #[test]
    fn what_cannot_be_reached_is_refused_naming_why() {
        let e = parse("test:///default").unwrap_err().to_string();
        assert!(e.contains("socket=PATH"), "{e}");
        let e = parse("qemu+ssh://h/system").unwrap_err().to_string();
        assert!(e.contains("ssh transport"), "{e}");
        let e = parse("qemu://h/system").unwrap_err().to_string();
        assert!(e.contains("remote host"), "{e}");
        assert!(parse("nonsense").is_err());
    }
}
