//! Integration tests: the real `cvx` binary, in temp dirs, against real files and servers.

#[path = "../support/mod.rs"]
mod support;

mod apply;
mod ctx;
mod demo;
mod examples;
mod manifest;
mod plan;
mod run;
mod status;
mod verify;
