//! The frames of [`crate::framing`] (a 4-byte big-endian length, then one
//! prost message) over tokio streams.
//!
//! A length above the cap is refused before anything is allocated for the
//! body, and the body buffer then grows only with bytes that actually
//! arrive: a peer announcing a large frame and going quiet costs what it sent,
//! not what it announced. A connection that ends inside a frame is
//! [`FrameError::Truncated`]; one that ends between frames is
//! [`FrameError::Closed`]. No input makes these functions panic.

use std::io;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use crate::framing::{FrameError, DEFAULT_MAX_FRAME};

/// Body bytes reserved up front; past this the buffer grows as data arrives.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// Writes `msg` as one frame (header and body in one write).
pub async fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
    M: Message,
{
    let body = msg.encode_to_vec();
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame of at most `max` body bytes and decodes it.
pub async fn read_frame<R, M>(r: &mut R, max: usize) -> Result<M, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
    M: Message + Default,
{
    let mut hdr = [0u8; 4];
    let got = read_full(r, &mut hdr).await?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < hdr.len() {
        return Err(FrameError::Truncated {
            got,
            want: hdr.len(),
        });
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = Vec::with_capacity(len.min(INITIAL_BODY_CAPACITY));
    // `take` stops at exactly `len` bytes: the next frame stays unread.
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(FrameError::Truncated {
            got: body.len(),
            want: len,
        });
    }
    Ok(M::decode(body.as_slice())?)
}

/// [`read_frame`] that gives up after `limit`. A timeout is
/// `FrameError::Io` of kind [`io::ErrorKind::TimedOut`] (see
/// [`FrameError::is_timeout`]). A frame partly read when time runs out is
/// lost, so after a timeout the stream is out of step: drop it.
pub async fn read_frame_timeout<R, M>(
    r: &mut R,
    max: usize,
    limit: Duration,
) -> Result<M, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
    M: Message + Default,
{
    match tokio::time::timeout(limit, read_frame(r, max)).await {
        Ok(result) => result,
        Err(_) => Err(timed_out("no complete frame", limit)),
    }
}

/// [`write_frame`] that gives up after `limit` (a peer that stops reading
/// fills the socket buffer and would block the writer forever).
pub async fn write_frame_timeout<W, M>(
    w: &mut W,
    msg: &M,
    limit: Duration,
) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
    M: Message,
{
    match tokio::time::timeout(limit, write_frame(w, msg)).await {
        Ok(result) => result,
        Err(_) => Err(timed_out("frame not written", limit)),
    }
}

impl FrameError {
    /// The read or write timed out (see [`read_frame_timeout`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e) if e.kind() == io::ErrorKind::TimedOut)
    }
}

fn timed_out(what: &str, limit: Duration) -> FrameError {
    FrameError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} within {} ms", limit.as_millis()),
    ))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
async fn read_full<R>(r: &mut R, buf: &mut [u8]) -> Result<usize, io::Error>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::pb;

    fn hb(seq: u64) -> pb::Frame {
        pb::Heartbeat {
            seq,
            sent_unix_ms: 1_700_000_000_000,
            ..Default::default()
        }
        .into()
    }

    #[tokio::test]
    async fn round_trip_many_frames_over_a_small_pipe() {
        // An 8-byte pipe forces every frame through many partial reads.
        let (mut a, mut b) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            for seq in 1..=50 {
                write_frame(&mut a, &hb(seq)).await.unwrap();
            }
        });
        for seq in 1..=50 {
            let f: pb::Frame = read_frame(&mut b, 1024).await.unwrap();
            assert_eq!(f, hb(seq));
        }
        writer.await.unwrap();
        let err = read_frame::<_, pb::Frame>(&mut b, 1024).await.unwrap_err();
        assert!(matches!(err, FrameError::Closed), "{err}");
    }

    #[tokio::test]
    async fn sync_and_async_framing_agree() {
        let mut sync_bytes = Vec::new();
        crate::framing::write_frame(&mut sync_bytes, &hb(7)).unwrap();
        let mut async_bytes = Vec::new();
        write_frame(&mut async_bytes, &hb(7)).await.unwrap();
        assert_eq!(sync_bytes, async_bytes);
    }

    #[tokio::test]
    async fn oversized_length_is_refused_without_reading_the_body() {
        // A 1 GiB header followed by nothing: refused at once, not after
        // waiting for (or allocating) a gigabyte.
        let bytes = (1u32 << 30).to_be_bytes();
        let err = read_frame::<_, pb::Frame>(&mut bytes.as_slice(), DEFAULT_MAX_FRAME)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { len, .. } if len == 1 << 30),
            "{err}"
        );
        let bytes = u32::MAX.to_be_bytes();
        let err = read_frame::<_, pb::Frame>(&mut bytes.as_slice(), usize::MAX)
            .await
            .unwrap_err();
        // Accepted by the cap, so it is read, and the stream ends early.
        assert!(matches!(err, FrameError::Truncated { got: 0, .. }), "{err}");
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncated() {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &hb(1)).await.unwrap();
        for cut in 1..bytes.len() {
            let err = read_frame::<_, pb::Frame>(&mut &bytes[..cut], 1024)
                .await
                .unwrap_err();
            let want = if cut < 4 { 4 } else { bytes.len() - 4 };
            assert!(
                matches!(err, FrameError::Truncated { want: w, .. } if w == want),
                "cut {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn garbage_body_is_a_decode_error() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame::<_, pb::Frame>(&mut bytes.as_slice(), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[tokio::test]
    async fn read_timeout_fires_on_a_silent_peer() {
        let (_a, mut b) = tokio::io::duplex(64);
        let err = read_frame_timeout::<_, pb::Frame>(&mut b, 1024, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(err.to_string().contains("50 ms"), "{err}");
    }

    #[tokio::test]
    async fn write_timeout_fires_on_a_peer_that_does_not_read() {
        let (mut a, _b) = tokio::io::duplex(16);
        let big = pb::Frame::from(pb::Reject {
            reason: "x".repeat(1000),
            ..Default::default()
        });
        let err = write_frame_timeout(&mut a, &big, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Prng(u64);
    impl Prng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[tokio::test]
    async fn random_bytes_never_panic() {
        let mut rng = Prng(0x9e37_79b9_7f4a_7c15);
        let mut valid = Vec::new();
        write_frame(
            &mut valid,
            &pb::Frame::from(pb::Prepare {
                job: "j".into(),
                epoch: 3,
                mode: pb::CheckpointMode::Stop as i32,
                deadlines: Some(pb::Deadlines::default()),
                epoch_dir: "/ckpt/j/3".into(),
            }),
        )
        .await
        .unwrap();
        let (mut ok, mut closed, mut truncated, mut too_large, mut decode) = (0, 0, 0, 0, 0);
        for i in 0..2000 {
            let mut bytes: Vec<u8> = match i % 4 {
                // Pure noise.
                0 => (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
                // A plausible small length, then noise of about that size.
                1 => {
                    let len = rng.below(48) as u32;
                    let mut b = len.to_be_bytes().to_vec();
                    let n = rng.below(u64::from(len) + 8);
                    b.extend((0..n).map(|_| rng.next() as u8));
                    b
                }
                // A valid frame with a few bytes flipped.
                2 => {
                    let mut b = valid.clone();
                    for _ in 0..=rng.below(4) {
                        let at = rng.below(b.len() as u64) as usize;
                        b[at] ^= 1 << rng.below(8);
                    }
                    b
                }
                // A valid frame cut short or run on.
                _ => {
                    let mut b = valid.clone();
                    let cut = rng.below(b.len() as u64 + 1) as usize;
                    b.truncate(cut);
                    if rng.below(2) == 0 {
                        b.extend((0..rng.below(16)).map(|_| rng.next() as u8));
                    }
                    b
                }
            };
            if i % 50 == 0 {
                bytes = (u32::MAX - rng.below(1000) as u32).to_be_bytes().to_vec();
            }
            match read_frame::<_, pb::Frame>(&mut bytes.as_slice(), 256).await {
                Ok(_) => ok += 1,
                Err(FrameError::Closed) => closed += 1,
                Err(FrameError::Truncated { got, want }) => {
                    assert!(got < want);
                    truncated += 1;
                }
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max);
                    too_large += 1;
                }
                Err(FrameError::Decode(_)) => decode += 1,
                Err(FrameError::Io(e)) => panic!("I/O error from a byte slice: {e}"),
            }
        }
        // Every class of outcome was exercised.
        assert!(
            ok > 0 && closed > 0 && truncated > 0 && too_large > 0 && decode > 0,
            "ok {ok} closed {closed} truncated {truncated} too_large {too_large} decode {decode}"
        );
    }
}
