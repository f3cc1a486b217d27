//! A fault-injecting TCP proxy: put it between a client and a server on loopback to cut
//! connections in the middle of a batch, to make the server unreachable for a while, or to
//! black-hole it (a network partition, a hung server).
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
//! proxy.set_blackhole(true); // accept and keep connections, forward nothing
//! proxy.set_blackhole(false); // forward again, held bytes first
//! # Ok(()) }
//! ```
//!
//! The three faults look different to a client. A **cut** and a proxy that is **down** close
//! connections: the client sees an end of stream or a reset at once and can reconnect. A
//! **black hole** closes nothing: connections are accepted, open ones stay open, and nothing
//! arrives in either direction, so a client only finds out through its own timeouts, as with
//! a partitioned network or a server that hangs. Bytes are held, not dropped: the proxy stops
//! reading (the senders' socket buffers fill, then their writes wait), and when the black hole
//! is lifted what was held is forwarded and open connections carry on, as after a partition
//! that heals before TCP gives up. A connection accepted during the black hole reaches the
//! server only when it is lifted. Clients that gave up meanwhile have closed their side, and
//! the server then sees whatever they had sent, followed by the end of the stream; call
//! [`FaultProxy::cut`] after lifting it to model a partition that outlasted TCP instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// True while black-holed; connections wait on it before each forwarded chunk.
    blackhole: watch::Sender<bool>,
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
            blackhole: watch::channel(false).0,
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

    /// While black-holed, connections are accepted and kept open but nothing is forwarded in
    /// either direction; lifting it forwards what was held and lets every connection, open or
    /// new, carry on (see the [module](self) documentation).
    pub fn set_blackhole(&self, blackhole: bool) {
        self.shared.blackhole.send_replace(blackhole);
    }

    /// Whether the proxy is black-holed.
    pub fn is_blackholed(&self) -> bool {
        *self.shared.blackhole.borrow()
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
        // Held connections wait on the black hole: lifting it lets them see the cut.
        self.set_blackhole(false);
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
        let blackhole = shared.blackhole.subscribe();
        let upstream = shared.upstream;
        tokio::spawn(async move {
            cut.borrow_and_update();
            let forward = async {
                // A connection accepted in a black hole reaches the server once it is lifted.
                passable(&mut blackhole.clone()).await;
                let server = TcpStream::connect(upstream).await?;
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::try_join!(
                    pump(client_read, server_write, blackhole.clone()),
                    pump(server_read, client_write, blackhole.clone()),
                )
            };
            tokio::select! {
                _ = forward => {}
                _ = cut.changed() => {}
            }
            // Dropping both streams closes them: the client sees the connection cut.
        });
    }
}

/// Waits until the proxy is not black-holed (at once when it is not).
async fn passable(blackhole: &mut watch::Receiver<bool>) {
    // An error means the proxy is gone; its cut ends the connection.
    let _ = blackhole.wait_for(|on| !on).await;
}

/// Copies `from` to `to` until the end of `from`, then ends `to`'s direction. Before each read
/// and each write it waits out a black hole, so that at most one buffer is held here and the
/// rest waits in the sockets.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut blackhole: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        passable(&mut blackhole).await;
        let n = from.read(&mut buf).await?;
        passable(&mut blackhole).await;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    use std::time::Duration;

    /// An echo server; returns its address.
    async fn echo_server() -> SocketAddr {
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
        upstream
    }

    #[tokio::test]
    async fn forwards_then_cuts_then_refuses() {
        let upstream = echo_server().await;
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

    #[tokio::test]
    async fn a_black_hole_holds_everything_and_closes_nothing() {
        let upstream = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.expect("proxy");
        let mut open = TcpStream::connect(proxy.addr()).await.expect("connect");
        open.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.expect("echo");

        proxy.set_blackhole(true);
        assert!(proxy.is_blackholed());
        open.write_all(b"held").await.expect("writes are taken");
        let mut new = TcpStream::connect(proxy.addr())
            .await
            .expect("new connections are accepted");
        new.write_all(b"late").await.expect("write");
        // Neither an answer nor an end of stream nor a reset: the reads just wait.
        for conn in [&mut open, &mut new] {
            let read = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut buf)).await;
            assert!(read.is_err(), "a black-holed connection answered: {read:?}");
        }

        proxy.set_blackhole(false);
        assert!(!proxy.is_blackholed());
        for (conn, sent) in [(&mut open, b"held"), (&mut new, b"late")] {
            tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
                .await
                .expect("held bytes are forwarded once lifted")
                .expect("echo");
            assert_eq!(&buf, sent);
        }
        let mut after = TcpStream::connect(proxy.addr()).await.expect("connect");
        after.write_all(b"pong").await.expect("write");
        after.read_exact(&mut buf).await.expect("echo");
        assert_eq!(&buf, b"pong");
        assert_eq!(proxy.connections(), 3);

        // A cut still ends connections held in a black hole.
        proxy.set_blackhole(true);
        proxy.cut();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), after.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "connection was not cut: {read:?}"
        );
    }
}
