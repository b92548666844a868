//! `GET /ws/{project_id}` and `GET /ws/user`: from HTTP request to a running session.
//!
//! Order of checks (docs/protocol.md §2): project id (400), Origin (403), not an upgrade (401/403,
//! or 426 with valid credentials), draining or broker down (503), connection caps (503),
//! then the authorization hook when the credential alone does not decide (docs/protocol.md
//! §10; never asked for a request refused before), then the upgrade. Credential failures on
//! an upgrade complete the upgrade and close with 4001/4003 (1013 when the session store or
//! the hook cannot answer), because browsers cannot read handshake statuses.
//!
//! The session is registered in the hub and subscribed to its projects BEFORE the 101 is
//! returned, and its greeting is put in front of its outbox: nothing published after the
//! handshake can be missed, and `connection.established` is always the first frame.

use std::net::IpAddr;
use std::sync::Arc;

use http::{header, Request, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use switchboard_middleware::{Authentication, Claims, ClientIp, PeerAddr, RequestId, SessionId};

use crate::app::App;
use crate::broker::ConnectionRecord;
use crate::metrics::{Handshake, Kind};
use crate::project::valid_project_id;
use crate::response::{json_error, retry_after, Response};
use crate::schema::types::ConnectionClosed;
use crate::schema::ServerMessage;
use crate::session::{Scope, Session};
use crate::stream::ResumeRequest;
use crate::ws::close_code;
use crate::ws::{frame, upgrade};

fn client_ip<B>(req: &Request<B>) -> IpAddr {
    req.extensions()
        .get::<ClientIp>()
        .map(|c| c.0)
        .or_else(|| req.extensions().get::<PeerAddr>().map(|p| p.0.ip()))
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn origin_allowed(app: &App, origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    app.config
        .allowed_origins()
        .iter()
        .any(|allowed| allowed == "*" || allowed.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// `?last_seq=N[&epoch=E]` (single-project connections only).
fn resume_request(uri: &http::Uri) -> Result<Option<ResumeRequest>, &'static str> {
    let mut last_seq = None;
    let mut epoch = None;
    for pair in uri.query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "last_seq" => {
                last_seq = Some(
                    v.parse::<u64>()
                        .map_err(|_| "last_seq must be a non-negative integer")?,
                )
            }
            "epoch" if !v.is_empty() => {
                if v.len() > 64
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err("epoch is not a valid epoch");
                }
                epoch = Some(v.to_owned());
            }
            _ => {}
        }
    }
    Ok(last_seq.map(|last_seq| ResumeRequest { last_seq, epoch }))
}

/// What the credential allows on this endpoint.
enum Grant {
    Ok(Arc<Claims>, Vec<String>),
    /// The credential alone does not decide and a hook is configured: asked ([`resolve`])
    /// only once the rate limit and the connection caps let the request through.
    Ask(Arc<Claims>),
    Refused(u16, &'static str, &'static str),
}

const STORY_INVALID: &str = "Invalid token";
const STORY_DENIED: &str = "Access denied";

/// `max_projects` is `ws.max_subscriptions_per_connection`: `/ws/user` joins what the
/// credential names, so it obeys the same project-id rule and cap as `subscribe` (a token
/// naming `x:commands`, `../..` or a thousand projects must not join any of them).
/// `hook`: an authorization hook is configured, so what the credential does not grant is
/// [`Grant::Ask`] rather than refused (docs/protocol.md §10).
fn grant(auth: &Authentication, scope: &Scope, max_projects: usize, hook: bool) -> Grant {
    let story = matches!(scope, Scope::Story(_) | Scope::UserStories);
    let claims = match auth {
        Authentication::Authenticated(claims) => claims,
        Authentication::Invalid(e) if e.is_unavailable() => {
            return Grant::Refused(close_code::TRY_AGAIN_LATER, e.code(), e.client_message())
        }
        // Story sockets answer as seed 003 does (docs/protocol.md §9).
        _ if story => {
            return Grant::Refused(close_code::UNAUTHENTICATED, STORY_INVALID, STORY_INVALID)
        }
        Authentication::Missing => {
            return Grant::Refused(
                close_code::UNAUTHENTICATED,
                "missing_credentials",
                "a token or session is required",
            )
        }
        Authentication::Invalid(e) => {
            return Grant::Refused(close_code::UNAUTHENTICATED, e.code(), e.client_message())
        }
    };
    let ask_or = |refusal: Grant| {
        if hook {
            Grant::Ask(claims.clone())
        } else {
            refusal
        }
    };
    match scope {
        // A worker's command stream: a service credential granting the project, as for the
        // publish API; no hook (workers are not users).
        Scope::Commands(_) if !claims.is_service() => Grant::Refused(
            close_code::FORBIDDEN,
            "forbidden",
            "a command stream needs a service credential (role: service)",
        ),
        Scope::Commands(p) if claims.grants(p) => Grant::Ok(claims.clone(), vec![p.clone()]),
        Scope::Commands(_) => Grant::Refused(
            close_code::FORBIDDEN,
            "forbidden",
            "your credential does not grant this project",
        ),
        Scope::Project(p) if claims.grants(p) => Grant::Ok(claims.clone(), vec![p.clone()]),
        Scope::Project(_) => ask_or(Grant::Refused(
            close_code::FORBIDDEN,
            "forbidden",
            "your credential does not grant this project",
        )),
        Scope::Story(s) if claims.grants_story(s) => Grant::Ok(claims.clone(), vec![s.clone()]),
        Scope::Story(_) => ask_or(Grant::Refused(
            close_code::FORBIDDEN,
            STORY_DENIED,
            STORY_DENIED,
        )),
        Scope::User => {
            let projects = dedupe_valid(claims.named_projects());
            if projects.is_empty() {
                ask_or(no_user_projects())
            } else if projects.len() > max_projects {
                Grant::Refused(
                    close_code::FORBIDDEN,
                    "too_many_projects",
                    "your credential names more projects than one connection may follow",
                )
            } else {
                Grant::Ok(claims.clone(), projects)
            }
        }
        Scope::UserStories => {
            // The stories the credential names (none is not an error: the seed's
            // dashboard socket opens for a user without stories too).
            let mut stories = dedupe_valid(claims.named_stories());
            if stories.is_empty() {
                return ask_or(Grant::Ok(claims.clone(), stories));
            }
            stories.truncate(max_projects);
            Grant::Ok(claims.clone(), stories)
        }
    }
}

fn no_user_projects() -> Grant {
    Grant::Refused(
        close_code::FORBIDDEN,
        "forbidden",
        "your credential names no valid project for /ws/user",
    )
}

fn dedupe_valid(mut ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| valid_project_id(id) && seen.insert(id.clone()));
    ids
}

/// Asks the app backend's hook what the credential did not decide (docs/protocol.md §10):
/// allowed, denied (4003, `Access denied` on story sockets), or, when the hook fails,
/// 1013 "try again": a failing hook is never a denial.
async fn resolve(app: &App, claims: Arc<Claims>, scope: &Scope) -> Grant {
    use crate::authz::Kind;
    let unavailable = |e: crate::authz::HookError| {
        tracing::warn!(error = %e, "authorization hook failed: refusing with 1013");
        Grant::Refused(
            close_code::TRY_AGAIN_LATER,
            "authorization_unavailable",
            "your access could not be checked right now; retry shortly",
        )
    };
    match scope {
        // Never asked (a service credential decides); refused rather than assumed.
        Scope::Commands(_) => Grant::Refused(
            close_code::FORBIDDEN,
            "forbidden",
            "your credential does not grant this project",
        ),
        Scope::Project(id) | Scope::Story(id) => {
            let (kind, denied) = match scope {
                Scope::Story(_) => (
                    Kind::Story,
                    Grant::Refused(close_code::FORBIDDEN, STORY_DENIED, STORY_DENIED),
                ),
                _ => (
                    Kind::Project,
                    Grant::Refused(
                        close_code::FORBIDDEN,
                        "forbidden",
                        "your credential does not grant this project",
                    ),
                ),
            };
            match app.authz.allows(&claims, kind, id).await {
                Ok(true) => Grant::Ok(claims, vec![id.clone()]),
                Ok(false) => denied,
                Err(e) => unavailable(e),
            }
        }
        Scope::User => match app.authz.list(&claims, Kind::Project).await {
            Ok(ids) if ids.is_empty() => no_user_projects(),
            Ok(ids) => Grant::Ok(claims, ids),
            Err(e) => unavailable(e),
        },
        Scope::UserStories => match app.authz.list(&claims, Kind::Story).await {
            Ok(ids) => Grant::Ok(claims, ids),
            Err(e) => unavailable(e),
        },
    }
}

/// The target of `/ws/{target}`: a project, `user`, `user/stories` or
/// `stories/{id}/progress`; None for anything else.
fn scope_of(target: &str) -> Option<Scope> {
    match target {
        "user" => return Some(Scope::User),
        "user/stories" => return Some(Scope::UserStories),
        _ => {}
    }
    if let Some(story) = target
        .strip_prefix("stories/")
        .and_then(|rest| rest.strip_suffix("/progress"))
    {
        return valid_project_id(story).then(|| Scope::Story(story.to_owned()));
    }
    valid_project_id(target).then(|| Scope::Project(target.to_owned()))
}

pub async fn handle(app: Arc<App>, mut req: Request<Incoming>) -> Response {
    let path = req.uri().path();
    let scope = match path
        .strip_prefix("/v1/projects/")
        .and_then(|rest| rest.strip_suffix("/commands"))
    {
        Some(project) => valid_project_id(project).then(|| Scope::Commands(project.to_owned())),
        None => scope_of(path.trim_start_matches("/ws/")),
    };
    let Some(scope) = scope else {
        app.hub.metrics.handshake(Handshake::BadRequest);
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_project_id",
            "project_id must match [A-Za-z0-9_.-]{1,128}",
        );
    };
    // The `kind` label of the handshake metrics (docs/protocol.md §9).
    let kind = match scope {
        Scope::Story(_) | Scope::UserStories => Kind::Story,
        Scope::Commands(_) => Kind::Commands,
        Scope::Project(_) | Scope::User => Kind::Project,
    };
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let allowed = origin
            .to_str()
            .map(|o| origin_allowed(&app, o))
            .unwrap_or(false);
        if !allowed {
            app.hub.metrics.handshake_of(kind, Handshake::OriginRefused);
            return json_error(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this Origin may not connect",
            );
        }
    }
    let resume = match resume_request(req.uri()) {
        Ok(r) => r,
        Err(message) => {
            app.hub.metrics.handshake_of(kind, Handshake::BadRequest);
            return json_error(StatusCode::BAD_REQUEST, "invalid_resume", message);
        }
    };
    let auth = req
        .extensions()
        .get::<Authentication>()
        .cloned()
        .unwrap_or(Authentication::Missing);
    let granted = grant(
        &auth,
        &scope,
        app.config.ws.max_subscriptions_per_connection,
        app.authz.has_hook(),
    );
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return match granted {
            // A valid credential whose grant the hook would decide: not asked for a
            // request that cannot become a connection anyway.
            Grant::Ok(..) | Grant::Ask(_) => {
                let mut r = json_error(
                    StatusCode::UPGRADE_REQUIRED,
                    "upgrade_required",
                    "this endpoint speaks WebSocket only",
                );
                r.headers_mut()
                    .insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
                r
            }
            Grant::Refused(close_code::FORBIDDEN, code, message) => {
                json_error(StatusCode::FORBIDDEN, code, message)
            }
            Grant::Refused(close_code::TRY_AGAIN_LATER, code, message) => retry_after(
                json_error(StatusCode::SERVICE_UNAVAILABLE, code, message),
                2,
            ),
            Grant::Refused(_, code, message) => json_error(StatusCode::UNAUTHORIZED, code, message),
        };
    }
    if app.is_draining() {
        app.hub.metrics.handshake_of(kind, Handshake::Draining);
        return retry_after(
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this instance is shutting down; connect again",
            ),
            1,
        );
    }
    if !app.broker.is_up() {
        app.hub
            .metrics
            .handshake_of(kind, Handshake::BrokerUnavailable);
        return retry_after(
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "the event broker is unreachable; retry shortly",
            ),
            2,
        );
    }
    let ip = client_ip(&req);
    let guard = match app.limits.acquire(ip) {
        Ok(g) => g,
        Err(e) => {
            app.hub
                .metrics
                .handshake_of(kind, Handshake::TooManyConnections);
            return retry_after(
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_connections",
                    &e.to_string(),
                ),
                5,
            );
        }
    };
    if !upgrade::valid_key(req.headers()) {
        app.hub.metrics.handshake_of(kind, Handshake::BadRequest);
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_upgrade",
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
        );
    }
    // The hook is asked only now, past the rate limit, the caps and the key check, while
    // this request holds its connection slot.
    let granted = match granted {
        Grant::Ask(claims) => resolve(&app, claims, &scope).await,
        decided => decided,
    };
    // Our own handle on the upgrade (see `ws::upgrade`): fastwebsockets only builds the 101.
    let upgrade = hyper::upgrade::on(&mut req);
    let response = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, _unused)) => response,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string()),
    };
    let response = response.map(|_| Default::default());
    let (claims, projects) = match granted {
        Grant::Ok(claims, projects) => (claims, projects),
        refused => {
            let (code, reason) = match refused {
                Grant::Refused(code, reason, _) => (code, reason),
                // Resolved above; were it not, "try again" is the answer that denies nobody.
                _ => (close_code::TRY_AGAIN_LATER, "authorization_unavailable"),
            };
            app.hub.metrics.handshake_of(
                kind,
                if code == close_code::FORBIDDEN {
                    Handshake::Forbidden
                } else if code == close_code::TRY_AGAIN_LATER {
                    Handshake::AuthUnavailable
                } else {
                    Handshake::Unauthenticated
                },
            );
            let mut notice = ConnectionClosed {
                code,
                reason: reason.to_owned(),
                client_id: None,
            }
            .to_message();
            notice.insert("timestamp".into(), json!(crate::event::now_rfc3339()));
            let notice = match &scope {
                Scope::Project(p) => {
                    notice.insert("project_id".into(), json!(p));
                    crate::event::server_frame(&serde_json::Value::Object(notice))
                }
                Scope::User => {
                    notice.insert("projects".into(), json!([]));
                    crate::event::server_frame(&serde_json::Value::Object(notice))
                }
                // The seed's frontend reads every text frame as progress, and a worker's
                // command stream carries commands only: close frame only.
                Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => bytes::Bytes::new(),
            };
            tokio::spawn(upgrade::refuse(upgrade, notice, frame::close(code, reason)));
            drop(guard);
            return response;
        }
    };

    let client_id = uuid::Uuid::new_v4().to_string();
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
    let session = Session::new(
        client_id,
        claims,
        scope.clone(),
        projects.clone(),
        ip,
        peer,
        app.outbox_limits(),
    );
    if let Some(SessionId(id)) = req.extensions().get::<SessionId>() {
        session.set_session_id(id);
    }
    // Everything offered waits until the greeting (snapshot or replay) is queued.
    session.hold();
    // Taken before the session is in the hub, so a drain that begins meanwhile waits for it.
    let tracked = app.sessions.token();
    app.hub.register(&session);
    for project in &projects {
        if app.join_project(project, &session, true).await.is_err() {
            app.hub.unregister(&session);
            return retry_after(
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker_unavailable",
                    "the event broker is unreachable; retry shortly",
                ),
                2,
            );
        }
    }

    let record = ConnectionRecord {
        client_id: session.client_id.clone(),
        user_id: session.user_id(),
        project_id: session.primary_project(),
        // A story connection's ids are stories: no project presence for them.
        projects: if session.is_raw() {
            Vec::new()
        } else {
            projects
        },
        instance_id: app.instance_id.clone(),
        connected_at: session.connected_at(),
    };
    let ttl = app.record_ttl();
    // Queued for the batched record writer, ahead of this session's own deletion.
    app.broker.put_connection(&record, ttl).await;
    if let Scope::Commands(project) = &scope {
        app.note_command_streams(project).await;
    }
    app.hub.metrics.handshake_of(kind, Handshake::Accepted);
    // In the connection's span (entered, not named as parent: a JSON line's span list is
    // the entered scope), with the request id linking it to the handshake's request line.
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.as_str());
    session.span().in_scope(|| {
        tracing::debug!(request_id, user_id = %session.user_id(), "websocket connected");
    });
    tokio::spawn(crate::connection::task::task(
        app, session, upgrade, guard, resume, tracked,
    ));
    response
}
