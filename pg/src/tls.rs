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
