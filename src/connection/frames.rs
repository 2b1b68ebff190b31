//! A sniffer of the HTTP/2 frames a server sends, fed every byte the
//! connection reads.
//!
//! hyper tells a client about a GOAWAY only when the next request comes, and
//! it keeps the server's SETTINGS to itself. The subchannel needs both at
//! once: a GOAWAY to leave a closing connection, and
//! SETTINGS_MAX_CONCURRENT_STREAMS to know when a connection is full. This
//! follows the frame headers (9 bytes each) and reads only the payloads of
//! those two frame types, so its cost is a few comparisons per frame.

/// Longest GOAWAY payload kept: the ids, the code and some debug data.
pub(crate) const GOAWAY_CAP: usize = 8 + 256;
const FRAME_HEADER_LEN: usize = 9;
const FRAME_TYPE_SETTINGS: u8 = 0x4;
const FRAME_TYPE_GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const SETTING_LEN: usize = 6;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// A GOAWAY frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GoAway {
    pub(crate) last_stream_id: u32,
    pub(crate) code: h2::Reason,
    pub(crate) debug: String,
}

impl GoAway {
    fn parse(payload: &[u8]) -> Option<Self> {
        let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
        Some(Self {
            last_stream_id: u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff,
            code: h2::Reason::from(u32::from_be_bytes([head[4], head[5], head[6], head[7]])),
            debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
        })
    }

    /// ENHANCE_YOUR_CALM with `too_many_pings`: the server wants fewer
    /// keepalive pings (gRFC A8).
    pub(crate) fn is_too_many_pings(&self) -> bool {
        self.code == h2::Reason::ENHANCE_YOUR_CALM && self.debug.contains("too_many_pings")
    }
}

impl std::fmt::Display for GoAway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GOAWAY {:?}", self.code)?;
        if !self.debug.is_empty() {
            write!(f, " ({})", self.debug)?;
        }
        Ok(())
    }
}

/// What one chunk of bytes held.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// The last complete GOAWAY in the chunk.
    pub(crate) goaway: Option<GoAway>,
    /// The last SETTINGS_MAX_CONCURRENT_STREAMS value in the chunk.
    pub(crate) max_streams: Option<u32>,
    /// A SETTINGS frame (not an ACK) ended in the chunk.
    pub(crate) settings: bool,
}

/// The payload being passed over.
#[derive(Debug, Default)]
enum Payload {
    #[default]
    Skip,
    GoAway(Vec<u8>),
    Settings {
        entry: [u8; SETTING_LEN],
        filled: usize,
    },
}

/// Follows the frame headers of a server's byte stream, across any split
/// into chunks.
#[derive(Debug, Default)]
pub(crate) struct FrameSniffer {
    header: [u8; FRAME_HEADER_LEN],
    filled: usize,
    /// Payload bytes still to pass.
    remaining: usize,
    payload: Payload,
}

impl FrameSniffer {
    /// Feeds the next bytes the server sent.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.payload(&data[..n], &mut seen);
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    self.end_of_frame(&mut seen);
                }
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.filled).min(data.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == FRAME_HEADER_LEN {
                self.filled = 0;
                self.start_frame();
                if self.remaining == 0 {
                    self.end_of_frame(&mut seen);
                }
            }
        }
        seen
    }

    fn start_frame(&mut self) {
        let h = self.header;
        self.remaining = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (kind, flags) = (h[3], h[4]);
        self.payload = match kind {
            FRAME_TYPE_GOAWAY if self.remaining >= 8 => {
                Payload::GoAway(Vec::with_capacity(self.remaining.min(GOAWAY_CAP)))
            }
            FRAME_TYPE_SETTINGS if flags & FLAG_ACK == 0 => Payload::Settings {
                entry: [0; SETTING_LEN],
                filled: 0,
            },
            _ => Payload::Skip,
        };
    }

    fn payload(&mut self, bytes: &[u8], seen: &mut Seen) {
        match &mut self.payload {
            Payload::Skip => {}
            Payload::GoAway(kept) => {
                let room = GOAWAY_CAP.saturating_sub(kept.len());
                kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Payload::Settings { entry, filled } => {
                for &byte in bytes {
                    entry[*filled] = byte;
                    *filled += 1;
                    if *filled == SETTING_LEN {
                        *filled = 0;
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                            seen.max_streams =
                                Some(u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
                        }
                    }
                }
            }
        }
    }

    fn end_of_frame(&mut self, seen: &mut Seen) {
        match std::mem::take(&mut self.payload) {
            Payload::GoAway(kept) => {
                if let Some(goaway) = GoAway::parse(&kept) {
                    seen.goaway = Some(goaway);
                }
            }
            Payload::Settings { .. } => seen.settings = true,
            Payload::Skip => {}
        }
    }
}

/// Feeds `bytes` to a sniffer in chunks whose sizes come from the input
/// itself, and checks what it reports against a parse of the whole. For the
/// fuzzer; not part of the API.
#[cfg(any(test, feature = "internals"))]
pub(crate) fn fuzz(bytes: &[u8]) -> usize {
    let Some((&split, wire)) = bytes.split_first() else {
        return 0;
    };
    let chunk = usize::from(split).max(1);
    let mut whole = FrameSniffer::default();
    let once = whole.feed(wire);
    let mut split = FrameSniffer::default();
    let mut last = Seen::default();
    for part in wire.chunks(chunk) {
        let seen = split.feed(part);
        if seen.goaway.is_some() {
            last.goaway = seen.goaway;
        }
        if seen.max_streams.is_some() {
            last.max_streams = seen.max_streams;
        }
        last.settings |= seen.settings;
    }
    assert_eq!(once, last, "a split changed what the sniffer saw");
    usize::from(once.goaway.is_some()) + usize::from(once.max_streams.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn goaway(last: u32, code: u32, debug: &[u8]) -> Vec<u8> {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(debug);
        frame(FRAME_TYPE_GOAWAY, 0, 0, &payload)
    }

    fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (id, value) in entries {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&value.to_be_bytes());
        }
        frame(FRAME_TYPE_SETTINGS, 0, 0, &payload)
    }

    /// Feeds `wire` in chunks of `chunk` and merges what was seen.
    fn feed_split(wire: &[u8], chunk: usize) -> (Vec<GoAway>, Vec<u32>, usize) {
        let mut sniffer = FrameSniffer::default();
        let (mut goaways, mut limits, mut settings) = (Vec::new(), Vec::new(), 0);
        for part in wire.chunks(chunk) {
            let seen = sniffer.feed(part);
            goaways.extend(seen.goaway);
            limits.extend(seen.max_streams);
            settings += usize::from(seen.settings);
        }
        (goaways, limits, settings)
    }

    #[test]
    fn finds_a_goaway_among_other_frames_in_any_split() {
        let mut wire = settings(&[(0x4, 65535)]);
        wire.extend(frame(0x0, 0, 1, &[7; 1000])); // DATA
        wire.extend(goaway(0x7fff_ffff, 0xb, b"too_many_pings"));
        wire.extend(frame(0x6, 0, 0, &[0; 8])); // PING
        for chunk in [1, 2, 5, 9, 10, 64, wire.len()] {
            let (found, _, _) = feed_split(&wire, chunk);
            assert_eq!(found.len(), 1, "chunk {chunk}");
            assert_eq!(found[0].last_stream_id, 0x7fff_ffff);
            assert_eq!(found[0].code, h2::Reason::ENHANCE_YOUR_CALM);
            assert!(found[0].is_too_many_pings());
            assert_eq!(
                found[0].to_string(),
                "GOAWAY ENHANCE_YOUR_CALM (too_many_pings)"
            );
        }
    }

    #[test]
    fn data_that_looks_like_a_frame_is_skipped() {
        let fake = [goaway(1, 0, b""), settings(&[(0x3, 1)])].concat();
        let mut wire = frame(0x0, 0, 1, &fake); // a DATA frame carrying frame bytes
        wire.extend(goaway(5, 0, b""));
        let (found, limits, _) = feed_split(&wire, wire.len());
        assert_eq!(
            (found[0].last_stream_id, found[0].code),
            (5, h2::Reason::NO_ERROR)
        );
        assert!(limits.is_empty());
    }

    #[test]
    fn long_debug_data_is_capped() {
        let mut sniffer = FrameSniffer::default();
        let found = sniffer
            .feed(&goaway(3, 0, &[b'x'; 10_000]))
            .goaway
            .expect("GOAWAY");
        assert_eq!(found.debug.len(), GOAWAY_CAP - 8);
        // And the stream stays in step after it.
        assert!(sniffer.feed(&goaway(1, 2, b"")).goaway.is_some());
    }

    #[test]
    fn reads_the_stream_limit_from_settings_in_any_split() {
        // Initial window, then the limit, then a later SETTINGS lowering it;
        // an ACK carries nothing.
        let first = settings(&[(0x4, 1 << 20), (0x3, 4), (0x5, 16384)]);
        let mut wire = first.clone();
        wire.extend(frame(FRAME_TYPE_SETTINGS, FLAG_ACK, 0, &[]));
        wire.extend(frame(0x1, 0x4, 1, &[0; 30])); // HEADERS
        wire.extend(settings(&[(0x3, 2)]));
        for chunk in [1, 2, 3, 6, 7, 9, 15, wire.len()] {
            let (_, limits, settings_seen) = feed_split(&first, chunk);
            assert_eq!(limits, vec![4], "chunk {chunk}");
            assert_eq!(settings_seen, 1, "chunk {chunk}");
            let (_, limits, _) = feed_split(&wire, chunk);
            assert_eq!(
                limits.last(),
                Some(&2),
                "chunk {chunk}: the later value wins"
            );
        }
        let ack = frame(FRAME_TYPE_SETTINGS, FLAG_ACK, 0, &[]);
        assert!(
            !FrameSniffer::default().feed(&ack).settings,
            "an ACK is not SETTINGS"
        );
    }

    #[test]
    fn an_empty_settings_frame_is_seen() {
        let seen = FrameSniffer::default().feed(&settings(&[]));
        assert!(seen.settings);
        assert_eq!(seen.max_streams, None);
    }

    #[test]
    fn the_fuzz_check_holds_for_a_sample() {
        let mut wire = vec![3];
        wire.extend(settings(&[(0x3, 100)]));
        wire.extend(goaway(9, 0, b"bye"));
        assert_eq!(fuzz(&wire), 2);
    }
}
