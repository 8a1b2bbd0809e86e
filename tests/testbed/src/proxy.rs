//! A TCP proxy that can be cut and restored: put it between a process and the API server to play an API
//! server restart (every connection reset, new ones refused, then service again) without restarting the
//! one shared local control plane that other tests run against.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy from `addr()` to an upstream address. Dropping it stops it.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// `true` while it serves; connections watch it and end when it turns `false`.
    up: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<AtomicU64>,
}

impl TcpProxy {
    /// Starts a proxy on a free port of 127.0.0.1.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut proxy = TcpProxy {
            addr,
            upstream,
            up: watch::Sender::new(true),
            accept: None,
            connections: Arc::new(AtomicU64::new(0)),
        };
        proxy.accept = Some(proxy.serve(listener));
        Ok(proxy)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let upstream = self.upstream;
        let up = self.up.clone();
        let count = self.connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let mut down = up.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {
                            // Reset, as a dying server's connections are: no orderly close.
                            let _ = client.set_zero_linger();
                        }
                    }
                });
            }
        })
    }

    /// Cuts it: every open connection is reset and the port refuses new ones until [`Self::restore`].
    pub fn cut(&mut self) {
        if let Some(task) = self.accept.take() {
            task.abort();
        }
        self.up.send_replace(false);
    }

    /// Serves again on the same port.
    pub async fn restore(&mut self) -> std::io::Result<()> {
        if self.accept.is_some() {
            return Ok(());
        }
        // The port was ours a moment ago; rebinding it can race with the aborted accept task's release.
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.up.send_replace(true);
                    self.accept = Some(self.serve(listener));
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("cannot rebind the proxy port")))
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
