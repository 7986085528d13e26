//! The one integration test binary: every file beside this one is a module of it.
mod common;
mod sandbox;
mod cli;
mod serve;
mod serve_support;
mod realservers;
