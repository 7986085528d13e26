//! The one integration test binary: every file beside this one is a module of it.
// Test helpers compare JSON-RPC ids by their text (1 and "1" differ as Values, not as keys),
// and rmcp's error types are large: both lints would only add noise here.
#![allow(clippy::cmp_owned, clippy::result_large_err)]
mod cli;
mod common;
mod denials;
mod learn;
mod readme;
mod realservers;
mod rmcp_client;
mod runtimes;
mod sandbox;
mod serve;
mod serve_support;
