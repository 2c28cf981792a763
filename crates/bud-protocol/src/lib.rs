//! Wire types of Bud's HTTP surfaces. Only shapes live here: no behaviour, no validation beyond
//! what serde does. Services convert these to domain types at the edge, naming the field that
//! does not fit.
//!
//! Request types reject unknown fields, so a misspelt field is an error rather than silently
//! ignored.

pub mod control;
pub mod error;
pub mod gateway;

pub use error::{ErrorBody, ErrorDetail};
