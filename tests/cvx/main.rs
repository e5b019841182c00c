//! Integration tests: the real `cvx` binary, in temp dirs, against real files and servers.

#[path = "../support/mod.rs"]
mod support;

mod ansible;
mod apply;
mod ctx;
mod demo;
mod drift;
mod examples;
mod import;
mod manifest;
mod metrics;
mod plan;
mod run;
mod runnable;
mod status;
mod verify;
