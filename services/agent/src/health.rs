//! Health probes, as the agent runs them against an instance's host port.

use std::net::SocketAddr;
use std::time::Duration;

use capstan_types::HealthCheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// True when the instance answers: a TCP connect, or an HTTP 2xx/3xx.
pub async fn probe(check: &HealthCheck, address: SocketAddr, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, probe_inner(check, address))
        .await
        .unwrap_or(false)
}

async fn probe_inner(check: &HealthCheck, address: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return false;
    };
    let HealthCheck::Http { path } = check else {
        return true;
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: capstan-agent\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).await.is_err() {
        return false;
    }
    head.starts_with(b"HTTP/1.") && matches!(head[9], b'2' | b'3')
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server(response: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn http_probe_reads_the_status() {
        let ok = server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let bad = server(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n").await;
        let http = HealthCheck::Http { path: "/".into() };
        let t = Duration::from_secs(1);
        assert!(probe(&http, ok, t).await);
        assert!(!probe(&http, bad, t).await);
        assert!(probe(&HealthCheck::Tcp, bad, t).await);
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!probe(&HealthCheck::Tcp, closed, t).await);
    }
}
