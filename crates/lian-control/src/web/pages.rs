//! The pages, as maud templates: every value is HTML-escaped by maud (nothing here writes
//! raw markup from data), and what a page shows comes from the bus: events, leases, the
//! queue, dead letters. The only file content is the catalog's layer names, which the
//! operator gave.

use std::collections::BTreeMap;

use lian_bus::QueueDepth;
use lian_core::control::Lease;
use lian_core::{BuildEvent, Envelope};
use maud::{DOCTYPE, Markup, html};
use time::OffsetDateTime;

use super::dag::{self, human_ms, short_digest};
use super::live::{BuildRow, BuildState, Gate, LayerState, LayerView};
use super::timeline;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Catalog,
    Builds,
    Fleet,
}

/// The whole page, or (`fragment`) only what goes inside `<main>`, for the live refresh.
pub fn page(title: &str, tab: Option<Tab>, live: Option<&str>, fragment: bool, body: Markup) -> Markup {
    if fragment {
        return body;
    }
    let nav = [
        (Tab::Catalog, "/catalog", "Catalog"),
        (Tab::Builds, "/builds", "Builds"),
        (Tab::Fleet, "/fleet", "Fleet"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · lian" }
                link rel="stylesheet" href="/assets/app.css";
                @if live.is_some() { script src="/assets/live.js" defer {} }
            }
            body {
                header {
                    span.brand { "lian" }
                    @if let Some(tab) = tab {
                        nav {
                            @for (t, href, label) in nav {
                                a.active[t == tab] href=(href) { (label) }
                            }
                        }
                        span #live-status .live-status { @if live.is_some() { "connecting…" } }
                        form.logout method="post" action="/logout" { button type="submit" { "Log out" } }
                    }
                }
                main data-live=[live] { (body) }
            }
        }
    }
}

pub fn login(next: &str, refused: bool) -> Markup {
    html! {
        section.login {
            h1 { "lian: log in" }
            p { "Paste the control plane's token (" code { "<state-dir>/control.token" } " for " code { "lian up" } ", or " code { "control_token" } ")." }
            @if refused { p.error role="alert" { "That is not this control plane's token." } }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                button type="submit" { "Log in" }
            }
        }
    }
}

fn state_badge(state: &str) -> Markup {
    html! { span class={"badge s-" (state)} data-state=(state) { (state.replace('_', " ")) } }
}

fn ago(now: OffsetDateTime, at: OffsetDateTime) -> String {
    match (now - at).whole_seconds().max(0) {
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

pub struct CatalogPage<'a> {
    pub layers: usize,
    pub focus: Option<&'a str>,
    pub query: &'a str,
    /// Names matching the search, when the catalog is too large to draw whole.
    pub matches: Vec<&'a str>,
    pub layout: Option<dag::Layout>,
    pub views: BTreeMap<String, LayerView>,
    pub capped: Option<usize>,
    /// Cascades held by the gate.
    pub gates: Vec<Gate>,
}

pub fn catalog(p: &CatalogPage) -> Markup {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in p.views.values() {
        *counts.entry(v.state.as_str()).or_default() += 1;
    }
    html! {
        h1 {
            "Catalog"
            @if let Some(f) = p.focus { ": " (f) ", its ancestors and descendants" }
        }
        p.summary {
            (p.layers) " layers"
            @if p.layout.is_some() { ", " (p.views.len()) " shown" }
            @for (state, n) in &counts { " · " (state_badge(state)) " " (n) }
            @if p.focus.is_some() { " · " a href="/catalog" { "whole catalog" } }
        }
        @if !p.gates.is_empty() {
            section.gates role="status" {
                h2 { "Waiting for approval" }
                ul {
                    @for g in &p.gates {
                        li data-cascade=(g.cascade) {
                            "cascade " span.mono { (g.cascade) } " in " (g.workspace) ": "
                            (g.layers) " layers"
                            @if let Some(m) = g.minutes { ", about " (format!("{m:.0}")) " min" }
                            ", over " (g.over) ". Run "
                            code { "lian cascade approve " (g.cascade) }
                            " to build it."
                        }
                    }
                }
            }
        }
        form.search method="get" action="/catalog" {
            label for="q" { "Layer" }
            input #q type="search" name="q" value=(p.query) placeholder="name or part of it";
            button type="submit" { "Find" }
        }
        @if !p.matches.is_empty() || !p.query.is_empty() {
            ul.matches {
                @for m in &p.matches { li { a href={"/catalog?layer=" (m)} { (m) } } }
                @if p.matches.is_empty() { li { "No layer matches." } }
            }
        }
        @if let Some(n) = p.capped { p.note { "Drawing the first " (n) " layers by depth of this lineage." } }
        @match &p.layout {
            Some(layout) => {
                div.dag-scroll { (dag::svg(layout, &p.views, p.focus)) }
                (legend())
                (layer_table(layout, &p.views))
            }
            None => p.note { "This catalog is too large to draw whole: find a layer to see its ancestors and descendants." },
        }
    }
}

fn legend() -> Markup {
    let states = [
        LayerState::Idle,
        LayerState::Queued,
        LayerState::Running,
        LayerState::Done,
        LayerState::Failed,
        LayerState::CutOff,
        LayerState::Blocked,
    ];
    html! { p.legend { @for s in states { (state_badge(s.as_str())) " " } } }
}

fn layer_table(layout: &dag::Layout, views: &BTreeMap<String, LayerView>) -> Markup {
    html! {
        table.layers {
            thead { tr { th { "layer" } th { "state" } th { "latest build" } th { "digest" } th { "pinned" } th { "last duration" } th { "cache" } } }
            tbody {
                @for n in &layout.nodes {
                    @let v = &views[&n.name];
                    tr data-layer=(n.name) {
                        td { a href={"/catalog?layer=" (n.name)} { (n.name) } }
                        td { (state_badge(v.state.as_str())) @if let Some(s) = &v.step { " " (s) } }
                        td { @if let Some(b) = &v.build { a href={"/builds/" (b)} { (b) } } @else { "-" } }
                        @match &v.built {
                            Some(b) => {
                                td.mono { (short_digest(&b.image_id)) }
                                td.mono title=[b.pinned.as_deref()] {
                                    @match b.pinned.as_deref().and_then(|p| p.split_once("@")) {
                                        Some((repository, digest)) => { (repository) "@" (short_digest(digest)) }
                                        None => "-",
                                    }
                                }
                                td { (human_ms(b.duration_ms)) }
                                td { @if let Some((hit, of)) = b.cache { (hit) "/" (of) " steps cached" } @else { "-" } }
                            }
                            None => { td { "-" } td { "-" } td { "-" } td { "-" } }
                        }
                    }
                }
            }
        }
    }
}

pub struct BuildsPage<'a> {
    pub rows: Vec<BuildRow>,
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub workspace: Option<&'a str>,
    pub state: Option<BuildState>,
    pub workspaces: Vec<String>,
    pub now: OffsetDateTime,
}

fn builds_href(workspace: Option<&str>, state: Option<BuildState>, page: usize) -> String {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(w) = workspace {
        q.push(("workspace", w.to_string()));
    }
    if let Some(s) = state {
        q.push(("state", s.as_str().to_string()));
    }
    if page > 1 {
        q.push(("page", page.to_string()));
    }
    let query = serde_urlencoded::to_string(&q).unwrap_or_default();
    if query.is_empty() {
        "/builds".into()
    } else {
        format!("/builds?{query}")
    }
}

pub fn builds(p: &BuildsPage) -> Markup {
    let pages = p.total.div_ceil(p.per_page).max(1);
    html! {
        h1 { "Builds" }
        form.filters method="get" action="/builds" {
            label for="workspace" { "Workspace" }
            select #workspace name="workspace" {
                option value="" { "any" }
                @for w in &p.workspaces { option value=(w) selected[p.workspace == Some(w.as_str())] { (w) } }
            }
            label for="state" { "State" }
            select #state name="state" {
                option value="" { "any" }
                @for s in BuildState::ALL { option value=(s.as_str()) selected[p.state == Some(s)] { (s.as_str()) } }
            }
            button type="submit" { "Filter" }
        }
        p.summary data-total=(p.total) { (p.total) " builds · page " (p.page) " of " (pages) }
        table.builds {
            thead { tr { th { "build" } th { "workspace" } th { "layer" } th { "state" } th { "step" } th { "tier" } th { "duration" } th { "started" } } }
            tbody {
                @for r in &p.rows {
                    tr data-build=(r.id) data-state=(r.state.as_str()) {
                        td { a href={"/builds/" (r.id)} { (r.id) } }
                        td { (r.workspace) }
                        td { @if let Some(l) = &r.layer { a href={"/catalog?layer=" (l)} { (l) } } @else { "-" } }
                        td {
                            (state_badge(r.state.as_str()))
                            @if let Some(by) = &r.superseded_by { " " a.badge.s-superseded href={"/builds/" (by)} title="a newer build of its layer" { "superseded" } }
                        }
                        td { (r.step) }
                        td { (r.runner_type.as_deref().unwrap_or("-")) }
                        td { (human_ms(r.duration(p.now).as_millis() as u64)) }
                        td { (ago(p.now, r.first_at)) }
                    }
                }
            }
        }
        nav.pages {
            @if p.page > 1 { a href=(builds_href(p.workspace, p.state, p.page - 1)) rel="prev" { "← newer" } }
            @if p.page < pages { a href=(builds_href(p.workspace, p.state, p.page + 1)) rel="next" { "older →" } }
        }
    }
}

pub struct BuildPage<'a> {
    pub id: &'a str,
    pub row: Option<BuildRow>,
    pub history: Vec<Envelope>,
    pub progress: Vec<String>,
}

fn cache_figures(history: &[Envelope]) -> Option<Markup> {
    let cache = history.iter().rev().find_map(|e| match &e.event {
        BuildEvent::Completed { cache: Some(c), .. } | BuildEvent::ImageBuilt { cache: Some(c), .. } => Some(c),
        _ => None,
    })?;
    Some(html! {
        dl.cache {
            dt { "steps cached" } dd { (cache.cached_steps) " of " (cache.steps) }
            @if let Some(c) = &cache.cooker { dt { "cooker" } dd { (if c.hit { "hit" } else { "miss" }) " " code { (c.reference) } } }
            @if cache.sccache_hits.is_some() || cache.sccache_misses.is_some() {
                dt { "sccache" } dd { (cache.sccache_hits.unwrap_or(0)) " hits, " (cache.sccache_misses.unwrap_or(0)) " misses" }
            }
            @if let Some(s) = &cache.engine_store { dt { "engine store" } dd { (serde_json::to_string(s).unwrap_or_default()) } }
            @if !cache.imported_from.is_empty() { dt { "read from" } dd { (cache.imported_from.join(", ")) } }
            @if let Some(w) = &cache.exported_to { dt { "written to" } dd { (w) } }
            @if !cache.parents_pulled.is_empty() { dt { "parents pulled" } dd { (cache.parents_pulled.join(", ")) } }
            @if !cache.pushed.is_empty() { dt { "pushed" } dd { (cache.pushed.join(", ")) } }
        }
    })
}

pub fn build(p: &BuildPage) -> Markup {
    let steps = timeline::steps(&p.history);
    let total = steps
        .iter()
        .map(|s| s.start_ms + s.duration_ms)
        .max()
        .unwrap_or(0)
        .max(1);
    let tiers = timeline::tiers(&p.history);
    let state = p.row.as_ref().map_or("unknown", |r| r.state.as_str());
    let failure = p.history.iter().rev().find_map(|e| match &e.event {
        BuildEvent::Failed { reason, step, .. } => Some((reason.clone(), step.map(|s| s.as_str()))),
        _ => None,
    });
    let sizing = p.history.iter().find_map(|e| match &e.event {
        BuildEvent::Sized(s) => Some(s.clone()),
        _ => None,
    });
    let runner = p.history.iter().rev().find_map(|e| match &e.event {
        BuildEvent::RunnerLeased { lease_key, host, .. } => Some((lease_key.to_string(), host.clone())),
        _ => None,
    });
    let first = p.history.first().map(|e| e.at);
    html! {
        h1 { "Build " span.mono { (p.id) } " " (state_badge(state)) }
        @if p.history.is_empty() {
            p.note { "No history yet: the build was not submitted, or no worker has taken it." }
        }
        @if let Some(r) = &p.row {
            p.summary {
                "workspace " (r.workspace)
                @if let Some(l) = &r.layer { " · layer " a href={"/catalog?layer=" (l)} { (l) } }
                @if let Some(c) = &r.cascade { " · cascade " span.mono { (c) } }
                @if !r.worker.is_empty() { " · last worker " (r.worker) }
                @if let Some(by) = &r.superseded_by { " · superseded by " a href={"/builds/" (by)} { (by) } }
            }
        }
        @if let Some((reason, step)) = &failure {
            section.failure role="alert" {
                h2 { "Failed" @if let Some(s) = step { " at " (s) } }
                p.reason { (reason) }
            }
        }
        @if !steps.is_empty() {
            h2 { "Steps" }
            ol.timeline {
                @for s in &steps {
                    li.step.failed[s.failures > 0] data-step=(s.number) data-duration-ms=(s.duration_ms) {
                        span.step-name { (s.number) ". " (s.name) }
                        svg.bar-track xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1000 12" preserveAspectRatio="none" {
                            rect.bar x=(s.start_ms * 1000 / total) width=((s.duration_ms * 1000 / total).max(3)) height="12" rx="2" {}
                        }
                        span.step-duration { (human_ms(s.duration_ms)) }
                        span.step-events { (s.events.join(" → ")) @if s.failures > 0 { " · failed ×" (s.failures) } }
                    }
                }
            }
        }
        section.facts {
            @if let Some(s) = &sizing {
                h2 { "Sizing" }
                p { (s.runner_type.as_str()) " (" (s.tier.as_str()) ", budget " (s.time_budget_min) " min): " (s.reason) }
            }
            @if tiers.len() > 1 { p.escalation { "OOM escalation: " (tiers.join(" → ")) } }
            @if let Some((key, host)) = &runner { p { "Runner " span.mono { (key) } " on " (host) } }
            @if let Some(cache) = cache_figures(&p.history) { h2 { "Cache" } (cache) }
        }
        @if !p.progress.is_empty() {
            h2 { "BuildKit progress (last " (p.progress.len()) " lines)" }
            pre.progress { @for l in &p.progress { (l) "\n" } }
        }
        @if !p.history.is_empty() {
            h2 { "History (as stored)" }
            table.history {
                thead { tr { th { "#" } th { "at" } th { "+" } th { "event" } th { "worker" } } }
                tbody {
                    @for e in &p.history {
                        tr data-kind=(e.event.kind()) {
                            td { (e.seq) }
                            td.mono { (e.at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()) }
                            td { @if let Some(f) = first { (human_ms((e.at - f).whole_milliseconds().max(0) as u64)) } }
                            td { (e.event.summary()) }
                            td { (e.worker) }
                        }
                    }
                }
            }
        }
    }
}

pub struct FleetPage {
    pub now: OffsetDateTime,
    pub workers: Vec<(String, OffsetDateTime)>,
    pub queue: Result<QueueDepth, String>,
    pub leases: Result<Vec<Lease>, String>,
    pub warm: Vec<(String, usize)>,
    pub dead_letters: Result<Vec<serde_json::Value>, String>,
    pub counts: BTreeMap<BuildState, usize>,
    pub events: u64,
}

pub fn fleet(p: &FleetPage) -> Markup {
    let mut by_provider: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    if let Ok(leases) = &p.leases {
        for l in leases {
            *by_provider
                .entry((l.provider.as_str(), l.runner_type.as_str()))
                .or_default() += 1;
        }
    }
    let unavailable = |e: &str| html! { p.error { "unavailable: " (e) } };
    html! {
        h1 { "Fleet" }
        p.summary {
            (p.events) " events read"
            @for (s, n) in &p.counts { " · " (state_badge(s.as_str())) " " (n) }
        }
        h2 { "Queue" }
        @match &p.queue {
            Ok(q) => dl.queue {
                dt { "waiting" } dd #queue-waiting { (q.waiting) }
                dt { "being built" } dd { (q.in_flight) }
                dt { "idle workers pulling" } dd { (q.idle_pulls) }
                dt { "redelivered" } dd { (q.redelivered) }
            },
            Err(e) => (unavailable(e)),
        }
        h2 { "Workers" }
        p.note { "Workers are known by the events they append; one that has appended nothing yet is not listed." }
        table.workers {
            thead { tr { th { "worker" } th { "last event" } } }
            tbody { @for (w, at) in &p.workers { tr { td { (w) } td { (ago(p.now, *at)) } } } }
        }
        h2 { "Runners leased" }
        @match &p.leases {
            Ok(leases) => {
                table.runners {
                    thead { tr { th { "provider" } th { "tier" } th { "leased" } } }
                    tbody { @for ((prov, tier), n) in &by_provider { tr { td { (prov) } td { (tier) } td { (n) } } } }
                }
                @if !leases.is_empty() {
                    table.leases {
                        thead { tr { th { "lease" } th { "build" } th { "owner" } th { "host" } th { "state" } } }
                        tbody {
                            @for l in leases {
                                tr {
                                    td.mono { (l.lease_id) }
                                    td { a href={"/builds/" (l.build_id)} { (l.build_id) } }
                                    td { (l.owner) } td { (l.host) } td { (format!("{:?}", l.state).to_lowercase()) }
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => (unavailable(e)),
        }
        h2 { "Warm pool" }
        @if p.warm.is_empty() { p.note { "No warm pool on this control plane." } }
        @else { table.warm { thead { tr { th { "tier" } th { "engines ready" } } } tbody { @for (t, n) in &p.warm { tr { td { (t) } td { (n) } } } } } }
        h2 { "Dead letters" }
        @match &p.dead_letters {
            Ok(d) if d.is_empty() => p.note { "None." },
            Ok(d) => table.dead {
                thead { tr { th { "build" } th { "workspace" } th { "deliveries" } th { "reason" } th { "at" } } }
                tbody {
                    @for r in d {
                        @let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
                        tr { td { a href={"/builds/" (s("build_id"))} { (s("build_id")) } } td { (s("workspace")) } td { (r["deliveries"]) } td { (s("reason")) } td { (s("at")) } }
                    }
                }
            },
            Err(e) => (unavailable(e)),
        }
    }
}

/// An error page's body.
pub fn problem(message: &str) -> Markup {
    html! { p.error role="alert" { (message) } }
}
