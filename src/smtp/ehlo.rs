//! EHLO response parsing (RFC 5321 section 4.1.1.1): turns the upstream's
//! extension list into [`Capabilities`] the relay can act on.

use crate::smtp::reply::Reply;

/// Extensions advertised by a server in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub starttls: bool,
    pub pipelining: bool,
    /// Declared maximum message size (RFC 1870). `None` when SIZE is absent,
    /// has no usable number, or is 0, which RFC 1870 defines as "no fixed
    /// limit", so callers can treat `Some(n)` as a real limit.
    pub size: Option<u64>,
    pub smtputf8: bool,
    pub eightbitmime: bool,
    pub chunking: bool,
    pub binarymime: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    /// Upper-cased SASL mechanism names, in advertised order, no duplicates.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Whether `mech` was advertised; compared case-insensitively.
    pub fn supports_auth(&self, mech: &str) -> bool {
        self.auth.iter().any(|m| m.eq_ignore_ascii_case(mech))
    }

    fn add_auth(&mut self, mech: &[u8]) {
        // RFC 4422 mechanism names: at most 20 of A-Z, 0-9, '-', '_'.
        // Anything else is noise we must not later echo in an AUTH command.
        let valid = !mech.is_empty()
            && mech.len() <= 20
            && mech
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return;
        }
        let name: String = mech
            .iter()
            .map(|&b| char::from(b.to_ascii_uppercase()))
            .collect();
        if !self.auth.contains(&name) {
            self.auth.push(name);
        }
    }
}

/// Parses an EHLO reply. A reply that is not 2xx advertises nothing.
///
/// The first line is the server's greeting, not an extension. Keywords are
/// matched case-insensitively; unknown ones are ignored. Both "AUTH mech..."
/// and the pre-standard "AUTH=mech..." form are understood and merged.
pub fn parse_ehlo(reply: &Reply) -> Capabilities {
    let mut caps = Capabilities::default();
    if !reply.is_positive_completion() {
        return caps;
    }
    for line in reply.lines().iter().skip(1) {
        let mut words = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty());
        let Some(keyword) = words.next() else {
            continue;
        };
        if let Some(mech) = strip_prefix_ignore_case(keyword, b"AUTH=") {
            caps.add_auth(mech);
            words.for_each(|m| caps.add_auth(m));
            continue;
        }
        let is = |name: &str| keyword.eq_ignore_ascii_case(name.as_bytes());
        if is("AUTH") {
            words.for_each(|m| caps.add_auth(m));
        } else if is("SIZE") {
            caps.size = words
                .next()
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&n| n > 0);
        } else if is("STARTTLS") {
            caps.starttls = true;
        } else if is("PIPELINING") {
            caps.pipelining = true;
        } else if is("SMTPUTF8") {
            caps.smtputf8 = true;
        } else if is("8BITMIME") {
            caps.eightbitmime = true;
        } else if is("CHUNKING") {
            caps.chunking = true;
        } else if is("BINARYMIME") {
            caps.binarymime = true;
        } else if is("DSN") {
            caps.dsn = true;
        } else if is("ENHANCEDSTATUSCODES") {
            caps.enhanced_status_codes = true;
        }
    }
    caps
}

fn strip_prefix_ignore_case<'a>(word: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = word.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &word[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ehlo(lines: &[&str]) -> Capabilities {
        parse_ehlo(&Reply::multi(250, lines.iter().copied()))
    }

    #[test]
    fn office365_style() {
        let caps = ehlo(&[
            "LO4P123CA0001.outlook.office365.com Hello [192.0.2.1]",
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "AUTH LOGIN XOAUTH2",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
        ]);
        let want = Capabilities {
            starttls: false,
            pipelining: true,
            size: Some(157_286_400),
            smtputf8: true,
            eightbitmime: true,
            chunking: true,
            binarymime: true,
            dsn: true,
            enhanced_status_codes: true,
            auth: vec!["LOGIN".into(), "XOAUTH2".into()],
        };
        assert_eq!(caps, want);
        assert!(caps.supports_auth("xoauth2"));
        assert!(caps.supports_auth("LOGIN"));
        assert!(!caps.supports_auth("PLAIN"));
    }

    #[test]
    fn keyword_table() {
        type Check = fn(&Capabilities) -> bool;
        let cases: &[(&[&str], Check)] = &[
            (&["host", "starttls"], |c| c.starttls),
            (&["host", "StartTLS"], |c| c.starttls),
            (&["host", "  PIPELINING  "], |c| c.pipelining),
            (&["host", "SIZE"], |c| c.size.is_none()),
            (&["host", "SIZE 0"], |c| c.size.is_none()),
            (&["host", "SIZE x"], |c| c.size.is_none()),
            (&["host", "SIZE -5"], |c| c.size.is_none()),
            (&["host", "size 35882577"], |c| c.size == Some(35_882_577)),
            (&["host", "SIZE\t1000"], |c| c.size == Some(1000)),
            (&["host", "SIZE99"], |c| c.size.is_none()),
            (&["host", "8bitmime"], |c| c.eightbitmime),
            (&["host", "DSN extra"], |c| c.dsn),
            (&["host", "enhancedstatuscodes"], |c| {
                c.enhanced_status_codes
            }),
            (&["host", "STARTTLSX"], |c| !c.starttls),
            (&["host", ""], |c| *c == Capabilities::default()),
            (&["host", "X-UNKNOWN a b"], |c| {
                *c == Capabilities::default()
            }),
            // The greeting line is never read as an extension.
            (&["STARTTLS"], |c| !c.starttls),
            (&["PIPELINING", "SIZE 5"], |c| {
                !c.pipelining && c.size == Some(5)
            }),
            (&[], |c| *c == Capabilities::default()),
        ];
        for (lines, check) in cases {
            let caps = ehlo(lines);
            assert!(check(&caps), "{lines:?} -> {caps:?}");
        }
    }

    #[test]
    fn auth_table() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["h", "AUTH LOGIN PLAIN"], &["LOGIN", "PLAIN"]),
            (&["h", "auth login xoauth2"], &["LOGIN", "XOAUTH2"]),
            (&["h", "AUTH=LOGIN"], &["LOGIN"]),
            (&["h", "AUTH=LOGIN PLAIN"], &["LOGIN", "PLAIN"]),
            (
                &["h", "AUTH LOGIN PLAIN", "AUTH=LOGIN XOAUTH2"],
                &["LOGIN", "PLAIN", "XOAUTH2"],
            ),
            (&["h", "AUTH PLAIN plain Plain"], &["PLAIN"]),
            (&["h", "AUTH"], &[]),
            (&["h", "AUTH="], &[]),
            (
                &["h", "AUTH CRAM-MD5 SCRAM-SHA-256"],
                &["CRAM-MD5", "SCRAM-SHA-256"],
            ),
            // Junk that is not a mechanism name is dropped.
            (
                &["h", "AUTH LOGIN bad\u{e9} a,b THIS-NAME-IS-WAY-TOO-LONG"],
                &["LOGIN"],
            ),
            (&["h", "AUTHX LOGIN"], &[]),
        ];
        for (lines, want) in cases {
            let caps = ehlo(lines);
            assert_eq!(caps.auth, *want, "{lines:?}");
        }
    }

    #[test]
    fn non_success_reply_advertises_nothing() {
        let reply = Reply::multi(550, ["host", "AUTH PLAIN", "STARTTLS"]);
        assert_eq!(parse_ehlo(&reply), Capabilities::default());
    }

    #[test]
    fn non_utf8_lines_are_tolerated() {
        let reply = Reply::multi(
            250,
            [
                b"h\xff".to_vec(),
                b"\xff\xfe".to_vec(),
                b"AUTH \xff PLAIN".to_vec(),
            ],
        );
        assert_eq!(parse_ehlo(&reply).auth, ["PLAIN"]);
    }
}
