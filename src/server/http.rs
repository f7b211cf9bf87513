//! Serving connections with hyper's HTTP/1.1 directly: axum::serve sets no header-read timeout, so a client that
//! trickles its headers would hold a connection (and a descriptor) for ever.
//!
//! hyper starts its header timer as soon as it waits for a request head, which on a kept-alive connection is right
//! after the previous answer: used as is, it would close every idle keep-alive connection after the header
//! timeout, and an agent heartbeating at that same interval would race the close and reconnect (a TLS handshake on
//! a Pi) every time. So the timer given to hyper ([`HeadTimer`]) counts the header timeout from the first byte of
//! the request, which the connection's reader ([`Watched`]) notes; before that byte the connection is merely idle,
//! and is closed after the longer idle timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, watch};

/// How long a shutdown waits for the requests under way (long polls included) before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Connections the kernel completes before they are accepted (capped by `net.core.somaxconn`). tokio's `bind`
/// gives 128, std's figure: when a fleet-wide order wakes thousands of long polls and the answers are late, clients
/// open connections faster than 128 wait, the kernel drops their handshakes, and each retries after 1, 3, then 7
/// seconds (heartbeats at p99 9.7 s, with time-outs, in `bench/fleet-load.sh`'s wake-up run).
const BACKLOG: u32 = 4096;

/// A listener on `addr` with a backlog of [`BACKLOG`]. Call it on the runtime that serves it.
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's bind: a restarted server takes its port back while the old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// From a request's first byte to the end of its head.
    pub header_timeout: Duration,
    /// A connection with no request under way and none begun is closed after this.
    pub idle_timeout: Duration,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// When the current request's first byte arrived: set by the first read that brings data after an answer was
/// written, cleared by every write.
type FirstByte = Arc<Mutex<Option<Instant>>>;

fn lock(m: &Mutex<Option<Instant>>) -> std::sync::MutexGuard<'_, Option<Instant>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's stream, noting when each request's first byte arrives.
struct Watched<T> {
    io: T,
    first_byte: FirstByte,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            lock(&self.first_byte).get_or_insert_with(Instant::now);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            *lock(&self.first_byte) = None;
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            *lock(&self.first_byte) = None;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The timer hyper arms while it reads a request head (its only use of a timer on an HTTP/1 server connection).
#[derive(Clone)]
struct HeadTimer {
    first_byte: FirstByte,
    header: Duration,
    idle: Duration,
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        // hyper asks for "now + header timeout": now is when it began waiting for a head.
        let waiting_since = deadline.checked_sub(self.header).unwrap_or(deadline);
        Box::pin(HeadSleep {
            first_byte: self.first_byte.clone(),
            header: self.header,
            idle_deadline: waiting_since + self.idle,
            armed: deadline,
            sleep: Box::pin(tokio::time::sleep_until(deadline.into())),
        })
    }
}

struct HeadSleep {
    first_byte: FirstByte,
    header: Duration,
    idle_deadline: Instant,
    armed: Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this whenever the connection wakes, a read included: the first byte is seen here in time.
        let target = match *lock(&self.first_byte) {
            Some(at) => at + self.header,
            None => self.idle_deadline,
        };
        if target != self.armed {
            self.armed = target;
            self.sleep.as_mut().reset(target.into());
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl Sleep for HeadSleep {}

/// Serves `app` on every connection `listener` accepts until `shutdown` resolves, then lets the requests under
/// way finish for a while.
pub async fn serve_connections<L>(
    mut listener: L,
    app: axum::Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener,
{
    let max = limits
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (io, _peer) = tokio::select! {
            c = listener.accept() => c,
            _ = &mut shutdown => break,
        };
        let first_byte = FirstByte::default();
        let timer = HeadTimer {
            first_byte: first_byte.clone(),
            header: limits.header_timeout,
            idle: limits.idle_timeout,
        };
        let io = TokioIo::new(Watched { io, first_byte });
        let service = TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(timer)
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, service);
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stopping.changed() => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("a connection ended: {e}");
            }
        });
    }
    let _ = stop.send(true);
    // Every connection holds a permit: all of them back means every connection has closed.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, permits.acquire_many(max as u32)).await;
}
