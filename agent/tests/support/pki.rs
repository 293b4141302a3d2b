//! A throwaway PKI for the mTLS tests: a CA, an agent certificate for 127.0.0.1/localhost
//! (server and client use: agents also call each other), a coordinator client certificate, and
//! a client certificate from an unrelated CA. PEM files in a temp dir removed on drop.
//! [`ca`], [`leaf`] and [`Pki::empty`] also serve tests that need other certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files (a temp dir removed on drop).
pub struct Pki {
    dir: PathBuf,
}

/// A self-signed CA: its certificate (PEM) and the issuer to sign leaves with.
pub fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A certificate for `sans` with the extended key `usages`, signed by `issuer`: certificate
/// and key (PEM).
pub fn leaf(
    name: &str,
    sans: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
    issuer: &Issuer<'static, KeyPair>,
) -> (String, String) {
    let mut params = CertificateParams::new(
        sans.iter()
            .map(|s| (*s).to_string())
            .collect::<Vec<String>>(),
    )
    .expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    /// A new empty temp dir `PREFIX-PID-NANOS`.
    pub fn empty(prefix: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("create pki dir");
        Pki { dir }
    }

    /// Writes `pem` to `file` in the dir; its path.
    pub fn write(&self, file: &str, pem: &str) -> PathBuf {
        let path = self.path(file);
        std::fs::write(&path, pem).expect("write pem");
        path
    }

    /// Generates everything into a new temp dir.
    pub fn generate() -> Pki {
        let pki = Pki::empty("pgzm-pki");
        let (ca_pem, issuer) = ca("pgzm test CA");
        let (other_ca_pem, other_issuer) = ca("some other CA");
        let both = [
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let client = [ExtendedKeyUsagePurpose::ClientAuth];
        let (agent_cert, agent_key) =
            leaf("pgzm-agent", &["127.0.0.1", "localhost"], &both, &issuer);
        let (coord_cert, coord_key) = leaf("pgzm-coordinator", &[], &client, &issuer);
        let (rogue_cert, rogue_key) = leaf("pgzm-coordinator", &[], &client, &other_issuer);
        for (file, pem) in [
            ("ca.pem", ca_pem),
            ("other-ca.pem", other_ca_pem),
            ("agent.pem", agent_cert),
            ("agent.key", agent_key),
            ("coordinator.pem", coord_cert),
            ("coordinator.key", coord_key),
            ("rogue.pem", rogue_cert),
            ("rogue.key", rogue_key),
        ] {
            pki.write(file, &pem);
        }
        pki
    }

    /// Path of one of the files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Contents of one of the files.
    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("read pem")
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
