//! A router's DHCP server: dnsmasq started inside the router's
//! namespace, its leases in a hosts file it rereads on SIGHUP, its pid and
//! arguments under `<state>/net/<router>/` (so a restarted agent finds the
//! server it started, and one left in a namespace deleted by hand).

use std::path::{Path, PathBuf};

use super::{KernelError, RealKernel, Result};
use crate::netns;
use crate::network::decide::DhcpSeen;
use crate::network::kernel::Dhcp;
use crate::network::ops::DhcpOp;

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A dnsmasq we started: its command line names our pid file.
fn is_our_dnsmasq(pid: i32, pid_file: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("dnsmasq") && c.contains(&*pid_file.to_string_lossy())
        })
        .unwrap_or(false)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            st.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub(super) fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

async fn stop_pid(pid: i32) {
    use nix::sys::signal::Signal;
    signal(pid, Signal::SIGTERM);
    for _ in 0..50 {
        // Gone, or a zombie (dnsmasq daemonizes: it is not our child, and
        // whoever reaps it may be slow).
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() || is_zombie(pid)
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    signal(pid, Signal::SIGKILL);
}

impl RealKernel {
    fn pid_file(&self, router: &str) -> PathBuf {
        self.router_dir(router).join("dnsmasq.pid")
    }

    /// The pid of our dnsmasq for `router`, wherever it runs.
    fn dnsmasq_pid(&self, router: &str) -> Option<i32> {
        let pf = self.pid_file(router);
        read_pid(&pf).filter(|p| is_our_dnsmasq(*p, &pf))
    }
}

impl Dhcp for RealKernel {
    fn args(&self, router: &str, plan_args: &[String]) -> Vec<String> {
        let dir = self.router_dir(router);
        let mut args: Vec<String> = vec![
            "--conf-file=/dev/null".into(),
            "--user=root".into(),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            format!("--dhcp-leasefile={}", dir.join("leases").display()),
            format!("--dhcp-hostsfile={}", dir.join("hosts").display()),
        ];
        args.extend(plan_args.iter().cloned());
        args
    }

    fn seen(&self, router: &str) -> DhcpSeen {
        let dir = self.router_dir(router);
        let running = self
            .dnsmasq_pid(router)
            .is_some_and(|pid| netns::pid_inode(pid) == netns::inode(router));
        DhcpSeen {
            running,
            args: std::fs::read_to_string(dir.join("args"))
                .ok()
                .map(|t| t.split('\n').map(str::to_string).collect()),
            hosts: std::fs::read_to_string(dir.join("hosts")).ok(),
        }
    }

    async fn stop_stale(&self, router: &str) -> bool {
        match self.dnsmasq_pid(router) {
            Some(pid) if netns::pid_inode(pid) != netns::inode(router) => {
                stop_pid(pid).await;
                true
            }
            _ => false,
        }
    }

    async fn apply_dhcp(&self, router: &str, op: &DhcpOp) -> Result<()> {
        let dir = self.router_dir(router);
        let io = |what: &str| {
            let what = format!("{what} ({router})");
            move |e| KernelError::io(what, e)
        };
        std::fs::create_dir_all(&dir).map_err(io("DHCP files"))?;
        match op {
            DhcpOp::Start { args, hosts } => {
                write_atomic(&dir.join("hosts"), hosts).map_err(io("DHCP leases"))?;
                if let Some(pid) = self.dnsmasq_pid(router) {
                    stop_pid(pid).await;
                }
                write_atomic(&dir.join("args"), &args.join("\n")).map_err(io("DHCP arguments"))?;
                let (r, a) = (router.to_string(), args.clone());
                tokio::task::spawn_blocking(move || netns::run(Some(&r), "dnsmasq", &a, None))
                    .await
                    .map_err(|e| KernelError::io("dnsmasq", std::io::Error::other(e)))?
                    .map_err(io("start dnsmasq"))?;
            }
            DhcpOp::Reload { hosts } => {
                write_atomic(&dir.join("hosts"), hosts).map_err(io("DHCP leases"))?;
                // dnsmasq rereads its hosts file on SIGHUP.
                if let Some(pid) = self.dnsmasq_pid(router) {
                    signal(pid, nix::sys::signal::Signal::SIGHUP);
                }
            }
            DhcpOp::Stop => {
                if let Some(pid) = self.dnsmasq_pid(router) {
                    signal(pid, nix::sys::signal::Signal::SIGTERM);
                }
            }
        }
        Ok(())
    }

    async fn remove(&self, router: &str) {
        if let Some(pid) = self.dnsmasq_pid(router) {
            stop_pid(pid).await;
        }
        let _ = std::fs::remove_dir_all(self.router_dir(router));
    }
}
