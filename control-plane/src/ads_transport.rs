//! The ADS service on the wire: gRPC framing of its two streaming methods, without tonic's
//! generated wrapper.
//!
//! tonic's encoder copies every response into a per-stream buffer that keeps the size of the
//! largest response it ever sent (the first full push, tens of kilobytes), for as long as the
//! stream lives. With 10,000 proxies that buffer was a third of the control plane's memory.
//! Here a stream's task encodes each response once, into a buffer of exactly its size, and
//! the connection writes that buffer and frees it. Requests are read the same way: a buffer
//! holds a message only until it is complete.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use tonic::Status;

/// What a stream's task hands its connection: an encoded response, or the status that ends
/// the stream.
pub(crate) type Outbound = Result<Bytes, Status>;

/// A stream's responses on their way to its connection. futures' channel rather than tokio's:
/// tokio's sets aside a block of 32 slots when it is made (1.5 KB here), held for as long as
/// the stream lives, where this one holds a response only while it waits to be written.
pub(crate) type OutboundTx = futures_channel::mpsc::Sender<Outbound>;
pub(crate) type OutboundRx = futures_channel::mpsc::Receiver<Outbound>;

/// A stream's channel for at most `bound` responses waiting (plus one per sender): a client
/// that stops reading stops its stream's task there.
pub(crate) fn outbound(bound: usize) -> (OutboundTx, OutboundRx) {
    futures_channel::mpsc::channel(bound)
}

/// A request larger than this is refused (tonic's own default): an Envoy's first request,
/// with its node's extension list, is tens of kilobytes.
pub(crate) const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// One gRPC message: the uncompressed flag, the length, then the message, in one buffer of
/// exactly that size.
pub(crate) fn grpc_frame<M: prost::Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message
        .encode(&mut buf)
        .expect("the buffer was sized by encoded_len");
    buf.freeze()
}

/// A request's messages, decoded as they arrive; one over `max` bytes ends the stream.
pub(crate) fn requests<T: prost::Message + Default>(
    body: tonic::body::Body,
    max: usize,
) -> Requests<T> {
    Requests {
        body,
        buf: BytesMut::new(),
        max,
        ended: false,
        message: PhantomData,
    }
}

/// The messages of one call, read from its body.
///
/// Its buffer holds only a message not yet complete, and is freed once a message is decoded
/// and nothing follows. A decoder that keeps its buffer (tonic's does) keeps the largest
/// message a stream ever sent for as long as the stream lives: an Envoy's requests carry its
/// node's extension list, tens of kilobytes, and a load report may be a megabyte.
pub(crate) struct Requests<T> {
    body: tonic::body::Body,
    buf: BytesMut,
    max: usize,
    ended: bool,
    message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default> Requests<T> {
    /// The next message; `None` once the client has ended the call cleanly.
    pub(crate) async fn message(&mut self) -> Result<Option<T>, Status> {
        use http_body_util::BodyExt;
        loop {
            if let Some(message) = self.decode()? {
                return Ok(Some(message));
            }
            if self.ended {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(Status::internal("the call ended inside a message")),
                };
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(status)) => return Err(status),
                // Trailers from a client carry nothing a server needs.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// A whole message off the front of the buffer, if there is one.
    fn decode(&mut self) -> Result<Option<T>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Status::unimplemented(
                "this server takes uncompressed messages only",
            ));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            // The code tonic gives a message over its limit, which callers count as such.
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes; the limit is {} bytes",
                self.max
            )));
        }
        // No room is set aside for the length a message claims: the buffer grows with what
        // arrives, so a client that claims 4 MB and sends a byte costs a byte.
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let frame = self.buf.split_to(5 + len);
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        T::decode(&frame[5..])
            .map(Some)
            .map_err(|e| Status::internal(format!("a message that does not decode: {e}")))
    }
}

/// The response body of one stream: what its task sends, then the trailers.
struct ResponseBody {
    rx: OutboundRx,
    done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        use futures_util::StreamExt;
        let status = match self.rx.poll_next_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(message))) => return Poll::Ready(Some(Ok(Frame::data(message)))),
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("13"));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The response that carries a stream: headers now, messages as the task sends them.
pub(crate) fn streaming_response(rx: OutboundRx) -> http::Response<tonic::body::Body> {
    let mut response =
        http::Response::new(tonic::body::Body::new(ResponseBody { rx, done: false }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A call answered with `status` alone.
pub(crate) fn refuse(status: Status) -> http::Response<tonic::body::Body> {
    status.into_http()
}

/// One call to a hand-written service: `serve` answers the methods it has, by path; a
/// compressed call, or one to a method it lacks, is refused with UNIMPLEMENTED.
pub(crate) fn answer(
    req: http::Request<tonic::body::Body>,
    serve: impl FnOnce(
        &str,
        http::Request<tonic::body::Body>,
    ) -> Option<http::Response<tonic::body::Body>>,
) -> std::future::Ready<Result<http::Response<tonic::body::Body>, std::convert::Infallible>> {
    let response = if compressed(&req) {
        refuse(Status::unimplemented(
            "this server takes uncompressed messages only",
        ))
    } else {
        let path = req.uri().path().to_string();
        serve(&path, req).unwrap_or_else(|| refuse(Status::unimplemented("no such method")))
    };
    std::future::ready(Ok(response))
}

/// Compression is not offered, so a client that compresses anyway is refused, as gRPC
/// says, rather than misread.
pub(crate) fn compressed(req: &http::Request<tonic::body::Body>) -> bool {
    req.headers()
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity")
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use futures_util::SinkExt;
    use http_body_util::BodyExt;
    use prost::Message;

    fn response(version: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_frame_is_the_flag_the_length_and_the_message() {
        let frame = grpc_frame(&response("7"));
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!((frame[0], frame.len()), (0, 5 + len));
        assert_eq!(
            DiscoveryResponse::decode(&frame[5..]).unwrap(),
            response("7")
        );
    }

    #[tokio::test]
    async fn the_body_carries_each_message_then_the_status() {
        for (end, code) in [
            (None, "0"),
            (Some(Status::resource_exhausted("too many")), "8"),
        ] {
            let (mut tx, rx) = outbound(4);
            tx.send(Ok(grpc_frame(&response("1")))).await.unwrap();
            tx.send(Ok(grpc_frame(&response("2")))).await.unwrap();
            if let Some(status) = end {
                tx.send(Err(status)).await.unwrap();
            }
            drop(tx);
            let collected = streaming_response(rx).into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers");
            assert_eq!(trailers.get("grpc-status").unwrap(), code);
            let data = collected.to_bytes();
            assert_eq!(data.len(), 2 * grpc_frame(&response("1")).len());
        }
    }

    /// A call's body that delivers `chunks` as its DATA frames, then ends.
    fn body_of(chunks: Vec<Bytes>) -> tonic::body::Body {
        let frames = chunks.into_iter().map(|c| Ok::<_, Status>(Frame::data(c)));
        tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    #[tokio::test]
    async fn messages_are_read_across_frames_and_the_buffer_is_freed_between_them() {
        let (one, two) = (grpc_frame(&response("1")), grpc_frame(&response("2")));
        let big = grpc_frame(&DiscoveryResponse {
            version_info: "x".repeat(40_000),
            ..Default::default()
        });
        // The first message in three pieces, the second and a large third in one frame.
        let mut both = BytesMut::new();
        both.extend_from_slice(&two);
        both.extend_from_slice(&big);
        let chunks = vec![
            one.slice(..2),
            one.slice(2..7),
            one.slice(7..),
            both.freeze(),
        ];
        let mut requests = requests::<DiscoveryResponse>(body_of(chunks), MAX_REQUEST);
        assert_eq!(requests.message().await.unwrap().unwrap(), response("1"));
        assert_eq!(
            requests.buf.capacity(),
            0,
            "nothing follows the first message"
        );
        assert_eq!(requests.message().await.unwrap().unwrap(), response("2"));
        assert_eq!(
            requests
                .message()
                .await
                .unwrap()
                .unwrap()
                .version_info
                .len(),
            40_000
        );
        assert_eq!(
            requests.buf.capacity(),
            0,
            "the large message's room is given back"
        );
        assert_eq!(requests.message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_bad_message_ends_the_call_with_a_status_that_says_why() {
        let one = grpc_frame(&response("1"));
        let mut compressed = one.to_vec();
        compressed[0] = 1;
        let mut oversized = one.to_vec();
        oversized[1..5].copy_from_slice(&(MAX_REQUEST as u32 + 1).to_be_bytes());
        let cases = [
            (vec![Bytes::from(compressed)], tonic::Code::Unimplemented),
            (vec![Bytes::from(oversized)], tonic::Code::OutOfRange),
            (vec![one.slice(..one.len() - 1)], tonic::Code::Internal),
            (
                vec![Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff])],
                tonic::Code::Internal,
            ),
        ];
        for (chunks, code) in cases {
            let mut requests = requests::<DiscoveryResponse>(body_of(chunks), MAX_REQUEST);
            assert_eq!(requests.message().await.unwrap_err().code(), code);
        }
    }
}
