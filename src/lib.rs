//! cvx: a declarative upgrade planner and Cosmovisor-compatible supervisor for Cosmos SDK nodes.
//!
//! Stages, one module each, data flowing one way (DESIGN §6): [`manifest`] and [`tree`] feed the
//! pure [`plan`], which [`render`] shows and [`apply`] executes.

#![forbid(unsafe_code)]

pub mod apply;
pub mod cli;
pub mod demo;
pub mod drift;
pub mod duration;
pub mod errors;
pub mod hash;
pub mod import;
pub mod manifest;
pub mod owner;
pub mod pin;
pub mod plan;
pub mod platform;
pub mod progress;
pub mod receipt;
pub mod render;
pub mod run;
pub mod runnable;
pub mod simnode;
pub mod status;
pub mod time;
pub mod tree;
pub mod verify;
