//! TLS against a private RabbitMQ node with certificates made at test time,
//! and the private node support itself (start, stop_app/start_app, stop).
//!
//! The TLS tests share one node (see [`tls_fixture`]): it has a TLS listener
//! with a server certificate for `localhost` and `127.0.0.1` signed by a test
//! CA. A second, unrelated CA is there for the negative tests.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use amqp091::prelude::*;
use amqp091::{
    BasicProperties, Config, Connection, Error, RecoveryConfig, RecoveryEvent, ReplyCode, TlsConfig,
};
use amqp_client_tests::node::{NodeOptions, PrivateNode};
use amqp_client_tests::unique;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A self-signed CA.
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its
    /// key, both PEM.
    fn server_cert(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server certificate names");
        params
            .distinguished_name
            .push(DnType::CommonName, "amqp-client test server");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose common name is `name`, and its key, PEM.
    fn client_cert(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// A certificate with `params` and a new key, signed by this CA; both PEM.
    fn sign(&self, params: CertificateParams) -> (String, String) {
        let key = KeyPair::generate().expect("certificate key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

/// The node with a TLS listener, and the CA files a client can trust.
struct TlsFixture {
    node: PrivateNode,
    /// The CA that signed the node's certificate.
    ca_file: PathBuf,
    /// A CA that has nothing to do with the node.
    other_ca_file: PathBuf,
}

impl TlsFixture {
    fn start() -> TlsFixture {
        let ca = Ca::new("amqp-client test CA");
        let other_ca = Ca::new("amqp-client unrelated CA");
        let (cert_pem, key_pem) = ca.server_cert(&["localhost", "127.0.0.1"]);
        let options = NodeOptions::default()
            .tls_listener(ca.cert.pem(), cert_pem, key_pem)
            .file("other-ca.pem", other_ca.cert.pem());
        let node = PrivateNode::start(options);
        eprintln!(
            "TLS node {} up in {:?}: AMQP port {}, TLS port {:?}",
            node.node_name(),
            node.startup_time(),
            node.port(),
            node.tls_port()
        );
        TlsFixture {
            ca_file: node.dir().join("tls-ca.pem"),
            other_ca_file: node.dir().join("other-ca.pem"),
            node,
        }
    }

    fn tls_port(&self) -> u16 {
        self.node.tls_port().expect("the node has a TLS port")
    }

    /// `amqps://guest:guest@<host>:<tls port>/%2f` with `tls` settings.
    fn config(&self, host: &str, tls: TlsConfig) -> Config {
        let mut config: Config = format!("amqps://guest:guest@{host}:{}/%2f", self.tls_port())
            .parse()
            .expect("valid amqps URL");
        assert!(config.tls.is_some(), "amqps:// turns TLS on");
        config.tls = Some(tls);
        config.connection_timeout = Duration::from_secs(20);
        config
    }
}

/// The TLS node, shared by the tests running at the same time; the last one
/// to finish drops it, which stops the node and deletes its files.
fn tls_fixture() -> Arc<TlsFixture> {
    static SHARED: Mutex<Weak<TlsFixture>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(fixture) = shared.upgrade() {
        return fixture;
    }
    let fixture = Arc::new(TlsFixture::start());
    *shared = Arc::downgrade(&fixture);
    fixture
}

/// Declares a queue, publishes to it and gets the message back.
async fn round_trip(connection: &Connection) {
    let channel = connection.open_channel().await.expect("channel.open");
    let queue = unique("tls");
    let declared = channel
        .queue_declare(queue::Declare {
            queue: queue.as_str().into(),
            auto_delete: true,
            ..Default::default()
        })
        .await
        .expect("queue.declare");
    assert_eq!(declared.queue, queue.as_str());
    channel
        .basic_publish("", &queue, false, &BasicProperties::default(), "over TLS")
        .await
        .expect("basic.publish");
    // The publish and the get go out in order on one channel, so the message
    // is there by the time the broker handles the get.
    let message = channel
        .basic_get(&queue, true)
        .await
        .expect("basic.get")
        .expect("the published message");
    assert_eq!(&message.delivery.body[..], b"over TLS");
    assert_eq!(message.message_count, 0);
    channel.close().await.expect("channel.close");
}

#[tokio::test]
async fn tls_with_the_right_ca_connects() {
    let fixture = tls_fixture();
    let config = fixture.config(
        "localhost",
        TlsConfig {
            ca_file: Some(fixture.ca_file.clone()),
            ..Default::default()
        },
    );
    let connection = Connection::connect(config)
        .await
        .unwrap_or_else(|e| panic!("TLS connect failed: {e}\n{}", fixture.node.log_tail(30)));
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");
}

#[tokio::test]
async fn tls_with_the_ca_as_in_memory_pem_or_a_ready_rustls_config_connects() {
    let fixture = tls_fixture();
    let ca_pem = std::fs::read(&fixture.ca_file).expect("the CA's PEM");
    let config = fixture.config(
        "localhost",
        TlsConfig::default().with_ca_pem(ca_pem.clone()),
    );
    let connection = Connection::connect(config)
        .await
        .unwrap_or_else(|e| panic!("TLS connect with a PEM CA failed: {e}"));
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");

    use amqp091::rustls;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.expect("a certificate")).expect("a CA");
    }
    let ready = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let config = fixture.config(
        "localhost",
        TlsConfig::default().with_client_config(Arc::new(ready)),
    );
    let connection = Connection::connect(config)
        .await
        .unwrap_or_else(|e| panic!("TLS connect with a ready ClientConfig failed: {e}"));
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");
}

#[tokio::test]
async fn tls_to_an_ip_address_checks_the_ip_san() {
    let fixture = tls_fixture();
    let config = fixture.config(
        "127.0.0.1",
        TlsConfig {
            ca_file: Some(fixture.ca_file.clone()),
            ..Default::default()
        },
    );
    let connection = Connection::connect(config)
        .await
        .unwrap_or_else(|e| panic!("TLS connect to 127.0.0.1 failed: {e}"));
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");
}

#[tokio::test]
async fn tls_with_the_ca_in_the_url_connects() {
    let fixture = tls_fixture();
    let url = format!(
        "amqps://guest:guest@localhost:{}/%2f?cacertfile={}",
        fixture.tls_port(),
        fixture.ca_file.display()
    );
    let connection = Connection::open(&url)
        .await
        .unwrap_or_else(|e| panic!("TLS connect to {url} failed: {e}"));
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");
}

#[tokio::test]
async fn tls_with_an_unrelated_ca_fails_clearly() {
    let fixture = tls_fixture();
    let config = fixture.config(
        "localhost",
        TlsConfig {
            ca_file: Some(fixture.other_ca_file.clone()),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let error = Connection::connect(config)
        .await
        .expect_err("a certificate from an unknown CA must be refused");
    eprintln!("unrelated CA: {error}");
    match &error {
        Error::Tls { address, reason } => {
            assert_eq!(address, &format!("localhost:{}", fixture.tls_port()));
            let reason = reason.to_lowercase();
            assert!(reason.contains("certificate"), "reason: {reason}");
            assert!(reason.contains("unknownissuer"), "reason: {reason}");
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
    assert!(error.to_string().contains("TLS"), "{error}");
    // Refused in the handshake, not by running into the timeout.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn tls_with_the_wrong_server_name_fails_clearly() {
    let fixture = tls_fixture();
    let config = fixture.config(
        "localhost",
        TlsConfig {
            ca_file: Some(fixture.ca_file.clone()),
            server_name: Some("broker.example.com".to_owned()),
            ..Default::default()
        },
    );
    let error = Connection::connect(config)
        .await
        .expect_err("a certificate for other names must be refused");
    eprintln!("wrong server name: {error}");
    match &error {
        Error::Tls { reason, .. } => {
            let reason = reason.to_lowercase();
            assert!(reason.contains("certificate"), "reason: {reason}");
            assert!(reason.contains("not valid for name"), "reason: {reason}");
            assert!(reason.contains("broker.example.com"), "reason: {reason}");
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_with_a_missing_ca_file_fails_clearly() {
    let fixture = tls_fixture();
    let missing = fixture.node.dir().join("no-such-ca.pem");
    let config = fixture.config(
        "localhost",
        TlsConfig {
            ca_file: Some(missing.clone()),
            ..Default::default()
        },
    );
    let error = Connection::connect(config)
        .await
        .expect_err("a missing CA file is an error");
    eprintln!("missing CA file: {error}");
    match &error {
        Error::Tls { reason, .. } => {
            assert!(
                reason.contains(&missing.display().to_string()),
                "reason: {reason}"
            );
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_with_a_ca_file_without_certificates_fails() {
    let fixture = tls_fixture();
    // A PEM file, but with a key in it rather than certificates.
    let config = fixture.config(
        "localhost",
        TlsConfig {
            ca_file: Some(fixture.node.dir().join("tls-key.pem")),
            ..Default::default()
        },
    );
    let error = Connection::connect(config)
        .await
        .expect_err("no trusted CA: nothing can be verified");
    eprintln!("CA file without certificates: {error}");
    match &error {
        Error::Tls { reason, .. } => {
            assert!(reason.contains("holds no PEM certificate"), "{reason}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_accepting_invalid_certs_connects_without_a_ca() {
    let fixture = tls_fixture();
    // Also with a name the certificate is not for: nothing is checked.
    for host in ["localhost", "127.0.0.1"] {
        let config = fixture.config(
            host,
            TlsConfig {
                dangerous_accept_invalid_certs: true,
                server_name: (host == "127.0.0.1").then(|| "broker.example.com".to_owned()),
                ..Default::default()
            },
        );
        let connection = Connection::connect(config).await.unwrap_or_else(|e| {
            panic!("TLS connect to {host} accepting any certificate failed: {e}")
        });
        round_trip(&connection).await;
        connection.close().await.expect("connection.close");
    }
}

#[tokio::test]
async fn plain_amqp_to_the_tls_port_does_not_hang() {
    // A TLS listener answers garbage to an AMQP header; the client must fail
    // within the connection timeout rather than wait forever.
    let fixture = tls_fixture();
    let mut config: Config = format!("amqp://guest:guest@127.0.0.1:{}/%2f", fixture.tls_port())
        .parse()
        .expect("valid URL");
    config.connection_timeout = Duration::from_secs(10);
    let started = Instant::now();
    let error = Connection::connect(config)
        .await
        .expect_err("plain AMQP to a TLS port cannot work");
    eprintln!("plain AMQP to the TLS port: {error:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    match &error {
        Error::Tls { reason, .. } => assert!(reason.contains("use amqps://"), "{reason}"),
        other => panic!("expected a clear TLS hint, got {other:?}"),
    }
}

#[tokio::test]
async fn private_node_lifecycle() {
    let node = PrivateNode::start_async(NodeOptions::default()).await;
    eprintln!(
        "node {} up in {:?} on port {} (distribution port {}) in {}",
        node.node_name(),
        node.startup_time(),
        node.port(),
        node.dist_port(),
        node.dir().display()
    );
    assert!(node.node_name().starts_with("amqptest-"));
    assert!(node.node_name().ends_with("@localhost"));
    assert_ne!(node.port(), 5672);
    assert_eq!(node.tls_port(), None);
    assert_eq!(
        node.amqp_url(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.port())
    );
    assert!(node.log_file().exists(), "{}", node.log_file().display());
    // Its own node, not the shared one, and without plugins.
    let name = node.rabbitmqctl(&["eval", "node()."]);
    assert_eq!(name.trim(), format!("'{}'", node.node_name()));
    let plugins = node.rabbitmqctl(&["eval", "rabbit_plugins:active()."]);
    assert_eq!(plugins.trim(), "[]");

    // One connection that stays lost, one that recovers.
    let plain = Connection::connect(node.config().recovery(RecoveryConfig::disabled()))
        .await
        .expect("connect to the private node");
    round_trip(&plain).await;
    let recovery = RecoveryConfig {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        ..RecoveryConfig::default()
    };
    let recovering = Connection::connect(node.config().recovery(recovery))
        .await
        .expect("connect to the private node");
    let mut events = recovering.recovery_events();
    round_trip(&recovering).await;

    node.stop_app_async().await;
    // The broker closed the connections when its application stopped.
    let error = tokio::time::timeout(Duration::from_secs(10), plain.closed())
        .await
        .expect("the connection ends when the app stops")
        .expect_err("a close by the broker is an error");
    eprintln!("after stop_app: {error}");
    assert_eq!(
        error.reply_code(),
        Some(ReplyCode::CONNECTION_FORCED),
        "{error:?}"
    );
    assert!(plain.is_closed());
    // Later calls fail at once with the same reason.
    let again = tokio::time::timeout(Duration::from_secs(5), plain.open_channel())
        .await
        .expect("open_channel on a closed connection returns at once")
        .expect_err("the connection is closed");
    assert_eq!(
        again.reply_code(),
        Some(ReplyCode::CONNECTION_FORCED),
        "{again:?}"
    );
    let refused = Connection::connect(node.config().recovery(RecoveryConfig::disabled())).await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");

    node.start_app_async().await;
    let connection = Connection::open(&node.amqp_url())
        .await
        .expect("connect after start_app");
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");

    // The recovering connection comes back by itself.
    let recovered = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(RecoveryEvent::Recovered) => return Ok(()),
                Ok(RecoveryEvent::Failed { error }) => return Err(error),
                Ok(event) => eprintln!("recovery: {event:?}"),
                Err(e) => panic!("recovery events: {e}"),
            }
        }
    })
    .await
    .expect("recovered within 30 s after start_app");
    recovered.expect("recovery succeeds");
    round_trip(&recovering).await;
    recovering.close().await.expect("connection.close");

    let dir = node.dir().to_owned();
    let port = node.port();
    node.stop();
    assert!(node.is_stopped());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let ping = std::process::Command::new("rabbitmqctl")
        .args(["-n", node.node_name(), "ping"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        !ping.status.success(),
        "the stopped node still answers ping"
    );
    drop(node);
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[tokio::test]
async fn tls_connection_recovers_after_the_broker_restarts() {
    // A node of its own: restarting the shared TLS node would disturb the
    // other tests.
    let ca = Ca::new("amqp-client recovery test CA");
    let (cert_pem, key_pem) = ca.server_cert(&["localhost"]);
    let node = PrivateNode::start_async(NodeOptions::default().tls_listener(
        ca.cert.pem(),
        cert_pem,
        key_pem,
    ))
    .await;
    let tls_port = node.tls_port().expect("a TLS port");
    let mut config: Config = format!("amqps://guest:guest@localhost:{tls_port}/%2f")
        .parse()
        .expect("valid amqps URL");
    config.tls = Some(TlsConfig {
        ca_file: Some(node.dir().join("tls-ca.pem")),
        ..Default::default()
    });
    config.recovery = RecoveryConfig {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        ..RecoveryConfig::default()
    };
    let connection = Connection::connect(config).await.expect("TLS connect");
    let mut events = connection.recovery_events();
    round_trip(&connection).await;

    node.stop_app_async().await;
    node.start_app_async().await;
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await {
                Ok(RecoveryEvent::Recovered) => return Ok(()),
                Ok(RecoveryEvent::Failed { error }) => return Err(error),
                Ok(event) => eprintln!("TLS recovery: {event:?}"),
                Err(e) => panic!("recovery events: {e}"),
            }
        }
    })
    .await
    .expect("recovered within 30 s after start_app");
    outcome.expect("recovery over TLS succeeds");
    round_trip(&connection).await;
    connection.close().await.expect("connection.close");
}

#[tokio::test]
async fn private_nodes_start_in_parallel() {
    let nodes: Vec<PrivateNode> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| PrivateNode::start(NodeOptions::default())))
            .collect();
        starting
            .into_iter()
            .map(|t| t.join().expect("node started"))
            .collect()
    });
    let (a, b) = (&nodes[0], &nodes[1]);
    eprintln!(
        "parallel nodes up in {:?} and {:?}",
        a.startup_time(),
        b.startup_time()
    );
    assert_ne!(a.node_name(), b.node_name());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dist_port(), b.dist_port());
    assert_ne!(a.dir(), b.dir());
    for node in &nodes {
        let connection = Connection::open(&node.amqp_url())
            .await
            .expect("connect to a private node");
        round_trip(&connection).await;
        connection.close().await.expect("connection.close");
    }
}

#[tokio::test]
#[should_panic(expected = "Conf file attempted to set unknown variable: no_such.setting")]
async fn private_node_with_a_bad_config_panics_with_its_log() {
    let _node =
        PrivateNode::start_async(NodeOptions::default().config_line("no_such.setting = 1")).await;
}

#[tokio::test]
async fn sasl_external_logs_in_as_the_client_certificate_and_refuses_without_one() {
    // A node of its own: it asks every TLS client for a certificate.
    let ca = Ca::new("amqp-client EXTERNAL test CA");
    let (cert_pem, key_pem) = ca.server_cert(&["localhost", "127.0.0.1"]);
    let options = NodeOptions::default()
        .plugin("rabbitmq_auth_mechanism_ssl")
        .tls_listener_verifying_clients(ca.cert.pem(), cert_pem, key_pem)
        .config_line("auth_mechanisms.1 = EXTERNAL")
        .config_line("auth_mechanisms.2 = PLAIN")
        .config_line("ssl_cert_login_from = common_name");
    let node = PrivateNode::start_async(options).await;
    let tls_port = node.tls_port().expect("the node has a TLS port");
    let client_files = |name: &str| {
        let (cert, key) = ca.client_cert(name);
        let cert_file = node.dir().join(format!("client-{name}.pem"));
        let key_file = node.dir().join(format!("client-{name}-key.pem"));
        std::fs::write(&cert_file, cert).expect("write client certificate");
        std::fs::write(&key_file, key).expect("write client key");
        (cert_file, key_file)
    };
    let config = |client_cert: Option<(PathBuf, PathBuf)>| {
        // No user or password: the broker takes the name from the certificate.
        let mut config: Config =
            format!("amqps://localhost:{tls_port}/%2f?auth_mechanism=external")
                .parse()
                .expect("valid amqps URL");
        config.tls = Some(TlsConfig {
            ca_file: Some(node.dir().join("tls-ca.pem")),
            client_cert,
            ..Default::default()
        });
        config.connection_timeout = Duration::from_secs(20);
        config
    };

    // "guest" exists on a fresh node (and may log in from localhost).
    let connection = Connection::connect(config(Some(client_files("guest"))))
        .await
        .unwrap_or_else(|e| panic!("EXTERNAL login failed: {e}\n{}", node.log_tail(30)));
    round_trip(&connection).await;
    let listed = node.rabbitmqctl(&["list_connections", "user", "auth_mechanism", "ssl"]);
    assert!(
        listed
            .lines()
            .any(|line| line.split_whitespace().eq(["guest", "EXTERNAL", "true"])),
        "the broker sees guest logged in by EXTERNAL over TLS:\n{listed}"
    );
    connection.close().await.expect("connection.close");

    // A valid certificate for a user the broker does not know.
    let refused = Connection::connect(config(Some(client_files("nobody"))))
        .await
        .expect_err("no such user");
    assert!(
        matches!(refused, Error::AuthenticationFailed { .. }),
        "unknown user: {refused:?}"
    );

    // No certificate at all: the TLS handshake is refused, quickly and clearly.
    let started = Instant::now();
    let refused = Connection::connect(config(None))
        .await
        .expect_err("a certificate is required");
    assert!(
        !matches!(refused, Error::Timeout { .. }) && started.elapsed() < Duration::from_secs(15),
        "no certificate: {refused:?} after {:?}",
        started.elapsed()
    );
}
