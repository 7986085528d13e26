//! Newline-delimited JSON-RPC over a child's stdio, with a bound on the line length.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// One line, without its `\n` (and without a trailing `\r`). Never empty.
    Line(Bytes),
    /// A line longer than the limit was discarded; its length so far.
    TooLong(usize),
}

pub struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    /// Bytes of `buf` already searched for `\n`.
    scanned: usize,
    max: usize,
    /// Length discarded so far of an over-long line.
    discarding: Option<usize>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader { inner, buf: BytesMut::with_capacity(64 * 1024), scanned: 0, max, discarding: None }
    }

    /// The next frame; `None` at end of stream.
    pub async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + i;
                let mut line = self.buf.split_to(end + 1);
                self.scanned = 0;
                if let Some(n) = self.discarding.take() {
                    return Ok(Some(Frame::TooLong(n + end)));
                }
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                // Length first: an over-long line is reported whatever it holds, as it is
                // when it arrives in pieces and is discarded before its end is seen.
                if line.len() > self.max {
                    return Ok(Some(Frame::TooLong(line.len())));
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
                self.buf.clear();
                self.scanned = 0;
            }
            if self.buf.capacity() - self.buf.len() < 8192 {
                self.buf.reserve(64 * 1024);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if let Some(n) = self.discarding.take() {
                    return Ok(Some(Frame::TooLong(n)));
                }
                // A last line without '\n'.
                let line = self.buf.split().freeze();
                self.scanned = 0;
                if line.len() > self.max {
                    return Ok(Some(Frame::TooLong(line.len())));
                }
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    return Ok(None);
                }
                return Ok(Some(Frame::Line(line)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

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
        assert_eq!(lr.next_frame().await.unwrap(), Some(Frame::TooLong(100)));
        assert_eq!(lr.next_frame().await.unwrap(), Some(Frame::Line(Bytes::from_static(b"short"))));
        assert_eq!(lr.next_frame().await.unwrap(), Some(Frame::TooLong(12)));
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
            assert_eq!(frames(b"abcd\r\nx\n", 4, piece).await, vec![Frame::Line(Bytes::from_static(b"abcd")), Frame::Line(Bytes::from_static(b"x"))], "reads of {piece}");
        }
        // A blank line longer than the limit: too long, however it arrives (one byte at a time it
        // is discarded before its end shows it is blank).
        for piece in [1, 64] {
            let got = frames(b"      \nx\n", 4, piece).await;
            assert!(matches!(got[..], [Frame::TooLong(6), Frame::Line(_)]), "reads of {piece}: {got:?}");
            let got = frames(b"x\n      ", 4, piece).await;
            assert!(matches!(got[..], [Frame::Line(_), Frame::TooLong(6)]), "reads of {piece}, last line: {got:?}");
        }
    }
}
