//! Domain XML, rendered purely from a VirtualNode and its host paths.
//!
//! The domain's UUID is the VirtualNode's uid and its metadata carries a
//! yukumo marker (uid, namespace, name, and a hash of the rendered spec), so
//! the agent can tell its own domains from anything else on the host, a
//! recreated node (new uid) never adopts an old domain, and a restart with
//! nothing changed redefines nothing.

use std::path::{Path, PathBuf};
use yukumo_api::volume::{IscsiTarget, RbdImage};

use sha2::{Digest, Sha256};
use yukumo_api::virtualnode::VirtualNode;

/// The XML namespace of yukumo's domain metadata.
pub const METADATA_NS: &str = "https://yukumo.io/xmlns/node/v1";

/// Where guests' serial ports (ttyS0, the console; ttyS1) listen.
pub const CONTROL_DIR: &str = "/run/yukumo";

/// Where a node's files live on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    pub dir: PathBuf,
    pub root_disk: PathBuf,
    pub config_iso: PathBuf,
    pub console_log: PathBuf,
    /// The guest's serial console (ttyS0), served to its users
    /// (`console.rs`); its output is also kept in `console_log`.
    pub console_socket: PathBuf,
    /// The guest's second serial port (ttyS1), for operators.
    pub control_socket: PathBuf,
}

impl NodePaths {
    pub fn new(state_dir: &Path, uid: &str) -> Self {
        let dir = state_dir.join("nodes").join(uid);
        NodePaths {
            root_disk: dir.join("root.qcow2"),
            config_iso: dir.join("cidata.iso"),
            console_log: dir.join("console.log"),
            // Unix socket paths are limited to 108 bytes: a short fixed
            // directory, not the (arbitrarily deep) state directory.
            control_socket: PathBuf::from(CONTROL_DIR).join(format!("{uid}.sock")),
            console_socket: PathBuf::from(CONTROL_DIR).join(format!("{uid}.console.sock")),
            dir,
        }
    }
}

/// libvirt domain name of a node.
pub fn domain_name(namespace: &str, name: &str) -> String {
    format!("yk-{namespace}-{name}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The guest's NIC on its group's bridge: the allocated MAC, a tap named
/// after the node's uid (the anti-spoofing rules key on it) and the group's MTU.
fn nic(vn: &VirtualNode) -> String {
    let (Some(net), Some(uid)) = (&vn.spec.network, &vn.metadata.uid) else {
        return String::new();
    };
    let bridge = crate::network::plan::bridge_name(net.segment);
    format!(
        "    <interface type='bridge'>\n      <mac address='{mac}'/>\n      <source bridge='{br}'/>\n      <target dev='{tap}'/>\n      <model type='virtio'/>\n      <mtu size='{mtu}'/>\n    </interface>\n",
        mac = net.mac,
        br = bridge,
        tap = crate::network::plan::tap_name(uid),
        mtu = net.mtu,
    )
}

/// The XML of a volume disk: the Volume's file (or its iSCSI logical
/// unit, reached by QEMU's own initiator, or its Ceph RBD image, reached by
/// QEMU's librbd with the key of the host's libvirt secret), its persisted
/// target, and its uid as the serial the guest sees (`/sys/block/<dev>/serial`).
pub fn disk_xml(
    path: &str,
    iscsi: Option<&IscsiTarget>,
    rbd: Option<&RbdImage>,
    target: &str,
    serial: &str,
    read_only: bool,
) -> String {
    let (kind, driver, source) = match (iscsi, rbd) {
        (_, Some(r)) => {
            let hosts: String = r
                .monitors
                .iter()
                .map(|m| {
                    let (h, p) = m.rsplit_once(':').unwrap_or((m, "6789"));
                    format!("\n        <host name='{}' port='{}'/>", esc(h), esc(p))
                })
                .collect();
            (
                "network",
                "raw",
                format!(
                    "<source protocol='rbd' name='{}/{}'>{hosts}\n        <auth username='{}'>\n          <secret type='ceph' usage='{}'/>\n        </auth>\n      </source>",
                    esc(&r.pool),
                    esc(&r.image),
                    esc(&r.user),
                    esc(&yukumo_api::site::ceph_secret_usage(&r.user)),
                ),
            )
        }
        (Some(t), None) => {
            let (host, port) = t.portal.rsplit_once(':').unwrap_or((&t.portal, "3260"));
            (
                "network",
                "raw",
                format!(
                    "<source protocol='iscsi' name='{}/{}'>\n        <host name='{}' port='{}'/>\n      </source>",
                    esc(&t.iqn),
                    t.lun,
                    esc(host),
                    esc(port)
                ),
            )
        }
        (None, None) => ("file", "qcow2", format!("<source file='{}'/>", esc(path))),
    };
    format!(
        "    <disk type='{kind}' device='disk'>\n      <driver name='qemu' type='{driver}'/>\n      {source}\n      <target dev='{}' bus='virtio'/>\n      <serial>{}</serial>\n{}    </disk>\n",
        esc(target),
        esc(serial),
        if read_only { "      <readonly/>\n" } else { "" }
    )
}

/// The XML of a node's volume disk as its spec lists it.
pub fn volume_disk_xml(d: &yukumo_api::virtualnode::NodeDisk) -> String {
    disk_xml(
        &d.path,
        d.iscsi.as_ref(),
        d.rbd.as_ref(),
        &d.target,
        &d.serial,
        d.read_only,
    )
}

/// The disk target of the boot disk.
pub const ROOT_TARGET: &str = "vda";

/// The node's boot Volume, if it boots from one.
pub fn root_volume(vn: &VirtualNode) -> Option<&yukumo_api::virtualnode::NodeDisk> {
    vn.spec.disks.iter().find(|d| d.target == ROOT_TARGET)
}

/// A volume disk as a domain's XML holds it (disks with a serial only: the
/// root and config disks have none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSeen {
    pub serial: String,
    pub target: String,
    pub path: String,
    /// The iSCSI logical unit of a network disk.
    pub iscsi: Option<IscsiTarget>,
    /// The Ceph RBD image of a network disk.
    pub rbd: Option<RbdImage>,
    /// The size the guest sees (running domains; 0 when not read).
    pub bytes: u64,
}

fn attr(tag: &str, k: &str) -> Option<String> {
    for q in ['\'', '"'] {
        let pat = format!(" {k}={q}");
        if let Some(i) = tag.find(&pat) {
            let rest = &tag[i + pat.len()..];
            return Some(rest[..rest.find(q)?].to_string());
        }
    }
    None
}

fn unesc(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The volume disks of a domain's XML, in document order.
pub fn disks_in(xml: &str) -> Vec<DiskSeen> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<disk ") {
        let body = &rest[i..];
        let end = body.find("</disk>").map_or(body.len(), |e| e + 7);
        let disk = &body[..end];
        rest = &body[end..];
        let Some(serial) = disk.find("<serial>").and_then(|s| {
            disk[s + 8..]
                .find("</serial>")
                .map(|e| &disk[s + 8..s + 8 + e])
        }) else {
            continue;
        };
        let tag = |name: &str| {
            disk.find(&format!("<{name} "))
                .map(|s| &disk[s..s + disk[s..].find('>').unwrap_or(0)])
        };
        out.push(DiskSeen {
            serial: unesc(serial),
            target: tag("target")
                .and_then(|t| attr(t, "dev"))
                .unwrap_or_default(),
            path: tag("source")
                .and_then(|t| attr(t, "file"))
                .map(|p| unesc(&p))
                .unwrap_or_default(),
            iscsi: tag("source")
                .filter(|t| attr(t, "protocol").as_deref() == Some("iscsi"))
                .and_then(|t| {
                    let name = unesc(&attr(t, "name")?);
                    let (iqn, lun) = name.rsplit_once('/').unwrap_or((&name, "0"));
                    let h = tag("host")?;
                    Some(IscsiTarget {
                        portal: format!(
                            "{}:{}",
                            unesc(&attr(h, "name")?),
                            attr(h, "port").unwrap_or_else(|| "3260".into())
                        ),
                        iqn: iqn.to_string(),
                        lun: lun.parse().unwrap_or(0),
                    })
                }),
            rbd: tag("source")
                .filter(|t| attr(t, "protocol").as_deref() == Some("rbd"))
                .and_then(|t| {
                    let name = unesc(&attr(t, "name")?);
                    let (pool, image) = name.split_once('/')?;
                    let mut monitors = Vec::new();
                    let mut hosts = disk;
                    while let Some(h) = hosts.find("<host ") {
                        let h_tag = &hosts[h..h + hosts[h..].find('>').unwrap_or(0)];
                        if let Some(n) = attr(h_tag, "name") {
                            monitors.push(format!(
                                "{}:{}",
                                unesc(&n),
                                attr(h_tag, "port").unwrap_or_else(|| "6789".into())
                            ));
                        }
                        hosts = &hosts[h + 6..];
                    }
                    Some(RbdImage {
                        monitors,
                        pool: pool.to_string(),
                        image: image.to_string(),
                        user: tag("auth")
                            .and_then(|a| attr(a, "username"))
                            .map(|u| unesc(&u))
                            .unwrap_or_default(),
                    })
                }),
            bytes: 0,
        });
    }
    out
}

/// The domain XML (without the hash attribute) and its hash.
pub fn render(vn: &VirtualNode, paths: &NodePaths, domain_type: &str) -> (String, String) {
    let ns = vn.metadata.namespace.clone().unwrap_or_default();
    let name = vn.metadata.name.clone().unwrap_or_default();
    let uid = vn.metadata.uid.clone().unwrap_or_default();
    let body = format!(
        r#"  <memory unit='MiB'>{mem}</memory>
  <vcpu>{cpu}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{root}    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{iso}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='{console_socket}'/>
      <log file='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='{control}'/>
      <target port='1'/>
    </serial>
{volumes}{nic}    <memballoon model='none'/>
  </devices>
"#,
        mem = vn.spec.resources.memory_mib,
        cpu = vn.spec.resources.cpu,
        // The boot disk: the node's boot Volume (target `vda`), else its
        // overlay on the image.
        root = match root_volume(vn) {
            Some(d) => volume_disk_xml(d),
            None => format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
                esc(&paths.root_disk.to_string_lossy())
            ),
        },
        iso = esc(&paths.config_iso.to_string_lossy()),
        console = esc(&paths.console_log.to_string_lossy()),
        control = esc(&paths.control_socket.to_string_lossy()),
        console_socket = esc(&paths.console_socket.to_string_lossy()),
        nic = nic(vn),
        volumes = vn
            .spec
            .disks
            .iter()
            .filter(|d| d.target != ROOT_TARGET)
            .map(volume_disk_xml)
            .collect::<String>(),
    );
    let hash = {
        let mut h = Sha256::new();
        h.update(domain_type.as_bytes());
        h.update(body.as_bytes());
        format!("{:x}", h.finalize())[..16].to_string()
    };
    let xml = format!(
        r#"<domain type='{dtype}'>
  <name>{dname}</name>
  <uuid>{uid}</uuid>
  <metadata>
    <yukumo:node xmlns:yukumo='{METADATA_NS}' uid='{uid}' namespace='{nse}' name='{namee}' hash='{hash}'/>
  </metadata>
{body}</domain>
"#,
        dtype = esc(domain_type),
        dname = esc(&domain_name(&ns, &name)),
        uid = esc(&uid),
        nse = esc(&ns),
        namee = esc(&name),
    );
    (xml, hash)
}

/// The yukumo marker of a domain: the node it realises and the hash of
/// the spec it was defined from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub hash: String,
}

/// The yukumo marker found in a domain's XML.
pub fn marker(xml: &str) -> Option<Marker> {
    let start = xml.find("<yukumo:node ")?;
    let tag = &xml[start..start + xml[start..].find("/>")?];
    let attr = |k: &str| attr(tag, k);
    Some(Marker {
        uid: attr("uid")?,
        namespace: attr("namespace")?,
        name: attr("name")?,
        hash: attr("hash")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vn(mem: u64) -> VirtualNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "yukumo.io/v1alpha1", "kind": "VirtualNode",
            "metadata": {"name": "qs-worker-0", "namespace": "demo", "uid": "6f1c7e4a-0000-4000-8000-000000000001"},
            "spec": {"cluster": "qs", "role": "worker", "hostname": "qs-worker-0",
                     "resources": {"cpu": 1, "memoryMiB": mem},
                     "image": {"url": "file:///i", "checksum": format!("sha256:{}", "0".repeat(64))}}
        }))
        .unwrap()
    }

    #[test]
    fn a_node_with_a_boot_volume_boots_from_it_and_has_no_overlay() {
        let mut node = vn(192);
        let t = IscsiTarget {
            portal: "10.255.0.1:3260".into(),
            iqn: "iqn.2026-12.io.yukumo:san.u0".into(),
            lun: 1,
        };
        node.spec.disks = vec![yukumo_api::virtualnode::NodeDisk {
            volume: "qs-worker-0-root".into(),
            target: "vda".into(),
            read_only: false,
            serial: "u0".into(),
            path: String::new(),
            iscsi: Some(t.clone()),
            rbd: None,
            bytes: 1 << 30,
        }];
        let p = NodePaths::new(Path::new("/s"), "u");
        let (xml, _) = render(&node, &p, "qemu");
        assert!(!xml.contains("root.qcow2"), "no overlay: {xml}");
        let disks = disks_in(&xml);
        assert_eq!(disks.len(), 1, "{xml}");
        assert_eq!(
            (disks[0].target.as_str(), disks[0].iscsi.as_ref()),
            ("vda", Some(&t))
        );
        // It is the first disk: the one the firmware boots.
        assert!(xml.find("protocol='iscsi'") < xml.find("cidata"), "{xml}");
    }

    #[test]
    fn deterministic_with_marker() {
        let p = NodePaths::new(
            Path::new("/var/lib/yukumo"),
            "6f1c7e4a-0000-4000-8000-000000000001",
        );
        let (a, ha) = render(&vn(192), &p, "qemu");
        let (b, hb) = render(&vn(192), &p, "qemu");
        assert_eq!((a.clone(), ha.clone()), (b, hb));
        assert!(a.contains("<uuid>6f1c7e4a-0000-4000-8000-000000000001</uuid>"));
        assert!(a.contains("<name>yk-demo-qs-worker-0</name>"));
        assert!(a.contains("<memory unit='MiB'>192</memory>"));
        let m = marker(&a).unwrap();
        assert_eq!(
            (m.uid.as_str(), m.namespace.as_str(), m.name.as_str()),
            (
                "6f1c7e4a-0000-4000-8000-000000000001",
                "demo",
                "qs-worker-0"
            )
        );
        assert_eq!(m.hash, ha);
        let (_, h2) = render(&vn(256), &p, "qemu");
        assert_ne!(h2, ha, "a spec change changes the hash");
    }

    #[test]
    fn volume_disks_carry_their_serial_and_are_read_back() {
        let mut node = vn(192);
        node.spec.disks = vec![yukumo_api::virtualnode::NodeDisk {
            volume: "data".into(),
            target: "vdc".into(),
            read_only: false,
            serial: "9a1c7e4a-0000-4000-8000-000000000009".into(),
            path: "/pools/local/9a1c7e4a-0000-4000-8000-000000000009.qcow2".into(),
            iscsi: None,
            rbd: None,
            bytes: 1 << 26,
        }];
        let san = IscsiTarget {
            portal: "10.255.0.1:3260".into(),
            iqn: "iqn.2026-12.io.yukumo:san.9a1c7e4a-0000-4000-8000-00000000000a".into(),
            lun: 1,
        };
        node.spec.disks.push(yukumo_api::virtualnode::NodeDisk {
            volume: "shared".into(),
            target: "vdd".into(),
            read_only: false,
            serial: "9a1c7e4a-0000-4000-8000-00000000000a".into(),
            path: String::new(),
            iscsi: Some(san.clone()),
            rbd: None,
            bytes: 1 << 26,
        });
        let p = NodePaths::new(Path::new("/s"), "u");
        let (xml, h) = render(&node, &p, "qemu");
        assert_ne!(
            h,
            render(&vn(192), &p, "qemu").1,
            "disks are part of the hash"
        );
        assert_eq!(
            disks_in(&xml),
            vec![
                DiskSeen {
                    serial: "9a1c7e4a-0000-4000-8000-000000000009".into(),
                    target: "vdc".into(),
                    path: "/pools/local/9a1c7e4a-0000-4000-8000-000000000009.qcow2".into(),
                    iscsi: None,
                    rbd: None,
                    bytes: 0
                },
                DiskSeen {
                    serial: "9a1c7e4a-0000-4000-8000-00000000000a".into(),
                    target: "vdd".into(),
                    path: String::new(),
                    iscsi: Some(san),
                    rbd: None,
                    bytes: 0
                }
            ]
        );
        // libvirt writes double quotes and other attributes.
        let live = r#"<disk type="file" device="disk"><driver name="qemu" type="qcow2"/><source file="/a&amp;b" index="1"/><backingStore/><target dev="vdd" bus="virtio"/><serial>s1</serial><alias name="virtio-disk3"/></disk><disk type="file"><target dev="vda"/></disk>"#;
        assert_eq!(
            disks_in(live),
            vec![DiskSeen {
                serial: "s1".into(),
                target: "vdd".into(),
                path: "/a&b".into(),
                iscsi: None,
                rbd: None,
                bytes: 0
            }]
        );
    }

    #[test]
    fn marker_survives_libvirt_reformatting() {
        let xml = r#"<domain><metadata><yukumo:node xmlns:yukumo="https://yukumo.io/xmlns/node/v1" uid="u1" namespace="n" name="x" hash="h"/></metadata></domain>"#;
        assert_eq!(
            marker(xml),
            Some(Marker {
                uid: "u1".into(),
                namespace: "n".into(),
                name: "x".into(),
                hash: "h".into()
            })
        );
        assert_eq!(marker("<domain><name>other</name></domain>"), None);
    }
}
