//! Newline-delimited JSON-RPC over a child's stdio, with a bound on the line length
//! ([`LineReader`]), and bounded reading of log output (a server's stderr, prepare's output):
//! [`LogLines`] keeps at most a fixed number of bytes of any line and counts the rest, so a
//! writer that never ends its line costs a fixed buffer, not its output.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One line, without its `\n` (and without a trailing `\r`). Never empty.
    Line(Bytes),
    /// A line longer than the limit was discarded: its length so far, and its first bytes (at
    /// most [`HEAD`]), which name the request an over-long answer was for.
    TooLong(usize, Bytes),
}

/// How much of a discarded line is kept (see [`Frame::TooLong`]).
pub const HEAD: usize = 1024;

pub struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    /// Bytes of `buf` already searched for `\n`.
    scanned: usize,
    max: usize,
    /// Length discarded so far of an over-long line.
    discarding: Option<usize>,
    /// The first bytes of the line being discarded.
    head: Bytes,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            scanned: 0,
            max,
            discarding: None,
            head: Bytes::new(),
        }
    }

    /// The next frame; `None` at end of stream.
    pub async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                let mut line = self.buf.split_to(end + 1);
                self.scanned = 0;
                if let Some(n) = self.discarding.take() {
                    return Ok(Some(Frame::TooLong(n + end, std::mem::take(&mut self.head))));
                }
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                // Length first: an over-long line is reported whatever it holds, as it is
                // when it arrives in pieces and is discarded before its end is seen.
                if line.len() > self.max {
                    let head = Bytes::copy_from_slice(&line[..HEAD.min(line.len())]);
                    return Ok(Some(Frame::TooLong(line.len(), head)));
                }
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return Ok(Some(Frame::Line(line.freeze())));
            }
            self.scanned = self.buf.len();
            if let Some(n) = self.discarding.as_mut() {
                *n += self.buf.len();
                self.buf.clear();
                self.scanned = 0;
            } else if self.buf.len() > self.max.saturating_add(1) {
                // (`max + 1`: the line's last byte may be a `\r` that is not part of the line.)
                self.discarding = Some(self.buf.len());
                self.head = Bytes::copy_from_slice(&self.buf[..HEAD.min(self.buf.len())]);
                self.buf.clear();
                self.scanned = 0;
            }
            if self.buf.capacity() - self.buf.len() < 8192 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if let Some(n) = self.discarding.take() {
                    return Ok(Some(Frame::TooLong(n, std::mem::take(&mut self.head))));
                }
                // A last line without '\n'.
                let line = self.buf.split().freeze();
                self.scanned = 0;
                if line.len() > self.max {
                    let head = line.slice(..HEAD.min(line.len()));
                    return Ok(Some(Frame::TooLong(line.len(), head)));
                }
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    return Ok(None);
                }
                return Ok(Some(Frame::Line(line)));
            }
        }
    }
}

/// One line of log output, cut to the reader's limit.
#[derive(Debug, PartialEq, Eq)]
pub struct LogLine {
    /// The start of the line (at most the limit), without `\n` or a trailing `\r`.
    pub text: String,
    /// Bytes of the line dropped beyond the limit (0 for a line that fitted).
    pub dropped: usize,
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)?;
        if self.dropped > 0 {
            write!(f, " [mcpbox: {} more bytes of this line dropped]", self.dropped)?;
        }
        Ok(())
    }
}

/// Splits a byte stream into [`LogLine`]s holding at most `max` bytes each. Pure: bytes in,
/// lines out; the readers below feed it from a pipe.
pub struct LogLines {
    max: usize,
    head: Vec<u8>,
    dropped: usize,
}

impl LogLines {
    pub fn new(max: usize) -> Self {
        LogLines { max, head: Vec::new(), dropped: 0 }
    }

    fn take(&mut self) -> LogLine {
        if self.head.last() == Some(&b'\r') && self.dropped == 0 {
            self.head.pop();
        }
        let text = String::from_utf8_lossy(&self.head).into_owned();
        self.head.clear();
        LogLine { text, dropped: std::mem::take(&mut self.dropped) }
    }

    /// Feed bytes; every completed line goes to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut impl FnMut(LogLine)) {
        while !bytes.is_empty() {
            let (part, rest, done) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            let room = self.max - self.head.len();
            self.head.extend_from_slice(&part[..part.len().min(room)]);
            self.dropped += part.len().saturating_sub(room);
            if done {
                out(self.take());
            }
            bytes = rest;
        }
    }

    /// End of stream: the last line, if it was not ended by `\n`.
    pub fn finish(&mut self, out: &mut impl FnMut(LogLine)) {
        if !self.head.is_empty() || self.dropped > 0 {
            out(self.take());
        }
    }
}

/// Read `r` to its end (or an error) as [`LogLine`]s of at most `max` bytes.
pub async fn read_log_lines<R: AsyncRead + Unpin>(mut r: R, max: usize, mut out: impl FnMut(LogLine)) {
    let mut lines = LogLines::new(max);
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        lines.feed(&buf[..n], &mut out);
    }
    lines.finish(&mut out);
}

/// [`read_log_lines`] for a blocking reader (a thread per pipe).
pub fn read_log_lines_blocking<R: std::io::Read>(mut r: R, max: usize, mut out: impl FnMut(LogLine)) {
    let mut lines = LogLines::new(max);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => lines.feed(&buf[..n], &mut out),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    lines.finish(&mut out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn log_lines_are_cut_and_the_rest_counted() {
        let mut l = LogLines::new(4);
        let mut got = Vec::new();
        let mut out = |x: LogLine| got.push(x);
        l.feed(b"ab\r\nabcdefg", &mut out);
        l.feed(&[b'z'; 100_000], &mut out);
        l.feed(b"\nxy", &mut out);
        l.finish(&mut out);
        let want = |t: &str, d: usize| LogLine { text: t.into(), dropped: d };
        assert_eq!(got, vec![want("ab", 0), want("abcd", 100_003), want("xy", 0)]);
        assert!(l.head.capacity() <= 64, "the buffer never grows past the limit: {}", l.head.capacity());
        assert_eq!(want("abcd", 3).to_string(), "abcd [mcpbox: 3 more bytes of this line dropped]");
    }

    #[test]
    fn the_blocking_reader_cuts_the_same_way() {
        let mut input = b"one\n".to_vec();
        input.extend(std::iter::repeat_n(b'y', 1 << 20));
        let mut got = Vec::new();
        read_log_lines_blocking(std::io::Cursor::new(input), 500, |l| got.push(l));
        assert_eq!(
            got,
            vec![
                LogLine { text: "one".into(), dropped: 0 },
                LogLine { text: "y".repeat(500), dropped: (1 << 20) - 500 }
            ]
        );
    }

    #[tokio::test]
    async fn a_pipe_without_newlines_costs_a_fixed_buffer() {
        let (mut w, r) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..64 {
                w.write_all(&chunk).await.unwrap();
            }
        });
        let mut got = Vec::new();
        read_log_lines(r, 100, |l| got.push(l)).await;
        writer.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].text.len(), got[0].dropped), (100, (64 << 20) - 100));
    }

    #[tokio::test]
    async fn partial_and_long_lines() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut lr = LineReader::new(r, 10);
        let writer = tokio::spawn(async move {
            w.write_all(b"{\"a\"").await.unwrap();
            tokio::task::yield_now().await;
            w.write_all(b":1}\r\n\n").await.unwrap();
            w.write_all(&[b'x'; 100]).await.unwrap();
            w.write_all(b"\nshort\n0123456789ab\nlast").await.unwrap();
        });
        assert_eq!(lr.next_frame().await.unwrap(), Some(Frame::Line(Bytes::from_static(b"{\"a\":1}"))));
        assert!(matches!(lr.next_frame().await.unwrap(), Some(Frame::TooLong(100, _))));
        assert_eq!(lr.next_frame().await.unwrap(), Some(Frame::Line(Bytes::from_static(b"short"))));
        assert!(matches!(lr.next_frame().await.unwrap(), Some(Frame::TooLong(12, _))));
        writer.await.unwrap();
        assert_eq!(lr.next_frame().await.unwrap(), Some(Frame::Line(Bytes::from_static(b"last"))));
        assert_eq!(lr.next_frame().await.unwrap(), None);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/framing.rs): the frames depended on how the stream
    /// was split into reads. Each case is read whole and one byte at a time.
    #[tokio::test]
    async fn frames_do_not_depend_on_read_sizes() {
        /// Hands out `data` `piece` bytes per read.
        struct Pieces(&'static [u8], usize);
        impl AsyncRead for Pieces {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let n = self.1.min(self.0.len()).min(buf.remaining());
                buf.put_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                std::task::Poll::Ready(Ok(()))
            }
        }
        async fn frames(data: &'static [u8], max: usize, piece: usize) -> Vec<Frame> {
            let mut lr = LineReader::new(Pieces(data, piece), max);
            let mut out = Vec::new();
            while let Some(f) = lr.next_frame().await.unwrap() {
                out.push(f);
            }
            out
        }
        // A line of exactly the limit, ended by "\r\n": a line, even when "abcd\r" is all that
        // has arrived (5 bytes, over the limit of 4, before the '\n' says the '\r' is not content).
        for piece in [1, 64] {
            assert_eq!(
                frames(b"abcd\r\nx\n", 4, piece).await,
                vec![Frame::Line(Bytes::from_static(b"abcd")), Frame::Line(Bytes::from_static(b"x"))],
                "reads of {piece}"
            );
        }
        // A blank line longer than the limit: too long, however it arrives (one byte at a time it
        // is discarded before its end shows it is blank).
        for piece in [1, 64] {
            let got = frames(b"      \nx\n", 4, piece).await;
            assert!(matches!(got[..], [Frame::TooLong(6, _), Frame::Line(_)]), "reads of {piece}: {got:?}");
            let got = frames(b"x\n      ", 4, piece).await;
            assert!(matches!(got[..], [Frame::Line(_), Frame::TooLong(6, _)]), "reads of {piece}, last line: {got:?}");
        }
    }
}
