//! VM hosts of a test (e2e/lib/vm-host.sh): TCG VMs with the Debian kernel
//! of /boot, each running its own agent, for what this machine's kernel
//! cannot do (802.1Q, WireGuard, netem).

use std::time::Duration;

use crate::{Env, guest_sh, wait_for};

/// A script in a VM host that udhcpc runs (`-s /run/yk-dhcp`): it sets the
/// lease and prints it ("lease ip=… router=…").
pub const DHCP_SCRIPT: &str = r#"printf '#!/bin/sh\ncase $1 in bound|renew) ip addr flush dev $interface; ip addr add $ip/${mask:-24} dev $interface; [ -n "$router" ] && ip route replace default via ${router%%%% *} dev $interface; echo "lease ip=$ip router=$router";; esac\n' > /run/yk-dhcp && chmod +x /run/yk-dhcp"#;

/// The VM hosts of a test: started on creation, stopped (and their Host
/// objects deleted) on drop, also when the test fails — after the test's
/// namespace is gone, while their agents can still release its nodes.
pub struct VmHosts<'a> {
    pub env: &'a Env,
    pub names: Vec<String>,
    ns: &'static str,
}

impl<'a> VmHosts<'a> {
    /// Start `hosts` (name, Site, index: 10..250, their underlay and WAN
    /// addresses' last byte) for a test whose objects live in namespace
    /// `ns`.
    pub fn start(env: &'a Env, ns: &'static str, hosts: &[(&str, &str, u32)]) -> VmHosts<'a> {
        let mut vms = VmHosts {
            env,
            names: Vec::new(),
            ns,
        };
        for (name, site, i) in hosts {
            env.env_sh(&["start-vm-host", name, site, &i.to_string()])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            vms.names.push(name.to_string());
        }
        vms
    }

    /// Run a shell command in a VM host (its root shell on ttyS1).
    pub fn sh(&self, host: &str, cmd: &str) -> (String, i32) {
        let sock = std::fs::read_to_string(self.env.dir.join(format!("hosts/{host}/shell")))
            .unwrap_or_else(|e| panic!("{host} has no shell socket: {e}"));
        guest_sh(
            std::path::Path::new(sock.trim()),
            cmd,
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{host}: {e}"))
    }

    pub fn ok(&self, host: &str, cmd: &str) -> String {
        let (out, rc) = self.sh(host, cmd);
        assert_eq!(rc, 0, "{host}: `{cmd}` failed: {out}");
        out
    }

    /// The index a VM host was started with.
    pub fn index(&self, host: &str) -> u32 {
        std::fs::read_to_string(self.env.dir.join(format!("hosts/{host}/vm")))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{host}: no index: {e}"))
    }
}

impl Drop for VmHosts<'_> {
    fn drop(&mut self) {
        let _ = self.env.kubectl(&[
            "delete",
            "namespace",
            self.ns,
            "--ignore-not-found",
            "--wait=false",
        ]);
        let _ = wait_for(Duration::from_secs(90), "the test namespace gone", || {
            if self
                .env
                .kubectl(&["get", "namespace", self.ns])
                .status
                .success()
            {
                Err("still there".into())
            } else {
                Ok(())
            }
        });
        for name in &self.names {
            if let Err(e) = self.env.env_sh(&["stop-vm-host", name]) {
                eprintln!("stopping {name}: {e}");
            }
            let _ =
                self.env
                    .kubectl(&["delete", "host", name, "--ignore-not-found", "--wait=false"]);
        }
    }
}

/// A small qcow2 image for nodes that libvirt's test driver "runs" on VM
/// hosts (it never boots them), named `name` in the environment's folder:
/// (file URL, checksum).
pub fn placeholder_image(env: &Env, name: &str) -> (String, String) {
    let path = env.dir.join(name);
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("16M")
        .status()
        .expect("qemu-img")
        .success();
    assert!(ok, "qemu-img create");
    let out = std::process::Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("sha256sum");
    let sum = String::from_utf8_lossy(&out.stdout)[..64].to_string();
    (
        format!("file://{}", path.display()),
        format!("sha256:{sum}"),
    )
}
