//! Integration tests: the real `cvx` binary, in temp dirs, against real files and servers.

#[path = "../support/mod.rs"]
mod support;

mod annotations;
mod ansible;
mod apply;
mod ci;
mod ctx;
mod demo;
mod drift;
mod examples;
mod import;
mod import_quirks;
mod manifest;
mod metrics;
mod migrate;
mod ownership;
mod plan;
mod run;
mod runnable;
mod status;
mod unpack_cap;
mod verify;
