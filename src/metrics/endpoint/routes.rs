//! What the endpoint answers: `/metrics`, `/healthz`, `/readyz`, and the errors.

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::shutdown::Lifecycle;

const TEXT: &str = "text/plain";

/// What the routes read: the registry and the draining flag.
pub(super) struct Routes {
    metrics: Arc<Metrics>,
    shared: Arc<Lifecycle>,
}

impl Routes {
    pub(super) fn new(metrics: Arc<Metrics>, shared: Arc<Lifecycle>) -> Routes {
        Routes { metrics, shared }
    }

    /// The whole response to `method path`. HEAD gets the head GET would, with its
    /// Content-Length, and no body.
    pub(super) fn answer(&self, method: &str, path: &str) -> Vec<u8> {
        let (status, content_type, body) = self.route(method, path);
        let extra: &[(&str, &str)] = if status == 405 {
            &[("Allow", "GET, HEAD")]
        } else {
            &[]
        };
        let sent = if method == "HEAD" { 0 } else { body.len() };
        response(status, content_type, &body[..sent], body.len(), extra)
    }

    /// Maps a request to (status, content type, body).
    fn route(&self, method: &str, path: &str) -> (u16, &'static str, Vec<u8>) {
        let path = path.split('?').next().unwrap_or("");
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return (
                404,
                TEXT,
                b"not found; try /metrics, /healthz or /readyz\n".to_vec(),
            );
        }
        if method != "GET" && method != "HEAD" {
            return (405, TEXT, b"method not allowed\n".to_vec());
        }
        match path {
            "/metrics" => (200, prometheus::TEXT_FORMAT, self.metrics.encode()),
            "/healthz" => (200, TEXT, b"ok\n".to_vec()),
            _ if self.shared.is_draining() => (503, TEXT, b"draining\n".to_vec()),
            _ if !self.shared.is_ready() => (503, TEXT, b"shutting down\n".to_vec()),
            _ => (200, TEXT, b"ready\n".to_vec()),
        }
    }
}

/// A plain-text response with no extra headers.
pub(super) fn text(status: u16, body: &[u8]) -> Vec<u8> {
    response(status, TEXT, body, body.len(), &[])
}

/// A complete response that closes the connection; `length` is the Content-Length,
/// which for HEAD is that of the body not sent.
fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    length: usize,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n"
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}
