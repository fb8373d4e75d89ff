//! Spans on the command line: `N`, `A..B`, `A..=B`, `A..`, `..B`, `..`.

use locksfile::{IntoSpan, Span};

/// Parse a span as written on the command line (clap value parser).
pub fn parse(s: &str) -> Result<Span, String> {
    let s = s.trim();
    let result = if let Some((a, b)) = s.split_once("..") {
        let start = if a.is_empty() { 0 } else { index(a)? };
        if let Some(b) = b.strip_prefix('=') {
            let last = index(b)?;
            (start..=last).into_span()
        } else if b.is_empty() {
            (start..).into_span()
        } else {
            (start..index(b)?).into_span()
        }
    } else {
        index(s)?.into_span()
    };
    result.map_err(|e| match e {
        locksfile::Error::InvalidSpan(e) => e.to_string(),
        e => e.to_string(),
    })
}

/// `--start N --count M` (count 1 when not given).
pub fn from_start_count(start: u64, count: Option<u64>) -> Result<Span, String> {
    Span::with_count(start, count.unwrap_or(1)).map_err(|e| match e {
        locksfile::Error::InvalidSpan(e) => e.to_string(),
        e => e.to_string(),
    })
}

fn index(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "'{s}' is not a lock index (expected N, A..B, A..=B, A.. or ..)"
        ));
    }
    s.parse::<u64>()
        .map_err(|_| format!("'{s}' is too large for a lock index"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("3").unwrap(), Span::new(3, 4).unwrap());
        assert_eq!(parse("2..5").unwrap(), Span::new(2, 5).unwrap());
        assert_eq!(parse("2..=5").unwrap(), Span::new(2, 6).unwrap());
        assert!(parse("7..").unwrap().is_to_end());
        assert_eq!(parse("..").unwrap(), Span::ALL);
        assert_eq!(parse("..4").unwrap(), Span::new(0, 4).unwrap());
        assert_eq!(
            from_start_count(4, Some(2)).unwrap(),
            Span::new(4, 6).unwrap()
        );
        assert_eq!(from_start_count(4, None).unwrap(), Span::new(4, 5).unwrap());
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "-1",
            "x",
            "5..2",
            "3..3",
            "1..2..3",
            "99999999999999999999",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse("5..2").unwrap_err().contains("ends before it starts"));
        assert!(from_start_count(1, Some(0)).is_err());
        assert!(parse(&format!("{}", i64::MAX)).is_err());
    }
}
