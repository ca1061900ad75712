//! Wrapping provider replies whose lines are longer than RFC 5321 lets a server send.

use super::Reply;

impl Reply {
    /// The same reply with every line short enough that its wire form (code, separator,
    /// text, CRLF) fits in `max_line` octets; lines already short enough are untouched.
    ///
    /// Providers send single lines of 700 octets and more (Office365's SendAsDenied with its
    /// diagnostic blob), which strict clients reject. A long line is cut at a space where
    /// possible, never inside a UTF-8 sequence, and each piece after the first starts with
    /// the reply's enhanced status code again (RFC 2034 puts it on every line), so no text is
    /// lost and every line stays meaningful on its own.
    pub fn wrapped(&self, max_line: usize) -> Reply {
        // "ddd-" and CRLF; a floor keeps absurd limits from looping on tiny pieces.
        let width = max_line.saturating_sub(6).max(24);
        let prefix = self.enhanced().map(|e| format!("{e} ").into_bytes());
        let prefix = prefix.unwrap_or_default();
        let mut lines = Vec::with_capacity(self.lines.len());
        for line in &self.lines {
            if line.len() <= width {
                lines.push(line.clone());
                continue;
            }
            let mut rest: &[u8] = line;
            let mut first = true;
            while !rest.is_empty() {
                let room = if first { width } else { width - prefix.len() };
                let mut piece = if first { Vec::new() } else { prefix.clone() };
                if rest.len() <= room {
                    piece.extend_from_slice(rest);
                    lines.push(piece);
                    break;
                }
                let cut = split_point(rest, room);
                piece.extend_from_slice(&rest[..cut]);
                lines.push(piece);
                rest = trim_leading_spaces(&rest[cut..]);
                first = false;
            }
        }
        Reply {
            code: self.code,
            lines,
        }
    }
}

/// Where to cut `text` (longer than `room`) so the head fits: the last space in the second
/// half of the room, else the last UTF-8 character boundary within it.
fn split_point(text: &[u8], room: usize) -> usize {
    if let Some(i) = text[..=room].iter().rposition(|&b| b == b' ')
        && i > room / 2
    {
        return i;
    }
    let mut cut = room;
    while cut > room / 2 && (text[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    cut
}

fn trim_leading_spaces(mut text: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = text {
        text = rest;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::{MAX_WIRE_REPLY_LINE, parse_reply};

    #[test]
    fn long_lines_are_wrapped_into_valid_reply_lines() {
        let blob = "0.35250:0A007A8B, 1.36674:0A000000, 1.61250:00000000, ".repeat(12);
        let send_as = format!(
            "5.2.252 STOREDRV.Submission.Exception:SendAsDeniedException; [BeginDiagnosticData]{blob}[EndDiagnosticData]"
        );
        let unbroken = format!("5.7.1 {}", "x".repeat(1200));
        let utf8 = format!("5.1.1 {}", "é".repeat(400));
        let cases: Vec<Reply> = vec![
            Reply::multi(
                554,
                ["5.2.252 SendAsDenied; short first line", send_as.as_str()],
            ),
            Reply::new(554, &send_as),
            Reply::new(550, &unbroken),
            Reply::new(550, &utf8),
            Reply::new(451, &"no enhanced code ".repeat(60)),
            Reply::new(250, "2.0.0 OK"),
        ];
        for reply in cases {
            let wrapped = reply.wrapped(MAX_WIRE_REPLY_LINE);
            let wire = wrapped.to_bytes();
            // The result parses as one reply with the same code.
            let (parsed, used) = parse_reply(&wire).unwrap().unwrap();
            assert_eq!((parsed.code(), used), (reply.code(), wire.len()));
            for line in wire.split_inclusive(|&b| b == b'\n') {
                assert!(line.len() <= MAX_WIRE_REPLY_LINE, "{} octets", line.len());
            }
            // Every piece carries the enhanced code, and no text is lost or changed: without
            // spaces and enhanced codes, the texts are the same bytes.
            let code = reply.enhanced().unwrap_or("\u{0}").to_string();
            for line in wrapped.lines() {
                if reply.enhanced().is_some() {
                    assert!(line.starts_with(code.as_bytes()), "{line:?}");
                }
            }
            let compact = |r: &Reply| -> String {
                r.lines()
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).replace(&code, ""))
                    .collect::<String>()
                    .replace(' ', "")
            };
            assert_eq!(compact(&wrapped), compact(&reply));
            assert!(
                std::str::from_utf8(&wire).is_ok(),
                "no UTF-8 sequence is cut"
            );
        }
        // Short replies come back unchanged.
        let short = Reply::multi(250, ["a", "b"]);
        assert_eq!(short.wrapped(MAX_WIRE_REPLY_LINE), short);
    }
}
