#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support panics on what a test does not expect"
)]
//! bud-engine-sim's tests: the router called in-process (`oneshot`) first, then the engine
//! served on a loopback port for what needs real connections (timing, disconnects, cut
//! streams, crashes).

mod batching;
mod faults;
mod loopback;
mod router;
mod support;
