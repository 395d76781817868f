//! The command line's one call: `GET` a JSON page from an admin port, bounded in time and size.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// How long a call may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest page read.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach {addr}: {reason} (is the control plane running, and is --admin its admin port?)"
    )]
    Unreachable { addr: String, reason: String },
    #[error("{addr}{path} answered {status}: {body}")]
    Status {
        addr: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{addr}{path} did not answer JSON: {reason}")]
    NotJson {
        addr: String,
        path: String,
        reason: String,
    },
}

/// `GET http://{addr}{path}`, whose body is JSON lines: `line` is called with each, until the
/// server ends the stream or `line` returns false. Returns the number of lines.
pub async fn get_lines(
    addr: &str,
    path: &str,
    mut line: impl FnMut(&str) -> bool,
) -> Result<u64, AdminError> {
    let unreachable = |reason: String| AdminError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let resp = tokio::time::timeout(TIMEOUT, send(addr, path))
        .await
        .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))??;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = Limited::new(body, 64 * 1024)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(AdminError::Status {
            addr: addr.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            body: text,
        });
    }
    let (mut pending, mut lines) = (Vec::new(), 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| unreachable(e.to_string()))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        if pending.len() > MAX_BODY {
            return Err(unreachable("a line longer than 16 MiB".into()));
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..=end);
            lines += 1;
            if !line(&text) {
                return Ok(lines);
            }
        }
    }
    Ok(lines)
}

async fn send(addr: &str, path: &str) -> Result<http::Response<hyper::body::Incoming>, AdminError> {
    let unreachable = |reason: String| AdminError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// `GET http://{addr}{path}`, read as JSON.
pub async fn get_json(addr: &str, path: &str) -> Result<serde_json::Value, AdminError> {
    let unreachable = |reason: String| AdminError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let call = async {
        let resp = send(addr, path).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))??;
    if !status.is_success() {
        return Err(AdminError::Status {
            addr: addr.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    serde_json::from_slice(&body).map_err(|e| AdminError::NotJson {
        addr: addr.to_string(),
        path: path.to_string(),
        reason: e.to_string(),
    })
}
