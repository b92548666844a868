//! The live event console: the page under `console/` served at `/console`.
//!
//! Its files are compiled into the binary (`include_bytes!`), so a fresh `cargo build`
//! serves it with nothing beside the executable. Two of them are generated from the
//! TypeScript sources and committed (`console/switchboard-client.js`, `console/console.js`;
//! `clients/typescript/test.sh` fails when they are stale), so building the gateway needs
//! no Node.
//!
//! Served only when [`crate::config::Config::console_enabled`] (development and docker by
//! default, production only when configured); otherwise `/console` is the plain 404 of an
//! unknown route. Every response carries a Content-Security-Policy that allows scripts and
//! styles from this origin only (no inline code, no eval, DOM writes only through text),
//! and the page keeps the token in memory (or in `sessionStorage` when the user opts in),
//! never in its URL.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body_util::Full;

use switchboard_middleware::json_error;

/// What the console answers (the routes' response type, spelled out: the console sits below
/// the router and does not import it).
type Response = http::Response<Full<Bytes>>;

/// What the page may do. `connect-src` allows any ws:/wss: host because the page may be
/// pointed at another gateway than the one serving it; nothing else leaves the origin.
/// `require-trusted-types-for` makes the browser refuse any HTML string written into the
/// DOM, so event data can only ever be shown as text.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self' ws: wss:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
     trusted-types 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

const INDEX: &[u8] = include_bytes!("../console/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        path: "/console",
        content_type: HTML,
        body: INDEX,
    },
    Asset {
        path: "/console/",
        content_type: HTML,
        body: INDEX,
    },
    Asset {
        path: "/console/index.html",
        content_type: HTML,
        body: INDEX,
    },
    Asset {
        path: "/console/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../console/console.css"),
    },
    Asset {
        path: "/console/console.js",
        content_type: JS,
        body: include_bytes!("../console/console.js"),
    },
    Asset {
        path: "/console/switchboard-client.js",
        content_type: JS,
        body: include_bytes!("../console/switchboard-client.js"),
    },
    Asset {
        path: "/console/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../console/favicon.svg"),
    },
];

/// `/console` and everything under `/console/`.
pub fn is_console_path(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// The asset at `path` (GET or HEAD), or a 404 for an unknown one.
pub fn serve(path: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return with_security_headers(json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such console file",
        ));
    };
    let mut r = http::Response::new(Full::new(Bytes::from_static(asset.body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // Small files, embedded in the binary: revalidate every time so an upgraded gateway
    // never runs a page against an older cached script.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_security_headers(r)
}

fn with_security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The page URL holds no secret, but nothing it loads needs to know where it came from.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> &'static str {
        let asset = ASSETS.iter().find(|a| a.path == path).expect(path);
        std::str::from_utf8(asset.body).expect("utf-8")
    }

    /// Every `src`/`href` of the page names an embedded file: a renamed or forgotten asset
    /// fails here rather than as a 404 in somebody's browser.
    #[test]
    fn the_page_references_only_embedded_files() {
        let html = text("/console/");
        let mut refs = 0;
        for attr in ["src=\"", "href=\""] {
            for (i, _) in html.match_indices(attr) {
                let rest = &html[i + attr.len()..];
                let target = &rest[..rest.find('"').unwrap()];
                assert!(
                    ASSETS.iter().any(|a| a.path == target),
                    "index.html references {target}, which is not embedded"
                );
                refs += 1;
            }
        }
        assert!(refs >= 3, "index.html should load its css, script and icon");
    }

    /// The CSP forbids inline code; the page must not need any.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = text("/console/");
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap()];
            assert!(tag.contains(" src=\""), "inline script: {tag}");
        }
        assert!(!html.contains("<style"), "inline <style> block");
        assert!(!html.contains(" style=\""), "inline style attribute");
        for tag in html
            .split('<')
            .skip(1)
            .map(|t| &t[..t.find('>').unwrap_or(t.len())])
        {
            for attr in tag.split_whitespace().skip(1) {
                assert!(
                    !(attr.starts_with("on") && attr.contains('=')),
                    "inline event handler in <{tag}>"
                );
            }
        }
    }

    /// The console loads the client as a separate module, so the page runs the very file
    /// the client tests exercise.
    #[test]
    fn the_console_imports_the_served_client() {
        assert!(text("/console/console.js").contains("from \"./switchboard-client.js\""));
        assert!(text("/console/switchboard-client.js").contains("var SwitchboardClient = class"));
    }

    #[test]
    fn unknown_files_are_404_with_the_policy() {
        let r = serve("/console/nope.js");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
        let r = serve("/console");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], HTML);
    }
}
