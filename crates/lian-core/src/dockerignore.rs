//! `.dockerignore` as BuildKit applies it (moby/patternmatcher): patterns are anchored at
//! the context root and cleaned (`./a/` is `a`, a leading `/` is dropped), `*` and `?` stay
//! within one path component, `**` spans any number of them, `[...]` classes and `\`
//! escapes work, a pattern that matches a directory excludes everything below it, `!`
//! re-includes, and the last matching pattern wins.

use globset::{GlobBuilder, GlobMatcher};

#[derive(Debug, thiserror::Error)]
#[error(".dockerignore line {line}: `{pattern}` is not a valid pattern: {why}")]
pub struct PatternError {
    pub line: usize,
    pub pattern: String,
    pub why: String,
}

#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    keep: bool,
    matcher: GlobMatcher,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let mut rules = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keep, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let Some(pattern) = clean(pattern) else {
                continue;
            };
            let glob = GlobBuilder::new(&pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| PatternError {
                    line: index + 1,
                    pattern: line.to_string(),
                    why: e.kind().to_string(),
                })?;
            rules.push(Rule {
                keep,
                matcher: glob.compile_matcher(),
            });
        }
        Ok(Self { rules })
    }

    /// Whether any rule re-includes: then an excluded directory must still be walked.
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|r| r.keep)
    }

    /// Whether `path` (relative, `/`-separated) is left out of the context.
    pub fn excludes(&self, path: &str) -> bool {
        let mut excluded = false;
        for rule in &self.rules {
            let hit =
                rule.matcher.is_match(path) || path.match_indices('/').any(|(i, _)| rule.matcher.is_match(&path[..i]));
            if hit {
                excluded = !rule.keep;
            }
        }
        excluded
    }
}

/// Go's `filepath.Clean` for the relative patterns `.dockerignore` holds; `None` when the
/// pattern names the root itself.
fn clean(pattern: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in pattern.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).unwrap()
    }

    #[test]
    fn rules_as_buildkit_applies_them() {
        let rules = ignore("# comment\ntarget\n*.log\n**/*.tmp\n!keep.log\n/docs/\n./build/out\n");
        for excluded in [
            "target",
            "target/debug/x",
            "a.log",
            "deep/dir/x.tmp",
            "x.tmp",
            "docs/readme.md",
            "build/out/bin",
        ] {
            assert!(rules.excludes(excluded), "{excluded}");
        }
        for kept in [
            "src/main.rs",
            "keep.log",
            "sub/a.log",
            "targets",
            "Dockerfile",
            "build/other",
        ] {
            assert!(!rules.excludes(kept), "{kept}");
        }
    }

    #[test]
    fn later_rules_win_and_exceptions_reach_inside_excluded_directories() {
        let rules = ignore("vendor\n!vendor/keep\nvendor/keep/drop.txt\n");
        assert!(rules.excludes("vendor/a/b.rs"));
        assert!(!rules.excludes("vendor/keep/lib.rs"));
        assert!(rules.excludes("vendor/keep/drop.txt"));
        assert!(rules.has_exceptions());
    }

    #[test]
    fn classes_escapes_and_double_stars() {
        let rules = ignore("file[0-9].txt\nlit\\*eral\na/**/z\n**\n!src/**\n");
        assert!(rules.excludes("README.md"), "`**` alone excludes everything");
        assert!(!rules.excludes("src/deep/main.rs"));
        let rules = ignore("file[0-9].txt\nlit\\*eral\na/**/z\n");
        assert!(rules.excludes("file7.txt"));
        assert!(!rules.excludes("fileX.txt"));
        assert!(rules.excludes("lit*eral"));
        assert!(!rules.excludes("litXeral"));
        assert!(rules.excludes("a/z"));
        assert!(rules.excludes("a/b/c/z"));
        assert!(!rules.excludes("b/a/z"));
    }

    #[test]
    fn a_broken_pattern_is_named() {
        let err = DockerIgnore::parse("ok\n[unclosed\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().contains("[unclosed"), "{err}");
    }
}
