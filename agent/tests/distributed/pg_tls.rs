//! TLS to PostgreSQL: libpq's `sslmode` meanings with rustls, against a real server with SSL on.

use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::Path;

use pgzm_tests::PgCluster;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::*;

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert.pem(), Issuer::new(params, key))
}

fn server(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "postgres");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// Installs a server certificate into the cluster (owned by the server's user, key 0600) and
/// turns SSL on with a reload.
async fn serve_tls(cluster: &PgCluster, cert: &str, key: &str) {
    let dir = cluster.dir();
    let meta = std::fs::metadata(dir).expect("cluster dir");
    for (file, pem) in [("server.crt", cert), ("server.key", key)] {
        let path = dir.join(file);
        std::fs::write(&path, pem).expect("write");
        chown(&path, Some(meta.uid()), Some(meta.gid())).expect("chown");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let c = admin(cluster).await;
    // One statement each: ALTER SYSTEM refuses to run in the implicit transaction of a batch.
    for sql in [
        format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            dir.join("server.crt").display()
        ),
        format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            dir.join("server.key").display()
        ),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        c.batch_execute(&sql).await.expect("enable ssl");
    }
}

async fn admin(cluster: &PgCluster) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

/// Whether a connection made with `url` is encrypted (or the one-line error).
async fn ssl_of(url: &str) -> Result<bool, String> {
    let target = pgzm_agent::pg::parse_config(url)?;
    let c = pgzm_agent::pg::connect(target, "pgzm-tls-test")
        .await
        .map_err(|e| pgzm_agent::pg::describe(&e))?;
    let row = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| pgzm_agent::pg::describe(&e))?;
    Ok(row.get(0))
}

fn write(dir: &Path, file: &str, pem: &str) -> String {
    let p = dir.join(file);
    std::fs::write(&p, pem).expect("write pem");
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_as_in_libpq() {
    let cluster = PgCluster::start().expect("private cluster");
    let pem_dir = tempdir();
    let (ca_pem, issuer) = ca("pgzm test server CA");
    let (other_pem, _) = ca("another CA");
    let ca = write(&pem_dir, "ca.pem", &ca_pem);
    let other = write(&pem_dir, "other.pem", &other_pem);
    // First a certificate for a name the client does not use.
    let (cert, key) = server(&["db.invalid"], &issuer);
    serve_tls(&cluster, &cert, &key).await;
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port());
    let url = |q: &str| format!("{base}?{q}");
    // The reload is asynchronous: wait until the server offers TLS.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ssl_of(&url("sslmode=require")).await != Ok(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not turn SSL on"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(ssl_of(&url("sslmode=disable")).await, Ok(false));
    assert_eq!(
        ssl_of(&base).await,
        Ok(true),
        "the default (prefer) encrypts when the server offers it"
    );
    assert_eq!(ssl_of(&url("sslmode=require")).await, Ok(true));
    assert_eq!(
        ssl_of(&url(&format!("sslmode=verify-ca&sslrootcert={ca}"))).await,
        Ok(true),
        "verify-ca ignores the name"
    );
    let err = ssl_of(&url(&format!("sslmode=verify-full&sslrootcert={ca}")))
        .await
        .expect_err("name mismatch");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = ssl_of(&url(&format!("sslmode=verify-ca&sslrootcert={other}")))
        .await
        .expect_err("unknown issuer");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(
        ssl_of(&url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"))
            .await
            .unwrap_err()
            .contains("sslrootcert")
    );

    // Now the right name: verify-full works, and a whole migration runs over verified TLS.
    let (cert, key) = server(&["127.0.0.1", "localhost"], &issuer);
    serve_tls(&cluster, &cert, &key).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ssl_of(&url(&format!("sslmode=verify-full&sslrootcert={ca}"))).await != Ok(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not load the new certificate"
        );
        tokio::task::yield_now().await;
    }
    let p = fixture_pair_on(&cluster, &cluster, "tls", "simple").await;
    let tls = format!("sslmode=verify-full&sslrootcert={ca}");
    let opts = options_for(
        &format!("{}?{tls}", p.source.url()),
        &format!("{}?{tls}", p.dest.url()),
    );
    let report = migrate::start(opts, AgentPool::in_process(2).await.expect("agent"))
        .await
        .expect("migration over TLS");
    assert_eq!(report.rows, 6);
    let src = inspect::table_checksums(&p.source.connect().await.expect("connect"))
        .await
        .expect("sums");
    let mut dst = inspect::table_checksums(&p.dest.connect().await.expect("connect"))
        .await
        .expect("sums");
    dst.retain(|t, _| !t.starts_with("backup_"));
    assert_eq!(src, dst, "the destination holds the source's rows");
    let _ = std::fs::remove_dir_all(&pem_dir);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "pgzm-pgtls-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
