//! TLS to PostgreSQL with rustls, with libpq's `sslmode` meanings:
//!
//! | sslmode | encryption | server certificate |
//! |---|---|---|
//! | `disable` | no | – |
//! | `allow`, `prefer` (default) | when the server offers it | not verified |
//! | `require` | yes | not verified — unless `sslrootcert` is given, then as `verify-ca` |
//! | `verify-ca` | yes | chain verified against `sslrootcert` (or the system roots) |
//! | `verify-full` | yes | chain and host name verified |
//!
//! tokio-postgres itself knows only disable/prefer/require and no `sslrootcert`, so
//! [`split_tls_params`] takes those two parameters out of the connection string first.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    SignatureScheme,
};

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No TLS.
    Disable,
    /// TLS when offered, unverified.
    Prefer,
    /// TLS required, unverified.
    Require,
    /// TLS required, chain verified.
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

/// Where the server's certificate is checked against (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the system's trusted roots (implies `verify-full`, as in libpq 16).
    System,
}

/// The TLS parameters of a connection (libpq's `ssl*` keywords).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// sslmode.
    pub mode: Mode,
    /// sslrootcert.
    pub root_cert: Option<RootCert>,
    /// sslcert: the client certificate (PEM) presented to the server.
    pub cert: Option<PathBuf>,
    /// sslkey: its private key (PEM).
    pub key: Option<PathBuf>,
}

impl Mode {
    /// libpq's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told (it knows only whether TLS is off, offered or required).
    pub fn negotiation(self) -> tokio_postgres::config::SslMode {
        match self {
            Mode::Disable => tokio_postgres::config::SslMode::Disable,
            Mode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

impl TlsParams {
    /// The parameters given by `sslmode`, `sslrootcert`, `sslcert` and `sslkey` (already
    /// completed from the service file and the environment). As in libpq: the files under
    /// `~/.postgresql/` (`root.crt`, `postgresql.crt`, `postgresql.key`) are used when they
    /// exist and nothing else is given; `require` with a root certificate verifies the chain;
    /// `sslrootcert=system` means `verify-full` against the system roots.
    pub fn from_keywords(
        get: impl Fn(&str) -> Option<String>,
        home: Option<&std::path::Path>,
    ) -> Result<TlsParams, String> {
        let default_file = |name: &str| {
            home.map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.is_file())
        };
        let root_cert = match get("sslrootcert") {
            Some(v) if v == "system" => Some(RootCert::System),
            Some(v) if !v.is_empty() => Some(RootCert::File(PathBuf::from(v))),
            _ => default_file("root.crt").map(RootCert::File),
        };
        let mode = match get("sslmode") {
            Some(v) => mode(&v)?,
            None if root_cert == Some(RootCert::System) => Mode::VerifyFull,
            None => Mode::Prefer,
        };
        if root_cert == Some(RootCert::System) && mode != Mode::VerifyFull {
            return Err(format!(
                "sslrootcert=system needs sslmode=verify-full, not the weaker {}",
                mode.name()
            ));
        }
        let mode = if mode == Mode::Require && root_cert.is_some() {
            Mode::VerifyCa
        } else {
            mode
        };
        let cert = get("sslcert")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| default_file("postgresql.crt"));
        let key = get("sslkey")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| default_file("postgresql.key"));
        Ok(TlsParams {
            mode,
            root_cert,
            cert,
            key,
        })
    }
}

fn mode(value: &str) -> Result<Mode, String> {
    Ok(match value {
        "disable" => Mode::Disable,
        "allow" | "prefer" => Mode::Prefer,
        "require" => Mode::Require,
        "verify-ca" => Mode::VerifyCa,
        "verify-full" => Mode::VerifyFull,
        other => {
            return Err(format!(
                "unknown sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
            ))
        }
    })
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
        if crate::libpq::OWN_KEYWORDS.contains(&key) {
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(root: &Option<RootCert>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        Some(RootCert::File(p)) => {
            let certs = CertificateDer::pem_file_iter(p)
                .map_err(|e| format!("sslrootcert {}: {e}", p.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("sslrootcert {}: {e}", p.display()))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {}: no certificate in it", p.display()));
            }
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| format!("sslrootcert {}: {e}", p.display()))?;
            }
        }
        Some(RootCert::System) | None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
            if store.is_empty() {
                return Err("the system has no trusted root certificates (sslrootcert=system or verify-ca/verify-full without sslrootcert): give sslrootcert=FILE".into());
            }
        }
    }
    Ok(store)
}

/// The client certificate chain and key of `sslcert`/`sslkey`, for certificate authentication.
fn client_identity(
    params: &TlsParams,
) -> Result<
    Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
    String,
> {
    let (cert, key) = match (&params.cert, &params.key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(c), None) => {
            return Err(format!(
                "sslcert {} is given without sslkey: give both",
                c.display()
            ))
        }
        (None, Some(k)) => {
            return Err(format!(
                "sslkey {} is given without sslcert: give both",
                k.display()
            ))
        }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("sslcert {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("sslcert {}: no certificate in it", cert.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(key)
            .map_err(|e| format!("sslkey {}: {e}", key.display()))?
            .permissions()
            .mode();
        if mode & 0o037 != 0 {
            return Err(format!(
                "sslkey {} has group or world access (mode {:o}): it must be u=rw (0600) or less, or u=rw,g=r (0640) if owned by root, as libpq requires",
                key.display(),
                mode & 0o777
            ));
        }
    }
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
    Ok(Some((chain, key_der)))
}

/// The rustls client configuration for `params` (None for `disable`).
pub fn client_config(params: &TlsParams) -> Result<Option<Arc<ClientConfig>>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let chain = match params.mode {
        Mode::Disable => return Ok(None),
        Mode::Prefer | Mode::Require => None,
        Mode::VerifyCa | Mode::VerifyFull => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(&params.root_cert)?),
                provider(),
            )
            .build()
            .map_err(|e| format!("TLS setup: {e}"))?,
        ),
    };
    let verifier = Verifier {
        provider: provider(),
        chain,
        check_name: params.mode == Mode::VerifyFull,
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let config = match client_identity(params)? {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("sslcert/sslkey: {e}"))?,
    };
    Ok(Some(Arc::new(config)))
}

/// The server certificate check of an `sslmode`. The handshake signatures are always checked,
/// with the provider's algorithms (the same ones the chain verifier uses).
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    /// `None` for `prefer`/`require`: any certificate is accepted (libpq's meaning). The chain
    /// verifier for `verify-ca` and `verify-full`.
    chain: Option<Arc<WebPkiServerVerifier>>,
    /// Whether the host name must match too (`verify-full`).
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Result<TlsParams, String> {
        let map: std::collections::BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TlsParams::from_keywords(|k| map.get(k).cloned(), None)
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

    #[test]
    fn modes_as_in_libpq() {
        assert_eq!(params(&[]).unwrap().mode, Mode::Prefer);
        assert_eq!(
            params(&[("sslmode", "require"), ("sslrootcert", "ca.pem")])
                .unwrap()
                .mode,
            Mode::VerifyCa,
            "require with a root certificate verifies the chain"
        );
        let system = params(&[("sslrootcert", "system")]).unwrap();
        assert_eq!(system.mode, Mode::VerifyFull);
        assert_eq!(system.root_cert, Some(RootCert::System));
        assert!(params(&[("sslrootcert", "system"), ("sslmode", "require")])
            .unwrap_err()
            .contains("verify-full"));
        assert!(params(&[("sslmode", "sometimes")])
            .unwrap_err()
            .contains("unknown sslmode"));
    }
}
