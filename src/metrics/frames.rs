//! Counting gRPC messages in a body as it passes, from their 5-byte length
//! prefixes.

/// Counts gRPC messages in a body from their 5-byte length prefixes, across
/// chunk boundaries. A message counts as soon as its prefix has passed.
#[derive(Debug, Default)]
pub(crate) struct GrpcFrames {
    /// Prefix bytes seen of the next message (0–4).
    prefix: u8,
    /// The compressed flag of the message whose prefix is passing.
    compressed: bool,
    len: [u8; 4],
    /// Bytes left of the current message.
    remaining: u64,
    /// Message bytes seen, prefixes not counted.
    payload: u64,
}

impl GrpcFrames {
    /// Feeds one chunk; returns how many messages began in it.
    pub(crate) fn feed(&mut self, data: &[u8]) -> u64 {
        let mut messages = 0;
        self.feed_each(data, |_, _| messages += 1);
        messages
    }

    /// Feeds one chunk, calling `began(compressed, size)` for each message
    /// whose prefix completes in it, with the prefix's flag and length.
    pub(crate) fn feed_each(&mut self, mut data: &[u8], mut began: impl FnMut(bool, u32)) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= take as u64;
                self.payload += take as u64;
                data = &data[take..];
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            match self.prefix {
                0 => self.compressed = byte & 1 == 1,
                n => self.len[usize::from(n) - 1] = byte,
            }
            self.prefix += 1;
            if self.prefix == 5 {
                self.prefix = 0;
                let size = u32::from_be_bytes(self.len);
                self.remaining = u64::from(size);
                began(self.compressed, size);
            }
        }
    }

    /// The message bytes seen so far, without their 5-byte prefixes (for
    /// telemetry's sizes).
    #[cfg(any(feature = "opentelemetry", test))]
    pub(crate) fn payload(&self) -> u64 {
        self.payload
    }
}

#[cfg(test)]
mod tests {
    use super::GrpcFrames;

    fn message(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((body.len() as u32).to_be_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn counts_messages_across_chunk_boundaries() {
        let mut stream = Vec::new();
        for body in [&b"hello"[..], b"", b"a longer message body", b"x"] {
            stream.extend(message(body));
        }
        // Whole, and cut into every chunk size.
        for chunk in 1..=stream.len() {
            let mut frames = GrpcFrames::default();
            let n: u64 = stream.chunks(chunk).map(|c| frames.feed(c)).sum();
            assert_eq!(n, 4, "chunk size {chunk}");
        }
    }

    #[test]
    fn gives_each_message_its_size_and_flag() {
        let mut stream = message(b"hello");
        let mut compressed = message(b"zz");
        compressed[0] = 1;
        stream.extend(compressed);
        for chunk in 1..=stream.len() {
            let mut frames = GrpcFrames::default();
            let mut seen = Vec::new();
            for c in stream.chunks(chunk) {
                frames.feed_each(c, |flag, size| seen.push((flag, size)));
            }
            assert_eq!(seen, [(false, 5), (true, 2)], "chunk size {chunk}");
            assert_eq!(frames.payload(), 7);
        }
    }
}
