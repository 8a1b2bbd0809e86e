//! The planner: every scaling decision as a pure function. No IO, no clocks (time is an input), no Kubernetes client types.
