//! gRPC (tonic) through a real sidecar pair: unary and bidirectional streaming, trailers,
//! and PERMISSION_DENIED from policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;

use mayfly_tests::mesh::Pair;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    #![allow(clippy::all, unreachable_pub, missing_docs)]
    tonic::include_proto!("mayfly.test");
}

use pb::Msg;
use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};

struct Svc;

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        let who = req
            .metadata()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        Ok(Response::new(Msg {
            text: format!("{}|{who}", req.into_inner().text),
        }))
    }

    type BidiStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

    async fn bidi(
        &self,
        req: Request<Streaming<Msg>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let mut input = req.into_inner();
        let out = async_stream_like(move |tx| async move {
            while let Some(m) = input.next().await {
                match m {
                    Ok(m) => {
                        if tx
                            .send(Ok(Msg {
                                text: m.text.to_uppercase(),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(out))
    }
}

/// A channel-backed stream without extra crates.
fn async_stream_like<F, Fut>(f: F) -> Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Msg, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

const POLICY: &str = r#"version = 1
[[rule]]
name = "web-calls-unary"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["POST"]
paths = ["/mayfly.test.Echo/Unary", "/mayfly.test.Echo/Bidi"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_bidi_streaming_pass_through_a_sidecar_pair() {
    // The gRPC server (h2c) behind orders' sidecar.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let Pair {
        ca: _ca,
        web: _web,
        orders: _orders,
        out,
        orders_policy: pol,
        ..
    } = Pair::http()
        .policy(POLICY)
        .app(&app)
        .app_protocol("http2")
        .start()
        .await;

    let mut client = EchoClient::connect(format!("http://{out}")).await.unwrap();
    // Unary: the server sees the caller's identity from the sidecar.
    let r = client
        .unary(Msg { text: "hi".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.text.starts_with("hi|By=spiffe://mayfly.local/orders;"),
        "{}",
        r.text
    );
    assert!(
        r.text.ends_with("URI=spiffe://mayfly.local/web"),
        "{}",
        r.text
    );
    // Bidi streaming: many messages each way on one stream.
    let msgs: Vec<Msg> = (0..50)
        .map(|i| Msg {
            text: format!("m{i}"),
        })
        .collect();
    let resp = client.bidi(tokio_stream::iter(msgs)).await.unwrap();
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.next().await {
        got.push(m.unwrap().text);
    }
    assert_eq!(got.len(), 50);
    assert_eq!(got[49], "M49");

    // A policy that no longer allows Bidi: PERMISSION_DENIED with the decision ID.
    std::fs::write(&pol, POLICY.replace(", \"/mayfly.test.Echo/Bidi\"", "")).unwrap();
    let mut denied = None;
    for _ in 0..50 {
        match client
            .bidi(tokio_stream::iter(vec![Msg { text: "x".into() }]))
            .await
        {
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                denied = Some(s);
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let s = denied.expect("Bidi must be denied after the policy change");
    assert!(s.message().contains("decision d-"), "{}", s.message());
    assert!(s.metadata().get("x-mayfly-decision-id").is_some());
    // Unary still allowed on the same channel.
    client
        .unary(Msg {
            text: "still".into(),
        })
        .await
        .unwrap();
}
