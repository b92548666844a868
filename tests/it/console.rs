//! The event console at `/console` (issue 6 part 2) from outside the browser: which
//! environments serve it, content types, the security headers on every file, and the
//! startup line that points a developer at it. What the page does in a browser is tested
//! by clients/typescript/browser/console.test.mjs.

use crate::common::*;

const FILES: &[(&str, &str)] = &[
    ("/console", "text/html; charset=utf-8"),
    ("/console/", "text/html; charset=utf-8"),
    ("/console/index.html", "text/html; charset=utf-8"),
    ("/console/console.css", "text/css; charset=utf-8"),
    ("/console/console.js", "text/javascript; charset=utf-8"),
    (
        "/console/switchboard-client.js",
        "text/javascript; charset=utf-8",
    ),
    ("/console/favicon.svg", "image/svg+xml"),
];

fn assert_locked_down(r: &HttpResponse, path: &str) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{path}: no Content-Security-Policy"));
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(
            csp.contains(directive),
            "{path}: CSP lacks {directive}: {csp}"
        );
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{path}: {csp}"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{path}"
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
}

#[tokio::test]
async fn development_serves_the_console_with_a_strict_policy() {
    let gw = GatewayOpts::new().start();
    for (path, content_type) in FILES {
        let r = gw.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some(*content_type), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-cache"), "{path}");
        assert!(!r.body.is_empty(), "{path}");
        assert_locked_down(&r, path);
    }
    let page = gw.get("/console").await.text();
    assert!(
        page.contains("<title>Switchboard console</title>"),
        "{page}"
    );

    let missing = gw.get("/console/missing.js").await;
    assert_eq!(missing.status, 404);
    assert_locked_down(&missing, "/console/missing.js");
    // A prefix match must not leak into other routes.
    assert_eq!(gw.get("/consoles").await.status, 404);

    let post = gw.post("/console/", &[], b"x").await;
    assert_eq!(post.status, 405, "{}", post.text());
    let head = gw.request("HEAD", "/console/console.js", &[], None).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has no body");
}

#[tokio::test]
async fn development_prints_where_the_console_is() {
    let gw = GatewayOpts::new().secret(None).start();
    let url = format!("console: http://{}/console/", gw.addr());
    // Printed with the listening line, but read from the pipe by another thread.
    let deadline = std::time::Instant::now() + T;
    while !gw.logs().contains(&url) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(&url))
        .unwrap_or_else(|| panic!("no `{url}` line in:\n{logs}"));
    assert!(
        line.contains("project demo"),
        "with a generated secret the line says which project the printed token grants: {line}"
    );
    assert!(
        !line.contains("token="),
        "the console URL never carries a token: {line}"
    );
}

#[tokio::test]
async fn production_serves_no_console_unless_configured() {
    let off = GatewayOpts::new().environment("production").start();
    for (path, _) in FILES {
        let r = off.get(path).await;
        assert_eq!(r.status, 404, "{path} in production: {}", r.text());
        assert_eq!(
            r.json()["error"],
            "not_found",
            "{path}: same 404 as any unknown route"
        );
    }
    assert!(
        !off.logs().contains("console: "),
        "no console line when it is off:\n{}",
        off.logs()
    );

    let on = GatewayOpts::new()
        .environment("production")
        .cfg("console", "enabled", "true")
        .start();
    let r = on.get("/console/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_locked_down(&r, "/console/");
}

#[tokio::test]
async fn development_can_turn_the_console_off() {
    let by_env = GatewayOpts::new()
        .env("SWITCHBOARD_CONSOLE", "false")
        .start();
    assert_eq!(by_env.get("/console/").await.status, 404);
    let by_file = GatewayOpts::new()
        .cfg("console", "enabled", "false")
        .start();
    assert_eq!(by_file.get("/console/console.js").await.status, 404);
}
