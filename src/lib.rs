//! cvx: a declarative upgrade planner and Cosmovisor-compatible supervisor for Cosmos SDK nodes.
//!
//! Stages, one folder each, data flowing one way (DESIGN §6; README "Code map"): [`manifest`]
//! and [`tree`] feed the pure [`plan`]; the [`checks`] against the world travel beside it;
//! [`render`] shows them and [`apply`] executes the plan; [`run`] supervises the node with apply's
//! fetch, unpack and install; [`author`] writes manifests; [`demo`] rehearses it all. Leaves that
//! every layer may use: [`errors`], [`platform`], [`time`], [`duration`], [`hash`], [`owner`].

#![forbid(unsafe_code)]

pub mod apply;
pub mod author;
pub mod checks;
pub mod cli;
pub mod demo;
pub mod duration;
pub mod errors;
pub mod hash;
pub mod manifest;
pub mod owner;
pub mod plan;
pub mod platform;
pub mod render;
pub mod run;
pub mod status;
pub mod time;
pub mod tree;

/// Benchmarks write receipts by this path.
pub use tree::receipt;
