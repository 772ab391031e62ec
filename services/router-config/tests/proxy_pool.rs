//! The edge proxy's upstream connections, against real sockets: a response
//! given up part-way never leaks into the next request, an upstream that
//! closes every connection loses no request, and an upstream that leaves
//! the table has its idle connections closed.

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
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).boxed()
}

/// The test's app. `/conn`: the number of the connection that carried the
/// request; `/endless`: a body that never ends. `open` counts its open
/// connections.
struct Backend {
    address: SocketAddr,
    open: Arc<AtomicUsize>,
}

async fn backend(keep_alive: bool) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counted = open.clone();
    tokio::spawn(async move {
        let mut accepted = 0usize;
        while let Ok((stream, _)) = listener.accept().await {
            let connection = accepted;
            accepted += 1;
            let service =
                hyper::service::service_fn(move |request: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(&request, connection))
                });
            let open = counted.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Backend { address, open }
}

fn answer(request: &Request<Incoming>, connection: usize) -> Response<Body> {
    match request.uri().path() {
        "/conn" => Response::new(full(connection.to_string())),
        "/endless" => {
            let chunks = futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"more "))),
                    (),
                ))
            });
            Response::new(StreamBody::new(chunks).boxed())
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("no such path"))
            .unwrap(),
    }
}

fn table(generation: u64, upstream: Option<SocketAddr>) -> RouteTable {
    RouteTable {
        generation,
        routes: vec![Route {
            app: "app".into(),
            project: "default".into(),
            hosts: vec!["app.test".into()],
            health: None,
            wakeable: false,
            upstreams: upstream
                .map(|address| {
                    vec![Upstream {
                        instance_id: "app-1".into(),
                        address: address.to_string(),
                    }]
                })
                .unwrap_or_default()
                .into(),
        }],
    }
}

/// The proxy on a fresh port in front of `upstream`.
async fn start(upstream: SocketAddr, shutdown: &CancellationToken) -> (Arc<EdgeProxy>, SocketAddr) {
    let limits = HttpLimits::default();
    let proxy = EdgeProxy::new(limits, TrustedProxies::default());
    proxy.apply(table(1, Some(upstream)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let serving = proxy.clone();
    let handler = move |request, remote| serving.clone().handle(request, remote);
    tokio::spawn(proxy::serve(
        listener,
        handler,
        shutdown.clone(),
        Duration::from_secs(1),
        limits,
    ));
    (proxy, address)
}

async fn connect(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get(proxy: SocketAddr, path: &str) -> (StatusCode, String) {
    let mut client = connect(proxy).await;
    let request = Request::get(path)
        .header("host", "app.test")
        .body(full(""))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client.send_request(request))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_response_given_up_part_way_is_not_read_by_the_next_request() {
    let shutdown = CancellationToken::new();
    let backend = backend(true).await;
    let (_proxy, address) = start(backend.address, &shutdown).await;
    assert_eq!(get(address, "/conn").await, (StatusCode::OK, "0".into()));

    // The kept connection carries a body that never ends; the client reads
    // one chunk and hangs up.
    let mut client = connect(address).await;
    let response = client
        .send_request(
            Request::get("/endless")
                .header("host", "app.test")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("a chunk within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(frame.data_ref().unwrap().as_ref(), b"more ");
    drop(body);
    drop(client);

    // That connection still had a body to send: it is closed, not reused.
    eventually("the abandoned upstream connection closed", || {
        backend.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(
        get(address, "/conn").await,
        (StatusCode::OK, "1".into()),
        "the next request goes on a new connection and reads its own answer"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn an_upstream_that_closes_every_connection_loses_no_request() {
    let shutdown = CancellationToken::new();
    let backend = backend(false).await;
    let (_proxy, address) = start(backend.address, &shutdown).await;
    for i in 0..20 {
        assert_eq!(
            get(address, "/conn").await,
            (StatusCode::OK, i.to_string()),
            "request {i}: each on a connection of its own"
        );
    }
    shutdown.cancel();
}

#[tokio::test]
async fn an_upstream_leaving_the_table_has_its_idle_connections_closed() {
    let shutdown = CancellationToken::new();
    let backend = backend(true).await;
    let (proxy, address) = start(backend.address, &shutdown).await;
    let upstream = backend.address.to_string();
    assert_eq!(get(address, "/conn").await, (StatusCode::OK, "0".into()));
    assert_eq!(get(address, "/conn").await, (StatusCode::OK, "0".into()));
    eventually("the connection back in the pool", || {
        proxy.idle_connections(&upstream) == 1
    })
    .await;
    assert_eq!(backend.open.load(Ordering::SeqCst), 1);

    proxy.apply(table(2, None));
    assert_eq!(proxy.idle_connections(&upstream), 0);
    eventually("the upstream connection closed", || {
        backend.open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(
        get(address, "/conn").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    shutdown.cancel();
}
