//! TLS to PostgreSQL: libpq's `sslmode` meanings with rustls, against a real server with SSL on.

use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::time::Duration;

use pgzm_tests::PgCluster;
use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair};

use super::*;
use crate::support::pki;

/// A server certificate for `names` signed by `issuer`: certificate and key (PEM).
fn server(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    pki::leaf(
        "postgres",
        names,
        &[ExtendedKeyUsagePurpose::ServerAuth],
        issuer,
    )
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
    let c = connect(&cluster.url("postgres")).await;
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

/// Waits (up to 10 s) until a connection made with `url` is encrypted.
async fn encrypted_soon(what: &str, url: String) {
    poll(what, Duration::from_secs(10), || {
        let url = url.clone();
        async move { (ssl_of(&url).await == Ok(true)).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_behave_as_in_libpq() {
    let cluster = PgCluster::start().expect("private cluster");
    let pems = Pki::empty("pgzm-pgtls");
    let (ca_pem, issuer) = pki::ca("pgzm test server CA");
    let (other_pem, _) = pki::ca("another CA");
    let ca = pems.write("ca.pem", &ca_pem).display().to_string();
    let other = pems.write("other.pem", &other_pem).display().to_string();
    // First a certificate for a name the client does not use.
    let (cert, key) = server(&["db.invalid"], &issuer);
    serve_tls(&cluster, &cert, &key).await;
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port());
    let url = |q: &str| format!("{base}?{q}");
    // The reload is asynchronous: wait until the server offers TLS.
    encrypted_soon("the server to turn SSL on", url("sslmode=require")).await;
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
    let tls = format!("sslmode=verify-full&sslrootcert={ca}");
    encrypted_soon("the server to load the new certificate", url(&tls)).await;
    let p = fixture_pair_on(&cluster, &cluster, "tls", "simple").await;
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

    // Client certificate authentication (sslcert/sslkey), and libpq's variables: PGSSLMODE is
    // obeyed, PGSSLCERT/PGSSLKEY/PGSSLROOTCERT are read.
    let c = connect(&cluster.url("postgres")).await;
    c.batch_execute("CREATE ROLE certuser LOGIN")
        .await
        .expect("create certuser");
    let (client_cert, client_key) = pki::leaf(
        "certuser",
        &["certuser"],
        &[ExtendedKeyUsagePurpose::ClientAuth],
        &issuer,
    );
    let cert_file = pems.write("client.pem", &client_cert).display().to_string();
    let key_file = pems.write("client.key", &client_key);
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let key_file = key_file.display().to_string();
    let data = cluster.dir().join("data");
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all certuser 127.0.0.1/32 cert\nhost all all 127.0.0.1/32 trust\n",
    )
    .expect("write pg_hba.conf");
    for sql in [
        format!("ALTER SYSTEM SET ssl_ca_file = '{ca}'"),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        c.batch_execute(&sql)
            .await
            .expect("trust client certificates");
    }
    let as_certuser = format!(
        "postgres://certuser@127.0.0.1:{}/postgres?{tls}",
        cluster.port()
    );
    let with_cert = format!("{as_certuser}&sslcert={cert_file}&sslkey={key_file}");
    poll(
        "the server to accept client certificates",
        Duration::from_secs(10),
        || {
            let url = with_cert.clone();
            async move { (ssl_of(&url).await == Ok(true)).then_some(()) }
        },
    )
    .await;
    let err = ssl_of(&as_certuser)
        .await
        .expect_err("no client certificate");
    assert!(err.contains("client certificate"), "{err}");
    // The same through the environment.
    let env = pgzm_agent::libpq::Environment::from_pairs([
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", ca.as_str()),
        ("PGSSLCERT", cert_file.as_str()),
        ("PGSSLKEY", key_file.as_str()),
    ]);
    let bare = format!("postgres://certuser@127.0.0.1:{}/postgres", cluster.port());
    let target = pgzm_agent::pg::parse_config_in(&bare, &env).expect("parse");
    let client = pgzm_agent::pg::connect(target, "pgzm-tls-test")
        .await
        .expect("certificate authentication from the environment");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(user, "certuser");
    // A key others may read is refused, as libpq does.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = pgzm_agent::pg::parse_config(&with_cert).expect_err("a readable key");
    assert!(err.contains("group or world access"), "{err}");
}

/// `PGSSLMODE=require` against a server without TLS fails: never a silent plaintext fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgsslmode_require_is_obeyed() {
    let cluster = pgzm_tests::PgCluster::shared();
    let url = cluster.url("postgres");
    let plain = pgzm_agent::pg::parse_config_in(&url, &pgzm_agent::libpq::Environment::default())
        .expect("parse");
    assert!(pgzm_agent::pg::connect(plain, "t").await.is_ok());
    let env = pgzm_agent::libpq::Environment::from_pairs([("PGSSLMODE", "require")]);
    let target = pgzm_agent::pg::parse_config_in(&url, &env).expect("parse");
    let err = pgzm_agent::pg::connect(target, "t")
        .await
        .expect_err("a server without TLS");
    let text = pgzm_agent::pg::describe(&err);
    assert!(
        text.to_lowercase().contains("tls") || text.contains("SSL"),
        "{text}"
    );
}
