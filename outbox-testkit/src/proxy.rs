//! A fault-injecting TCP proxy: put it between a client and a server on loopback to cut
//! connections in the middle of a batch, or to make the server unreachable for a while.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use outbox_testkit::proxy::FaultProxy;
//!
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let proxy = FaultProxy::start(server.local_addr()?).await?;
//! // Clients connect to proxy.addr() instead of the server.
//! proxy.set_down(true); // refuse new connections and cut the open ones
//! proxy.set_down(false); // accept again
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on `127.0.0.1` forwarding to one upstream address.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    down: AtomicBool,
    /// Bumped to cut every open connection.
    generation: watch::Sender<u64>,
    connections: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            down: AtomicBool::new(false),
            generation: watch::channel(0).0,
            connections: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every open connection; new ones are accepted as before.
    pub fn cut(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// While down, new connections are closed at once and open ones are cut.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        if shared.down.load(Ordering::SeqCst) {
            let _ = client.shutdown().await;
            continue;
        }
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let mut cut = shared.generation.subscribe();
        let upstream = shared.upstream;
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            cut.borrow_and_update();
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
            // Dropping both streams closes them: the client sees the connection cut.
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn forwards_then_cuts_then_refuses() {
        let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = server.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        let mut conn = TcpStream::connect(proxy.addr()).await.expect("connect");
        conn.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"ping");

        proxy.cut();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_to_end(&mut rest),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "connection was not cut: {read:?}"
        );

        proxy.set_down(true);
        let mut conn = TcpStream::connect(proxy.addr())
            .await
            .expect("accepts then closes");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_to_end(&mut rest),
        )
        .await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))));
        proxy.set_down(false);
        let mut conn = TcpStream::connect(proxy.addr()).await.expect("connect");
        conn.write_all(b"pong").await.expect("write");
        conn.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"pong");
        assert_eq!(proxy.connections(), 2);
    }
}
