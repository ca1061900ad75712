//! Client input before DATA, sans-I/O: the [`LineReader`] that cuts the byte stream into
//! command lines under a length limit (an overlong line is thrown away as it arrives, so
//! memory stays bounded whatever its length), and [`parse`], which turns one line into a
//! command or into the refusal it deserves.
//!
//! Both are fed whatever the socket produced; how the bytes were split across reads never
//! changes the outcome (the tests feed every input whole, byte at a time and split at every
//! offset).

use std::borrow::Cow;

use smtp_proto::Request;

use crate::smtp::line::{LineStatus, find_line, skip_to_lf, trim_line_end};

/// What [`LineReader::next_line`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A complete line, with its line end (CRLF or a bare LF).
    Line(Vec<u8>),
    /// A line over the limit. It is (or will be) discarded up to its LF; the next call
    /// continues after it. `auth` is true when the line was an `AUTH` command, whose
    /// refusal uses a different enhanced code (RFC 4954: 5.5.6).
    TooLong { auth: bool },
    /// No complete line buffered: push more bytes.
    NeedMore,
}

/// Buffers client bytes and hands them out as lines, or as raw bytes for DATA.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    pos: usize,
    /// Inside an overlong line already reported: drop bytes up to and including its LF.
    discarding: bool,
}

/// Compaction threshold: consumed bytes are dropped from the front once this many pile up.
const COMPACT_AT: usize = 16 * 1024;
/// An empty buffer larger than this is given back, so thousands of idle sessions stay small.
const KEEP_WHEN_EMPTY: usize = 4 * 1024;

impl LineReader {
    pub fn new() -> LineReader {
        LineReader::default()
    }

    /// Adds bytes read from the client. While an overlong line is being discarded, its bytes
    /// are dropped here and never buffered.
    pub fn push(&mut self, bytes: &[u8]) {
        let start = self.buffer_for_read(bytes.len()).len();
        self.buf.extend_from_slice(bytes);
        self.appended(start);
    }

    /// The buffer to read the next bytes into, in place, with room for at least `want` more
    /// after what is buffered: the socket's bytes land here directly, not via a copy. Call
    /// [`LineReader::appended`] with the length it had before the read.
    pub fn buffer_for_read(&mut self, want: usize) -> &mut Vec<u8> {
        self.compact();
        self.buf.reserve(want);
        &mut self.buf
    }

    /// Takes in the bytes a read appended after `start` (the buffer's length before it).
    pub fn appended(&mut self, start: usize) {
        if self.discarding && self.pos == start {
            match skip_to_lf(&self.buf[start..]) {
                Some(n) => {
                    self.discarding = false;
                    self.pos += n;
                }
                None => self.buf.truncate(start),
            }
        }
    }

    /// The next command line. `limit` bounds ordinary lines and `auth_limit` lines that
    /// start with `AUTH ` (initial responses), both counting the line end.
    pub fn next_line(&mut self, limit: usize, auth_limit: usize) -> Next {
        if self.discarding {
            match skip_to_lf(self.pending()) {
                Some(n) => {
                    self.pos += n;
                    self.discarding = false;
                }
                None => {
                    self.pos = self.buf.len();
                    return Next::NeedMore;
                }
            }
        }
        let pending = self.pending();
        let auth = starts_with_auth(pending);
        let window = if auth { auth_limit.max(limit) } else { limit };
        match find_line(pending, window) {
            LineStatus::Complete(n) => {
                let line = pending[..n].to_vec();
                self.pos += n;
                Next::Line(line)
            }
            LineStatus::TooLong => {
                // Drop what is buffered of the line now; `push` drops the rest as it comes.
                match skip_to_lf(pending) {
                    Some(n) => self.pos += n,
                    None => {
                        self.pos = self.buf.len();
                        self.discarding = true;
                    }
                }
                Next::TooLong { auth }
            }
            LineStatus::Incomplete => Next::NeedMore,
        }
    }

    /// Bytes received and not consumed yet (pipelined input).
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Marks `n` pending bytes as consumed (DATA reads the buffer directly).
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// Forgets everything buffered (after STARTTLS, where pipelined plaintext must not
    /// survive into the TLS session).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.discarding = false;
    }

    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > KEEP_WHEN_EMPTY {
                // A message went through; an idle session keeps only a small buffer.
                self.buf = Vec::new();
            }
        } else if self.pos >= COMPACT_AT {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

fn starts_with_auth(line: &[u8]) -> bool {
    line.get(..5)
        .is_some_and(|head| head.eq_ignore_ascii_case(b"AUTH "))
}

/// Whether bytes at the start of a connection are a TLS handshake record (a ClientHello):
/// content type 22, protocol major version 3.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x16, 0x03, ..] | [0x16])
}

/// The reply a command line gets when it cannot be run: code, enhanced code, text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: Cow<'static, str>,
}

impl Refusal {
    fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            code,
            enhanced,
            text: text.into(),
        }
    }
}

/// Parses one command line (with its line end) with `smtp-proto`, after the checks that
/// library leaves to us: no NUL bytes, valid UTF-8. A bare-LF line end is accepted for
/// commands (many old clients send one); message content is held to stricter rules.
pub fn parse(line: &[u8]) -> Result<Request<Cow<'_, str>>, Refusal> {
    if line.contains(&0) {
        return Err(Refusal::new(500, "5.5.2", "NUL byte in command line"));
    }
    if std::str::from_utf8(line).is_err() {
        return Err(Refusal::new(
            500,
            "5.5.2",
            "Command line is not valid UTF-8",
        ));
    }
    if !line.ends_with(b"\n") {
        return Err(Refusal::new(500, "5.5.2", "Syntax error"));
    }
    let request = Request::parse(&mut line.iter()).map_err(refusal)?;
    // `smtp-proto` ignores anything after STARTTLS; RFC 3207 section 4 answers it with 501.
    if matches!(request, Request::StartTls)
        && trim_line_end(line).trim_ascii_end().len() != b"STARTTLS".len()
    {
        return Err(Refusal::new(501, "5.5.4", "STARTTLS takes no parameters"));
    }
    Ok(request)
}

fn refusal(e: smtp_proto::Error) -> Refusal {
    use smtp_proto::Error as E;
    match e {
        E::UnknownCommand => Refusal::new(500, "5.5.1", "Command unrecognized"),
        E::SyntaxError { syntax } => Refusal::new(501, "5.5.4", format!("Syntax: {syntax}")),
        E::InvalidSenderAddress => Refusal::new(501, "5.1.7", "Invalid sender address"),
        E::InvalidRecipientAddress => Refusal::new(501, "5.1.3", "Invalid recipient address"),
        E::InvalidParameter { param } => {
            Refusal::new(501, "5.5.4", format!("Invalid parameter {param}"))
        }
        E::UnsupportedParameter { .. } => Refusal::new(555, "5.5.4", "Unsupported parameter"),
        E::NeedsMoreData { .. } | E::ResponseTooLong | E::InvalidResponse { .. } => {
            Refusal::new(500, "5.5.2", "Syntax error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 16;
    const AUTH_LIMIT: usize = 32;

    /// Feeds `chunks` one after another, collecting every event until the reader needs
    /// more; `NeedMore` itself is not recorded.
    fn events<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Next>, Vec<u8>) {
        events_with(chunks, LIMIT)
    }

    fn events_with<'a>(
        chunks: impl IntoIterator<Item = &'a [u8]>,
        limit: usize,
    ) -> (Vec<Next>, Vec<u8>) {
        let mut reader = LineReader::new();
        let mut got = Vec::new();
        for chunk in chunks {
            reader.push(chunk);
            loop {
                match reader.next_line(limit, limit.max(AUTH_LIMIT)) {
                    Next::NeedMore => break,
                    other => got.push(other),
                }
            }
            assert!(
                reader.buf.len() <= limit.max(AUTH_LIMIT) + chunk.len() + COMPACT_AT,
                "memory stays bounded"
            );
        }
        (got, reader.pending().to_vec())
    }

    /// The same input whole, byte at a time and split at every offset must give the same
    /// events; the pending tail may differ only while a line is being discarded.
    fn all_splits(input: &[u8]) -> Vec<Next> {
        let (whole, _) = events([input]);
        let (bytes, _) = events(input.chunks(1));
        assert_eq!(bytes, whole, "byte at a time: {input:?}");
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(events([a, b]).0, whole, "split at {cut}: {input:?}");
        }
        whole
    }

    fn line(s: &str) -> Next {
        Next::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn line_reader_table() {
        let long = "X".repeat(40);
        let auth_ok = format!("AUTH PLAIN {}\r\n", "A".repeat(AUTH_LIMIT - 13));
        let auth_long = format!("AUTH PLAIN {}\r\n", "A".repeat(AUTH_LIMIT));
        let cases: Vec<(String, Vec<Next>)> = vec![
            ("".into(), vec![]),
            ("NOOP".into(), vec![]),
            ("NOOP\r\n".into(), vec![line("NOOP\r\n")]),
            (
                "NOOP\nQUIT\r\n".into(),
                vec![line("NOOP\n"), line("QUIT\r\n")],
            ),
            // Exactly at the limit, and one octet over.
            (
                format!("{}\r\n", "N".repeat(LIMIT - 2)),
                vec![line(&format!("{}\r\n", "N".repeat(LIMIT - 2)))],
            ),
            (
                format!("{}\r\nNOOP\r\n", "N".repeat(LIMIT - 1)),
                vec![Next::TooLong { auth: false }, line("NOOP\r\n")],
            ),
            // A long line is discarded whole, and the next command still works.
            (
                format!("{long}\r\nNOOP\r\n"),
                vec![Next::TooLong { auth: false }, line("NOOP\r\n")],
            ),
            (format!("{long}{long}"), vec![Next::TooLong { auth: false }]),
            // AUTH lines have their own, larger limit.
            (auth_ok.clone(), vec![line(&auth_ok)]),
            (
                format!("{auth_long}QUIT\r\n"),
                vec![Next::TooLong { auth: true }, line("QUIT\r\n")],
            ),
            (
                format!("auth login {long}\r\n"),
                vec![Next::TooLong { auth: true }],
            ),
            // "AUTHX" is not AUTH.
            (
                format!("AUTHX{long}\r\n"),
                vec![Next::TooLong { auth: false }],
            ),
            // Bare CR is content, not a line end.
            ("NO\rOP\r\n".into(), vec![line("NO\rOP\r\n")]),
            ("\r\n\n".into(), vec![line("\r\n"), line("\n")]),
        ];
        for (input, want) in cases {
            assert_eq!(all_splits(input.as_bytes()), want, "input {input:?}");
        }
    }

    #[test]
    fn ten_megabytes_without_a_line_end_stay_bounded() {
        let mut reader = LineReader::new();
        let chunk = vec![b'A'; 16 * 1024];
        let mut reported = 0;
        for _ in 0..640 {
            reader.push(&chunk);
            if reader.next_line(4096, 12_290) == (Next::TooLong { auth: false }) {
                reported += 1;
            }
            assert!(reader.buf.len() <= 2 * chunk.len() + COMPACT_AT);
        }
        assert_eq!(reported, 1, "one refusal per line, however long");
        reader.push(b"\r\nNOOP\r\n");
        assert_eq!(reader.next_line(4096, 12_290), line("NOOP\r\n"));
    }

    #[test]
    fn pending_and_consume_hand_data_to_the_framer() {
        let mut reader = LineReader::new();
        reader.push(b"DATA\r\nSubject: x\r\n");
        assert_eq!(reader.next_line(LIMIT, AUTH_LIMIT), line("DATA\r\n"));
        assert_eq!(reader.pending(), b"Subject: x\r\n");
        reader.consume(9);
        assert_eq!(reader.pending(), b"x\r\n");
        reader.consume(100);
        assert_eq!(reader.pending(), b"");
        reader.push(b"STARTTLS\r\nRSET\r\n");
        assert_eq!(reader.next_line(LIMIT, AUTH_LIMIT), line("STARTTLS\r\n"));
        assert_eq!(reader.pending(), b"RSET\r\n");
        reader.clear();
        assert_eq!(reader.next_line(LIMIT, AUTH_LIMIT), Next::NeedMore);
    }

    #[test]
    fn reads_land_in_place_and_an_emptied_buffer_shrinks() {
        let mut reader = LineReader::new();
        let message = vec![b'x'; 64 * 1024];
        let buf = reader.buffer_for_read(message.len());
        let start = buf.len();
        buf.extend_from_slice(&message);
        reader.appended(start);
        assert_eq!(reader.pending().len(), message.len());
        reader.consume(message.len());
        // The next read starts from a small buffer again.
        assert!(reader.buffer_for_read(16).capacity() <= KEEP_WHEN_EMPTY);
        // While an overlong line is thrown away, bytes read in place are dropped up to its
        // LF, just as pushed ones are.
        reader.push(&vec![b'A'; 5000]);
        assert_eq!(
            reader.next_line(LIMIT, AUTH_LIMIT),
            Next::TooLong { auth: false }
        );
        let buf = reader.buffer_for_read(16);
        let start = buf.len();
        buf.extend_from_slice(b"AAAA\r\nNOOP\r\n");
        reader.appended(start);
        assert_eq!(reader.next_line(LIMIT, AUTH_LIMIT), line("NOOP\r\n"));
    }

    #[test]
    fn tls_detection_table() {
        let cases: &[(&[u8], bool)] = &[
            (b"\x16\x03\x01\x02\x00\x01", true),
            (b"\x16", true),
            (b"\x16\x02", false),
            (b"EHLO x\r\n", false),
            (b"", false),
        ];
        for (bytes, want) in cases {
            assert_eq!(looks_like_tls(bytes), *want, "{bytes:?}");
        }
    }

    /// Parses the line fed through the reader whole, byte at a time and split everywhere.
    fn parse_all_splits(input: &[u8]) -> Result<String, (u16, &'static str)> {
        let (lines, _) = events_with([input], 512);
        assert_eq!(events_with(input.chunks(1), 512).0, lines, "bytewise");
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(events_with([a, b], 512).0, lines, "split at {cut}");
        }
        let [Next::Line(line)] = lines.as_slice() else {
            panic!("one line expected from {input:?}, got {lines:?}");
        };
        parse(line)
            .map(|r| r.name().to_string())
            .map_err(|r| (r.code, r.enhanced))
    }

    #[test]
    fn parse_table() {
        type Want = Result<&'static str, (u16, &'static str)>;
        let cases: &[(&[u8], Want)] = &[
            (b"EHLO client.test\r\n", Ok("EHLO")),
            (b"ehlo client.test\n", Ok("EHLO")),
            (b"HELO x\r\n", Ok("HELO")),
            (b"MAIL FROM:<a@b.c>\r\n", Ok("MAIL")),
            (b"MAIL FROM:<>\r\n", Ok("MAIL")),
            (b"MAIL FROM:<a@b.c> SIZE=100 BODY=8BITMIME\r\n", Ok("MAIL")),
            (b"MAIL FROM:<a@b.c> RET=HDRS ENVID=QQ314159\r\n", Ok("MAIL")),
            (
                "MAIL FROM:<grüße@exämple.test> SMTPUTF8\r\n".as_bytes(),
                Ok("MAIL"),
            ),
            (
                b"RCPT TO:<x@y.z> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.z\r\n",
                Ok("RCPT"),
            ),
            (b"DATA\r\n", Ok("DATA")),
            (b"RSET\r\n", Ok("RSET")),
            (b"NOOP\r\n", Ok("NOOP")),
            (b"QUIT\r\n", Ok("QUIT")),
            (b"STARTTLS\r\n", Ok("STARTTLS")),
            (b"starttls \r\n", Ok("STARTTLS")),
            (b"STARTTLS now\r\n", Err((501, "5.5.4"))),
            (b"AUTH PLAIN AGEAYg==\r\n", Ok("AUTH")),
            (b"BDAT 10 LAST\r\n", Ok("BDAT")),
            (b"FOO bar\r\n", Err((500, "5.5.1"))),
            (b"\r\n", Err((500, "5.5.1"))),
            (b"MA\0IL FROM:<a@b.c>\r\n", Err((500, "5.5.2"))),
            (b"MAIL FROM:<a\xff@b.c>\r\n", Err((500, "5.5.2"))),
            (b"MAIL TO:<a@b.c>\r\n", Err((501, "5.5.4"))),
            (b"MAIL FROM:a@b.c\r\n", Err((501, "5.5.4"))),
            // The provider judges an empty forward-path; the grammar allows the brackets.
            (b"RCPT TO:<>\r\n", Ok("RCPT")),
            (b"RCPT TO:<a b>\r\n", Err((501, "5.1.3"))),
            (b"EHLO\r\n", Err((501, "5.5.4"))),
        ];
        for (input, want) in cases {
            let got = parse_all_splits(input);
            let got = got.as_ref().map(String::as_str).map_err(|e| *e);
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(input));
        }
    }
}
