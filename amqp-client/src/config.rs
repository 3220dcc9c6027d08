//! Connection settings: RabbitMQ's URI form (`amqp://` and `amqps://`) and a
//! builder for everything a URL can say and more.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;
use url::Url;

use crate::protocol::{FieldTable, FieldValue, ShortString};

/// A URL that cannot be used, naming the part that is wrong.
///
/// Parsing a [`Config`] returns it; [`Error`](crate::Error) converts from it,
/// so `?` works where connecting does.
///
/// ```
/// use amqp091::{Config, UrlError};
///
/// let error = "amqp://rabbit/%2f?heartbeat=soon".parse::<Config>().unwrap_err();
/// assert!(matches!(error, UrlError::Query { ref name, .. } if name == "heartbeat"));
///
/// let error = "http://rabbit/".parse::<Config>().unwrap_err();
/// assert_eq!(error, UrlError::Scheme("http".into()));
/// assert!(error.to_string().contains("expected `amqp` or `amqps`"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL at all.
    #[error("invalid AMQP URL: {0}")]
    Syntax(String),
    /// A scheme other than `amqp` or `amqps`.
    #[error("invalid AMQP URL scheme `{0}`: expected `amqp` or `amqps`")]
    Scheme(String),
    /// A vhost path with more than one segment.
    #[error("invalid AMQP URL vhost `{0}`: a vhost is one path segment (write `/` as `%2f`)")]
    Vhost(String),
    /// User, password or vhost is not valid percent-encoded UTF-8.
    #[error("invalid AMQP URL {part}: not valid percent-encoded UTF-8")]
    Encoding {
        /// `user`, `password` or `vhost`.
        part: &'static str,
    },
    /// A query parameter with a bad value.
    #[error("invalid AMQP URL query parameter `{name}={value}`: {reason}")]
    Query {
        /// Parameter name.
        name: String,
        /// Its value.
        value: String,
        /// Why it is wrong.
        reason: &'static str,
    },
    /// A query parameter this client does not know.
    #[error("unknown AMQP URL query parameter `{0}`")]
    UnknownQuery(String),
}

/// SASL mechanism used to authenticate.
///
/// Set in the URL (`?auth_mechanism=external`) or on the [`Config`]:
///
/// ```
/// use amqp091::{AuthMechanism, Config};
///
/// let config: Config = "amqps://rabbit/%2f?auth_mechanism=external".parse().unwrap();
/// assert_eq!(config.auth_mechanism, AuthMechanism::External);
///
/// let config = Config::default().auth_mechanism(AuthMechanism::AmqPlain);
/// assert_eq!(config.auth_mechanism.name(), "AMQPLAIN");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMechanism {
    /// User and password in clear (inside TLS where it matters).
    #[default]
    Plain,
    /// RabbitMQ's AMQPLAIN: user and password as a field table.
    AmqPlain,
    /// The identity is the TLS client certificate.
    External,
}

impl AuthMechanism {
    /// The name sent in `connection.start-ok`.
    pub fn name(self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::AmqPlain => "AMQPLAIN",
            AuthMechanism::External => "EXTERNAL",
        }
    }
}

/// TLS settings for `amqps://` (feature `tls`, on by default).
///
/// Certificates come from files, from PEM held in memory, or a ready
/// [`rustls::ClientConfig`](crate::rustls::ClientConfig) replaces them
/// all:
///
/// ```
/// use amqp091::{Config, TlsConfig};
///
/// # let ca_pem = b"-----BEGIN CERTIFICATE-----\n...";
/// let config: Config = "amqps://rabbit.example/%2f".parse().unwrap();
/// let config = config.tls(TlsConfig::default().with_ca_pem(ca_pem.to_vec()));
/// assert!(config.tls.is_some());
/// ```
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// PEM file with the CA certificates to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM text of CA certificates to trust instead of the system roots
    /// (with `ca_file`, both are trusted).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM files with a client certificate chain and its private key (for EXTERNAL).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// PEM text of a client certificate chain and of its private key, in
    /// place of `client_cert`.
    pub client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// A ready rustls configuration: used as it is, every certificate
    /// setting above (and `dangerous_accept_invalid_certs`) ignored.
    #[cfg(feature = "tls")]
    pub client_config: Option<ReadyClientConfig>,
    /// Name to verify and send as SNI; defaults to the host.
    pub server_name: Option<String>,
    /// Accept any server certificate. Dangerous: anyone on the path can read
    /// and change the traffic. For tests only.
    pub dangerous_accept_invalid_certs: bool,
}

/// A ready [`rustls::ClientConfig`](crate::rustls::ClientConfig) (see
/// [`TlsConfig::with_client_config`]). A wrapper so that [`Config`] stays
/// unwind-safe: rustls's configuration is immutable once built, but holds
/// trait objects (key log, certificate resolver) that do not say so.
///
/// Built with the [`rustls`](crate::rustls) this client re-exports, so that
/// the versions match (feature `tls`):
///
/// ```
/// use std::sync::Arc;
/// use amqp091::rustls::{self, ClientConfig, RootCertStore};
/// use amqp091::TlsConfig;
///
/// let provider = Arc::new(rustls::crypto::ring::default_provider());
/// let client_config = ClientConfig::builder_with_provider(provider)
///     .with_safe_default_protocol_versions()
///     .unwrap()
///     .with_root_certificates(RootCertStore::empty())
///     .with_no_client_auth();
/// let tls = TlsConfig::default().with_client_config(Arc::new(client_config));
/// let ready = tls.client_config.expect("set");
/// assert!(ready.0.alpn_protocols.is_empty());
/// ```
#[cfg(feature = "tls")]
#[derive(Debug, Clone)]
pub struct ReadyClientConfig(pub std::sync::Arc<tokio_rustls::rustls::ClientConfig>);

#[cfg(feature = "tls")]
impl std::panic::UnwindSafe for ReadyClientConfig {}
#[cfg(feature = "tls")]
impl std::panic::RefUnwindSafe for ReadyClientConfig {}

impl TlsConfig {
    /// Trusts the CA certificates of `pem` (PEM text) instead of the system roots.
    #[must_use]
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Trusts the CA certificates of the PEM file at `path` instead of the
    /// system roots.
    #[must_use]
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents the certificate chain and private key of `cert_pem` and
    /// `key_pem` (PEM text), for EXTERNAL authentication.
    #[must_use]
    pub fn with_client_cert_pem(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_cert_pem = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Presents the certificate chain and private key of the PEM files at
    /// `cert` and `key`.
    #[must_use]
    pub fn with_client_cert_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Uses `config` as it is (roots, client certificate, protocol versions,
    /// ALPN…), in place of the certificate settings.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn with_client_config(
        mut self,
        config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Self {
        self.client_config = Some(ReadyClientConfig(config));
        self
    }

    /// Verifies (and sends as SNI) `name` instead of the host.
    #[must_use]
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

/// Automatic recovery: when the connection is lost (socket failure, missed
/// heartbeats, a close the application did not ask for), reconnect with
/// exponential backoff and jitter, trying each address in turn, then re-open
/// channels and re-create topology and consumers.
///
/// On by default; its fields say how hard to try:
///
/// ```
/// use std::time::Duration;
/// use amqp091::{Config, RecoveryConfig};
///
/// let recovery = RecoveryConfig {
///     max_delay: Duration::from_secs(5),
///     max_attempts: Some(20),
///     retry_initial_connect: true,
///     ..RecoveryConfig::default()
/// };
/// // Attempt 3 (the fourth) waits 800 ms before jitter; none waits over 5 s.
/// assert_eq!(recovery.delay(3, 1.0), Duration::from_millis(800));
/// assert_eq!(recovery.delay(10, 1.0), Duration::from_secs(5));
/// let config = Config::default().recovery(recovery);
/// assert!(config.recovery.enabled);
///
/// let config = Config::default().recovery(RecoveryConfig::disabled());
/// assert!(!config.recovery.enabled);
/// ```
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// Whether to recover at all.
    pub enabled: bool,
    /// Wait before the first reconnect attempt.
    pub initial_delay: Duration,
    /// Longest wait between attempts (the backoff's cap).
    pub max_delay: Duration,
    /// Attempts before giving up (`None`: never give up).
    pub max_attempts: Option<u32>,
    /// Re-create recorded exchanges, queues, bindings (consumers always come back).
    pub topology: bool,
    /// How long a call made while recovering waits for it before failing.
    pub call_timeout: Duration,
    /// Retry a failed first connect the same way (off: the first failure is returned).
    pub retry_initial_connect: bool,
    /// Consecutive authentication failures (refused credentials, or a
    /// credentials provider that failed) after which recovery gives up;
    /// `None` keeps trying, for credentials that a provider or
    /// [`Connection::update_secret`](crate::Connection::update_secret) may
    /// yet fix. Each failure is reported as
    /// [`RecoveryEvent::AttemptFailed`](crate::RecoveryEvent::AttemptFailed)
    /// and to the error handlers either way.
    pub max_authentication_failures: Option<u32>,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            max_attempts: None,
            topology: true,
            call_timeout: Duration::from_secs(30),
            retry_initial_connect: false,
            max_authentication_failures: None,
        }
    }
}

impl RecoveryConfig {
    /// No recovery: a lost connection stays lost.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// The wait before attempt `attempt` (0-based): `initial_delay × 2^attempt`,
    /// capped at `max_delay`, scaled by `jitter` in [0.5, 1.0] so that many
    /// clients do not reconnect in lockstep.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self.initial_delay.saturating_mul(1u32 << attempt.min(20));
        base.min(self.max_delay).mul_f64(jitter.clamp(0.5, 1.0))
    }
}

/// Everything needed to open a connection. Its `Debug` shows every setting
/// but the password.
///
/// Parsed from RabbitMQ's URI form, then adjusted with its builder methods
/// (or built from [`Config::default`], which is `amqp://guest:guest@localhost:5672/%2f`):
///
/// ```
/// use std::time::Duration;
/// use amqp091::Config;
///
/// let config: Config = "amqps://app:s3cret@rabbit-1:5671/prod?heartbeat=30".parse()?;
/// assert_eq!((config.host.as_str(), config.port, config.vhost.as_str()), ("rabbit-1", 5671, "prod"));
/// assert_eq!(config.heartbeat, 30);
/// assert!(config.tls.is_some());
///
/// let config = config
///     .fallback_address("rabbit-2", 5671)
///     .connection_name("billing")
///     .call_timeout(Duration::from_secs(10));
/// assert_eq!(config.addresses().len(), 2);
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), amqp091::UrlError>(())
/// ```
#[derive(Clone)]
pub struct Config {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Virtual host.
    pub vhost: String,
    /// Heartbeat interval in seconds wanted by the client; 0 disables it.
    pub heartbeat: u16,
    /// Largest frame wanted by the client (0: no limit of its own).
    pub frame_max: u32,
    /// Most channels wanted by the client (0: no limit of its own).
    pub channel_max: u16,
    /// How long the TCP connect, TLS handshake and AMQP handshake may take.
    pub connection_timeout: Duration,
    /// SASL mechanism.
    pub auth_mechanism: AuthMechanism,
    /// `Some` for `amqps://`.
    pub tls: Option<TlsConfig>,
    /// Name shown in the management UI and `rabbitmqctl list_connections`.
    pub connection_name: Option<String>,
    /// Locale asked for in `connection.start-ok`.
    pub locale: String,
    /// Extra client properties, merged over the defaults.
    pub client_properties: FieldTable,
    /// Capacity of each consumer's delivery buffer; when it is full the
    /// connection stops reading the socket until the application catches up.
    pub consumer_buffer: usize,
    /// Largest message body accepted from the broker; a larger one is a
    /// connection error rather than an unbounded allocation.
    pub max_body_size: u64,
    /// More brokers (a cluster's nodes) tried in turn after `host:port`.
    pub fallback_addresses: Vec<(String, u16)>,
    /// Try the addresses (`host:port` and the fallbacks) in a random order
    /// at the first connect and at each reconnect, rather than in the order
    /// given, so that many clients configured with the same list spread
    /// over a cluster's nodes instead of all landing on the first. A
    /// reconnect still tries the node it lost last. Off by default; set
    /// with [`Config::shuffle_addresses`] or `?shuffle_addresses=true`.
    pub shuffle_addresses: bool,
    /// Automatic recovery.
    pub recovery: RecoveryConfig,
    /// How long any call that waits on the broker may wait (RPCs, opening
    /// and closing channels, `wait_for_confirms`, `update_secret`, a publish
    /// waiting out `connection.blocked`); `None` waits as long as the
    /// connection lives. On expiry the call fails with
    /// [`Error::CallTimeout`](crate::Error::CallTimeout) and, where the
    /// broker was asked something, its channel is closed: what the broker
    /// did with the request is unknown.
    pub call_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "localhost".to_owned(),
            port: 5672,
            user: "guest".to_owned(),
            password: "guest".to_owned(),
            vhost: "/".to_owned(),
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            connection_timeout: Duration::from_secs(30),
            auth_mechanism: AuthMechanism::Plain,
            tls: None,
            connection_name: None,
            locale: "en_US".to_owned(),
            client_properties: FieldTable::new(),
            consumer_buffer: 1024,
            max_body_size: 128 * 1024 * 1024,
            fallback_addresses: Vec::new(),
            shuffle_addresses: false,
            recovery: RecoveryConfig::default(),
            call_timeout: None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field, secret or not, cannot be added
        // without deciding here how it prints.
        let Config {
            host,
            port,
            user,
            password: _,
            vhost,
            heartbeat,
            frame_max,
            channel_max,
            connection_timeout,
            auth_mechanism,
            tls,
            connection_name,
            locale,
            client_properties,
            consumer_buffer,
            max_body_size,
            fallback_addresses,
            shuffle_addresses,
            recovery,
            call_timeout,
        } = self;
        f.debug_struct("Config")
            .field("host", host)
            .field("port", port)
            .field("user", user)
            .field("password", &format_args!("***"))
            .field("vhost", vhost)
            .field("heartbeat", heartbeat)
            .field("frame_max", frame_max)
            .field("channel_max", channel_max)
            .field("connection_timeout", connection_timeout)
            .field("auth_mechanism", auth_mechanism)
            .field("tls", tls)
            .field("connection_name", connection_name)
            .field("locale", locale)
            .field("client_properties", client_properties)
            .field("consumer_buffer", consumer_buffer)
            .field("max_body_size", max_body_size)
            .field("fallback_addresses", fallback_addresses)
            .field("shuffle_addresses", shuffle_addresses)
            .field("recovery", recovery)
            .field("call_timeout", call_timeout)
            .finish()
    }
}

fn decode_part(text: &str, part: &'static str) -> Result<String, UrlError> {
    // `url` leaves user, password and path percent-encoded.
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|t| t.into_owned())
        .map_err(|_| UrlError::Encoding { part })
}

/// The path of `text` as written. The URL parser removes `.` and `..`
/// segments (`%2e` included), which would make `amqp://host/%2e` name the
/// default vhost instead of `.`, and `amqp://host/a/..` a valid one.
///
/// Only called on a text the URL parser accepted with an authority, so,
/// once the characters that parser ignores are left out, it reads
/// `scheme://authority[/path][?query][#fragment]`.
fn path_as_written(text: &str) -> String {
    let text: String = text
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let after_scheme = text.split_once("://").map_or("", |(_, rest)| rest);
    let Some(start) = after_scheme.find(['/', '?', '#']) else {
        return String::new();
    };
    let rest = &after_scheme[start..];
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    rest[..end].to_owned()
}

fn query_number<T: FromStr>(name: &str, value: &str) -> Result<T, UrlError> {
    value.parse().map_err(|_| UrlError::Query {
        name: name.to_owned(),
        value: value.to_owned(),
        reason: "not a number in range",
    })
}

impl FromStr for Config {
    type Err = UrlError;

    /// Parses RabbitMQ's URI form: `amqp[s]://user:password@host:port/vhost?…`.
    fn from_str(text: &str) -> Result<Self, UrlError> {
        let url = Url::parse(text).map_err(|e| UrlError::Syntax(e.to_string()))?;
        let mut config = Config::default();
        match url.scheme() {
            "amqp" => {}
            "amqps" => {
                config.port = 5671;
                config.tls = Some(TlsConfig::default());
            }
            other => return Err(UrlError::Scheme(other.to_owned())),
        }
        // `amqp:vhost` and `amqp:/vhost` parse as URLs without an authority,
        // whose path is not the vhost segment the rest of this reads.
        if !url.has_authority() {
            return Err(UrlError::Syntax(
                "no `//` after the scheme: expected `amqp://host/vhost`".to_owned(),
            ));
        }
        if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
            config.host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
        }
        if let Some(port) = url.port() {
            config.port = port;
        }
        if !url.username().is_empty() {
            config.user = decode_part(url.username(), "user")?;
        }
        if let Some(password) = url.password() {
            config.password = decode_part(password, "password")?;
        }
        let path = path_as_written(text);
        // `amqp://host` and `amqp://host/` both mean the default vhost `/`.
        if path.len() > 1 {
            let raw = &path[1..];
            if raw.contains('/') {
                return Err(UrlError::Vhost(raw.to_owned()));
            }
            config.vhost = decode_part(raw, "vhost")?;
        }
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "heartbeat" => config.heartbeat = query_number(&name, &value)?,
                "frame_max" => config.frame_max = query_number(&name, &value)?,
                "channel_max" => config.channel_max = query_number(&name, &value)?,
                "connection_timeout" => {
                    let millis: u64 = query_number(&name, &value)?;
                    config.connection_timeout = Duration::from_millis(millis);
                }
                "call_timeout" => {
                    let millis: u64 = query_number(&name, &value)?;
                    config.call_timeout = (millis > 0).then(|| Duration::from_millis(millis));
                }
                "auth_mechanism" => {
                    config.auth_mechanism = match value.to_ascii_uppercase().as_str() {
                        "PLAIN" => AuthMechanism::Plain,
                        "AMQPLAIN" => AuthMechanism::AmqPlain,
                        "EXTERNAL" => AuthMechanism::External,
                        _ => {
                            return Err(UrlError::Query {
                                name: name.into_owned(),
                                value: value.into_owned(),
                                reason: "expected PLAIN, AMQPLAIN or EXTERNAL",
                            })
                        }
                    }
                }
                "cacertfile" => {
                    config.tls.get_or_insert_with(TlsConfig::default).ca_file =
                        Some(PathBuf::from(value.as_ref()));
                }
                "server_name_indication" => {
                    config
                        .tls
                        .get_or_insert_with(TlsConfig::default)
                        .server_name = Some(value.into_owned());
                }
                "connection_name" => config.connection_name = Some(value.into_owned()),
                "shuffle_addresses" => {
                    config.shuffle_addresses = match value.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(UrlError::Query {
                                name: name.into_owned(),
                                value: value.into_owned(),
                                reason: "expected true or false",
                            })
                        }
                    }
                }
                other => return Err(UrlError::UnknownQuery(other.to_owned())),
            }
        }
        Ok(config)
    }
}

impl Config {
    /// Parses an `amqp://` or `amqps://` URL.
    pub fn from_url(url: &str) -> Result<Self, UrlError> {
        url.parse()
    }

    /// Sets the host.
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets the port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets user and password.
    #[must_use]
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = user.into();
        self.password = password.into();
        self
    }

    /// Sets the virtual host.
    #[must_use]
    pub fn vhost(mut self, vhost: impl Into<String>) -> Self {
        self.vhost = vhost.into();
        self
    }

    /// Sets the heartbeat interval in seconds (0 disables heartbeats).
    #[must_use]
    pub fn heartbeat(mut self, seconds: u16) -> Self {
        self.heartbeat = seconds;
        self
    }

    /// Sets the largest frame the client wants.
    #[must_use]
    pub fn frame_max(mut self, frame_max: u32) -> Self {
        self.frame_max = frame_max;
        self
    }

    /// Sets the most channels the client wants.
    #[must_use]
    pub fn channel_max(mut self, channel_max: u16) -> Self {
        self.channel_max = channel_max;
        self
    }

    /// Sets the connect + handshake timeout.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Bounds every call that waits on the broker (see [`Config::call_timeout`]).
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Sets the SASL mechanism.
    #[must_use]
    pub fn auth_mechanism(mut self, mechanism: AuthMechanism) -> Self {
        self.auth_mechanism = mechanism;
        self
    }

    /// Enables TLS with these settings.
    #[must_use]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the connection name shown by the broker.
    #[must_use]
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Sets the locale.
    #[must_use]
    pub fn locale(mut self, locale: impl Into<String>) -> Self {
        self.locale = locale.into();
        self
    }

    /// Adds a client property (merged over `product`, `version`, `platform`…).
    #[must_use]
    pub fn client_property(
        mut self,
        key: impl Into<ShortString>,
        value: impl Into<FieldValue>,
    ) -> Self {
        self.client_properties.insert(key, value);
        self
    }

    /// Sets the capacity of each consumer's delivery buffer.
    #[must_use]
    pub fn consumer_buffer(mut self, deliveries: usize) -> Self {
        self.consumer_buffer = deliveries.max(1);
        self
    }

    /// Adds a broker to try after `host:port` (and the ones added before).
    #[must_use]
    pub fn fallback_address(mut self, host: impl Into<String>, port: u16) -> Self {
        self.fallback_addresses.push((host.into(), port));
        self
    }

    /// Tries the addresses in a random order at every connect (see
    /// [`Config::shuffle_addresses`](#structfield.shuffle_addresses)), so
    /// that clients sharing one address list spread over the cluster:
    ///
    /// ```
    /// use amqp091::Config;
    ///
    /// let config = Config::default()
    ///     .host("rabbit-1")
    ///     .fallback_address("rabbit-2", 5672)
    ///     .fallback_address("rabbit-3", 5672)
    ///     .shuffle_addresses(true);
    /// assert!(config.shuffle_addresses);
    ///
    /// let config: Config = "amqp://rabbit-1/%2f?shuffle_addresses=true".parse()?;
    /// assert!(config.shuffle_addresses);
    /// # Ok::<(), amqp091::UrlError>(())
    /// ```
    #[must_use]
    pub fn shuffle_addresses(mut self, shuffle: bool) -> Self {
        self.shuffle_addresses = shuffle;
        self
    }

    /// Sets automatic recovery.
    #[must_use]
    pub fn recovery(mut self, recovery: RecoveryConfig) -> Self {
        self.recovery = recovery;
        self
    }

    /// Every address to try, `host:port` first.
    pub fn addresses(&self) -> Vec<(String, u16)> {
        let mut all = vec![(self.host.clone(), self.port)];
        all.extend(self.fallback_addresses.iter().cloned());
        all
    }

    /// This config aimed at another broker.
    pub(crate) fn at(&self, (host, port): &(String, u16)) -> Config {
        let mut config = self.clone();
        config.host = host.clone();
        config.port = *port;
        config
    }

    /// `host:port`, with brackets around IPv6 addresses.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let c: Config = "amqp://user%40x:p%2Fw@rabbit.local:5673/my%2fvhost?heartbeat=5&frame_max=8192&channel_max=10&connection_timeout=1500&call_timeout=2500&auth_mechanism=amqplain"
            .parse()
            .expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("rabbit.local", 5673));
        assert_eq!((c.user.as_str(), c.password.as_str()), ("user@x", "p/w"));
        assert_eq!(c.vhost, "my/vhost");
        assert_eq!((c.heartbeat, c.frame_max, c.channel_max), (5, 8192, 10));
        assert_eq!(c.connection_timeout, Duration::from_millis(1500));
        assert_eq!(c.call_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(c.auth_mechanism, AuthMechanism::AmqPlain);
        assert!(c.tls.is_none());
        assert!(
            !c.shuffle_addresses,
            "addresses keep their order unless asked"
        );
        for (value, shuffle) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            let c: Config = format!("amqp://h/?shuffle_addresses={value}")
                .parse()
                .expect("valid");
            assert_eq!(c.shuffle_addresses, shuffle, "{value}");
        }
    }

    #[test]
    fn defaults_of_the_short_forms() {
        let c: Config = "amqp:///".parse().expect("valid");
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str(), c.vhost.as_str()),
            ("localhost", 5672, "guest", "/")
        );
        let c: Config = "amqp://h".parse().expect("valid");
        assert_eq!(c.vhost, "/");
        let c: Config = "amqp://h/%2f".parse().expect("valid");
        assert_eq!(c.vhost, "/");
        let c: Config = "amqps://h".parse().expect("valid");
        assert_eq!(c.port, 5671);
        assert!(c.tls.is_some());
        let c: Config = "amqp://[::1]:5000/v".parse().expect("valid");
        assert_eq!(
            (c.host.as_str(), c.address()),
            ("::1", "[::1]:5000".to_owned())
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_down_by_half_at_most() {
        let r = RecoveryConfig::default();
        assert_eq!(r.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(r.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(r.delay(30, 1.0), Duration::from_secs(30));
        assert_eq!(r.delay(3, 0.5), Duration::from_millis(400));
        assert_eq!(
            r.delay(3, 0.0),
            Duration::from_millis(400),
            "jitter is clamped"
        );
    }

    #[test]
    fn the_password_shows_in_neither_the_debug_of_a_config_nor_the_errors_of_its_url() {
        let password = "pw-Zq8vX3-never-printed";
        let config: Config = format!("amqp://alice:{password}@rabbit.local:5673/prod")
            .parse()
            .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains(password), "{debug}");
        assert!(debug.contains(r#"password: ***"#), "{debug}");
        for shown in [r#"host: "rabbit.local""#, "port: 5673", r#"user: "alice""#] {
            assert!(debug.contains(shown), "{shown} missing from {debug}");
        }
        let pretty = format!("{config:#?}");
        assert!(!pretty.contains(password), "{pretty}");

        // Every way a URL with a password can be refused.
        for url in [
            format!("amqp://alice:{password}@rabbit.local:99999/"),
            format!("http://alice:{password}@rabbit.local/"),
            format!("amqp://alice:{password}@rabbit.local/a/b"),
            format!("amqp://alice:{password}%FF@rabbit.local/"),
            format!("amqp://alice:{password}@rabbit.local/?heartbeat=x"),
            format!("amqp://alice:{password}@rabbit.local/?bogus=1"),
            format!("amqp://alice:{password}@[::1/"),
        ] {
            let error = url.parse::<Config>().expect_err(&url);
            let (display, debug) = (error.to_string(), format!("{error:?}"));
            assert!(!display.contains(password), "{display}");
            assert!(!debug.contains(password), "{debug}");
        }
    }

    #[test]
    fn dot_segments_are_vhost_names_not_path_steps() {
        for (url, vhost) in [
            ("amqp://h/.", "."),
            ("amqp://h/%2e", "."),
            ("amqp://h/%2E%2e", ".."),
            ("amqp://h/..", ".."),
            ("amqp://h/.hidden", ".hidden"),
            (" amqp://h/%2f\t", "/"),
        ] {
            let config: Config = url.parse().expect(url);
            assert_eq!(config.vhost, vhost, "{url}");
        }
        for url in ["amqp://h/a/..", "amqp://h/./x", "amqp://h/../"] {
            let error = url.parse::<Config>().expect_err(url);
            assert!(matches!(error, UrlError::Vhost(_)), "{url}: {error}");
        }
    }

    #[test]
    fn a_url_without_an_authority_is_refused() {
        for url in ["amqp:myvhost", "amqp:/myvhost", "amqp:.%2E", "amqps:h"] {
            let error = url.parse::<Config>().expect_err(url);
            assert!(matches!(error, UrlError::Syntax(_)), "{url}: {error}");
        }
        assert!(matches!(
            "http:h".parse::<Config>(),
            Err(UrlError::Scheme(scheme)) if scheme == "http"
        ));
    }

    #[test]
    fn bad_urls_name_the_part() {
        let err = |u: &str| u.parse::<Config>().expect_err(u).to_string();
        assert!(err("http://h").contains("scheme `http`"));
        assert!(err("amqp://h/a/b").contains("vhost"));
        assert!(err("amqp://h?heartbeat=x").contains("heartbeat=x"));
        assert!(err("amqp://h?heartbeat=70000").contains("heartbeat"));
        assert!(err("amqp://h?auth_mechanism=KERBEROS").contains("auth_mechanism"));
        assert!(err("amqp://h?bogus=1").contains("bogus"));
        assert!(err("amqp://h?shuffle_addresses=yes").contains("shuffle_addresses=yes"));
        assert!(err("not a url").contains("invalid AMQP URL"));
        assert!(err("amqp://h:99999").contains("invalid AMQP URL"));
    }
}
