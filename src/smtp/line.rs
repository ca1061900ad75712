//! Line framing helpers shared by the command reader and the reply parser:
//! locating the end of a line in a buffer, bounding how long a line may grow,
//! and skipping the remainder of a line that was rejected as too long.

use memchr::memchr;

/// Outcome of looking for a line end in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStatus {
    /// A line of this many bytes, including its terminating LF, starts the buffer.
    Complete(usize),
    /// No LF yet, but the buffer is still within the limit: read more.
    Incomplete,
    /// No LF within the first `limit` bytes: the line can never become
    /// acceptable, so the caller should reject it instead of buffering more.
    TooLong,
}

/// Looks for the first LF in `buf`.
///
/// `limit` bounds the line length including the LF, so `Complete(n)` always
/// has `n <= limit`. Only the first `limit` bytes are searched: whether a line
/// is too long must not depend on how much extra data happened to arrive in
/// the same read. A `limit` of 0 makes every line too long.
pub fn find_line(buf: &[u8], limit: usize) -> LineStatus {
    let window = &buf[..buf.len().min(limit)];
    match memchr(b'\n', window) {
        Some(i) => LineStatus::Complete(i + 1),
        None if buf.len() >= limit => LineStatus::TooLong,
        None => LineStatus::Incomplete,
    }
}

/// Strips one trailing "\r\n" or "\n".
///
/// Only a CR directly before the final LF is part of the line end; a CR
/// elsewhere is content and is left for the caller to judge.
pub fn trim_line_end(line: &[u8]) -> &[u8] {
    match line {
        [rest @ .., b'\r', b'\n'] | [rest @ .., b'\n'] => rest,
        _ => line,
    }
}

/// Returns the index just after the first LF in `buf`, or `None` if there is
/// no LF yet.
///
/// Used to resynchronise after an overlong line: the caller drops bytes until
/// this returns `Some`, then resumes normal parsing at that index.
pub fn skip_to_lf(buf: &[u8]) -> Option<usize> {
    memchr(b'\n', buf).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_line_table() {
        let cases: &[(&[u8], usize, LineStatus)] = &[
            (b"", 10, LineStatus::Incomplete),
            (b"abc", 10, LineStatus::Incomplete),
            (b"abc\r\n", 10, LineStatus::Complete(5)),
            (b"abc\ndef\n", 10, LineStatus::Complete(4)),
            (b"\n", 10, LineStatus::Complete(1)),
            // The LF may be the last byte allowed by the limit...
            (b"abcd\n", 5, LineStatus::Complete(5)),
            // ...but not one beyond it, even if it is already buffered.
            (b"abcde\n", 5, LineStatus::TooLong),
            (b"abcde", 5, LineStatus::TooLong),
            (b"abcd", 5, LineStatus::Incomplete),
            (b"", 0, LineStatus::TooLong),
            (b"\n", 0, LineStatus::TooLong),
        ];
        for (buf, limit, want) in cases {
            assert_eq!(find_line(buf, *limit), *want, "buf {buf:?} limit {limit}");
        }
    }

    #[test]
    fn trim_line_end_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"abc", b"abc"),
            (b"abc\r\n", b"abc"),
            (b"abc\n", b"abc"),
            (b"abc\r", b"abc\r"),
            (b"a\rb\n", b"a\rb"),
            (b"\r\n", b""),
            (b"\n", b""),
            (b"abc\r\n\r\n", b"abc\r\n"),
        ];
        for (line, want) in cases {
            assert_eq!(trim_line_end(line), *want, "line {line:?}");
        }
    }

    #[test]
    fn skip_to_lf_table() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b"", None),
            (b"xxxx", None),
            (b"xx\r", None),
            (b"\n", Some(1)),
            (b"xx\r\nMAIL", Some(4)),
            (b"x\ny\n", Some(2)),
        ];
        for (buf, want) in cases {
            assert_eq!(skip_to_lf(buf), *want, "buf {buf:?}");
        }
    }
}
