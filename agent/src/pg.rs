//! PostgreSQL connections and error classification shared by the agent and the coordinator.

use std::str::FromStr;
use std::sync::Arc;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// How a failed PostgreSQL operation should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A lock could not be taken within `lock_timeout`: retry later with backoff.
    LockTimeout,
    /// A transient failure (connection lost, serialization failure, deadlock, server shutting
    /// down): the same statement may succeed when retried from a clean state.
    Retryable,
    /// Anything else: retrying will fail the same way.
    Fatal,
}

/// Classifies an error by SQLSTATE (or as retryable when the connection itself failed).
pub fn classify(err: &tokio_postgres::Error) -> ErrorClass {
    match err.code() {
        Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE => ErrorClass::LockTimeout,
        Some(code)
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08") =>
        {
            ErrorClass::Retryable
        }
        Some(_) => ErrorClass::Fatal,
        None if err.is_closed() || err.as_db_error().is_none() => ErrorClass::Retryable,
        None => ErrorClass::Fatal,
    }
}

/// Renders an error on one line: the server's message, detail and hint, and SQLSTATE.
///
/// Connection strings never appear here: tokio-postgres errors do not carry them.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut out = db.message().to_string();
        if let Some(detail) = db.detail() {
            out.push_str(" (");
            out.push_str(detail);
            out.push(')');
        }
        if let Some(hint) = db.hint() {
            out.push_str("; hint: ");
            out.push_str(hint);
        }
        out.push_str(" [SQLSTATE ");
        out.push_str(db.code().code());
        out.push(']');
        return one_line(&out);
    }
    let mut out = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    one_line(&out)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A parsed connection target: tokio-postgres settings plus the TLS policy of its `sslmode`
/// (see [`crate::tls`]). `Debug` shows no password.
#[derive(Clone)]
pub struct PgTarget {
    config: Config,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for PgTarget {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

/// Parses a connection string (URL or `key=value` form, libpq's `sslmode` values and
/// `sslrootcert` included). The error message never repeats the string itself, which may hold
/// a password.
pub fn parse_config(conninfo: &str) -> Result<PgTarget, String> {
    let (rest, params) = crate::tls::split_tls_params(conninfo)?;
    let config = Config::from_str(&rest).map_err(|e| describe(&e))?;
    let tls = crate::tls::client_config(&params)?;
    Ok(PgTarget { config, tls })
}

/// Connects with the given target and application name, driving the connection on tokio.
pub async fn connect(
    target: PgTarget,
    application_name: &str,
) -> Result<Client, tokio_postgres::Error> {
    let PgTarget { mut config, tls } = target;
    if !application_name.is_empty() {
        config.application_name(application_name);
    }
    let client = match tls {
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            drive(connection);
            client
        }
        Some(tls) => {
            let (client, connection) = config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                    (*tls).clone(),
                ))
                .await?;
            drive(connection);
            client
        }
    };
    Ok(client)
}

fn drive<T>(connection: T)
where
    T: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %describe(&err), "connection ended with an error");
        }
    });
}
