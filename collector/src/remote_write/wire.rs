//! Prometheus remote write 1.0 on the wire: a `prometheus.WriteRequest`
//! (prompb `remote.proto` / `types.proto`: only the fields remote write
//! 1.0 needs, with their field numbers) encoded as protobuf and
//! compressed with snappy's block format (not the framed one).

use prost::Message;

/// `prometheus.WriteRequest`: field 1 the series (field 3, metadata, is
/// not sent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`: labels sorted by name, samples in time order
/// (exemplars, field 3, and histograms, field 4, are not sent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`: value first (field 1), then the timestamp in ms.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The HTTP body: protobuf, then snappy block compression.
pub fn encode(req: &WriteRequest) -> Result<Vec<u8>, String> {
    snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .map_err(|e| format!("snappy compression failed: {e}"))
}

/// A body back into its request (the receiver's side; tests use it).
pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("not snappy block data: {e}"))?;
    WriteRequest::decode(raw.as_slice()).map_err(|e| format!("not a WriteRequest: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample_request() -> WriteRequest {
        WriteRequest {
            timeseries: vec![
                TimeSeries {
                    labels: vec![
                        Label {
                            name: "__name__".into(),
                            value: "node_load1".into(),
                        },
                        Label {
                            name: "cluster".into(),
                            value: "lab".into(),
                        },
                        Label {
                            name: "node".into(),
                            value: "train-01".into(),
                        },
                    ],
                    samples: (0..500)
                        .map(|i| Sample {
                            value: 0.1 * f64::from(i),
                            timestamp: 1_700_000_000_000 + i64::from(i) * 5000,
                        })
                        .collect(),
                },
                // (-0.0 would come back as 0.0: proto3 leaves out a zero
                // double, as Prometheus's own encoder does.)
                TimeSeries {
                    labels: vec![Label {
                        name: "__name__".into(),
                        value: "odd".into(),
                    }],
                    samples: [f64::NAN, f64::INFINITY, f64::MIN_POSITIVE, 1e308, -2.5]
                        .iter()
                        .enumerate()
                        .map(|(i, v)| Sample {
                            value: *v,
                            timestamp: -5 + i as i64,
                        })
                        .collect(),
                },
            ],
        }
    }

    #[test]
    fn encode_then_decode_gives_the_request_back_bit_exact() {
        let req = sample_request();
        let body = encode(&req).unwrap();
        // Snappy compressed it (regular timestamps, repeated names).
        assert!(body.len() < req.encode_to_vec().len(), "{}", body.len());
        let back = decode(&body).unwrap();
        assert_eq!(back.timeseries.len(), 2);
        for (a, b) in req.timeseries.iter().zip(&back.timeseries) {
            assert_eq!(a.labels, b.labels);
            assert_eq!(a.samples.len(), b.samples.len());
            for (x, y) in a.samples.iter().zip(&b.samples) {
                assert_eq!(x.timestamp, y.timestamp);
                assert_eq!(x.value.to_bits(), y.value.to_bits());
            }
        }
    }

    /// The bytes of prompb's encoding, written out by hand: the field
    /// numbers and wire types a Prometheus receiver decodes.
    #[test]
    fn field_numbers_are_prompb_ones() {
        let req = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label {
                    name: "a".into(),
                    value: "b".into(),
                }],
                samples: vec![Sample {
                    value: 1.0,
                    timestamp: 2,
                }],
            }],
        };
        let raw = req.encode_to_vec();
        let expected: Vec<u8> = [
            &[0x0a, 21][..],                          // WriteRequest.timeseries (1, bytes)
            &[0x0a, 6, 0x0a, 1, b'a', 0x12, 1, b'b'], // TimeSeries.labels (1): name (1), value (2)
            &[0x12, 11, 0x09],                        // TimeSeries.samples (2): value (1, fixed64)
            &1.0f64.to_le_bytes(),
            &[0x10, 2], // timestamp (2, varint)
        ]
        .concat();
        assert_eq!(raw, expected);
        // Snappy block format: the uncompressed length as a varint first
        // (the framed format would start with its stream identifier).
        let body = encode(&req).unwrap();
        assert_eq!(body[0] as usize, raw.len());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode(b"\xff\xff\xff\xff\xff\xff").is_err());
        let not_proto = snap::raw::Encoder::new().compress_vec(b"\xff\xff").unwrap();
        assert!(decode(&not_proto).is_err());
    }
}
