//! The Kubernetes side: the `AgentPool` resource, building agent Jobs from its template (pure), watching,
//! applying a plan, status and events. Knows nothing of ADO wire formats.

pub mod crd;
pub mod job;
