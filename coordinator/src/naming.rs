//! Names of the objects the tool creates: `shadow_<name>` and `backup_<name>`.
//!
//! PostgreSQL truncates identifiers at 63 bytes, so a prefixed name that would exceed that is
//! shortened deterministically: the name is cut at a character boundary and a hash of the full
//! name is appended. Every name is recorded in the migration's metadata, so rollback and cleanup
//! never have to guess.

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Prefix of objects being built.
pub const SHADOW: &str = "shadow_";
/// Prefix of the previous live objects after a swap.
pub const BACKUP: &str = "backup_";

/// The schema migrated by default.
pub const PUBLIC: &str = "public";

/// [`PUBLIC`] as an owned string (serde default of recorded names without a schema).
pub fn public_schema() -> String {
    PUBLIC.to_string()
}

/// A schema-qualified name, both parts unquoted: the one name type from the catalog read to
/// the swap SQL. `Display` quotes it (`"sales"."Order"`); [`QualName::plain`] shows it as an
/// operator would type it (`sales.Order`). Ordered by schema, then name.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(from = "QualNameRecord")]
pub struct QualName {
    /// Schema.
    pub schema: String,
    /// Name in the schema.
    pub name: String,
}

impl QualName {
    /// `schema.name`.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> QualName {
        QualName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `public.name`.
    pub fn public(name: impl Into<String>) -> QualName {
        QualName::new(PUBLIC, name)
    }

    /// Another name in the same schema.
    pub fn sibling(&self, name: impl Into<String>) -> QualName {
        QualName::new(self.schema.clone(), name)
    }

    /// A catalog row's `schema_name` and `name` columns.
    pub fn from_row(row: &tokio_postgres::Row) -> QualName {
        QualName::from_columns(row, "schema_name", "name")
    }

    /// A catalog row's schema and name, from the columns so named.
    pub fn from_columns(row: &tokio_postgres::Row, schema: &str, name: &str) -> QualName {
        QualName::new(row.get::<_, String>(schema), row.get::<_, String>(name))
    }

    /// The quoted, qualified form for SQL.
    pub fn quoted(&self) -> String {
        pgzm_pg::sql::quote_qualified(&self.schema, &self.name)
    }

    /// For messages: `schema.name`, each part double-quoted unless it is a simple lower-case
    /// identifier (`sales."Order"`).
    pub fn plain(&self) -> String {
        format!(
            "{}.{}",
            crate::rewrite::display_ident(&self.schema),
            crate::rewrite::display_ident(&self.name)
        )
    }
}

impl QualName {
    /// For reports: the bare name in `public` (as reports named tables before schemas were
    /// chosen), [`QualName::plain`] elsewhere.
    pub fn display_name(&self) -> String {
        if self.schema == PUBLIC {
            self.name.clone()
        } else {
            self.plain()
        }
    }
}

impl std::fmt::Display for QualName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.quoted())
    }
}

/// A qualified name as recorded: `{schema, name}`, or a bare name from runs recorded before
/// schemas were chosen (in `public`).
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum QualNameRecord {
    Qualified { schema: String, name: String },
    Bare(String),
}

impl From<QualNameRecord> for QualName {
    fn from(r: QualNameRecord) -> Self {
        match r {
            QualNameRecord::Qualified { schema, name } => QualName::new(schema, name),
            QualNameRecord::Bare(name) => QualName::public(name),
        }
    }
}

/// A table name as an operator gives it (`--preserved-tables`): `name` or `schema.name`, split
/// at the first dot outside double quotes; a double-quoted part keeps dots and `""` is a
/// quote. Case is kept (names are taken as the catalog spells them).
pub fn split_table_name(text: &str) -> (Option<String>, String) {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let first = parts.len() == 1;
        let part = parts.last_mut().expect("parts is never empty");
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                part.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted && first => parts.push(String::new()),
            _ => part.push(c),
        }
    }
    match parts.len() {
        2 => {
            let name = parts.pop().unwrap_or_default();
            (parts.pop(), name)
        }
        _ => (None, parts.pop().unwrap_or_default()),
    }
}

/// `true`: the serde default of flags that older recorded plans lack and that were always on.
pub fn yes() -> bool {
    true
}

/// `prefix + name`, shortened to fit 63 bytes when needed.
pub fn prefixed(prefix: &str, name: &str) -> String {
    let full = format!("{prefix}{name}");
    if full.len() <= MAX_IDENTIFIER_BYTES {
        return full;
    }
    let hash = format!("_{:08x}", fnv1a(name.as_bytes()));
    let budget = MAX_IDENTIFIER_BYTES - prefix.len() - hash.len();
    let mut cut = budget.min(name.len());
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{prefix}{}{hash}", &name[..cut])
}

/// 32-bit FNV-1a: stable across versions and platforms (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A list of table names as given on the command line (`--preserved-tables a,b`, repeated or
/// comma-separated): trimmed, empties dropped, duplicates removed, first occurrence first.
pub fn table_list(raw: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    raw.iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter(|s| seen.insert(s.to_string()))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn short_names_are_plain() {
        assert_eq!(prefixed(SHADOW, "User"), "shadow_User");
        assert_eq!(prefixed(BACKUP, "Order Items"), "backup_Order Items");
    }

    #[test]
    fn long_names_are_shortened_deterministically() {
        let name = "a".repeat(60);
        let s = prefixed(SHADOW, &name);
        assert!(s.len() <= MAX_IDENTIFIER_BYTES);
        assert!(s.starts_with("shadow_aaaa"));
        assert_eq!(s, prefixed(SHADOW, &name));
        let other = format!("{}b", "a".repeat(59));
        assert_ne!(prefixed(SHADOW, &other), s);
    }

    #[test]
    fn multibyte_names_are_cut_at_char_boundaries() {
        let name = "é".repeat(31); // 62 bytes
        let s = prefixed(BACKUP, &name);
        assert!(s.len() <= MAX_IDENTIFIER_BYTES);
        assert!(s.is_char_boundary(s.len()));
    }

    /// Names as a hostile schema has them: quotes, dots, spaces, keywords, upper case,
    /// multi-byte characters, and lengths up to PostgreSQL's 63-byte limit.
    pub(crate) fn hostile_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[a-z_][a-z0-9_]{0,20}",
            "[A-Z][A-Za-z0-9 ]{0,20}",
            "[a-z]{1,4}[\"'.;$ -][a-z]{0,4}[\"'.;$ -]{0,2}",
            "[a-zé日本ß]{1,20}",
            "[a-z]{50,63}",
            "[é]{25,31}[a-z]{0,2}",
            prop::sample::select(vec![
                "user", "select", "order", "shadow_x", "backup_x", "public"
            ])
            .prop_map(String::from),
        ]
        .prop_filter("an identifier of 1 to 63 bytes", |n| {
            !n.is_empty() && n.len() <= MAX_IDENTIFIER_BYTES
        })
    }

    proptest::proptest! {
        /// A prefixed name is a valid identifier that PostgreSQL keeps as it is (at most 63
        /// bytes), starts with the prefix, and tells distinct names apart.
        #[test]
        fn prefixed_names_fit_and_stay_distinct(a in hostile_name(), b in hostile_name()) {
            for prefix in [SHADOW, BACKUP] {
                let pa = prefixed(prefix, &a);
                proptest::prop_assert!(pa.len() <= MAX_IDENTIFIER_BYTES, "{pa:?}");
                proptest::prop_assert!(pa.starts_with(prefix));
                proptest::prop_assert_eq!(&pa, &prefixed(prefix, &a));
                if a != b {
                    proptest::prop_assert_ne!(pa, prefixed(prefix, &b));
                }
            }
        }
    }
}
