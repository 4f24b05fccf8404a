//! What `didgated` adds on top of the gateway library: the demo ([`demo`]: the whole path with
//! real parts on loopback) and its local payments upstream ([`upstream_demo`], also the
//! upstream of the integration tests and the benchmark). The daemon's command line is in
//! `main.rs`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod demo;
pub mod upstream_demo;
