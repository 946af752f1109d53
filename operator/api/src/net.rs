//! Network values shared by the controller and the agent: an IPv4 network,
//! a MAC address and a segment. Each is parsed once, where it enters (the
//! API server's JSON), and travels typed from there on: nothing is
//! formatted into a string to be parsed back.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a network value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    what: &'static str,
    input: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not {}", self.input, self.what)
    }
}

impl std::error::Error for ParseError {}

/// An IPv4 network in CIDR notation, e.g. `10.0.0.0/24`. The address may
/// have host bits set (`10.0.0.1/24` is the address 10.0.0.1 on its /24);
/// [`Ipv4Net::is_network`] tells whether it is the network itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// `addr/prefix`; `None` when the prefix is longer than 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
        (prefix <= 32).then_some(Ipv4Net { addr, prefix })
    }
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    /// The netmask, e.g. 255.255.255.0 for a /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }
    /// The network address (host bits zero).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    /// The broadcast address (host bits one).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    /// Whether the address is the network address itself.
    pub fn is_network(&self) -> bool {
        self.addr == self.network()
    }
    /// The same prefix with the network address.
    pub fn trunc(&self) -> Ipv4Net {
        Ipv4Net {
            addr: self.network(),
            prefix: self.prefix,
        }
    }
    /// `ip` on this network (`ip/prefix`).
    pub fn with_addr(&self, ip: Ipv4Addr) -> Ipv4Net {
        Ipv4Net {
            addr: ip,
            prefix: self.prefix,
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
    /// The first host address (network + 1), e.g. the default gateway.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()).wrapping_add(1))
    }
    /// Host addresses: all but the network and broadcast addresses (every
    /// address of a /31 or /32).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let (lo, hi) = (u32::from(self.network()), u32::from(self.broadcast()));
        let (lo, hi) = if self.prefix >= 31 {
            (lo, hi)
        } else {
            (lo + 1, hi - 1)
        };
        (lo..=hi).map(Ipv4Addr::from)
    }
    /// Number of addresses in the network.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError {
            what: "an IPv4 network such as 10.0.0.0/24",
            input: s.to_string(),
        };
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let prefix: u8 = p.parse().map_err(|_| err())?;
        Ipv4Net::new(addr, prefix).ok_or_else(err)
    }
}

/// The JSON schema of a value written as a string of at most `max` bytes.
fn string_schema(max: u32, description: &str) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "maxLength": max,
        "description": description,
    })
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(Ipv4Net);

impl JsonSchema for Ipv4Net {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Ipv4Net".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        string_schema(18, "IPv4 network in CIDR notation, e.g. 10.0.0.0/24")
    }
}

/// An Ethernet MAC address, written `02:00:5e:10:00:01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
    /// A locally administered, unicast address.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0b11 == 0b10
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let err = || ParseError {
            what: "a MAC address such as 02:00:5e:10:00:01",
            input: s.to_string(),
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

string_serde!(MacAddr);

impl JsonSchema for MacAddr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MacAddr".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9a-f]{2}:){5}[0-9a-f]{2}$",
            "description": "MAC address, e.g. 02:00:5e:10:00:01",
        })
    }
}

/// Addresses a Site may hand out: a network (`203.0.113.0/28`, every
/// address of it) or an inclusive range (`203.0.113.10-203.0.113.20`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressRange {
    Cidr(Ipv4Net),
    Range(Ipv4Addr, Ipv4Addr),
}

impl AddressRange {
    /// First and last address (inclusive).
    pub fn bounds(&self) -> (Ipv4Addr, Ipv4Addr) {
        match self {
            AddressRange::Cidr(n) => (n.network(), n.broadcast()),
            AddressRange::Range(a, b) => (*a, *b),
        }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let (a, b) = self.bounds();
        (u32::from(a)..=u32::from(b)).contains(&u32::from(ip))
    }
    /// Every address, in order (none for a reversed range).
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let (a, b) = self.bounds();
        (u32::from(a)..=u32::from(b)).map(Ipv4Addr::from)
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressRange::Cidr(n) => n.fmt(f),
            AddressRange::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

impl FromStr for AddressRange {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.contains('/') {
            return s.parse().map(AddressRange::Cidr);
        }
        let err = || ParseError {
            what: "an IPv4 network (203.0.113.0/28) or range (203.0.113.10-203.0.113.20)",
            input: s.to_string(),
        };
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        Ok(AddressRange::Range(
            a.parse().map_err(|_| err())?,
            b.parse().map_err(|_| err())?,
        ))
    }
}

string_serde!(AddressRange);

impl JsonSchema for AddressRange {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AddressRange".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        string_schema(
            31,
            "IPv4 network (203.0.113.0/28) or address range (203.0.113.10-203.0.113.20)",
        )
    }
}

/// Segment technology.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SegmentType {
    /// 802.1Q VLAN on each host's uplink (needs a kernel with 8021q and a trunk).
    Vlan,
    /// VXLAN over the hosts' underlay addresses, unicast with static FDB entries.
    Vxlan,
}

impl SegmentType {
    /// The type as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SegmentType::Vlan => "vlan",
            SegmentType::Vxlan => "vxlan",
        }
    }
}

impl fmt::Display for SegmentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An allocated L2 segment: its type and its id (VLAN id or VNI). The two
/// kinds have separate id spaces: `vlan 100` and `vxlan 100` are different
/// segments.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub struct Segment {
    /// `vlan` or `vxlan`.
    #[serde(rename = "type")]
    pub type_: SegmentType,
    /// VLAN id (1-4094) or VNI (1-16777215).
    pub id: u32,
}

impl Segment {
    pub fn vxlan(id: u32) -> Segment {
        Segment {
            type_: SegmentType::Vxlan,
            id,
        }
    }
    pub fn vlan(id: u32) -> Segment {
        Segment {
            type_: SegmentType::Vlan,
            id,
        }
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.type_, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_once_and_answer_every_question() {
        let n: Ipv4Net = "10.0.0.0/24".parse().unwrap();
        assert_eq!(n.prefix(), 24);
        assert_eq!(n.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(n.first_host(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert!(n.is_network());
        assert!(n.contains(Ipv4Addr::new(10, 0, 0, 77)));
        assert!(!n.contains(Ipv4Addr::new(10, 0, 1, 0)));
        assert_eq!(n.hosts().count(), 254);
        assert_eq!(n.size(), 256);
        let h: Ipv4Net = "10.0.0.9/24".parse().unwrap();
        assert!(!h.is_network());
        assert_eq!(h.trunc(), n);
        assert_eq!(h.to_string(), "10.0.0.9/24");
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Net>().unwrap().netmask(),
            Ipv4Addr::UNSPECIFIED
        );
        let p31: Ipv4Net = "192.0.2.0/31".parse().unwrap();
        assert_eq!(p31.hosts().count(), 2);
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/24",
            "fd00::/64",
            "10.0.0.0/",
            "10.0.0.0/+4",
        ] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, "\"10.0.0.0/24\"");
        assert_eq!(serde_json::from_str::<Ipv4Net>(&json).unwrap(), n);
        assert!(serde_json::from_str::<Ipv4Net>("\"nope\"").is_err());
    }

    #[test]
    fn address_ranges() {
        let r: AddressRange = "198.51.100.10-198.51.100.20".parse().unwrap();
        assert!(r.contains("198.51.100.20".parse().unwrap()));
        assert!(!r.contains("198.51.100.21".parse().unwrap()));
        assert_eq!(r.addresses().count(), 11);
        assert_eq!(r.to_string(), "198.51.100.10-198.51.100.20");
        let c: AddressRange = "203.0.113.0/28".parse().unwrap();
        assert_eq!(c.addresses().count(), 16);
        assert!(!c.contains("203.0.113.16".parse().unwrap()));
        assert_eq!(c.to_string(), "203.0.113.0/28");
        assert!("203.0.113.1".parse::<AddressRange>().is_err());
        assert!("a-b".parse::<AddressRange>().is_err());
    }

    #[test]
    fn macs_round_trip() {
        let m: MacAddr = "02:AB:00:00:00:09".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:00:00:00:09");
        assert!(m.is_local_unicast());
        assert!("02:ab:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:ab:00:00:00:09:01".parse::<MacAddr>().is_err());
        assert!("2:ab:00:00:00:09".parse::<MacAddr>().is_err());
        assert_eq!(
            serde_json::from_value::<MacAddr>(serde_json::json!("02:00:00:00:00:07")).unwrap(),
            MacAddr([2, 0, 0, 0, 0, 7])
        );
    }

    #[test]
    fn segments_are_typed_on_the_wire() {
        let s = Segment::vxlan(1000);
        assert_eq!(
            serde_json::to_value(s).unwrap(),
            serde_json::json!({"type": "vxlan", "id": 1000})
        );
        assert_ne!(Segment::vlan(7), Segment::vxlan(7));
        assert_eq!(s.to_string(), "vxlan 1000");
    }
}
