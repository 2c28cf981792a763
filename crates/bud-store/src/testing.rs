//! Test support: a fresh, migrated database per test, removed afterwards.
//!
//! Compiled into every build (it is small and needs nothing extra) so other crates' tests can
//! use it: [`fresh_sqlite`] needs nothing; [`fresh_postgres`] needs an admin URL of a PostgreSQL
//! server on which it may create and drop databases, by convention taken from
//! [`POSTGRES_URL_VAR`]. Not for production use.

use std::ops::Deref;
use std::path::PathBuf;

use sqlx::{AnyConnection, Connection};

use crate::{Store, StoreConfig, StoreError};

/// The environment variable naming the PostgreSQL admin URL tests use, e.g.
/// `postgres://postgres@127.0.0.1:5432/postgres`. Tests skip PostgreSQL when it is unset.
pub const POSTGRES_URL_VAR: &str = "BUD_TEST_POSTGRES_URL";

/// A migrated store on a database of its own. The database goes away with the guard: call
/// [`TestDatabase::cleanup`] at the end of a test; dropping the guard (e.g. when a test panics)
/// cleans up too, blocking the current thread for a moment.
#[derive(Debug)]
pub struct TestDatabase {
    store: Store,
    config: StoreConfig,
    /// `None` once cleaned up.
    cleanup: Option<Cleanup>,
}

/// What to remove when the test is done.
#[derive(Debug)]
enum Cleanup {
    /// The temporary directory holding the SQLite file.
    SqliteDir(PathBuf),
    /// A database created on a PostgreSQL server through `admin_url`.
    Postgres { admin_url: String, database: String },
}

/// The admin URL from [`POSTGRES_URL_VAR`], if set. Reading the environment is for tests only.
pub fn postgres_admin_url() -> Option<String> {
    std::env::var(POSTGRES_URL_VAR).ok().filter(|url| !url.is_empty())
}

/// A migrated SQLite store in a fresh temporary directory.
pub async fn fresh_sqlite() -> Result<TestDatabase, StoreError> {
    let dir = std::env::temp_dir().join(format!("bud-test-{}", uuid::Uuid::new_v4().simple()));
    let config =
        StoreConfig { url: format!("sqlite://{}/bud.db", dir.display()), ..StoreConfig::default() };
    let cleanup = Cleanup::SqliteDir(dir);
    open(config, cleanup).await
}

/// A migrated store on a new database `bud_test_<random hex>`, created through `admin_url`
/// (a URL of the same server whose user may create databases).
pub async fn fresh_postgres(admin_url: &str) -> Result<TestDatabase, StoreError> {
    sqlx::any::install_default_drivers();
    let database = format!("bud_test_{}", uuid::Uuid::new_v4().simple());
    let mut url = url::Url::parse(admin_url).map_err(|e| {
        StoreError::Database(sqlx::Error::Configuration(format!("bad admin URL: {e}").into()))
    })?;
    url.set_path(&format!("/{database}"));
    let mut admin = AnyConnection::connect(admin_url).await?;
    sqlx::raw_sql(&format!("CREATE DATABASE \"{database}\"")).execute(&mut admin).await?;
    admin.close().await?;
    let config = StoreConfig { url: url.to_string(), ..StoreConfig::default() };
    let cleanup = Cleanup::Postgres { admin_url: admin_url.to_owned(), database };
    open(config, cleanup).await
}

impl TestDatabase {
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration that reaches this database, e.g. to start an app on it.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Closes the pool and removes the database.
    pub async fn cleanup(mut self) {
        self.store.close().await;
        if let Some(cleanup) = self.cleanup.take()
            && let Err(e) = cleanup.run().await
        {
            eprintln!("test database cleanup failed: {e}");
        }
    }
}

impl Deref for TestDatabase {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(cleanup) = self.cleanup.take() else { return };
        // Drop cannot await, and may run inside a runtime that must not be blocked on: clean up
        // on a thread of its own with its own runtime, and wait for it.
        let worker = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            match runtime {
                Ok(runtime) => runtime.block_on(cleanup.run()),
                Err(e) => Err(StoreError::Database(sqlx::Error::Io(e))),
            }
        });
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database cleanup failed: {e}"),
            Err(_) => eprintln!("test database cleanup panicked"),
        }
    }
}

impl Cleanup {
    async fn run(self) -> Result<(), StoreError> {
        match self {
            Cleanup::SqliteDir(dir) => {
                std::fs::remove_dir_all(&dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))
            }
            Cleanup::Postgres { admin_url, database } => {
                let mut admin = AnyConnection::connect(&admin_url).await?;
                // FORCE ends connections a leaked pool may still hold.
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
                Ok(())
            }
        }
    }
}

/// Connects and migrates, removing the database again if either fails.
async fn open(config: StoreConfig, cleanup: Cleanup) -> Result<TestDatabase, StoreError> {
    let store = match Store::connect(&config).await {
        Ok(store) => store,
        Err(e) => {
            // Best effort: the error worth reporting is the connect failure.
            let _ = cleanup.run().await;
            return Err(e);
        }
    };
    let db = TestDatabase { store, config, cleanup: Some(cleanup) };
    // On failure the guard is dropped here, which cleans up.
    db.store.migrate().await?;
    Ok(db)
}
