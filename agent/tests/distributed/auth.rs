//! Who may use an agent: mTLS with a client CA, the shared token, and the refusal to listen
//! in plaintext beyond loopback.

use pgzm_coordinator::migrate;

use super::tls_settings;
use crate::support::pki::Pki;
use crate::support::*;

/// Starts an agent serving the PKI's agent certificate and requiring client certificates from
/// its CA, with more `args` and `env`.
async fn tls_agent(pki: &Pki, args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
    let path = |file: &str| pki.path(file).to_str().expect("path").to_string();
    let (cert, key, ca) = (path("agent.pem"), path("agent.key"), path("ca.pem"));
    let mut all = vec![
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    all.extend_from_slice(args);
    AgentProcess::start_with_env(&all, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_client_ca_requires_a_certificate_from_it() {
    let pki = Pki::generate();
    let agent = tls_agent(&pki, &[], &[]).await;
    let url = agent.https_url();
    let p = fixture_pair("mtls", "simple").await;
    let dst = p.dest.connect().await.expect("connect dest");
    let before = public_objects(&dst).await;

    // No client certificate.
    let err = pool_error(&tls_settings(&url, &pki, "ca.pem", None)).await;
    eprintln!("without a client certificate: {err}");
    assert!(err.contains(&url), "{err}");
    assert!(
        err.to_lowercase().contains("client certificate"),
        "no clear reason: {err}"
    );
    // A certificate from another CA.
    let err = pool_error(&tls_settings(&url, &pki, "ca.pem", Some("rogue"))).await;
    eprintln!("with a certificate from another CA: {err}");
    assert!(err.contains(&url), "{err}");
    assert!(
        err.to_lowercase().contains("certificate"),
        "no clear reason: {err}"
    );
    // Plaintext to a TLS agent.
    let err = pool_error(&settings(&[agent.http_url()])).await;
    eprintln!("plaintext to a TLS agent: {err}");
    assert!(err.contains(&agent.http_url()), "{err}");
    // An agent certificate we do not trust.
    let err = pool_error(&tls_settings(
        &url,
        &pki,
        "other-ca.pem",
        Some("coordinator"),
    ))
    .await;
    eprintln!("untrusted agent certificate: {err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    assert!(
        !has_pgzm_schema(&dst).await,
        "a refused run changed the destination"
    );
    assert_eq!(public_objects(&dst).await, before);

    // With the right certificate, over https.
    let settings = tls_settings(&url, &pki, "ca.pem", Some("coordinator"));
    let pool = pool(&settings).await;
    migrate::start(options(&p), pool)
        .await
        .unwrap_or_else(|e| panic!("migration over mTLS: {e}"));
    let src = p.source.connect().await.expect("connect source");
    assert_migrated(&src, &dst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_beyond_loopback_is_refused_at_startup() {
    let (code, stderr) = run_agent_to_exit(&["--listen", "0.0.0.0:0"]).await;
    assert_ne!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not a one-line error: {stderr}");
    assert!(
        lines[0].contains("refusing to listen without TLS"),
        "{stderr}"
    );
    assert!(lines[0].contains("--allow-insecure-listen"), "{stderr}");

    // Explicitly allowed, it starts.
    let agent =
        AgentProcess::spawn(&["--listen", "0.0.0.0:0", "--allow-insecure-listen"], &[]).await;
    assert!(agent.addr.ip().is_unspecified(), "{}", agent.addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_token_refuses_coordinators_without_it() {
    const TOKEN: &str = "t0ken-a1b2c3d4e5";
    let agent = AgentProcess::start_with_env(&["-v"], &[("PGZM_AGENT_TOKEN", TOKEN)]).await;
    let url = agent.http_url();
    let p = fixture_pair("token", "simple").await;
    let dst = p.dest.connect().await.expect("connect dest");
    let before = public_objects(&dst).await;

    for token in [None, Some("wrong-token")] {
        let mut s = settings(&[url.as_str()]);
        s.connector.token = token.map(str::to_string);
        let err = pool_error(&s).await;
        assert!(err.contains(&url), "{err}");
        assert!(
            err.contains("requires the shared token"),
            "no clear reason: {err}"
        );
    }
    assert!(!has_pgzm_schema(&dst).await);
    assert_eq!(public_objects(&dst).await, before);

    let mut s = settings(&[url.as_str()]);
    s.connector.token = Some(TOKEN.to_string());
    let pool = pool(&s).await;
    migrate::start(options(&p), pool)
        .await
        .unwrap_or_else(|e| panic!("migration with the token: {e}"));
    let src = p.source.connect().await.expect("connect source");
    assert_migrated(&src, &dst).await;
    assert!(!agent.finished_tasks().is_empty());
    assert!(!agent.log().contains(TOKEN), "the agent logged its token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_call_each_other_over_mtls_with_the_token() {
    const TOKEN: &str = "peer-t0ken-99";
    let pki = Pki::generate();
    let env = [("PGZM_AGENT_TOKEN", TOKEN)];
    let source_agent = tls_agent(&pki, &["--side", "source", "-v"], &env).await;
    let dest_agent = tls_agent(&pki, &["--side", "destination", "--compress", "-v"], &env).await;
    let p = fixture_pair("peer_mtls", "simple").await;
    let mut s = tls_settings(
        &source_agent.https_url(),
        &pki,
        "ca.pem",
        Some("coordinator"),
    );
    s.urls.push(dest_agent.https_url());
    s.connector.token = Some(TOKEN.into());
    let pool = pool(&s).await;
    migrate::start(options(&p), pool)
        .await
        .unwrap_or_else(|e| panic!("migration through two mTLS agents: {e}"));
    let src = p.source.connect().await.expect("connect source");
    let dst = p.dest.connect().await.expect("connect dest");
    assert_migrated(&src, &dst).await;
    assert_eq!(dest_agent.finished_tasks().len(), 3);
    assert_eq!(source_agent.log().matches("export done").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_agent_that_a_coordinator_is_connected_to() {
    let mut agent = AgentProcess::start(&[]).await;
    let pool = pool(&settings(&[agent.http_url()])).await;
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), agent.wait())
        .await
        .expect("the agent exits within 10 s of SIGTERM");
    assert!(status.success(), "{status}: {}", agent.log());
    assert!(agent.log().contains("shutting down"), "{}", agent.log());
    drop(pool);
}

/// A malformed `--database NAME=URL` is refused in one line that never shows the password
/// (issue 12, item 4), in text and in JSON logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_database_urls_never_print_the_password() {
    for url in [
        "postgress://app:TopSecret9@127.0.0.1:5432/db",
        "postgres://app:Top@Secret9@127.0.0.1:5432/db",
        "postgres://app:TopSecret9@127.0.0.1:99999/db",
        "host=127.0.0.1 password=TopSecret9 dbname",
    ] {
        for format in ["text", "json"] {
            let database = format!("src={url}");
            let (code, stderr) = run_agent_to_exit(&[
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                format,
                "--database",
                &database,
            ])
            .await;
            assert_ne!(code, Some(0), "{url}: {stderr}");
            assert!(
                !stderr.contains("TopSecret9") && !stderr.contains("Secret9"),
                "{url} ({format}): the password was printed: {stderr}"
            );
        }
    }
}
