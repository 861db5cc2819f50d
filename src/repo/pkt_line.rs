//! git's pkt-line framing, as the smart HTTP protocol (v0) and the change probe read it:
//! four hex digits giving the length of the line including them, then the payload;
//! `0000` is a flush packet and `0004` an empty line. Lengths 1 to 3 (v2's delimiters)
//! are not part of v0 and are errors, as is a length beyond [`MAX_LEN`], a header that is not hex, and a line
//! cut short.

use std::io::Read;

/// The largest pkt-line git sends or accepts (`LARGE_PACKET_MAX`): 65516 payload bytes.
pub const MAX_LEN: usize = 65520;

/// One packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// `0000`.
    Flush,
    /// A line's payload (without the length).
    Data(&'a [u8]),
}

/// The length in a pkt-line header: `Ok(0)` for a flush, else 4 to [`MAX_LEN`].
pub fn length(header: [u8; 4]) -> Result<usize, String> {
    let text = std::str::from_utf8(&header)
        .ok()
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("malformed pkt-line length '{}'", header.escape_ascii()))?;
    let len = usize::from_str_radix(text, 16).expect("four hex digits");
    match len {
        0 => Ok(0),
        1..=3 => Err(format!("malformed pkt-line length {len}")),
        len if len > MAX_LEN => Err(format!("pkt-line length {len} is larger than {MAX_LEN}")),
        len => Ok(len),
    }
}

/// The packets of `bytes`, which must end at a packet boundary.
pub fn split(bytes: &[u8]) -> Result<Vec<Packet<'_>>, String> {
    let mut packets = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let header: [u8; 4] = rest
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| "truncated pkt-line length".to_string())?;
        let len = length(header)?;
        if len == 0 {
            packets.push(Packet::Flush);
            rest = &rest[4..];
            continue;
        }
        let payload = rest.get(4..len).ok_or_else(|| {
            format!(
                "truncated pkt-line: {len} bytes announced, {} left",
                rest.len()
            )
        })?;
        packets.push(Packet::Data(payload));
        rest = &rest[len..];
    }
    Ok(packets)
}

/// Reads pkt-lines from a stream, one at a time, into its own buffer.
pub struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
}

/// What [`Reader::read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    Packet(Packet<'a>),
    /// Four bytes that are not a pkt-line header (a raw pack's `PACK`, say): handed
    /// back for the caller to judge.
    Raw([u8; 4]),
    /// The stream ended at a packet boundary.
    End,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            buf: Vec::with_capacity(MAX_LEN),
        }
    }

    /// The next packet, or four bytes that are not a header ([`Next::Raw`]).
    pub fn read(&mut self) -> Result<Next<'_>, String> {
        let mut header = [0u8; 4];
        let got = read_full(&mut self.inner, &mut header)?;
        if got == 0 {
            return Ok(Next::End);
        }
        if got < 4 {
            return Err("truncated pkt-line length".into());
        }
        if !header.iter().all(u8::is_ascii_hexdigit) {
            return Ok(Next::Raw(header));
        }
        let len = length(header)?;
        if len == 0 {
            return Ok(Next::Packet(Packet::Flush));
        }
        self.buf.resize(len - 4, 0);
        let got = read_full(&mut self.inner, &mut self.buf)?;
        if got < len - 4 {
            return Err(format!(
                "truncated pkt-line: {len} bytes announced, {} read",
                got + 4
            ));
        }
        Ok(Next::Packet(Packet::Data(&self.buf)))
    }

    /// The stream after the packets read so far.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Fills `buf` unless the stream ends first; how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, String> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("failed to read the answer: {e}")),
        }
    }
    Ok(got)
}

/// `payload` as one pkt-line.
pub fn encode(payload: &str) -> String {
    format!("{:04x}{payload}", payload.len() + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_flushes() {
        let bytes = format!("{}0000{}", encode("a\n"), encode("bc"));
        assert_eq!(
            split(bytes.as_bytes()).unwrap(),
            vec![Packet::Data(b"a\n"), Packet::Flush, Packet::Data(b"bc")]
        );
        assert_eq!(split(b"").unwrap(), vec![]);
        assert_eq!(split(b"0004").unwrap(), vec![Packet::Data(b"")]);
    }

    #[test]
    fn bad_input_is_an_error() {
        // Truncated: a header cut short, a payload shorter than announced.
        assert!(split(b"00").unwrap_err().contains("truncated"));
        assert!(split(b"0009abc").unwrap_err().contains("truncated"));
        // Lengths that cannot be: 1 to 3, beyond the maximum.
        for bad in [&b"0001"[..], b"0003", b"fff1xxxx", b"ffff"] {
            assert!(split(bad).is_err(), "{bad:?}");
        }
        assert!(split(b"fff1").unwrap_err().contains("larger than"));
        // Garbage: not hex, not ASCII.
        assert!(split(b"<html>").unwrap_err().contains("malformed"));
        assert!(split(&[0xff, 0xfe, 0x00, 0x01]).is_err());
        assert!(split(b"+123abc").is_err());
    }

    #[test]
    fn the_reader_reads_packets_then_hands_back_raw_bytes() {
        let mut bytes = format!("{}0000", encode("NAK\n")).into_bytes();
        bytes.extend_from_slice(b"PACK\0\0\0\x02");
        let mut reader = Reader::new(&bytes[..]);
        assert_eq!(reader.read(), Ok(Next::Packet(Packet::Data(b"NAK\n"))));
        assert_eq!(reader.read(), Ok(Next::Packet(Packet::Flush)));
        assert_eq!(reader.read(), Ok(Next::Raw(*b"PACK")));
        let mut rest = Vec::new();
        reader.into_inner().read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"\0\0\0\x02");
        assert_eq!(Reader::new(&b""[..]).read(), Ok(Next::End));
    }

    #[test]
    fn the_reader_refuses_bad_input() {
        let next = |bytes: &[u8]| Reader::new(bytes).read().map(|_| ());
        assert!(next(b"00").unwrap_err().contains("truncated"));
        assert!(next(b"000aabc").unwrap_err().contains("truncated"));
        assert!(next(b"ffffabc").unwrap_err().contains("larger than"));
        assert!(next(b"0002").is_err());
        // A huge announced length is refused before anything is allocated for it.
        assert!(next(b"fff1").unwrap_err().contains("larger than"));
    }
}
