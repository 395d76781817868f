//! Trace context on the wire: W3C `traceparent`/`tracestate` in and out, and B3 (multiple
//! headers or the single `b3` header) in. A request that carries a context continues it; one
//! that carries none starts a trace, sampled by the configured ratio.

use http::HeaderMap;
use http::header::HeaderValue;

pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub const TRACESTATE: &str = "tracestate";
const B3_HEADERS: [&str; 5] = [
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    (out != [0u8; N]).then_some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SpanContext {
    /// A new span in the same trace.
    pub fn child(&self) -> SpanContext {
        SpanContext {
            span_id: new_span_id(),
            ..*self
        }
    }

    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0u8; 8] {
            return id;
        }
    }
}

pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0u8; 16] {
            return id;
        }
    }
}

/// The caller's context, W3C first, then B3.
pub fn extract(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(tp) = get(TRACEPARENT.as_str()) {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if let [version, trace, span, flags] = parts.as_slice()
            && *version != "ff"
            && version.len() == 2
        {
            let flags = u8::from_str_radix(flags, 16).ok()?;
            return Some(SpanContext {
                trace_id: hex(trace)?,
                span_id: hex(span)?,
                sampled: flags & 1 == 1,
            });
        }
        return None;
    }
    if let Some(single) = get("b3") {
        // {trace}-{span}[-{sampled}[-{parent}]], or just a sampling decision.
        let parts: Vec<&str> = single.trim().split('-').collect();
        if parts.len() >= 2 {
            return Some(SpanContext {
                trace_id: b3_trace_id(parts[0])?,
                span_id: hex(parts[1])?,
                sampled: parts.get(2).is_none_or(|s| matches!(*s, "1" | "d")),
            });
        }
        return None;
    }
    let (trace, span) = (get("x-b3-traceid")?, get("x-b3-spanid")?);
    Some(SpanContext {
        trace_id: b3_trace_id(trace)?,
        span_id: hex(span)?,
        sampled: get("x-b3-flags") == Some("1")
            || get("x-b3-sampled").is_none_or(|s| s == "1" || s == "true"),
    })
}

/// B3 allows 64-bit trace IDs; W3C wants 128, left-padded with zeros.
fn b3_trace_id(text: &str) -> Option<[u8; 16]> {
    match text.len() {
        32 => hex(text),
        16 => {
            let short: [u8; 8] = hex(text)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&short);
            Some(id)
        }
        _ => None,
    }
}

/// Sends `ctx` on as W3C; B3 headers would name a stale parent, so they go.
pub fn inject(headers: &mut HeaderMap, ctx: &SpanContext) {
    for name in B3_HEADERS.iter().chain(&["b3"]) {
        headers.remove(*name);
    }
    if let Ok(value) = HeaderValue::from_str(&ctx.traceparent()) {
        headers.insert(TRACEPARENT, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn w3c_in_and_out() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = extract(&headers(&[("traceparent", tp)])).unwrap();
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), tp);
        let unsampled = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]))
        .unwrap();
        assert!(!unsampled.sampled);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-01",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
    }

    #[test]
    fn b3_in_either_form_continues_the_trace() {
        let multi = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        let single = extract(&headers(&[(
            "b3",
            "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1",
        )]))
        .unwrap();
        assert_eq!(multi, single);
        assert!(multi.sampled);
        let short = extract(&headers(&[("b3", "48485a3953bb6124-a2fb4a1d1a96d312-0")])).unwrap();
        assert_eq!(&short.trace_id[..8], &[0u8; 8]);
        assert!(!short.sampled);

        let mut out = headers(&[("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124")]);
        inject(&mut out, &multi.child());
        assert!(out.get("x-b3-traceid").is_none());
        assert!(
            out.get("traceparent")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("00-463ac35c9f6413ad48485a3953bb6124-")
        );
    }
}
