//! The ADS service on the wire: gRPC framing of its two streaming methods, without tonic's
//! generated wrapper.
//!
//! tonic's encoder copies every response into a per-stream buffer that keeps the size of the
//! largest response it ever sent (the first full push, tens of kilobytes), for as long as the
//! stream lives. With 10,000 proxies that buffer was a third of the control plane's memory.
//! Here a stream's task encodes each response once, into a buffer of exactly its size, and
//! the connection writes that buffer and frees it. Requests are still read by tonic's decoder,
//! which starts small and grows only for a large request.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::codec::{BufferSettings, CompressionEncoding, Streaming};
use tonic_prost::ProstDecoder;

/// What a stream's task hands its connection: an encoded response, or the status that ends
/// the stream.
pub(crate) type Outbound = Result<Bytes, Status>;

/// A request larger than this is refused (tonic's own default): an Envoy's first request,
/// with its node's extension list, is tens of kilobytes.
pub(crate) const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// Where a stream's request buffer starts: a proxy's requests are a few hundred bytes.
const REQUEST_BUFFER: usize = 1024;

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
pub(crate) fn requests<T>(body: tonic::body::Body, max: usize) -> Streaming<T>
where
    T: prost::Message + Default + Send + 'static,
{
    let decoder = ProstDecoder::new(BufferSettings::new(REQUEST_BUFFER, 32 * 1024));
    Streaming::new_request(decoder, body, None::<CompressionEncoding>, Some(max))
}

/// The response body of one stream: what its task sends, then the trailers.
struct ResponseBody {
    rx: mpsc::Receiver<Outbound>,
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
        let status = match self.rx.poll_recv(cx) {
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
pub(crate) fn streaming_response(
    rx: mpsc::Receiver<Outbound>,
) -> http::Response<tonic::body::Body> {
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
            let (tx, rx) = mpsc::channel(4);
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
}
