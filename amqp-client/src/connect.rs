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

/// The order in which to try `count` addresses (indices into
/// [`Config::addresses`]): after `last` in turn, or shuffled with `random`
/// when `shuffle` is set; the address lost (`last`) comes last either way.
fn address_order(
    count: usize,
    last: Option<usize>,
    shuffle: bool,
    mut random: impl FnMut() -> u64,
) -> Vec<usize> {
    let start = last.map_or(0, |i| i + 1);
    let mut order: Vec<usize> = (0..count).map(|k| (start + k) % count.max(1)).collect();
    if shuffle {
        // Fisher–Yates over all but the lost address, which stays last.
        let shuffled = if last.is_some() {
            count.saturating_sub(1)
        } else {
            count
        };
        for i in (1..shuffled).rev() {
            let j = (random() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Opens a stream to one of `config`'s addresses, starting after `last`
/// (so that a lost node is tried last) or in a random order when
/// [`Config::shuffle_addresses`](crate::Config::shuffle_addresses) is set,
/// and runs the handshake. Returns the index into [`Config::addresses`] of
/// the address connected to.
pub(crate) async fn open_stream(
    config: &Config,
    last: Option<usize>,
) -> Result<(Stream, handshake::Negotiated, usize), Error> {
    let addresses = config.addresses();
    let mut last_error = None;
    for index in address_order(addresses.len(), last, config.shuffle_addresses, random_u64) {
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

/// A number in [0.5, 1.0) for backoff jitter.
pub(crate) fn jitter() -> f64 {
    0.5 + (random_u64() % 1_000_000) as f64 / 2_000_000.0
}

/// A random number for jitter and address shuffling; no RNG dependency
/// needed for that. std's `RandomState` keys SipHash with per-process
/// random keys (from the OS) and changes them for every new state, so that
/// clients started at the same instant, in one process or many, still
/// differ; the time is hashed in for good measure.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(nanos);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_shuffling_addresses_are_tried_in_turn_after_the_lost_one() {
        let never = || unreachable!("no randomness without shuffling");
        assert_eq!(address_order(3, None, false, never), [0, 1, 2]);
        assert_eq!(address_order(3, Some(0), false, never), [1, 2, 0]);
        assert_eq!(address_order(3, Some(2), false, never), [0, 1, 2]);
        assert_eq!(address_order(1, Some(0), false, never), [0]);
    }

    #[test]
    fn shuffling_tries_every_address_once_and_the_lost_one_last() {
        let mut firsts = [0u32; 4];
        for _ in 0..400 {
            let order = address_order(4, None, true, random_u64);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3], "{order:?}");
            firsts[order[0]] += 1;

            let order = address_order(4, Some(1), true, random_u64);
            assert_eq!(order.last(), Some(&1), "the lost address last: {order:?}");
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3], "{order:?}");
        }
        // Each address first about a quarter of the time (100 expected);
        // 40 is over six standard deviations below that.
        assert!(firsts.iter().all(|&n| n > 40), "{firsts:?}");
        assert_eq!(
            address_order(0, None, true, random_u64),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn jitter_stays_in_its_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.5..1.0).contains(&j), "{j}");
        }
    }
}
