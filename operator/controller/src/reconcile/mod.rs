//! One reconciler per kind. Each observes, decides with pure functions, and
//! writes status only when something changed.

pub mod capacity;
pub mod host;
pub mod ipam;
pub mod networkgroup;
pub mod nodes;
pub mod quota;
pub mod reservation;
pub mod site;
pub mod verdict;
pub mod virtualcluster;
pub mod volume;
