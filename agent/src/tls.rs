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

/// The TLS parameters taken out of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// sslmode.
    pub mode: Mode,
    /// sslrootcert.
    pub root_cert: Option<PathBuf>,
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

/// Splits `sslmode` and `sslrootcert` off a URL or `key=value` connection string. The rest is
/// returned for tokio-postgres, with `sslmode` set to what it understands.
pub fn split_tls_params(conninfo: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams {
        mode: Mode::Prefer,
        root_cert: None,
    };
    let mut set = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                params.mode = mode(value)?;
                Ok(true)
            }
            "sslrootcert" => {
                params.root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        match conninfo.split_once('?') {
            None => conninfo.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !set(&percent_decode(k), &percent_decode(v))? {
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
            if !set(&k, &v)? {
                kept.push(format!(
                    "{k}='{}'",
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        kept.join(" ")
    };
    let tokio_mode = match params.mode {
        Mode::Disable => "disable",
        Mode::Prefer => "prefer",
        _ => "require",
    };
    let sep = if rest.starts_with("postgres://") || rest.starts_with("postgresql://") {
        if rest.contains('?') {
            "&"
        } else {
            "?"
        }
    } else {
        " "
    };
    let rest = if rest.is_empty() {
        format!("sslmode={tokio_mode}")
    } else {
        format!("{rest}{sep}sslmode={tokio_mode}")
    };
    if params.root_cert.is_some() && params.mode == Mode::Require {
        params.mode = Mode::VerifyCa;
    }
    Ok((rest, params))
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

fn roots(path: &Option<PathBuf>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match path {
        Some(p) => {
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
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
        }
    }
    Ok(store)
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
    Ok(Some(Arc::new(
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    )))
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

    #[test]
    fn url_parameters_are_split_off() {
        let (rest, p) = split_tls_params("postgres://u:p@h:5/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x").unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@h:5/db?application_name=x&sslmode=require"
        );
        assert_eq!(
            p,
            TlsParams {
                mode: Mode::VerifyFull,
                root_cert: Some(PathBuf::from("/tmp/ca.pem"))
            }
        );
        let (rest, p) = split_tls_params("postgres://h/db").unwrap();
        assert_eq!(rest, "postgres://h/db?sslmode=prefer");
        assert_eq!(p.mode, Mode::Prefer);
        let (_, p) =
            split_tls_params("postgres://h/db?sslmode=require&sslrootcert=ca.pem").unwrap();
        assert_eq!(
            p.mode,
            Mode::VerifyCa,
            "require with a root certificate verifies the chain, as libpq does"
        );
    }

    #[test]
    fn key_value_parameters_are_split_off() {
        let (rest, p) = split_tls_params(r"host=h password='it\'s' sslmode=disable").unwrap();
        assert_eq!(rest, r"host='h' password='it\'s' sslmode=disable");
        assert_eq!(p.mode, Mode::Disable);
        let (rest, p) =
            split_tls_params("host=h dbname='my db' sslmode = verify-ca sslrootcert='/a b/ca.pem'")
                .unwrap();
        assert_eq!(rest, "host='h' dbname='my db' sslmode=require");
        assert_eq!(
            p,
            TlsParams {
                mode: Mode::VerifyCa,
                root_cert: Some(PathBuf::from("/a b/ca.pem"))
            }
        );
        assert!(split_tls_params("host=h sslmode=sometimes")
            .unwrap_err()
            .contains("unknown sslmode"));
    }
}
