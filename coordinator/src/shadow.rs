//! The shadow schema as statements: a pure function of the plan, the source's catalog and the
//! destination's (no I/O), run by `prepare` in transactions and by the dry run's rehearsal.

use pgzm_pg::sql::quote_qualified;

use crate::catalog::{SourceSchema, Table};
use crate::ddl;
use crate::destination::Destination;
use crate::naming::QualName;
use crate::plan::Plan;
use crate::rewrite::Renames;

/// One statement of the shadow schema: the action it belongs to, and its SQL.
pub type Statement = (String, String);

/// The shadow schema's statements, each with the action it belongs to: trigger and other
/// functions the source's objects use, types, sequences, tables (with the live tables'
/// privileges), partitions and inheritance attached, sequence positions.
pub fn statements(
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
) -> Vec<Statement> {
    objects(plan, schema, dest, renames).flatten().collect()
}

/// One item of the shadow set: an object (a schema, a type, a table with its privileges…) as
/// its statements, in order, and what it creates that the run records by oid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Object {
    /// Its statements, in order.
    pub statements: Vec<Statement>,
    /// The relations and types it creates.
    pub creates: Vec<Created>,
}

/// A shadow object a run records with its oid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A table.
    Table(QualName),
    /// A sequence (a free one, or a table's identity sequence).
    Sequence(QualName),
    /// A type.
    Type(QualName),
}

impl Object {
    /// Statements that create nothing recorded.
    fn new(statements: Vec<Statement>) -> Self {
        Self {
            statements,
            creates: Vec::new(),
        }
    }
}

impl IntoIterator for Object {
    type Item = Statement;
    type IntoIter = std::vec::IntoIter<Statement>;

    fn into_iter(self) -> Self::IntoIter {
        self.statements.into_iter()
    }
}

/// Objects made as they are consumed.
pub type Objects<'a> = Box<dyn Iterator<Item = Object> + Send + 'a>;

/// A stage of the shadow set and how many objects it holds.
pub struct Stage<'a> {
    /// Its objects.
    pub objects: Objects<'a>,
    /// How many.
    pub len: usize,
}

/// The shadow set in four stages, each using only objects of the stages before it (and the
/// destination's). `prepare` runs the first and last in order on one session, and shares the
/// objects of the two middle ones (independent of one another) between two sessions.
pub struct Stages<'a> {
    /// Schemas, trigger functions and types (a type may use another).
    pub definitions: Stage<'a>,
    /// The sequences that are not identity sequences (a table's default may use any of them).
    pub sequences: Stage<'a>,
    /// The tables that use no other migrated table's row type or identity sequence.
    pub tables: Stage<'a>,
    /// The tables that do, after the tables they use; partitions attached and
    /// inheritance set; sequence positions.
    pub last: Stage<'a>,
}

impl<'a> Stages<'a> {
    /// Every object, in order.
    pub fn into_objects(self) -> impl Iterator<Item = Object> + 'a {
        self.definitions
            .objects
            .chain(self.sequences.objects)
            .chain(self.tables.objects)
            .chain(self.last.objects)
    }

    /// How many objects in all.
    pub fn count(&self) -> usize {
        self.definitions.len + self.sequences.len + self.tables.len + self.last.len
    }
}

/// The same statements, made as they are consumed: one item per object (a schema, a type, a
/// table with its privileges…), its statements in order. `prepare` sends them a transaction at
/// a time instead of holding the whole shadow set's SQL (~12 MB at 10 000 tables).
pub fn objects<'a>(
    plan: &'a Plan,
    schema: &'a SourceSchema,
    dest: &'a Destination,
    renames: &'a Renames,
) -> impl Iterator<Item = Object> + 'a {
    stages(plan, schema, dest, renames).into_objects()
}

/// The shadow set's [`Stages`].
pub fn stages<'a>(
    plan: &'a Plan,
    schema: &'a SourceSchema,
    dest: &'a Destination,
    renames: &'a Renames,
) -> Stages<'a> {
    use pgzm_pg::sql::quote_ident;
    let schemas = plan.schemas_to_create.iter().map(|schema| {
        let owner = plan
            .schema_owner
            .as_deref()
            .map(|o| format!(" AUTHORIZATION {}", quote_ident(o)))
            .unwrap_or_default();
        Object::new(vec![(
            format!("create schema \"{schema}\""),
            format!("CREATE SCHEMA {}{owner}", quote_ident(schema)),
        )])
    });
    let functions = plan
        .functions_to_create
        .iter()
        .map(|(signature, definition)| {
            Object::new(vec![(
                format!("create trigger function {signature}"),
                definition.clone(),
            )])
        });
    let types = plan.types.iter().zip(&schema.types).map(|(m, t)| {
        let action = format!("create shadow type \"{}\"", m.to);
        let mut statements: Vec<Statement> = ddl::create_type(t, &m.to, renames)
            .into_iter()
            .map(|sql| (action.clone(), sql))
            .collect();
        let name = QualName::new(t.schema.clone(), t.name.clone());
        if let Some((owner, grants)) = dest.type_acl.get(&name) {
            statements.push((
                action.clone(),
                format!(
                    "ALTER TYPE {} OWNER TO {}",
                    quote_qualified(&m.schema, &m.to),
                    quote_ident(owner)
                ),
            ));
            for g in ddl::grants_sql("TYPE", &quote_qualified(&m.schema, &m.to), grants) {
                statements.push((action.clone(), g));
            }
        }
        Object {
            statements,
            creates: vec![Created::Type(QualName::new(m.schema.clone(), m.to.clone()))],
        }
    });
    let definitions = Stage {
        len: plan.schemas_to_create.len() + plan.functions_to_create.len() + plan.types.len(),
        objects: Box::new(schemas.chain(functions).chain(types)),
    };
    let free_sequences = || {
        plan.sequences
            .iter()
            .zip(&schema.sequences)
            .filter(|(_, s)| !s.identity)
    };
    let sequences = Stage {
        len: free_sequences().count(),
        objects: Box::new(free_sequences().map(|(m, s)| Object {
            statements: vec![(
                format!("create shadow sequence \"{}\"", m.to),
                ddl::create_sequence(s, &m.to),
            )],
            creates: vec![Created::Sequence(QualName::new(
                m.schema.clone(),
                m.to.clone(),
            ))],
        })),
    };
    let table = move |t: &'a Table| {
        let tp = plan.table(&t.qualname())?;
        let action = format!("create shadow table \"{}\"", tp.shadow);
        let owned = schema.owned_sequences(t);
        let mut statements: Vec<Statement> =
            ddl::create_table(t, &tp.shadow, &owned, renames, dest.server_version)
                .into_iter()
                .map(|sql| (action.clone(), sql))
                .collect();
        // Its identity sequences are created with it (the others before the tables).
        let mut creates = vec![Created::Table(tp.shadow_name())];
        creates.extend(owned.iter().filter(|s| s.identity).map(|s| {
            let shadow = renames.get_in(&s.schema, &s.name).unwrap_or(&s.name);
            Created::Sequence(QualName::new(s.schema.clone(), shadow.to_string()))
        }));
        if let Some(live) = dest.tables.get(&t.qualname()) {
            let cols: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
            let action = format!("carry privileges of \"{}\" to its shadow", t.name);
            for sql in ddl::carry_privileges(live, &t.schema, &tp.shadow, &cols, renames) {
                statements.push((action.clone(), sql));
            }
        }
        Some(Object {
            statements,
            creates,
        })
    };
    let typed_on_others = typed_on_other_tables(plan, schema);
    let late_len = typed_on_others.len();
    let late: std::collections::HashSet<usize> = typed_on_others.iter().copied().collect();
    let independent =
        move |(i, t): &(usize, &'a Table)| !late.contains(i) && plan.table(&t.qualname()).is_some();
    let tables = Stage {
        len: schema
            .tables
            .iter()
            .enumerate()
            .filter(&independent)
            .count(),
        objects: Box::new(
            schema
                .tables
                .iter()
                .enumerate()
                .filter(independent)
                .filter_map(move |(_, t)| table(t)),
        ),
    };
    let late_tables = typed_on_others
        .into_iter()
        .filter_map(move |i| table(&schema.tables[i]));
    // Partitions and inheritance children are created as tables of their own (columns in the
    // source's order), then attached while empty (no scan, no lock anyone waits on).
    let shadow_of = |name: &QualName| plan.table(name).map(|p| p.shadow_name());
    let attach = move |t: &Table| {
        let shadow = shadow_of(&t.qualname())?;
        let mut statements = Vec::new();
        if let Some((parent, bound)) = &t.partition_of {
            if let Some(parent_shadow) = shadow_of(parent) {
                statements.push((
                    format!("attach shadow partition {}", shadow.plain()),
                    format!(
                        "ALTER TABLE {parent_shadow} ATTACH PARTITION {shadow} {}",
                        renames.apply(bound)
                    ),
                ));
            }
        }
        for parent in &t.inherits {
            if let Some(parent_shadow) = shadow_of(parent) {
                statements.push((
                    format!("make shadow table {} inherit", shadow.plain()),
                    format!("ALTER TABLE {shadow} INHERIT {parent_shadow}"),
                ));
            }
        }
        (!statements.is_empty()).then(|| Object::new(statements))
    };
    let attached_len = schema
        .tables
        .iter()
        .filter(|t| {
            t.partition_of
                .as_ref()
                .is_some_and(|(p, _)| plan.table(p).is_some())
                || t.inherits.iter().any(|p| plan.table(p).is_some())
        })
        .count();
    let attached = schema.tables.iter().filter_map(attach);
    let positions = plan.sequences.iter().zip(&schema.sequences).map(|(m, s)| {
        let action = format!("set shadow sequence \"{}\"", m.to);
        let mut statements = vec![(action.clone(), ddl::set_sequence(&m.to, s))];
        if let Some((_, grants)) = dest
            .sequence_acl
            .get(&QualName::new(s.schema.clone(), s.name.clone()))
        {
            for g in ddl::grants_sql("SEQUENCE", &quote_qualified(&m.schema, &m.to), grants) {
                statements.push((action.clone(), g));
            }
        }
        Object::new(statements)
    });
    let last = Stage {
        len: late_len + attached_len + plan.sequences.len(),
        objects: Box::new(late_tables.chain(attached).chain(positions)),
    };
    Stages {
        definitions,
        sequences,
        tables,
        last,
    }
}

/// The migrated tables (positions in `schema.tables`) that use another migrated table's objects
/// at their creation: a column of its row type (or an array of it), or a default taking values
/// from its identity sequence (created with it); each after the ones among them it uses. A
/// table cannot use its own row type, nor be used by a table it uses (PostgreSQL refuses a
/// composite that contains itself), so the order exists.
fn typed_on_other_tables(plan: &Plan, schema: &SourceSchema) -> Vec<usize> {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    let uses_row_types = |t: &Table| {
        t.columns
            .iter()
            .any(|c| c.more().row_type_of != 0 && c.more().row_type_of != t.oid)
    };
    // Identity sequences whose values another table's default takes.
    let shared_identities: Vec<_> = schema
        .sequences
        .iter()
        .filter(|s| s.identity)
        .filter_map(|s| {
            let (owner, _) = s.owned_by.as_ref()?;
            let owner = QualName::new(s.schema.clone(), owner.clone());
            let users: Vec<&QualName> = s
                .used_by
                .iter()
                .map(|(user, _)| user)
                .filter(|user| **user != owner)
                .collect();
            (!users.is_empty()).then_some((owner, users))
        })
        .collect();
    if shared_identities.is_empty() && !schema.tables.iter().any(uses_row_types) {
        return Vec::new();
    }
    let migrated: HashMap<crate::catalog::Oid, usize> = schema
        .tables
        .iter()
        .enumerate()
        .filter(|(_, t)| plan.table(&t.qualname()).is_some())
        .map(|(i, t)| (t.oid, i))
        .collect();
    let position = |name: &QualName| {
        schema
            .table(name)
            .and_then(|t| migrated.get(&t.oid).copied())
    };
    let mut identity_owners: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for (owner, users) in &shared_identities {
        if let Some(owner) = position(owner) {
            for user in users.iter().filter_map(|u| position(u)) {
                identity_owners.entry(user).or_default().insert(owner);
            }
        }
    }
    let uses = |i: usize| -> BTreeSet<usize> {
        let t = &schema.tables[i];
        t.columns
            .iter()
            .filter_map(|c| migrated.get(&c.more().row_type_of).copied())
            .chain(identity_owners.get(&i).into_iter().flatten().copied())
            .filter(|j| *j != i)
            .collect()
    };
    let late: BTreeSet<usize> = migrated
        .values()
        .copied()
        .filter(|i| !uses(*i).is_empty())
        .collect();
    // Depth first, each table after the late tables it uses.
    let mut order = Vec::with_capacity(late.len());
    let (mut placed, mut visiting) = (BTreeSet::new(), BTreeSet::new());
    for &root in &late {
        let mut stack = vec![(root, false)];
        while let Some((i, expanded)) = stack.pop() {
            // (A table met again while its own uses are being placed would be a cycle: it
            // goes where it was first met.)
            if placed.contains(&i) || (!expanded && !visiting.insert(i)) {
                continue;
            }
            if expanded {
                placed.insert(i);
                order.push(i);
                continue;
            }
            stack.push((i, true));
            for j in uses(i).into_iter().filter(|j| late.contains(j)) {
                if !placed.contains(&j) {
                    stack.push((j, false));
                }
            }
        }
    }
    order
}
