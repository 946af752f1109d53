//! The NoCloud config disk of a guest (what cloud-init reads): meta-data,
//! user-data and network-config, rendered purely from the VirtualNode.

use yukumo_api::virtualnode::VirtualNode;

/// The three NoCloud files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Render the config of a node. The instance id is the VirtualNode's uid, so a
/// node recreated under the same name is a new instance to cloud-init.
pub fn render(vn: &VirtualNode) -> GuestConfig {
    let uid = vn.metadata.uid.clone().unwrap_or_default();
    let meta_data = format!("instance-id: {uid}\nlocal-hostname: {}\n", vn.spec.hostname);
    let mut user_data = String::from("#cloud-config\n");
    user_data.push_str(&format!("hostname: {}\n", vn.spec.hostname));
    if !vn.spec.ssh_keys.is_empty() {
        user_data.push_str("ssh_authorized_keys:\n");
        for k in &vn.spec.ssh_keys {
            user_data.push_str(&format!("  - {k}\n"));
        }
    }
    user_data.push_str(&format!(
        "write_files:\n  - path: /etc/yukumo/role\n    content: \"{}\\n\"\n",
        vn.spec.role.as_str()
    ));
    // User data of the spec wins when it is a complete document of its own.
    if let Some(u) = &vn.spec.user_data
        && !u.starts_with("#cloud-config")
    {
        user_data = u.clone();
    } else if let Some(u) = &vn.spec.user_data {
        for line in u.lines().skip(1) {
            user_data.push_str(line);
            user_data.push('\n');
        }
    }
    let network_config = match &vn.spec.network {
        Some(net) => format!(
            "version: 2\nethernets:\n  eth0:\n    match: {{macaddress: \"{}\"}}\n    set-name: eth0\n    dhcp4: true\n    mtu: {}\n",
            net.mac, net.mtu
        ),
        None => "version: 2\nethernets: {}\n".to_string(),
    };
    GuestConfig {
        meta_data,
        user_data,
        network_config,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vn() -> VirtualNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": "qs-frontend", "namespace": "demo", "uid": "0b5c-uid"},
            "spec": {"cluster": "qs", "role": "frontend", "hostname": "qs-frontend",
                     "resources": {"cpu": 1, "memoryMiB": 192},
                     "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))},
                     "sshKeys": ["ssh-ed25519 AAAA k@x"], "userData": "#cloud-config\nruncmd: [echo hi]\n"}
        }))
        .unwrap()
    }

    #[test]
    fn nocloud_files() {
        let c = render(&vn());
        assert_eq!(
            c.meta_data,
            "instance-id: 0b5c-uid\nlocal-hostname: qs-frontend\n"
        );
        assert!(c.user_data.starts_with("#cloud-config\n"));
        assert!(
            c.user_data
                .contains("ssh_authorized_keys:\n  - ssh-ed25519 AAAA k@x\n")
        );
        assert!(c.user_data.contains("runcmd: [echo hi]"));
        assert!(c.user_data.contains("content: \"frontend\\n\""));
        assert_eq!(render(&vn()), c, "deterministic");
    }
}
