//! The replay's unit tests: bodies fed by a channel, as a client stream's.

use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;

use super::recording::FRAME_COST;
use super::*;
use http_body_util::BodyExt;
use tokio::sync::mpsc;

const LIMIT: usize = 64 * 1024;

/// A request whose body yields what is sent on the returned channel.
fn streaming_request() -> (mpsc::Sender<Bytes>, Request<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, Status>(Frame::data(data)), rx))
    });
    let body = Body::new(http_body_util::StreamBody::new(stream));
    (tx, Request::new(body))
}

fn replay(request: Request<Body>) -> (Replay, Arc<RetryBuffer>) {
    let buffer = RetryBuffer::new(LIMIT, 16 * LIMIT);
    (Replay::new(request, buffer.clone(), None), buffer)
}

fn attempt(replay: &Replay) -> (AttemptId, ReplayBody) {
    let (id, request) = replay.attempt(None, 0, None, None).expect("not committed");
    (id, request.into_body())
}

async fn next(
    body: &mut (impl HttpBody<Data = Bytes, Error = Status> + Unpin),
) -> Option<Result<Bytes, Status>> {
    let frame = body.frame().await?;
    Some(frame.map(|f| f.into_data().unwrap_or_default()))
}

#[tokio::test]
async fn a_second_attempt_replays_then_reads_on() {
    let (tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (id, mut first) = attempt(&replay);
    tx.send(Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(next(&mut first).await.unwrap().unwrap(), "one");

    replay.retire(id);
    let (_, mut second) = attempt(&replay);
    tx.send(Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "one");
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "two");
    // The retired attempt's body may not read any more.
    let stale = next(&mut first).await.unwrap().unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Cancelled);
}

#[tokio::test]
async fn hedged_attempts_each_read_every_frame() {
    let (tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (_, mut first) = attempt(&replay);
    let (second_id, mut second) = attempt(&replay);
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    tx.send(Bytes::from_static(b"b")).await.unwrap();
    // The second reads ahead from the caller; the first replays.
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "a");
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "b");
    assert_eq!(next(&mut first).await.unwrap().unwrap(), "a");
    tx.send(Bytes::from_static(b"c")).await.unwrap();
    assert_eq!(next(&mut first).await.unwrap().unwrap(), "b");
    assert_eq!(next(&mut first).await.unwrap().unwrap(), "c");
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "c");
    // The second answers first: the first may send nothing more.
    assert!(replay.commit(second_id));
    assert_eq!(replay.frames(), 0, "the committed attempt sent them all");
    assert!(next(&mut first).await.unwrap().is_err());
    drop(tx);
    assert!(next(&mut second).await.is_none());
    assert!(replay.attempt(None, 1, None, None).is_none(), "committed");
}

#[tokio::test]
async fn hedged_attempts_waiting_on_the_callers_body_are_all_woken() {
    let (tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (_, first) = attempt(&replay);
    let (_, second) = attempt(&replay);
    // Each waits on the body from its own task, as a bidi stream's pump
    // does.
    let reader = |mut body: ReplayBody| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(frame) = next(&mut body).await {
                got.push(frame.unwrap());
            }
            got
        })
    };
    let (first, second) = (reader(first), reader(second));
    for word in ["a", "b", "c"] {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        tx.send(Bytes::from(word)).await.unwrap();
    }
    drop(tx);
    let limit = std::time::Duration::from_secs(5);
    let second = tokio::time::timeout(limit, second).await;
    let second = second.expect("the second attempt was woken").unwrap();
    assert_eq!(second, ["a", "b", "c"]);
    let first = tokio::time::timeout(limit, first).await;
    let first = first.expect("the first attempt was woken").unwrap();
    assert_eq!(first, ["a", "b", "c"]);
}

#[tokio::test]
async fn an_attempt_left_waiting_when_another_retires_is_woken() {
    let (tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (_, first) = attempt(&replay);
    let (second_id, mut second) = attempt(&replay);
    let first = tokio::spawn(async move {
        let mut first = first;
        next(&mut first).await.map(Result::unwrap)
    });
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // The second waits last, so the body holds its waker; then it
    // fails and is retired before anything arrives.
    let waiting = futures::poll!(std::pin::pin!(next(&mut second)));
    assert!(waiting.is_pending());
    replay.retire(second_id);
    drop(second);
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    let limit = std::time::Duration::from_secs(5);
    let got = tokio::time::timeout(limit, first).await;
    assert_eq!(got.expect("the first was woken").unwrap().unwrap(), "a");
}

#[tokio::test]
async fn an_old_attempt_cannot_corrupt_the_retry_by_going_over_the_limit() {
    let (tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (old, mut first) = attempt(&replay);
    let chunk = Bytes::from(vec![7u8; LIMIT / 2]);
    tx.send(chunk.clone()).await.unwrap();
    assert_eq!(next(&mut first).await.unwrap().unwrap(), chunk);

    replay.retire(old);
    let (_, mut second) = attempt(&replay);
    // More than the limit is waiting; only the old attempt polls.
    tx.send(Bytes::from(vec![8u8; LIMIT / 2])).await.unwrap();
    assert!(next(&mut first).await.unwrap().is_err());
    // The retry still gets every byte, in order.
    assert_eq!(next(&mut second).await.unwrap().unwrap(), chunk);
    let rest = next(&mut second).await.unwrap().unwrap();
    assert_eq!(rest.len(), LIMIT / 2);
    assert!(!replay.can_retry(), "past the limit: committed");
    assert!(replay.attempt(None, 1, None, None).is_none());
}

#[tokio::test]
async fn a_body_just_over_the_limit_commits_and_is_sent_whole() {
    let (tx, request) = streaming_request();
    let (replay, buffer) = replay(request);
    let (id, mut body) = attempt(&replay);
    // A frame costs its data and its entry: this one fills the limit.
    let fits = LIMIT - FRAME_COST;
    tx.send(Bytes::from(vec![1u8; fits])).await.unwrap();
    tx.send(Bytes::new()).await.unwrap();
    drop(tx);
    assert_eq!(next(&mut body).await.unwrap().unwrap().len(), fits);
    assert!(replay.can_retry(), "exactly the limit is kept");
    assert_eq!(buffer.used(), LIMIT);
    // Even an empty frame costs its entry: over the limit.
    assert_eq!(next(&mut body).await.unwrap().unwrap(), "");
    assert!(next(&mut body).await.is_none());
    assert_eq!(replay.committed_to(), Some(id));
    assert_eq!(replay.frames(), 0);
    assert_eq!(buffer.used(), 0, "the channel's buffer is given back");
}

#[tokio::test]
async fn the_buffer_counts_what_each_frame_holds_not_only_its_data() {
    // A stream of empty frames holds memory as surely as one of data.
    let (replay, buffer) = {
        let (tx, request) = streaming_request();
        let buffer = RetryBuffer::new(16 * FRAME_COST, 1 << 20);
        tokio::spawn(async move {
            for _ in 0..100_000 {
                if tx.send(Bytes::new()).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Bytes::from_static(b"x")).await;
        });
        (Replay::new(request, buffer.clone(), None), buffer)
    };
    let (id, mut body) = attempt(&replay);
    let mut read = 0;
    while let Some(frame) = next(&mut body).await {
        frame.unwrap();
        read += 1;
        assert!(replay.frames() <= 16, "{} frames kept", replay.frames());
        assert!(buffer.used() <= 16 * FRAME_COST);
    }
    assert_eq!(read, 100_001, "every frame is still sent");
    assert_eq!(replay.committed_to(), Some(id), "committed at the 17th");
    assert_eq!(buffer.used(), 0);
}

#[tokio::test]
async fn the_channel_total_bounds_every_call_together() {
    let buffer = RetryBuffer::new(LIMIT, LIMIT + LIMIT / 2);
    let fits = LIMIT - FRAME_COST;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, request) = streaming_request();
        let replay = Replay::new(request, buffer.clone(), None);
        let (_, mut body) = attempt(&replay);
        tx.send(Bytes::from(vec![2u8; fits])).await.unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap().len(), fits);
        held.push((tx, replay, body));
    }
    // The first fits; the second would pass the total, so it commits.
    assert!(held[0].1.can_retry());
    assert!(!held[1].1.can_retry());
    assert_eq!(buffer.used(), LIMIT);
    drop(held);
    assert_eq!(buffer.used(), 0);
}

#[tokio::test]
async fn commit_frees_what_was_sent_and_keeps_what_was_not() {
    let (tx, request) = streaming_request();
    let (replay, buffer) = replay(request);
    let (old, mut first) = attempt(&replay);
    for word in ["a", "b", "c"] {
        tx.send(Bytes::from(word)).await.unwrap();
        next(&mut first).await.unwrap().unwrap();
    }
    replay.retire(old);
    let (_, mut second) = attempt(&replay);
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "a");
    // The response headers arrive: the call commits mid-replay.
    let inner = replay.inner.clone();
    let recording = &inner.recording;
    drop(replay);
    assert_eq!(lock(recording).frames.len(), 2, "only what is unsent");
    assert_eq!(buffer.used(), 0);
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "b");
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "c");
    tx.send(Bytes::from_static(b"d")).await.unwrap();
    assert_eq!(next(&mut second).await.unwrap().unwrap(), "d");
    assert_eq!(lock(recording).frames.len(), 0, "nothing kept after commit");
}

#[tokio::test]
async fn a_body_of_one_ready_frame_ends_with_it() {
    // As tonic sends a unary request: one message, then the end at once.
    let stream = futures::stream::iter([Ok::<_, Status>(Frame::data(Bytes::from_static(b"one")))]);
    let (replay, _) = replay(Request::new(Body::new(http_body_util::StreamBody::new(
        stream,
    ))));
    let (_, mut body) = attempt(&replay);
    assert!(!body.is_end_stream(), "nothing read yet");
    assert_eq!(next(&mut body).await.unwrap().unwrap(), "one");
    assert!(
        body.is_end_stream(),
        "the last frame says so: HTTP/2 sends it with END_STREAM"
    );
    assert!(next(&mut body).await.is_none());

    // A retry replays the frame, and ends with it too.
    let (_, mut again) = attempt(&replay);
    assert!(!again.is_end_stream(), "the frame is still to send");
    assert_eq!(next(&mut again).await.unwrap().unwrap(), "one");
    assert!(again.is_end_stream());
}

#[tokio::test]
async fn a_frame_read_ahead_is_not_lost() {
    let (tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (_, mut body) = attempt(&replay);
    tx.send(Bytes::from_static(b"a")).await.unwrap();
    tx.send(Bytes::from_static(b"b")).await.unwrap();
    assert_eq!(next(&mut body).await.unwrap().unwrap(), "a");
    assert!(!body.is_end_stream(), "b was read ahead, not sent");
    assert_eq!(next(&mut body).await.unwrap().unwrap(), "b");
    drop(tx);
    assert!(next(&mut body).await.is_none());
}

#[test]
fn a_retry_names_the_attempts_before_it() {
    let (replay, _) = replay(Request::new(Body::empty()));
    let (_, first) = replay.attempt(None, 0, None, None).unwrap();
    assert!(first.headers().get(PREVIOUS_ATTEMPTS).is_none());
    let (_, third) = replay.attempt(None, 2, None, None).unwrap();
    assert_eq!(third.headers()[PREVIOUS_ATTEMPTS], "2");
}

#[tokio::test]
async fn a_claim_and_a_commit_by_overflow_are_one_decision() {
    let (tx, request) = streaming_request();
    let buffer = RetryBuffer::new(100, 16 * LIMIT);
    let replay = Replay::new(request, buffer, None);
    let (a, mut first) = attempt(&replay);
    let (b, _second) = attempt(&replay);
    // `a` reads past the buffer: the call commits to it, from its body.
    tx.send(Bytes::from(vec![7; 200])).await.unwrap();
    assert!(next(&mut first).await.is_some());
    assert_eq!(replay.committed_to(), Some(a));
    // An answer of `b` that arrives now may not claim the call...
    assert!(!replay.claim(Some(b)));
    // ...nor an outcome no attempt sent; `a`'s may.
    assert!(!replay.claim(None));
    assert!(replay.claim(Some(a)));
    assert!(replay.commit(a), "commits are idempotent for the claimant");
}

#[tokio::test]
async fn a_claim_first_shuts_the_others_out() {
    let (_tx, request) = streaming_request();
    let (replay, _) = replay(request);
    let (a, _first) = attempt(&replay);
    let (b, mut second) = attempt(&replay);
    assert!(replay.claim(Some(a)));
    assert!(!replay.claim(Some(b)));
    assert!(
        replay.attempt(None, 1, None, None).is_none(),
        "no attempt after"
    );
    let cut = next(&mut second)
        .await
        .expect("a frame")
        .expect_err("cut off");
    assert_eq!(cut.code(), tonic::Code::Cancelled);
}
