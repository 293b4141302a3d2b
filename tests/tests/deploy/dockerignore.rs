//! `.dockerignore` files, matched as Docker's builders match them (moby's `patternmatcher`,
//! used by BuildKit and the classic builder alike):
//! - one pattern a line; a line starting with `#` is a comment, blank lines are skipped,
//!   surrounding spaces trimmed;
//! - a leading `!` takes matching paths back in (an exception);
//! - patterns are cleaned like Go's `filepath.Clean` (`./`, `//`, `..` and a trailing `/`
//!   resolved) and a leading `/` dropped: every pattern is relative to the context root, so
//!   `*.log` means `*.log` at the root only;
//! - `*` is any run of characters but `/`, `?` one character but `/`, `**` any number of
//!   path segments (none included), `\` escapes the next character, `[…]` a character class;
//! - a pattern excludes a path when it matches the path or one of its parent directories
//!   (`deploy` excludes `deploy/README.md`);
//! - the last pattern that matches decides.

use regex::Regex;

/// A parsed `.dockerignore`.
#[derive(Debug)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

/// One pattern line.
#[derive(Debug)]
pub struct Pattern {
    /// 1-based line number in the file.
    pub line: usize,
    /// The line as written (trimmed).
    pub text: String,
    /// `!pattern`: takes paths back in.
    pub exception: bool,
    regex: Regex,
}

impl DockerIgnore {
    /// Parses the text of a `.dockerignore` file.
    pub fn parse(text: &str) -> DockerIgnore {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let (exception, pattern) = match trimmed.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, trimmed),
            };
            let mut cleaned = clean(pattern);
            if cleaned.len() > 1 {
                if let Some(relative) = cleaned.strip_prefix('/') {
                    cleaned = relative.to_string();
                }
            }
            patterns.push(Pattern {
                line: n + 1,
                text: trimmed.to_string(),
                exception,
                regex: compile(&cleaned),
            });
        }
        DockerIgnore { patterns }
    }

    /// The pattern that decides `path` (relative to the context root, `/`-separated): the last
    /// one matching it or one of its parent directories, if any.
    ///
    /// Mirrors `PatternMatcher.MatchesOrParentMatches`, including its shortcut: a pattern is
    /// only tried when it could change the outcome (an exclusion while the path is in, an
    /// exception while it is out).
    pub fn deciding(&self, path: &str) -> Option<&Pattern> {
        let parents: Vec<&str> = path.match_indices('/').map(|(at, _)| &path[..at]).collect();
        let mut excluded = false;
        let mut decided = None;
        for pattern in &self.patterns {
            if pattern.exception != excluded {
                continue;
            }
            let matches = pattern.regex.is_match(path)
                || parents.iter().any(|parent| pattern.regex.is_match(parent));
            if matches {
                excluded = !pattern.exception;
                decided = Some(pattern);
            }
        }
        decided
    }

    /// Whether `path` stays out of the build context.
    pub fn excludes(&self, path: &str) -> bool {
        self.deciding(path).is_some_and(|p| !p.exception)
    }
}

/// Go's `filepath.Clean` on a `/`-separated path.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// The anchored regular expression of a cleaned pattern (`patternmatcher`'s `compile`).
fn compile(pattern: &str) -> Regex {
    let mut re = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                // `**/` is `**`.
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    // Trailing `**`: everything below.
                    re.push_str(".*");
                } else {
                    // Any number of segments, none included.
                    re.push_str("(.*/)?");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '\\' => match chars.next() {
                Some(escaped) => re.push_str(&regex::escape(&escaped.to_string())),
                None => re.push_str(r"\\"),
            },
            '[' => {
                // A character class, copied up to its `]` (`[^…]` negates, as in Go).
                re.push('[');
                for class_char in chars.by_ref() {
                    if class_char == ']' {
                        break;
                    }
                    if class_char == '\\' || class_char == '[' {
                        re.push('\\');
                    }
                    re.push(class_char);
                }
                re.push(']');
            }
            other => re.push_str(&regex::escape(&other.to_string())),
        }
    }
    re.push('$');
    Regex::new(&re).unwrap_or_else(|e| panic!("pattern {pattern:?} as a regex {re:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignore(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text)
    }

    #[test]
    fn a_name_excludes_itself_and_everything_below_at_the_root_only() {
        let di = ignore("deploy\n");
        assert!(di.excludes("deploy"));
        assert!(di.excludes("deploy/README.md"));
        assert!(di.excludes("deploy/k8s/job.yaml"));
        assert!(!di.excludes("deployment.txt"));
        assert!(
            !di.excludes("docs/deploy/x.md"),
            "patterns are anchored at the root"
        );
    }

    #[test]
    fn star_stays_within_a_segment_and_double_star_spans_segments() {
        let di = ignore("*.log\n**/target\n");
        assert!(di.excludes("run.log"));
        assert!(!di.excludes("tests/run.log"), "`*.log` is the root's only");
        assert!(di.excludes("target/debug/pgzm"));
        assert!(di.excludes("agent/target/x"));
        assert!(di.excludes("a/b/c/target"));
        assert!(!di.excludes("targets/x"));
        let di = ignore("**/*.log\nsrc/**\n");
        assert!(di.excludes("run.log") && di.excludes("a/b/run.log"));
        assert!(di.excludes("src/a/b.rs"));
        assert!(!di.excludes("src"), "`src/**` needs something below src");
        let di = ignore("a/**/z\n");
        assert!(di.excludes("a/z") && di.excludes("a/b/c/z"));
        assert!(!di.excludes("b/z"));
    }

    #[test]
    fn question_mark_classes_and_escapes() {
        let di = ignore("file?.txt\n[ab].rs\nlit\\*eral\n");
        assert!(di.excludes("file1.txt"));
        assert!(!di.excludes("file/.txt"));
        assert!(di.excludes("a.rs") && !di.excludes("c.rs"));
        assert!(di.excludes("lit*eral") && !di.excludes("litXeral"));
    }

    #[test]
    fn exceptions_take_paths_back_and_the_last_match_wins() {
        let di = ignore("deploy\n!deploy/Dockerfile\n");
        assert!(di.excludes("deploy/README.md"));
        assert!(!di.excludes("deploy/Dockerfile"));
        let di = ignore("!keep.txt\n*.txt\n");
        assert!(
            di.excludes("keep.txt"),
            "a later exclusion overrides an earlier exception"
        );
        let decided = ignore("docs\n#docs\n\n  !docs/a.md  \n")
            .deciding("docs/a.md")
            .map(|p| (p.line, p.exception));
        assert_eq!(decided, Some((4, true)));
    }

    #[test]
    fn patterns_are_cleaned_and_rooted() {
        let di = ignore("/dev\n./docs/\nx//y/../z\n");
        assert!(di.excludes("dev/test"));
        assert!(di.excludes("docs/a.md"));
        assert!(di.excludes("x/z"));
        assert!(!di.excludes("x/y"));
        assert_eq!(clean("a/./b/../../.."), "..");
        assert_eq!(clean("/../a/"), "/a");
        assert_eq!(clean(""), ".");
    }
}
