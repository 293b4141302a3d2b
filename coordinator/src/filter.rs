//! Table filters with pg_dump's pattern rules: `--table`, `--exclude-table` and
//! `--exclude-table-data`.
//!
//! A pattern is a name, or `schema.name`, where (outside double quotes) letters are folded to
//! lower case, `*` matches any text, `?` any one character, `$` is literal, and other regular
//! expression characters keep their meaning (`[0-9]`); inside double quotes every character is
//! literal and case is kept (`""` is a quote). The pattern must match the whole name. As in
//! pg_dump the matching is done by the server's regular expressions (`~`), on the source.
//!
//! A table left out (not matched by any `--table` when one is given, or matched by an
//! `--exclude-table`) is not migrated: in the destination it stays as it is, like any table
//! only the destination has. A table matched by `--exclude-table-data` is migrated without its
//! rows. Every pattern must match at least one table of the source: a mistyped exclusion would
//! otherwise replace a table the operator meant to keep.

use std::collections::BTreeSet;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::error::CoordinatorError;
use crate::naming::QualName;

/// One parsed pattern: regular expressions for the schema (any schema when `None`) and the
/// name, each anchored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePattern {
    /// As the operator wrote it.
    pub text: String,
    /// Regular expression the schema must match, if the pattern names one.
    pub schema: Option<String>,
    /// Regular expression the table name must match.
    pub name: String,
}

/// A pattern that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern.
    pub pattern: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl TablePattern {
    /// Parses `text` with pg_dump's rules (see the module documentation).
    pub fn parse(text: &str) -> Result<TablePattern, PatternError> {
        let error = |reason| PatternError {
            pattern: text.to_string(),
            reason,
        };
        if text.trim().is_empty() {
            return Err(error("is empty"));
        }
        let mut parts = vec![String::new()];
        let mut quoted = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            let part = parts.last_mut().expect("parts is never empty");
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    part.push('"');
                }
                '"' => quoted = !quoted,
                _ if quoted => {
                    if "\\^$.|?*+()[]{}".contains(c) {
                        part.push('\\');
                    }
                    part.push(c);
                }
                '.' => parts.push(String::new()),
                '*' => part.push_str(".*"),
                '?' => part.push('.'),
                '$' => part.push_str("\\$"),
                _ => part.extend(c.to_lowercase()),
            }
        }
        if quoted {
            return Err(error("has an unterminated double quote"));
        }
        let anchored = |p: &str| {
            if p.is_empty() {
                "^(.*)$".to_string()
            } else {
                format!("^({p})$")
            }
        };
        match parts.as_slice() {
            [name] => Ok(TablePattern {
                text: text.to_string(),
                schema: None,
                name: anchored(name),
            }),
            [schema, name] => Ok(TablePattern {
                text: text.to_string(),
                schema: Some(anchored(schema)),
                name: anchored(name),
            }),
            _ => Err(error(
                "has more than one dot (database-qualified names are not supported)",
            )),
        }
    }
}

/// The three filters of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFilter {
    /// `--table`: when not empty, only matching tables are migrated.
    pub include: Vec<TablePattern>,
    /// `--exclude-table`: matching tables are not migrated.
    pub exclude: Vec<TablePattern>,
    /// `--exclude-table-data`: matching tables are migrated without their rows.
    pub exclude_data: Vec<TablePattern>,
}

/// What a filter selects among the source's tables of the migrated schemas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Tables left out: not migrated.
    pub excluded: BTreeSet<QualName>,
    /// Tables migrated without their rows.
    pub without_data: BTreeSet<QualName>,
}

impl TableFilter {
    /// Parses the three lists of patterns.
    pub fn parse(
        include: &[String],
        exclude: &[String],
        exclude_data: &[String],
    ) -> Result<TableFilter, PatternError> {
        let all = |list: &[String]| {
            list.iter()
                .filter(|p| !p.trim().is_empty())
                .map(|p| TablePattern::parse(p.trim()))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(TableFilter {
            include: all(include)?,
            exclude: all(exclude)?,
            exclude_data: all(exclude_data)?,
        })
    }

    /// Whether the filter selects every table with its rows.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty() && self.exclude_data.is_empty()
    }

    /// Applies the filter to `tables` on the server (its regular expressions, as pg_dump
    /// does). A pattern that matches none of them is refused.
    pub async fn select(
        &self,
        client: &Client,
        tables: &[QualName],
    ) -> Result<Selection, CoordinatorError> {
        if self.is_empty() {
            return Ok(Selection::default());
        }
        // One round trip for the three lists.
        let all: Vec<TablePattern> = self
            .include
            .iter()
            .chain(&self.exclude)
            .chain(&self.exclude_data)
            .cloned()
            .collect();
        let mut found = matches(client, tables, &all).await?.into_iter();
        let mut unmatched = Vec::new();
        let mut matching = |patterns: &[TablePattern]| {
            let mut names = BTreeSet::new();
            for (p, matched) in patterns.iter().zip(found.by_ref()) {
                if matched.is_empty() {
                    unmatched.push(p.text.clone());
                }
                names.extend(matched);
            }
            names
        };
        let included = matching(&self.include);
        let excluded = matching(&self.exclude);
        let without_data = matching(&self.exclude_data);
        if !unmatched.is_empty() {
            let schemas: BTreeSet<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
            return Err(CoordinatorError::Refused(vec![format!(
                "table pattern(s) {} match no table of the migrated schema(s) {}; nothing was done: check the spelling (pg_dump's pattern rules: unquoted names are folded to lower case, quote \"MixedCase\" names)",
                unmatched
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                schemas.into_iter().collect::<Vec<_>>().join(", ")
            )]));
        }
        let excluded: BTreeSet<QualName> = tables
            .iter()
            .filter(|t| {
                (!self.include.is_empty() && !included.contains(*t)) || excluded.contains(*t)
            })
            .cloned()
            .collect();
        Ok(Selection {
            without_data: without_data.difference(&excluded).cloned().collect(),
            excluded,
        })
    }
}

/// For each pattern, the names of `tables` it matches.
async fn matches(
    client: &Client,
    tables: &[QualName],
    patterns: &[TablePattern],
) -> Result<Vec<Vec<QualName>>, CoordinatorError> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let schemas: Vec<String> = patterns
        .iter()
        .map(|p| p.schema.clone().unwrap_or_else(|| "^(.*)$".into()))
        .collect();
    let names: Vec<String> = patterns.iter().map(|p| p.name.clone()).collect();
    let table_schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let table_names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = client
        .query_typed(
            "SELECT p.i::int4 AS pattern,
                    coalesce(array_agg(t.s ORDER BY t.s, t.name) FILTER (WHERE t.name IS NOT NULL), '{}') AS schemas,
                    coalesce(array_agg(t.name ORDER BY t.s, t.name) FILTER (WHERE t.name IS NOT NULL), '{}') AS tables
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY p(s, n, i)
             LEFT JOIN unnest($3::text[], $4::text[]) t(s, name) ON t.s ~ p.s AND t.name ~ p.n
             GROUP BY p.i ORDER BY p.i",
            &[
                (&schemas, Type::TEXT_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&table_schemas, Type::TEXT_ARRAY),
                (&table_names, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(|e| CoordinatorError::source("match the table patterns", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            r.get::<_, Vec<String>>("schemas")
                .into_iter()
                .zip(r.get::<_, Vec<String>>("tables"))
                .map(|(s, n)| QualName::new(s, n))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> (Option<String>, String) {
        let t = TablePattern::parse(text).expect(text);
        (t.schema, t.name)
    }

    #[test]
    fn patterns_follow_pg_dump() {
        assert_eq!(p("film"), (None, "^(film)$".into()));
        assert_eq!(p("Film*"), (None, "^(film.*)$".into()));
        assert_eq!(p("fil?"), (None, "^(fil.)$".into()));
        assert_eq!(
            p("public.film"),
            (Some("^(public)$".into()), "^(film)$".into())
        );
        assert_eq!(p("\"Order Items\""), (None, "^(Order Items)$".into()));
        assert_eq!(p("\"a.b\".c"), (Some("^(a\\.b)$".into()), "^(c)$".into()));
        assert_eq!(p("\"x\"\"y*\""), (None, "^(x\"y\\*)$".into()));
        assert_eq!(p("pay$"), (None, "^(pay\\$)$".into()));
        assert_eq!(p("payment_p[0-9]*"), (None, "^(payment_p[0-9].*)$".into()));
        assert_eq!(p("sales."), (Some("^(sales)$".into()), "^(.*)$".into()));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "  ", "\"open", "a.b.c"] {
            assert!(TablePattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}
