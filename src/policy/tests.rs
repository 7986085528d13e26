//! Unit tests for the policy module.
