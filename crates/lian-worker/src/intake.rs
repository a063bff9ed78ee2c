//! Turning a delivered message into a build request, or into the reason it is refused.
//! Nothing here trusts the payload: a malformed request ends as one `failed` event.

use lian_bus::Job;
use lian_core::{BuildDirectives, BuildId, BuildRequest, Workspace, cache, subjects};
use lian_nickel::{Contract, MAX_JSON_DEPTH};

use crate::WorkerOptions;

/// Largest request accepted. Requests carry a context reference, not the context, so a
/// real one is a few KiB; anything near this is a mistake worth a clear refusal.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The workspace failed events go to when the subject's workspace token is not a valid one.
const INVALID_WORKSPACE: &str = "invalid";

pub enum Intake {
    Accepted {
        build_id: BuildId,
        request: Box<BuildRequest>,
    },
    Refused {
        build_id: BuildId,
        workspace: Workspace,
        reason: String,
    },
}

pub async fn read(job: &Job, options: &WorkerOptions) -> Intake {
    let fallback_id = || BuildId::new(format!("q{}", job.stream_sequence())).expect("a token");
    let subject_ws = subjects::workspace_token(job.subject()).unwrap_or("");
    let workspace = Workspace::new(subject_ws);
    let refuse = |build_id: BuildId, reason: String| Intake::Refused {
        build_id,
        workspace: workspace
            .clone()
            .unwrap_or_else(|_| Workspace::new(INVALID_WORKSPACE).expect("a token")),
        reason,
    };
    if job.payload().len() > MAX_REQUEST_BYTES {
        return refuse(
            fallback_id(),
            format!(
                "request is {} bytes, over the {MAX_REQUEST_BYTES}-byte limit: put large inputs in the build context",
                job.payload().len()
            ),
        );
    }
    // Before serde_json or Nickel recurse into it: a clear refusal, not a stack overflow.
    if let Err(e) = lian_nickel::check_json_depth(job.payload(), "request", MAX_JSON_DEPTH) {
        return refuse(fallback_id(), e.to_string());
    }
    let value: serde_json::Value = match serde_json::from_slice(job.payload()) {
        Ok(v) => v,
        Err(e) => return refuse(fallback_id(), format!("request is not valid JSON: {e}")),
    };
    let build_id = match value.get("build_id") {
        None => fallback_id(),
        Some(raw) => match raw.as_str().map(BuildId::new) {
            Some(Ok(id)) => id,
            Some(Err(e)) => return refuse(fallback_id(), format!("build_id: {e}")),
            None => return refuse(fallback_id(), "build_id must be a string".into()),
        },
    };
    if let Err(e) = &workspace {
        return refuse(build_id, format!("the subject's {e}"));
    }
    let Some(directives) = value.get("directives") else {
        return refuse(
            build_id,
            "request has no `directives`: expected {build_id?, directives, context, layer?}".into(),
        );
    };
    // The Nickel contract is the single source of truth for what directives may say.
    let directives_json = directives.to_string();
    let evaluator = options.evaluator.clone();
    let checked = tokio::task::spawn_blocking(move || {
        evaluator.eval_json::<BuildDirectives>(&directives_json, "directives", Contract::BuildDirectives)
    })
    .await
    .expect("nickel evaluation does not panic");
    if let Err(e) = checked {
        return refuse(build_id, format!("directives break the contract: {}", e.summary()));
    }
    let request: BuildRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return refuse(build_id, format!("request has the wrong shape: {e}")),
    };
    let ws = workspace.clone().expect("checked above");
    if request.directives.workspace != ws {
        return refuse(
            build_id,
            format!(
                "directives.workspace is {} but the request was published on lian.{ws}.build.request: publish on lian.{}.build.request",
                request.directives.workspace, request.directives.workspace
            ),
        );
    }
    if let Err(e) = cache::check(&request.directives) {
        return refuse(build_id, format!("cache policy refused: {e}"));
    }
    // A pin reaches `docker pull`: only a registry reference by digest, to a parent image
    // name of sane length, is taken.
    if let Some((parent, pin)) = request.parents.iter().find(|(parent, pin)| {
        parent.is_empty()
            || parent.len() > 255
            || parent.contains(char::is_whitespace)
            || !lian_core::request::is_pinned_reference(pin)
    }) {
        return refuse(
            build_id,
            format!(
                "parents: the pin of {parent:?} must be a registry reference by digest (path/to/repository@sha256:<64 lowercase hex>), not {pin:?}"
            ),
        );
    }
    if let (Some(layer), Some(known)) = (&request.layer, &options.catalog_layers)
        && !known.contains(layer.as_str())
    {
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        return refuse(
            build_id,
            format!(
                "layer {layer} is not in the catalog (known: {}): fix --layer or add the layer",
                known.join(", ")
            ),
        );
    }
    Intake::Accepted {
        build_id,
        request: Box::new(request),
    }
}
