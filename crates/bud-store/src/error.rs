//! The store's one error type, and the single place where sqlx errors are sorted into it.

use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::postgres::PgDatabaseError;
use sqlx::sqlite::SqliteError;

/// What went wrong talking to the database, sorted by what the caller should answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint failed; `what` says which in words a person understands, e.g. "a user
    /// with this email already exists". Callers answer 409.
    #[error("{what}")]
    Conflict { what: String },
    /// A row the change refers to is missing (a foreign key failed), e.g. "user does not exist".
    #[error("{what}")]
    Reference { what: String },
    /// The database is unreachable, the pool timed out, the connection was reset or a statement
    /// ran past its timeout: nothing is wrong with the request, so callers answer 503.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// A stored row could not be turned into domain types: the data or the schema is damaged.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Any other failure reported by the database.
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

/// Words for the constraint failures one statement can raise, chosen by the calling function.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Violations<'a> {
    /// Said when a unique constraint fails.
    pub conflict: &'a str,
    /// Said when a foreign key fails.
    pub reference: &'a str,
}

impl Violations<'_> {
    /// For statements where no constraint is expected to fail.
    pub const GENERIC: Violations<'static> = Violations {
        conflict: "the record already exists",
        reference: "a record this refers to does not exist",
    };
}

impl StoreError {
    /// Sorts a sqlx error, wording constraint failures with `words`.
    pub(crate) fn from_sqlx(err: sqlx::Error, words: Violations<'_>) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::Decode(_) => StoreError::Corrupt(err.to_string()),
            sqlx::Error::Database(db) => {
                if is_transient(db.as_ref()) {
                    return StoreError::Unavailable(err);
                }
                match db.kind() {
                    ErrorKind::UniqueViolation => {
                        StoreError::Conflict { what: words.conflict.to_owned() }
                    }
                    ErrorKind::ForeignKeyViolation => {
                        StoreError::Reference { what: words.reference.to_owned() }
                    }
                    // SQLite reports some unique failures (e.g. on expression indexes) with a
                    // plain constraint code; the message still says what happened.
                    _ if db.message().contains("UNIQUE constraint failed") => {
                        StoreError::Conflict { what: words.conflict.to_owned() }
                    }
                    // Likewise a foreign key declared ON DELETE RESTRICT: SQLite enforces it
                    // like a trigger and reports SQLITE_CONSTRAINT_TRIGGER.
                    _ if db.message().contains("FOREIGN KEY constraint failed") => {
                        StoreError::Reference { what: words.reference.to_owned() }
                    }
                    _ => StoreError::Database(err),
                }
            }
            _ => StoreError::Database(err),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        StoreError::from_sqlx(err, Violations::GENERIC)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => StoreError::Database(sqlx::Error::Migrate(Box::new(other))),
        }
    }
}

/// Whether a failed unique constraint's name (PostgreSQL) or message (SQLite) mentions `word`;
/// lets a function with two unique constraints say which one failed.
pub(crate) fn unique_violation_mentions(err: &sqlx::Error, word: &str) -> bool {
    let sqlx::Error::Database(db) = err else { return false };
    db.kind() == ErrorKind::UniqueViolation
        && (db.constraint().is_some_and(|c| c.contains(word)) || db.message().contains(word))
}

/// Errors that say the database cannot serve right now rather than that the request is wrong.
fn is_transient(db: &dyn DatabaseError) -> bool {
    if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
        let code = pg.code();
        // Class 08: connection exceptions. 57P01..03: admin shutdown, crash shutdown, cannot
        // connect now. 57014: query canceled, which is how statement_timeout ends a query.
        // 53300: too many connections.
        return code.starts_with("08")
            || matches!(code, "57P01" | "57P02" | "57P03" | "57014" | "53300");
    }
    if db.try_downcast_ref::<SqliteError>().is_some() {
        // The primary result code is the low byte of the extended one: 5 BUSY, 6 LOCKED.
        let primary = db.code().as_deref().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff);
        return matches!(primary, Some(5 | 6));
    }
    false
}
