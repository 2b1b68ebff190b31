//! An ORCA load report (gRFC A51) as weighted round robin reads it: the
//! few scalars of `xds.data.orca.v3.OrcaLoadReport` it needs, read
//! straight from the wire. The whole message, maps included, is
//! `crate::orca`'s prost type; this reader skips the maps, allocates
//! nothing, and so costs a few hundred instructions per call.

use http::HeaderMap;

/// The trailer a server puts its per-call report in, base64 as every
/// `-bin` header.
pub(crate) const TRAILER: &str = "endpoint-load-metrics-bin";

/// The fields of a report that weights are made of.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Report {
    /// `cpu_utilization` (field 1).
    pub(crate) cpu: f64,
    /// `rps_fractional` (field 6).
    pub(crate) rps: f64,
    /// `eps` (field 7).
    pub(crate) eps: f64,
    /// `application_utilization` (field 9).
    pub(crate) application: f64,
}

impl Report {
    /// The report in `trailers`, if there is one that reads.
    pub(crate) fn from_trailers(trailers: &HeaderMap) -> Option<Report> {
        static NAME: http::HeaderName = http::HeaderName::from_static(TRAILER);
        let text = trailers.get(&NAME)?.as_bytes();
        // On the stack up to 170 characters (a report of the scalars is 60,
        // one with two named maps 120); longer ones go to the heap.
        let mut small = [0u8; 128];
        let mut large = Vec::new();
        let buf = match text.len() / 4 * 3 + 2 {
            n if n <= small.len() => &mut small[..],
            n => {
                large.resize(n, 0);
                &mut large[..]
            }
        };
        Report::decode(base64_decode(text, buf)?)
    }

    /// Reads the wire form of an `OrcaLoadReport`; `None` if it is not one.
    pub(crate) fn decode(mut wire: &[u8]) -> Option<Report> {
        let mut report = Report::default();
        while !wire.is_empty() {
            let key = varint(&mut wire)?;
            let (field, kind) = (key >> 3, key & 7);
            match kind {
                // 64-bit: the doubles.
                1 => {
                    let (value, rest) = wire.split_first_chunk::<8>()?;
                    wire = rest;
                    let value = f64::from_le_bytes(*value);
                    match field {
                        1 => report.cpu = value,
                        6 => report.rps = value,
                        7 => report.eps = value,
                        9 => report.application = value,
                        _ => {}
                    }
                }
                0 => {
                    varint(&mut wire)?;
                }
                2 => {
                    let len = usize::try_from(varint(&mut wire)?).ok()?;
                    wire = wire.get(len..)?;
                }
                5 => wire = wire.get(4..)?,
                _ => return None,
            }
        }
        Some(report)
    }

    /// What weighted round robin reads as the endpoint's utilization:
    /// `application_utilization` if set, else `cpu_utilization` (gRFC A58).
    pub(crate) fn utilization(&self) -> f64 {
        if self.application > 0.0 {
            self.application
        } else {
            self.cpu
        }
    }
}

fn varint(wire: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0;
    while shift < 64 {
        let (&byte, rest) = wire.split_first()?;
        *wire = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
        shift += 7;
    }
    None
}

/// Base64's standard alphabet, a table per place in a group of 4
/// characters: each character's 6 bits shifted into place, or `BAD` for
/// a character outside it, so a group decodes with 4 loads and 3 ORs.
const BAD: u32 = 1 << 31;

const fn table(shift: u32) -> [u32; 256] {
    let mut table = [BAD; 256];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut i = 0;
    while i < 64 {
        table[alphabet[i] as usize] = (i as u32) << shift;
        i += 1;
    }
    table
}

static PLACES: [[u32; 256]; 4] = [table(18), table(12), table(6), table(0)];

/// Decodes base64, standard alphabet, padded or not (gRPC accepts both),
/// into `out`; `None` if it isn't base64 or doesn't fit.
fn base64_decode<'a>(text: &[u8], out: &'a mut [u8]) -> Option<&'a [u8]> {
    let text = match text {
        [rest @ .., b'=', b'='] | [rest @ .., b'='] => rest,
        _ => text,
    };
    let tail = match text.len() % 4 {
        0 => 0,
        2 => 1,
        3 => 2,
        _ => return None,
    };
    let len = text.len() / 4 * 3 + tail;
    let out = out.get_mut(..len)?;
    let mut chunks = text.chunks_exact(4);
    let mut bad = 0;
    for (quad, bytes) in (&mut chunks).zip(out.chunks_exact_mut(3)) {
        let n = PLACES[0][quad[0] as usize]
            | PLACES[1][quad[1] as usize]
            | PLACES[2][quad[2] as usize]
            | PLACES[3][quad[3] as usize];
        bad |= n;
        bytes[0] = (n >> 16) as u8;
        bytes[1] = (n >> 8) as u8;
        bytes[2] = n as u8;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let n = rest
            .iter()
            .enumerate()
            .fold(0, |n, (i, c)| n | PLACES[i][*c as usize]);
        bad |= n;
        out[len - tail..].copy_from_slice(&n.to_be_bytes()[1..1 + tail]);
    }
    (bad & BAD == 0).then_some(out)
}

/// Encodes `bytes` as base64, standard alphabet, without padding, as
/// gRPC sends `-bin` headers.
#[cfg(any(feature = "orca", test))]
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=n {
            out.push(char::from(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::orca_proto::OrcaLoadReport;
    use prost::Message;

    #[test]
    fn a_whole_report_with_maps_reads_its_scalars() {
        let full = OrcaLoadReport {
            cpu_utilization: 0.25,
            mem_utilization: 0.5,
            rps: 7,
            request_cost: [("db".to_owned(), 3.0)].into(),
            utilization: [("disk".to_owned(), 0.1)].into(),
            rps_fractional: 120.5,
            eps: 2.5,
            named_metrics: [("queue".to_owned(), 9.0)].into(),
            application_utilization: 0.75,
        };
        let report = Report::decode(&full.encode_to_vec()).expect("reads");
        assert_eq!(
            report,
            Report {
                cpu: 0.25,
                rps: 120.5,
                eps: 2.5,
                application: 0.75
            }
        );
        assert_eq!(report.utilization(), 0.75);
        assert_eq!(Report::decode(&[]), Some(Report::default()));
    }

    #[test]
    fn a_report_reads_from_its_trailer_padded_or_not() {
        let full = OrcaLoadReport {
            cpu_utilization: 0.5,
            named_metrics: [("queue".to_owned(), 9.0)].into(),
            rps_fractional: 10.0,
            application_utilization: 0.125,
            ..OrcaLoadReport::default()
        };
        let wire = full.encode_to_vec();
        let want = Report::decode(&wire);
        assert!(want.is_some());
        let text = base64_encode(&wire);
        let padded = format!("{text}{}", "=".repeat((4 - text.len() % 4) % 4));
        for value in [text, padded] {
            let mut trailers = HeaderMap::new();
            trailers.insert(TRAILER, value.parse().unwrap());
            assert_eq!(Report::from_trailers(&trailers), want, "{value}");
        }
        let mut trailers = HeaderMap::new();
        trailers.insert(TRAILER, "not base64!".parse().unwrap());
        assert_eq!(Report::from_trailers(&trailers), None);
    }

    #[test]
    fn garbage_is_no_report() {
        // A double cut short, a varint that never ends, a length past the end,
        // wire type 7.
        for wire in [
            &[0x09, 1, 2][..],
            &[0x18, 0xff, 0xff],
            &[0x22, 9, 1],
            &[0x0f],
        ] {
            assert_eq!(Report::decode(wire), None, "{wire:?}");
        }
    }

    #[test]
    fn base64_both_ways_padded_or_not() {
        for bytes in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            let text = base64_encode(bytes);
            let mut out = [0u8; 16];
            assert_eq!(base64_decode(text.as_bytes(), &mut out), Some(bytes));
            let padded = format!("{text}{}", "=".repeat((4 - text.len() % 4) % 4));
            assert_eq!(base64_decode(padded.as_bytes(), &mut out), Some(bytes));
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8");
        let mut out = [0u8; 16];
        assert_eq!(base64_decode(b"Zm9v!", &mut out), None);
        let mut small = [0u8; 2];
        assert_eq!(base64_decode(b"Zm9v", &mut small), None);
    }
}
