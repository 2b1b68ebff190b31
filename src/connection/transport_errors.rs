//! What an HTTP/2 transport error means for a gRPC call.
//!
//! gRPC maps transport failures to status codes (its PROTOCOL-HTTP2 doc):
//! a stream reset by the peer gets the code of its reason (CANCEL is
//! CANCELLED, REFUSED_STREAM is UNAVAILABLE, ENHANCE_YOUR_CALM is
//! RESOURCE_EXHAUSTED, INADEQUATE_SECURITY is PERMISSION_DENIED, the rest
//! INTERNAL), and a connection that fails under the call gives UNAVAILABLE.
//! tonic, left to itself, reports a broken connection as
//! `Unknown: h2 protocol error`; these statuses name the endpoint and the
//! reason instead.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tonic::{Code, Status};

/// Whether a failed call is known not to have been processed by the server:
/// a stream past a GOAWAY's last stream id, or REFUSED_STREAM.
pub(crate) fn refused_unprocessed(err: &h2::Error) -> bool {
    err.is_remote()
        && (err.is_go_away()
            || (err.is_reset() && err.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Whether the client itself ended the stream: its request body failed (a
/// message over the caller's size limit, a stream the caller broke), or
/// healthlb cut off a hedge the call no longer needs. Nothing the server or
/// the network did: it says nothing of the endpoint.
pub(crate) fn reset_by_client(err: &h2::Error) -> bool {
    (err.is_reset() || err.is_go_away()) && !err.is_remote() && !err.is_library()
}

/// The status of a call that failed in transport on `addr`'s connection.
pub(crate) fn transport_status(addr: SocketAddr, err: &h2::Error) -> Status {
    if err.is_reset() {
        let code = reset_code(err.reason());
        let who = if err.is_remote() {
            "the server"
        } else {
            "the client"
        };
        return Status::new(
            code,
            format!("{who} reset the call to {addr}: {}", chain(err)),
        );
    }
    Status::unavailable(format!(
        "the connection to {addr} failed under the call: {}",
        chain(err)
    ))
}

/// gRPC's status for an RST_STREAM reason.
fn reset_code(reason: Option<h2::Reason>) -> Code {
    match reason {
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

/// An error and its sources, each said once: hyper's message alone
/// ("error reading a body from connection") doesn't say what happened.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_map_as_grpc_says() {
        let cases = [
            (h2::Reason::REFUSED_STREAM, Code::Unavailable),
            (h2::Reason::CANCEL, Code::Cancelled),
            (h2::Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
            (h2::Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
            (h2::Reason::PROTOCOL_ERROR, Code::Internal),
            (h2::Reason::NO_ERROR, Code::Internal),
        ];
        for (reason, code) in cases {
            assert_eq!(reset_code(Some(reason)), code, "{reason:?}");
        }
    }

    #[test]
    fn the_chain_names_each_cause_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "peer went silent");
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error reading a body from connection")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            chain(&Outer(inner)),
            "error reading a body from connection: peer went silent"
        );
    }
}
