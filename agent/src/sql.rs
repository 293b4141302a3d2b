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

/// A comma-separated list of quoted identifiers.
pub fn quote_ident_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
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
