//! `bridge::framing::LineReader`: whatever a server writes, and however the kernel splits it into
//! reads, the frames are the same, and each `Line` is a real line within the limit.
//!
//! Input: byte 0 picks the line limit (1..=256), byte 1 the read sizes, the rest is the stream.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use mcpbox::bridge::framing::{Frame, LineReader};
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out `data` in reads of the sizes `sizes` cycles through (0 = all that fits).
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    i: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let want = match self.sizes[self.i % self.sizes.len()] {
            0 => buf.remaining(),
            n => n.min(buf.remaining()),
        };
        self.i += 1;
        let n = want.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// All frames; the reader never waits (Chunked is always ready), so one poll each suffices.
fn frames(data: &[u8], max: usize, sizes: Vec<usize>) -> Vec<Frame> {
    let mut r = LineReader::new(Chunked { data, sizes, i: 0 }, max);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut out = Vec::new();
    loop {
        let mut fut = std::pin::pin!(r.next_frame());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(Some(f))) => out.push(f),
            Poll::Ready(Ok(None)) => return out,
            Poll::Ready(Err(e)) => panic!("in-memory read failed: {e}"),
            Poll::Pending => panic!("LineReader pending on a reader that is always ready"),
        }
        assert!(out.len() <= data.len() + 1, "more frames than bytes");
    }
}

/// The frames by definition: split at `\n`, drop one trailing `\r`; longer than `max` is
/// `TooLong` (blank or not), else blank lines are skipped.
fn model(data: &[u8], max: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // The text after the last '\n' (possibly empty) is a last line without '\n'.
    let last = pieces.pop().unwrap_or_default();
    for p in pieces {
        let p = p.strip_suffix(b"\r").unwrap_or(p);
        model_line(p, max, &mut out);
    }
    model_line(last, max, &mut out);
    out
}

fn model_line(line: &[u8], max: usize, out: &mut Vec<Frame>) {
    if line.len() > max {
        let head = bytes::Bytes::copy_from_slice(&line[..line.len().min(mcpbox::bridge::framing::HEAD)]);
        out.push(Frame::TooLong(line.len(), head));
    } else if !line.iter().all(|b| b.is_ascii_whitespace()) {
        out.push(Frame::Line(bytes::Bytes::copy_from_slice(line)));
    }
}

/// `TooLong` counts are approximate (they may include a `\r`, or stop where reading did):
/// compare the kind, and that the count is over the limit. The kept opening is the line's own
/// (as much of it as had arrived when discarding began, at most `HEAD` bytes, possibly with the
/// `\r` that ends it).
fn same(a: &[Frame], b: &[Frame], max: usize) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Frame::Line(x), Frame::Line(y)) => x == y,
            (Frame::TooLong(x, hx), Frame::TooLong(y, hy)) => {
                let (hx, hy) = (hx.strip_suffix(b"\r").unwrap_or(hx), hy.strip_suffix(b"\r").unwrap_or(hy));
                let limit = mcpbox::bridge::framing::HEAD;
                *x > max
                    && *y > max
                    && hx.len() <= limit
                    && hy.len() <= limit
                    && (hx.starts_with(hy) || hy.starts_with(hx))
            }
            _ => false,
        })
}

fuzz_target!(|input: &[u8]| {
    let [m, s, data @ ..] = input else { return };
    let max = 1 + *m as usize;
    let sizes: Vec<usize> = vec![(*s & 0x0f) as usize, (*s >> 4) as usize, 1 + (*s as usize % 7)];
    let chunked = frames(data, max, sizes);
    for f in &chunked {
        if let Frame::Line(l) = f {
            assert!(!l.is_empty() && l.len() <= max, "line of {} bytes, limit {max}", l.len());
            assert!(!l.contains(&b'\n'), "a line holds a newline");
        }
    }
    let want = model(data, max);
    assert!(
        same(&chunked, &want, max),
        "limit {max}, reads {:?}\n got {chunked:?}\nwant {want:?}",
        [*s & 0x0f, *s >> 4]
    );
});
