//! iSCSI exports of an `iscsi` pool's volumes: each volume's raw file is one
//! target (`iqn.2026-12.io.yukumo:<pool>.<uid>`) with one logical unit,
//! served by the host's userspace target (tgt). The decision is pure
//! ([`export_ops`]); the [`Targets`] seam carries it out through `tgtadm`
//! on tgtd's control socket (tgt's only stable admin interface; its socket
//! protocol is private to tgt), or in memory ([`FakeTargets`]) for tests.
//!
//! tgt reads a file's size when a logical unit is added and never again:
//! the size a logical unit was added at is kept in its SCSI serial number
//! (`yk<bytes>`), and a grown file is re-added (QEMU retries the commands
//! the unit attention interrupts, and re-reads the capacity when the node's
//! agent resizes the disk).

use std::future::Future;

/// The name of the target exporting a volume.
pub fn target_iqn(pool: &str, uid: &str) -> String {
    format!("iqn.2026-12.io.yukumo:{pool}.{uid}")
}

/// The serial number recording the size a logical unit was added at.
pub fn size_serial(bytes: u64) -> String {
    format!("yk{bytes}")
}

/// A target as tgtd holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetSeen {
    pub tid: u32,
    pub iqn: String,
    /// Backing file of logical unit 1.
    pub path: Option<String>,
    /// Serial number of logical unit 1.
    pub serial: Option<String>,
    /// Its sessions.
    pub sessions: Vec<Session>,
    /// Initiator addresses allowed to log in.
    pub acl: Vec<String>,
}

/// A session (I_T nexus) of a target, with one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub sid: u64,
    pub cid: u32,
    /// The initiator's address.
    pub addr: String,
}

/// A change of the host's targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOp {
    /// A new target with logical unit 1 on `path`, open to `acl`.
    Add {
        tid: u32,
        iqn: String,
        path: String,
        serial: String,
        acl: Vec<String>,
    },
    /// Remove logical unit 1 and add it again (tgt then reads the file's
    /// size).
    Relun {
        tid: u32,
        path: String,
        serial: String,
    },
    Bind {
        tid: u32,
        addr: String,
    },
    Unbind {
        tid: u32,
        addr: String,
    },
    /// End a session's connection (an initiator no longer admitted).
    Drop {
        tid: u32,
        sid: u64,
        cid: u32,
    },
    /// Remove the target, ending its sessions.
    Remove {
        tid: u32,
    },
}

/// What a volume needs exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub iqn: String,
    pub path: String,
    pub bytes: u64,
    /// Initiator addresses allowed (the holder's host, else the hosts of
    /// the Site), sorted.
    pub acl: Vec<String>,
}

/// The operations that make `iqn`'s target what `want` asks (`None`: no
/// target).
pub fn export_ops(seen: &[TargetSeen], iqn: &str, want: Option<&Export>) -> Vec<TargetOp> {
    let have = seen.iter().find(|t| t.iqn == iqn);
    let Some(want) = want else {
        return have
            .map(|t| vec![TargetOp::Remove { tid: t.tid }])
            .unwrap_or_default();
    };
    let serial = size_serial(want.bytes);
    let Some(t) = have else {
        let tid = (1..)
            .find(|n| seen.iter().all(|t| t.tid != *n))
            .unwrap_or(1);
        return vec![TargetOp::Add {
            tid,
            iqn: iqn.to_string(),
            path: want.path.clone(),
            serial,
            acl: want.acl.clone(),
        }];
    };
    let mut ops = Vec::new();
    if t.path.as_deref() != Some(&want.path) || t.serial.as_deref() != Some(&serial) {
        ops.push(TargetOp::Relun {
            tid: t.tid,
            path: want.path.clone(),
            serial,
        });
    }
    for a in &want.acl {
        if !t.acl.contains(a) {
            ops.push(TargetOp::Bind {
                tid: t.tid,
                addr: a.clone(),
            });
        }
    }
    for a in &t.acl {
        if !want.acl.contains(a) {
            ops.push(TargetOp::Unbind {
                tid: t.tid,
                addr: a.clone(),
            });
        }
    }
    // Fencing: an initiator no longer admitted loses its sessions too (tgt
    // checks the ACL only at login).
    for s in &t.sessions {
        if !want.acl.contains(&s.addr) {
            ops.push(TargetOp::Drop {
                tid: t.tid,
                sid: s.sid,
                cid: s.cid,
            });
        }
    }
    ops
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "this host's agent exports no iSCSI targets: start it with --iscsi-portal and --iscsi-control-port (a running tgtd)"
    )]
    NotConfigured,
    #[error("tgtadm {args}: {msg}")]
    Tgtadm { args: String, msg: String },
}

/// The host's iSCSI targets.
pub trait Targets: Send + Sync + Clone + 'static {
    /// The portal initiators reach this host's targets at, if it has any.
    fn portal(&self) -> Option<String>;
    fn observe(&self) -> impl Future<Output = Result<Vec<TargetSeen>, TargetError>> + Send;
    fn apply(&self, op: TargetOp) -> impl Future<Output = Result<(), TargetError>> + Send;
}

/// tgtd, driven by `tgtadm` on its control port.
#[derive(Clone, Debug, Default)]
pub struct Tgt {
    /// tgtd's control port (`tgtd -C`).
    pub control_port: u16,
    /// Where initiators reach it; `None`: no targets on this host.
    pub portal: Option<String>,
}

impl Tgt {
    async fn tgtadm(&self, args: &[&str]) -> Result<String, TargetError> {
        let Some(_) = &self.portal else {
            return Err(TargetError::NotConfigured);
        };
        let port = self.control_port;
        let out = tokio::process::Command::new("tgtadm")
            .args(["-C", &port.to_string(), "--lld", "iscsi"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| TargetError::Tgtadm {
                args: args.join(" "),
                msg: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(TargetError::Tgtadm {
                args: args.join(" "),
                msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Targets for Tgt {
    fn portal(&self) -> Option<String> {
        self.portal.clone()
    }

    async fn observe(&self) -> Result<Vec<TargetSeen>, TargetError> {
        Ok(parse_show(
            &self.tgtadm(&["--op", "show", "--mode", "target"]).await?,
        ))
    }

    async fn apply(&self, op: TargetOp) -> Result<(), TargetError> {
        match op {
            TargetOp::Add {
                tid,
                iqn,
                path,
                serial,
                acl,
            } => {
                let t = tid.to_string();
                self.tgtadm(&["--op", "new", "--mode", "target", "--tid", &t, "-T", &iqn])
                    .await?;
                let lun = async {
                    self.add_lun(&t, &path, &serial).await?;
                    for a in &acl {
                        self.bind(&t, a, "bind").await?;
                    }
                    Ok(())
                };
                if let Err(e) = lun.await {
                    // No half-made target: the next pass adds it whole.
                    let _ = self
                        .tgtadm(&["--op", "delete", "--mode", "target", "--tid", &t, "--force"])
                        .await;
                    return Err(e);
                }
            }
            TargetOp::Relun { tid, path, serial } => {
                let t = tid.to_string();
                // Absent already when a previous attempt failed half-way.
                let _ = self
                    .tgtadm(&[
                        "--op",
                        "delete",
                        "--mode",
                        "logicalunit",
                        "--tid",
                        &t,
                        "--lun",
                        "1",
                    ])
                    .await;
                self.add_lun(&t, &path, &serial).await?;
            }
            TargetOp::Bind { tid, addr } => self.bind(&tid.to_string(), &addr, "bind").await?,
            TargetOp::Unbind { tid, addr } => self.bind(&tid.to_string(), &addr, "unbind").await?,
            TargetOp::Drop { tid, sid, cid } => {
                self.tgtadm(&[
                    "--op",
                    "delete",
                    "--mode",
                    "conn",
                    "--tid",
                    &tid.to_string(),
                    "--sid",
                    &sid.to_string(),
                    "--cid",
                    &cid.to_string(),
                ])
                .await?;
            }
            TargetOp::Remove { tid } => {
                self.tgtadm(&[
                    "--op",
                    "delete",
                    "--mode",
                    "target",
                    "--tid",
                    &tid.to_string(),
                    "--force",
                ])
                .await?;
            }
        }
        Ok(())
    }
}

impl Tgt {
    async fn add_lun(&self, tid: &str, path: &str, serial: &str) -> Result<(), TargetError> {
        self.tgtadm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            tid,
            "--lun",
            "1",
            "--bstype",
            "rdwr",
            "-b",
            path,
        ])
        .await?;
        let params = format!("scsi_sn={serial},vendor_id=yukumo");
        self.tgtadm(&[
            "--op",
            "update",
            "--mode",
            "logicalunit",
            "--tid",
            tid,
            "--lun",
            "1",
            "--params",
            &params,
        ])
        .await?;
        Ok(())
    }

    async fn bind(&self, tid: &str, addr: &str, op: &str) -> Result<(), TargetError> {
        self.tgtadm(&["--op", op, "--mode", "target", "--tid", tid, "-I", addr])
            .await?;
        Ok(())
    }
}

/// `tgtadm --op show --mode target`, read.
pub fn parse_show(out: &str) -> Vec<TargetSeen> {
    #[derive(PartialEq)]
    enum Sec {
        Other,
        Nexus,
        Lun,
        Acl,
    }
    let mut all: Vec<TargetSeen> = Vec::new();
    let mut sec = Sec::Other;
    let mut lun = None::<u32>;
    for line in out.lines() {
        let l = line.trim();
        if let Some(rest) = line.strip_prefix("Target ") {
            let (tid, iqn) = rest.split_once(": ").unwrap_or((rest, ""));
            all.push(TargetSeen {
                tid: tid.trim().parse().unwrap_or(0),
                iqn: iqn.trim().to_string(),
                ..Default::default()
            });
            sec = Sec::Other;
            continue;
        }
        let Some(t) = all.last_mut() else { continue };
        match l {
            "I_T nexus information:" => sec = Sec::Nexus,
            "LUN information:" => sec = Sec::Lun,
            "ACL information:" => sec = Sec::Acl,
            "Account information:" | "System information:" => sec = Sec::Other,
            _ => match sec {
                Sec::Nexus => {
                    if let Some(n) = l.strip_prefix("I_T nexus: ") {
                        t.sessions.push(Session {
                            sid: n.parse().unwrap_or(0),
                            ..Default::default()
                        });
                    } else if let (Some(c), Some(s)) =
                        (l.strip_prefix("Connection: "), t.sessions.last_mut())
                    {
                        s.cid = c.parse().unwrap_or(0);
                    } else if let (Some(a), Some(s)) =
                        (l.strip_prefix("IP Address: "), t.sessions.last_mut())
                    {
                        s.addr = a.to_string();
                    }
                }
                Sec::Lun => {
                    if let Some(n) = l.strip_prefix("LUN: ") {
                        lun = n.parse().ok();
                    } else if lun == Some(1) {
                        if let Some(p) = l.strip_prefix("Backing store path: ") {
                            t.path = Some(p.to_string());
                        } else if let Some(s) = l.strip_prefix("SCSI SN: ") {
                            t.serial = Some(s.to_string());
                        }
                    }
                }
                Sec::Acl if !l.is_empty() => t.acl.push(l.to_string()),
                _ => {}
            },
        }
    }
    all
}

/// Targets kept in memory, for tests.
#[cfg(test)]
#[derive(Clone, Debug, Default)]
pub struct FakeTargets {
    pub targets: std::sync::Arc<std::sync::Mutex<Vec<TargetSeen>>>,
    /// `None`: a host without a target.
    pub portal: Option<String>,
}

#[cfg(test)]
impl Targets for FakeTargets {
    fn portal(&self) -> Option<String> {
        self.portal.clone()
    }

    async fn observe(&self) -> Result<Vec<TargetSeen>, TargetError> {
        if self.portal.is_none() {
            return Err(TargetError::NotConfigured);
        }
        Ok(self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    async fn apply(&self, op: TargetOp) -> Result<(), TargetError> {
        let mut all = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let find = |all: &mut Vec<TargetSeen>, tid: u32| {
            all.iter_mut()
                .position(|t| t.tid == tid)
                .ok_or(TargetError::Tgtadm {
                    args: format!("--tid {tid}"),
                    msg: "can't find the target".into(),
                })
        };
        match op {
            TargetOp::Add {
                tid,
                iqn,
                path,
                serial,
                acl,
            } => all.push(TargetSeen {
                tid,
                iqn,
                path: Some(path),
                serial: Some(serial),
                sessions: vec![],
                acl,
            }),
            TargetOp::Relun { tid, path, serial } => {
                let i = find(&mut all, tid)?;
                all[i].path = Some(path);
                all[i].serial = Some(serial);
            }
            TargetOp::Bind { tid, addr } => {
                let i = find(&mut all, tid)?;
                all[i].acl.push(addr);
            }
            TargetOp::Unbind { tid, addr } => {
                let i = find(&mut all, tid)?;
                all[i].acl.retain(|a| a != &addr);
            }
            TargetOp::Drop { tid, sid, .. } => {
                let i = find(&mut all, tid)?;
                all[i].sessions.retain(|s| s.sid != sid);
            }
            TargetOp::Remove { tid } => {
                let i = find(&mut all, tid)?;
                all.remove(i);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW: &str = "Target 1: iqn.2026-12.io.yukumo:san.abc
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 2
            Initiator: iqn.2008-11.org.linux-kvm alias: none
            Connection: 0
                IP Address: 10.255.0.2
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Backing store type: null
            Backing store path: None
        LUN: 1
            Type: disk
            SCSI SN: yk67108864
            Size: 67 MB, Block size: 512
            Backing store type: rdwr
            Backing store path: /p/abc.raw
            Backing store flags: 
    Account information:
    ACL information:
        10.255.0.1
        10.255.0.2
Target 3: iqn.2026-12.io.yukumo:san.def
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
";

    #[test]
    fn tgtadm_show_is_read() {
        let t = parse_show(SHOW);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            TargetSeen {
                tid: 1,
                iqn: "iqn.2026-12.io.yukumo:san.abc".into(),
                path: Some("/p/abc.raw".into()),
                serial: Some("yk67108864".into()),
                sessions: vec![Session {
                    sid: 2,
                    cid: 0,
                    addr: "10.255.0.2".into()
                }],
                acl: vec!["10.255.0.1".into(), "10.255.0.2".into()],
            }
        );
        assert_eq!((t[1].tid, t[1].path.clone()), (3, None));
        assert!(t[1].acl.is_empty() && t[1].sessions.is_empty());
    }

    #[tokio::test]
    async fn exports_converge_grow_follow_the_hosts_and_go() {
        let fake = FakeTargets {
            portal: Some("10.255.0.1:3260".into()),
            ..Default::default()
        };
        let iqn = target_iqn("san", "abc");
        let mut want = Export {
            iqn: iqn.clone(),
            path: "/p/abc.raw".into(),
            bytes: 64 << 20,
            acl: vec!["10.255.0.1".into(), "10.255.0.2".into()],
        };
        let converge = |want: Option<Export>| {
            let fake = fake.clone();
            let iqn = iqn.clone();
            async move {
                let mut n = 0;
                loop {
                    let ops = export_ops(&fake.observe().await.unwrap(), &iqn, want.as_ref());
                    if ops.is_empty() {
                        return n;
                    }
                    n += ops.len();
                    for op in ops {
                        fake.apply(op).await.unwrap();
                    }
                }
            }
        };
        // Another target holds tid 1: the new one takes the next free id.
        fake.apply(TargetOp::Add {
            tid: 1,
            iqn: "other".into(),
            path: "/p/o.raw".into(),
            serial: "yk1".into(),
            acl: vec![],
        })
        .await
        .unwrap();
        assert_eq!(converge(Some(want.clone())).await, 1);
        let seen = fake.observe().await.unwrap();
        assert_eq!(seen[1].tid, 2);
        assert_eq!(converge(Some(want.clone())).await, 0, "converged");
        // A session from 10.255.0.1, which the target stops admitting.
        fake.targets.lock().unwrap()[1].sessions.push(Session {
            sid: 7,
            cid: 0,
            addr: "10.255.0.1".into(),
        });
        want.bytes = 128 << 20;
        want.acl = vec!["10.255.0.2".into(), "10.255.0.3".into()];
        let ops = export_ops(&fake.observe().await.unwrap(), &iqn, Some(&want));
        assert_eq!(
            ops,
            vec![
                TargetOp::Relun {
                    tid: 2,
                    path: "/p/abc.raw".into(),
                    serial: "yk134217728".into()
                },
                TargetOp::Bind {
                    tid: 2,
                    addr: "10.255.0.3".into()
                },
                TargetOp::Unbind {
                    tid: 2,
                    addr: "10.255.0.1".into()
                },
                TargetOp::Drop {
                    tid: 2,
                    sid: 7,
                    cid: 0
                },
            ]
        );
        assert_eq!(converge(Some(want)).await, 4);
        assert!(
            fake.observe().await.unwrap()[1].sessions.is_empty(),
            "fenced"
        );
        assert_eq!(converge(None).await, 1);
        assert_eq!(
            fake.observe().await.unwrap().len(),
            1,
            "only the other target left"
        );
    }
}
