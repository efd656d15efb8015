//! NDJSON line splitting, sans-IO, bounded: a line longer than the limit is reported as
//! too long (with its length) and its bytes are discarded as they stream by, never
//! buffered whole. Every line is numbered; blank lines are numbered and skipped.

#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A non-blank line, without its `\n` (and `\r`).
    Text(&'a [u8]),
    /// A line of this many bytes, over the limit.
    TooLong(usize),
}

pub struct LineSplitter {
    partial: Vec<u8>,
    /// Bytes of the current over-long line seen so far, while discarding it.
    discarding: Option<usize>,
    line_no: u64,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            partial: Vec::new(),
            discarding: None,
            line_no: 0,
            max,
        }
    }

    /// Splits `data`; `on(line_no, line)` is called for each complete non-blank line.
    pub fn feed(&mut self, data: &[u8], on: &mut impl FnMut(u64, Line<'_>)) {
        let mut rest = data;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            let chunk = &rest[..pos];
            rest = &rest[pos + 1..];
            self.line_no += 1;
            if let Some(seen) = self.discarding.take() {
                on(self.line_no, Line::TooLong(seen + chunk.len()));
            } else if self.partial.is_empty() {
                self.emit(chunk, on);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(chunk);
                self.emit(&whole, on);
                whole.clear();
                self.partial = whole;
            }
        }
        self.hold(rest);
    }

    /// End of input: a last line without a newline still counts.
    pub fn finish(&mut self, on: &mut impl FnMut(u64, Line<'_>)) {
        if let Some(seen) = self.discarding.take() {
            self.line_no += 1;
            on(self.line_no, Line::TooLong(seen));
        } else if !self.partial.is_empty() {
            self.line_no += 1;
            let whole = std::mem::take(&mut self.partial);
            self.emit(&whole, on);
        }
    }

    fn hold(&mut self, tail: &[u8]) {
        if let Some(seen) = &mut self.discarding {
            *seen += tail.len();
        } else if self.partial.len() + tail.len() > self.max + 1 {
            // +1: the line may still end in `\r`, which is not part of it.
            self.discarding = Some(self.partial.len() + tail.len());
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(tail);
        }
    }

    fn emit(&self, line: &[u8], on: &mut impl FnMut(u64, Line<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max {
            on(self.line_no, Line::TooLong(line.len()));
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            on(self.line_no, Line::Text(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[u8], max: usize, chunk: usize) -> Vec<(u64, String)> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        let mut on = |n: u64, l: Line<'_>| {
            out.push((
                n,
                match l {
                    Line::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    Line::TooLong(len) => format!("<{len}>"),
                },
            ))
        };
        for c in input.chunks(chunk.max(1)) {
            s.feed(c, &mut on);
        }
        s.finish(&mut on);
        out
    }

    #[test]
    fn numbering_blank_lines_and_crlf() {
        let input = b"a\n\n  \r\nb\r\nc";
        for chunk in [1, 2, 3, 100] {
            assert_eq!(
                split(input, 10, chunk),
                vec![(1, "a".into()), (4, "b".into()), (5, "c".into())],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn over_long_lines_are_measured_not_buffered() {
        let mut input = b"ok\n".to_vec();
        input.extend(vec![b'x'; 50]);
        input.extend(b"\nfine\n");
        input.extend(vec![b'y'; 30]); // unterminated, too long
        for chunk in [1, 7, 1000] {
            assert_eq!(
                split(&input, 10, chunk),
                vec![
                    (1, "ok".into()),
                    (2, "<50>".into()),
                    (3, "fine".into()),
                    (4, "<30>".into())
                ],
                "chunk {chunk}"
            );
        }
        let mut s = LineSplitter::new(10);
        s.feed(&vec![b'z'; 10_000], &mut |_, _| {});
        assert!(s.partial.capacity() < 100, "discarded bytes are not kept");
    }

    #[test]
    fn exactly_max_is_allowed() {
        assert_eq!(
            split(b"0123456789\r\n", 10, 3),
            vec![(1, "0123456789".into())]
        );
        assert_eq!(split(b"0123456789a\n", 10, 3), vec![(1, "<11>".into())]);
    }
}
