//! Just enough HTTP/1.1 for the sandbox token endpoint: read one bounded request, write one
//! response with `Connection: close`.
//!
//! Hand-written because the endpoint serves a single POST per connection and the crate
//! should not grow an HTTP server dependency for that.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sandbox::wire::find;

/// Request line plus headers, including the blank line.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Token requests are a few kilobytes at most (a client assertion is the largest part).
pub(crate) const MAX_BODY: usize = 64 * 1024;

pub(crate) struct HttpRequest {
    pub(crate) method: String,
    /// The request target as sent, query included.
    pub(crate) target: String,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl HttpRequest {
    /// The first header named `name` (ASCII case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The target without its query string.
    pub(crate) fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Why no request could be read. All but `Closed` and `Io` still get an error response.
#[derive(Debug)]
pub(crate) enum HttpError {
    Closed,
    Io,
    HeadTooLarge,
    BodyTooLarge,
    LengthRequired,
    Malformed,
}

impl HttpError {
    /// The response to send for this error, if the peer can still take one.
    pub(crate) fn response(&self) -> Option<HttpResponse> {
        let (status, text) = match self {
            HttpError::Closed | HttpError::Io => return None,
            HttpError::HeadTooLarge => (431, "Request Header Fields Too Large"),
            HttpError::BodyTooLarge => (413, "Payload Too Large"),
            HttpError::LengthRequired => (411, "Length Required"),
            HttpError::Malformed => (400, "Bad Request"),
        };
        Some(HttpResponse::text(status, text))
    }
}

/// Read one request: the head (bounded by [`MAX_HEAD`]) and a `Content-Length` body (bounded
/// by [`MAX_BODY`]). Chunked bodies are refused; token clients never send them. A client
/// that sends `Expect: 100-continue` (curl does for larger bodies) is told to go on.
pub(crate) async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<HttpRequest, HttpError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        // Search only where a new terminator could be, starting 3 bytes back.
        let from = buf.len().saturating_sub(3);
        let n = stream.read(&mut chunk).await.map_err(|_| HttpError::Io)?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find(&buf[from..], b"\r\n\r\n") {
            let end = from + pos + 4;
            if end > MAX_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
    };

    let head = std::str::from_utf8(&buf[..head_end - 4]).map_err(|_| HttpError::Malformed)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().ok_or(HttpError::Malformed)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(HttpError::Malformed);
    }

    let mut headers = Vec::new();
    for line in lines {
        // Obsolete line folding and header lines without a colon are both refused.
        let (name, value) = line.split_once(':').ok_or(HttpError::Malformed)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HttpError::Malformed);
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let request = HttpRequest {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: Vec::new(),
    };

    if request.header("transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    let length = content_length(&request)?;
    if length > MAX_BODY {
        return Err(HttpError::BodyTooLarge);
    }

    let mut body = buf.split_off(head_end);
    let expects_continue = request
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue && body.len() < length {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| HttpError::Io)?;
        stream.flush().await.map_err(|_| HttpError::Io)?;
    }
    while body.len() < length {
        let n = stream.read(&mut chunk).await.map_err(|_| HttpError::Io)?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        body.extend_from_slice(&chunk[..n]);
    }
    // One request per connection: anything after the body is ignored.
    body.truncate(length);
    Ok(HttpRequest { body, ..request })
}

fn content_length(request: &HttpRequest) -> Result<usize, HttpError> {
    let mut found: Option<usize> = None;
    for (name, value) in &request.headers {
        if !name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed);
        }
        // Anything too large for usize is certainly over the body limit.
        let parsed = value.parse::<usize>().unwrap_or(usize::MAX);
        if found.is_some_and(|f| f != parsed) {
            return Err(HttpError::Malformed);
        }
        found = Some(parsed);
    }
    Ok(found.unwrap_or(0))
}

pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl HttpResponse {
    pub(crate) fn json(status: u16, value: &serde_json::Value) -> HttpResponse {
        HttpResponse {
            status,
            // Entra marks token responses uncacheable; clients should see the same headers.
            headers: vec![
                (
                    "Content-Type",
                    "application/json; charset=utf-8".to_string(),
                ),
                ("Cache-Control", "no-store, no-cache".to_string()),
                ("Pragma", "no-cache".to_string()),
            ],
            body: value.to_string().into_bytes(),
        }
    }

    pub(crate) fn text(status: u16, text: &str) -> HttpResponse {
        HttpResponse::with_body(
            status,
            "text/plain; charset=utf-8",
            text.as_bytes().to_vec(),
        )
    }

    pub(crate) fn with_body(status: u16, content_type: &str, body: Vec<u8>) -> HttpResponse {
        HttpResponse {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body,
        }
    }

    pub(crate) fn header(mut self, name: &'static str, value: String) -> HttpResponse {
        self.headers.push((name, value));
        self
    }

    pub(crate) async fn write_to<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
    ) -> std::io::Result<()> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        ));
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        stream.write_all(&bytes).await?;
        stream.flush().await
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &[u8]) -> Result<HttpRequest, HttpError> {
        let (mut client, mut server) = tokio::io::duplex(MAX_HEAD * 2);
        client.write_all(raw).await.unwrap();
        drop(client);
        read_request(&mut server).await
    }

    #[tokio::test]
    async fn parses_a_form_post() {
        let req = parse(
            b"POST /t/oauth2/v2.0/token?x=1 HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\nabcTRAILING",
        )
        .await
        .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path(), "/t/oauth2/v2.0/token");
        assert_eq!(req.header("Content-Length"), Some("3"));
        assert_eq!(req.body, b"abc");
    }

    #[tokio::test]
    async fn refuses_bad_requests() {
        let cases: [(&[u8], &str); 6] = [
            (b"GARBAGE\r\n\r\n", "Malformed"),
            (b"POST / HTTP/1.1\r\nbad header\r\n\r\n", "Malformed"),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "Malformed",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "LengthRequired",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                "BodyTooLarge",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
                "Closed",
            ),
        ];
        for (raw, want) in cases {
            let got = parse(raw).await.err().map(|e| format!("{e:?}"));
            assert_eq!(
                got.as_deref(),
                Some(want),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut huge = b"POST / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert!(matches!(parse(&huge).await, Err(HttpError::HeadTooLarge)));
    }
}
