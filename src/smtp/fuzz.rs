//! Property checks over arbitrary bytes, shared by the cargo-fuzz targets in `fuzz/` and by
//! the generated-input tests that run with the ordinary test suite. Each function panics
//! when a property fails; none may panic for any other reason, whatever the input.
//!
//! The properties: the command reader gives the same lines however its input is split and
//! never buffers more than its limit; the parser and the SASL exchange answer every line;
//! the DATA framer's output never contains an end of data it did not report, never has a
//! bare CR or LF, and does not depend on how its input was split.

use crate::smtp::command::{self, LineReader, Next};
use crate::smtp::data::{DataFramer, Feed, Piece};
use crate::smtp::sasl::{self, Exchange, Mechanism, Step};

const LIMIT: usize = 64;
const AUTH_LIMIT: usize = 200;

/// A split point derived from the input itself, so one fuzz input covers one split.
fn cut_of(data: &[u8]) -> usize {
    data.first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1))
}

fn reader_events<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<Next> {
    let mut reader = LineReader::new();
    let mut events = Vec::new();
    for chunk in chunks {
        reader.push(chunk);
        loop {
            match reader.next_line(LIMIT, AUTH_LIMIT) {
                Next::NeedMore => break,
                Next::Line(line) => {
                    assert!(line.len() <= AUTH_LIMIT, "line over the limit");
                    assert!(line.ends_with(b"\n"), "line without its LF");
                    events.push(Next::Line(line));
                }
                other => events.push(other),
            }
        }
        assert!(
            reader.pending().len() <= AUTH_LIMIT + chunk.len(),
            "reader buffered more than a line"
        );
    }
    events
}

/// The command reader and parser.
pub fn command_input(data: &[u8]) {
    let whole = reader_events([data]);
    let (a, b) = data.split_at(cut_of(data));
    assert_eq!(reader_events([a, b]), whole, "split changed the lines");
    if data.len() <= 512 {
        assert_eq!(
            reader_events(data.chunks(1)),
            whole,
            "bytewise changed the lines"
        );
    }
    for event in &whole {
        if let Next::Line(line) = event {
            // Any line gets a command or a refusal with a valid reply code.
            if let Err(refusal) = command::parse(line) {
                assert!((500..600).contains(&refusal.code));
            }
        }
    }
}

/// SASL decoding: the first byte picks PLAIN or LOGIN and whether the first line is an
/// initial response; the rest are the client's lines.
pub fn sasl_exchange(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let _ = sasl::decode_plain(rest);
    let _ = sasl::decode_login_field(rest);
    let mechanism = if selector & 1 == 0 {
        Mechanism::Plain
    } else {
        Mechanism::Login
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let initial = if selector & 2 == 0 {
        lines.next()
    } else {
        None
    };
    let (mut exchange, mut step) = Exchange::start(mechanism, initial);
    let mut rounds = 0;
    loop {
        match step {
            Step::Done(credentials) => {
                let shown = format!("{credentials:?}");
                assert!(shown.contains("[redacted]"));
                return;
            }
            Step::Failed(failure) => {
                let (code, _, _) = failure.reply();
                assert!((500..600).contains(&code));
                return;
            }
            Step::Challenge(_) => {
                rounds += 1;
                assert!(rounds <= 2, "PLAIN and LOGIN need at most two challenges");
                match lines.next() {
                    Some(line) => step = exchange.respond(line),
                    None => return,
                }
            }
        }
    }
}

fn framed<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, Option<usize>) {
    let mut framer = DataFramer::new();
    let mut out = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        match framer.feed(chunk, &mut out) {
            Feed::NeedMore => offset += chunk.len(),
            Feed::End { consumed } => {
                assert!(consumed <= chunk.len());
                assert_eq!(framer.bytes_out(), out.len() as u64);
                return (out, Some(offset + consumed));
            }
        }
    }
    assert_eq!(framer.bytes_out(), out.len() as u64);
    (out, None)
}

/// The same through `feed_pieces`, the pieces resolved to the bytes they stand for.
fn framed_pieces<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, Option<usize>) {
    let mut framer = DataFramer::new();
    let mut out = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        let mut pieces = Vec::new();
        let feed = framer.feed_pieces(chunk, &mut pieces);
        for piece in pieces {
            match piece {
                Piece::Input(range) => out.extend_from_slice(&chunk[range]),
                Piece::Literal(bytes) => out.extend_from_slice(bytes),
            }
        }
        match feed {
            Feed::NeedMore => offset += chunk.len(),
            Feed::End { consumed } => return (out, Some(offset + consumed)),
        }
    }
    (out, None)
}

/// The DATA framer (the SMTP smuggling defence).
pub fn data_framer(data: &[u8]) {
    let (out, end) = framed([data]);
    let (a, b) = data.split_at(cut_of(data));
    assert_eq!(
        framed_pieces([a, b]),
        (out.clone(), end),
        "pieces differ from copies"
    );
    let (a, b) = data.split_at(cut_of(data));
    assert_eq!(
        framed([a, b]),
        (out.clone(), end),
        "split changed the output"
    );
    if data.len() <= 4096 {
        assert_eq!(
            framed(data.chunks(1)),
            (out.clone(), end),
            "bytewise changed it"
        );
    }
    assert!(
        !out.starts_with(b".\r\n"),
        "output starts with an end of data"
    );
    assert!(
        memchr::memmem::find(&out, b"\r\n.\r\n").is_none(),
        "output holds an end of data"
    );
    for (i, &byte) in out.iter().enumerate() {
        if byte == b'\r' {
            assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in output");
        }
        if byte == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF in output");
        }
    }
    if let Some(end) = end {
        assert!(end <= data.len());
        assert!(data[..end].ends_with(b".\r\n"), "the end is a dot line");
        assert!(
            out.is_empty() || out.ends_with(b"\r\n"),
            "the final dot starts a line"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated inputs from a small alphabet of the bytes that matter, so the properties
    /// are checked on every test run, not only under cargo-fuzz.
    fn generated(alphabet: &[u8], count: usize, max_len: u64, mut check: impl FnMut(&[u8])) {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..count {
            let len = (next() % max_len) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            check(&input);
        }
    }

    #[test]
    fn command_input_properties() {
        generated(b"\r\nAUTH MAIL:<>@\0\xffX ", 3000, 300, command_input);
        command_input(&[b'A'; 5000]);
    }

    #[test]
    fn sasl_properties() {
        generated(b"\x00\x01\x02\x03AGEYg=*\r\n+/", 3000, 80, sasl_exchange);
    }

    #[test]
    fn data_framer_properties() {
        generated(b"\r\n.aX", 3000, 60, data_framer);
    }
}
