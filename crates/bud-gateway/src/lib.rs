//! budgateway: the OpenAI-compatible data plane. Every inference request goes: API key →
//! principal (from the in-memory [`snapshot`]) → limits → route → a target chosen by load →
//! the upstream, with retries and fallback before the first byte → the answer relayed (SSE
//! chunk by chunk) → usage metered off the hot path.
//!
//! The request path makes no database call and no call to the control plane: everything it
//! needs is in the current [`snapshot::Snapshot`], swapped in whole when the control plane's
//! configuration changes.

mod balance;
mod breaker;
pub mod config;
pub mod error;
mod ledger;
pub mod limits;
pub mod metering;
pub mod openai;
mod proxy;
mod retry;
mod server;
pub mod snapshot;
pub mod source;
pub mod sse;
mod state;
pub mod store_sink;
mod telemetry;

pub use config::GatewayConfig;
pub use error::Error;
pub use server::Gateway;
