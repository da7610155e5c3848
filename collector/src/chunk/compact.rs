//! Version 2: the compact form a chunk is stored in once it is closed.
//!
//! The streaming form (version 1) must append one sample at a time, so it
//! commits to an encoding before it has seen the data. A closed chunk is
//! seen whole, so this form measures every candidate and keeps the cheapest:
//!
//! - **Timestamps**: when every interval is the same (agents share a tick)
//!   only the first timestamp and the interval are stored, nothing per
//!   sample; otherwise delta-of-delta as in version 1.
//! - **Decimal values**: when every value is exactly `i / 10^s` for one
//!   scale `s` in 0..=9 and integers `|i| < 2^53` — integers (`s = 0`:
//!   temperatures, byte counts) and values parsed from decimal text
//!   (`0.002345` s, `12345.678` s of NFS RTT) — the integers `i` are stored.
//!   Exactness is checked value by value against the decoder's own formula
//!   `i as f64 / 10^s`, so `-0.0`, NaN, ±Inf and any value that does not
//!   come back bit for bit send the chunk to the float form.
//! - **Integer transform**: the values themselves, their deltas (gauges that
//!   hold still), or their deltas of deltas (counters at a steady rate); each
//!   then either bucketed (a unary prefix picks one of a few payload widths,
//!   from one of several tables) or bit-packed (frame of reference: the
//!   minimum once, then every value minus it in the same width; a constant
//!   costs nothing). Every combination's size is computed from a histogram
//!   of bit lengths; the smallest wins.
//! - **Floats** that are not decimals: Gorilla's XOR, as in version 1.
//!
//! Layout:
//!
//! ```text
//! u8      version (2)
//! varint  number of samples (at most MAX_SAMPLES)
//! varint  first timestamp (zigzag)
//! u8      0 = regular: varint interval (zigzag)
//!         1 = delta-of-delta: varint length in bytes, then the bit stream
//! u8      0 = float XOR: the bit stream to the end
//!         1 = bucketed, 2 = packed; then
//!           u8 scale, u8 transform (0 values, 1 deltas, 2 deltas of deltas),
//!           the transform's first 0, 1 or 2 terms as zigzag varints, then
//!           bucketed: u8 table, the bit stream
//!           packed:   varint minimum (zigzag), u8 width, the bit stream
//! ```

use super::{
    BitReader, BitWriter, CorruptChunk, TS_BUCKETS, XorDecoder, XorEncoder, get_varint, put_varint,
    read_dod, unzigzag, write_dod, zigzag,
};

pub const VERSION_COMPACT: u8 = 2;
pub(super) const VERSION: u8 = VERSION_COMPACT;
/// Decoding allocates per sample: a count above this is corruption.
pub const MAX_SAMPLES: u64 = 1 << 20;

const TS_REGULAR: u8 = 0;
const TS_DOD: u8 = 1;
const VAL_FLOAT: u8 = 0;
const VAL_BUCKETS: u8 = 1;
const VAL_PACKED: u8 = 2;
const VAL_RUNS: u8 = 3;
const MAX_SCALE: usize = 9;
const POW10: [f64; MAX_SCALE + 1] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
/// Payload widths of the bucket tables; the last bucket of each holds any
/// value. Zero always costs one bit.
const TABLES: [&[(u32, u32)]; 5] = [
    &[(1, 4), (2, 8), (3, 16), (4, 32), (5, 64)],
    &[(1, 2), (2, 5), (3, 10), (4, 20), (5, 64)],
    &[(1, 1), (2, 3), (3, 7), (4, 14), (5, 28), (6, 64)],
    &[(1, 6), (2, 12), (3, 18), (4, 32), (5, 64)],
    &[(1, 10), (2, 16), (3, 24), (4, 40), (5, 64)],
];

/// Bits a signed value needs in two's complement (0 for zero).
fn signed_bits(y: i64) -> u32 {
    if y == 0 {
        0
    } else {
        65 - (y ^ (y >> 63)).leading_zeros()
    }
}

/// Cost in bits of a value needing `b` bits in table `t`.
fn bucket_cost(t: &[(u32, u32)], b: u32) -> u64 {
    if b == 0 {
        return 1;
    }
    let last = t.len() - 1;
    for (i, &(ones, bits)) in t.iter().enumerate() {
        if i == last || b <= bits {
            return u64::from(ones + u32::from(i != last) + bits);
        }
    }
    u64::MAX
}

/// The integers `i` with `v == i as f64 / 10^s` for every value, at the
/// smallest scale that holds them all; None when there is none.
fn decimals(values: &[f64]) -> Option<(u8, Vec<i64>)> {
    const LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53
    // The integer, when the decoder's formula gives `v` back bit for bit.
    let exact_at = |v: f64, s: usize| -> Option<i64> {
        let m = (v * POW10[s]).round();
        if m.is_nan() || m.abs() >= LIMIT {
            return None;
        }
        let i = m as i64;
        ((i as f64 / POW10[s]).to_bits() == v.to_bits()).then_some(i)
    };
    let mut s = 0;
    for &v in values {
        while exact_at(v, s).is_none() {
            s += 1;
            if s > MAX_SCALE {
                return None;
            }
        }
    }
    // Raising the scale keeps earlier values exact in theory; check anyway.
    let ints: Option<Vec<i64>> = values.iter().map(|&v| exact_at(v, s)).collect();
    Some((s as u8, ints?))
}

/// The transform's leading terms (stored raw) and the rest.
fn transform(x: &[i64], t: u8) -> (Vec<i64>, Vec<i64>) {
    let head = usize::from(t).min(x.len());
    let mut rest = Vec::with_capacity(x.len());
    for k in head..x.len() {
        rest.push(match t {
            0 => x[k],
            1 => x[k].wrapping_sub(x[k - 1]),
            _ => x[k]
                .wrapping_sub(x[k - 1])
                .wrapping_sub(x[k - 1].wrapping_sub(x[k - 2])),
        });
    }
    let first = match t {
        0 => vec![],
        1 => x.iter().take(1).copied().collect(),
        _ => {
            let mut f: Vec<i64> = x.iter().take(1).copied().collect();
            if x.len() > 1 {
                f.push(x[1].wrapping_sub(x[0]));
            }
            f
        }
    };
    (first, rest)
}

/// How to write the integers after a transform's leading terms.
#[derive(Clone, Copy)]
struct Choice {
    /// `VAL_BUCKETS`, `VAL_PACKED` or `VAL_RUNS`.
    mode: u8,
    /// The bucket table, or the packed width.
    param: u8,
    /// The packed minimum.
    lo: i64,
    /// What it costs.
    bits: u64,
}

/// The cheapest way to write `rest`.
fn cheapest(rest: &[i64]) -> Choice {
    let mut hist = [0u64; 65];
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    // Runs of zeros, each written as one gamma code.
    let (mut run, mut run_bits) = (0u64, 0u64);
    for &y in rest {
        hist[signed_bits(y) as usize] += 1;
        lo = lo.min(y);
        hi = hi.max(y);
        if y == 0 {
            run += 1;
        } else {
            run_bits += gamma_cost(run + 1);
            run = 0;
        }
    }
    if run > 0 {
        run_bits += gamma_cost(run + 1);
    }
    let mut best = Choice {
        mode: VAL_BUCKETS,
        param: 0,
        lo: 0,
        bits: u64::MAX,
    };
    for (i, t) in TABLES.iter().enumerate() {
        let cost: u64 = hist
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(b, n)| n.saturating_mul(bucket_cost(t, b as u32)))
            .fold(0u64, u64::saturating_add);
        if cost < best.bits {
            best = Choice {
                mode: VAL_BUCKETS,
                param: i as u8,
                lo: 0,
                bits: cost,
            };
        }
        // The same table for the values between runs of zeros.
        let runs = cost.saturating_sub(hist[0]).saturating_add(run_bits);
        if runs < best.bits {
            best = Choice {
                mode: VAL_RUNS,
                param: i as u8,
                lo: 0,
                bits: runs,
            };
        }
    }
    if !rest.is_empty() {
        let range = (hi as i128 - lo as i128) as u64;
        let width = 64 - range.leading_zeros();
        // The packed header (minimum and width) costs about as much as a
        // few samples; count it so tiny chunks are not packed for nothing.
        let cost = u64::from(width) * rest.len() as u64 + 80;
        if cost < best.bits {
            best = Choice {
                mode: VAL_PACKED,
                param: width as u8,
                lo,
                bits: cost,
            };
        }
    }
    best
}

/// Encodes samples in the compact form; None when there are more than
/// [`MAX_SAMPLES`].
pub fn encode(samples: &[(i64, f64)]) -> Option<Vec<u8>> {
    let n = samples.len();
    if n as u64 > MAX_SAMPLES {
        return None;
    }
    let mut out = Vec::with_capacity(n / 2 + 32);
    out.push(VERSION);
    put_varint(&mut out, n as u64);
    let first_ts = samples.first().map_or(0, |s| s.0);
    put_varint(&mut out, zigzag(first_ts));
    let interval = if n > 1 {
        samples[1].0.wrapping_sub(samples[0].0)
    } else {
        0
    };
    if samples
        .windows(2)
        .all(|w| w[1].0.wrapping_sub(w[0].0) == interval)
    {
        out.push(TS_REGULAR);
        put_varint(&mut out, zigzag(interval));
    } else {
        let mut w = BitWriter::default();
        let mut prev_delta = 0i64;
        for pair in samples.windows(2) {
            let delta = pair[1].0.wrapping_sub(pair[0].0);
            write_dod(&mut w, delta.wrapping_sub(prev_delta), &TS_BUCKETS);
            prev_delta = delta;
        }
        out.push(TS_DOD);
        put_varint(&mut out, w.bytes.len() as u64);
        out.extend_from_slice(&w.bytes);
    }
    let values: Vec<f64> = samples.iter().map(|s| s.1).collect();
    let Some((scale, ints)) = decimals(&values) else {
        out.push(VAL_FLOAT);
        let mut w = BitWriter::default();
        let mut xor = XorEncoder::default();
        for v in values {
            xor.put(&mut w, v.to_bits());
        }
        out.extend_from_slice(&w.bytes);
        return Some(out);
    };
    // (total bits, transform, leading terms, the rest, how).
    type Best = (u64, u8, Vec<i64>, Vec<i64>, Choice);
    let mut best: Option<Best> = None;
    for t in 0..3u8 {
        let (first, rest) = transform(&ints, t);
        let choice = cheapest(&rest);
        // The leading terms are varints: count them too.
        let head_bits: u64 = first.iter().map(|f| varint_len(zigzag(*f)) * 8).sum();
        let total = choice.bits.saturating_add(head_bits);
        if best.as_ref().is_none_or(|b| total < b.0) {
            best = Some((total, t, first, rest, choice));
        }
    }
    let (
        _,
        t,
        first,
        rest,
        Choice {
            mode, param, lo, ..
        },
    ) = best?;
    out.push(mode);
    out.push(scale);
    out.push(t);
    for f in &first {
        put_varint(&mut out, zigzag(*f));
    }
    let mut w = BitWriter::default();
    if mode == VAL_PACKED {
        put_varint(&mut out, zigzag(lo));
        out.push(param);
        let width = u32::from(param);
        if width > 0 {
            for y in rest {
                w.write_bits(y.wrapping_sub(lo) as u64, width);
            }
        }
    } else if mode == VAL_RUNS {
        out.push(param);
        let table = TABLES[usize::from(param)];
        let mut run = 0u64;
        for y in rest {
            if y == 0 {
                run += 1;
            } else {
                write_gamma(&mut w, run + 1);
                write_dod(&mut w, y, table);
                run = 0;
            }
        }
        if run > 0 {
            write_gamma(&mut w, run + 1);
        }
    } else {
        out.push(param);
        let table = TABLES[usize::from(param)];
        for y in rest {
            write_dod(&mut w, y, table);
        }
    }
    out.extend_from_slice(&w.bytes);
    Some(out)
}

/// Bits of the gamma code of `x ≥ 1`: N ones, a zero, then the N bits of
/// `x` below its leading one (N = floor(log2 x)).
fn gamma_cost(x: u64) -> u64 {
    let n = u64::from(63 - x.max(1).leading_zeros());
    2 * n + 1
}

fn write_gamma(w: &mut BitWriter, x: u64) {
    let n = 63 - x.max(1).leading_zeros();
    w.write_bits((1u64 << n) - 1, n);
    w.write_bit(false);
    w.write_bits(x, n);
}

fn read_gamma(r: &mut BitReader<'_>) -> Result<u64, CorruptChunk> {
    let n = r.read_prefix(63)?;
    if n == 63 {
        return Err(CorruptChunk("gamma code too long"));
    }
    Ok((1u64 << n) | r.read_bits(n)?)
}

fn varint_len(v: u64) -> u64 {
    u64::from((64 - v.leading_zeros()).max(1).div_ceil(7))
}

fn byte(bytes: &[u8], pos: &mut usize) -> Result<u8, CorruptChunk> {
    let b = *bytes.get(*pos).ok_or(CorruptChunk("truncated header"))?;
    *pos += 1;
    Ok(b)
}

/// Decodes a version 2 chunk (`bytes[0]` already checked) into `f`;
/// stops early when `f` returns false.
pub(super) fn decode_into(
    bytes: &[u8],
    mut f: impl FnMut(i64, f64) -> bool,
) -> Result<(), CorruptChunk> {
    let mut pos = 1;
    let count = get_varint(bytes, &mut pos)?;
    if count > MAX_SAMPLES {
        return Err(CorruptChunk("count above the limit"));
    }
    let n = count as usize;
    let first_ts = unzigzag(get_varint(bytes, &mut pos)?);
    // A regular tick is computed as samples are handed out; only the
    // delta-of-delta form is decoded into a list first.
    let mut interval = 0i64;
    let mut ts = Vec::new();
    match byte(bytes, &mut pos)? {
        TS_REGULAR => interval = unzigzag(get_varint(bytes, &mut pos)?),
        TS_DOD => {
            let len = get_varint(bytes, &mut pos)?;
            let end = pos
                .checked_add(usize::try_from(len).map_err(|_| CorruptChunk("bad length"))?)
                .filter(|e| *e <= bytes.len())
                .ok_or(CorruptChunk("timestamp stream beyond the chunk"))?;
            let mut r = BitReader {
                bytes: &bytes[pos..end],
                pos: 0,
            };
            ts.reserve(n);
            let (mut t, mut delta) = (first_ts, 0i64);
            for k in 0..n {
                if k > 0 {
                    delta = delta.wrapping_add(read_dod(&mut r, &TS_BUCKETS)?);
                    t = t.wrapping_add(delta);
                }
                ts.push(t);
            }
            pos = end;
        }
        _ => return Err(CorruptChunk("unknown timestamp mode")),
    }
    let regular = ts.is_empty();
    let ts_at = |k: usize| {
        if regular {
            first_ts.wrapping_add(interval.wrapping_mul(k as i64))
        } else {
            ts[k]
        }
    };
    let mode = byte(bytes, &mut pos)?;
    if mode == VAL_FLOAT {
        let mut r = BitReader {
            bytes: &bytes[pos..],
            pos: 0,
        };
        let mut xor = XorDecoder::default();
        for k in 0..n {
            if !f(ts_at(k), f64::from_bits(xor.get(&mut r)?)) {
                break;
            }
        }
        return Ok(());
    }
    if ![VAL_BUCKETS, VAL_PACKED, VAL_RUNS].contains(&mode) {
        return Err(CorruptChunk("unknown value mode"));
    }
    let scale = usize::from(byte(bytes, &mut pos)?);
    let div = *POW10.get(scale).ok_or(CorruptChunk("bad decimal scale"))?;
    let t = byte(bytes, &mut pos)?;
    if t > 2 {
        return Err(CorruptChunk("unknown integer transform"));
    }
    let heads = usize::from(t).min(n);
    let mut x: Vec<i64> = Vec::with_capacity(n);
    let mut first = [0i64; 2];
    for slot in first.iter_mut().take(heads) {
        *slot = unzigzag(get_varint(bytes, &mut pos)?);
    }
    let (lo, width, table) = if mode == VAL_PACKED {
        let lo = unzigzag(get_varint(bytes, &mut pos)?);
        let width = u32::from(byte(bytes, &mut pos)?);
        if width > 64 {
            return Err(CorruptChunk("bad packed width"));
        }
        (lo, width, TABLES[0])
    } else {
        let i = usize::from(byte(bytes, &mut pos)?);
        (0, 0, *TABLES.get(i).ok_or(CorruptChunk("unknown table"))?)
    };
    let mut r = BitReader {
        bytes: &bytes[pos..],
        pos: 0,
    };
    // The leading terms: the first value, then the first delta.
    let mut delta = 0i64;
    if heads >= 1 {
        x.push(first[0]);
    }
    if heads >= 2 {
        delta = first[1];
        x.push(first[0].wrapping_add(delta));
    }
    // The rest, one loop per value mode (and transform, in `fill`).
    match mode {
        VAL_PACKED if width == 0 => fill(&mut x, n, t, delta, || Ok(lo))?,
        VAL_PACKED => fill(&mut x, n, t, delta, || {
            Ok(lo.wrapping_add(r.read_bits(width)? as i64))
        })?,
        VAL_RUNS => {
            // Zeros still to give out, and whether a value follows them.
            let (mut zeros_left, mut value_next) = (0u64, false);
            fill(&mut x, n, t, delta, || {
                if zeros_left == 0 && !value_next {
                    zeros_left = read_gamma(&mut r)? - 1;
                    value_next = true;
                }
                if zeros_left > 0 {
                    zeros_left -= 1;
                    Ok(0)
                } else {
                    value_next = false;
                    read_dod(&mut r, table)
                }
            })?
        }
        _ => fill(&mut x, n, t, delta, || read_dod(&mut r, table))?,
    }
    // Integers as they were written: i / 10^scale (10^0 = 1 divides exactly).
    let integral = scale == 0;
    for (k, i) in x.into_iter().enumerate() {
        let v = if integral { i as f64 } else { i as f64 / div };
        if !f(ts_at(k), v) {
            break;
        }
    }
    Ok(())
}

/// Appends values up to `n` from `next`'s stream of terms, undoing the
/// transform `t` (0: the values, 1: deltas, 2: deltas of deltas, `delta`
/// the last delta so far).
#[inline]
fn fill(
    x: &mut Vec<i64>,
    n: usize,
    t: u8,
    mut delta: i64,
    mut next: impl FnMut() -> Result<i64, CorruptChunk>,
) -> Result<(), CorruptChunk> {
    let mut prev = x.last().copied().unwrap_or(0);
    let todo = n.saturating_sub(x.len());
    match t {
        0 => {
            for _ in 0..todo {
                x.push(next()?);
            }
        }
        1 => {
            for _ in 0..todo {
                prev = prev.wrapping_add(next()?);
                x.push(prev);
            }
        }
        _ => {
            for _ in 0..todo {
                delta = delta.wrapping_add(next()?);
                prev = prev.wrapping_add(delta);
                x.push(prev);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::decode;
    use super::super::tests::same;
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(s: &[(i64, f64)]) -> usize {
        let bytes = encode(s).unwrap();
        let back = decode(&bytes).unwrap();
        assert!(same(s, &back), "{s:?} != {back:?}");
        bytes.len()
    }

    fn tick(n: usize, f: impl FnMut(usize) -> f64) -> Vec<(i64, f64)> {
        let mut f = f;
        (0..n)
            .map(|i| (1_700_000_000_000 + i as i64 * 1000, f(i)))
            .collect()
    }

    /// Deterministic noise for the shapes below.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn special_values_send_the_chunk_to_floats_and_come_back_exact() {
        for special in [
            -0.0,
            f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001),
            f64::from_bits(0xfff8_dead_beef_0001),
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::from_bits(1),
            f64::MAX,
            9_007_199_254_740_993.0,
            0.1 + 0.2,
        ] {
            let mut s = tick(100, |i| i as f64);
            s[50].1 = special;
            let bytes = encode(&s).unwrap();
            roundtrip(&s);
            // Version, count, first timestamp (6 bytes), regular interval
            // (2 bytes): the value mode follows.
            let mode_at = 1 + 1 + 6 + 1 + 2;
            assert_eq!(bytes[mode_at], VAL_FLOAT, "{special:?}");
        }
    }

    #[test]
    fn a_steady_tick_costs_nothing_per_sample() {
        let s = tick(1024, |_| 45.0);
        let n = roundtrip(&s);
        assert!(n <= 24, "constant gauge on a steady tick: {n} bytes");
        // One late sample: timestamps fall back to delta-of-delta.
        let mut s = tick(1024, |_| 45.0);
        s[1023].0 += 7;
        let n = roundtrip(&s);
        assert!(n <= 24 + 1024 / 8 + 4, "{n} bytes");
    }

    #[test]
    fn realistic_shapes_cost_what_their_information_costs() {
        let mut seed = 0x1234_5678_9abc_def1u64;
        // Temperature: moves by a degree now and then.
        let mut v = 60.0;
        let temp = tick(1024, |_| {
            let r = rng(&mut seed);
            if r.is_multiple_of(20) {
                v += if r & 64 == 0 { 1.0 } else { -1.0 };
            }
            v
        });
        // A byte counter with increments varying by up to 4 KiB: 12 bits of
        // information per sample.
        let mut c = 1e12;
        let counter = tick(1024, |_| {
            c += (1_000_000 + rng(&mut seed) % 4096) as f64;
            c
        });
        // A latency measured in microseconds, reported in seconds (as parsed
        // from decimal text): 10 bits of information.
        let latency = tick(1024, |_| (2000 + rng(&mut seed) % 1000) as f64 / 1e6);
        // NFS RTT counter in seconds with millisecond resolution.
        let mut rtt = 0.0f64;
        let mut ms = 123_456_789i64;
        let rtt_counter = tick(1024, |_| {
            ms += (rng(&mut seed) % 50) as i64;
            rtt = ms as f64 / 1e3;
            rtt
        });
        for (name, s, most) in [
            ("temperature", &temp, 0.12),
            ("byte counter", &counter, 1.6),
            ("latency", &latency, 1.3),
            ("rtt counter", &rtt_counter, 0.85),
        ] {
            let n = roundtrip(s);
            let per = n as f64 / s.len() as f64;
            eprintln!("{name}: {per:.3} bytes/sample");
            assert!(per <= most, "{name}: {per:.3} bytes/sample");
            // Never worse than the streaming form.
            assert!(n <= super::super::encode(s).len(), "{name}");
        }
    }

    #[test]
    fn runs_of_zeros_are_one_code_each() {
        // A gauge that changes once every 100 samples, ending in a run.
        let s = tick(1000, |i| (40 + i / 100) as f64);
        let n = roundtrip(&s);
        let bytes = encode(&s).unwrap();
        let mode_at = 1 + 2 + 6 + 1 + 2;
        assert_eq!(bytes[mode_at], VAL_RUNS);
        // Ten runs of ~100 (gamma: 13 bits) and ten changes of 1 (a few bits).
        assert!(n <= 24 + 10 * 20 / 8 + 4, "{n} bytes");
    }

    #[test]
    fn counter_reset_and_wrapping_integers_roundtrip() {
        let mut s = tick(600, |i| (i as f64) * 1_048_576.0);
        s[300].1 = 3.0;
        roundtrip(&s);
        roundtrip(&tick(10, |i| if i % 2 == 0 { -9e15 } else { 9e15 }));
        roundtrip(&[(i64::MIN, 1.0), (i64::MAX, 2.0), (0, 3.0), (-5, 4.0)]);
        roundtrip(&[(7, 1.0)]);
        roundtrip(&[(7, 1.0), (8, 2.5)]);
        roundtrip(&[]);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let good = encode(&tick(50, |i| (i * i) as f64 / 100.0)).unwrap();
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
        // A huge count on a tiny constant chunk is refused, not allocated.
        let mut huge = vec![VERSION];
        put_varint(&mut huge, MAX_SAMPLES + 1);
        huge.extend_from_slice(&[0, TS_REGULAR, 2, VAL_PACKED, 0, 0, 0, 0]);
        assert!(decode(&huge).is_err());
        assert!(decode(&[VERSION, 1, 0, 9]).is_err());
        assert!(decode(&[VERSION, 1, 0, TS_REGULAR, 2, 7]).is_err());
    }

    /// The streaming form's values, and decimals at two scales.
    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            super::super::tests::any_f64(),
            (-100_000i64..100_000).prop_map(|i| i as f64 / 1000.0),
            (0u64..1 << 53).prop_map(|i| i as f64 / 1e9),
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
            let back = decode(&encode(&s).unwrap()).unwrap();
            prop_assert!(same(&s, &back));
        }

        #[test]
        fn decimal_series_roundtrip(
            scale in 0usize..=9,
            ints in proptest::collection::vec(-(1i64 << 53) + 1..(1i64 << 53), 1..200),
        ) {
            let s: Vec<(i64, f64)> = ints.iter().enumerate().map(|(k, i)| (k as i64, *i as f64 / POW10[scale])).collect();
            let back = decode(&encode(&s).unwrap()).unwrap();
            prop_assert!(same(&s, &back));
        }

        #[test]
        fn sparse_changes_roundtrip(
            start in any::<i32>(),
            steps in proptest::collection::vec((0usize..80, -3i64..4), 0..40),
        ) {
            // Runs of unchanged values between small changes: the runs mode.
            let mut v = i64::from(start);
            let mut s = Vec::new();
            for (run, change) in steps {
                for _ in 0..run {
                    s.push((s.len() as i64 * 1000, v as f64));
                }
                v += change;
                s.push((s.len() as i64 * 1000, v as f64));
            }
            let back = decode(&encode(&s).unwrap()).unwrap();
            prop_assert!(same(&s, &back));
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(b) = bytes.first_mut() { *b = VERSION; }
            let _ = decode(&bytes);
        }
    }
}
