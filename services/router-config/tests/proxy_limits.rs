//! The edge proxy's limits against real sockets: a slowloris client and an
//! idle keep-alive connection are cut off, connections past the cap are
//! closed, a silent upstream becomes a 504, and a client's forged
//! `X-Forwarded-For` does not reach the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capstan_router_config::proxy::{self, EdgeProxy};
use capstan_router_config::table::{Route, RouteTable, Upstream};
use capstan_router_config::{HttpLimits, TrustedProxies};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn limits() -> HttpLimits {
    HttpLimits {
        header_read_timeout: Duration::from_millis(300),
        max_connections: 4,
        upstream_timeout: Duration::from_millis(300),
        ..HttpLimits::default()
    }
}

/// Serves `proxy` on a fresh port; the proxy routes `app.test` to `upstream`.
async fn start(
    limits: HttpLimits,
    upstream: SocketAddr,
    shutdown: &CancellationToken,
) -> SocketAddr {
    let proxy = EdgeProxy::new(limits, TrustedProxies::default());
    proxy.apply(RouteTable {
        generation: 1,
        routes: vec![Route {
            app: "app".into(),
            project: "default".into(),
            hosts: vec!["app.test".into()],
            health: None,
            wakeable: false,
            upstreams: vec![Upstream {
                instance_id: "app-1".into(),
                address: upstream.to_string(),
            }]
            .into(),
        }],
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let handler = move |request, remote| proxy.clone().handle(request, remote);
    tokio::spawn(proxy::serve(
        listener,
        handler,
        shutdown.clone(),
        Duration::from_secs(1),
        limits,
    ));
    address
}

/// An upstream that answers every request with the `X-Forwarded-For` it got.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let xff = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-forwarded-for:"))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{xff}",
                    xff.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

/// Reads until the peer closes; `Err` when it has not within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, ()> {
    let mut received = Vec::new();
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| ())?;
    Ok(received)
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off() {
    let shutdown = CancellationToken::new();
    let proxy = start(limits(), echo_upstream().await, &shutdown).await;
    let mut slow = TcpStream::connect(proxy).await.unwrap();
    // Half a request head, then silence.
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: 1")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(10))
            .await
            .is_ok(),
        "the proxy kept a connection that never finished its headers"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let shutdown = CancellationToken::new();
    let proxy = start(limits(), echo_upstream().await, &shutdown).await;
    let mut idle = TcpStream::connect(proxy).await.unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(10))
            .await
            .is_ok(),
        "the proxy kept a connection that never sent a byte"
    );
    // And one that made a request, then went quiet.
    let mut quiet = TcpStream::connect(proxy).await.unwrap();
    quiet
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let response = closed_within(&mut quiet, Duration::from_secs(10))
        .await
        .expect("the proxy kept an idle keep-alive connection open");
    assert!(response.starts_with(b"HTTP/1.1 200"));
    shutdown.cancel();
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let shutdown = CancellationToken::new();
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 2,
        ..limits()
    };
    let proxy = start(limits, echo_upstream().await, &shutdown).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        // A full request proves the connection was accepted and served.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    let mut third = TcpStream::connect(proxy).await.unwrap();
    let received = closed_within(&mut third, Duration::from_secs(5))
        .await
        .expect("the connection past the cap stayed open");
    assert!(received.is_empty());
    drop(held);
    shutdown.cancel();
}

#[tokio::test]
async fn a_silent_upstream_is_a_504() {
    let shutdown = CancellationToken::new();
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_address = silent.local_addr().unwrap();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            keep.lock().await.push(stream);
        }
    });
    let proxy = start(limits(), silent_address, &shutdown).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let response = closed_within(&mut client, Duration::from_secs(10))
        .await
        .expect("no answer while the upstream was silent");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 504"), "{response}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_forged_x_forwarded_for_does_not_reach_the_app() {
    let shutdown = CancellationToken::new();
    let proxy = start(limits(), echo_upstream().await, &shutdown).await;
    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(
            b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let response = closed_within(&mut client, Duration::from_secs(10))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.ends_with("\r\n\r\n127.0.0.1"), "{response}");
    shutdown.cancel();
}
