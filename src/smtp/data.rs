//! The DATA framer: finds the end of a message sent after DATA and rewrites
//! its line ends so the upstream server frames the message exactly as we do.
//!
//! This is the SMTP smuggling defence. Servers disagree about whether a bare
//! LF or bare CR can end a line, so a client could hide "\n.\n" or "\r.\r"
//! plus further commands inside a message: we would relay them as content,
//! and an upstream that accepts the sloppy form would see the message end
//! early and run the hidden commands with our authenticated session. The
//! policy is to normalise rather than reject: every line end we emit is
//! CRLF, and a lone "." that is not our end of data is sent as "..", so the
//! upstream's end of data is always the one we found.

use std::ops::Range;

use memchr::memchr2;

/// Result of [`DataFramer::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// All of the input was consumed; the message continues.
    NeedMore,
    /// End of data found. `consumed` bytes of this input were used,
    /// including the terminating ".\r\n"; the rest belongs to the commands
    /// that follow (pipelining).
    End { consumed: usize },
}

/// One piece of framed output from [`DataFramer::feed_pieces`]: bytes of the input, passed on
/// as they are, or a few bytes of the framer's own (a CRLF for a bare line end, a doubled
/// dot, or held bytes from the previous input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Input(Range<usize>),
    Literal(&'static [u8]),
}

/// Where framed bytes go: appended to a buffer, or described as [`Piece`]s.
trait Output {
    fn input(&mut self, input: &[u8], range: Range<usize>);
    fn literal(&mut self, bytes: &'static [u8]);
}

impl Output for Vec<u8> {
    fn input(&mut self, input: &[u8], range: Range<usize>) {
        self.extend_from_slice(&input[range]);
    }

    fn literal(&mut self, bytes: &'static [u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Output for Vec<Piece> {
    fn input(&mut self, _: &[u8], range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        match self.last_mut() {
            Some(Piece::Input(last)) if last.end == range.start => last.end = range.end,
            _ => self.push(Piece::Input(range)),
        }
    }

    fn literal(&mut self, bytes: &'static [u8]) {
        self.push(Piece::Literal(bytes));
    }
}

/// Where we are in the input. Bytes whose meaning depends on what follows
/// (a leading ".", a CR) are held back in the state, never in a buffer, so a
/// decision can span any number of `feed` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line, nothing of it seen. `after_crlf` is true when
    /// the previous line ended in a real CRLF (or this is the first line,
    /// the DATA command having ended in CRLF): only then may "." end the data.
    LineStart { after_crlf: bool },
    /// Seen "." at the start of a line; nothing emitted for it yet.
    Dot { after_crlf: bool },
    /// Seen ".\r" at the start of a line; nothing emitted for it yet.
    DotCr { after_crlf: bool },
    /// Inside a line whose bytes so far have been emitted.
    Mid,
    /// Inside a line, seen a CR not yet emitted: it is either half of a CRLF
    /// or a bare CR, depending on the next byte.
    MidCr,
    /// End of data was found.
    Done,
}

/// Streams a dot-stuffed message from the client to the upstream server.
///
/// Output stays in dot-stuffed wire format: stuffing is preserved, not undone
/// and redone, so the upstream receives the same message. The final ".\r\n"
/// is not written; the caller sends it.
#[derive(Debug, Clone)]
pub struct DataFramer {
    state: State,
    bytes_out: u64,
    normalised: u64,
    /// Where, in the current input, the bytes held in `state` (a leading dot, a CR) are;
    /// `None` when they came with an earlier input.
    held_at: Option<usize>,
}

impl Default for DataFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl DataFramer {
    pub fn new() -> Self {
        DataFramer {
            state: State::LineStart { after_crlf: true },
            bytes_out: 0,
            normalised: 0,
            held_at: None,
        }
    }

    /// Message bytes written to `out` so far, excluding the terminator.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// How many bare CRs and bare LFs were rewritten as CRLF.
    pub fn normalised_line_ends(&self) -> u64 {
        self.normalised
    }

    /// Consumes client bytes, appending the bytes to forward to `out`.
    ///
    /// Once `End` has been returned, further calls consume nothing and
    /// return `End { consumed: 0 }`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Feed {
        self.run(input, out)
    }

    /// Like [`DataFramer::feed`], but describes the bytes to forward as pieces of `input`
    /// and literals instead of copying them, so the message can go from the client's buffer
    /// to the TLS layer without a copy in between. The pieces are appended to `out`; those
    /// of one call refer to that call's `input`.
    pub fn feed_pieces(&mut self, input: &[u8], out: &mut Vec<Piece>) -> Feed {
        self.run(input, out)
    }

    fn emit(&mut self, out: &mut impl Output, input: &[u8], range: Range<usize>) {
        self.bytes_out += range.len() as u64;
        out.input(input, range);
    }

    fn emit_literal(&mut self, out: &mut impl Output, bytes: &'static [u8]) {
        self.bytes_out += bytes.len() as u64;
        out.literal(bytes);
    }

    /// A CRLF for a real CRLF whose CR is held: from the input when both bytes are in it.
    fn emit_crlf(&mut self, out: &mut impl Output, input: &[u8], lf_at: usize) {
        match self.held_at {
            Some(cr) if cr + 1 == lf_at => self.emit(out, input, cr..lf_at + 1),
            _ => self.emit_literal(out, b"\r\n"),
        }
    }

    fn run(&mut self, input: &[u8], out: &mut impl Output) -> Feed {
        // Held bytes, if any, came with an earlier input.
        self.held_at = None;
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.state {
                State::LineStart { after_crlf } => match b {
                    b'.' => {
                        self.state = State::Dot { after_crlf };
                        self.held_at = Some(i);
                        i += 1;
                    }
                    // An empty line so far: the CR is judged like any other.
                    b'\r' => {
                        self.state = State::MidCr;
                        self.held_at = Some(i);
                        i += 1;
                    }
                    b'\n' => {
                        self.bare_line_end(out);
                        i += 1;
                    }
                    // Leave `i` alone: `Mid` copies the whole span at once.
                    _ => self.state = State::Mid,
                },
                State::Dot { after_crlf } => match b {
                    b'\r' => {
                        self.state = State::DotCr { after_crlf };
                        i += 1;
                    }
                    b'\n' => {
                        // A lone "." ended by a bare LF: some servers would
                        // take it as end of data, so make it content.
                        self.emit_literal(out, b"..\r\n");
                        self.normalised += 1;
                        self.state = State::LineStart { after_crlf: false };
                        i += 1;
                    }
                    // Any other byte (including a second dot) makes this an
                    // ordinary line; pass the dot on and carry on unchanged.
                    _ => {
                        match self.held_at {
                            Some(dot) => self.emit(out, input, dot..dot + 1),
                            None => self.emit_literal(out, b"."),
                        }
                        self.state = State::Mid;
                    }
                },
                State::DotCr { after_crlf } => {
                    if b == b'\n' {
                        i += 1;
                        if after_crlf {
                            self.state = State::Done;
                            return Feed::End { consumed: i };
                        }
                        // ".\r\n" that began after a bare line end: not our
                        // end of data, so it must not be the upstream's.
                        self.emit_literal(out, b"..\r\n");
                        self.state = State::LineStart { after_crlf: true };
                    } else {
                        // ".\r" with a bare CR; `b` starts the next line.
                        self.emit_literal(out, b"..\r\n");
                        self.normalised += 1;
                        self.state = State::LineStart { after_crlf: false };
                    }
                }
                State::Mid => {
                    let rest = &input[i..];
                    match memchr2(b'\r', b'\n', rest) {
                        None => {
                            self.emit(out, input, i..input.len());
                            i = input.len();
                        }
                        Some(k) => {
                            self.emit(out, input, i..i + k);
                            if rest[k] == b'\r' {
                                self.state = State::MidCr;
                                self.held_at = Some(i + k);
                            } else {
                                self.bare_line_end(out);
                            }
                            i += k + 1;
                        }
                    }
                }
                State::MidCr => {
                    if b == b'\n' {
                        self.emit_crlf(out, input, i);
                        i += 1;
                        self.state = State::LineStart { after_crlf: true };
                    } else {
                        // Bare CR; `b` starts the next line.
                        self.emit_literal(out, b"\r\n");
                        self.normalised += 1;
                        self.state = State::LineStart { after_crlf: false };
                    }
                }
                State::Done => return Feed::End { consumed: i },
            }
        }
        if self.state == State::Done {
            // Only reachable when called again after the end with no input.
            return Feed::End { consumed: 0 };
        }
        Feed::NeedMore
    }

    fn bare_line_end(&mut self, out: &mut impl Output) {
        self.emit_literal(out, b"\r\n");
        self.normalised += 1;
        self.state = State::LineStart { after_crlf: false };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one run over some chunks produced.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        out: Vec<u8>,
        /// Absolute input offset just after the terminator, if found.
        end: Option<usize>,
        normalised: u64,
    }

    fn run_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]> + Clone) -> Outcome {
        let mut framer = DataFramer::new();
        let mut out = Vec::new();
        let mut offset = 0;
        let mut end = None;
        for chunk in chunks.clone() {
            match framer.feed(chunk, &mut out) {
                Feed::NeedMore => offset += chunk.len(),
                Feed::End { consumed } => {
                    assert!(consumed <= chunk.len());
                    end = Some(offset + consumed);
                    break;
                }
            }
        }
        assert_eq!(framer.bytes_out(), out.len() as u64);
        let outcome = Outcome {
            out,
            end,
            normalised: framer.normalised_line_ends(),
        };
        assert_eq!(run_pieces(chunks), outcome, "pieces and copies differ");
        outcome
    }

    /// The same run through [`DataFramer::feed_pieces`], with the pieces resolved to bytes.
    fn run_pieces<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut framer = DataFramer::new();
        let mut out = Vec::new();
        let mut offset = 0;
        let mut end = None;
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
                Feed::End { consumed } => {
                    end = Some(offset + consumed);
                    break;
                }
            }
        }
        assert_eq!(framer.bytes_out(), out.len() as u64);
        Outcome {
            out,
            end,
            normalised: framer.normalised_line_ends(),
        }
    }

    /// Runs `input` whole, byte at a time and split at every offset, and
    /// checks all give the same outcome, which is returned.
    fn run_all_splits(input: &[u8]) -> Outcome {
        let whole = run_chunks([input]);
        let bytes = run_chunks(input.chunks(1));
        assert_eq!(bytes, whole, "byte at a time: {input:?}");
        for cut in 0..=input.len() {
            let (a, b) = input.split_at(cut);
            assert_eq!(run_chunks([a, b]), whole, "split at {cut}: {input:?}");
        }
        whole
    }

    /// Properties that must hold whatever the input.
    fn check_invariants(input: &[u8], o: &Outcome) {
        let out = &o.out;
        assert!(!out.starts_with(b".\r\n"), "{input:?} -> {out:?}");
        assert!(
            !out.windows(5).any(|w| w == b"\r\n.\r\n"),
            "{input:?} -> {out:?}"
        );
        for (i, &b) in out.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "{input:?} -> {out:?}");
            }
            if b == b'\n' {
                assert!(i > 0 && out[i - 1] == b'\r', "{input:?} -> {out:?}");
            }
        }
        if o.end.is_some() {
            // The caller appends ".\r\n"; it must start a line.
            assert!(out.is_empty() || out.ends_with(b"\r\n"), "{input:?}");
        }
    }

    /// A simple whole-input model of the rules, written independently of
    /// the state machine: tokenise into lines and their terminators, then
    /// apply the policy line by line.
    fn reference(input: &[u8]) -> Outcome {
        let mut out = Vec::new();
        let mut normalised = 0;
        let mut pos = 0;
        let mut after_crlf = true;
        loop {
            let rest = &input[pos..];
            let Some(j) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
                // Unterminated tail: emitted as far as it is decided.
                if rest != b"." {
                    out.extend_from_slice(rest);
                }
                return Outcome {
                    out,
                    end: None,
                    normalised,
                };
            };
            let content = &rest[..j];
            let (crlf, next) = match (rest[j], rest.get(j + 1)) {
                (b'\n', _) => (false, j + 1),
                (_, Some(b'\n')) => (true, j + 2),
                (_, Some(_)) => (false, j + 1),
                (_, None) => {
                    if content != b"." {
                        out.extend_from_slice(content);
                    }
                    return Outcome {
                        out,
                        end: None,
                        normalised,
                    };
                }
            };
            if content == b"." && crlf && after_crlf {
                return Outcome {
                    out,
                    end: Some(pos + next),
                    normalised,
                };
            }
            if content == b"." {
                out.extend_from_slice(b"..");
            } else {
                out.extend_from_slice(content);
            }
            out.extend_from_slice(b"\r\n");
            if !crlf {
                normalised += 1;
            }
            after_crlf = crlf;
            pos += next;
        }
    }

    enum End {
        Whole,
        At(usize),
        More,
    }

    #[test]
    fn framing_table() {
        let cases: &[(&[u8], &[u8], End, u64)] = &[
            // Plain message.
            (
                b"Subject: hi\r\n\r\nbody\r\n.\r\n",
                b"Subject: hi\r\n\r\nbody\r\n",
                End::Whole,
                0,
            ),
            // Empty message, and one with only an empty line.
            (b".\r\n", b"", End::Whole, 0),
            (b"\r\n.\r\n", b"\r\n", End::Whole, 0),
            // Dot-stuffing is preserved, including a line that is only "..".
            (b"..foo\r\n..\r\n.\r\n", b"..foo\r\n..\r\n", End::Whole, 0),
            (b"..\r\n.\r\n", b"..\r\n", End::Whole, 0),
            (b"...\r\n.\r\n", b"...\r\n", End::Whole, 0),
            (b".x\r\n. \r\n.\r\n", b".x\r\n. \r\n", End::Whole, 0),
            // "\n.\n" variants.
            (b"a\n.\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n", End::Whole, 2),
            (b"\n.\n.\r\n.\r\n", b"\r\n..\r\n..\r\n", End::Whole, 2),
            (b".\n.\r\n", b"..\r\n..\r\n", End::More, 1),
            // "\r\n.\n": the smuggled command stays message content.
            (
                b"a\r\n.\nMAIL FROM:<x>\r\n.\r\n",
                b"a\r\n..\r\nMAIL FROM:<x>\r\n",
                End::Whole,
                1,
            ),
            // "\n.\r\n": began after a bare LF, so not the end.
            (
                b"a\n.\r\nRCPT TO:<y>\r\n.\r\n",
                b"a\r\n..\r\nRCPT TO:<y>\r\n",
                End::Whole,
                1,
            ),
            // "\r.\r" and friends.
            (b"a\r.\rb\r\n.\r\n", b"a\r\n..\r\nb\r\n", End::Whole, 2),
            (b"a\r.\r\n", b"a\r\n..\r\n", End::More, 1),
            (b"a\r\n.\r.\r\n", b"a\r\n..\r\n..\r\n", End::More, 1),
            (b"a\r\r\n.\r\n", b"a\r\n\r\n", End::Whole, 1),
            (b"\r\r\r\n.\r\n", b"\r\n\r\n\r\n", End::Whole, 2),
            (b"a\n\n.\r\n", b"a\r\n\r\n..\r\n", End::More, 2),
            // Trailing bytes after the end are left to the caller.
            (b"x\r\n.\r\nQUIT\r\n", b"x\r\n", End::At(6), 0),
            (b".\r\nRSET\r\n", b"", End::At(3), 0),
            // Undecided tails emit nothing for the held bytes.
            (b"", b"", End::More, 0),
            (b"abc", b"abc", End::More, 0),
            (b".", b"", End::More, 0),
            (b".\r", b"", End::More, 0),
            (b"a\r", b"a", End::More, 0),
            (b"a\r\n.", b"a\r\n", End::More, 0),
            (b"a\n", b"a\r\n", End::More, 1),
        ];
        for (input, want_out, want_end, want_norm) in cases {
            let got = run_all_splits(input);
            let want_end = match want_end {
                End::Whole => Some(input.len()),
                End::At(n) => Some(*n),
                End::More => None,
            };
            let want = Outcome {
                out: want_out.to_vec(),
                end: want_end,
                normalised: *want_norm,
            };
            assert_eq!(got, want, "input {input:?}");
            assert_eq!(reference(input), want, "reference on {input:?}");
            check_invariants(input, &got);
        }
    }

    #[test]
    fn clean_input_passes_through_as_one_piece() {
        let mut framer = DataFramer::new();
        let mut pieces = Vec::new();
        let body = b"Subject: x\r\n\r\n..stuffed\r\nline\r\n";
        assert_eq!(framer.feed_pieces(body, &mut pieces), Feed::NeedMore);
        assert_eq!(pieces, vec![Piece::Input(0..body.len())]);
        // A CRLF cut by a read: the held CR comes back as a literal with its LF.
        pieces.clear();
        assert_eq!(framer.feed_pieces(b"end\r", &mut pieces), Feed::NeedMore);
        assert_eq!(
            framer.feed_pieces(b"\nmore.\r\n.\r\n", &mut pieces),
            Feed::End { consumed: 11 }
        );
        assert_eq!(
            pieces,
            vec![
                Piece::Input(0..3),
                Piece::Literal(b"\r\n"),
                Piece::Input(1..8)
            ]
        );
    }

    #[test]
    fn cr_at_chunk_end_lf_at_chunk_start() {
        let mut framer = DataFramer::new();
        let mut out = Vec::new();
        assert_eq!(framer.feed(b"a\r", &mut out), Feed::NeedMore);
        // The CR is held until we know whether it is half of a CRLF.
        assert_eq!(out, b"a");
        assert_eq!(framer.feed(b"\n.", &mut out), Feed::NeedMore);
        assert_eq!(out, b"a\r\n");
        assert_eq!(framer.feed(b"\r", &mut out), Feed::NeedMore);
        assert_eq!(
            framer.feed(b"\nNOOP\r\n", &mut out),
            Feed::End { consumed: 1 }
        );
        assert_eq!(out, b"a\r\n");
        assert_eq!(framer.normalised_line_ends(), 0);

        let mut framer = DataFramer::new();
        let mut out = Vec::new();
        assert_eq!(framer.feed(b"a\r", &mut out), Feed::NeedMore);
        assert_eq!(framer.feed(b"b", &mut out), Feed::NeedMore);
        assert_eq!(out, b"a\r\nb");
        assert_eq!(framer.normalised_line_ends(), 1);
    }

    #[test]
    fn after_end_consumes_nothing() {
        let mut framer = DataFramer::new();
        let mut out = Vec::new();
        assert_eq!(framer.feed(b".\r\n", &mut out), Feed::End { consumed: 3 });
        assert_eq!(framer.feed(b"x\r\n", &mut out), Feed::End { consumed: 0 });
        assert_eq!(framer.feed(b"", &mut out), Feed::End { consumed: 0 });
        assert!(out.is_empty());
    }

    #[test]
    fn long_line_copied_unchanged() {
        let mut line = vec![b'.'; 1];
        line.extend(std::iter::repeat_n(b'x', 5000));
        line.extend_from_slice(b"\r\n");
        let mut input = line.clone();
        input.extend_from_slice(b".\r\n");
        let got = run_chunks([input.as_slice()]);
        assert_eq!(got.out, line);
        assert_eq!(got.end, Some(input.len()));
        for size in [1, 7, 1000, 4096] {
            assert_eq!(run_chunks(input.chunks(size)), got, "chunk size {size}");
        }
    }

    #[test]
    fn appends_to_existing_output() {
        let mut framer = DataFramer::new();
        let mut out = b"keep".to_vec();
        assert_eq!(
            framer.feed(b"a\nb\r\n.\r\n", &mut out),
            Feed::End { consumed: 8 }
        );
        assert_eq!(out, b"keepa\r\nb\r\n");
        assert_eq!(framer.bytes_out(), 6);
    }

    #[test]
    fn generated_inputs_hold_invariants() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"\r\n.aX";
        for _ in 0..5000 {
            let len = (next() % 40) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let got = run_all_splits(&input);
            check_invariants(&input, &got);
            assert_eq!(got, reference(&input), "reference on {input:?}");
            // A few random multi-way splits as well.
            for _ in 0..4 {
                let mut chunks = Vec::new();
                let mut rest = input.as_slice();
                while !rest.is_empty() {
                    let n = 1 + (next() % 6) as usize;
                    let (a, b) = rest.split_at(n.min(rest.len()));
                    chunks.push(a);
                    rest = b;
                }
                assert_eq!(run_chunks(chunks), got, "random split of {input:?}");
            }
        }
    }
}
