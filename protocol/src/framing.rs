//! Length-delimited frames: a 4-byte big-endian length, then one prost
//! message. A frame larger than the cap is refused before any allocation, and
//! a short read is an error, never a partial message.

use std::io::{self, Read, Write};

use prost::Message;

/// Largest frame accepted by default (control messages are small).
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the connection")]
    Closed,
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("connection ended inside a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
}

/// Writes `msg` as one frame.
pub fn write_frame<W: Write, M: Message>(w: &mut W, msg: &M) -> Result<(), FrameError> {
    let body = msg.encode_to_vec();
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and decodes it; `max` caps the accepted length.
pub fn read_frame<R: Read, M: Message + Default>(r: &mut R, max: usize) -> Result<M, FrameError> {
    let mut hdr = [0u8; 4];
    let got = read_full(r, &mut hdr)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < 4 {
        return Err(FrameError::Truncated { got, want: 4 });
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated { got, want: len });
    }
    Ok(M::decode(body.as_slice())?)
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, io::Error> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
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
    use crate::pb;

    #[test]
    fn round_trip() {
        let req = pb::Request {
            version: pb::Version::Version1 as i32,
            op: Some(pb::request::Op::Checkpoint(pb::CheckpointRequest {
                stop: true,
            })),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        let back: pb::Request = read_frame(&mut buf.as_slice(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_body() {
        let mut buf = (64u32 * 1024 * 1024).to_be_bytes().to_vec();
        buf.extend_from_slice(&[0; 8]);
        let err = read_frame::<_, pb::Request>(&mut buf.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let req = pb::Request {
            version: 1,
            op: Some(pb::request::Op::Status(pb::StatusRequest {})),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        buf.truncate(buf.len() - 1);
        let err = read_frame::<_, pb::Request>(&mut buf.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
        let err =
            read_frame::<_, pb::Request>(&mut [0u8, 0].as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { got: 2, want: 4 }),
            "{err}"
        );
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = read_frame::<_, pb::Request>(&mut buf.as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)), "{err}");
    }

    #[test]
    fn empty_stream_is_closed() {
        let err =
            read_frame::<_, pb::Request>(&mut [0u8; 0].as_slice(), DEFAULT_MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::Closed));
    }
}
