//! Releasing a finalizer of the agent's: the only change of an object
//! outside its status the agent may make (an admission policy refuses any
//! other).

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use yukumo_api::finalizers;

/// Remove `finalizer` from `obj`, with its resourceVersion as a
/// precondition; the cached object may be stale, so on a conflict it is
/// read again and the removal retried (three times). `Ok(true)` once the
/// finalizer is gone (or the object is). `scope` is the label selector the
/// agent reads it by (`crate::scoped`).
pub async fn release<K>(
    api: &Api<K>,
    obj: &K,
    finalizer: &str,
    scope: &str,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut current = obj.clone();
    for _ in 0..3 {
        let Some(patch) =
            finalizers::removal_patch(current.finalizers(), finalizer, current.resource_version())
        else {
            return Ok(true);
        };
        match api
            .patch(
                &obj.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                match crate::scoped::get(api, &obj.name_any(), scope).await? {
                    Some(fresh) => current = fresh,
                    None => return Ok(true),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}
