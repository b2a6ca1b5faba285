//! `web`: the front end. [`call`] is how it talks to `orders` through its sidecar's outbound
//! port (plain HTTP/1.1 on loopback; the sidecar adds mTLS); [`serve`] is a tiny front server
//! for the two-host walk-through (`GET /` lists the orders, `/api/...` is passed to orders).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

/// An HTTP answer, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercase, in order.
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8).
    pub body: String,
}

impl Reply {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("the body is not JSON: {:?}", self.body))
    }
}

/// Largest response body read.
const MAX_REPLY: usize = 1024 * 1024;

/// Sends one HTTP/1.1 request to `addr` on a new connection and reads the whole answer, within
/// 10 s. A connection closed without an answer (as a TCP-mode sidecar does when the policy
/// refuses) is an error.
pub async fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> anyhow::Result<Reply> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP handshake")?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).context("bad method")?)
            .uri(path)
            .header(header::HOST, "orders");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .context("building the request")?;
        let resp = sender
            .send_request(req)
            .await
            .context("no HTTP answer (the connection was closed)")?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = Limited::new(resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
            .to_bytes();
        conn.abort();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("{method} {path} via {addr}: no answer within 10 s"))?
}

/// Serves the front end on `listener`; `orders` is the address of orders (in the mesh: web's
/// sidecar outbound port for orders).
pub async fn serve(listener: TcpListener, orders: String) -> anyhow::Result<()> {
    let orders = Arc::new(orders);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("web: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let orders = orders.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let orders = orders.clone();
                async move { Ok::<_, Infallible>(front(req, &orders).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            // An idle keep-alive connection timing out is routine; say nothing of it.
            if let Err(e) = b.serve_connection(TokioIo::new(tcp), svc).await
                && !e.is_timeout()
                && !e.is_incomplete_message()
            {
                eprintln!("web: connection error: {e}");
            }
        });
    }
}

fn text(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn front(req: Request<Incoming>, orders: &str) -> Response<Full<Bytes>> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    if let Some(rest) = path.strip_prefix("/api") {
        let method = req.method().as_str().to_owned();
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => return text(413, "body unreadable or over 64 KiB\n".into()),
        };
        let body = (!body.is_empty()).then_some(body);
        return match call(orders, &method, rest, &[], body).await {
            Ok(r) => {
                let id = r
                    .header("x-mayfly-decision-id")
                    .and_then(|v| header::HeaderValue::from_str(v).ok());
                let mut out = text(r.status, r.body);
                if let Some(id) = id {
                    out.headers_mut().insert("x-mayfly-decision-id", id);
                }
                out
            }
            Err(e) => text(502, format!("orders unreachable: {e:#}\n")),
        };
    }
    if path != "/" {
        return text(404, "not found: try / or /api/orders\n".into());
    }
    match call(orders, "GET", "/orders", &[], None).await {
        Ok(r) if r.status == 200 => {
            let mut out = String::from("Orders (read from orders, which read them from db):\n");
            for o in r
                .json()
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
            {
                out.push_str(&format!(
                    "  #{} {} x{}\n",
                    o["id"],
                    o["item"].as_str().unwrap_or("?"),
                    o["qty"]
                ));
            }
            text(200, out)
        }
        Ok(r) => text(502, format!("orders answered {}: {}\n", r.status, r.body)),
        Err(e) => text(502, format!("orders unreachable: {e:#}\n")),
    }
}
