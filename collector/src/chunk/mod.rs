//! Compressed chunks of one series, in two forms that share one decoder.
//!
//! The streaming form (version 1, this file) is what the head appends to one
//! sample at a time: Gorilla-style delta-of-delta timestamps, and values
//! either XOR-encoded (floats) or delta-of-delta encoded (when every value of
//! the chunk is an exact integer: temperatures, byte counts). A chunk is
//! stored closed, and the head flushed at shutdown, in the smaller of this
//! form and the compact form (version 2, [`compact`]), which sees the whole
//! chunk before choosing its encodings.
//!
//! Layout (version 1):
//!
//! ```text
//! byte 0      version (1)
//! byte 1      value mode: 0 = float XOR, 1 = integer delta-of-delta
//! varint      number of samples
//! varint      first timestamp (zigzag)
//! bits        the first value (64 bits), then per sample after the first:
//!             timestamp delta-of-delta, then the value
//! ```
//!
//! Timestamp delta-of-delta (milliseconds): `0` → 1 bit; ±64 → `10`+7;
//! ±2048 → `110`+12; ±2^19 → `1110`+20; else `1111`+64. Agents share a tick,
//! so a steady series costs one bit per timestamp.
//!
//! Integer values, delta-of-delta: `0` → 1 bit; ±8 → `10`+4; ±128 → `110`+8;
//! ±32768 → `1110`+16; ±2^31 → `11110`+32; else `11111`+64. A constant gauge
//! or a counter growing at a constant rate costs one bit per value.
//!
//! Float values, XOR with the previous value (Facebook's Gorilla): `0` when
//! equal; `10` + meaningful bits inside the previous window; `11` + 5 bits of
//! leading zeros + 6 bits of length + the meaningful bits otherwise.
//!
//! All arithmetic on timestamps and integers wraps, so any i64 timestamps
//! round-trip; values are handled as raw bits, so every f64 (NaN payloads,
//! ±Inf, -0.0, subnormals) round-trips exactly.

use std::fmt;

pub mod compact;

const VERSION: u8 = 1;
const MODE_FLOAT: u8 = 0;
const MODE_INT: u8 = 1;

/// A chunk that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptChunk(pub &'static str);

impl fmt::Display for CorruptChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "corrupt chunk: {}", self.0)
    }
}

impl std::error::Error for CorruptChunk {}

#[derive(Default, Clone)]
struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 = start a new byte).
    used: u8,
}

impl BitWriter {
    fn write_bit(&mut self, bit: bool) {
        if self.used == 0 {
            self.bytes.push(0);
        }
        if bit {
            let last = self.bytes.len() - 1;
            self.bytes[last] |= 0x80 >> self.used;
        }
        self.used = (self.used + 1) % 8;
    }

    /// Writes the low `n` bits of `v`, most significant first.
    fn write_bits(&mut self, v: u64, n: u32) {
        let mut n = n;
        while n > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let free = 8 - u32::from(self.used);
            let take = free.min(n);
            let chunk = ((v >> (n - take)) & ((1u64 << take) - 1)) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= chunk << (free - take);
            self.used = ((u32::from(self.used) + take) % 8) as u8;
            n -= take;
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn read_bit(&mut self) -> Result<bool, CorruptChunk> {
        let byte = *self
            .bytes
            .get(self.pos / 8)
            .ok_or(CorruptChunk("truncated"))?;
        let bit = byte & (0x80 >> (self.pos % 8)) != 0;
        self.pos += 1;
        Ok(bit)
    }

    /// The 64 bits from the byte holding `pos`, when 8 bytes remain there.
    #[inline]
    fn window(&self) -> Option<u64> {
        let at = self.pos / 8;
        let b = self.bytes.get(at..at.checked_add(8)?)?;
        let w: [u8; 8] = b.try_into().ok()?;
        Some(u64::from_be_bytes(w) << (self.pos % 8))
    }

    #[inline]
    fn read_bits(&mut self, n: u32) -> Result<u64, CorruptChunk> {
        // Fast path: the bits lie in one 8-byte window (n ≤ 56 always
        // does, the offset in the first byte being at most 7).
        if n == 0 {
            return Ok(0);
        }
        if n <= 56
            && let Some(w) = self.window()
        {
            self.pos += n as usize;
            return Ok(w >> (64 - n));
        }
        self.read_bits_slow(n)
    }

    fn read_bits_slow(&mut self, n: u32) -> Result<u64, CorruptChunk> {
        let mut v = 0u64;
        let mut n = n;
        while n > 0 {
            let byte = *self
                .bytes
                .get(self.pos / 8)
                .ok_or(CorruptChunk("truncated"))?;
            let off = (self.pos % 8) as u32;
            let avail = 8 - off;
            let take = avail.min(n);
            let bits = (u64::from(byte) >> (avail - take)) & ((1u64 << take) - 1);
            v = if take == 64 { bits } else { (v << take) | bits };
            self.pos += take as usize;
            n -= take;
        }
        Ok(v)
    }

    /// Counts leading one bits, up to `max` (and takes the zero after them
    /// when there are fewer).
    #[inline]
    fn read_prefix(&mut self, max: u32) -> Result<u32, CorruptChunk> {
        if let Some(w) = self.window() {
            let ones = (!w).leading_zeros();
            // The window holds at least 57 bits: decided inside it.
            if ones < 57 || max < 57 {
                let n = ones.min(max);
                self.pos += n as usize + usize::from(n < max);
                return Ok(n);
            }
        }
        let mut n = 0;
        while n < max && self.read_bit()? {
            n += 1;
        }
        Ok(n)
    }
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(crate) fn get_varint(bytes: &[u8], pos: &mut usize) -> Result<u64, CorruptChunk> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos).ok_or(CorruptChunk("truncated header"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CorruptChunk("varint too long"))
}

/// Whether a signed value fits in `bits` bits (two's complement).
fn fits(v: i64, bits: u32) -> bool {
    let lim = 1i64 << (bits - 1);
    (-lim..lim).contains(&v)
}

/// (prefix length, payload bits) buckets; the last bucket holds anything.
const TS_BUCKETS: [(u32, u32); 4] = [(1, 7), (2, 12), (3, 20), (4, 64)];
const INT_BUCKETS: [(u32, u32); 5] = [(1, 4), (2, 8), (3, 16), (4, 32), (5, 64)];

fn write_dod(w: &mut BitWriter, dod: i64, buckets: &[(u32, u32)]) {
    if dod == 0 {
        w.write_bit(false);
        return;
    }
    let last = buckets.len() - 1;
    for (i, &(ones, bits)) in buckets.iter().enumerate() {
        if i == last || fits(dod, bits) {
            // `ones` one-bits then a zero, except the last bucket (no zero).
            w.write_bits((1u64 << ones) - 1, ones);
            if i != last {
                w.write_bit(false);
            }
            let payload = if bits == 64 {
                dod as u64
            } else {
                (dod as u64) & ((1u64 << bits) - 1)
            };
            w.write_bits(payload, bits);
            return;
        }
    }
}

fn read_dod(r: &mut BitReader<'_>, buckets: &[(u32, u32)]) -> Result<i64, CorruptChunk> {
    let ones = r.read_prefix(buckets.len() as u32)?;
    if ones == 0 {
        return Ok(0);
    }
    let (_, bits) = buckets[ones as usize - 1];
    let raw = r.read_bits(bits)?;
    if bits == 64 {
        return Ok(raw as i64);
    }
    // Sign-extend.
    let shift = 64 - bits;
    Ok(((raw << shift) as i64) >> shift)
}

/// Facebook Gorilla's XOR encoding of a stream of f64 bit patterns: the
/// first in 64 bits; then `0` when equal to the previous; `10` + the
/// meaningful bits inside the previous window; `11` + 5 bits of leading
/// zeros + 6 bits of length − 1 + the meaningful bits otherwise.
#[derive(Clone, Default)]
struct XorEncoder {
    started: bool,
    prev: u64,
    /// Window of the last `11` record; None before the first.
    window: Option<(u32, u32)>,
}

impl XorEncoder {
    fn put(&mut self, w: &mut BitWriter, b: u64) {
        if !self.started {
            w.write_bits(b, 64);
        } else {
            let x = b ^ self.prev;
            if x == 0 {
                w.write_bit(false);
            } else {
                w.write_bit(true);
                let lead = x.leading_zeros().min(31);
                let trail = x.trailing_zeros();
                match self.window {
                    Some((l, t)) if lead >= l && trail >= t => {
                        w.write_bit(false);
                        w.write_bits(x >> t, 64 - l - t);
                    }
                    _ => {
                        w.write_bit(true);
                        let len = 64 - lead - trail;
                        w.write_bits(u64::from(lead), 5);
                        w.write_bits(u64::from(len - 1), 6);
                        w.write_bits(x >> trail, len);
                        self.window = Some((lead, trail));
                    }
                }
            }
        }
        self.started = true;
        self.prev = b;
    }
}

/// Reads what [`XorEncoder`] wrote.
#[derive(Default)]
struct XorDecoder {
    started: bool,
    prev: u64,
    window: Option<(u32, u32)>,
}

impl XorDecoder {
    fn get(&mut self, r: &mut BitReader<'_>) -> Result<u64, CorruptChunk> {
        if !self.started {
            self.started = true;
            self.prev = r.read_bits(64)?;
            return Ok(self.prev);
        }
        if r.read_bit()? {
            if r.read_bit()? {
                let leading = r.read_bits(5)? as u32;
                let len = r.read_bits(6)? as u32 + 1;
                if leading + len > 64 {
                    return Err(CorruptChunk("bad XOR window"));
                }
                self.window = Some((leading, 64 - leading - len));
            }
            let Some((l, t)) = self.window else {
                return Err(CorruptChunk("XOR window reused before set"));
            };
            self.prev ^= r.read_bits(64 - l - t)? << t;
        }
        Ok(self.prev)
    }
}

/// Whether `v` is stored exactly by the integer mode.
fn as_exact_int(v: f64) -> Option<i64> {
    if !v.is_finite() || v.abs() >= 9_007_199_254_740_992.0 {
        return None;
    }
    let i = v as i64;
    ((i as f64).to_bits() == v.to_bits()).then_some(i)
}

/// Streaming encoder for one chunk. Starts in integer mode and re-encodes
/// itself as floats the first time a non-integer value arrives.
#[derive(Clone)]
pub struct ChunkEncoder {
    mode: u8,
    count: u64,
    first_ts: i64,
    bits: BitWriter,
    prev_ts: i64,
    prev_ts_delta: i64,
    prev_int: i64,
    prev_int_delta: i64,
    xor: XorEncoder,
    /// Kept only while in integer mode, to re-encode on a mode switch.
    samples: Option<Vec<(i64, f64)>>,
}

impl Default for ChunkEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkEncoder {
    pub fn new() -> Self {
        ChunkEncoder {
            mode: MODE_INT,
            count: 0,
            first_ts: 0,
            bits: BitWriter::default(),
            prev_ts: 0,
            prev_ts_delta: 0,
            prev_int: 0,
            prev_int_delta: 0,
            xor: XorEncoder::default(),
            samples: None,
        }
    }

    fn float() -> Self {
        ChunkEncoder {
            mode: MODE_FLOAT,
            ..Self::new()
        }
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// First and last timestamp, if any sample.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        (self.count > 0).then_some((self.first_ts, self.prev_ts))
    }

    /// Bytes the encoded chunk takes so far.
    pub fn encoded_len(&self) -> usize {
        2 + 10 + 10 + self.bits.bytes.len()
    }

    pub fn push(&mut self, ts: i64, v: f64) {
        if self.mode == MODE_INT {
            match as_exact_int(v) {
                Some(i) => {
                    if self.count < 8 || self.samples.is_some() {
                        // Keep the first few raw: a chunk that turns float
                        // early is re-encoded cheaply; past that we re-decode.
                        self.samples.get_or_insert_with(Vec::new).push((ts, v));
                        if self.count >= 8 {
                            self.samples = None;
                        }
                    }
                    self.push_int(ts, i);
                }
                None => {
                    let mut f = ChunkEncoder::float();
                    for (t, x) in self.decode_self() {
                        f.push_float(t, x);
                    }
                    f.push_float(ts, v);
                    *self = f;
                }
            }
        } else {
            self.push_float(ts, v);
        }
    }

    fn decode_self(&self) -> Vec<(i64, f64)> {
        if let Some(s) = &self.samples {
            return s.clone();
        }
        // Our own bytes always decode.
        decode(&self.bytes()).unwrap_or_default()
    }

    fn push_ts(&mut self, ts: i64) {
        if self.count == 0 {
            self.first_ts = ts;
        } else {
            let delta = ts.wrapping_sub(self.prev_ts);
            let dod = delta.wrapping_sub(self.prev_ts_delta);
            write_dod(&mut self.bits, dod, &TS_BUCKETS);
            self.prev_ts_delta = delta;
        }
        self.prev_ts = ts;
    }

    fn push_int(&mut self, ts: i64, v: i64) {
        self.push_ts(ts);
        if self.count == 0 {
            self.bits.write_bits(v as u64, 64);
        } else {
            let delta = v.wrapping_sub(self.prev_int);
            let dod = delta.wrapping_sub(self.prev_int_delta);
            write_dod(&mut self.bits, dod, &INT_BUCKETS);
            self.prev_int_delta = delta;
        }
        self.prev_int = v;
        self.count += 1;
    }

    fn push_float(&mut self, ts: i64, v: f64) {
        self.push_ts(ts);
        self.xor.put(&mut self.bits, v.to_bits());
        self.count += 1;
    }

    /// The chunk in the smaller of its two forms: the compact one (version
    /// 2, see [`compact`]) for storing a closed chunk, or this streaming one.
    /// Costs a decode and an encode of the whole chunk.
    pub fn compact_bytes(&self) -> Vec<u8> {
        let streaming = self.bytes();
        let samples = match decode(&streaming) {
            Ok(s) => s,
            Err(_) => return streaming,
        };
        match compact::encode(&samples) {
            Some(c) if c.len() < streaming.len() => c,
            _ => streaming,
        }
    }

    /// The encoded chunk in the streaming form (version 1).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bits.bytes.len() + 16);
        out.push(VERSION);
        out.push(self.mode);
        put_varint(&mut out, self.count);
        put_varint(&mut out, zigzag(self.first_ts));
        out.extend_from_slice(&self.bits.bytes);
        out
    }
}

/// Decodes a whole chunk.
pub fn decode(bytes: &[u8]) -> Result<Vec<(i64, f64)>, CorruptChunk> {
    let mut out = Vec::new();
    decode_into(bytes, |ts, v| {
        out.push((ts, v));
        true
    })?;
    Ok(out)
}

/// Decodes samples in order and hands each to `f`; stops early when `f`
/// returns false.
pub fn decode_into(bytes: &[u8], mut f: impl FnMut(i64, f64) -> bool) -> Result<(), CorruptChunk> {
    if bytes.first() == Some(&compact::VERSION) {
        return compact::decode_into(bytes, f);
    }
    if bytes.len() < 2 {
        return Err(CorruptChunk("too short"));
    }
    if bytes[0] != VERSION {
        return Err(CorruptChunk("unknown version"));
    }
    let mode = bytes[1];
    if mode != MODE_FLOAT && mode != MODE_INT {
        return Err(CorruptChunk("unknown value mode"));
    }
    let mut pos = 2;
    let count = get_varint(bytes, &mut pos)?;
    let first_ts = unzigzag(get_varint(bytes, &mut pos)?);
    // Every sample takes at least two bits: a larger count is a lie.
    if count > (bytes.len() as u64 - pos as u64) * 4 + 64 {
        return Err(CorruptChunk("count larger than the data"));
    }
    let mut r = BitReader {
        bytes: &bytes[pos..],
        pos: 0,
    };
    let (mut ts, mut ts_delta) = (first_ts, 0i64);
    let (mut int, mut int_delta) = (0i64, 0i64);
    let mut xor = XorDecoder::default();
    for i in 0..count {
        if i > 0 {
            let dod = read_dod(&mut r, &TS_BUCKETS)?;
            ts_delta = ts_delta.wrapping_add(dod);
            ts = ts.wrapping_add(ts_delta);
        }
        let v = if mode == MODE_INT {
            if i == 0 {
                int = r.read_bits(64)? as i64;
            } else {
                int_delta = int_delta.wrapping_add(read_dod(&mut r, &INT_BUCKETS)?);
                int = int.wrapping_add(int_delta);
            }
            int as f64
        } else {
            f64::from_bits(xor.get(&mut r)?)
        };
        if !f(ts, v) {
            break;
        }
    }
    Ok(())
}

/// Encodes a slice of samples in one go.
pub fn encode(samples: &[(i64, f64)]) -> Vec<u8> {
    let mut e = ChunkEncoder::new();
    for &(t, v) in samples {
        e.push(t, v);
    }
    e.bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) fn same(a: &[(i64, f64)], b: &[(i64, f64)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.0 == y.0 && x.1.to_bits() == y.1.to_bits())
    }

    fn roundtrip(s: &[(i64, f64)]) {
        let bytes = encode(s);
        let back = decode(&bytes).unwrap();
        assert!(same(s, &back), "{s:?} != {back:?}");
    }

    #[test]
    fn special_values_roundtrip_bit_exact() {
        let specials = [
            0.0,
            -0.0,
            f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN payload
            f64::from_bits(0xfff8_dead_beef_0001), // negative NaN with payload
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::from_bits(1), // smallest subnormal
            f64::MAX,
            f64::MIN,
            1.5,
            9_007_199_254_740_993.0,
        ];
        let s: Vec<(i64, f64)> = specials
            .iter()
            .enumerate()
            .map(|(i, v)| (i as i64 * 1000, *v))
            .collect();
        roundtrip(&s);
        // Huge timestamp gaps and wrap-around.
        roundtrip(&[(i64::MIN, 1.0), (i64::MAX, 2.0), (0, 3.0), (-5, 4.0)]);
        roundtrip(&[(7, 1.0)]);
        roundtrip(&[]);
    }

    #[test]
    fn counter_reset_and_integers_roundtrip() {
        let mut s = Vec::new();
        let mut c = 0i64;
        for i in 0..500 {
            c = if i == 250 {
                3
            } else {
                c + 1_048_576 + (i % 7) * 13
            };
            s.push((1_700_000_000_000 + i * 5000, c as f64));
        }
        roundtrip(&s);
        assert_eq!(encode(&s)[1], MODE_INT);
    }

    #[test]
    fn steady_tick_and_constant_gauge_cost_about_two_bits() {
        let s: Vec<(i64, f64)> = (0..1000)
            .map(|i| (1_700_000_000_000 + i * 1000, 45.0))
            .collect();
        let bytes = encode(&s);
        // 1 bit timestamp + 1 bit value per sample, plus the header and first value.
        assert!(bytes.len() <= 1000 * 2 / 8 + 32, "{} bytes", bytes.len());
        roundtrip(&s);
    }

    #[test]
    fn slowly_changing_integer_gauge_is_well_under_a_byte() {
        // A GPU temperature: changes by a degree now and then.
        let mut v = 60i64;
        let s: Vec<(i64, f64)> = (0..1000)
            .map(|i| {
                if i % 17 == 0 {
                    v += if (i / 17) % 3 == 0 { -1 } else { 1 };
                }
                (1_700_000_000_000 + i * 1000, v as f64)
            })
            .collect();
        let bytes = encode(&s);
        assert!(
            (bytes.len() as f64) / 1000.0 < 0.5,
            "{} bytes for 1000 samples",
            bytes.len()
        );
        roundtrip(&s);
    }

    #[test]
    fn switches_to_float_mode_late_and_stays_exact() {
        let mut s: Vec<(i64, f64)> = (0..100).map(|i| (i * 10, i as f64)).collect();
        s.push((1000, 0.25));
        s.extend((0..50).map(|i| (2000 + i, (i as f64) * 1.1)));
        let bytes = encode(&s);
        assert_eq!(bytes[1], MODE_FLOAT);
        roundtrip(&s);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let good = encode(&[(1, 1.5), (2, 2.5), (3, 3.5)]);
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0, 1]).is_err());
        assert!(decode(&[1, 0, 0xff, 0xff, 0xff]).is_err());
    }

    pub(super) fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            (-1000i64..1000).prop_map(|i| i as f64),
            Just(f64::NAN),
            Just(-0.0),
            Just(f64::INFINITY),
            (0.0f64..100.0),
        ]
    }

    proptest! {
        #[test]
        fn random_series_roundtrip(
            start in any::<i64>(),
            steps in proptest::collection::vec((prop_oneof![Just(1000i64), -5i64..5000, any::<i64>()], any_f64()), 0..300),
        ) {
            let mut t = start;
            let s: Vec<(i64, f64)> = steps.into_iter().map(|(d, v)| { t = t.wrapping_add(d); (t, v) }).collect();
            let back = decode(&encode(&s)).unwrap();
            prop_assert!(same(&s, &back));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
