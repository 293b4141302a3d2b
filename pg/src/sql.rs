//! Identifier quoting and literal escaping: every SQL statement that names an object or embeds a
//! value is built with these two functions (the coordinator uses them too).

/// Quotes an identifier for PostgreSQL: always double-quoted, embedded `"` doubled.
///
/// Always quoting keeps mixed-case names, names with spaces and reserved words intact.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for ch in name.chars() {
        if ch == '"' {
            out.push('"');
        }
        out.push(ch);
    }
    out.push('"');
    out
}

/// Quotes a schema-qualified name: `"schema"."name"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A comma-separated list of quoted names qualified with `schema`.
pub fn quote_qualified_list<'a>(schema: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|n| quote_qualified(schema, n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Quotes a string literal (standard_conforming_strings on): `'it''s'`.
///
/// Backslashes are literal in standard strings; a string containing one is sent as an `E''`
/// literal with the backslash doubled so it is correct under either setting.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    if value.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for ch in value.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(ch),
        }
    }
    out.push('\'');
    out
}

/// `body` dollar-quoted with a tag that does not occur in it (`$pgzm$`, else `$pgzm1$`, …), so
/// no text inside — a quoted name, a literal — can end the quote early.
pub fn dollar_quote(body: &str) -> String {
    let mut tag = String::from("$pgzm$");
    let mut n = 0u32;
    while body.contains(&tag) {
        n += 1;
        tag = format!("$pgzm{n}$");
    }
    format!("{tag}{body}{tag}")
}

/// `DO` with `body` (a PL/pgSQL block, `BEGIN … END`) [dollar-quoted](dollar_quote) safely.
pub fn do_block(body: &str) -> String {
    format!("DO {}", dollar_quote(body))
}

/// A comma-separated list of quoted identifiers.
pub fn quote_ident_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    /// Schema (unquoted).
    pub schema: String,
    /// Relation name (unquoted).
    pub name: String,
}

impl QualifiedName {
    /// The quoted form, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        quote_qualified(&self.schema, &self.name)
    }
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[cfg(test)]
mod tests {

    /// Every combination of hostile pieces: the chosen tag never occurs in the body, so the
    /// quoted text is exactly the body.
    #[test]
    fn dollar_quotes_never_end_early() {
        let pieces = [
            "$pgzm$", "$pgzm1$", "$pgzm2$", "$", "pgzm", "'", "\"", ";", "END", "$$",
        ];
        let mut bodies = vec![String::new()];
        for _ in 0..3 {
            let mut next = Vec::new();
            for b in &bodies {
                for p in pieces {
                    next.push(format!("{b}{p}"));
                }
            }
            bodies.extend(next);
        }
        for body in bodies {
            let quoted = dollar_quote(&body);
            let tag_end = quoted[1..].find('$').map(|i| i + 2).unwrap_or(0);
            let tag = &quoted[..tag_end];
            assert!(tag.starts_with("$pgzm") && tag.ends_with('$'), "{quoted}");
            assert!(!body.contains(tag), "tag {tag} occurs in {body:?}");
            assert_eq!(&quoted[tag.len()..quoted.len() - tag.len()], body);
            assert!(do_block(&body).starts_with("DO $pgzm"));
        }
    }

    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("User"), "\"User\"");
        assert_eq!(quote_ident("Order Items"), "\"Order Items\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_qualified("public", "a b"), "\"public\".\"a b\"");
        assert_eq!(quote_ident_list(["a", "B"]), "\"a\", \"B\"");
        assert_eq!(
            quote_qualified_list("public", ["a", "B"]),
            "\"public\".\"a\", \"public\".\"B\""
        );
    }

    #[test]
    fn quotes_literals() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
    }
}
