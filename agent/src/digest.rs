//! Order-independent digests of binary COPY data, for the copy's built-in verification.
//!
//! A table's digest is its row count and the wrapping sum of the XXH3-128 hashes of its rows'
//! binary COPY representations (field count, then each field's length and bytes). A sum does not
//! depend on the order of the rows, so the digests of a table's page ranges, copied in parallel
//! and landing in any order, add up to the digest of the whole table.
//!
//! The source side digests the rows as PostgreSQL sends them (one CopyData message per row);
//! the destination side digests the byte stream it hands to `COPY FROM`, parsing the row
//! boundaries itself (chunks from a source-side agent cut rows anywhere). The two must agree.

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

/// The order-independent hash of a set of rows: the wrapping sum of their XXH3-128 hashes.
///
/// It travels (`CopyDone.digest`, `CopyChunk.source_digest`) and is recorded
/// (`pgzm.copy_progress.digest`) as 32 hex digits: [`Display`](std::fmt::Display) and
/// [`FromStr`](std::str::FromStr) here are the one place of that format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RowHash(pub u128);

impl RowHash {
    /// The hash of the union of two disjoint row sets.
    pub fn combine(self, other: RowHash) -> RowHash {
        RowHash(self.0.wrapping_add(other.0))
    }
}

/// 32 lowercase hex digits.
impl std::fmt::Display for RowHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A row hash that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Too short or too long.
    #[error("a row digest is 32 hex digits, not {0} characters")]
    Length(usize),
    /// Something other than hex digits.
    #[error("a row digest is 32 hex digits; {0:?} is not hex")]
    NotHex(String),
}

impl std::str::FromStr for RowHash {
    type Err = DigestError;

    fn from_str(hex: &str) -> Result<Self, DigestError> {
        if hex.len() != 32 {
            return Err(DigestError::Length(hex.len()));
        }
        // from_str_radix alone would take a leading '+'.
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DigestError::NotHex(hex.to_string()));
        }
        u128::from_str_radix(hex, 16)
            .map(RowHash)
            .map_err(|_| DigestError::NotHex(hex.to_string()))
    }
}

/// Row count and order-independent hash of a set of rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest {
    /// Rows.
    pub rows: u64,
    /// Wrapping sum of the rows' XXH3-128 hashes.
    pub sum: RowHash,
}

impl Digest {
    /// Adds one row (its binary COPY tuple bytes).
    pub fn add_row(&mut self, tuple: &[u8]) {
        self.add_hash(xxh3_128(tuple));
    }

    fn add_hash(&mut self, h: u128) {
        self.rows += 1;
        self.sum = self.sum.combine(RowHash(h));
    }

    /// The digest of the union of two disjoint row sets.
    pub fn combine(self, other: Digest) -> Digest {
        Digest {
            rows: self.rows + other.rows,
            sum: self.sum.combine(other.sum),
        }
    }

    /// The hash as 32 hex digits (the row count travels separately).
    pub fn hex(&self) -> String {
        self.sum.to_string()
    }
}

/// Binary COPY signature.
pub const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Signature (11 bytes), flags (4), extension length (4): `need` bytes left to read into
    /// `small`.
    Header,
    /// Skipping `left` bytes of header extension.
    Extension { left: u64 },
    /// At a tuple's 2-byte field count.
    FieldCount,
    /// At a field's 4-byte length; `fields` left in this tuple.
    FieldLength { fields: u16 },
    /// Inside a field's data: `left` bytes, then `fields` more fields.
    FieldData { left: u32, fields: u16 },
    /// After the trailer.
    Done,
}

/// Digests a binary COPY byte stream cut into chunks anywhere.
///
/// A tuple inside one chunk is hashed in one call; a tuple cut by a chunk boundary is hashed
/// incrementally (no copy of large values).
pub struct StreamDigester {
    state: State,
    /// Partial fixed-size fields (header, counts, lengths) across chunk boundaries.
    small: Vec<u8>,
    /// The current tuple, when it started in an earlier chunk.
    partial: Option<Box<Xxh3>>,
    digest: Digest,
    malformed: Option<&'static str>,
}

impl Default for StreamDigester {
    fn default() -> Self {
        StreamDigester {
            state: State::Header,
            small: Vec::with_capacity(19),
            partial: None,
            digest: Digest::default(),
            malformed: None,
        }
    }
}

impl StreamDigester {
    /// Feeds the next chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut pos = 0usize;
        // Start of the current tuple within this chunk (None: it began in an earlier chunk).
        let mut tuple_start: Option<usize> = None;
        while pos < chunk.len() && self.malformed.is_none() {
            match self.state {
                State::Header => {
                    let need = 19 - self.small.len();
                    let take = need.min(chunk.len() - pos);
                    self.small.extend_from_slice(&chunk[pos..pos + take]);
                    pos += take;
                    if self.small.len() == 19 {
                        if &self.small[..11] != BINARY_SIGNATURE {
                            self.malformed = Some("bad binary COPY signature");
                            break;
                        }
                        let ext = u32::from_be_bytes([
                            self.small[15],
                            self.small[16],
                            self.small[17],
                            self.small[18],
                        ]);
                        self.small.clear();
                        self.state = if ext > 0 {
                            State::Extension {
                                left: u64::from(ext),
                            }
                        } else {
                            State::FieldCount
                        };
                    }
                }
                State::Extension { left } => {
                    let take = (left as usize).min(chunk.len() - pos);
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::FieldCount
                    } else {
                        State::Extension { left }
                    };
                }
                State::FieldCount => {
                    if self.small.is_empty() {
                        tuple_start = Some(pos);
                    }
                    let Some(bytes) = self.fixed::<2>(chunk, &mut pos) else {
                        continue;
                    };
                    let n = i16::from_be_bytes(bytes);
                    if n == -1 {
                        self.state = State::Done;
                        tuple_start = None;
                        self.partial = None;
                        continue;
                    }
                    if n < 0 {
                        self.malformed = Some("negative field count");
                        break;
                    }
                    // A count cut by the chunk boundary starts the incremental hash.
                    self.carry(tuple_start, &bytes);
                    self.next_field(chunk, &mut tuple_start, pos, n as u16);
                }
                State::FieldLength { fields } => {
                    let Some(bytes) = self.fixed::<4>(chunk, &mut pos) else {
                        continue;
                    };
                    self.carry(tuple_start, &bytes);
                    let len = i32::from_be_bytes(bytes);
                    let fields = fields - 1;
                    if len < -1 {
                        self.malformed = Some("negative field length");
                        break;
                    }
                    if len > 0 {
                        self.state = State::FieldData {
                            left: len as u32,
                            fields,
                        };
                    } else {
                        self.next_field(chunk, &mut tuple_start, pos, fields);
                    }
                }
                State::FieldData { left, fields } => {
                    let take = (left as usize).min(chunk.len() - pos);
                    self.carry(tuple_start, &chunk[pos..pos + take]);
                    pos += take;
                    let left = left - take as u32;
                    if left > 0 {
                        self.state = State::FieldData { left, fields };
                    } else {
                        self.next_field(chunk, &mut tuple_start, pos, fields);
                    }
                }
                State::Done => {
                    self.malformed = Some("data after the trailer");
                    break;
                }
            }
        }
        // A tuple that started in this chunk and goes on in the next: hash what is here (bytes
        // of a cut count or length wait in `small` and are hashed once complete).
        if let (Some(start), None) = (tuple_start, self.malformed) {
            let mut h = Box::new(Xxh3::new());
            h.update(&chunk[start..chunk.len() - self.small.len()]);
            self.partial = Some(h);
        }
    }

    /// Bytes of the current tuple when it began in an earlier chunk (`tuple_start` is `None`):
    /// they go to its incremental hash. (A tuple that began in this chunk is hashed whole.)
    fn carry(&mut self, tuple_start: Option<usize>, bytes: &[u8]) {
        if tuple_start.is_none() {
            self.partial
                .get_or_insert_with(|| Box::new(Xxh3::new()))
                .update(bytes);
        }
    }

    /// After a field (or a tuple's field count): the next field's length, or, with no field
    /// left, the end of the tuple.
    fn next_field(
        &mut self,
        chunk: &[u8],
        tuple_start: &mut Option<usize>,
        pos: usize,
        fields_left: u16,
    ) {
        if fields_left == 0 {
            self.finish_tuple(chunk, tuple_start.take(), pos);
            self.state = State::FieldCount;
        } else {
            self.state = State::FieldLength {
                fields: fields_left,
            };
        }
    }

    /// Reads a fixed-size big-endian field that may be cut by chunk boundaries.
    fn fixed<const N: usize>(&mut self, chunk: &[u8], pos: &mut usize) -> Option<[u8; N]> {
        if self.small.is_empty() && chunk.len() - *pos >= N {
            let mut out = [0u8; N];
            out.copy_from_slice(&chunk[*pos..*pos + N]);
            *pos += N;
            return Some(out);
        }
        let take = (N - self.small.len()).min(chunk.len() - *pos);
        self.small.extend_from_slice(&chunk[*pos..*pos + take]);
        *pos += take;
        if self.small.len() < N {
            return None;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.small);
        self.small.clear();
        Some(out)
    }

    fn finish_tuple(&mut self, chunk: &[u8], start: Option<usize>, end: usize) {
        match (start, self.partial.take()) {
            (Some(start), _) => self.digest.add_row(&chunk[start..end]),
            (None, Some(h)) => self.digest.add_hash(h.digest128()),
            (None, None) => self.malformed = Some("tuple without a start"),
        }
    }

    /// The digest of the rows seen, or what was wrong with the stream. A stream that ended
    /// without its trailer is incomplete.
    pub fn finish(&self) -> Result<Digest, &'static str> {
        if let Some(m) = self.malformed {
            return Err(m);
        }
        if self.state != State::Done {
            return Err("the stream ended inside the data (no trailer)");
        }
        Ok(self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut t = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => t.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    t.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    t.extend_from_slice(b);
                }
            }
        }
        t
    }

    fn stream(tuples: &[Vec<u8>]) -> Vec<u8> {
        let mut s = BINARY_SIGNATURE.to_vec();
        s.extend_from_slice(&[0; 8]);
        for t in tuples {
            s.extend_from_slice(t);
        }
        s.extend_from_slice(&(-1i16).to_be_bytes());
        s
    }

    fn sample() -> Vec<Vec<u8>> {
        let big = vec![7u8; 5000];
        vec![
            tuple(&[Some(b"1".as_slice()), Some(b"hello".as_slice()), None]),
            tuple(&[Some(b"".as_slice()), None, Some(big.as_slice())]),
            tuple(&[]),
            tuple(&[Some(b"x".as_slice()); 3]),
        ]
    }

    fn expected(tuples: &[Vec<u8>]) -> Digest {
        let mut d = Digest::default();
        for t in tuples {
            d.add_row(t);
        }
        d
    }

    #[test]
    fn any_chunking_gives_the_same_digest() {
        let tuples = sample();
        let s = stream(&tuples);
        let want = expected(&tuples);
        for size in [1usize, 2, 3, 5, 7, 19, 20, 64, 1000, s.len()] {
            let mut d = StreamDigester::default();
            for c in s.chunks(size) {
                d.feed(c);
            }
            assert_eq!(d.finish(), Ok(want), "chunks of {size}");
        }
    }

    #[test]
    fn order_does_not_matter_and_ranges_add_up() {
        let t = sample();
        let mut rev = t.clone();
        rev.reverse();
        assert_eq!(expected(&t), expected(&rev));
        assert_eq!(expected(&t[..2]).combine(expected(&t[2..])), expected(&t));
        assert_ne!(expected(&t[..3]), expected(&t));
        let mut changed = t.clone();
        changed[0] = tuple(&[Some(b"2".as_slice()), Some(b"hello".as_slice()), None]);
        assert_ne!(expected(&changed).sum, expected(&t).sum);
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let s = stream(&sample());
        let mut d = StreamDigester::default();
        d.feed(&s[..s.len() - 10]);
        assert!(d.finish().is_err());
        let mut d = StreamDigester::default();
        d.feed(b"not a copy stream at all");
        assert!(d.finish().is_err());
    }

    #[test]
    fn hex_round_trips() {
        let d = expected(&sample());
        assert_eq!(d.hex().parse::<RowHash>(), Ok(d.sum));
        assert_eq!(RowHash(1).to_string(), "00000000000000000000000000000001");
        assert_eq!(
            "0123456789ABCDEF0123456789abcdef".parse(),
            Ok(RowHash(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef))
        );
    }

    #[test]
    fn malformed_hex_is_refused() {
        assert_eq!("zz".parse::<RowHash>(), Err(DigestError::Length(2)));
        assert_eq!("".parse::<RowHash>(), Err(DigestError::Length(0)));
        let plus = format!("+{}", "0".repeat(31));
        assert_eq!(
            plus.parse::<RowHash>(),
            Err(DigestError::NotHex(plus.clone()))
        );
        let g = format!("{}g", "0".repeat(31));
        assert_eq!(g.parse::<RowHash>(), Err(DigestError::NotHex(g.clone())));
    }

    #[test]
    fn hashes_add_up_wrapping() {
        let max = RowHash(u128::MAX);
        assert_eq!(max.combine(RowHash(2)), RowHash(1));
    }
}
