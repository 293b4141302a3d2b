//! Shared names: an immutable string whose clones share one allocation, and an interner that
//! makes equal names read from a catalog share it too.
//!
//! At 10 000 tables the source schema, the plan and the destination catalog hold hundreds of
//! thousands of short strings, most of them repeats: the schema's name in every table, table
//! plan and move, the same column names (`id`, `created`) and types (`integer`, `text`) in
//! every table. As owned `String`s each repeat was a heap block of its own (32 bytes for a name
//! of up to 24) held through the whole run. A [`Name`] is one pointer and length; its clones
//! and the names an [`Interner`] hands out for equal text share one block.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// An immutable string, cheap to clone (the clones share it). Compares, hashes, orders,
/// prints and serializes as the string it holds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Name(Arc<str>);

impl Name {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(Arc::from(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Name(Arc::from(s.as_str()))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(Arc::from(s))
    }
}

impl From<&Name> for Name {
    fn from(s: &Name) -> Self {
        s.clone()
    }
}

impl From<&Name> for String {
    fn from(n: &Name) -> Self {
        n.0.as_ref().to_owned()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.as_ref().to_owned()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == &*other.0
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Name::from)
    }
}

impl schemars::JsonSchema for Name {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        String::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

impl tokio_postgres::types::ToSql for Name {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        <&str as tokio_postgres::types::ToSql>::to_sql(&&*self.0, ty, out)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

impl<'a> tokio_postgres::types::FromSql<'a> for Name {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        <&str as tokio_postgres::types::FromSql>::from_sql(ty, raw).map(Name::from)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <&str as tokio_postgres::types::FromSql>::accepts(ty)
    }
}

/// The shared name of a schema or a role: a handful per database, each repeated in every
/// table, plan entry and rename (a schema) or owned object (a role), so one process-wide set
/// holds them (never emptied; it grows only with the distinct names a process meets).
pub fn common(text: &str) -> Name {
    FEW.get_or_init(Interner::default).name(text)
}

/// A recorded schema name, read as the shared [`common`] one (a recorded plan repeats it in
/// every table plan and move).
pub fn deserialize_schema<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
    <String as serde::Deserialize>::deserialize(d).map(|s| common(&s))
}

/// Schema and role names: few per database, each repeated thousands of times.
static FEW: std::sync::OnceLock<Interner> = std::sync::OnceLock::new();

/// Hands out one [`Name`] per distinct text: what a catalog read makes its repeated names
/// with. Shared by the reads that run at once (`&self`); dropped when the read ends (the names
/// it handed out live on).
#[derive(Debug, Default)]
pub struct Interner {
    names: Mutex<HashSet<Name>>,
}

impl Interner {
    /// The shared name for `text`.
    pub fn name(&self, text: &str) -> Name {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = names.get(text) {
            return name.clone();
        }
        let name = Name::from(text);
        names.insert(name.clone());
        name
    }

    /// [`Interner::name`] of a catalog row's text column.
    pub fn get(&self, row: &tokio_postgres::Row, column: &str) -> Name {
        self.name(row.get::<_, &str>(column))
    }

    /// [`Interner::get`] of a nullable column.
    pub fn get_opt(&self, row: &tokio_postgres::Row, column: &str) -> Option<Name> {
        row.get::<_, Option<&str>>(column).map(|t| self.name(t))
    }

    /// [`Interner::get`] of a text array column (NULL: empty).
    pub fn get_all(&self, row: &tokio_postgres::Row, column: &str) -> Vec<Name> {
        row.get::<_, Option<Vec<&str>>>(column)
            .unwrap_or_default()
            .into_iter()
            .map(|t| self.name(t))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_names_share_one_allocation() {
        let i = Interner::default();
        let a = i.name("created");
        let b = i.name("created");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert!(!Arc::ptr_eq(&a.0, &i.name("id").0));
        assert_eq!(a, "created");
        assert_eq!(String::from(b), "created");
    }

    #[test]
    fn recorded_schemas_are_read_shared() {
        #[derive(serde::Deserialize)]
        struct Rec {
            #[serde(deserialize_with = "deserialize_schema")]
            schema: Name,
        }
        let a: Rec = serde_json::from_str(r#"{"schema": "sales"}"#).unwrap();
        let b: Rec = serde_json::from_str(r#"{"schema": "sal\u0065s"}"#).unwrap();
        assert_eq!(a.schema, "sales");
        assert!(Arc::ptr_eq(&a.schema.0, &b.schema.0));
        assert!(Arc::ptr_eq(&a.schema.0, &common("sales").0));
    }

    #[test]
    fn serializes_and_orders_as_its_text() {
        let n = Name::from("t_1");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"t_1\"");
        let back: Name = serde_json::from_str("\"t_1\"").unwrap();
        assert_eq!(back, n);
        assert_eq!(format!("{n} {n:?}"), "t_1 \"t_1\"");
        let (a, b) = (Name::from("a"), Name::from("b"));
        assert!(a < b);
        let set: std::collections::BTreeSet<Name> = ["b".into(), "a".into()].into();
        assert!(set.contains("a"));
    }
}
