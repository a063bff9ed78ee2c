//! The web view: a read-only, live look at the catalog DAG, the builds and the fleet,
//! served by the control plane next to its API. Pages are rendered here (maud templates,
//! the DAG laid out server-side as SVG); a small script (`assets/live.js`) listens to
//! `/events` (server-sent events fed from `lian.>`, which only the control plane reads) and
//! redraws the page's `<main>` when something changed. Behind the API's token: a login form
//! turns it into an HttpOnly, SameSite=Strict session cookie (`session.rs`).

mod dag;
mod live;
mod pages;
mod session;
mod timeline;

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::get;
use futures::Stream;
use lian_catalog::Catalog;
use lian_core::BuildId;
use maud::Markup;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use live::Live;

use crate::api::App;
use pages::Tab;

/// Builds per page of the list.
const PER_PAGE: usize = 50;
/// Past this many layers the catalog page asks for a layer instead of drawing them all.
const DRAW_WHOLE_UP_TO: usize = 300;
/// A lineage larger than this is drawn up to this many layers (shallowest first).
const MAX_DRAWN: usize = 1_500;
/// The header a live refresh sends to get only the inside of `<main>`.
const FRAGMENT: &str = "x-lian-fragment";

/// The catalog the control plane was given, with what every page needs precomputed.
pub struct CatalogIndex {
    pub catalog: Catalog,
    depths: BTreeMap<String, usize>,
}

impl CatalogIndex {
    pub fn new(catalog: Catalog) -> Self {
        let depths = catalog.depths().into_iter().map(|(n, d)| (n.to_string(), d)).collect();
        Self { catalog, depths }
    }
}

/// The web view's state inside the control plane.
pub struct Web {
    pub live: Arc<Live>,
    pub catalog: Option<Arc<CatalogIndex>>,
}

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/live.js");

/// Routes that need no session: the login form and the static assets it uses.
pub fn public_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/assets/live.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
}

/// The pages and the event stream, behind a session (or the bearer token).
pub fn page_routes(app: Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/catalog") }))
        .route("/catalog", get(catalog_page))
        .route("/builds", get(builds_page))
        .route("/builds/{id}", get(build_page))
        .route("/fleet", get(fleet_page))
        .route("/events", get(events))
        .route_layer(axum::middleware::from_fn_with_state(app, require_session))
}

/// Headers every web response carries: nothing from elsewhere runs, nothing frames us.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// Without a session: pages go to the login form (coming back here after), the event
/// stream is refused.
async fn require_session(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if session::authorized(request.headers(), &app.options.token) {
        return next.run(request).await;
    }
    app.counters.unauthorized.inc();
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    if request.uri().path() == "/events" || request.headers().contains_key(FRAGMENT) {
        return (StatusCode::UNAUTHORIZED, "log in at /login").into_response();
    }
    let query = serde_urlencoded::to_string([("next", path)]).unwrap_or_default();
    Redirect::to(&format!("/login?{query}")).into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_form(Query(q): Query<LoginQuery>) -> Response {
    let next = session::safe_next(q.next.as_deref());
    html(
        StatusCode::OK,
        pages::page("Log in", None, None, false, pages::login(&next, false)),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(app): State<Arc<App>>, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    let next = session::safe_next(form.next.as_deref());
    if !crate::auth::same(form.token.trim().as_bytes(), app.options.token.trim().as_bytes()) {
        app.counters.unauthorized.inc();
        return html(
            StatusCode::UNAUTHORIZED,
            pages::page("Log in", None, None, false, pages::login(&next, true)),
        );
    }
    let secure = !session::loopback_host(&headers);
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(Some(&app.options.token), secure),
    );
    response
}

async fn logout(headers: HeaderMap) -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(None, !session::loopback_host(&headers)),
    );
    response
}

fn fragment(headers: &HeaderMap) -> bool {
    headers.contains_key(FRAGMENT)
}

#[derive(Deserialize, Default)]
pub struct CatalogQuery {
    layer: Option<String>,
    #[serde(default)]
    q: String,
}

/// A catalog view: the layers shown (a lineage, or all of a small catalog), laid out.
struct CatalogView<'a> {
    focus: Option<&'a str>,
    matches: Vec<&'a str>,
    layout: Option<dag::Layout>,
    views: BTreeMap<String, live::LayerView>,
    capped: Option<usize>,
}

fn catalog_view<'a>(index: &'a CatalogIndex, live: &Live, q: &'a CatalogQuery) -> Result<CatalogView<'a>, String> {
    let catalog = &index.catalog;
    let total = index.depths.len();
    let needle = q.q.trim();
    let matches: Vec<&str> = if needle.is_empty() {
        Vec::new()
    } else {
        catalog
            .layers()
            .map(|l| l.name.as_str())
            .filter(|n| n.contains(needle))
            .take(50)
            .collect()
    };
    let (focus, shown) = match q.layer.as_deref().filter(|l| !l.is_empty()) {
        Some(layer) => {
            let lineage = catalog.lineage(layer).map_err(|e| e.to_string())?;
            let focus = catalog.get(layer).map_err(|e| e.to_string())?.name.as_str();
            (
                Some(focus),
                Some(lineage.into_iter().map(|n| n.to_string()).collect::<BTreeSet<_>>()),
            )
        }
        None => (None, None),
    };
    let mut capped = None;
    let shown = match shown {
        Some(mut s) if s.len() > MAX_DRAWN => {
            let mut by_depth: Vec<(usize, String)> = s.iter().map(|n| (index.depths[n], n.clone())).collect();
            by_depth.sort();
            s = by_depth.into_iter().take(MAX_DRAWN).map(|(_, n)| n).collect();
            capped = Some(MAX_DRAWN);
            Some(s)
        }
        other => other,
    };
    let layout = match &shown {
        Some(s) => Some(dag::Layout::new(catalog, &index.depths, Some(s))),
        None if total <= DRAW_WHOLE_UP_TO => Some(dag::Layout::new(catalog, &index.depths, None)),
        None => None,
    };
    let views = match &layout {
        Some(l) => live.layers(l.nodes.iter().map(|n| n.name.as_str())),
        None => BTreeMap::new(),
    };
    Ok(CatalogView {
        focus,
        matches,
        layout,
        views,
        capped,
    })
}

async fn catalog_page(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<CatalogQuery>) -> Response {
    let frag = fragment(&headers);
    let Some(index) = app.web.catalog.clone() else {
        let body = pages::problem(
            "This control plane was started without a catalog (lian control --catalog DIR; lian up passes its own).",
        );
        return html(
            StatusCode::OK,
            pages::page("Catalog", Some(Tab::Catalog), None, frag, body),
        );
    };
    match catalog_view(&index, &app.web.live, &q) {
        Ok(v) => {
            let body = pages::catalog(&pages::CatalogPage {
                layers: index.depths.len(),
                focus: v.focus,
                query: &q.q,
                matches: v.matches,
                layout: v.layout,
                views: v.views,
                capped: v.capped,
                gates: app.web.live.gates(),
            });
            html(
                StatusCode::OK,
                pages::page("Catalog", Some(Tab::Catalog), Some("catalog"), frag, body),
            )
        }
        Err(message) => html(
            StatusCode::NOT_FOUND,
            pages::page("Catalog", Some(Tab::Catalog), None, frag, pages::problem(&message)),
        ),
    }
}

/// One node of `GET /api/v1/catalog`.
#[derive(Serialize)]
struct NodeJson<'a> {
    name: &'a str,
    column: usize,
    row: usize,
    parents: Vec<&'a str>,
    #[serde(flatten)]
    view: &'a live::LayerView,
}

/// `GET /api/v1/catalog[?layer=NAME]`: the same view as the catalog page, as JSON.
pub async fn catalog_json(State(app): State<Arc<App>>, Query(q): Query<CatalogQuery>) -> Response {
    let Some(index) = app.web.catalog.clone() else {
        return crate::api::refuse(
            StatusCode::NOT_FOUND,
            "no_catalog",
            "this control plane was started without a catalog",
        );
    };
    let v = match catalog_view(&index, &app.web.live, &q) {
        Ok(v) => v,
        Err(message) => return crate::api::refuse(StatusCode::NOT_FOUND, "not_found", message),
    };
    let Some(layout) = &v.layout else {
        return crate::api::refuse(
            StatusCode::BAD_REQUEST,
            "too_large",
            format!("the catalog has {} layers: name one with ?layer=", index.depths.len()),
        );
    };
    let nodes: Vec<NodeJson> = layout
        .nodes
        .iter()
        .map(|n| NodeJson {
            name: &n.name,
            column: n.depth,
            row: n.row,
            parents: layout
                .edges
                .iter()
                .filter(|(_, c)| layout.nodes[*c].name == n.name)
                .map(|(p, _)| layout.nodes[*p].name.as_str())
                .collect(),
            view: &v.views[&n.name],
        })
        .collect();
    Json(serde_json::json!({"layers": index.depths.len(), "focus": v.focus, "nodes": nodes})).into_response()
}

#[derive(Deserialize)]
struct BuildsQuery {
    workspace: Option<String>,
    state: Option<String>,
    page: Option<usize>,
}

async fn builds_page(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<BuildsQuery>) -> Response {
    let workspace = q.workspace.as_deref().filter(|w| !w.is_empty());
    let state = q
        .state
        .as_deref()
        .and_then(|s| live::BuildState::ALL.into_iter().find(|b| b.as_str() == s));
    let page = q.page.unwrap_or(1).max(1);
    let (rows, total) = app.web.live.builds(workspace, state, (page - 1) * PER_PAGE, PER_PAGE);
    let body = pages::builds(&pages::BuildsPage {
        rows,
        total,
        page,
        per_page: PER_PAGE,
        workspace,
        state,
        workspaces: app.web.live.workspaces(),
        now: OffsetDateTime::now_utc(),
    });
    html(
        StatusCode::OK,
        pages::page("Builds", Some(Tab::Builds), Some("builds"), fragment(&headers), body),
    )
}

async fn build_page(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let frag = fragment(&headers);
    let build_id = match BuildId::new(id.as_str()) {
        Ok(b) => b,
        Err(e) => {
            return html(
                StatusCode::NOT_FOUND,
                pages::page("Build", Some(Tab::Builds), None, frag, pages::problem(&e.to_string())),
            );
        }
    };
    let history = match app.bus.build_history(&build_id).await {
        Ok(h) => h,
        Err(e) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::page("Build", Some(Tab::Builds), None, frag, pages::problem(&e.to_string())),
            );
        }
    };
    let body = pages::build(&pages::BuildPage {
        id: build_id.as_str(),
        row: app.web.live.build(build_id.as_str()),
        history,
        progress: app.web.live.progress(build_id.as_str()),
    });
    html(
        StatusCode::OK,
        pages::page(
            &format!("Build {build_id}"),
            Some(Tab::Builds),
            Some("build"),
            frag,
            body,
        ),
    )
}

async fn fleet_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let (queue, leases, dead) = tokio::join!(app.bus.queue_depth(), app.bus.leases(), app.bus.dead_letters());
    let warm = match &app.options.providers.docker_local {
        Some(local) if local.pool_size() > 0 => local
            .warm_engines()
            .into_iter()
            .map(|(t, n)| (t.as_str().to_string(), n))
            .collect(),
        _ => Vec::new(),
    };
    let (counts, events) = app.web.live.counts();
    let body = pages::fleet(&pages::FleetPage {
        now: OffsetDateTime::now_utc(),
        workers: app.web.live.workers(),
        queue: queue.map_err(|e| e.to_string()),
        leases: leases.map_err(|e| e.to_string()),
        warm,
        dead_letters: dead.map_err(|e| e.to_string()),
        counts,
        events,
    });
    html(
        StatusCode::OK,
        pages::page("Fleet", Some(Tab::Fleet), Some("fleet"), fragment(&headers), body),
    )
}

/// Server-sent events: one `change` per stored build or cascade event (`{build, layer,
/// state}`), a `resync` when this browser fell behind.
async fn events(State(app): State<Arc<App>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = app.web.live.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        use tokio::sync::broadcast::error::RecvError;
        let event = match rx.recv().await {
            Ok(change) => Event::default()
                .event("change")
                .data(serde_json::to_string(&change).unwrap_or_default()),
            Err(RecvError::Lagged(_)) => Event::default().event("resync").data("{}"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use lian_catalog::{Base, Layer, LayerClass};
    use lian_core::LayerName;

    use super::*;

    /// `n` layers in one chain: `l0000 <- l0001 <- ...`.
    fn chain(n: usize) -> CatalogIndex {
        let name = |i: usize| LayerName::new(format!("l{i:04}")).unwrap();
        let layers = (0..n)
            .map(|i| Layer {
                name: name(i),
                class: LayerClass::Toolchain,
                description: String::new(),
                build_base: match i {
                    0 => Base::Image {
                        image: "scratch".into(),
                    },
                    _ => Base::Layer { layer: name(i - 1) },
                },
                runtime_base: Base::Image {
                    image: "scratch".into(),
                },
                donors: vec![],
                tools_provided: vec![],
                artifact_paths: vec![],
                native_deps: vec![],
                suggest_when: Default::default(),
            })
            .collect();
        CatalogIndex::new(Catalog::new(layers).unwrap())
    }

    fn query(layer: Option<&str>, q: &str) -> CatalogQuery {
        CatalogQuery {
            layer: layer.map(String::from),
            q: q.into(),
        }
    }

    #[test]
    fn a_small_catalog_is_drawn_whole_a_large_one_asks_for_a_layer() {
        let live = Live::default();
        let small = chain(5);
        let q = query(None, "");
        let v = catalog_view(&small, &live, &q).unwrap();
        assert_eq!(v.layout.unwrap().nodes.len(), 5);
        let large = chain(DRAW_WHOLE_UP_TO + 1);
        let v = catalog_view(&large, &live, &q).unwrap();
        assert!(v.layout.is_none());
        let q = query(None, "l000");
        let v = catalog_view(&large, &live, &q).unwrap();
        assert_eq!(
            v.matches,
            [
                "l0000", "l0001", "l0002", "l0003", "l0004", "l0005", "l0006", "l0007", "l0008", "l0009"
            ]
        );
        let q = query(Some("nope"), "");
        assert!(catalog_view(&large, &live, &q).is_err());
    }

    #[test]
    fn a_lineage_past_the_drawing_cap_is_drawn_shallowest_first() {
        let live = Live::default();
        let index = chain(MAX_DRAWN + 20);
        let q = query(Some("l0010"), "");
        let v = catalog_view(&index, &live, &q).unwrap();
        let layout = v.layout.unwrap();
        assert_eq!((layout.nodes.len(), v.capped), (MAX_DRAWN, Some(MAX_DRAWN)));
        assert_eq!(layout.nodes[0].name, "l0000");
        assert_eq!(v.focus, Some("l0010"));
    }

    #[test]
    fn what_a_build_says_reaches_the_page_escaped() {
        let at = "2026-01-01T00:00:00Z";
        let history: Vec<lian_core::Envelope> = serde_json::from_value(serde_json::json!([
            {"build_id": "b1", "workspace": "ws", "seq": 1, "at": at, "worker": "<b>w</b>",
             "type": "failed", "reason": "<script>alert(1)</script> & \"quotes\"", "step": "build"}
        ]))
        .unwrap();
        let html = pages::build(&pages::BuildPage {
            id: "b1",
            row: None,
            history,
            progress: vec!["#1 RUN echo '<img src=x onerror=alert(1)>' done".into()],
        })
        .into_string();
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;"),
            "{html}"
        );
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"), "{html}");
        assert!(html.contains("&lt;b&gt;w&lt;/b&gt;"), "{html}");
        assert!(
            !html.contains("<script>") && !html.contains("<img") && !html.contains("<b>"),
            "{html}"
        );
    }
    #[test]
    fn the_catalog_page_says_which_cascade_waits_and_how_to_let_it_go() {
        let live = Live::default();
        let at = "2026-01-01T00:00:00Z";
        let held = serde_json::json!({"cascade_id": "c-7", "workspace": "ws", "seq": 2, "at": at,
            "type": "awaiting_approval", "layers": 3, "over": "2 layers"});
        live.apply_stored(
            "lian.ws.cascade.c-7.awaiting_approval",
            &serde_json::to_vec(&held).unwrap(),
        );
        let index = chain(3);
        let q = query(None, "");
        let v = catalog_view(&index, &live, &q).unwrap();
        let html = pages::catalog(&pages::CatalogPage {
            layers: 3,
            focus: v.focus,
            query: "",
            matches: v.matches,
            layout: v.layout,
            views: v.views,
            capped: v.capped,
            gates: live.gates(),
        })
        .into_string();
        assert!(html.contains("Waiting for approval"), "{html}");
        assert!(html.contains("lian cascade approve c-7"), "{html}");
        assert!(html.contains("3 layers"), "{html}");
    }
}
