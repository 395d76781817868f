//! Bytes copied both ways between two streams until both sides are done or the pair goes
//! idle: opaque TCP, and an upgraded (WebSocket) tunnel.
//!
//! Half-close is kept: when one side finishes sending, the other side's write half is shut
//! down and the opposite direction keeps flowing.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BUF: usize = 16 * 1024;

/// A write that waits longer than `idle` is idle too: a peer that stops reading must not
/// hold the connection (and the proxy's buffers) forever.
async fn within<F: std::future::Future<Output = io::Result<()>>>(
    idle: Duration,
    write: F,
) -> io::Result<()> {
    tokio::time::timeout(idle, write).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "idle timeout: the peer stopped reading",
        )
    })?
}

pub async fn copy_with_idle_timeout<A, B>(a: A, b: B, idle: Duration) -> io::Result<u64>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut abuf, mut bbuf) = (vec![0u8; BUF], vec![0u8; BUF]);
    let (mut a_open, mut b_open) = (true, true);
    let mut total = 0u64;
    while a_open || b_open {
        tokio::select! {
            r = ar.read(&mut abuf), if a_open => {
                let n = r?;
                if n == 0 {
                    a_open = false;
                    within(idle, bw.shutdown()).await?;
                } else {
                    within(idle, bw.write_all(&abuf[..n])).await?;
                    total += n as u64;
                }
            }
            r = br.read(&mut bbuf), if b_open => {
                let n = r?;
                if n == 0 {
                    b_open = false;
                    within(idle, aw.shutdown()).await?;
                } else {
                    within(idle, aw.write_all(&bbuf[..n])).await?;
                    total += n as u64;
                }
            }
            _ = tokio::time::sleep(idle) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_stream_is_closed() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let err = copy_with_idle_timeout(a, b, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    /// One side sends without end and the other never reads: the proxy's write blocks, and
    /// the idle timeout must still end the connection.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_timed_out() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, _b_peer_never_reads) = tokio::io::duplex(64);
        let copy = tokio::spawn(copy_with_idle_timeout(a, b, Duration::from_secs(30)));
        let flood =
            tokio::spawn(async move { while a_peer.write_all(&[0u8; 64]).await.is_ok() {} });
        let ended = tokio::time::timeout(Duration::from_secs(3600), copy)
            .await
            .expect("the copy ends by its idle timeout, not never");
        assert_eq!(ended.unwrap().unwrap_err().kind(), io::ErrorKind::TimedOut);
        flood.abort();
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let copy = tokio::spawn(copy_with_idle_timeout(a, b, Duration::from_secs(30)));
        a_peer.write_all(b"ping").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        b_peer.write_all(b"pong").await.unwrap();
        drop(b_peer);
        let mut back = Vec::new();
        a_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(copy.await.unwrap().unwrap(), 8);
    }
}
