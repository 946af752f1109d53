//! Reading one object the way a Site's agent may: a list narrowed to its
//! own host's objects by label, and to the one name by field. The
//! controller's authorization webhook refuses a site agent's plain `get`
//! of a VirtualNode or Volume (it cannot tell whose it is before the read),
//! and its list or watch without the host's label.

use kube::api::{Api, ListParams};
use serde::de::DeserializeOwned;

/// The object `name` of `api` if `labels` (e.g. `yukumo.io/host=h1`)
/// selects it; `None` if it is gone or not this host's.
pub async fn get<K>(api: &Api<K>, name: &str, labels: &str) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let lp = ListParams::default()
        .labels(labels)
        .fields(&format!("metadata.name={name}"));
    Ok(api.list(&lp).await?.items.into_iter().next())
}
