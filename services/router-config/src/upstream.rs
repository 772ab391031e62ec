//! Keep-alive HTTP/1.1 connections to one upstream address.
//!
//! The edge proxy keeps one [`Pool`] per upstream address (shared by every
//! route that lists it, dropped with the last table that does). A request
//! takes the most recently used idle connection, or dials a new one; its
//! connection goes back when the response body has been read to its end.
//! A response given up part-way closes its connection, since what is left
//! of the body would be read as the next response.
//!
//! hyper-util's general-purpose client did the same with a pool keyed by
//! URI, a waiter queue, and a task spawned per request to put the
//! connection back once it was ready again; at the proxy's request rates
//! that bookkeeping was a visible part of each request.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::ProxyBody;

/// Why a request reached no upstream.
#[derive(Debug)]
pub enum UpstreamError {
    Connect(std::io::Error),
    ConnectTimeout,
    Handshake(hyper::Error),
    Send(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "connecting: {e}"),
            UpstreamError::ConnectTimeout => write!(f, "connecting: timed out"),
            UpstreamError::Handshake(e) => write!(f, "HTTP/1.1 handshake: {e}"),
            UpstreamError::Send(e) => write!(f, "sending the request: {e}"),
        }
    }
}

/// How connections to upstreams are dialled and kept.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed, not reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per upstream address; more are closed.
    pub max_idle: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_idle: 1024,
        }
    }
}

/// The idle connections to one upstream address.
pub struct Pool {
    authority: Authority,
    settings: PoolSettings,
    /// Oldest first: requests take from the back, expiry trims the front.
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// A connection in use; [`Lease::release`] puts it back.
pub struct Lease {
    sender: SendRequest<ProxyBody>,
    pool: std::sync::Arc<Pool>,
}

impl Lease {
    /// Gives the connection back for the next request. Only call this
    /// once the response was read to its end. A connection still busy (its
    /// request body not all sent, or its end not yet processed) goes back
    /// when it is ready, so no request waits on another's.
    pub fn release(self) {
        let Lease { mut sender, pool } = self;
        if sender.is_ready() {
            pool.put(sender);
            return;
        }
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(sender);
            }
        });
    }
}

impl Pool {
    pub fn new(authority: Authority, settings: PoolSettings) -> Self {
        Pool {
            authority,
            settings,
            idle: Mutex::default(),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) on an idle connection,
    /// or a new one. A request that an idle connection closed before it was
    /// written goes on the next one: that is the keep-alive race, where the
    /// upstream closed its end just as the request was sent.
    pub async fn send(
        self: &std::sync::Arc<Self>,
        mut request: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        loop {
            let (mut sender, reused) = match self.take() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Send(e));
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease {
                        sender,
                        pool: self.clone(),
                    };
                    return Ok((response, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(UpstreamError::Send(e.into_error())),
                },
            }
        }
    }

    /// The address this pool dials.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Closes the idle connections past their time.
    pub fn expire(&self) {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        self.expire_locked(&mut idle);
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock poisoned").len()
    }

    fn expire_locked(&self, idle: &mut VecDeque<Idle>) {
        while idle
            .front()
            .is_some_and(|oldest| oldest.since.elapsed() >= self.settings.idle_timeout)
        {
            idle.pop_front();
        }
    }

    fn take(&self) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        self.expire_locked(&mut idle);
        while let Some(Idle { sender, .. }) = idle.pop_back() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        self.expire_locked(&mut idle);
        if idle.len() < self.settings.max_idle {
            idle.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, UpstreamError> {
        let address = self.authority.as_str();
        let stream =
            tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(address))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout)?
                .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            // With upgrades: a WebSocket's 101 hands the socket to the tunnel.
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(upstream = %authority, "upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::{BodyExt, Empty};

    use super::*;

    /// An upstream answering `ok` on kept-alive connections.
    async fn upstream() -> Authority {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        address.to_string().parse().unwrap()
    }

    async fn get(pool: &Arc<Pool>) {
        let request = Request::get("/")
            .header(http::header::HOST, "app.test")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let (response, lease) = pool.send(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), b"ok");
        lease.release();
    }

    #[tokio::test]
    async fn idle_connections_are_reused_then_closed_past_their_time() {
        let settings = PoolSettings {
            idle_timeout: Duration::from_millis(100),
            ..PoolSettings::default()
        };
        let pool = Arc::new(Pool::new(upstream().await, settings));
        get(&pool).await;
        get(&pool).await;
        assert_eq!(
            pool.idle_count(),
            1,
            "the second request reused the first's connection"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        pool.expire();
        assert_eq!(pool.idle_count(), 0);
        get(&pool).await;
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn idle_connections_past_the_cap_are_closed() {
        let settings = PoolSettings {
            max_idle: 1,
            ..PoolSettings::default()
        };
        let pool = Arc::new(Pool::new(upstream().await, settings));
        let request = || {
            Request::get("/")
                .header(http::header::HOST, "app.test")
                .body(Empty::new().map_err(|never| match never {}).boxed())
                .unwrap()
        };
        // Two at once: two connections, of which one is kept.
        let ((first, a), (second, b)) =
            tokio::try_join!(pool.send(request()), pool.send(request())).unwrap();
        first.into_body().collect().await.unwrap();
        second.into_body().collect().await.unwrap();
        a.release();
        b.release();
        assert_eq!(pool.idle_count(), 1);
    }
}
