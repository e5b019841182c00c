//! Authoring tools: write a manifest from another source of truth ([`import`]) and fill its pins
//! by downloading ([`pin`]). They read and write manifest files and download through
//! `apply::fetch`; they never touch a Cosmovisor tree.

pub mod import;
pub mod pin;
