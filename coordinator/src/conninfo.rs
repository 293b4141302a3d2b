//! Connection strings: parsed once and completed as libpq does (service file, `PG*` variables,
//! password file), passed on to agents completed, printed without secrets.

use pgzm_pg::conn::PgTarget;
use tokio_postgres::config::Host;

use crate::error::CoordinatorError;

/// A database connection string whose `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct DbUrl {
    config: PgTarget,
    side: &'static str,
}

impl DbUrl {
    /// The database, host and port it connects to (for traces).
    pub fn server(&self) -> pgzm_pg::conn::ServerOf {
        self.config.server()
    }

    /// Parses a URL (`postgres://user:pass@host:port/db?sslmode=…`) or `key=value` string and
    /// completes it from the environment as libpq does. `side` ("source" or "destination")
    /// names it in messages.
    pub fn parse(raw: &str, side: &'static str) -> Result<DbUrl, CoordinatorError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(CoordinatorError::InvalidUrl {
                side,
                message: "it is empty".into(),
            });
        }
        let config = pgzm_pg::conn::parse_config(raw)
            .map_err(|message| CoordinatorError::InvalidUrl { side, message })?;
        if config.get_hosts().is_empty() {
            return Err(CoordinatorError::InvalidUrl {
                side,
                message: "no host given".into(),
            });
        }
        if config.get_dbname().is_none_or(str::is_empty) {
            return Err(CoordinatorError::InvalidUrl {
                side,
                message: "no database name given (postgres://user@host:port/DBNAME)".into(),
            });
        }
        Ok(DbUrl { config, side })
    }

    /// The completed connection string, credentials included (those from the environment or
    /// the password file too): for agents only, never for output.
    pub fn expose(&self) -> String {
        self.config.conninfo()
    }

    /// Parsed config.
    pub fn config(&self) -> &PgTarget {
        &self.config
    }

    /// "source" or "destination".
    pub fn side(&self) -> &'static str {
        self.side
    }

    /// Database name.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or_default()
    }

    /// `host:port` of the first host.
    pub fn host_port(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// User name, if given.
    pub fn user(&self) -> Option<&str> {
        self.config.get_user()
    }

    /// Connects, naming the target (without secrets) in the error.
    pub async fn connect(
        &self,
        application_name: &str,
    ) -> Result<tokio_postgres::Client, CoordinatorError> {
        pgzm_pg::conn::connect(self.config.clone(), application_name)
            .await
            .map_err(|e| CoordinatorError::Connect {
                side: self.side,
                target: self.to_string(),
                message: pgzm_pg::conn::describe(&e),
            })
    }
}

impl std::fmt::Display for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.user() {
            Some(user) => write!(f, "{user}@{}/{}", self.host_port(), self.dbname()),
            None => write!(f, "{}/{}", self.host_port(), self.dbname()),
        }
    }
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let url = DbUrl::parse(
            "postgres://app:s3cret@db.example.com:6543/prod",
            "destination",
        )
        .unwrap();
        assert_eq!(url.dbname(), "prod");
        assert_eq!(url.host_port(), "db.example.com:6543");
        assert_eq!(url.to_string(), "app@db.example.com:6543/prod");
        assert!(!format!("{url:?}").contains("s3cret"));
        let again = DbUrl::parse(&url.expose(), "destination").unwrap();
        assert_eq!(again.to_string(), url.to_string());
        assert_eq!(again.config().get_password(), Some(&b"s3cret"[..]));
    }

    #[test]
    fn default_port_and_key_value_form() {
        let url = DbUrl::parse("host=localhost dbname=x user=u password=pw", "source").unwrap();
        assert_eq!(url.host_port(), "localhost:5432");
        assert!(!url.to_string().contains("pw"));
    }

    #[test]
    fn defaults_the_database_and_rejects_garbage_without_echoing() {
        // As in libpq, the database defaults to the user's name.
        let url = DbUrl::parse("postgres://u:topsecret@localhost:5432", "source").unwrap();
        assert_eq!(url.dbname(), "u");
        let err = DbUrl::parse("postgres://u:topsecret@localhost:notaport/db", "source")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid source database URL"), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
        assert!(DbUrl::parse("  ", "destination").is_err());
    }

    #[test]
    fn percent_encoded_password_is_decoded() {
        let url = DbUrl::parse("postgres://u:p%40ss@localhost/db", "source").unwrap();
        assert_eq!(url.config().get_password(), Some(&b"p@ss"[..]));
    }
}
