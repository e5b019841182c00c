//! cvx: a declarative upgrade planner and Cosmovisor-compatible supervisor for Cosmos SDK nodes.

pub mod apply;
pub mod hash;
