//! The admin listener: a minimal HTTP/1.1 server on loopback answering `GET /metrics`
//! (Prometheus text format) and `GET /healthz` (200, or 503 with a JSON reason). One request per
//! connection, bounded in size and time; nothing else is served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::ops::Metrics;

/// Largest request head read; scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request and read the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves requests on `listener` until the returned task is aborted.
pub fn spawn(listener: TcpListener, metrics: Arc<Metrics>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        if tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &metrics))
                            .await
                            .is_err()
                        {
                            tracing::debug!(%peer, "admin request timed out");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Binds the admin listener; logged like the SMTP listeners.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(address = %bound, "admin listener for /metrics and /healthz");
    Ok(listener)
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        if head.len() > MAX_HEAD {
            let _ = respond(&mut stream, &bad(431, "request header too large"), false).await;
            return;
        }
    }
    let (response, head_only) = route(&head, metrics);
    let _ = respond(&mut stream, &response, head_only).await;
}

/// A response before framing.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn bad(status: u16, text: &str) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: format!("{text}\n"),
    }
}

/// Answers one request head; `true` when only the headers are to be sent (HEAD).
pub fn route(head: &[u8], metrics: &Metrics) -> (Response, bool) {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return (bad(400, "bad request"), false);
    };
    if !version.starts_with("HTTP/1.") {
        return (bad(400, "bad request"), false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (bad(405, "only GET and HEAD"), false);
    }
    let path = target.split('?').next().unwrap_or("");
    let response = match path {
        "/metrics" => Response {
            status: 200,
            content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body: metrics.encode(),
        },
        "/healthz" => {
            let health = metrics.health();
            Response {
                status: if health.is_ok() { 200 } else { 503 },
                content_type: "application/json",
                body: serde_json::to_string(&health).unwrap_or_else(|_| "{}".into()) + "\n",
            }
        }
        _ => bad(404, "not found; try /metrics or /healthz"),
    };
    (response, head_only)
}

async fn respond(stream: &mut TcpStream, r: &Response, head_only: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if r.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&r.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_and_odd_ones_refused() {
        let m = Metrics::new();
        let (r, head) = route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m);
        assert_eq!((r.status, head), (200, false));
        assert!(r.body.contains("smtp_oauth_bridge_connections_total 0"));
        assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
        let (r, _) = route(b"GET /healthz HTTP/1.0\r\n\r\n", &m);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "{\"status\":\"ok\",\"problems\":[]}\n");
        assert!(route(b"HEAD /healthz HTTP/1.1\r\n\r\n", &m).1);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0.status, 405);
        assert_eq!(route(b"GET /admin HTTP/1.1\r\n\r\n", &m).0.status, 404);
        assert_eq!(route(b"GET\r\n\r\n", &m).0.status, 400);
        assert_eq!(route(b"GET / SMTP/1.0\r\n\r\n", &m).0.status, 400);
        m.set_draining();
        assert_eq!(route(b"GET /healthz HTTP/1.1\r\n\r\n", &m).0.status, 503);
    }
}
