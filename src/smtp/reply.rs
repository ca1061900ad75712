//! SMTP replies (RFC 5321 section 4.2): the [`Reply`] value, its wire
//! serialisation, RFC 3463 enhanced status codes, and a bounded incremental
//! parser for replies read from the upstream server.

use memchr::memchr;
use thiserror::Error;

use crate::smtp::line::{LineStatus, find_line, trim_line_end};

mod wrap;

/// Longest accepted reply line in octets, including its line end. RFC 5321
/// allows 512; real servers exceed that, so we are generous but bounded.
pub const MAX_REPLY_LINE: usize = 4096;
/// Longest accepted reply in octets, all lines and line ends included.
pub const MAX_REPLY_TOTAL: usize = 65536;
/// Most lines accepted in one reply.
pub const MAX_REPLY_LINES: usize = 256;
/// Longest reply line RFC 5321 (section 4.5.3.1.5) lets a server send, CRLF included.
pub const MAX_WIRE_REPLY_LINE: usize = 512;

/// An SMTP reply: a code and one or more lines of text.
///
/// Line text is kept as raw bytes without the "ddd-"/"ddd " prefix and
/// without the line end, so a multi-line upstream reply can be relayed
/// exactly, whatever its encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    lines: Vec<Vec<u8>>,
}

/// Why bytes from a peer could not be parsed as a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplyError {
    /// A line does not start with a three-digit code in 200..=599 followed
    /// by ' ', '-' or the line end.
    #[error("malformed reply line")]
    Malformed,
    /// Lines of one reply carry different codes.
    #[error("inconsistent codes within one reply")]
    InconsistentCode,
    /// A line, the whole reply, or the number of lines exceeds our limits.
    #[error("reply too long")]
    TooLong,
}

impl Reply {
    /// A single-line reply, e.g. `Reply::new(250, "2.0.0 OK")`.
    pub fn new(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![text.as_bytes().to_vec()],
        }
    }

    /// A reply with the given lines (possibly none).
    pub fn multi(code: u16, lines: impl IntoIterator<Item = impl Into<Vec<u8>>>) -> Reply {
        Reply {
            code,
            lines: lines.into_iter().map(Into::into).collect(),
        }
    }

    pub fn code(&self) -> u16 {
        self.code
    }

    pub fn lines(&self) -> &[Vec<u8>] {
        &self.lines
    }

    /// 2xx.
    pub fn is_positive_completion(&self) -> bool {
        self.code / 100 == 2
    }

    /// 3xx.
    pub fn is_positive_intermediate(&self) -> bool {
        self.code / 100 == 3
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        self.code / 100 == 4
    }

    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code / 100 == 5
    }

    /// The RFC 3463 enhanced status code starting the first line, if any.
    ///
    /// Only accepted when well formed (`class.subject.detail`, one to three
    /// digits each) and when its class matches the reply code, because a
    /// mismatch means the text merely happens to start with digits.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let end = memchr(b' ', first).unwrap_or(first.len());
        let token = &first[..end];
        let class_digit = match self.code / 100 {
            2 => b'2',
            4 => b'4',
            5 => b'5',
            _ => return None,
        };
        let mut parts = token.split(|&b| b == b'.');
        let (Some(class), Some(subject), Some(detail), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let is_num = |p: &[u8]| (1..=3).contains(&p.len()) && p.iter().all(u8::is_ascii_digit);
        if class != [class_digit] || !is_num(subject) || !is_num(detail) {
            return None;
        }
        // All ASCII by the checks above, so this cannot fail.
        std::str::from_utf8(token).ok()
    }

    /// All lines joined by a single space, lossily decoded; for logs only.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(&String::from_utf8_lossy(line));
        }
        s
    }

    /// Appends the wire form of the reply to `out`.
    ///
    /// CR and LF inside line text become spaces: text may come from a peer
    /// or from configuration, and must never be able to end a line early and
    /// inject a reply of its own. A reply without lines is written as
    /// "ddd \r\n". Codes above 999 are written as 999 so the output always
    /// has exactly three digits.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = self.code.min(999);
        let digits = [
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ];
        if self.lines.is_empty() {
            out.extend_from_slice(&digits);
            out.extend_from_slice(b" \r\n");
            return;
        }
        let last = self.lines.len() - 1;
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(&digits);
            out.push(if i == last { b' ' } else { b'-' });
            out.extend(line.iter().map(|&b| match b {
                b'\r' | b'\n' => b' ',
                other => other,
            }));
            out.extend_from_slice(b"\r\n");
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

/// Parses one complete reply from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the reply and the number
/// of bytes it occupied (final line end included). Lines may end in CRLF or a
/// bare LF. Limits are enforced on incomplete data too, so a peer that never
/// finishes a reply cannot make the caller buffer without bound; and every
/// prefix of an input yields either `Ok(None)` or the result of the whole
/// input, so the outcome never depends on how reads were split.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    // Validate first without allocating: callers re-parse a growing buffer
    // after every read and most calls end in `Ok(None)`.
    let Some((code, consumed, count)) = scan_reply(buf)? else {
        return Ok(None);
    };
    let mut lines = Vec::with_capacity(count);
    let mut rest = &buf[..consumed];
    while let Some(n) = crate::smtp::line::skip_to_lf(rest) {
        let content = trim_line_end(&rest[..n]);
        lines.push(content.get(4..).unwrap_or_default().to_vec());
        rest = &rest[n..];
    }
    Ok(Some((Reply { code, lines }, consumed)))
}

/// Finds the end of the first reply: `(code, bytes consumed, line count)`.
fn scan_reply(buf: &[u8]) -> Result<Option<(u16, usize, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut count = 0;
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let limit = MAX_REPLY_LINE.min(MAX_REPLY_TOTAL.saturating_sub(pos));
        // Judge the code of an incomplete line as soon as its first bytes
        // are in, so garbage is rejected without waiting for a line end. The
        // head is cut at `limit` so the verdict is the same however the
        // input is split.
        let head = &rest[..rest.len().min(4).min(limit)];
        if memchr(b'\n', head).is_none() {
            check_partial(head, code)?;
        }
        match find_line(rest, limit) {
            LineStatus::Incomplete => return Ok(None),
            LineStatus::TooLong => return Err(ReplyError::TooLong),
            LineStatus::Complete(n) => {
                let (line_code, last) = check_complete(trim_line_end(&rest[..n]), code)?;
                code = Some(line_code);
                count += 1;
                pos += n;
                if last {
                    return Ok(Some((line_code, pos, count)));
                }
                if count >= MAX_REPLY_LINES {
                    return Err(ReplyError::TooLong);
                }
            }
        }
    }
}

/// Checks what is present of a line that may still grow. Every check here
/// also fails for any longer version of the line, with the same error.
fn check_partial(head: &[u8], expected: Option<u16>) -> Result<(), ReplyError> {
    let digits = head.iter().take(3);
    if !digits.clone().all(u8::is_ascii_digit) {
        return Err(ReplyError::Malformed);
    }
    if let [a, b, c, ..] = head {
        let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
        if !(200..=599).contains(&code) {
            return Err(ReplyError::Malformed);
        }
        if expected.is_some_and(|e| e != code) {
            return Err(ReplyError::InconsistentCode);
        }
    }
    // A CR here may still turn out to be the line end.
    match head.get(3) {
        None | Some(b' ' | b'-' | b'\r') => Ok(()),
        Some(_) => Err(ReplyError::Malformed),
    }
}

/// Checks a whole line (line end removed); returns its code and whether it
/// is the last line of the reply.
fn check_complete(content: &[u8], expected: Option<u16>) -> Result<(u16, bool), ReplyError> {
    // Same checks in the same order as for a partial line, so both paths
    // report the same error for the same bytes.
    check_partial(content, expected)?;
    let [a, b, c, rest @ ..] = content else {
        return Err(ReplyError::Malformed);
    };
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    match rest.first() {
        None | Some(b' ') => Ok((code, true)),
        Some(b'-') => Ok((code, false)),
        // Only a CR that ends the line is a line end; this one is not.
        Some(_) => Err(ReplyError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Expected = Result<Option<(u16, &'static [&'static [u8]], usize)>, ReplyError>;

    /// Parses `input` whole and checks that every prefix gives either
    /// "need more" or the same answer, as happens when a reply arrives in
    /// several reads.
    fn check(input: &[u8], want: &Expected) {
        let got = parse_reply(input);
        let want_mapped = (*want).map(|o| {
            o.map(|(code, lines, used)| (Reply::multi(code, lines.iter().copied()), used))
        });
        assert_eq!(got, want_mapped, "input {input:?}");
        for cut in 0..input.len() {
            let part = parse_reply(&input[..cut]);
            match (&part, &got) {
                (Ok(None), _) => {}
                (Ok(Some((_, used))), Ok(Some(_))) if *used <= cut => assert_eq!(part, got),
                (Err(_), Err(_)) => assert_eq!(part, got, "prefix {cut} of {input:?}"),
                _ => panic!("prefix {cut} of {input:?} gave {part:?}, whole gave {got:?}"),
            }
        }
    }

    #[test]
    fn parse_table() {
        use ReplyError::*;
        let cases: &[(&[u8], Expected)] = &[
            (b"250 OK\r\n", Ok(Some((250, &[b"OK"], 8)))),
            (b"250 OK\n", Ok(Some((250, &[b"OK"], 7)))),
            (b"250\r\n", Ok(Some((250, &[b""], 5)))),
            (b"250 \r\n", Ok(Some((250, &[b""], 6)))),
            (
                b"250-mx.example.com\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
                Ok(Some((
                    250,
                    &[b"mx.example.com", b"PIPELINING", b"SIZE 1000"],
                    51,
                ))),
            ),
            (b"250-a\n250 b\n", Ok(Some((250, &[b"a", b"b"], 12)))),
            (b"250-\r\n250\r\n", Ok(Some((250, &[b"", b""], 11)))),
            (b"250-a\r\n250 b\r\n", Ok(Some((250, &[b"a", b"b"], 14)))),
            // Pipelined replies: only the first is consumed.
            (b"250 a\r\n354 go\r\n", Ok(Some((250, &[b"a"], 7)))),
            // Non-UTF-8 text and inner CRs are kept exactly.
            (b"550 \xff\xfe x\r\n", Ok(Some((550, &[b"\xff\xfe x"], 10)))),
            (b"550 a\rb\r\n", Ok(Some((550, &[b"a\rb"], 9)))),
            (
                b"535 5.7.8 bad\r\r\n",
                Ok(Some((535, &[b"5.7.8 bad\r"], 16))),
            ),
            // Incomplete.
            (b"", Ok(None)),
            (b"2", Ok(None)),
            (b"250", Ok(None)),
            (b"250\r", Ok(None)),
            (b"250 OK", Ok(None)),
            (b"250 OK\r", Ok(None)),
            (b"250-a\r\n", Ok(None)),
            (b"250-a\r\n25", Ok(None)),
            // Malformed.
            (b"\r\n", Err(Malformed)),
            (b"\n", Err(Malformed)),
            (b"25\r\n", Err(Malformed)),
            (b"2x0 OK\r\n", Err(Malformed)),
            (b"x", Err(Malformed)),
            (b" 250 OK\r\n", Err(Malformed)),
            (b"250x\r\n", Err(Malformed)),
            (b"250OK\r\n", Err(Malformed)),
            (b"250\rX\r\n", Err(Malformed)),
            (b"199 no\r\n", Err(Malformed)),
            (b"600 no\r\n", Err(Malformed)),
            (b"000 no\r\n", Err(Malformed)),
            (b"250-a\r\nxyz\r\n", Err(Malformed)),
            (b"250-a\r\n\r\n", Err(Malformed)),
            // Inconsistent codes.
            (b"250-a\r\n251 b\r\n", Err(InconsistentCode)),
            (b"250-a\r\n550", Err(InconsistentCode)),
        ];
        for (input, want) in cases {
            check(input, want);
        }
    }

    #[test]
    fn line_length_limit() {
        let text_max = MAX_REPLY_LINE - "250 \r\n".len();
        let mut ok = b"250 ".to_vec();
        ok.extend(std::iter::repeat_n(b'x', text_max));
        ok.extend_from_slice(b"\r\n");
        let (reply, used) = parse_reply(&ok).unwrap().unwrap();
        assert_eq!((reply.lines()[0].len(), used), (text_max, ok.len()));

        let mut long = b"250 ".to_vec();
        long.extend(std::iter::repeat_n(b'x', text_max + 1));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&long), Err(ReplyError::TooLong));
        // Without any line end at all we must not wait forever.
        assert_eq!(
            parse_reply(&long[..MAX_REPLY_LINE]),
            Err(ReplyError::TooLong)
        );
        assert_eq!(parse_reply(&long[..MAX_REPLY_LINE - 1]), Ok(None));
    }

    #[test]
    fn line_count_limit() {
        let mut buf = Vec::new();
        for _ in 0..MAX_REPLY_LINES - 1 {
            buf.extend_from_slice(b"250-x\r\n");
        }
        let mut ok = buf.clone();
        ok.extend_from_slice(b"250 x\r\n");
        let (reply, used) = parse_reply(&ok).unwrap().unwrap();
        assert_eq!((reply.lines().len(), used), (MAX_REPLY_LINES, ok.len()));

        buf.extend_from_slice(b"250-x\r\n");
        assert_eq!(parse_reply(&buf), Err(ReplyError::TooLong));
    }

    #[test]
    fn total_size_limit() {
        // 100 lines of 1000 bytes fit the line count and line length
        // limits but not the total.
        let mut line = b"250-".to_vec();
        line.extend(std::iter::repeat_n(b'y', 994));
        line.extend_from_slice(b"\r\n");
        let mut buf = Vec::new();
        for _ in 0..100 {
            buf.extend_from_slice(&line);
        }
        assert_eq!(parse_reply(&buf), Err(ReplyError::TooLong));
        // And the verdict is reached as soon as the budget is exhausted.
        assert_eq!(
            parse_reply(&buf[..MAX_REPLY_TOTAL]),
            Err(ReplyError::TooLong)
        );
        assert_eq!(parse_reply(&buf[..MAX_REPLY_TOTAL - 1]), Ok(None));
    }

    #[test]
    fn prefix_consistency_on_generated_input() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let alphabet = b"2505 -\r\nx";
        for _ in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let mut input = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                input.push(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            let whole = parse_reply(&input);
            for cut in 0..input.len() {
                let part = parse_reply(&input[..cut]);
                match (&part, &whole) {
                    (Ok(None), _) => {}
                    _ => assert_eq!(part, whole, "prefix {cut} of {input:?}"),
                }
            }
        }
    }

    #[test]
    fn serialise_table() {
        let cases: &[(Reply, &[u8])] = &[
            (Reply::new(250, "2.0.0 OK"), b"250 2.0.0 OK\r\n"),
            (Reply::new(354, ""), b"354 \r\n"),
            (
                Reply::multi(250, ["mx", "PIPELINING", "AUTH PLAIN"]),
                b"250-mx\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n",
            ),
            (Reply::multi(221, Vec::<Vec<u8>>::new()), b"221 \r\n"),
            // Injection attempts are flattened into one line.
            (Reply::new(550, "no\r\n250 OK"), b"550 no  250 OK\r\n"),
            (Reply::new(550, "a\rb\nc"), b"550 a b c\r\n"),
            (
                Reply::multi(451, [b"\xff".to_vec(), b"x\n".to_vec()]),
                b"451-\xff\r\n451 x \r\n",
            ),
            (Reply::new(42, "odd"), b"042 odd\r\n"),
            (Reply::new(2500, "odd"), b"999 odd\r\n"),
        ];
        for (reply, want) in cases {
            assert_eq!(reply.to_bytes(), *want, "{reply:?}");
            let mut out = b"prefix".to_vec();
            reply.write_to(&mut out);
            assert_eq!(&out[6..], *want);
        }
    }

    #[test]
    fn round_trip() {
        let replies = [
            Reply::new(250, "2.0.0 OK"),
            Reply::multi(250, ["a", "b", ""]),
            Reply::multi(535, [b"5.7.8 \xc3\xa9\xff".to_vec()]),
        ];
        for reply in replies {
            let bytes = reply.to_bytes();
            assert_eq!(parse_reply(&bytes), Ok(Some((reply, bytes.len()))));
        }
    }

    #[test]
    fn classification() {
        let cases = [
            (220, [true, false, false, false]),
            (354, [false, true, false, false]),
            (421, [false, false, true, false]),
            (554, [false, false, false, true]),
        ];
        for (code, want) in cases {
            let r = Reply::new(code, "x");
            let got = [
                r.is_positive_completion(),
                r.is_positive_intermediate(),
                r.is_transient(),
                r.is_permanent(),
            ];
            assert_eq!(got, want, "{code}");
            assert_eq!(r.code(), code);
        }
    }

    #[test]
    fn enhanced_table() {
        let cases: &[(u16, &[u8], Option<&str>)] = &[
            (250, b"2.0.0 OK", Some("2.0.0")),
            (250, b"2.1.5", Some("2.1.5")),
            (550, b"5.7.3 denied", Some("5.7.3")),
            (451, b"4.123.456 x", Some("4.123.456")),
            (550, b"4.7.3 class mismatch", None),
            (550, b"5.1234.1 x", None),
            (550, b"5.1. x", None),
            (550, b"5..1 x", None),
            (550, b"5.1.1.1 x", None),
            (550, b"5.1.1x y", None),
            (550, b"55.1.1 x", None),
            (550, b"denied", None),
            (550, b"", None),
            (354, b"3.0.0 go", None),
        ];
        for (code, line, want) in cases {
            let r = Reply::multi(*code, [line.to_vec(), b"5.0.0 second".to_vec()]);
            assert_eq!(r.enhanced(), *want, "{code} {line:?}");
        }
        assert_eq!(Reply::multi(250, Vec::<Vec<u8>>::new()).enhanced(), None);
    }

    #[test]
    fn text_table() {
        let cases: &[(Reply, &str)] = &[
            (Reply::new(250, "OK"), "OK"),
            (Reply::multi(250, ["a", "b c"]), "a b c"),
            (Reply::multi(250, [b"\xff".to_vec()]), "\u{fffd}"),
            (Reply::multi(250, Vec::<Vec<u8>>::new()), ""),
        ];
        for (reply, want) in cases {
            assert_eq!(reply.text(), *want);
        }
    }
}
