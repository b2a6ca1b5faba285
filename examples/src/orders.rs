//! `orders`: a small HTTP/1.1 JSON API that keeps its orders in `db`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /orders` | `200` JSON list of orders |
//! | `GET /orders/{id}` | `200` one order, `404` |
//! | `POST /orders` `{"item": "...", "qty": n}` | `201` the new order |
//! | `GET /whoami` | `200` who called, from `x-forwarded-client-cert` |
//! | `GET /healthz` | `200` |
//!
//! Every answer names the replica that served it in `x-served-by` (several replicas of orders
//! can run behind one SPIFFE ID; the quickstart shows requests spread over two).
//!
//! It has no authentication code of its own: in the mesh, its sidecar admits only callers the
//! policy allows and tells it who called in `x-forwarded-client-cert` (HTTP mode). Every
//! request to `db` opens a new connection to `db_addr`, which in the mesh is orders' own
//! sidecar's outbound port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::db;
use crate::xfcc;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The response header that names the replica that answered.
pub const SERVED_BY: &str = "x-served-by";

/// Serves the API on `listener`, storing orders in the `db` at `db_addr`, as replica `orders`.
pub async fn serve(listener: TcpListener, db_addr: String) -> anyhow::Result<()> {
    serve_as(listener, db_addr, "orders").await
}

/// Serves the API as the replica `replica` (named in every answer's `x-served-by`).
pub async fn serve_as(listener: TcpListener, db_addr: String, replica: &str) -> anyhow::Result<()> {
    let db_addr = Arc::new(db_addr);
    let served_by = header::HeaderValue::from_str(replica)
        .map_err(|_| anyhow::anyhow!("replica name {replica:?} is not a valid header value"))?;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("orders: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let db_addr = db_addr.clone();
        let served_by = served_by.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let db_addr = db_addr.clone();
                let served_by = served_by.clone();
                async move {
                    let mut r = handle(req, &db_addr).await;
                    r.headers_mut().insert(SERVED_BY, served_by);
                    Ok::<_, Infallible>(r)
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            // An idle keep-alive connection timing out is routine; say nothing of it.
            if let Err(e) = b.serve_connection(TokioIo::new(tcp), svc).await
                && !e.is_timeout()
                && !e.is_incomplete_message()
            {
                eprintln!("orders: connection error: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    reply(status, &json!({ "error": msg }))
}

/// Routes one request.
async fn handle(req: Request<Incoming>, db_addr: &str) -> Response<Full<Bytes>> {
    let caller = xfcc::caller(req.headers());
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(reply(StatusCode::OK, &json!({ "ok": true }))),
        (&Method::GET, ["whoami"]) => Ok(whoami(&req)),
        (&Method::GET, ["orders"]) => list(db_addr).await,
        (&Method::GET, ["orders", id]) => match id.parse::<u64>() {
            Ok(id) => one(db_addr, id).await,
            Err(_) => Ok(error(StatusCode::NOT_FOUND, "no such order")),
        },
        (&Method::POST, ["orders"]) => create(req, db_addr, caller).await,
        (_, ["orders"] | ["orders", _] | ["whoami"] | ["healthz"]) => {
            Ok(error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"))
        }
        _ => Ok(error(StatusCode::NOT_FOUND, "not found")),
    };
    result.unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, &format!("db unavailable: {e:#}")))
}

fn whoami(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let values: Vec<String> = req
        .headers()
        .get_all(xfcc::HEADER)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    reply(
        StatusCode::OK,
        &json!({
            "caller": xfcc::caller(req.headers()),
            "x_forwarded_client_cert": values,
        }),
    )
}

async fn list(db_addr: &str) -> anyhow::Result<Response<Full<Bytes>>> {
    let mut db = db::Client::connect(db_addr).await?;
    let mut orders = Vec::new();
    for key in db.keys("order:").await? {
        if let Some(v) = db.get(&key).await? {
            orders.push(serde_json::from_str::<Value>(&v).unwrap_or(Value::String(v)));
        }
    }
    orders.sort_by_key(|o| o.get("id").and_then(Value::as_u64));
    Ok(reply(StatusCode::OK, &Value::Array(orders)))
}

async fn one(db_addr: &str, id: u64) -> anyhow::Result<Response<Full<Bytes>>> {
    let mut db = db::Client::connect(db_addr).await?;
    Ok(match db.get(&format!("order:{id}")).await? {
        Some(v) => reply(
            StatusCode::OK,
            &serde_json::from_str::<Value>(&v).unwrap_or(Value::String(v)),
        ),
        None => error(StatusCode::NOT_FOUND, "no such order"),
    })
}

async fn create(
    req: Request<Incoming>,
    db_addr: &str,
    caller: Option<String>,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body unreadable or over 64 KiB",
            ));
        }
    };
    let input: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON: {e}"),
            ));
        }
    };
    let item = input.get("item").and_then(Value::as_str).unwrap_or("");
    let qty = input.get("qty").and_then(Value::as_u64).unwrap_or(1);
    if item.is_empty() || item.len() > 200 || item.contains(['\n', '\r']) {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "`item` must be a string of 1 to 200 characters",
        ));
    }
    let mut db = db::Client::connect(db_addr).await?;
    let id = db.incr("seq:order").await?;
    let order = json!({ "id": id, "item": item, "qty": qty, "created_by": caller });
    db.set(&format!("order:{id}"), &order.to_string()).await?;
    Ok(reply(StatusCode::CREATED, &order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web;

    #[tokio::test]
    async fn the_api_reads_and_writes_orders_in_db() -> anyhow::Result<()> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let db_addr = l.local_addr()?.to_string();
        let db_task = tokio::spawn(db::serve(l, Arc::new(db::Store::with_sample_orders())));
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let task = tokio::spawn(serve(l, db_addr));

        let r = web::call(&addr, "GET", "/orders", &[], None).await?;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()?.as_array().map(Vec::len), Some(2));
        let r = web::call(
            &addr,
            "POST",
            "/orders",
            &[(
                "x-forwarded-client-cert",
                "By=spiffe://mayfly.local/orders;Hash=00;URI=spiffe://mayfly.local/web",
            )],
            Some(r#"{"item":"tea","qty":3}"#.into()),
        )
        .await?;
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.json()?["created_by"], "spiffe://mayfly.local/web");
        let r = web::call(&addr, "GET", "/orders/3", &[], None).await?;
        assert_eq!(r.json()?["item"], "tea");
        let r = web::call(&addr, "GET", "/orders/99", &[], None).await?;
        assert_eq!(r.status, 404);
        let r = web::call(&addr, "POST", "/orders", &[], Some("{".into())).await?;
        assert_eq!(r.status, 400);
        let r = web::call(&addr, "DELETE", "/orders/1", &[], None).await?;
        assert_eq!(r.status, 405);
        let r = web::call(&addr, "GET", "/whoami", &[], None).await?;
        assert_eq!(r.json()?["caller"], Value::Null);
        task.abort();
        db_task.abort();
        Ok(())
    }
}
