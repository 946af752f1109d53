//! Named network namespaces (`/run/netns/<name>`, as `ip netns` keeps
//! them), made, entered and removed in-process: no `ip` process is ever
//! spawned.
//!
//! A namespace is entered by a short-lived thread (`setns` changes only the
//! calling thread), so the agent's runtime threads never leave their own
//! namespace; a socket opened by such a thread stays in the namespace it was
//! opened in, which is how netlink sockets inside router namespaces are made.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Where named namespaces are bound.
pub const NETNS_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The inode of a named namespace (its identity: a namespace deleted and
/// made again under the same name has another).
pub fn inode(name: &str) -> Option<u64> {
    std::fs::metadata(path(name)).ok().map(|m| m.ino())
}

/// The inode of the network namespace process `pid` is in.
pub fn pid_inode(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Names of the namespaces that exist, sorted.
pub fn list() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return vec![];
    };
    let mut out: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Make `/run/netns` a shared mount (a bind mount of itself if it is no
/// mount point yet), so namespaces bound there are seen from every mount
/// namespace — what `ip netns add` does.
fn shared_dir() -> std::io::Result<()> {
    match std::fs::create_dir(NETNS_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let shared = || {
        nix::mount::mount(
            Some(""),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            nix::mount::mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            Ok(shared()?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Create the named namespace `name` (an error if it exists).
pub fn create(name: &str) -> std::io::Result<()> {
    shared_dir()?;
    let p = path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)?;
    let bound = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<()> {
            // This thread alone moves into a new namespace, binds it to
            // the name, and ends.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &p,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    });
    if bound.is_err() {
        let _ = std::fs::remove_file(&p);
    }
    bound
}

/// Remove the named namespace `name` (the namespace itself lives on while
/// a process or socket is still in it).
pub fn delete(name: &str) -> std::io::Result<()> {
    let p = path(name);
    match nix::mount::umount2(&p, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Run `f` (blocking) on a scoped thread that entered namespace `name`.
pub fn in_netns<T: Send>(
    name: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    in_netns_file(std::fs::File::open(path(name))?, f)
}

/// [`in_netns`] for a namespace already opened.
pub fn in_netns_file<T: Send>(
    file: std::fs::File,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|sc| {
        sc.spawn(|| {
            nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")))
    })
}

/// [`in_netns`] when `name` is given, else `f` on a thread of our own
/// namespace.
pub fn in_netns_opt<T: Send>(
    name: Option<&str>,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    match name {
        Some(n) => in_netns(n, f),
        None => std::thread::scope(|sc| {
            sc.spawn(f)
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
        }),
    }
}

/// Read (`value` None) or write a sysctl under /proc/sys of namespace
/// `name`, from a short-lived thread that enters it.
pub async fn sysctl(name: &str, key: &str, value: Option<&str>) -> std::io::Result<String> {
    let (name, key, value) = (name.to_string(), key.to_string(), value.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        in_netns(&name, || {
            let path = format!("/proc/sys/{key}");
            match &value {
                Some(v) => std::fs::write(&path, v).map(|_| v.clone()),
                None => std::fs::read_to_string(&path),
            }
        })
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Run `prog` inside namespace `name` (or ours) and wait for it: spawned
/// from a thread that entered the namespace, so the child is born there
/// (one exec, no `nsenter`). Fails with the program's stderr.
pub fn run(
    name: Option<&str>,
    prog: &str,
    args: &[String],
    stdin: Option<&[u8]>,
) -> std::io::Result<String> {
    let out = in_netns_opt(name, || {
        let mut child = std::process::Command::new(prog)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(input) = stdin {
            use std::io::Write;
            let mut si = child.stdin.take().expect("piped stdin");
            si.write_all(input)?;
        }
        child.wait_with_output()
    })?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace made and removed in-process, as `ip netns` sees it.
    /// Skipped, saying so, without root.
    #[test]
    fn namespaces_are_made_entered_and_removed_without_ip() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("yknstest{}", std::process::id());
        create(&name).unwrap();
        assert!(create(&name).is_err(), "made twice");
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let theirs = inode(&name).unwrap();
        assert_ne!(ours, theirs);
        let inside = in_netns(&name, || {
            Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
        })
        .unwrap();
        assert_eq!(inside, theirs);
        assert!(list().contains(&name));
        // Only loopback in a new namespace.
        let links = in_netns(&name, || Ok(std::fs::read_dir("/sys/class/net")?.count()));
        assert!(links.is_ok());
        delete(&name).unwrap();
        assert_eq!(inode(&name), None);
        delete(&name).unwrap();
    }
}
