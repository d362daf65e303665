//! A TCP proxy between the crate and the server, with switchable faults:
//! pass, added latency, reset every connection, blackhole.
//!
//! A blackhole accepts and keeps connections but drops every byte, both ways,
//! like a network path that died silently (a rebooted NAT, a pulled cable): the
//! client's kernel still sees its segments acknowledged (by the proxy), so TCP
//! alone notices nothing. The connections that were blackholed stay dead after
//! the heal (a half-open outage); only new ones pass again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the proxy does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Each chunk waits this long before it is forwarded (each direction).
    Latency(Duration),
    /// Accept and keep connections, drop all bytes; existing connections die.
    Blackhole,
}

struct Conn {
    /// Blackholed: bytes are dropped, forever.
    dead: AtomicBool,
    /// Fires to reset the connection (RST to both sides).
    reset: CancellationToken,
}

struct Shared {
    mode: Mutex<Mode>,
    conns: Mutex<Vec<Arc<Conn>>>,
    accepted: AtomicUsize,
    dropped_bytes: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            dropped_bytes: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            shared.clone(),
            stop.clone(),
        ));
        Proxy { addr, shared, stop }
    }

    pub fn set(&self, mode: Mode) {
        if mode == Mode::Blackhole {
            for c in self.shared.conns.lock().unwrap().iter() {
                c.dead.store(true, Ordering::SeqCst);
            }
        }
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Resets every connection open now (RST both ways); the mode stays.
    pub fn reset_all(&self) -> usize {
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for c in &conns {
            c.reset.cancel();
        }
        conns.len()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes swallowed by blackholed connections.
    pub fn dropped_bytes(&self) -> u64 {
        self.shared.dropped_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.reset_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let Ok((client, _)) = accepted else { continue };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let mode = *shared.mode.lock().unwrap();
        let conn = Arc::new(Conn {
            dead: AtomicBool::new(mode == Mode::Blackhole),
            reset: stop.child_token(),
        });
        shared.conns.lock().unwrap().push(conn.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            // Closing with linger 0 sends RST, which is what `reset_all` is for.
            let _ = client.set_zero_linger();
            if conn.dead.load(Ordering::SeqCst) {
                // Never reaches the server: swallow whatever arrives.
                swallow(client, &conn, &shared).await;
                return;
            }
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            let _ = server.set_zero_linger();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = pump(cr, sw, conn.clone(), shared.clone());
            let down = pump(sr, cw, conn.clone(), shared.clone());
            tokio::join!(up, down);
        });
    }
}

async fn swallow(mut client: TcpStream, conn: &Conn, shared: &Shared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = client.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => { shared.dropped_bytes.fetch_add(n as u64, Ordering::SeqCst); }
            },
            () = conn.reset.cancelled() => return,
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: Arc<Conn>,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = conn.reset.cancelled() => return,
        };
        if conn.dead.load(Ordering::SeqCst) {
            shared.dropped_bytes.fetch_add(n as u64, Ordering::SeqCst);
            continue;
        }
        let mode = *shared.mode.lock().unwrap();
        if let Mode::Latency(d) = mode {
            tokio::select! {
                () = tokio::time::sleep(d) => {}
                () = conn.reset.cancelled() => return,
            }
        }
        let written = tokio::select! {
            w = to.write_all(&buf[..n]) => w,
            () = conn.reset.cancelled() => return,
        };
        if written.is_err() {
            break;
        }
    }
    // The other side closed: pass the close on, unless this connection died.
    if !conn.dead.load(Ordering::SeqCst) {
        let _ = to.shutdown().await;
    } else {
        conn.reset.cancelled().await;
    }
}
