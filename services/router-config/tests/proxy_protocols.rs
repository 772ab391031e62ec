//! What the edge proxy must carry through, against real sockets: Host
//! routing with its 404 and 503 answers, `X-Forwarded-*`, hop-by-hop
//! headers dropped (also those `Connection` names), upstream keep-alive
//! reuse, a WebSocket echo, a response streamed while it is produced, large
//! uploads (chunked and sized), and HTTP/2 from the client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use capstan_router_config::proxy::{self, EdgeProxy};
use capstan_router_config::table::{Route, RouteTable, Upstream};
use capstan_router_config::{HttpLimits, TrustedProxies};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

/// The test's app. `/headers`: the request's headers, one per line;
/// `/conn`: which upstream connection carried the request; `/upload`: the
/// body's length and byte sum; `/stream`: three chunks, each sent once the
/// test asks for it; `/ws`: a WebSocket handshake, then echoes frames.
struct Backend {
    address: SocketAddr,
    /// Send `()` to release the next chunk of `/stream`.
    release: mpsc::Sender<()>,
}

async fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (release, released) = mpsc::channel::<()>(4);
    let released = Arc::new(Mutex::new(released));
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connection = connections.fetch_add(1, Ordering::SeqCst);
            let released = released.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let released = released.clone();
                async move { Ok::<_, Infallible>(answer(request, connection, released).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    Backend { address, release }
}

async fn answer(
    mut request: Request<Incoming>,
    connection: usize,
    released: Arc<Mutex<mpsc::Receiver<()>>>,
) -> Response<Body> {
    match request.uri().path() {
        "/headers" => {
            let mut lines = String::new();
            for (name, value) in request.headers() {
                lines.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            Response::new(full(lines))
        }
        "/conn" => Response::new(full(connection.to_string())),
        "/upload" => {
            let mut body = request.into_body();
            let (mut length, mut sum) = (0u64, 0u64);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Response::new(full("broken body"));
                };
                if let Some(data) = frame.data_ref() {
                    length += data.len() as u64;
                    sum = data.iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
                }
            }
            Response::new(full(format!("{length} {sum}")))
        }
        "/stream" => {
            let (frames, body) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            tokio::spawn(async move {
                let mut released = released.lock().await;
                for chunk in ["first ", "second ", "third"] {
                    if released.recv().await.is_none() {
                        return;
                    }
                    if frames
                        .send(Ok(Frame::data(Bytes::from(chunk))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(body);
            Response::new(StreamBody::new(stream).boxed())
        }
        "/ws" => {
            let key = request
                .headers()
                .get("sec-websocket-key")
                .cloned()
                .unwrap_or_else(|| http::HeaderValue::from_static("none"));
            let upgraded = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgraded.await else { return };
                let mut io = TokioIo::new(upgraded);
                // Echo each client frame back as an unmasked frame.
                loop {
                    let mut head = [0u8; 2];
                    if io.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let length = usize::from(head[1] & 0x7f);
                    let mut mask = [0u8; 4];
                    let mut payload = vec![0u8; length];
                    if io.read_exact(&mut mask).await.is_err()
                        || io.read_exact(&mut payload).await.is_err()
                    {
                        return;
                    }
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte ^= mask[i % 4];
                    }
                    let mut frame = vec![head[0], length as u8];
                    frame.extend_from_slice(&payload);
                    if io.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .header("sec-websocket-accept", key)
                .body(full(""))
                .unwrap()
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("no such path"))
            .unwrap(),
    }
}

/// The proxy on a fresh port: `app.test` routes to `upstream`, and
/// `empty.test` is an app with no healthy instance.
async fn start(upstream: SocketAddr, shutdown: &CancellationToken) -> SocketAddr {
    let limits = HttpLimits::default();
    let proxy = EdgeProxy::new(limits, TrustedProxies::default());
    let route = |app: &str, upstreams: Vec<Upstream>| Route {
        app: app.into(),
        project: "default".into(),
        hosts: vec![format!("{app}.test")],
        health: None,
        wakeable: false,
        upstreams: upstreams.into(),
    };
    proxy.apply(RouteTable {
        generation: 1,
        routes: vec![
            route(
                "app",
                vec![Upstream {
                    instance_id: "app-1".into(),
                    address: upstream.to_string(),
                }],
            ),
            route("empty", vec![]),
        ],
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

/// A backend and a proxy in front of it, stopped when dropped.
struct Setup {
    backend: Backend,
    proxy: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn setup() -> Setup {
    let shutdown = CancellationToken::new();
    let backend = backend().await;
    let proxy = start(backend.address, &shutdown).await;
    Setup {
        backend,
        proxy,
        shutdown,
    }
}

/// An HTTP/1.1 connection to the proxy.
async fn connect(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut request = Request::get(path).header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(full("")).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn hosts_route_and_unknown_or_empty_apps_answer_404_and_503() {
    let setup = setup().await;
    let proxy = setup.proxy;
    let mut client = connect(proxy).await;
    let (status, _) = get(&mut client, "APP.test:8080", "/conn", &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Host matching ignores case and port"
    );
    let (status, body) = get(&mut client, "nobody.test", "/", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "capstan: no app is routed for host `nobody.test`\n");
    let (status, body) = get(&mut client, "empty.test", "/", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        "capstan: app `empty` has no healthy instances right now\n"
    );
}

#[tokio::test]
async fn forwarded_headers_are_set_and_hop_by_hop_ones_dropped() {
    let setup = setup().await;
    let proxy = setup.proxy;
    let mut client = connect(proxy).await;
    let (status, seen) = get(
        &mut client,
        "app.test",
        "/headers",
        &[
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen: Vec<&str> = seen.lines().collect();
    for wanted in [
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-host: app.test",
        "x-forwarded-proto: http",
        "x-kept: yes",
        "host: app.test",
    ] {
        assert!(seen.contains(&wanted), "{wanted} missing from {seen:?}");
    }
    for dropped in ["x-private", "keep-alive", "te"] {
        assert!(
            !seen.iter().any(|l| l.starts_with(&format!("{dropped}:"))),
            "{dropped} reached the app: {seen:?}"
        );
    }
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let setup = setup().await;
    let proxy = setup.proxy;
    let mut carried = Vec::new();
    // Sequential requests, each on a new client connection.
    for _ in 0..5 {
        let mut client = connect(proxy).await;
        carried.push(get(&mut client, "app.test", "/conn", &[]).await.1);
    }
    assert!(
        carried.iter().all(|c| c == &carried[0]),
        "one upstream connection should carry them all: {carried:?}"
    );
}

#[tokio::test]
async fn a_websocket_echoes_through_the_proxy() {
    let setup = setup().await;
    let proxy = setup.proxy;
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: dghlihnhbxbszsbub25jzq=="),
        "{head}"
    );
    for message in ["hello", "through the proxy"] {
        let mask = [7u8, 1, 2, 3];
        let mut frame = vec![0x81, 0x80 | message.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        stream.write_all(&frame).await.unwrap();
        let mut echoed = vec![0u8; 2 + message.len()];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
            .await
            .expect("no echo within 5 s")
            .unwrap();
        assert_eq!(echoed[0], 0x81);
        assert_eq!(&echoed[2..], message.as_bytes());
    }
}

#[tokio::test]
async fn a_streamed_response_arrives_while_it_is_produced() {
    let setup = setup().await;
    let proxy = setup.proxy;
    let mut client = connect(proxy).await;
    let response = client
        .send_request(
            Request::get("/stream")
                .header("host", "app.test")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut got = String::new();
    // Each chunk is produced only after the previous one arrived: a proxy
    // that buffered the body would wait for ever.
    for expected in ["first ", "second ", "third"] {
        setup.backend.release.send(()).await.unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a chunk did not come through within 5 s")
            .unwrap()
            .unwrap();
        let chunk = String::from_utf8_lossy(frame.data_ref().unwrap()).into_owned();
        assert_eq!(chunk, expected);
        got.push_str(&chunk);
    }
    assert_eq!(got, "first second third");
}

#[tokio::test]
async fn large_uploads_arrive_whole_chunked_or_sized() {
    let setup = setup().await;
    let proxy = setup.proxy;
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 48;
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let sum = chunk
        .iter()
        .fold(0u64, |s, b| s.wrapping_add(u64::from(*b)))
        .wrapping_mul(CHUNKS as u64);
    let expected = format!("{} {sum}", CHUNK * CHUNKS);

    // Chunked: the body is a stream of unknown length.
    let mut client = connect(proxy).await;
    let chunk = Bytes::from(chunk);
    let frames = futures::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let response = client
        .send_request(
            Request::post("/upload")
                .header("host", "app.test")
                .body(StreamBody::new(frames).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), expected);

    // Sized, over HTTP/2 from the client.
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let whole: Vec<u8> = (0..CHUNK * CHUNKS)
        .map(|i| (i % CHUNK % 251) as u8)
        .collect();
    let response = h2
        .send_request(
            Request::post("http://app.test/upload")
                .body(full(whole))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), expected);

    // And the app saw the client's host over HTTP/2 too.
    let response = h2
        .send_request(
            Request::get("http://app.test/headers")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&body);
    assert!(seen.lines().any(|l| l == "host: app.test"), "{seen}");
}
