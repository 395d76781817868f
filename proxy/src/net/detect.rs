//! Protocol detection: read the first bytes of a connection and decide what it speaks.
//!
//! The bytes read are not lost: the stream is handed on as a `Prefixed` that replays them
//! before reading from the socket again. Detection waits at most the listener's detect
//! timeout; a client that says nothing by then is treated as opaque TCP, so a
//! server-speaks-first protocol still works there, only late (declare its port `opaque`).

use std::io;

use bytes::BytesMut;
use outrigger_core::prefixed::Prefixed;
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

enum Verdict {
    Known(Protocol),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // A TLS record of type handshake (22), and a ClientHello inside (1) once we see it.
    if buf[0] == 0x16 {
        if buf.len() < 6 {
            return Verdict::NeedMore;
        }
        return Verdict::Known(if buf[1] == 3 && buf[5] == 1 {
            Protocol::Tls
        } else {
            Protocol::Opaque
        });
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Known(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    let mut could_be_method = false;
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if n == m.len() {
                return Verdict::Known(Protocol::Http1);
            }
            could_be_method = true;
        }
    }
    if could_be_method {
        Verdict::NeedMore
    } else {
        Verdict::Known(Protocol::Opaque)
    }
}

/// Reads until the protocol is known, the peer stops sending, or `deadline` passes.
pub async fn detect<S: AsyncRead + Unpin>(
    mut stream: S,
    deadline: tokio::time::Instant,
) -> io::Result<(Protocol, Prefixed<S>)> {
    let mut buf = BytesMut::with_capacity(64);
    let protocol = loop {
        if let Verdict::Known(p) = classify(&buf) {
            break p;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => break Protocol::Opaque,
            Ok(Ok(0)) => break Protocol::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((protocol, Prefixed::with_prefix(stream, buf)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn verdict(bytes: &[u8]) -> Option<Protocol> {
        match classify(bytes) {
            Verdict::Known(p) => Some(p),
            Verdict::NeedMore => None,
        }
    }

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(verdict(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(verdict(b"POS"), None);
        assert_eq!(verdict(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(verdict(b"PRI * HTTP/2"), None);
        assert_eq!(verdict(&[0x16, 3, 1, 0, 200, 1]), Some(Protocol::Tls));
        assert_eq!(verdict(b"\x00\x01binary"), Some(Protocol::Opaque));
        assert_eq!(verdict(b"HELLO"), Some(Protocol::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_becomes_opaque_after_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let started = tokio::time::Instant::now();
        let (p, _) = detect(
            server,
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(client);
    }

    #[tokio::test]
    async fn replays_what_it_read() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        drop(client);
        let (p, mut s) = detect(server, tokio::time::Instant::now() + Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
    }
}
