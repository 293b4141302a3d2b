//! A database per test, on a [`PgCluster`], with helpers to run SQL and load fixtures.

use std::path::{Path, PathBuf};

use tokio_postgres::{Client, NoTls};

use crate::error::describe_pg_error;
use crate::sql::quote_ident;
use crate::{HarnessError, PgCluster};

/// Longest label kept in a database name (names are limited to 63 bytes).
const MAX_LABEL: usize = 40;

/// The directory holding the SQL fixtures: `tests/fixtures` of the running test's workspace
/// (every test runs with `CARGO_MANIFEST_DIR` set), else `<pgzm-tests crate>/fixtures` as
/// compiled.
pub fn fixtures_dir() -> PathBuf {
    // The running test's own crate directory first: a shared CARGO_TARGET_DIR may hold this
    // library compiled from another checkout, whose compile-time path is not this one.
    let at_runtime = std::env::var_os("CARGO_MANIFEST_DIR").and_then(|crate_dir| {
        PathBuf::from(crate_dir)
            .ancestors()
            .map(|d| d.join("tests").join("fixtures"))
            .find(|d| d.is_dir())
    });
    at_runtime.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

/// A uniquely named database on a cluster, created for one test.
///
/// It is not dropped automatically (the cluster is thrown away at the end of the run); call
/// [`TestDb::drop_db`] to drop it early.
#[derive(Debug, Clone)]
pub struct TestDb {
    name: String,
    host: String,
    port: u16,
}

impl TestDb {
    /// Creates `t_<label>_<12 hex chars>` on `cluster`; the label is lower-cased and every
    /// character outside `[a-z0-9_]` becomes `_`.
    pub async fn create(cluster: &PgCluster, label: &str) -> Result<TestDb, HarnessError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("t_{}_{}", sanitize_label(label), &id[..12]);
        let admin_url = cluster.url("postgres");
        let client = connect_url(&admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .map_err(|e| HarnessError::sql(format!("create database {name}"), &e))?;
        Ok(TestDb {
            name,
            host: cluster.host().to_string(),
            port: cluster.port(),
        })
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection URL for this database as the superuser `postgres`.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@{}:{}/{}",
            self.host, self.port, self.name
        )
    }

    /// Opens a connection (no TLS); the connection future runs on a spawned tokio task.
    pub async fn connect(&self) -> Result<Client, HarnessError> {
        connect_url(&self.url()).await
    }

    /// Runs `sql` (any number of statements) on a fresh connection.
    pub async fn batch(&self, sql: &str) -> Result<(), HarnessError> {
        let client = self.connect().await?;
        client
            .batch_execute(sql)
            .await
            .map_err(|e| HarnessError::Sql {
                action: format!("run SQL batch on database {}", self.name),
                message: describe_pg_error(&e, Some(sql)),
            })
    }

    /// Runs the SQL file at `path`; errors name the file, and the server's message, detail
    /// and (when it points into the file) line.
    pub async fn load_file(&self, path: &Path) -> Result<(), HarnessError> {
        let sql =
            tokio::fs::read_to_string(path)
                .await
                .map_err(|source| HarnessError::ReadFile {
                    path: path.to_path_buf(),
                    source,
                })?;
        let client = self.connect().await?;
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| HarnessError::LoadFile {
                path: path.to_path_buf(),
                database: self.name.clone(),
                message: describe_pg_error(&e, Some(&sql)),
            })
    }

    /// Runs the fixture file `rel`, relative to [`fixtures_dir`].
    pub async fn load_fixture(&self, rel: &str) -> Result<(), HarnessError> {
        self.load_file(&fixtures_dir().join(rel)).await
    }

    /// Drops the database, disconnecting any sessions still using it.
    pub async fn drop_db(self) -> Result<(), HarnessError> {
        let admin_url = format!("postgres://postgres@{}:{}/postgres", self.host, self.port);
        let client = connect_url(&admin_url).await?;
        client
            .batch_execute(&format!(
                "DROP DATABASE {} WITH (FORCE)",
                quote_ident(&self.name)
            ))
            .await
            .map_err(|e| HarnessError::sql(format!("drop database {}", self.name), &e))
    }
}

/// Connects to `url` without TLS and drives the connection on a spawned task.
async fn connect_url(url: &str) -> Result<Client, HarnessError> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| HarnessError::Connect {
                url: url.to_string(),
                message: describe_pg_error(&e, None),
            })?;
    tokio::spawn(async move {
        // Errors surface on the client's next call; nothing to do with them here.
        let _ = connection.await;
    });
    Ok(client)
}

/// Lower-cases `label`, maps everything outside `[a-z0-9_]` to `_`, and bounds its length.
fn sanitize_label(label: &str) -> String {
    label
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_LABEL)
        .collect()
}

/// A source and a destination database for a migration test: `source` on `src_cluster` with the
/// fixture's `schema.sql` + `source_data.sql`, `dest` on `dst_cluster` with `schema.sql` +
/// `dest_data.sql` (the fixtures' convention: the destination is "production", the source the
/// rebuilt data).
pub async fn fixture_pair_on(
    src_cluster: &PgCluster,
    dst_cluster: &PgCluster,
    label: &str,
    fixture: &str,
) -> Result<(TestDb, TestDb), HarnessError> {
    let source = TestDb::create(src_cluster, &format!("{label}_src")).await?;
    let dest = TestDb::create(dst_cluster, &format!("{label}_dst")).await?;
    for (db, data) in [(&source, "source_data.sql"), (&dest, "dest_data.sql")] {
        db.load_fixture(&format!("{fixture}/schema.sql")).await?;
        db.load_fixture(&format!("{fixture}/{data}")).await?;
    }
    Ok((source, dest))
}

/// [`fixture_pair_on`] on the shared source and destination clusters.
pub async fn fixture_pair(label: &str, fixture: &str) -> Result<(TestDb, TestDb), HarnessError> {
    let (src, dst) = PgCluster::shared_pair();
    fixture_pair_on(src, dst, label, fixture).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sanitised() {
        assert_eq!(sanitize_label("Swap Test-1!"), "swap_test_1_");
        assert_eq!(sanitize_label(&"x".repeat(100)).len(), MAX_LABEL);
    }

    #[tokio::test]
    async fn databases_are_unique_and_load_errors_name_the_file() {
        let cluster = PgCluster::shared();
        let a = TestDb::create(cluster, "Unique DB")
            .await
            .expect("create a");
        let b = TestDb::create(cluster, "Unique DB")
            .await
            .expect("create b");
        assert_ne!(a.name(), b.name());
        assert!(a.name().starts_with("t_unique_db_"), "{}", a.name());

        let missing = fixtures_dir().join("no_such_fixture.sql");
        let err = a.load_file(&missing).await.expect_err("missing file");
        assert!(matches!(err, HarnessError::ReadFile { .. }), "{err}");
        assert!(err.to_string().contains("no_such_fixture.sql"), "{err}");

        let dir = std::env::temp_dir().join(format!("pgzm-sql-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let bad = dir.join("broken_fixture.sql");
        std::fs::write(&bad, "CREATE TABLE ok (id int);\n\nSELEC 1;\n").expect("write");
        let err = a.load_file(&bad).await.expect_err("syntax error");
        let _ = std::fs::remove_dir_all(&dir);
        let text = err.to_string();
        assert!(text.contains("broken_fixture.sql"), "{text}");
        assert!(text.contains("syntax error"), "{text}");
        assert!(text.contains("line 3"), "{text}");

        let dup = b.batch("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (1);");
        let err = dup.await.expect_err("duplicate key");
        assert!(
            err.to_string().contains("Key (id)=(1)"),
            "detail missing: {err}"
        );

        let name = b.name().to_string();
        b.drop_db().await.expect("drop b");
        let admin = TestDb {
            name: "postgres".into(),
            host: cluster.host().into(),
            port: cluster.port(),
        };
        let client = admin.connect().await.expect("connect postgres");
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .expect("query");
        assert_eq!(row.get::<_, i64>(0), 0);
    }
}
