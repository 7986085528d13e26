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
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                if line.len() > self.max {
                    return Ok(Some(Frame::TooLong(line.len())));
                }
                return Ok(Some(Frame::Line(line.freeze())));
            }
            self.scanned = self.buf.len();
            if let Some(n) = self.discarding.as_mut() {
                *n += self.buf.len();
                self.buf.clear();
                self.scanned = 0;
            } else if self.buf.len() > self.max {
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
                if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                    return Ok(None);
                }
                // A last line without '\n'.
                let line = self.buf.split().freeze();
                self.scanned = 0;
                if line.len() > self.max {
                    return Ok(Some(Frame::TooLong(line.len())));
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
}
