//! Server lifecycle.
