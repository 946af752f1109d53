//! Types shared by several kinds: conditions, sizes, images.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::reason::Reason;

/// Regex for a DNS-1123 label: what Kubernetes accepts as a namespaced object
/// name segment and what a guest accepts as a hostname.
pub const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// The standard condition types every yukumo kind reports (kstatus).
pub mod condition_types {
    /// The object has reached its desired state.
    pub const READY: &str = "Ready";
    /// yukumo is working towards the desired state.
    pub const RECONCILING: &str = "Reconciling";
    /// yukumo cannot make progress without a change to the spec or the fleet.
    pub const STALLED: &str = "Stalled";
}

/// Status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// `True` when `b`, else `False`.
    pub fn from_bool(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// One observation of an object's state, in the shape kstatus and
/// `kubectl wait --for=condition=…` understand.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: `Ready`, `Reconciling`, `Stalled`, or a kind-specific one.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Machine-readable reason in CamelCase, e.g. `NetworkGroupNotFound`.
    pub reason: Reason,
    /// Human-readable explanation, naming the field or object at fault.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (not when the condition was last written).
    pub last_transition_time: Time,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A new condition stamped with the current time.
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: Reason,
        message: impl Into<String>,
        observed_generation: Option<i64>,
    ) -> Self {
        Condition {
            type_: type_.to_string(),
            status,
            reason,
            message: message.into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation,
        }
    }
}

/// Operations on a list of conditions, keyed by type.
pub trait Conditions {
    /// The condition of this type, if present.
    fn get_condition(&self, type_: &str) -> Option<&Condition>;
    /// Whether the condition of this type is `True`.
    fn is_true(&self, type_: &str) -> bool {
        self.get_condition(type_)
            .is_some_and(|c| c.status == ConditionStatus::True)
    }
    /// Insert or replace the condition of `new.type_`, keeping the previous
    /// `lastTransitionTime` when the status did not change, so that a
    /// re-reconcile with nothing new writes nothing new.
    fn set_condition(&mut self, new: Condition);
}

impl Conditions for Vec<Condition> {
    fn get_condition(&self, type_: &str) -> Option<&Condition> {
        self.iter().find(|c| c.type_ == type_)
    }

    fn set_condition(&mut self, mut new: Condition) {
        match self.iter_mut().find(|c| c.type_ == new.type_) {
            Some(old) => {
                if old.status == new.status {
                    new.last_transition_time = old.last_transition_time.clone();
                }
                *old = new;
            }
            None => self.push(new),
        }
        self.sort_by(|a, b| a.type_.cmp(&b.type_));
    }
}

/// Compare two condition lists ignoring timestamps: used to decide whether a
/// status write is needed at all.
pub fn conditions_equivalent(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

/// A VM's size: either explicit `cpu` and `memory`, or a named `sizeClass`
/// resolved from the Site (or yukumo's built-in classes).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.sizeClass) != (has(self.cpu) || has(self.memory))"
).message("give either sizeClass, or cpu and memory, not both"))]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.sizeClass) || (has(self.cpu) && has(self.memory))"
).message("cpu and memory must both be set when sizeClass is not"))]
pub struct NodeSize {
    /// Virtual CPUs (1-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub cpu: Option<u32>,
    /// Memory as a Kubernetes quantity, e.g. `512Mi` or `8Gi`; must be positive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))"
    ).message("memory must be a positive quantity such as 512Mi or 8Gi"))]
    pub memory: Option<Quantity>,
    /// A named size class (e.g. `small`, `large`), defined by the Site's
    /// `sizeClasses` or yukumo's built-ins: small 1 cpu/1Gi, medium 2/4Gi,
    /// large 4/8Gi, xlarge 8/16Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub size_class: Option<String>,
}

/// A named VM size offered by a Site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SizeClass {
    /// The class name referenced by `sizeClass`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Virtual CPUs (1-256).
    #[schemars(range(min = 1, max = 256))]
    pub cpu: u32,
    /// Memory as a Kubernetes quantity, e.g. `4Gi`.
    #[schemars(extend("maxLength" = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))"
    ).message("memory must be a positive quantity such as 512Mi or 8Gi"))]
    pub memory: Quantity,
}

/// yukumo's built-in size classes, used when a Site defines none of that name.
pub fn builtin_size_classes() -> Vec<SizeClass> {
    [
        ("small", 1, "1Gi"),
        ("medium", 2, "4Gi"),
        ("large", 4, "8Gi"),
        ("xlarge", 8, "16Gi"),
    ]
    .into_iter()
    .map(|(name, cpu, mem)| SizeClass {
        name: name.to_string(),
        cpu,
        memory: Quantity(mem.to_string()),
    })
    .collect()
}

/// Format of a disk image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// QEMU copy-on-write image.
    #[default]
    Qcow2,
    /// Raw disk image.
    Raw,
}

/// A boot disk image fetched by each host's agent once into its cache.
/// Its sha256 is given (`checksum`) or read from a published list
/// (`checksumURL`); the image is used only when it matches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "has(self.checksum) != has(self.checksumURL)"
).message("image: give exactly one of checksum (sha256:<64 hex digits>) and checksumURL (a SHA256SUMS list naming the image's file)").field_path(".checksum"))]
pub struct ImageSource {
    /// Where to fetch the image: an `http://`, `https://` or `file://` URL.
    #[schemars(length(min = 8, max = 2048), regex(pattern = "^(https?|file)://.+$"))]
    pub url: String,
    /// Expected checksum of the image file, `sha256:` followed by 64
    /// lowercase hex digits: the image is pinned (a changed file at `url`
    /// is refused). Give this or `checksumURL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^sha256:[a-f0-9]{64}$"))]
    pub checksum: Option<String>,
    /// A checksum list in `sha256sum`'s format (lines `<64 hex digits>
    /// <file name>`, e.g. a distribution's SHA256SUMS next to its images)
    /// with a line for the image's file name (the last segment of `url`):
    /// an `http://`, `https://` or `file://` URL, at most 1 MiB. Each host's
    /// agent reads it when it needs the image and verifies the image against
    /// the sum it finds, so the image follows the list (a new image
    /// published with a new sum is taken by nodes created after it; running
    /// nodes keep their disks). Give this or `checksum`.
    #[serde(
        default,
        rename = "checksumURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 8, max = 2048), regex(pattern = "^(https?|file)://.+$"))]
    pub checksum_url: Option<String>,
    /// Image format: `qcow2` (default) or `raw`.
    #[serde(default)]
    pub format: ImageFormat,
}

/// A reference to a Secret, by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Secret namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
}

/// CPU and memory of a host or a VM, as plain numbers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Virtual or physical CPUs.
    pub cpu: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
}

impl Resources {
    /// Component-wise sum.
    pub fn plus(self, o: Resources) -> Resources {
        Resources {
            cpu: self.cpu + o.cpu,
            memory_mib: self.memory_mib + o.memory_mib,
        }
    }
    /// Component-wise difference, never below zero.
    pub fn minus(self, o: Resources) -> Resources {
        Resources {
            cpu: self.cpu.saturating_sub(o.cpu),
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
        }
    }
    /// Whether `need` fits within `self`.
    pub fn fits(self, need: Resources) -> bool {
        need.cpu <= self.cpu && need.memory_mib <= self.memory_mib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: ConditionStatus, reason: &str) -> Condition {
        Condition::new("Ready", status, Reason::from_name(reason), "m", Some(1))
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut list = vec![];
        let first = cond(ConditionStatus::False, "A");
        let t0 = first.last_transition_time.clone();
        list.set_condition(first);
        let mut second = cond(ConditionStatus::False, "B");
        second.last_transition_time = Time(t0.0 + k8s_openapi::jiff::SignedDuration::from_secs(5));
        list.set_condition(second);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].reason, Reason::from_name("B"));
        assert_eq!(list[0].last_transition_time, t0);
        let mut third = cond(ConditionStatus::True, "C");
        let t3 = Time(t0.0 + k8s_openapi::jiff::SignedDuration::from_secs(9));
        third.last_transition_time = t3.clone();
        list.set_condition(third);
        assert_eq!(list[0].last_transition_time, t3);
        assert!(list.is_true("Ready"));
    }

    #[test]
    fn conditions_sorted_by_type() {
        let mut list = vec![];
        list.set_condition(Condition::new(
            "Stalled",
            ConditionStatus::False,
            Reason::Ready,
            "",
            None,
        ));
        list.set_condition(Condition::new(
            "Ready",
            ConditionStatus::True,
            Reason::Ready,
            "",
            None,
        ));
        assert_eq!(list[0].type_, "Ready");
        assert_eq!(list[1].type_, "Stalled");
    }

    #[test]
    fn resources_fit() {
        let cap = Resources {
            cpu: 4,
            memory_mib: 8192,
        };
        assert!(cap.fits(Resources {
            cpu: 4,
            memory_mib: 8192
        }));
        assert!(!cap.fits(Resources {
            cpu: 5,
            memory_mib: 1
        }));
        assert_eq!(
            cap.plus(cap),
            Resources {
                cpu: 8,
                memory_mib: 16384
            }
        );
    }
}
