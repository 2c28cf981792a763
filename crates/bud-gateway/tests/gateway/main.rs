//! budgateway end to end: the gateway on port 0 in front of fake OpenAI upstreams.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

mod fake_upstream;
mod harness;

mod auth_and_routing;
mod failures;
mod limits;
mod resilience;
mod service;
mod shared_limits;
mod streaming;
