//! SQL text building: the one place identifiers are quoted.

/// Quotes an identifier for PostgreSQL: wraps it in double quotes and doubles any embedded
/// double quote, so mixed case, spaces and quotes survive verbatim.
///
/// ```
/// assert_eq!(pgzm_tests::quote_ident(r#"My "T""#), r#""My ""T""""#);
/// ```
pub fn quote_ident(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for ch in name.chars() {
        if ch == '"' {
            quoted.push('"');
        }
        quoted.push(ch);
    }
    quoted.push('"');
    quoted
}

/// Quotes a schema-qualified name: `"schema"."name"`.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_handles_quotes_spaces_and_case() {
        assert_eq!(quote_ident("area"), r#""area""#);
        assert_eq!(quote_ident("MixedCase"), r#""MixedCase""#);
        assert_eq!(quote_ident("with space"), r#""with space""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_ident(r#""""#), r#""""""""#);
        assert_eq!(quote_ident(""), r#""""#);
        assert_eq!(quote_qualified("public", "Area"), r#""public"."Area""#);
    }
}
