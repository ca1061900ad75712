//! Just enough of RFC 5322 to check a message's `From:` before it is sent: where the header
//! section ends, and the addresses in the `From:` field.
//!
//! Input is the message as it travels in DATA (CRLF line ends, dot-stuffed). Each line is
//! read as the provider will store it, with one leading dot removed: otherwise a line sent as
//! `.From: other@x` would pass the check as some other field and reach the provider as a
//! second `From:` (or, as `. other@x`, as a continuation of the first).

/// Where the header section ends: the offset just after the empty line that closes it, or
/// `None` when it has not ended yet. A message whose first line is empty has no headers.
pub fn header_section_end(message: &[u8]) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(2);
    }
    memchr::memmem::find(message, b"\r\n\r\n").map(|i| i + 4)
}

/// The addresses of every `From:` field in a header section, lower-cased; an empty list
/// when there is no `From:` field. Folded lines are unfolded; display names, comments and
/// group syntax are skipped.
pub fn from_addresses(headers: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for field in unfolded_fields(headers) {
        let Some(value) = strip_field_name(&field, b"from") else {
            continue;
        };
        let value = String::from_utf8_lossy(value);
        for mailbox in split_mailboxes(&value) {
            if let Some(address) = mailbox_address(mailbox) {
                found.push(address.to_lowercase());
            }
        }
    }
    found
}

/// Header fields with continuation lines joined (RFC 5322 section 2.2.3).
fn unfolded_fields(headers: &[u8]) -> Vec<Vec<u8>> {
    let mut fields: Vec<Vec<u8>> = Vec::new();
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // Dot-stuffing (RFC 5321 section 4.5.2): the receiver drops a line's first dot.
        let line = line.strip_prefix(b".").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        match (line[0], fields.last_mut()) {
            (b' ' | b'\t', Some(field)) => field.extend_from_slice(line),
            _ => fields.push(line.to_vec()),
        }
    }
    fields
}

fn strip_field_name<'a>(field: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = field.iter().position(|&b| b == b':')?;
    let field_name = field[..colon].trim_ascii();
    field_name
        .eq_ignore_ascii_case(name)
        .then(|| &field[colon + 1..])
}

/// Splits a mailbox list at commas that are outside quotes, comments and angle brackets.
fn split_mailboxes(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut quoted, mut comment, mut angle, mut escaped) = (false, 0u32, false, false);
    let mut start = 0;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            '<' if !quoted && comment == 0 => angle = true,
            '>' if !quoted && comment == 0 => angle = false,
            ',' | ';' if !quoted && comment == 0 && !angle => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

/// The address of one mailbox: what is inside `<...>`, or else the text without comments.
/// A group's name (`Team: a@b, c@d;`) is dropped along with its colon.
fn mailbox_address(mailbox: &str) -> Option<String> {
    let without_comments = strip_comments(mailbox);
    let text = without_comments.trim();
    let text = match (text.find(':'), text.find('<'), text.find('@')) {
        (Some(colon), angle, at)
            if angle.is_none_or(|a| colon < a) && at.is_none_or(|a| colon < a) =>
        {
            text[colon + 1..].trim()
        }
        _ => text,
    };
    let address = match (text.rfind('<'), text.rfind('>')) {
        (Some(open), Some(close)) if open < close => &text[open + 1..close],
        _ => text,
    };
    let address = address.trim();
    (!address.is_empty()).then(|| address.to_string())
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut depth, mut quoted, mut escaped) = (0u32, false, false);
    for c in text.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_section_end_table() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b"From: a@b\r\n\r\nbody", Some(13)),
            (b"\r\nbody", Some(2)),
            (b"From: a@b\r\nSubject: x\r\n", None),
            (b"From: a@b\r\n\r", None),
            (b"", None),
        ];
        for (message, want) in cases {
            assert_eq!(header_section_end(message), *want, "{message:?}");
        }
    }

    #[test]
    fn from_addresses_table() {
        let cases: &[(&str, &[&str])] = &[
            ("From: printer@contoso.com\r\n", &["printer@contoso.com"]),
            (
                "From: Printer <Printer@Contoso.com>\r\n",
                &["printer@contoso.com"],
            ),
            ("from:<a@b.c>\r\n", &["a@b.c"]),
            ("FROM :  a@b.c  \r\n", &["a@b.c"]),
            (
                "From: \"Doe, John\" <john@x.test>, jane@x.test\r\n",
                &["john@x.test", "jane@x.test"],
            ),
            ("From: a@b.c (Printer, floor 2)\r\n", &["a@b.c"]),
            ("From: (comment <x@y>) real@b.c\r\n", &["real@b.c"]),
            ("From: \"a <fake@evil>\" <real@b.c>\r\n", &["real@b.c"]),
            ("From: Scanner\r\n <scan@x.test>\r\n", &["scan@x.test"]),
            (
                "From: Team: a@x.test, b@x.test;\r\n",
                &["a@x.test", "b@x.test"],
            ),
            ("Subject: From: a@b.c\r\n", &[]),
            ("Reply-To: a@b.c\r\nSender: s@b.c\r\n", &[]),
            ("X-From: a@b.c\r\n", &[]),
            ("Subject: x\r\n\r\nFrom: body@x.test\r\n", &[]),
            (
                "From: one@x.test\r\nSubject: x\r\nFrom: two@x.test\r\n",
                &["one@x.test", "two@x.test"],
            ),
            (
                "From: =?utf-8?q?Gr=C3=BC=C3=9Fe?= <g@x.test>\r\n",
                &["g@x.test"],
            ),
            ("From: grüße@exämple.test\r\n", &["grüße@exämple.test"]),
            ("From:\r\n", &[]),
            // Dot-stuffed lines count as what the provider stores: one dot fewer.
            (
                ".From: boss@x.test\r\nFrom: printer@x.test\r\n",
                &["boss@x.test", "printer@x.test"],
            ),
            (
                "From: printer@x.test\r\n. , boss@x.test\r\n",
                &["printer@x.test", "boss@x.test"],
            ),
            ("..From: a@b.c\r\n", &[]),
        ];
        for (headers, want) in cases {
            assert_eq!(from_addresses(headers.as_bytes()), *want, "{headers:?}");
        }
    }
}
