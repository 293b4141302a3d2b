//! Names of the objects the tool creates: `shadow_<name>` and `backup_<name>`.
//!
//! PostgreSQL truncates identifiers at 63 bytes, so a prefixed name that would exceed that is
//! shortened deterministically: the name is cut at a character boundary and a hash of the full
//! name is appended. Every name is recorded in the migration's metadata, so rollback and cleanup
//! never have to guess.

use crate::name::Name;

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

/// [`public_schema`] as a shared [`crate::name::Name`].
pub fn public_name() -> crate::name::Name {
    crate::name::common(PUBLIC)
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
    pub schema: Name,
    /// Name in the schema.
    pub name: Name,
}

impl QualName {
    /// `schema.name`.
    pub fn new(schema: impl AsRef<str>, name: impl Into<Name>) -> QualName {
        QualName {
            schema: crate::name::common(schema.as_ref()),
            name: name.into(),
        }
    }

    /// `public.name`.
    pub fn public(name: impl Into<Name>) -> QualName {
        QualName::new(PUBLIC, name)
    }

    /// Another name in the same schema.
    pub fn sibling(&self, name: impl Into<Name>) -> QualName {
        QualName {
            schema: self.schema.clone(),
            name: name.into(),
        }
    }

    /// A catalog row's `schema_name` and `name` columns.
    pub fn from_row(row: &tokio_postgres::Row) -> QualName {
        QualName::from_columns(row, "schema_name", "name")
    }

    /// A catalog row's schema and name, from the columns so named.
    pub fn from_columns(row: &tokio_postgres::Row, schema: &str, name: &str) -> QualName {
        QualName::new(row.get::<_, &str>(schema), row.get::<_, &str>(name))
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
            self.name.to_string()
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

/// A by-name index over a list of named items (a plan's tables, a schema's tables), built on
/// first use: lookups by name in loops over thousands of tables stay O(1) instead of a scan
/// each. The list stays the truth: a hit is checked against it, and the index is rebuilt when
/// it no longer matches (the list was changed after it was built), so a stale index can cost a
/// rebuild but never give a wrong answer.
#[derive(Default)]
pub struct NameIndex(std::sync::RwLock<Option<std::collections::HashMap<QualName, usize>>>);

impl NameIndex {
    /// The first item named `name` (`key` gives an item's schema and name).
    pub fn find<'a, T>(
        &self,
        items: &'a [T],
        name: &QualName,
        key: impl Fn(&T) -> (&str, &str),
    ) -> Option<&'a T> {
        let matches = |i: usize| {
            items
                .get(i)
                .filter(|t| key(t) == (name.schema.as_str(), name.name.as_str()))
        };
        {
            let index = self.0.read().unwrap_or_else(|e| e.into_inner());
            if let Some(map) = index.as_ref() {
                if map.len() <= items.len() {
                    match map.get(name) {
                        Some(&i) => {
                            if let Some(t) = matches(i) {
                                return Some(t);
                            }
                        }
                        // Exact when nothing was appended since it was built (an item renamed in
                        // place is caught by the scan below).
                        None if map.len() == items.len() => {
                            return items
                                .iter()
                                .find(|t| key(t) == (name.schema.as_str(), name.name.as_str()));
                        }
                        None => {}
                    }
                }
            }
        }
        let mut map = std::collections::HashMap::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            let (schema, name) = key(t);
            map.entry(QualName::new(schema, name)).or_insert(i);
        }
        let found = map.get(name).copied().and_then(matches);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(map);
        found
    }
}

/// Items grouped under the name of what they belong to (the sequences by the table owning
/// them), indexed on first use, so a loop over thousands of tables that asks each for its
/// items stays linear instead of scanning the whole list per table. A hit is checked against
/// the list, and the index is rebuilt when the list's length changed since it was built (the
/// lists indexed are only appended to).
#[derive(Default)]
pub struct GroupIndex(std::sync::RwLock<Option<Groups>>);

/// The length of the list indexed, and each name's positions in it.
type Groups = (usize, std::collections::HashMap<QualName, Vec<usize>>);

impl GroupIndex {
    /// The items under `name`, in the list's order (`key` gives the name an item belongs to).
    pub fn find<'a, T>(
        &self,
        items: &'a [T],
        name: &QualName,
        key: impl Fn(&T) -> Option<(&str, &str)>,
    ) -> Vec<&'a T> {
        let under = |i: &usize| {
            items
                .get(*i)
                .filter(|t| key(t) == Some((name.schema.as_str(), name.name.as_str())))
        };
        {
            let index = self.0.read().unwrap_or_else(|e| e.into_inner());
            if let Some((len, map)) = index.as_ref() {
                if *len == items.len() {
                    return map
                        .get(name)
                        .map(|found| found.iter().filter_map(under).collect())
                        .unwrap_or_default();
                }
            }
        }
        let mut map: std::collections::HashMap<QualName, Vec<usize>> =
            std::collections::HashMap::new();
        for (i, t) in items.iter().enumerate() {
            if let Some((schema, name)) = key(t) {
                map.entry(QualName::new(schema, name)).or_default().push(i);
            }
        }
        let found = map
            .get(name)
            .map(|found| found.iter().filter_map(under).collect())
            .unwrap_or_default();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some((items.len(), map));
        found
    }
}

impl Clone for GroupIndex {
    /// A clone starts without an index.
    fn clone(&self) -> Self {
        GroupIndex::default()
    }
}

impl std::fmt::Debug for GroupIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupIndex")
    }
}

impl Clone for NameIndex {
    /// A clone starts without an index (its list may be changed apart from this one's).
    fn clone(&self) -> Self {
        NameIndex::default()
    }
}

impl std::fmt::Debug for NameIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NameIndex")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_group_index_answers_as_a_filter_would_as_the_list_grows() {
        // (schema, owner table, name): sequences and the tables owning them.
        type Item = (String, Option<String>, String);
        fn key(t: &Item) -> Option<(&str, &str)> {
            t.1.as_deref().map(|owner| (t.0.as_str(), owner))
        }
        let item = |s: &str, owner: Option<&str>, n: &str| {
            (s.to_string(), owner.map(str::to_string), n.to_string())
        };
        let scan = |items: &[Item], s: &str, n: &str| -> Vec<String> {
            items
                .iter()
                .filter(|t| key(t) == Some((s, n)))
                .map(|t| t.2.clone())
                .collect()
        };
        let mut items = vec![
            item("public", Some("a"), "a_id_seq"),
            item("public", None, "free_seq"),
            item("s", Some("a"), "s_a_id_seq"),
            item("public", Some("a"), "a_n_seq"),
        ];
        let index = GroupIndex::default();
        let found = |index: &GroupIndex, items: &[Item], s: &str, n: &str| -> Vec<String> {
            index
                .find(items, &QualName::new(s, n), key)
                .into_iter()
                .map(|t| t.2.clone())
                .collect()
        };
        for round in 0..3 {
            for (s, n) in [("public", "a"), ("s", "a"), ("public", "b"), ("x", "y")] {
                assert_eq!(found(&index, &items, s, n), scan(&items, s, n), "{s}.{n}");
            }
            // Appended after the index was built: it is rebuilt.
            items.push(item(
                "public",
                Some(["a", "b"][round % 2]),
                &format!("n{round}"),
            ));
        }
        assert_eq!(found(&index, &items, "public", "a").len(), 4);
    }

    #[test]
    fn the_name_index_answers_as_a_scan_would_after_the_list_changes() {
        fn key(t: &(String, String)) -> (&str, &str) {
            (&t.0, &t.1)
        }
        let named = |s: &str, n: &str| (s.to_string(), n.to_string());
        let mut items = vec![named("public", "a"), named("s", "a"), named("public", "b")];
        let index = NameIndex::default();
        let find = |index: &NameIndex, items: &[(String, String)], s: &str, n: &str| {
            index
                .find(items, &QualName::new(s, n), key)
                .map(|t| (t.0.clone(), t.1.clone()))
        };
        assert_eq!(find(&index, &items, "s", "a"), Some(named("s", "a")));
        assert_eq!(find(&index, &items, "public", "c"), None);
        // Appended, renamed in place, reordered: each answer still matches the list.
        items.push(named("public", "c"));
        assert_eq!(
            find(&index, &items, "public", "c"),
            Some(named("public", "c"))
        );
        items[0].1 = "z".into();
        assert_eq!(find(&index, &items, "public", "a"), None);
        assert_eq!(
            find(&index, &items, "public", "z"),
            Some(named("public", "z"))
        );
        items.reverse();
        for (s, n) in [
            ("public", "z"),
            ("s", "a"),
            ("public", "b"),
            ("public", "c"),
        ] {
            assert_eq!(find(&index, &items, s, n), Some(named(s, n)));
        }
        // A duplicate name: the first in the list, as a scan finds it.
        items.insert(0, named("s", "a"));
        items[0].1 = "a".into();
        assert!(std::ptr::eq(
            index.find(&items, &QualName::new("s", "a"), key).unwrap(),
            &items[0]
        ));
    }

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
