//! The legacy client's side of a session: its socket (plain or TLS, swapped in place by
//! STARTTLS), the bytes read from it, the replies queued for it, and the clocks that bound
//! how long it may take.
//!
//! Two clocks apply. Each wait has its own deadline: a whole command line must arrive within
//! `timeouts.client_idle` (a client trickling one byte at a time does not reset it), and
//! during DATA each read must. And the whole connection has `timeouts.session`, so no client
//! can hold a connection slot forever, however busy it keeps it.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::io::Stream;
use crate::server::Lifecycle;
use crate::smtp::command::{LineReader, Next};

/// Room for one read while waiting for commands: a pipelined group fits, and an idle
/// session holds no more than this.
const COMMAND_READ: usize = 1024;
/// Room for one read of message data: the largest TLS record, so a read takes a whole one.
const DATA_READ: usize = 16 * 1024;

/// Why the conversation with the client is over, other than a normal QUIT.
#[derive(Debug, thiserror::Error)]
pub enum End {
    #[error("client closed the connection")]
    Closed,
    #[error("client idle for {}", crate::upstream::human(*.0))]
    Idle(Duration),
    #[error("session time limit of {} reached", crate::upstream::human(*.0))]
    SessionLimit(Duration),
    #[error("client connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("client sent a TLS handshake to a plaintext port")]
    TlsOnPlaintextPort,
    #[error("TLS handshake with the client failed: {0}")]
    TlsHandshake(String),
    #[error("session closed after QUIT or a fatal reply")]
    Done,
    #[error("the bridge is shutting down")]
    ShuttingDown,
}

/// What reading a command line produced.
pub enum Input {
    Line(Vec<u8>),
    TooLong { auth: bool },
}

pub struct Client {
    /// `None` only while STARTTLS swaps the stream.
    stream: Option<Stream>,
    reader: LineReader,
    out: Vec<u8>,
    idle: Duration,
    session_limit: Duration,
    session_deadline: Instant,
    /// Nothing read yet on a plaintext connection: the first bytes are checked for a TLS
    /// handshake from a client pointed at the wrong port.
    first_read: bool,
    /// Where the bridge is in its life: a drain or stop must not wait for a quiet client.
    lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
}

impl Client {
    pub fn new(
        stream: Stream,
        idle: Duration,
        session_limit: Duration,
        lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
    ) -> Client {
        let first_read = !stream.is_tls();
        Client {
            stream: Some(stream),
            reader: LineReader::new(),
            out: Vec::new(),
            idle,
            session_limit,
            session_deadline: Instant::now() + session_limit,
            first_read,
            lifecycle,
        }
    }

    /// While draining, a session may finish its transaction but starts nothing new; once the
    /// grace period is over it stops whatever it is doing.
    pub fn refusing_new_work(&self, in_transaction: bool) -> bool {
        match *self.lifecycle.borrow() {
            Lifecycle::Serving => false,
            Lifecycle::Draining => !in_transaction,
            Lifecycle::Stopping => true,
        }
    }

    /// Tells the client the bridge is going away (RFC 5321 allows 421 at any time).
    pub fn shutting_down(&mut self) -> End {
        self.out
            .extend_from_slice(b"421 4.3.2 Service shutting down, try again later\r\n");
        End::ShuttingDown
    }

    pub fn is_tls(&self) -> bool {
        self.stream.as_ref().is_some_and(Stream::is_tls)
    }

    /// Queues bytes (a serialised reply) for the client.
    pub fn queue(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Bytes received and not consumed yet.
    pub fn pending(&self) -> &[u8] {
        self.reader.pending()
    }

    pub fn consume(&mut self, n: usize) {
        self.reader.consume(n);
    }

    /// The next command line, waiting at most `client_idle` for all of it. `in_transaction`
    /// says whether a drain lets this wait go on.
    pub async fn read_line(
        &mut self,
        limit: usize,
        auth_limit: usize,
        in_transaction: bool,
    ) -> Result<Input, End> {
        let deadline = Instant::now() + self.idle;
        loop {
            match self.reader.next_line(limit, auth_limit) {
                Next::Line(line) => return Ok(Input::Line(line)),
                Next::TooLong { auth } => return Ok(Input::TooLong { auth }),
                Next::NeedMore => self.fill(deadline, in_transaction, COMMAND_READ).await?,
            }
        }
    }

    /// More message bytes during DATA, waiting at most `client_idle` for them.
    pub async fn fill_data(&mut self) -> Result<(), End> {
        let deadline = Instant::now() + self.idle;
        self.fill(deadline, true, DATA_READ).await
    }

    /// Sends queued replies; a client that does not take them within `client_idle` is gone.
    pub async fn flush(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(End::Closed);
        };
        let write = async {
            stream.write_all(&self.out).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.idle, write).await {
            Err(_) => return Err(End::Idle(self.idle)),
            Ok(r) => r?,
        }
        self.out.clear();
        Ok(())
    }

    /// Reads more bytes, flushing pending replies first so a waiting client is never left
    /// without its answers. On a timeout the client hears 421 before the close.
    async fn fill(
        &mut self,
        deadline: Instant,
        in_transaction: bool,
        want: usize,
    ) -> Result<(), End> {
        self.flush().await?;
        if self.refusing_new_work(in_transaction) {
            return Err(self.shutting_down());
        }
        let session_over = deadline >= self.session_deadline;
        let deadline = deadline.min(self.session_deadline);
        let Some(stream) = self.stream.as_mut() else {
            return Err(End::Closed);
        };
        let buf = self.reader.buffer_for_read(want);
        let start = buf.len();
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => Some(read),
            _ = wait_for_stop(&mut self.lifecycle, in_transaction) => None,
        };
        let Some(read) = read else {
            return Err(self.shutting_down());
        };
        match read {
            Err(_) if session_over => {
                self.goodbye(b"421 4.4.2 Session time limit reached, closing connection\r\n")
                    .await;
                return Err(End::SessionLimit(self.session_limit));
            }
            Err(_) => {
                self.goodbye(b"421 4.4.2 Idle too long, closing connection\r\n")
                    .await;
                return Err(End::Idle(self.idle));
            }
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(0)) => return Err(End::Closed),
            Ok(Ok(_)) => {}
        }
        // Nothing was buffered before the first read, so what is pending is what it brought.
        if std::mem::take(&mut self.first_read)
            && crate::smtp::command::looks_like_tls(self.reader.pending())
        {
            return Err(End::TlsOnPlaintextPort);
        }
        self.reader.appended(start);
        Ok(())
    }

    /// A last line before closing; a client that does not take it promptly does not get it.
    async fn goodbye(&mut self, line: &[u8]) {
        self.out.extend_from_slice(line);
        let limit = self.idle.min(Duration::from_secs(5));
        let _ = tokio::time::timeout(limit, self.flush()).await;
    }

    /// Turns the plain connection into TLS (after the 220 to STARTTLS has been flushed).
    /// Anything buffered is dropped first: it arrived in clear and must never be taken as
    /// sent inside TLS (the caller refuses the session if there was any).
    pub async fn start_tls(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        limit: Duration,
    ) -> Result<(), End> {
        self.reader.clear();
        let Some(Stream::Tcp(tcp)) = self.stream.take() else {
            return Err(End::TlsHandshake("the connection is already TLS".into()));
        };
        match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.stream = Some(Stream::ServerTls(Box::new(tls)));
                Ok(())
            }
            Ok(Err(e)) => Err(End::TlsHandshake(e.to_string())),
            Err(_) => Err(End::TlsHandshake(format!(
                "timed out after {}s",
                limit.as_secs_f32()
            ))),
        }
    }

    /// Closes the connection politely (TLS close_notify where there is TLS).
    pub async fn shutdown(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.shutdown()).await;
        }
    }
}

/// Completes when the session must stop waiting for its client: at `Stopping`, or at
/// `Draining` when no transaction is open. Pending forever otherwise.
async fn wait_for_stop(
    lifecycle: &mut tokio::sync::watch::Receiver<Lifecycle>,
    in_transaction: bool,
) {
    let stop = |state: &Lifecycle| match state {
        Lifecycle::Serving => false,
        Lifecycle::Draining => !in_transaction,
        Lifecycle::Stopping => true,
    };
    if lifecycle.wait_for(stop).await.is_err() {
        // The bridge is gone; its drain aborts this session anyway.
        std::future::pending::<()>().await;
    }
}
