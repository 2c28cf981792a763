#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Black-box tests of budapp over HTTP on loopback, each against a fresh database, on SQLite and
//! (when `BUD_TEST_POSTGRES_URL` is set) on PostgreSQL.

mod authz;
mod gateway;
mod identity;
mod newcomer;
mod oidc;
mod outage;
mod resources;
mod secrets;
mod support;
