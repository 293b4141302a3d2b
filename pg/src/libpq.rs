//! libpq's ways of completing a connection string, so `pgzm` and `pgzm-agent` take what `psql`
//! takes and passwords can stay out of command lines:
//!
//! 1. the keywords of the string itself (URL or `key=value`);
//! 2. then, for keywords still unset, the service's section (`service=NAME` or `$PGSERVICE`) of
//!    `$PGSERVICEFILE` (default `~/.pg_service.conf`), else of `$PGSYSCONFDIR/pg_service.conf`;
//! 3. then the environment: `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGDATABASE`, `PGUSER`,
//!    `PGPASSWORD`, `PGPASSFILE`, `PGOPTIONS`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`, `PGSSLMODE`,
//!    `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGTARGETSESSIONATTRS`, `PGCHANNELBINDING`;
//! 4. then the defaults: the local socket directory as host, the OS user as user, and, when
//!    there is still no password, the first matching line of the password file (`passfile`,
//!    default `~/.pgpass`; ignored, as libpq does, when group or others may read it).
//!
//! `pg-client-config` covers part of this (environment and service file) but not `PGSSLMODE`,
//! `PGPASSWORD`, the `verify-*` modes or client certificates, so it is done here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{ChannelBinding, Host, TargetSessionAttrs};
use tokio_postgres::Config;

/// Keywords pgzm handles itself (tokio-postgres does not know them).
pub const OWN_KEYWORDS: [&str; 6] = [
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "service",
    "passfile",
];

/// Environment variables and the keywords they stand for.
const ENVIRONMENT: [(&str, &str); 16] = [
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGCHANNELBINDING", "channel_binding"),
];

/// libpq keywords accepted (in a service file) and not used by pgzm.
const IGNORED: [&str; 9] = [
    "client_encoding",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "sslcompression",
    "sslsni",
    "requirepeer",
    "keepalives_count",
    "tcp_user_timeout",
];

/// The process environment libpq reads (or a given one, for tests).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// This process's environment.
    pub fn process() -> Environment {
        Environment {
            vars: std::env::vars()
                .filter(|(k, _)| k.starts_with("PG") || k == "HOME" || k == "USER")
                .collect(),
        }
    }

    /// An environment of these variables only.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Environment {
        Environment {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `$HOME`, else the home directory of the OS user.
    pub fn home(&self) -> Option<PathBuf> {
        self.get("HOME").map(PathBuf::from).or_else(os_home)
    }

    fn os_user(&self) -> Option<String> {
        self.get("USER").map(str::to_string).or_else(os_user)
    }
}

#[cfg(unix)]
fn passwd_field(pick: impl FnOnce(&libc::passwd) -> *const libc::c_char) -> Option<String> {
    // SAFETY: getpwuid returns a pointer to static storage or null; the fields read are
    // NUL-terminated C strings; no other thread of this process calls getpwuid concurrently
    // in a way that matters for a best-effort default.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() {
            return None;
        }
        let field = pick(&*pw);
        if field.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr(field)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

#[cfg(unix)]
fn os_home() -> Option<PathBuf> {
    passwd_field(|p| p.pw_dir).map(PathBuf::from)
}

#[cfg(unix)]
fn os_user() -> Option<String> {
    passwd_field(|p| p.pw_name)
}

#[cfg(not(unix))]
fn os_home() -> Option<PathBuf> {
    None
}

#[cfg(not(unix))]
fn os_user() -> Option<String> {
    None
}

/// Where a local server's socket is when no host is given (libpq's compiled-in default:
/// `/var/run/postgresql` on Debian, `/tmp` elsewhere).
fn default_socket_dir() -> &'static str {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql"
    } else {
        "/tmp"
    }
}

/// Keyword values that complete a connection string, in precedence order: the service's
/// section, then the environment. Each with where it came from, for messages.
pub struct Defaults(Vec<(String, String, String)>);

impl Defaults {
    /// Reads the service file section (`service` is taken out of `own`, or `$PGSERVICE`) and
    /// the environment.
    pub fn read(own: &mut BTreeMap<String, String>, env: &Environment) -> Result<Defaults, String> {
        let mut out = Vec::new();
        let service = own
            .remove("service")
            .or_else(|| env.get("PGSERVICE").map(str::to_string));
        if let Some(service) = service {
            let (file, params) = service_section(&service, env)?;
            let origin = format!("service \"{service}\" in {}", file.display());
            for (k, v) in params {
                if k == "service" {
                    return Err(format!("{origin}: a service cannot name another"));
                }
                out.push((origin.clone(), k, v));
            }
        }
        for (var, key) in ENVIRONMENT {
            if let Some(v) = env.get(var) {
                out.push((format!("${var}"), key.to_string(), v.to_string()));
            }
        }
        Ok(Defaults(out))
    }

    /// The first value of `key`.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, k, _)| k == key)
            .map(|(_, _, v)| v.as_str())
    }

    /// A URL whose hosts have no port, with the default port written in (tokio-postgres reads
    /// a missing port as 5432, leaving nothing for `PGPORT` or a service to complete). Other
    /// strings are returned as they are.
    pub fn port_into_url(&self, rest: &str) -> String {
        let Some(port) = self.get("port") else {
            return rest.to_string();
        };
        let Some((scheme, after)) = rest.split_once("://") else {
            return rest.to_string();
        };
        let end = after.find(['/', '?']).unwrap_or(after.len());
        let (authority, tail) = after.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if hosts.is_empty() {
            return rest.to_string();
        }
        let has_port = |h: &str| match h.rsplit_once(']') {
            Some((_, after_bracket)) => after_bracket.starts_with(':'),
            None => h.contains(':'),
        };
        let list: Vec<&str> = hosts.split(',').collect();
        if list.iter().any(|h| has_port(h)) {
            return rest.to_string();
        }
        let ports: Vec<&str> = port.split(',').map(str::trim).collect();
        let with_ports: Vec<String> = list
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let p = if ports.len() == list.len() {
                    ports[i]
                } else {
                    ports[0]
                };
                format!("{h}:{p}")
            })
            .collect();
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        format!("{scheme}://{userinfo}{}{tail}", with_ports.join(","))
    }
}

/// Completes `config` (parsed from the string, without pgzm's own keywords) and `own` (those
/// keywords' values) from `defaults` and libpq's defaults: the socket directory, the OS user,
/// the password file.
pub fn complete(
    config: &mut Config,
    own: &mut BTreeMap<String, String>,
    defaults: &Defaults,
    env: &Environment,
) -> Result<(), String> {
    for (origin, k, v) in &defaults.0 {
        fill(config, own, k, v).map_err(|m| format!("{origin}: {m}"))?;
    }
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        config.host(default_socket_dir());
    }
    if config.get_user().is_none() {
        if let Some(user) = env.os_user() {
            config.user(user);
        }
    }
    if config.get_dbname().is_none() {
        if let Some(user) = config.get_user().map(str::to_string) {
            config.dbname(user);
        }
    }
    if config.get_password().is_none() {
        let file = own
            .get("passfile")
            .map(PathBuf::from)
            .or_else(|| env.home().map(|h| h.join(".pgpass")));
        if let Some(file) = file {
            if let Some(password) = passfile_password(&file, config)? {
                config.password(password);
            }
        }
    }
    Ok(())
}

/// Sets keyword `key` to `value` unless the string (or an earlier source) set it.
fn fill(
    config: &mut Config,
    own: &mut BTreeMap<String, String>,
    key: &str,
    value: &str,
) -> Result<(), String> {
    if OWN_KEYWORDS.contains(&key) {
        own.entry(key.to_string())
            .or_insert_with(|| value.to_string());
        return Ok(());
    }
    match key {
        "host" if config.get_hosts().is_empty() => {
            for h in value.split(',') {
                config.host(h.trim());
            }
        }
        "hostaddr" if config.get_hostaddrs().is_empty() => {
            for a in value.split(',') {
                let addr = a
                    .trim()
                    .parse()
                    .map_err(|_| format!("hostaddr {a:?} is not an IP address"))?;
                config.hostaddr(addr);
            }
        }
        "port" if config.get_ports().is_empty() => {
            for p in value.split(',') {
                let port = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("port {p:?} is not a port number"))?;
                config.port(port);
            }
        }
        "user" if config.get_user().is_none() => {
            config.user(value);
        }
        "password" if config.get_password().is_none() => {
            config.password(value);
        }
        "dbname" if config.get_dbname().is_none() => {
            config.dbname(value);
        }
        "options" if config.get_options().is_none() => {
            config.options(value);
        }
        "application_name" if config.get_application_name().is_none() => {
            config.application_name(value);
        }
        "connect_timeout" if config.get_connect_timeout().is_none() => {
            let secs: u64 = value
                .trim()
                .parse()
                .map_err(|_| format!("connect_timeout {value:?} is not a number of seconds"))?;
            if secs > 0 {
                config.connect_timeout(Duration::from_secs(secs.max(2)));
            }
        }
        "target_session_attrs" => {
            if matches!(config.get_target_session_attrs(), TargetSessionAttrs::Any) {
                config.target_session_attrs(match value {
                    "any" => TargetSessionAttrs::Any,
                    "read-write" => TargetSessionAttrs::ReadWrite,
                    "read-only" => TargetSessionAttrs::ReadOnly,
                    other => {
                        return Err(format!(
                            "target_session_attrs {other:?}: use any, read-write or read-only"
                        ))
                    }
                });
            }
        }
        "channel_binding" => {
            if matches!(config.get_channel_binding(), ChannelBinding::Prefer) {
                config.channel_binding(match value {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    other => {
                        return Err(format!(
                            "channel_binding {other:?}: use disable, prefer or require"
                        ))
                    }
                });
            }
        }
        "keepalives" | "keepalives_idle" | "keepalives_interval" => {
            // Completes the string's settings only when it gave none: tokio-postgres keeps no
            // "unset" for these, so a given value is always applied (as libpq's string wins,
            // this only matters when both set it).
            let apply = Config::from_str(&format!("{key}={value}"))
                .map_err(|_| format!("{key} {value:?} is not valid"))?;
            match key {
                "keepalives" => {
                    config.keepalives(apply.get_keepalives());
                }
                "keepalives_idle" => {
                    config.keepalives_idle(apply.get_keepalives_idle());
                }
                _ => {
                    if let Some(i) = apply.get_keepalives_interval() {
                        config.keepalives_interval(i);
                    }
                }
            }
        }
        "host" | "hostaddr" | "port" | "user" | "password" | "dbname" | "options"
        | "application_name" | "connect_timeout" => {}
        k if IGNORED.contains(&k) => {}
        other => return Err(format!("unknown connection parameter {other:?}")),
    }
    Ok(())
}

/// The keywords of service `name`: from the user's service file, else the system's.
fn service_section(
    name: &str,
    env: &Environment,
) -> Result<(PathBuf, Vec<(String, String)>), String> {
    let user_file = env
        .get("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| env.home().map(|h| h.join(".pg_service.conf")));
    let system_file = Path::new(env.get("PGSYSCONFDIR").unwrap_or("/etc/postgresql-common"))
        .join("pg_service.conf");
    let mut looked = Vec::new();
    for file in user_file.into_iter().chain([system_file]) {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                looked.push(file.display().to_string());
                continue;
            }
            Err(e) => return Err(format!("read service file {}: {e}", file.display())),
        };
        if let Some(params) = parse_service_file(&text, name)
            .map_err(|m| format!("service file {}: {m}", file.display()))?
        {
            return Ok((file, params));
        }
        looked.push(file.display().to_string());
    }
    Err(format!(
        "definition of service \"{name}\" not found (looked in {})",
        looked.join(", ")
    ))
}

/// The `key=value` lines of section `[name]` of a service file, if it has one.
fn parse_service_file(text: &str, name: &str) -> Result<Option<Vec<(String, String)>>, String> {
    let mut found = None;
    let mut current: Option<&str> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            let section = section
                .strip_suffix(']')
                .ok_or_else(|| format!("line {}: unterminated section name", n + 1))?;
            if found.is_some() {
                break;
            }
            current = Some(section.trim());
            if section.trim() == name {
                found = Some(Vec::new());
            }
            continue;
        }
        if current == Some(name) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: expected keyword=value", n + 1))?;
            if let Some(params) = found.as_mut() {
                params.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    Ok(found)
}

/// The password of the first line of password file `file` that matches `config`'s (first) host,
/// port, database and user. `None` when there is no file, no match, or the file may be read by
/// group or others (ignored with a warning, as libpq does).
fn passfile_password(file: &Path, config: &Config) -> Result<Option<String>, String> {
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %file.display(),
                "password file has group or world access; permissions should be u=rw (0600) or less: ignored"
            );
            return Ok(None);
        }
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("read password file {}: {e}", file.display()))?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) if p == Path::new(default_socket_dir()) => "localhost".to_string(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => config
            .get_hostaddrs()
            .first()
            .map(ToString::to_string)
            .unwrap_or_else(|| "localhost".into()),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    let dbname = config
        .get_dbname()
        .map(str::to_string)
        .unwrap_or_else(|| user.clone());
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = passfile_fields(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if matches(&fields[0], &host)
            && matches(&fields[1], &port)
            && matches(&fields[2], &dbname)
            && matches(&fields[3], &user)
        {
            return Ok(Some(fields[4..].join(":")));
        }
    }
    Ok(None)
}

/// The colon-separated fields of a password file line (`\:` and `\\` escaped).
fn passfile_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(n), Some(last)) = (chars.next(), fields.last_mut()) {
                    last.push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(last) = fields.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    fields
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the keywords tokio-postgres does not know (`sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`, `service`, `passfile`) off a URL or `key=value` connection string: the rest, for
/// tokio-postgres, and those keywords' values.
pub fn split_params(
    conninfo: &str,
) -> Result<(String, std::collections::BTreeMap<String, String>), String> {
    let mut taken = std::collections::BTreeMap::new();
    let mut take = |key: &str, value: &str| -> bool {
        if OWN_KEYWORDS.contains(&key) {
            taken.insert(key.to_string(), value.to_string());
            true
        } else {
            false
        }
    };
    let rest = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        match conninfo.split_once('?') {
            None => conninfo.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decode(k), &percent_decode(v)) {
                        kept.push(pair.to_string());
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v) in key_values(conninfo)? {
            if !take(&k, &v) {
                kept.push(format!("{k}={}", quote_value(&v)));
            }
        }
        kept.join(" ")
    };
    Ok((rest, taken))
}

/// A `key=value` value, single-quoted with backslash escapes.
pub fn quote_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Parses libpq `key=value` pairs (values may be single-quoted with backslash escapes).
fn key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!(
                "expected '=' after {key:?} in the connection string"
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted value in the connection string".into()),
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

/// The `key=value` string of a completed configuration: every value explicit (password
/// included), so another process reads it the same whatever its own environment.
pub fn to_conninfo(config: &Config, tls: &crate::tls::TlsParams) -> String {
    use crate::tls::RootCert;
    let q = quote_value;
    let mut out = Vec::new();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        out.push(format!("host={}", q(&hosts.join(","))));
    }
    let addrs: Vec<String> = config
        .get_hostaddrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    if !addrs.is_empty() {
        out.push(format!("hostaddr={}", q(&addrs.join(","))));
    }
    let ports: Vec<String> = config.get_ports().iter().map(ToString::to_string).collect();
    if !ports.is_empty() {
        out.push(format!("port={}", q(&ports.join(","))));
    }
    let mut text = |key: &str, value: Option<&str>| {
        if let Some(v) = value {
            out.push(format!("{key}={}", q(v)));
        }
    };
    text("user", config.get_user());
    text("dbname", config.get_dbname());
    text("options", config.get_options());
    text("application_name", config.get_application_name());
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    text("password", password.as_deref());
    let timeout = config
        .get_connect_timeout()
        .map(|d| d.as_secs().to_string());
    text("connect_timeout", timeout.as_deref());
    text("sslmode", Some(tls.mode.name()));
    let root = tls.root_cert.as_ref().map(|r| match r {
        RootCert::System => "system".to_string(),
        RootCert::File(p) => p.display().to_string(),
    });
    text("sslrootcert", root.as_deref());
    let cert = tls.cert.as_ref().map(|p| p.display().to_string());
    text("sslcert", cert.as_deref());
    let key = tls.key.as_ref().map(|p| p.display().to_string());
    text("sslkey", key.as_deref());
    if matches!(
        config.get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    ) {
        out.push("target_session_attrs=read-write".into());
    }
    if matches!(config.get_channel_binding(), ChannelBinding::Require) {
        out.push("channel_binding=require".into());
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete_with(
        conninfo: &str,
        env: &Environment,
    ) -> Result<(Config, BTreeMap<String, String>), String> {
        let (rest, mut own) = split_params(conninfo)?;
        let defaults = Defaults::read(&mut own, env)?;
        let rest = defaults.port_into_url(&rest);
        let mut config = Config::from_str(&rest).map_err(|e| e.to_string())?;
        complete(&mut config, &mut own, &defaults, env)?;
        Ok((config, own))
    }

    #[test]
    fn the_string_wins_over_the_environment() {
        let env = Environment::from_pairs([
            ("PGHOST", "envhost"),
            ("PGPORT", "6000"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "require"),
        ]);
        let (c, own) = complete_with("postgres://u@h/db", &env).unwrap();
        assert_eq!(c.get_hosts(), [Host::Tcp("h".into())]);
        assert_eq!(c.get_ports(), [6000]);
        assert_eq!(c.get_user(), Some("u"));
        assert_eq!(c.get_password(), Some(&b"envpw"[..]));
        assert_eq!(c.get_dbname(), Some("db"));
        assert_eq!(own["sslmode"], "require");
        let (_, own) = complete_with("host=h sslmode=disable", &env).unwrap();
        assert_eq!(own["sslmode"], "disable");
        let (c, _) = complete_with("postgres://u@h:7,[::1]/db", &env).unwrap();
        assert_eq!(c.get_ports(), [7, 5432], "a URL's own port wins");
        let (c, _) = complete_with("postgres://u@h,[::1]/db", &env).unwrap();
        assert_eq!(c.get_ports(), [6000, 6000]);
    }

    #[test]
    fn service_file_then_environment() {
        let dir = std::env::temp_dir().join(format!("pgzm-libpq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("services.conf");
        std::fs::write(
            &file,
            "# comment\n[other]\nhost=nope\n[prod]\nhost=db.internal\nport=6432\ndbname=app\nsslmode=verify-full\nkeepalives=1\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let env =
            Environment::from_pairs([("PGSERVICEFILE", f), ("PGUSER", "envuser"), ("PGPORT", "1")]);
        let (c, own) = complete_with("service=prod user=me", &env).unwrap();
        assert_eq!(c.get_hosts(), [Host::Tcp("db.internal".into())]);
        assert_eq!(
            c.get_ports(),
            [6432],
            "the service wins over the environment"
        );
        assert_eq!(c.get_user(), Some("me"), "the string wins over the service");
        assert_eq!(own["sslmode"], "verify-full");
        let env = Environment::from_pairs([
            ("PGSERVICEFILE", f),
            ("PGSERVICE", "prod"),
            ("PGSYSCONFDIR", "/nonexistent"),
        ]);
        let (c, _) = complete_with("postgres:///other", &env).unwrap();
        assert_eq!(c.get_dbname(), Some("other"));
        assert_eq!(c.get_hosts(), [Host::Tcp("db.internal".into())]);
        let err = complete_with("service=missing", &env).unwrap_err();
        assert!(
            err.contains("definition of service \"missing\" not found"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn password_file_lines_match_like_libpq() {
        let dir = std::env::temp_dir().join(format!("pgzm-pgpass-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:5432:*:*:wrong\ndb:5432:app:u:first\\:pw\ndb:*:*:*:second\nlocalhost:5432:*:*:local\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = file.to_str().unwrap();
        let env = Environment::from_pairs([("PGPASSFILE", f)]);
        let pw = |s: &str| {
            complete_with(s, &env)
                .unwrap()
                .0
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        };
        assert_eq!(pw("host=db dbname=app user=u").as_deref(), Some("first:pw"));
        assert_eq!(
            pw("host=db dbname=x user=u port=7").as_deref(),
            Some("second")
        );
        assert_eq!(
            pw("host=db dbname=app user=u password=given").as_deref(),
            Some("given")
        );
        assert_eq!(pw("host=elsewhere user=u").as_deref(), None);
        assert_eq!(
            pw(&format!("host=elsewhere user=u passfile={f}")).as_deref(),
            None
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            pw("host=db dbname=app user=u"),
            None,
            "a readable file is ignored"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completed_strings_read_the_same_anywhere() {
        let env =
            Environment::from_pairs([("PGPASSWORD", "it's \\ secret"), ("PGSSLMODE", "require")]);
        let (c, own) = complete_with("postgres://u@h:5/db?application_name=x", &env).unwrap();
        let tls = crate::tls::TlsParams::from_keywords(|k| own.get(k).cloned(), None).unwrap();
        let s = to_conninfo(&c, &tls);
        let (rest, own2) = split_params(&s).unwrap();
        let c2 = Config::from_str(&rest).unwrap();
        assert_eq!(c2.get_password(), Some("it's \\ secret".as_bytes()));
        assert_eq!(c2.get_hosts(), c.get_hosts());
        assert_eq!(c2.get_ports(), [5]);
        assert_eq!(c2.get_application_name(), Some("x"));
        assert_eq!(own2["sslmode"], "require");
    }
    #[test]
    fn url_parameters_are_split_off() {
        let (rest, taken) = split_params("postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x&service=s").unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(taken["sslmode"], "verify-full");
        assert_eq!(taken["sslrootcert"], "/tmp/ca.pem");
        assert_eq!(taken["service"], "s");
        let (rest, taken) = split_params("postgres://h/db").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert!(taken.is_empty());
    }

    #[test]
    fn key_value_parameters_are_split_off() {
        let (rest, taken) = split_params(r"host=h password='it\'s' sslmode=disable").unwrap();
        assert_eq!(rest, r"host='h' password='it\'s'");
        assert_eq!(taken["sslmode"], "disable");
        let (rest, taken) = split_params(
            "host=h dbname='my db' sslmode = verify-ca sslrootcert='/a b/ca.pem' sslcert=c sslkey=k passfile=/p",
        )
        .unwrap();
        assert_eq!(rest, "host='h' dbname='my db'");
        assert_eq!(taken.len(), 5);
        assert_eq!(taken["sslrootcert"], "/a b/ca.pem");
    }
}
