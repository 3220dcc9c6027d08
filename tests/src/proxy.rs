//! A TCP fault proxy between the client and a broker, for recovery tests:
//! it forwards bytes both ways and, on command, breaks the connections it
//! carries the way networks and brokers do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the proxy breaks the connections it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward normally.
    None,
    /// Reset both sides (RST): the abrupt loss of a peer.
    Reset,
    /// Close both sides cleanly (FIN).
    Close,
    /// Keep both sockets open but forward nothing: only heartbeats notice.
    Blackhole,
    /// Forward this many more bytes towards the client, then reset (mid-frame).
    CutAfter(u64),
}

struct Shared {
    fault: watch::Sender<Fault>,
    /// New connections are refused (accepted and dropped) while set.
    refusing: AtomicBool,
    accepted: AtomicU64,
    links: Mutex<Vec<JoinHandle<()>>>,
}

/// A running proxy. Dropping it stops it and every connection it carries.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let (fault, _) = watch::channel(Fault::None);
        let shared = Arc::new(Shared {
            fault,
            refusing: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            links: Mutex::new(Vec::new()),
        });
        let acceptor_shared = shared.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if acceptor_shared.refusing.load(Ordering::SeqCst) {
                    reset(&client);
                    drop(client);
                    continue;
                }
                acceptor_shared.accepted.fetch_add(1, Ordering::SeqCst);
                // A new connection starts healthy.
                acceptor_shared.fault.send_replace(Fault::None);
                let link = tokio::spawn(carry(client, target, acceptor_shared.fault.subscribe()));
                if let Ok(mut links) = acceptor_shared.links.lock() {
                    links.push(link);
                }
            }
        });
        FaultProxy {
            address,
            shared,
            acceptor,
        }
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Breaks the current connections in the way `fault` says.
    pub fn inject(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// Refuses (or again accepts) new connections, as a node that is down.
    pub fn refuse_new_connections(&self, refuse: bool) {
        self.shared.refusing.store(refuse, Ordering::SeqCst);
    }

    /// How many connections it has accepted and carried.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        if let Ok(links) = self.shared.links.lock() {
            for link in links.iter() {
                link.abort();
            }
        }
    }
}

fn reset(stream: &TcpStream) {
    // SO_LINGER 0 turns the close into an RST. Tokio deprecates set_linger
    // because a non-zero linger blocks on drop; a zero one never does.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
}

/// Forwards one client connection to the target until a fault breaks it.
async fn carry(client: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
    let Ok(server) = TcpStream::connect(target).await else {
        reset(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    let mut budget: Option<u64> = None;
    loop {
        let current = *fault.borrow_and_update();
        match current {
            Fault::None => {}
            Fault::Reset => {
                reset(client_write.as_ref());
                reset(server_write.as_ref());
                return;
            }
            Fault::Close => {
                let _ = client_write.shutdown().await;
                let _ = server_write.shutdown().await;
                return;
            }
            Fault::Blackhole => {
                // Hold both sockets, forward nothing, until the fault changes
                // (or the proxy is dropped).
                if fault.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Fault::CutAfter(n) => {
                if budget.is_none() {
                    budget = Some(n);
                }
            }
        }
        tokio::select! {
            read = client_read.read(&mut up) => match read {
                Ok(0) | Err(_) => {
                    let _ = server_write.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if server_write.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            read = server_read.read(&mut down) => match read {
                Ok(0) | Err(_) => {
                    let _ = client_write.shutdown().await;
                    return;
                }
                Ok(n) => {
                    let allowed = match budget {
                        Some(left) => (left as usize).min(n),
                        None => n,
                    };
                    if client_write.write_all(&down[..allowed]).await.is_err() {
                        return;
                    }
                    if let Some(left) = budget.as_mut() {
                        *left -= allowed as u64;
                        if *left == 0 {
                            reset(client_write.as_ref());
                            reset(server_write.as_ref());
                            return;
                        }
                    }
                }
            },
            changed = fault.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
