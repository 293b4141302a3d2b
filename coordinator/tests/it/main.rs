//! Black-box tests of the real `pgzm` binary (and `pgzm-agent` processes) against throwaway
//! PostgreSQL servers, in one test binary. (`trace_inmemory` stays a binary of its own: it
//! installs the process-wide tracing subscriber.)

mod support;

mod backup_cli;
mod cli;
mod otlp;
mod resume_cli;
mod two_phase;
