//! `lian cache gc`: evicts session caches. Manifests in `dev/` namespaces whose image was
//! made before the cutoff are deleted from the registry (their tags go with them; `ci/` is
//! never touched); the registry's own garbage collection then frees their blobs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lian_runner::registry::RegistryAccess;
use time::OffsetDateTime;

use crate::cli::{CacheGcArgs, Global};
use crate::config::Settings;
use crate::exit::Exit;

pub async fn gc(global: &Global, args: CacheGcArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.registry {
        Some(url) => url.clone(),
        None => match Settings::load(global.config.as_deref())?.registry.map(|r| r.url) {
            Some(url) => url,
            None => {
                let recorded: PathBuf = args.state_dir.join("registry").join("url");
                std::fs::read_to_string(&recorded)
                    .with_context(|| {
                        format!(
                            "no registry to collect: pass --registry URL, set [registry] url, or run it where `lian up` \
                             keeps its state ({} not found)",
                            recorded.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        },
    };
    let registry = RegistryAccess {
        host: url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string(),
        plain_http: url.starts_with("http://"),
        username: None,
        password: None,
    };
    let age: Duration = args.older_than.into();
    let cutoff = OffsetDateTime::now_utc() - age;
    let json = global.json(false);
    let mut removed = Vec::new();
    for repository in registry.repositories().await? {
        if !repository.starts_with("dev/") {
            continue;
        }
        for tag in registry.tags(&repository).await? {
            let Some((digest, created)) = registry.created(&repository, &tag).await? else {
                continue;
            };
            if created >= cutoff {
                continue;
            }
            let days = (OffsetDateTime::now_utc() - created).whole_hours() as f64 / 24.0;
            if !args.dry_run {
                registry.delete(&repository, &digest).await?;
            }
            if !json {
                let verb = if args.dry_run { "would remove" } else { "removed" };
                println!("{verb} {repository}:{tag} ({days:.1} days old)");
            }
            removed.push(serde_json::json!({"repository": repository, "tag": tag, "days_old": days}));
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"dry_run": args.dry_run, "older_than_secs": age.as_secs(), "removed": removed})
        );
        return Ok(Exit::Ok.code());
    }
    let removed = removed.len();
    let verb = if args.dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {removed} tag(s) older than {} in dev/ namespaces; the registry frees their blobs in its own \
         garbage collection (`docker-registry garbage-collect --delete-untagged CONFIG`, registry stopped)",
        humantime::format_duration(age)
    );
    Ok(Exit::Ok.code())
}
