#![deny(clippy::undocumented_unsafe_blocks)]
//! mcpbox: run stdio MCP servers in a native Linux sandbox and serve them over HTTP.

pub mod cli_doctor;
pub mod cli_run;
pub mod netproxy;
pub mod policy;
pub mod plan;
pub mod sandbox;
pub mod bridge;
pub mod budget;
pub mod config;
pub mod http;
pub mod serve;
pub mod supervisor;
pub mod urlbridge;
