//! `GET /dashboard` on the admin port: one self-contained, read-only page (HTML, style and
//! script inline) that draws the service graph, each service's golden signals over the last
//! minutes, the proxies with their config versions and NACKs, certificate expiry and what
//! `check` finds. It reads `/graph`, `/status` and `/check` from the same port.
//!
//! The cluster may be offline and the page is served without authentication, so it loads
//! nothing from elsewhere: its Content-Security-Policy allows no other origin, no frame, no
//! form and no plugin.

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::Full;

const PAGE: &str = include_str!("dashboard.html");

/// Only the page's own inline script and style, and fetches to this port.
const POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
    connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn page() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing on the page names another origin: no script, style, image or font from a CDN.
    #[test]
    fn the_page_names_no_other_origin() {
        // The SVG namespace is a name, not a place: nothing is fetched from it.
        let text = PAGE.replace("\"http://www.w3.org/2000/svg\"", "");
        for needle in [
            "http://", "https://", "//cdn", "src=", "href=", "@import", "url(h",
        ] {
            assert!(!text.contains(needle), "the page contains `{needle}`");
        }
        assert!(
            page().headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'none'")
        );
    }
}
