//! PostgreSQL plumbing shared by `pgzm` (the coordinator) and `pgzm-agent`: identifier and
//! literal quoting (`sql`, the one place SQL names are quoted), connections and SQLSTATE
//! classification (`conn`), libpq's completion of connection strings (`libpq`: service file,
//! `PG*` variables, password file) and TLS with libpq's `sslmode` meanings (`tls`).

pub mod conn;
pub mod libpq;
pub mod sql;
pub mod tls;
