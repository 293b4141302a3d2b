//! Just enough of a Dockerfile parser for the image checks: instructions (continuation lines
//! joined, comments dropped), stages with their `WORKDIR`, the `COPY`/`ADD` instructions that
//! read the build context, and the `RUN`s.

/// A parsed Dockerfile.
#[derive(Debug)]
pub struct Dockerfile {
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

/// One `FROM …` stage.
#[derive(Debug, Default)]
pub struct Stage {
    /// `AS name`, when given.
    pub name: Option<String>,
    /// The `COPY`/`ADD` instructions that read the build context (not `--from=…`).
    pub copies: Vec<Copy>,
    /// The `RUN` instructions: line and command text.
    pub runs: Vec<(usize, String)>,
    /// The working directory after the last `WORKDIR` (`/` before any).
    pub workdir: String,
}

/// A `COPY` (or `ADD`) from the build context.
#[derive(Debug)]
pub struct Copy {
    /// 1-based line of the instruction.
    pub line: usize,
    /// Source paths, relative to the context root, as written.
    pub sources: Vec<String>,
    /// Destination: absolute, or relative to `workdir`.
    pub dest: String,
    /// The stage's working directory at this instruction.
    pub workdir: String,
}

impl Dockerfile {
    /// Parses a Dockerfile. Fails on what these checks do not model (another escape
    /// character, heredocs, context paths with wildcards), rather than misreading it.
    pub fn parse(text: &str) -> Dockerfile {
        let mut stages: Vec<Stage> = Vec::new();
        for (line, instruction) in instructions(text) {
            let (keyword, rest) = instruction
                .split_once(char::is_whitespace)
                .unwrap_or((instruction.as_str(), ""));
            let rest = rest.trim();
            match keyword.to_ascii_uppercase().as_str() {
                "FROM" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    let name = match words.as_slice() {
                        [.., as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                        _ => None,
                    };
                    stages.push(Stage {
                        name,
                        workdir: "/".to_string(),
                        ..Stage::default()
                    });
                }
                "WORKDIR" => {
                    let stage = current(&mut stages, line);
                    stage.workdir = join_abs(&stage.workdir, rest);
                }
                "RUN" => current(&mut stages, line)
                    .runs
                    .push((line, rest.to_string())),
                "COPY" | "ADD" => {
                    assert!(
                        !rest.contains("<<"),
                        "line {line}: heredocs in COPY are not modelled by the deploy checks"
                    );
                    let stage = current(&mut stages, line);
                    if let Some(copy) = parse_copy(line, rest, &stage.workdir) {
                        stage.copies.push(copy);
                    }
                }
                _ => {}
            }
        }
        Dockerfile { stages }
    }

    /// The stage named `name`.
    pub fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("the Dockerfile has no stage named {name:?}"))
    }
}

/// The stage instructions apply to (one must have begun).
fn current(stages: &mut [Stage], line: usize) -> &mut Stage {
    stages
        .last_mut()
        .unwrap_or_else(|| panic!("line {line}: an instruction before the first FROM"))
}

/// `COPY [--flag…] src… dest` (shell or JSON form); `None` for `--from=…` (not the context).
fn parse_copy(line: usize, rest: &str, workdir: &str) -> Option<Copy> {
    let mut words: Vec<String> = Vec::new();
    let mut remainder = rest;
    // Flags come first, in the shell form and before a JSON array alike.
    while let Some(flagged) = remainder.strip_prefix("--") {
        let (flag, after) = flagged
            .split_once(char::is_whitespace)
            .unwrap_or((flagged, ""));
        if flag.starts_with("from=") {
            return None;
        }
        remainder = after.trim_start();
    }
    if remainder.starts_with('[') {
        let array: Vec<String> = serde_json::from_str(remainder)
            .unwrap_or_else(|e| panic!("line {line}: COPY's JSON form: {e}"));
        words.extend(array);
    } else {
        words.extend(remainder.split_whitespace().map(str::to_string));
    }
    let dest = words
        .pop()
        .filter(|_| !words.is_empty())
        .unwrap_or_else(|| panic!("line {line}: COPY needs a source and a destination"));
    for source in &words {
        assert!(
            !source.contains(['*', '?', '[']),
            "line {line}: COPY {source}: wildcards in context paths are not modelled by the deploy checks"
        );
    }
    Some(Copy {
        line,
        sources: words,
        dest,
        workdir: workdir.to_string(),
    })
}

/// `path` resolved against the absolute directory `base`.
pub fn join_abs(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", base.trim_end_matches('/'))
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The instructions with their first line: `\`-continued lines joined, comment lines and
/// empty lines dropped (also inside a continuation, as Docker does).
fn instructions(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if let Some(directive) = trimmed.strip_prefix('#') {
            let directive = directive.trim_start().to_ascii_lowercase();
            assert!(
                !(pending.is_none() && out.is_empty() && directive.starts_with("escape")),
                "line {}: another escape character is not modelled by the deploy checks",
                n + 1
            );
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        let (start, mut text) = pending.take().unwrap_or((n + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(continued) => {
                text.push_str(continued);
                text.push(' ');
                pending = Some((start, text));
            }
            None => {
                text.push_str(trimmed);
                out.push((start, text));
            }
        }
    }
    if let Some(last) = pending {
        out.push(last);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# syntax=docker/dockerfile:1
FROM rust:1 AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# a comment
COPY --chown=1:1 proto proto
COPY ["pg", "pg"]
WORKDIR sub
ADD agent /abs/agent
RUN --mount=type=cache,target=/x \
    # inside a continuation
    cargo build --locked \
    && echo done

FROM debian AS final
COPY --from=build /out/pgzm /usr/local/bin/
"#;

    #[test]
    fn stages_copies_and_runs() {
        let file = Dockerfile::parse(SAMPLE);
        assert_eq!(file.stages.len(), 2);
        let build = file.stage("build");
        let copies: Vec<(usize, Vec<&str>, &str, &str)> = build
            .copies
            .iter()
            .map(|c| {
                let sources = c.sources.iter().map(String::as_str).collect();
                (c.line, sources, c.dest.as_str(), c.workdir.as_str())
            })
            .collect();
        assert_eq!(
            copies,
            vec![
                (4, vec!["Cargo.toml", "Cargo.lock"], "./", "/src"),
                (6, vec!["proto"], "proto", "/src"),
                (7, vec!["pg"], "pg", "/src"),
                (9, vec!["agent"], "/abs/agent", "/src/sub"),
            ]
        );
        assert_eq!(build.runs.len(), 1);
        assert_eq!(build.runs[0].0, 10);
        assert!(build.runs[0].1.contains("cargo build --locked"));
        assert!(
            file.stage("final").copies.is_empty(),
            "--from copies are not the context's"
        );
    }

    #[test]
    fn paths_join_like_workdir() {
        assert_eq!(join_abs("/src", "./"), "/src");
        assert_eq!(join_abs("/src", "a/../b"), "/src/b");
        assert_eq!(join_abs("/src", "/abs"), "/abs");
        assert_eq!(join_abs("/", "src"), "/src");
    }
}
