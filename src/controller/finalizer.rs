//! The AgentPool finalizer: an AgentPool being deleted stays until its agents are drained (busy ones
//! finish their job, idle ones are removed safely) and its placeholder is gone. Patches are merge patches
//! with the AgentPool's resourceVersion as a precondition: a concurrent change is never overwritten.

use kube::Api;
use kube::api::{Patch, PatchParams};

use super::Context;
use crate::k8s::crd::AgentPool;

/// The finalizer's name.
pub const FINALIZER: &str = "azp-autoscaler.dev/drain";

/// Whether the AgentPool carries our finalizer.
pub fn has(pool: &AgentPool) -> bool {
    pool.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

fn api(ctx: &Context, pool: &AgentPool) -> Option<(Api<AgentPool>, String)> {
    Some((
        Api::namespaced(ctx.client.clone(), pool.metadata.namespace.as_deref()?),
        pool.metadata.name.clone()?,
    ))
}

/// Writes the finalizer list with the AgentPool's resourceVersion as a precondition (409 if it changed).
async fn write(
    ctx: &Context,
    pool: &AgentPool,
    finalizers: Vec<String>,
) -> Result<(), kube::Error> {
    let Some((api, name)) = api(ctx, pool) else {
        return Ok(());
    };
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": pool.metadata.resource_version,
        }
    });
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Adds the finalizer to a live AgentPool that lacks it. A conflict (the object changed) is retried by
/// the next poll.
pub(crate) async fn ensure(ctx: &Context, pool: &AgentPool) -> Result<(), kube::Error> {
    if has(pool) || pool.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let mut finalizers = pool.metadata.finalizers.clone().unwrap_or_default();
    finalizers.push(FINALIZER.to_owned());
    write(ctx, pool, finalizers).await
}

/// Removes the finalizer (the drain is complete): Kubernetes then deletes the AgentPool, and the garbage
/// collector its remaining (finished) Jobs.
pub(crate) async fn remove(ctx: &Context, pool: &AgentPool) -> Result<(), kube::Error> {
    if !has(pool) {
        return Ok(());
    }
    let finalizers = pool
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    write(ctx, pool, finalizers).await
}
