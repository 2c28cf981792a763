//! Conversions between stored primitives and domain types. The Any driver speaks only integers,
//! floats, text and bytes, so every domain value is stored as one of those and parsed back here;
//! a value that does not parse means the row is corrupt.

use std::fmt::Display;

use bud_domain::{Cursor, PageLimit, Timestamp};

use crate::StoreError;

/// A timestamp as stored: unix milliseconds.
pub(crate) fn ms(at: Timestamp) -> i64 {
    at.timestamp_millis()
}

/// Parses a stored unix-millisecond timestamp.
pub(crate) fn timestamp(ms: i64) -> Result<Timestamp, &'static str> {
    chrono::DateTime::from_timestamp_millis(ms).ok_or("timestamp out of range")
}

/// Parses an optional stored timestamp.
pub(crate) fn opt_timestamp(ms: Option<i64>) -> Result<Option<Timestamp>, &'static str> {
    ms.map(timestamp).transpose()
}

/// Parses an optional stored value with `FromStr`, e.g. an optional id.
pub(crate) fn opt_parse<T: std::str::FromStr>(s: Option<&str>) -> Result<Option<T>, T::Err> {
    s.map(str::parse).transpose()
}

/// Turns a failed conversion of a stored value into [`StoreError::Corrupt`], naming the column.
pub(crate) fn stored<T, E: Display>(column: &str, parsed: Result<T, E>) -> Result<T, StoreError> {
    parsed.map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

/// Where a keyset page starts: after the cursor's id, or at the start (every id sorts after "").
pub(crate) fn after_key(after: Option<&Cursor>) -> &str {
    after.map_or("", Cursor::as_str)
}

/// How many rows to fetch for a page: one more than it holds, to learn whether more exist.
pub(crate) fn overfetch(limit: PageLimit) -> i64 {
    i64::from(limit.get()) + 1
}

/// A value stored as JSON text.
#[expect(
    clippy::expect_used,
    reason = "the store's JSON columns hold plain structs and string lists, whose serialisation \
              cannot fail"
)]
pub(crate) fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises to JSON")
}

/// Parses a value stored as JSON text.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, serde_json::Error> {
    serde_json::from_str(text)
}

/// A fresh id for a row the store itself adds (events written beside a change): UUIDv7, so
/// newer events sort after older ones written in the same millisecond.
pub(crate) fn event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
