//! The Edge API side of the agent: [`join`] (register, keep the host's
//! identity, report status), [`actions`] (the controller's `HostAction`,
//! parsed and validated) and [`tasks`] (carrying the actions out on the
//! container runtime, and what the next status says about them).

pub mod actions;
pub mod join;
pub mod tasks;
