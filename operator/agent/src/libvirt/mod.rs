//! A libvirt client in Rust: the calls the agent makes, spoken directly in
//! libvirt's remote protocol to the daemon's unix socket.
//!
//! libvirt's C client library (and the fifty libraries it loads: GLib,
//! GnuTLS, libxml2, ICU, Kerberos, curl, …) cost the agent about 15 MB of
//! resident memory for a few dozen calls, and its event delivery needed an
//! event-loop thread and unsafe FFI. The protocol is stable (procedures are
//! only ever added), so the agent speaks it itself: XDR over the socket
//! ([`xdr`], [`rpc`]), with the object types and method names of the `virt`
//! crate it replaces.
//!
//! URIs name a daemon's socket: `qemu:///system` (`/run/libvirt/libvirt-sock`,
//! or `virtqemud-sock` with modular daemons), `qemu:///session`,
//! `DRIVER[+unix]:///PATH?socket=SOCKET` for any driver the daemon has —
//! `test+unix:///default?socket=…` reaches libvirt's test driver inside a
//! daemon. Remote transports (tcp, tls, ssh) are refused with a message.

pub mod rpc;
#[cfg(test)]
pub mod testd;
pub mod uri;
pub mod xdr;

use std::sync::Arc;

use rpc::Rpc;
use xdr::{Dec, Enc};

/// Procedure numbers of `remote_protocol.x`.
mod proc_ {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_CLOSE: i32 = 2;
    pub const CONNECT_GET_TYPE: i32 = 3;
    pub const NODE_GET_INFO: i32 = 6;
    pub const CONNECT_GET_CAPABILITIES: i32 = 7;
    pub const DOMAIN_CREATE: i32 = 9;
    pub const DOMAIN_DEFINE_XML: i32 = 11;
    pub const DOMAIN_DESTROY: i32 = 12;
    pub const DOMAIN_GET_XML_DESC: i32 = 14;
    pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
    pub const DOMAIN_LOOKUP_BY_UUID: i32 = 24;
    pub const DOMAIN_UNDEFINE: i32 = 35;
    pub const CONNECT_SUPPORTS_FEATURE: i32 = 60;
    pub const AUTH_LIST: i32 = 66;
    pub const AUTH_POLKIT: i32 = 70;
    pub const STORAGE_POOL_DEFINE_XML: i32 = 77;
    pub const STORAGE_POOL_CREATE: i32 = 78;
    pub const STORAGE_POOL_BUILD: i32 = 79;
    pub const STORAGE_POOL_DESTROY: i32 = 80;
    pub const STORAGE_POOL_UNDEFINE: i32 = 82;
    pub const STORAGE_POOL_REFRESH: i32 = 83;
    pub const STORAGE_POOL_LOOKUP_BY_NAME: i32 = 84;
    pub const STORAGE_POOL_GET_INFO: i32 = 87;
    pub const STORAGE_POOL_GET_XML_DESC: i32 = 88;
    pub const STORAGE_POOL_SET_AUTOSTART: i32 = 90;
    pub const STORAGE_VOL_CREATE_XML: i32 = 93;
    pub const STORAGE_VOL_DELETE: i32 = 94;
    pub const STORAGE_VOL_LOOKUP_BY_NAME: i32 = 95;
    pub const STORAGE_VOL_LOOKUP_BY_PATH: i32 = 97;
    pub const STORAGE_VOL_GET_INFO: i32 = 98;
    pub const STORAGE_VOL_GET_PATH: i32 = 100;
    pub const DOMAIN_EVENT_LIFECYCLE: i32 = 107;
    pub const STORAGE_VOL_CREATE_XML_FROM: i32 = 125;
    pub const SECRET_DEFINE_XML: i32 = 142;
    pub const SECRET_SET_VALUE: i32 = 144;
    pub const SECRET_GET_VALUE: i32 = 145;
    pub const SECRET_LOOKUP_BY_USAGE: i32 = 147;
    pub const DOMAIN_IS_ACTIVE: i32 = 150;
    pub const STORAGE_POOL_IS_ACTIVE: i32 = 154;
    pub const CONNECT_GET_LIB_VERSION: i32 = 157;
    pub const DOMAIN_ATTACH_DEVICE_FLAGS: i32 = 160;
    pub const DOMAIN_DETACH_DEVICE_FLAGS: i32 = 161;
    pub const DOMAIN_EVENTS_REGISTER_ANY: i32 = 167;
    pub const DOMAIN_EVENTS_DEREGISTER_ANY: i32 = 168;
    pub const DOMAIN_GET_BLOCK_INFO: i32 = 194;
    pub const DOMAIN_BLOCK_RESIZE: i32 = 251;
    pub const STORAGE_VOL_RESIZE: i32 = 260;
    pub const CONNECT_LIST_ALL_DOMAINS: i32 = 273;
    pub const STORAGE_POOL_LIST_ALL_VOLUMES: i32 = 282;
}

/// The flag values of libvirt's C API the agent passes.
pub mod sys {
    pub const VIR_DOMAIN_XML_INACTIVE: u32 = 2;
    pub const VIR_DOMAIN_AFFECT_LIVE: u32 = 1;
    pub const VIR_DOMAIN_BLOCK_RESIZE_BYTES: u32 = 1;
    pub const VIR_CONNECT_LIST_DOMAINS_ACTIVE: u32 = 1;
    pub const VIR_CONNECT_LIST_DOMAINS_INACTIVE: u32 = 2;
    pub const VIR_SECRET_USAGE_TYPE_CEPH: u32 = 2;
    pub const VIR_DOMAIN_EVENT_ID_LIFECYCLE: i32 = 0;
    pub const VIR_DOMAIN_EVENT_DEFINED: i32 = 0;
    pub const VIR_DOMAIN_EVENT_UNDEFINED: i32 = 1;
    pub const VIR_DOMAIN_EVENT_STARTED: i32 = 2;
    pub const VIR_DOMAIN_EVENT_SUSPENDED: i32 = 3;
    pub const VIR_DOMAIN_EVENT_RESUMED: i32 = 4;
    pub const VIR_DOMAIN_EVENT_STOPPED: i32 = 5;
    pub const VIR_DOMAIN_EVENT_SHUTDOWN: i32 = 6;
    pub const VIR_DOMAIN_EVENT_PMSUSPENDED: i32 = 7;
    pub const VIR_DOMAIN_EVENT_CRASHED: i32 = 8;
    #[cfg(test)]
    pub const VIR_DOMAIN_EVENT_STOPPED_DESTROYED: i32 = 1;
}

/// An error libvirt reported (its `virErrorNumber` and message), or one of
/// the connection itself (code -1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: i32,
    pub message: String,
}

impl Error {
    pub fn new(code: i32, message: String) -> Self {
        Error { code, message }
    }
    pub(crate) fn protocol(what: &str) -> Self {
        Error::new(-1, format!("libvirt protocol: {what}"))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

/// `virDrvFeature`: the peer speaks the keepalive program.
const VIR_DRV_FEATURE_PROGRAM_KEEPALIVE: i32 = 10;

/// An open connection.
pub struct Connect {
    rpc: Arc<Rpc>,
}

/// `virNodeInfo`, the parts the agent reads.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// KiB.
    pub memory: u64,
    pub cpus: u32,
}

impl Connect {
    /// Connect to the daemon `uri` names and open its driver.
    pub fn open(uri: &str) -> Result<Connect> {
        Self::open_with(uri, rpc::DEAD_AFTER)
    }

    /// [`Connect::open`], the daemon taken for dead after `dead_after` of
    /// silence.
    fn open_with(uri: &str, dead_after: std::time::Duration) -> Result<Connect> {
        let target = uri::parse(uri)?;
        let rpc = Arc::new(Rpc::connect(&target.socket)?);
        let c = Connect { rpc };
        c.authenticate()?;
        let mut a = Enc::default();
        a.opt_str(Some(&target.name)).u32(0);
        c.call(proc_::CONNECT_OPEN, &a)?;
        c.keepalive(dead_after)?;
        Ok(c)
    }

    /// Tell the daemon the client answers keepalive pings (it then pings
    /// an idle connection), and take its silence for death.
    fn keepalive(&self, dead_after: std::time::Duration) -> Result<()> {
        let mut a = Enc::default();
        a.i32(VIR_DRV_FEATURE_PROGRAM_KEEPALIVE);
        let r = self.call(proc_::CONNECT_SUPPORTS_FEATURE, &a)?;
        if Dec::new(&r).bool()? {
            self.rpc.start_keepalive(dead_after)?;
        }
        Ok(())
    }

    /// The socket's authentication: none, or polkit (which the daemon
    /// grants from the caller's uid); SASL is not spoken.
    fn authenticate(&self) -> Result<()> {
        let r = self.call(proc_::AUTH_LIST, &Enc::default())?;
        let mut d = Dec::new(&r);
        let n = d.count()?;
        let types: Vec<i32> = (0..n).map(|_| d.i32()).collect::<Result<_>>()?;
        if types.is_empty() || types.contains(&0) {
            return Ok(());
        }
        if types.contains(&2) {
            let r = self.call(proc_::AUTH_POLKIT, &Enc::default())?;
            return if Dec::new(&r).bool()? {
                Ok(())
            } else {
                Err(Error::new(
                    -1,
                    "libvirt's polkit authentication did not complete".into(),
                ))
            };
        }
        Err(Error::new(
            -1,
            "libvirt's socket asks for SASL authentication, which the agent does not speak: \
             use a socket with auth none or polkit"
                .into(),
        ))
    }

    fn call(&self, proc_: i32, args: &Enc) -> Result<Vec<u8>> {
        self.rpc.call(proc_, &args.0)
    }

    pub fn close(&mut self) -> Result<()> {
        let r = self.call(proc_::CONNECT_CLOSE, &Enc::default());
        self.rpc.shutdown();
        r.map(|_| ())
    }

    pub fn is_alive(&self) -> Result<bool> {
        Ok(self.rpc.alive())
    }

    pub fn get_node_info(&self) -> Result<NodeInfo> {
        let r = self.call(proc_::NODE_GET_INFO, &Enc::default())?;
        let mut d = Dec::new(&r);
        // char model[32]: 32 XDR units of one char each.
        d.skip(32 * 4)?;
        let memory = d.u64()?;
        let cpus = d.i32()?;
        Ok(NodeInfo {
            memory,
            cpus: u32::try_from(cpus).unwrap_or(0),
        })
    }

    pub fn get_lib_version(&self) -> Result<u32> {
        let r = self.call(proc_::CONNECT_GET_LIB_VERSION, &Enc::default())?;
        Ok(Dec::new(&r).u64()? as u32)
    }

    pub fn get_type(&self) -> Result<String> {
        let r = self.call(proc_::CONNECT_GET_TYPE, &Enc::default())?;
        Dec::new(&r).string()
    }

    pub fn get_capabilities(&self) -> Result<String> {
        let r = self.call(proc_::CONNECT_GET_CAPABILITIES, &Enc::default())?;
        Dec::new(&r).string()
    }

    pub fn list_all_domains(&self, flags: u32) -> Result<Vec<Domain>> {
        let mut a = Enc::default();
        a.i32(1).u32(flags);
        let r = self.call(proc_::CONNECT_LIST_ALL_DOMAINS, &a)?;
        let mut d = Dec::new(&r);
        let n = d.count()?;
        (0..n).map(|_| Domain::decode(&self.rpc, &mut d)).collect()
    }

    /// Deliver domain lifecycle events as `(domain UUID, event, detail)` to
    /// `sink`, on the connection's reader thread.
    pub fn register_lifecycle(
        &self,
        sink: impl Fn(String, i32, i32) + Send + 'static,
    ) -> Result<()> {
        let rpc = Arc::downgrade(&self.rpc);
        self.rpc.set_events(Some(Box::new(move |p, payload| {
            if p != proc_::DOMAIN_EVENT_LIFECYCLE {
                return;
            }
            let Some(rpc) = rpc.upgrade() else { return };
            let mut d = Dec::new(payload);
            let parsed = Domain::decode(&rpc, &mut d)
                .and_then(|dom| Ok((dom.get_uuid_string()?, d.i32()?, d.i32()?)));
            match parsed {
                Ok((uuid, event, detail)) => sink(uuid, event, detail),
                Err(e) => tracing::warn!(error = %e, "a libvirt lifecycle event could not be read"),
            }
        })));
        let mut a = Enc::default();
        a.i32(sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE);
        if let Err(e) = self.call(proc_::DOMAIN_EVENTS_REGISTER_ANY, &a) {
            self.rpc.set_events(None);
            return Err(e);
        }
        Ok(())
    }

    pub fn deregister_lifecycle(&self) -> Result<()> {
        let mut a = Enc::default();
        a.i32(sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE);
        let r = self.call(proc_::DOMAIN_EVENTS_DEREGISTER_ANY, &a);
        self.rpc.set_events(None);
        r.map(|_| ())
    }
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn parse_uuid(s: &str) -> Result<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    let bad = || Error::new(-1, format!("invalid UUID {s:?}"));
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// An object of the daemon (`remote_nonnull_*`): a call on it sends the
/// object, then the call's own arguments.
trait Remote {
    fn rpc(&self) -> &Arc<Rpc>;
    fn encode(&self, a: &mut Enc);

    fn call(&self, proc_: i32, rest: impl FnOnce(&mut Enc)) -> Result<Vec<u8>> {
        let mut a = Enc::default();
        self.encode(&mut a);
        rest(&mut a);
        self.rpc().call(proc_, &a.0)
    }
}

impl Remote for Domain {
    fn rpc(&self) -> &Arc<Rpc> {
        &self.rpc
    }
    fn encode(&self, a: &mut Enc) {
        a.str(&self.name).fixed(&self.uuid).i32(self.id);
    }
}

impl Remote for StoragePool {
    fn rpc(&self) -> &Arc<Rpc> {
        &self.rpc
    }
    fn encode(&self, a: &mut Enc) {
        a.str(&self.name).fixed(&self.uuid);
    }
}

impl Remote for StorageVol {
    fn rpc(&self) -> &Arc<Rpc> {
        &self.rpc
    }
    fn encode(&self, a: &mut Enc) {
        a.str(&self.pool).str(&self.name).str(&self.key);
    }
}

impl Remote for Secret {
    fn rpc(&self) -> &Arc<Rpc> {
        &self.rpc
    }
    fn encode(&self, a: &mut Enc) {
        a.fixed(&self.uuid).i32(self.usage_type).str(&self.usage_id);
    }
}

/// A domain (`remote_nonnull_domain`).
pub struct Domain {
    rpc: Arc<Rpc>,
    name: String,
    uuid: [u8; 16],
    id: i32,
}

/// `virDomainBlockInfo`.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    pub capacity: u64,
}

impl Domain {
    fn decode(rpc: &Arc<Rpc>, d: &mut Dec) -> Result<Domain> {
        Ok(Domain {
            rpc: rpc.clone(),
            name: d.string()?,
            uuid: d.fixed::<16>()?,
            id: d.i32()?,
        })
    }

    fn one(rpc: &Arc<Rpc>, r: &[u8]) -> Result<Domain> {
        Domain::decode(rpc, &mut Dec::new(r))
    }

    pub fn lookup_by_name(c: &Connect, name: &str) -> Result<Domain> {
        let mut a = Enc::default();
        a.str(name);
        Domain::one(&c.rpc, &c.call(proc_::DOMAIN_LOOKUP_BY_NAME, &a)?)
    }

    pub fn lookup_by_uuid_string(c: &Connect, uuid: &str) -> Result<Domain> {
        let mut a = Enc::default();
        a.fixed(&parse_uuid(uuid)?);
        Domain::one(&c.rpc, &c.call(proc_::DOMAIN_LOOKUP_BY_UUID, &a)?)
    }

    pub fn define_xml(c: &Connect, xml: &str) -> Result<Domain> {
        let mut a = Enc::default();
        a.str(xml);
        Domain::one(&c.rpc, &c.call(proc_::DOMAIN_DEFINE_XML, &a)?)
    }

    pub fn get_name(&self) -> Result<String> {
        Ok(self.name.clone())
    }

    pub fn get_uuid_string(&self) -> Result<String> {
        Ok(uuid_string(&self.uuid))
    }

    pub fn get_xml_desc(&self, flags: u32) -> Result<String> {
        let r = self.call(proc_::DOMAIN_GET_XML_DESC, |a| {
            a.u32(flags);
        })?;
        Dec::new(&r).string()
    }

    pub fn is_active(&self) -> Result<bool> {
        let r = self.call(proc_::DOMAIN_IS_ACTIVE, |_| {})?;
        Dec::new(&r).bool()
    }

    pub fn create(&self) -> Result<()> {
        self.call(proc_::DOMAIN_CREATE, |_| {}).map(|_| ())
    }

    pub fn destroy(&self) -> Result<()> {
        self.call(proc_::DOMAIN_DESTROY, |_| {}).map(|_| ())
    }

    pub fn undefine(&self) -> Result<()> {
        self.call(proc_::DOMAIN_UNDEFINE, |_| {}).map(|_| ())
    }

    pub fn attach_device_flags(&self, xml: &str, flags: u32) -> Result<()> {
        self.call(proc_::DOMAIN_ATTACH_DEVICE_FLAGS, |a| {
            a.str(xml).u32(flags);
        })
        .map(|_| ())
    }

    pub fn detach_device_flags(&self, xml: &str, flags: u32) -> Result<()> {
        self.call(proc_::DOMAIN_DETACH_DEVICE_FLAGS, |a| {
            a.str(xml).u32(flags);
        })
        .map(|_| ())
    }

    pub fn block_resize(&self, disk: &str, size: u64, flags: u32) -> Result<()> {
        self.call(proc_::DOMAIN_BLOCK_RESIZE, |a| {
            a.str(disk).u64(size).u32(flags);
        })
        .map(|_| ())
    }

    pub fn get_block_info(&self, disk: &str, flags: u32) -> Result<BlockInfo> {
        let r = self.call(proc_::DOMAIN_GET_BLOCK_INFO, |a| {
            a.str(disk).u32(flags);
        })?;
        // allocation, capacity, physical
        let mut d = Dec::new(&r);
        d.u64()?;
        Ok(BlockInfo { capacity: d.u64()? })
    }
}

/// A storage pool (`remote_nonnull_storage_pool`).
pub struct StoragePool {
    rpc: Arc<Rpc>,
    name: String,
    uuid: [u8; 16],
}

/// `virStoragePoolInfo`.
#[derive(Debug, Clone)]
pub struct StoragePoolInfo {
    pub capacity: u64,
    pub available: u64,
}

impl StoragePool {
    fn one(rpc: &Arc<Rpc>, r: &[u8]) -> Result<StoragePool> {
        let mut d = Dec::new(r);
        Ok(StoragePool {
            rpc: rpc.clone(),
            name: d.string()?,
            uuid: d.fixed::<16>()?,
        })
    }

    pub fn lookup_by_name(c: &Connect, name: &str) -> Result<StoragePool> {
        let mut a = Enc::default();
        a.str(name);
        StoragePool::one(&c.rpc, &c.call(proc_::STORAGE_POOL_LOOKUP_BY_NAME, &a)?)
    }

    pub fn define_xml(c: &Connect, xml: &str, flags: u32) -> Result<StoragePool> {
        let mut a = Enc::default();
        a.str(xml).u32(flags);
        StoragePool::one(&c.rpc, &c.call(proc_::STORAGE_POOL_DEFINE_XML, &a)?)
    }

    pub fn get_xml_desc(&self, flags: u32) -> Result<String> {
        let r = self.call(proc_::STORAGE_POOL_GET_XML_DESC, |a| {
            a.u32(flags);
        })?;
        Dec::new(&r).string()
    }

    pub fn is_active(&self) -> Result<bool> {
        let r = self.call(proc_::STORAGE_POOL_IS_ACTIVE, |_| {})?;
        Dec::new(&r).bool()
    }

    pub fn build(&self, flags: u32) -> Result<()> {
        self.call(proc_::STORAGE_POOL_BUILD, |a| {
            a.u32(flags);
        })
        .map(|_| ())
    }

    pub fn create(&self, flags: u32) -> Result<()> {
        self.call(proc_::STORAGE_POOL_CREATE, |a| {
            a.u32(flags);
        })
        .map(|_| ())
    }

    pub fn destroy(&self) -> Result<()> {
        self.call(proc_::STORAGE_POOL_DESTROY, |_| {}).map(|_| ())
    }

    pub fn undefine(&self) -> Result<()> {
        self.call(proc_::STORAGE_POOL_UNDEFINE, |_| {}).map(|_| ())
    }

    pub fn refresh(&self, flags: u32) -> Result<()> {
        self.call(proc_::STORAGE_POOL_REFRESH, |a| {
            a.u32(flags);
        })
        .map(|_| ())
    }

    pub fn set_autostart(&self, on: bool) -> Result<()> {
        self.call(proc_::STORAGE_POOL_SET_AUTOSTART, |a| {
            a.i32(i32::from(on));
        })
        .map(|_| ())
    }

    pub fn get_info(&self) -> Result<StoragePoolInfo> {
        let r = self.call(proc_::STORAGE_POOL_GET_INFO, |_| {})?;
        // state (an unsigned char: one XDR unit), capacity, allocation,
        // available
        let mut d = Dec::new(&r);
        d.u32()?;
        let capacity = d.u64()?;
        d.u64()?;
        Ok(StoragePoolInfo {
            capacity,
            available: d.u64()?,
        })
    }

    pub fn list_all_volumes(&self, flags: u32) -> Result<Vec<StorageVol>> {
        let r = self.call(proc_::STORAGE_POOL_LIST_ALL_VOLUMES, |a| {
            a.i32(1).u32(flags);
        })?;
        let mut d = Dec::new(&r);
        let n = d.count()?;
        (0..n)
            .map(|_| StorageVol::decode(&self.rpc, &mut d))
            .collect()
    }
}

/// A storage volume (`remote_nonnull_storage_vol`).
pub struct StorageVol {
    rpc: Arc<Rpc>,
    pool: String,
    name: String,
    key: String,
}

/// `virStorageVolInfo`.
#[derive(Debug, Clone)]
pub struct StorageVolInfo {
    pub capacity: u64,
    pub allocation: u64,
}

impl StorageVol {
    fn decode(rpc: &Arc<Rpc>, d: &mut Dec) -> Result<StorageVol> {
        Ok(StorageVol {
            rpc: rpc.clone(),
            pool: d.string()?,
            name: d.string()?,
            key: d.string()?,
        })
    }

    fn one(rpc: &Arc<Rpc>, r: &[u8]) -> Result<StorageVol> {
        StorageVol::decode(rpc, &mut Dec::new(r))
    }

    pub fn create_xml(pool: &StoragePool, xml: &str, flags: u32) -> Result<StorageVol> {
        let r = pool.call(proc_::STORAGE_VOL_CREATE_XML, |a| {
            a.str(xml).u32(flags);
        })?;
        StorageVol::one(&pool.rpc, &r)
    }

    pub fn create_xml_from(
        pool: &StoragePool,
        xml: &str,
        from: &StorageVol,
        flags: u32,
    ) -> Result<StorageVol> {
        let r = pool.call(proc_::STORAGE_VOL_CREATE_XML_FROM, |a| {
            a.str(xml);
            from.encode(a);
            a.u32(flags);
        })?;
        StorageVol::one(&pool.rpc, &r)
    }

    pub fn lookup_by_name(pool: &StoragePool, name: &str) -> Result<StorageVol> {
        let r = pool.call(proc_::STORAGE_VOL_LOOKUP_BY_NAME, |a| {
            a.str(name);
        })?;
        StorageVol::one(&pool.rpc, &r)
    }

    pub fn lookup_by_path(c: &Connect, path: &str) -> Result<StorageVol> {
        let mut a = Enc::default();
        a.str(path);
        StorageVol::one(&c.rpc, &c.call(proc_::STORAGE_VOL_LOOKUP_BY_PATH, &a)?)
    }

    pub fn get_name(&self) -> Result<String> {
        Ok(self.name.clone())
    }

    pub fn get_path(&self) -> Result<String> {
        let r = self.call(proc_::STORAGE_VOL_GET_PATH, |_| {})?;
        Dec::new(&r).string()
    }

    pub fn get_info(&self) -> Result<StorageVolInfo> {
        let r = self.call(proc_::STORAGE_VOL_GET_INFO, |_| {})?;
        // type (a char: one XDR unit), capacity, allocation
        let mut d = Dec::new(&r);
        d.i32()?;
        Ok(StorageVolInfo {
            capacity: d.u64()?,
            allocation: d.u64()?,
        })
    }

    pub fn resize(&self, capacity: u64, flags: u32) -> Result<()> {
        self.call(proc_::STORAGE_VOL_RESIZE, |a| {
            a.u64(capacity).u32(flags);
        })
        .map(|_| ())
    }

    pub fn delete(&self, flags: u32) -> Result<()> {
        self.call(proc_::STORAGE_VOL_DELETE, |a| {
            a.u32(flags);
        })
        .map(|_| ())
    }
}

/// A secret (`remote_nonnull_secret`).
pub struct Secret {
    rpc: Arc<Rpc>,
    uuid: [u8; 16],
    usage_type: i32,
    usage_id: String,
}

impl Secret {
    fn one(rpc: &Arc<Rpc>, r: &[u8]) -> Result<Secret> {
        let mut d = Dec::new(r);
        Ok(Secret {
            rpc: rpc.clone(),
            uuid: d.fixed::<16>()?,
            usage_type: d.i32()?,
            usage_id: d.string()?,
        })
    }

    pub fn lookup_by_usage(c: &Connect, usage_type: i32, usage_id: &str) -> Result<Secret> {
        let mut a = Enc::default();
        a.i32(usage_type).str(usage_id);
        Secret::one(&c.rpc, &c.call(proc_::SECRET_LOOKUP_BY_USAGE, &a)?)
    }

    pub fn define_xml(c: &Connect, xml: &str, flags: u32) -> Result<Secret> {
        let mut a = Enc::default();
        a.str(xml).u32(flags);
        Secret::one(&c.rpc, &c.call(proc_::SECRET_DEFINE_XML, &a)?)
    }

    pub fn get_value(&self, flags: u32) -> Result<Vec<u8>> {
        let r = self.call(proc_::SECRET_GET_VALUE, |a| {
            a.u32(flags);
        })?;
        Dec::new(&r).opaque()
    }

    pub fn set_value(&self, value: &[u8], flags: u32) -> Result<()> {
        self.call(proc_::SECRET_SET_VALUE, |a| {
            a.opaque(value).u32(flags);
        })
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that answers nothing (stopped) is found dead within the
    /// keepalive's limit, and the call waiting on it fails; one that pings
    /// keeps an idle connection open.
    #[test]
    fn a_silent_daemon_is_found_dead_and_fails_the_waiting_call() {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        use std::time::{Duration, Instant};
        let d = testd::start("keepalive");
        let pid = Pid::from_raw(d.process.id() as i32);
        let uri = format!("test+unix:///default?socket={}", d.socket);
        let c = Connect::open_with(&uri, Duration::from_secs(3)).unwrap();
        // Idle for longer than the limit and than the daemon's patience (5
        // pings a second apart): its pings are answered, and keep it open.
        std::thread::sleep(Duration::from_secs(8));
        assert!(c.is_alive().unwrap());
        c.get_lib_version().expect("alive after an idle spell");
        kill(pid, Signal::SIGSTOP).unwrap();
        let t = Instant::now();
        let r = c.get_lib_version();
        let took = t.elapsed();
        kill(pid, Signal::SIGCONT).unwrap();
        d.stop();
        assert!(r.is_err(), "{r:?}");
        assert!(!c.is_alive().unwrap());
        assert!(took < Duration::from_secs(8), "found dead after {took:?}");
    }

    #[test]
    fn uuids_round_trip() {
        let s = "6f1c7e4a-0000-4000-8000-00000000000a";
        assert_eq!(uuid_string(&parse_uuid(s).unwrap()), s);
        assert!(parse_uuid("6f1c7e4a").is_err());
        assert!(parse_uuid("zz1c7e4a-0000-4000-8000-00000000000a").is_err());
    }
}
