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

/// What went wrong, read from the SQLSTATE (or from the connection failing): the retry policy
/// ([`ErrorClass`]) follows from it, and it travels across gRPC by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server could not be reached, refused connections for now (starting, recovering, too
    /// many), or the connection broke (class 08, 57P03, 53300, or no server answer at all).
    Connection,
    /// The server shut the session down, or crashed (57P01, 57P02).
    Shutdown,
    /// Authentication failed (class 28).
    Auth,
    /// A lock was not granted within `lock_timeout` (55P03).
    LockTimeout,
    /// A serialization failure or deadlock (40001, 40P01).
    Serialization,
    /// A constraint was violated (class 23).
    Constraint,
    /// A privilege is missing (42501).
    InsufficientPrivilege,
    /// A relation, type or function does not exist (42P01, 42704, 42883).
    UndefinedObject,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::Connection,
        ErrorKind::Shutdown,
        ErrorKind::Auth,
        ErrorKind::LockTimeout,
        ErrorKind::Serialization,
        ErrorKind::Constraint,
        ErrorKind::InsufficientPrivilege,
        ErrorKind::UndefinedObject,
        ErrorKind::Other,
    ];

    /// The kind of a PostgreSQL error.
    pub fn of(err: &tokio_postgres::Error) -> ErrorKind {
        let Some(code) = err.code() else {
            return if err.is_closed() || err.as_db_error().is_none() {
                ErrorKind::Connection
            } else {
                ErrorKind::Other
            };
        };
        let c = code.code();
        if *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || c.starts_with("08")
        {
            ErrorKind::Connection
        } else if *code == SqlState::ADMIN_SHUTDOWN || *code == SqlState::CRASH_SHUTDOWN {
            ErrorKind::Shutdown
        } else if c.starts_with("28") {
            ErrorKind::Auth
        } else if *code == SqlState::LOCK_NOT_AVAILABLE {
            ErrorKind::LockTimeout
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            ErrorKind::Serialization
        } else if c.starts_with("23") {
            ErrorKind::Constraint
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            ErrorKind::InsufficientPrivilege
        } else if *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::UNDEFINED_OBJECT
            || *code == SqlState::UNDEFINED_FUNCTION
        {
            ErrorKind::UndefinedObject
        } else {
            ErrorKind::Other
        }
    }

    /// The retry policy of the kind.
    pub fn class(self) -> ErrorClass {
        match self {
            ErrorKind::LockTimeout => ErrorClass::LockTimeout,
            ErrorKind::Connection | ErrorKind::Shutdown | ErrorKind::Serialization => {
                ErrorClass::Retryable
            }
            ErrorKind::Auth
            | ErrorKind::Constraint
            | ErrorKind::InsufficientPrivilege
            | ErrorKind::UndefinedObject
            | ErrorKind::Other => ErrorClass::Fatal,
        }
    }

    /// The kind's name (as it travels in gRPC metadata).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connection => "connection",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Auth => "auth",
            ErrorKind::LockTimeout => "lock_timeout",
            ErrorKind::Serialization => "serialization",
            ErrorKind::Constraint => "constraint",
            ErrorKind::InsufficientPrivilege => "insufficient_privilege",
            ErrorKind::UndefinedObject => "undefined_object",
            ErrorKind::Other => "other",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// A PostgreSQL error as the tools report it: its [`ErrorKind`] (the retry policy follows from
/// it), its one-line rendering ([`describe`]: message, detail, hint, SQLSTATE) as the
/// `Display`, and the original error kept as the `source`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: tokio_postgres::Error,
}

impl PgError {
    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The retry policy.
    pub fn class(&self) -> ErrorClass {
        self.kind.class()
    }

    /// The SQLSTATE, when the server sent one.
    pub fn code(&self) -> Option<&SqlState> {
        self.source.code()
    }

    /// The original error.
    pub fn inner(&self) -> &tokio_postgres::Error {
        &self.source
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(source: tokio_postgres::Error) -> Self {
        PgError {
            kind: ErrorKind::of(&source),
            message: describe(&source),
            source,
        }
    }
}

/// Classifies an error by SQLSTATE (or as retryable when the connection itself failed): the
/// class of its [`ErrorKind`].
pub fn classify(err: &tokio_postgres::Error) -> ErrorClass {
    ErrorKind::of(err).class()
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
    one_line(&with_causes(
        err.to_string(),
        std::error::Error::source(err),
    ))
}

/// `out` followed by the messages of an error's chain of causes (`: cause`), each one that
/// `out` does not contain yet.
pub fn with_causes(
    mut out: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A parsed connection target: tokio-postgres settings plus the TLS policy of its `sslmode`
/// (see [`crate::tls`]). `Debug` shows no password.
#[derive(Clone)]
pub struct PgTarget {
    config: Config,
    params: crate::tls::TlsParams,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("sslmode", &self.params.mode)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for PgTarget {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

/// Where a connection goes, as OpenTelemetry's database conventions name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOf {
    /// `db.namespace`: the database.
    pub namespace: String,
    /// `server.address`: the first host (a socket directory for Unix sockets).
    pub address: String,
    /// `server.port`: the first port.
    pub port: u16,
}

impl PgTarget {
    /// The database, host and port this target connects to (the first of several hosts).
    pub fn server(&self) -> ServerOf {
        let address = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        ServerOf {
            namespace: self.config.get_dbname().unwrap_or_default().to_string(),
            address,
            port: self.config.get_ports().first().copied().unwrap_or(5432),
        }
    }

    /// The TLS parameters.
    pub fn tls_params(&self) -> &crate::tls::TlsParams {
        &self.params
    }

    /// The completed connection string, every value explicit (password included): what another
    /// process (an agent) needs to reach the same database whatever its own environment.
    /// Never for output.
    pub fn conninfo(&self) -> String {
        crate::libpq::to_conninfo(&self.config, &self.params)
    }
}

/// Parses a connection string (URL or `key=value` form) and completes it as libpq does, from
/// the service file, the `PG*` environment variables, the password file and the defaults (see
/// [`crate::libpq`]); `sslmode`, `sslrootcert`, `sslcert` and `sslkey` have libpq's meanings.
///
/// No error message ever contains the connection string or a part of it: the parser's messages
/// quote the input, so quoted fragments and the password are cut out of them.
pub fn parse_config(conninfo: &str) -> Result<PgTarget, String> {
    parse_config_in(conninfo, &crate::libpq::Environment::process())
}

/// [`parse_config`] with the given environment.
pub fn parse_config_in(
    conninfo: &str,
    env: &crate::libpq::Environment,
) -> Result<PgTarget, String> {
    if let Some(problem) = ambiguous_userinfo(conninfo) {
        return Err(problem);
    }
    if let Some((scheme, _)) = conninfo.split_once("://") {
        if !matches!(scheme, "postgres" | "postgresql") && !scheme.contains([' ', '=']) {
            return Err(
                "its scheme is not postgres:// or postgresql:// (or use key=value pairs)".into(),
            );
        }
    }
    let redact = |m: String| redact_conninfo(&m, conninfo);
    let (rest, mut own) = crate::libpq::split_params(conninfo).map_err(redact)?;
    let defaults = crate::libpq::Defaults::read(&mut own, env).map_err(redact)?;
    let rest = defaults.port_into_url(&rest);
    let mut config = if rest.trim().is_empty() {
        Config::new()
    } else {
        Config::from_str(&rest).map_err(|e| redact(describe(&e)))?
    };
    crate::libpq::complete(&mut config, &mut own, &defaults, env).map_err(redact)?;
    let home = env.home();
    let params = crate::tls::TlsParams::from_keywords(|k| own.get(k).cloned(), home.as_deref())
        .map_err(redact)?;
    config.ssl_mode(params.mode.negotiation());
    let tls = crate::tls::client_config(&params).map_err(redact)?;
    Ok(PgTarget {
        config,
        params,
        tls,
    })
}

/// A URL whose user-info holds an unencoded `@` (`postgres://u:p@ss@host/db`) would be read
/// with part of the password as the host, and that host is printed: refused as such.
fn ambiguous_userinfo(conninfo: &str) -> Option<String> {
    let rest = conninfo
        .strip_prefix("postgresql://")
        .or_else(|| conninfo.strip_prefix("postgres://"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    (authority.matches('@').count() > 1).then(|| {
        "it has more than one '@' before the host: percent-encode '@' in the user name or password as %40".to_string()
    })
}

/// `message` without any quoted fragment (the parser quotes the input it stopped at) and
/// without the password of `conninfo`, wherever it appears.
pub fn redact_conninfo(message: &str, conninfo: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…");
            }
            quoted = !quoted;
            if !quoted {
                out.push('"');
            }
            continue;
        }
        if !quoted {
            out.push(c);
        }
    }
    if quoted {
        out.push('"');
    }
    for secret in password_candidates(conninfo) {
        if secret.len() >= 2 {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The password in a URL's user-info or in a `password=` pair (raw and percent-decoded text).
fn password_candidates(conninfo: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(rest) = conninfo
        .strip_prefix("postgresql://")
        .or_else(|| conninfo.strip_prefix("postgres://"))
        .or_else(|| conninfo.split_once("://").map(|(_, r)| r))
    {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                out.push(password.to_string());
            }
        }
    }
    for part in conninfo.split(['&', '?', ' ']) {
        if let Some(value) = part.trim().strip_prefix("password=") {
            out.push(value.trim_matches('\'').to_string());
        }
    }
    let decoded: Vec<String> = out
        .iter()
        .filter_map(|p| percent_decode(p).filter(|d| d != p))
        .collect();
    out.extend(decoded);
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Silence on a connection after which TCP keepalive probes start, unless the connection
/// string sets `keepalives_idle` (tokio-postgres' own default is 2 hours).
pub const KEEPALIVES_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Time between unanswered probes, unless the string sets `keepalives_interval`.
pub const KEEPALIVES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Unanswered probes after which the connection is given up.
pub const KEEPALIVES_RETRIES: u32 = 3;

/// tokio-postgres' default `keepalives_idle`, which it cannot tell from a value the string gave.
const DRIVER_KEEPALIVES_IDLE: std::time::Duration = std::time::Duration::from_secs(2 * 60 * 60);

/// Keepalive settings for connections that may cross a WAN: a session whose peer went silent
/// behind a partitioned link (a snapshot holder, a COPY reader waiting for rows) fails after
/// about a minute of silence ([`KEEPALIVES_IDLE`] + [`KEEPALIVES_RETRIES`] ×
/// [`KEEPALIVES_INTERVAL`]) instead of waiting for TCP to give up (hours when idle). Values the
/// connection string gives are kept; `keepalives=0` turns the probes off.
pub fn apply_keepalive_defaults(config: &mut Config) {
    if !config.get_keepalives() {
        return;
    }
    if config.get_keepalives_idle() == DRIVER_KEEPALIVES_IDLE {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
}

/// Connects with the given target and application name, driving the connection on tokio.
pub async fn connect(
    target: PgTarget,
    application_name: &str,
) -> Result<Client, tokio_postgres::Error> {
    let PgTarget {
        mut config, tls, ..
    } = target;
    if !application_name.is_empty() {
        config.application_name(application_name);
    }
    apply_keepalive_defaults(&mut config);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Malformed connection strings never come back in the error, password least of all.
    #[test]
    fn parse_errors_never_echo_the_connection_string() {
        for (conninfo, secrets) in [
            (
                "postgress://app:TopSecret9@db.example.com/prod",
                &["TopSecret9"][..],
            ),
            (
                "postgres://app:Top@Secret9@db.example.com/prod",
                &["Top", "Secret9"],
            ),
            (
                "postgres://app:TopSecret9@db.example.com:99999/prod",
                &["TopSecret9"],
            ),
            ("postgres://app:TopSecret9@[::1/prod", &["TopSecret9"]),
            (
                "postgres://app:Top%20Secret9@db.example.com:x/prod",
                &["Top%20Secret9", "Top Secret9"],
            ),
            ("host=db password=TopSecret9 dbname", &["TopSecret9"]),
            (
                "host=db password='TopSecret9' port=x dbname=d",
                &["TopSecret9"],
            ),
            (
                "host=db password=TopSecret9 sslmode=sometimes dbname=d",
                &["TopSecret9"],
            ),
        ] {
            let err = parse_config(conninfo)
                .err()
                .unwrap_or_else(|| panic!("{conninfo} parsed"));
            for secret in secrets {
                assert!(!err.contains(secret), "{conninfo}: {err}");
            }
            assert!(!err.contains("db.example.com/prod"), "{conninfo}: {err}");
        }
    }

    /// Connections probe a silent peer after 30 s, every 10 s, three times; what the
    /// connection string says wins, and `keepalives=0` keeps them off.
    #[test]
    fn keepalive_defaults_fill_only_what_the_string_left_unset() {
        let mut c = parse_config("host=db dbname=d").expect("parse").config;
        apply_keepalive_defaults(&mut c);
        assert_eq!(c.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(c.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(c.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        let mut c = parse_config(
            "host=db dbname=d keepalives_idle=5 keepalives_interval=2 keepalives_retries=7",
        )
        .expect("parse")
        .config;
        apply_keepalive_defaults(&mut c);
        assert_eq!(c.get_keepalives_idle(), std::time::Duration::from_secs(5));
        assert_eq!(
            c.get_keepalives_interval(),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(c.get_keepalives_retries(), Some(7));
        let mut c = parse_config("postgres://db/d?keepalives=0")
            .expect("parse")
            .config;
        apply_keepalive_defaults(&mut c);
        assert!(!c.get_keepalives());
        assert_eq!(c.get_keepalives_interval(), None);
    }

    #[test]
    fn redaction_keeps_the_reason() {
        assert_eq!(
            redact_conninfo(
                r#"invalid connection string: expected '=' after "x y""#,
                "x y"
            ),
            r#"invalid connection string: expected '=' after "…""#
        );
        assert_eq!(
            redact_conninfo("bad password s3cr3t", "postgres://u:s3cr3t@h/d"),
            "bad password ***"
        );
    }

    #[test]
    fn error_kinds_have_names_and_policies() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::Connection.class(), ErrorClass::Retryable);
        assert_eq!(ErrorKind::Auth.class(), ErrorClass::Fatal);
        assert_eq!(ErrorKind::LockTimeout.class(), ErrorClass::LockTimeout);
        assert_eq!(ErrorKind::parse("nonsense"), None);
    }
}
