//! Connecting: each address in turn, TCP (and TLS) and the handshake within
//! the connection timeout, the credentials of each attempt, and backoff
//! jitter. Used by the first connect and by every reconnect.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::config::Config;
use crate::error::Error;
use crate::handshake;
use crate::transport::{self, Stream};

/// What the on-connect hook is told about the connect it runs after.
///
/// ```no_run
/// use amqp091::{Config, Connection, ConnectInfo};
///
/// # async fn example() -> Result<(), amqp091::Error> {
/// let connection = Connection::builder(Config::default())
///     .on_connect(|_connection, info: ConnectInfo| async move {
///         if info.is_reconnect() {
///             eprintln!("reconnect {} to {}, at attempt {}", info.reconnects, info.address, info.attempt);
///         }
///         Ok(())
///     })
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectInfo {
    /// 0 after the first connect, `n` after the `n`-th reconnect.
    pub reconnects: u64,
    /// Which attempt of this connect succeeded (1: the first try).
    pub attempt: u32,
    /// `host:port` of the broker connected to.
    pub address: String,
}

impl ConnectInfo {
    /// Whether the hook runs after a reconnect (not the first connect).
    pub fn is_reconnect(&self) -> bool {
        self.reconnects > 0
    }
}

/// A user and secret for one connect attempt, from a
/// [credentials provider](crate::ConnectionBuilder::credentials_provider).
/// Its `Debug` hides the secret.
///
/// ```
/// use amqp091::Credentials;
///
/// let credentials = Credentials::new("app", "eyJhbGciOi...");
/// assert_eq!(credentials.user, "app");
/// assert!(!format!("{credentials:?}").contains("eyJ"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password or token.
    pub secret: String,
}

impl Credentials {
    /// Credentials of `user` with `secret`.
    pub fn new(user: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            secret: secret.into(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The error a credentials provider may fail with: any error converts into
/// it with `?` or `.into()`. A failure counts as an authentication failure
/// ([`Error::CredentialsProvider`]).
///
/// ```
/// use amqp091::{Credentials, ProviderError};
///
/// async fn from_environment() -> Result<Credentials, ProviderError> {
///     let token = std::env::var("RABBIT_TOKEN")?;
///     if token.is_empty() {
///         return Err("RABBIT_TOKEN is empty".into());
///     }
///     Ok(Credentials::new("app", token))
/// }
/// ```
pub type ProviderError = Box<dyn std::error::Error + Send + Sync>;

/// Called before each connect attempt for the credentials to use.
pub(crate) type CredentialsProvider = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Credentials, ProviderError>> + Send>>
        + Send
        + Sync,
>;

/// `config` with the credentials a connect attempt uses (see
/// `Shared::config_for_attempt` in `link.rs`).
pub(crate) async fn config_for_attempt(
    config: &Config,
    provider: Option<&CredentialsProvider>,
    stored_secret: Option<String>,
) -> Result<Config, Error> {
    let mut config = config.clone();
    if let Some(provider) = provider {
        let credentials = provider()
            .await
            .map_err(|e| Error::CredentialsProvider(Arc::from(e)))?;
        config.user = credentials.user;
        config.password = credentials.secret;
    } else if let Some(secret) = stored_secret {
        config.password = secret;
    }
    Ok(config)
}

/// Opens a stream to one of `config`'s addresses, starting after `last`
/// (so that a lost node is tried last), and runs the handshake.
pub(crate) async fn open_stream(
    config: &Config,
    last: Option<usize>,
) -> Result<(Stream, handshake::Negotiated, usize), Error> {
    let addresses = config.addresses();
    let start = last.map_or(0, |i| i + 1);
    let mut last_error = None;
    for k in 0..addresses.len() {
        let index = (start + k) % addresses.len();
        let target = config.at(&addresses[index]);
        let address = target.address();
        tracing::debug!(%address, vhost = %target.vhost, "connecting");
        let timeout = target.connection_timeout;
        let opened = tokio::time::timeout(timeout, async {
            let mut stream = transport::connect(&target).await?;
            let negotiated = handshake::handshake(&mut stream, &target).await?;
            Ok::<_, Error>((stream, negotiated))
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout {
                address: address.clone(),
                timeout,
            })
        });
        match opened {
            Ok((stream, negotiated)) => {
                tracing::info!(
                    %address,
                    channel_max = negotiated.channel_max,
                    frame_max = negotiated.frame_max,
                    heartbeat = negotiated.heartbeat,
                    "connected"
                );
                return Ok((stream, negotiated, index));
            }
            // Wrong credentials or vhost are the same on every node.
            Err(e @ (Error::AuthenticationFailed { .. } | Error::VhostRefused { .. })) => {
                return Err(e)
            }
            Err(e) => {
                tracing::debug!(%address, error = %e, "connect failed");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::Connect {
        address: config.address(),
        source: Arc::new(std::io::Error::other("no address to connect to")),
    }))
}

/// A number in [0.5, 1.0) for backoff jitter; no RNG dependency needed for that.
pub(crate) fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A multiplicative hash spreads nearby nanosecond counts apart.
    let mixed = nanos.wrapping_mul(2_654_435_761) >> 8;
    0.5 + f64::from(mixed % 1_000_000) / 2_000_000.0
}
