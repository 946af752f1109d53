//! The seam between a node's decision and its hypervisor: the [`Domains`]
//! trait, carried out on libvirt by the agent's libvirt thread
//! ([`crate::hypervisor::Hypervisor`]), or kept in memory by
//! [`FakeDomains`] for tests.

use std::collections::HashMap;
use std::future::Future;
#[cfg(test)]
use std::sync::{Arc, Mutex};

use crate::libvirt::Domain;

use super::decide::DomainSeen;
use super::domain::{disks_in, marker};
use super::ops::DomainOp;
use crate::hypervisor::{Hypervisor, HypervisorError};

/// A domain as a list shows it: its name and whether it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub active: bool,
}

/// The domains of this host.
pub trait Domains: Send + Sync + Clone + 'static {
    /// The domain of node `uid` (its UUID), and whether a yukumo domain of
    /// another node holds `name`.
    fn observe(
        &self,
        uid: &str,
        name: &str,
    ) -> impl Future<Output = Result<(Option<DomainSeen>, bool), HypervisorError>> + Send;
    /// Carry out `ops` on node `uid`'s domain, in order.
    fn apply(
        &self,
        uid: &str,
        ops: Vec<DomainOp>,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;
    /// Remove node `uid`'s domain (stopped first); the mutating calls made.
    fn remove(
        &self,
        uid: &str,
    ) -> impl Future<Output = Result<Vec<&'static str>, HypervisorError>> + Send;
    /// Every domain, by UUID (two list calls).
    fn list(&self)
    -> impl Future<Output = Result<HashMap<String, Listed>, HypervisorError>> + Send;
    /// Whether the domain `uid` carries yukumo's marker.
    fn marked(&self, uid: &str) -> impl Future<Output = Result<bool, HypervisorError>> + Send;
}

fn inactive_xml(d: &Domain) -> Result<String, crate::libvirt::Error> {
    d.get_xml_desc(crate::libvirt::sys::VIR_DOMAIN_XML_INACTIVE)
}

/// Destroy (if running) and undefine; the calls made.
fn remove_domain(d: &Domain, ops: &mut Vec<&'static str>) -> Result<(), crate::libvirt::Error> {
    if d.is_active()? {
        d.destroy()?;
        ops.push("destroy");
    }
    d.undefine()?;
    ops.push("undefine");
    Ok(())
}

impl Domains for Hypervisor {
    async fn observe(
        &self,
        uid: &str,
        name: &str,
    ) -> Result<(Option<DomainSeen>, bool), HypervisorError> {
        let (id, name) = (uid.to_string(), name.to_string());
        self.call(move |c| {
            if let Ok(d) = Domain::lookup_by_uuid_string(c, &id) {
                let xml = inactive_xml(&d)?;
                let active = d.is_active()?;
                // A running guest's disks as QEMU has them (hot-plugged or
                // not, and their size); else as defined.
                let disks = if active {
                    let mut disks = disks_in(&d.get_xml_desc(0)?);
                    for x in &mut disks {
                        if let Ok(b) = d.get_block_info(&x.target, 0) {
                            x.bytes = b.capacity;
                        }
                    }
                    disks
                } else {
                    disks_in(&xml)
                };
                return Ok((
                    Some(DomainSeen {
                        active,
                        hash: marker(&xml).map(|m| m.hash),
                        disks,
                    }),
                    false,
                ));
            }
            let stale = match Domain::lookup_by_name(c, &name) {
                Ok(old) => marker(&inactive_xml(&old)?).is_some_and(|m| m.uid != id),
                Err(_) => false,
            };
            Ok((None, stale))
        })
        .await
    }

    async fn apply(&self, uid: &str, ops: Vec<DomainOp>) -> Result<(), HypervisorError> {
        let id = uid.to_string();
        self.call(move |c| {
            for op in ops {
                match op {
                    DomainOp::RemoveStale { name } => {
                        if let Ok(old) = Domain::lookup_by_name(c, &name) {
                            remove_domain(&old, &mut Vec::new())?;
                        }
                    }
                    DomainOp::Define { xml } => {
                        Domain::define_xml(c, &xml)?;
                    }
                    DomainOp::Start => Domain::lookup_by_uuid_string(c, &id)?
                        .create()
                        .map(|_| ())?,
                    DomainOp::Destroy => Domain::lookup_by_uuid_string(c, &id)?.destroy()?,
                    DomainOp::AttachDisk { xml } => {
                        Domain::lookup_by_uuid_string(c, &id)?.attach_device_flags(
                            &xml,
                            crate::libvirt::sys::VIR_DOMAIN_AFFECT_LIVE,
                        )?;
                    }
                    DomainOp::DetachDisk { xml } => {
                        // Asynchronous: the guest acknowledges the unplug;
                        // asked again while pending, libvirt refuses, which
                        // is no news (the next observation tells).
                        if let Err(e) = Domain::lookup_by_uuid_string(c, &id)?
                            .detach_device_flags(&xml, crate::libvirt::sys::VIR_DOMAIN_AFFECT_LIVE)
                        {
                            tracing::debug!(error = %e, "detach pending");
                        }
                    }
                    DomainOp::ResizeDisk { target, bytes } => {
                        Domain::lookup_by_uuid_string(c, &id)?.block_resize(
                            &target,
                            bytes,
                            crate::libvirt::sys::VIR_DOMAIN_BLOCK_RESIZE_BYTES,
                        )?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn remove(&self, uid: &str) -> Result<Vec<&'static str>, HypervisorError> {
        let id = uid.to_string();
        self.call(move |c| {
            let mut ops = Vec::new();
            if let Ok(d) = Domain::lookup_by_uuid_string(c, &id) {
                remove_domain(&d, &mut ops)?;
            }
            Ok(ops)
        })
        .await
    }

    async fn list(&self) -> Result<HashMap<String, Listed>, HypervisorError> {
        self.call(|c| {
            let active =
                c.list_all_domains(crate::libvirt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?;
            let inactive =
                c.list_all_domains(crate::libvirt::sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)?;
            let mut out = HashMap::new();
            for (doms, active) in [(active, true), (inactive, false)] {
                for d in doms {
                    out.insert(
                        d.get_uuid_string()?,
                        Listed {
                            name: d.get_name()?,
                            active,
                        },
                    );
                }
            }
            Ok(out)
        })
        .await
    }

    async fn marked(&self, uid: &str) -> Result<bool, HypervisorError> {
        let id = uid.to_string();
        self.call(move |c| {
            let d = Domain::lookup_by_uuid_string(c, &id)?;
            Ok(marker(&inactive_xml(&d)?).is_some())
        })
        .await
    }
}

/// One domain of the fake.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDomain {
    pub name: String,
    pub xml: String,
    pub active: bool,
    /// The running guest's XML (its hot-plugged disks).
    pub live: String,
    /// Sizes of the running guest's volume disks, by target.
    pub sizes: HashMap<String, u64>,
}

/// Domains in memory, for tests: defined from the XML the agent renders
/// (name, UUID and marker read back from it), with a log of the mutating
/// calls.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct FakeDomains {
    pub domains: Arc<Mutex<HashMap<String, FakeDomain>>>,
    pub calls: Arc<Mutex<Vec<String>>>,
}

#[cfg(test)]
fn tag(xml: &str, t: &str) -> String {
    let open = format!("<{t}>");
    xml.find(&open)
        .and_then(|i| {
            let rest = &xml[i + open.len()..];
            rest.find('<').map(|j| rest[..j].to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
fn refused(what: &str) -> HypervisorError {
    HypervisorError::Libvirt {
        uri: "fake://".into(),
        message: what.to_string(),
    }
}

#[cfg(test)]
impl Domains for FakeDomains {
    async fn observe(
        &self,
        uid: &str,
        name: &str,
    ) -> Result<(Option<DomainSeen>, bool), HypervisorError> {
        let d = self.domains.lock().expect("poisoned");
        if let Some(x) = d.get(uid) {
            return Ok((
                Some(DomainSeen {
                    active: x.active,
                    hash: marker(&x.xml).map(|m| m.hash),
                    disks: disks_in(if x.active { &x.live } else { &x.xml })
                        .into_iter()
                        .map(|mut d| {
                            d.bytes = x.sizes.get(&d.target).copied().unwrap_or(0);
                            d
                        })
                        .collect(),
                }),
                false,
            ));
        }
        let stale = d
            .iter()
            .any(|(u, x)| x.name == name && u != uid && marker(&x.xml).is_some());
        Ok((None, stale))
    }

    async fn apply(&self, uid: &str, ops: Vec<DomainOp>) -> Result<(), HypervisorError> {
        let mut d = self.domains.lock().expect("poisoned");
        for op in ops {
            self.calls
                .lock()
                .expect("poisoned")
                .push(op.label().to_string());
            match op {
                DomainOp::RemoveStale { name } => d.retain(|_, x| x.name != name),
                DomainOp::Define { xml } => {
                    let id = tag(&xml, "uuid");
                    let name = tag(&xml, "name");
                    if d.iter().any(|(u, x)| x.name == name && *u != id) {
                        return Err(refused("domain name in use"));
                    }
                    let old = d.get(&id);
                    let active = old.is_some_and(|x| x.active);
                    let live = old.map(|x| x.live.clone()).unwrap_or_else(|| xml.clone());
                    let sizes = old.map(|x| x.sizes.clone()).unwrap_or_default();
                    d.insert(
                        id,
                        FakeDomain {
                            name,
                            xml,
                            active,
                            live,
                            sizes,
                        },
                    );
                }
                DomainOp::Start => {
                    let x = d.get_mut(uid).ok_or_else(|| refused("no domain"))?;
                    if x.active {
                        return Err(refused("already running"));
                    }
                    x.active = true;
                    x.live = x.xml.clone();
                }
                DomainOp::AttachDisk { xml } => {
                    let x = d.get_mut(uid).ok_or_else(|| refused("no domain"))?;
                    let disk = disks_in(&xml).pop().ok_or_else(|| refused("bad disk"))?;
                    if disks_in(&x.live).iter().any(|o| o.target == disk.target) {
                        return Err(refused("target in use"));
                    }
                    x.live = x
                        .live
                        .replacen("</devices>", &format!("{xml}</devices>"), 1);
                }
                DomainOp::DetachDisk { xml } => {
                    let x = d.get_mut(uid).ok_or_else(|| refused("no domain"))?;
                    let gone = disks_in(&xml).pop().ok_or_else(|| refused("bad disk"))?;
                    let kept: String = disks_in(&x.live)
                        .into_iter()
                        .filter(|o| o.target != gone.target)
                        .map(|o| {
                            super::domain::disk_xml(
                                &o.path,
                                o.iscsi.as_ref(),
                                o.rbd.as_ref(),
                                &o.target,
                                &o.serial,
                                false,
                            )
                        })
                        .collect();
                    let head = x.live.split("<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>").next().unwrap_or_default().to_string();
                    x.live = format!("{head}{kept}</devices></domain>");
                }
                DomainOp::ResizeDisk { target, bytes } => {
                    let x = d.get_mut(uid).ok_or_else(|| refused("no domain"))?;
                    x.sizes.insert(target, bytes);
                }
                DomainOp::Destroy => {
                    let x = d.get_mut(uid).ok_or_else(|| refused("no domain"))?;
                    x.active = false;
                }
            }
        }
        Ok(())
    }

    async fn remove(&self, uid: &str) -> Result<Vec<&'static str>, HypervisorError> {
        let mut ops = Vec::new();
        if let Some(x) = self.domains.lock().expect("poisoned").remove(uid) {
            if x.active {
                ops.push("destroy");
            }
            ops.push("undefine");
        }
        Ok(ops)
    }

    async fn list(&self) -> Result<HashMap<String, Listed>, HypervisorError> {
        Ok(self
            .domains
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(u, x)| {
                (
                    u.clone(),
                    Listed {
                        name: x.name.clone(),
                        active: x.active,
                    },
                )
            })
            .collect())
    }

    async fn marked(&self, uid: &str) -> Result<bool, HypervisorError> {
        Ok(self
            .domains
            .lock()
            .expect("poisoned")
            .get(uid)
            .is_some_and(|x| marker(&x.xml).is_some()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::decide::{NodeSeen, active_after, domain_ops};

    /// The decision and the executor together, against the fake and against
    /// libvirt's test driver: one pass converges, a second finds nothing to
    /// do, a power change is one call.
    async fn converges<D: Domains>(d: &D) {
        let uid = format!("6f1c7e4a-0000-4000-8000-{:012}", std::process::id());
        let name = format!("yk-t-exec-{}", std::process::id());
        let xml = format!(
            "<domain type='test'><name>{name}</name><uuid>{uid}</uuid><metadata><yukumo:node xmlns:yukumo='https://yukumo.io/xmlns/node/v1' uid='{uid}' namespace='t' name='exec' hash='h1'/></metadata><memory>1024</memory><os><type>hvm</type></os></domain>"
        );
        let step = |running: bool, hash: &'static str, xml: String| {
            let (d, uid, name) = (d.clone(), uid.clone(), name.clone());
            async move {
                let (dom, stale) = d.observe(&uid, &name).await.unwrap();
                let seen = NodeSeen {
                    domain: dom,
                    stale_name: stale,
                    ..Default::default()
                };
                let ops = domain_ops(&seen, &name, &xml, hash, running);
                let active = active_after(&seen, &ops);
                d.apply(&uid, ops.clone()).await.unwrap();
                (ops, active)
            }
        };
        let (ops, active) = step(true, "h1", xml.clone()).await;
        assert_eq!(ops.len(), 2, "define and start: {ops:?}");
        assert!(active);
        let (ops, _) = step(true, "h1", xml.clone()).await;
        assert!(ops.is_empty(), "converged: {ops:?}");
        let (ops, active) = step(false, "h1", xml.clone()).await;
        assert_eq!(ops, [DomainOp::Destroy]);
        assert!(!active);
        assert!(!d.list().await.unwrap()[&uid].active);
        assert!(d.marked(&uid).await.unwrap());
        assert_eq!(d.remove(&uid).await.unwrap(), ["undefine"]);
        assert!(!d.list().await.unwrap().contains_key(&uid));
    }

    #[tokio::test]
    async fn the_fake_converges() {
        converges(&FakeDomains::default()).await;
    }

    #[tokio::test]
    async fn libvirt_test_driver_converges() {
        // The test driver's state lives while a connection is open.
        let uri = crate::libvirt::testd::default_uri();
        let mut keep = crate::libvirt::Connect::open(&uri).unwrap();
        converges(&Hypervisor::start(&uri)).await;
        keep.close().unwrap();
    }
}
