//! `cvx apply`: execute a plan: fetch, unpack, install, receipts.

pub mod fetch;
pub mod unpack;
