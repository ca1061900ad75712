//! Buffered, bounded, timed I/O for the sandbox SMTP server: command lines, raw byte counts
//! (BDAT) and replies, over plain TCP or TLS alike.
//!
//! The read buffer is explicit so pipelined input is processed in order, and so the bytes
//! left over when STARTTLS switches to TLS can be seen and thrown away.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) enum WireError {
    /// The peer closed the connection (or reset it).
    Closed,
    /// Nothing arrived, or nothing could be written, within the idle timeout.
    Timeout,
    /// A line longer than the limit. `resynced` says whether the whole line was consumed,
    /// so the session can go on; otherwise no line end was found within the limit.
    LineTooLong { resynced: bool },
}

pub(crate) struct Wire<S> {
    stream: S,
    buf: Vec<u8>,
    idle: Duration,
    /// The last line came whole from bytes already buffered, without reading the socket.
    buffered: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub(crate) fn new(stream: S, idle: Duration) -> Wire<S> {
        Wire {
            stream,
            buf: Vec::new(),
            idle,
            buffered: false,
        }
    }

    /// The stream and whatever input was buffered but not consumed.
    pub(crate) fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Read one line ending in LF (a preceding CR is dropped too), at most `limit` bytes
    /// including the line end.
    pub(crate) async fn read_line(&mut self, limit: usize) -> Result<Vec<u8>, WireError> {
        let mut scanned = 0;
        self.buffered = !self.buf.is_empty();
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                if line.len() > limit {
                    return Err(WireError::LineTooLong { resynced: true });
                }
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() >= limit {
                return Err(WireError::LineTooLong { resynced: false });
            }
            scanned = self.buf.len();
            self.buffered = false;
            self.read_more().await?;
        }
    }

    /// Whether the last line was already buffered when it was asked for: it arrived with the
    /// line before it, so its sender did not wait for a reply in between.
    pub(crate) fn line_was_buffered(&self) -> bool {
        self.buffered
    }

    /// Move buffered input (or, if none, the next read from the socket) to the end of `out`.
    pub(crate) async fn read_into(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        if self.buf.is_empty() {
            self.read_more().await?;
        }
        out.append(&mut self.buf);
        Ok(())
    }

    /// Consume exactly `count` bytes, appending them to `sink` when one is given. `on_chunk`
    /// sees the running total after each piece and may stop early by returning false.
    pub(crate) async fn read_exact_into(
        &mut self,
        count: u64,
        mut sink: Option<&mut Vec<u8>>,
        mut on_chunk: impl FnMut(u64) -> bool,
    ) -> Result<bool, WireError> {
        let mut remaining = count;
        while remaining > 0 {
            if self.buf.is_empty() {
                self.read_more().await?;
            }
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            if let Some(sink) = sink.as_deref_mut() {
                sink.extend_from_slice(&self.buf[..take]);
            }
            self.buf.drain(..take);
            remaining -= take as u64;
            if !on_chunk(count - remaining) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Put bytes back in front of the buffer (input that followed an end-of-data marker).
    pub(crate) fn unread(&mut self, mut bytes: Vec<u8>) {
        bytes.append(&mut self.buf);
        self.buf = bytes;
    }

    /// Write and flush, within the idle timeout.
    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.idle, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WireError::Closed),
            Err(_) => Err(WireError::Timeout),
        }
    }

    /// Close the write side (TLS close_notify, then FIN), giving up after a short while.
    pub(crate) async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    async fn read_more(&mut self) -> Result<(), WireError> {
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let read = tokio::time::timeout(self.idle, self.stream.read(&mut self.buf[start..])).await;
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
            Err(_) => {
                self.buf.truncate(start);
                return Err(WireError::Timeout);
            }
        };
        self.buf.truncate(start + n);
        if n == 0 {
            return Err(WireError::Closed);
        }
        Ok(())
    }
}

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_and_limits() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut wire = Wire::new(server, Duration::from_secs(5));
        client
            .write_all(b"EHLO a\r\nNOOP\n0123456789\r\nrest")
            .await
            .unwrap();
        assert_eq!(wire.read_line(100).await.unwrap(), b"EHLO a");
        assert_eq!(wire.read_line(100).await.unwrap(), b"NOOP");
        assert!(matches!(
            wire.read_line(5).await,
            Err(WireError::LineTooLong { resynced: true })
        ));
        assert!(matches!(
            wire.read_line(4).await,
            Err(WireError::LineTooLong { resynced: false })
        ));
        let mut out = Vec::new();
        assert!(
            wire.read_exact_into(4, Some(&mut out), |_| true)
                .await
                .unwrap()
        );
        assert_eq!(out, b"rest");
        drop(client);
        assert!(matches!(wire.read_line(100).await, Err(WireError::Closed)));
    }
}
