//! Type OIDs inside binary COPY data, for destinations older than PostgreSQL 14.
//!
//! Binary COPY carries the element type's OID in every array value and each field's type OID
//! in every composite value. A user-defined or extension type (an enum, a composite, PostGIS'
//! geometry) has different OIDs in the source and the destination. PostgreSQL 14 and later
//! ignore those OIDs on input; 13 refuses a value whose OIDs are not its own ("wrong element
//! type"). For a destination before 14 the agent writes the destination's OIDs into the data:
//! [`Relabel`] knows, per copied column, where OIDs sit in a value ([`Shape`]) and which ones
//! the destination has, and rewrites them in place as the rows go by.

use bytes::{Bytes, BytesMut};
use tokio_postgres::Client;

use crate::digest::BINARY_SIGNATURE;

/// Where type OIDs sit in one value of a type (with the destination's OIDs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// No OID inside.
    Scalar,
    /// An array: its element type's OID, and the elements' shape.
    Array { element: u32, shape: Box<Shape> },
    /// A composite: each field's type OID and shape.
    Composite(Vec<(u32, Shape)>),
}

impl Shape {
    fn has_oids(&self) -> bool {
        !matches!(self, Shape::Scalar)
    }
}

/// Deepest nesting of arrays and composites followed (deeper values are left as they are).
const MAX_DEPTH: usize = 16;

/// The shape of the destination's type `oid`.
async fn shape_of(client: &Client, oid: u32, depth: usize) -> Result<Shape, tokio_postgres::Error> {
    if depth > MAX_DEPTH {
        return Ok(Shape::Scalar);
    }
    let row = client
        .query_one(
            "SELECT t.typtype::text AS kind, t.typelem AS element, t.typlen AS len,
                    t.typrelid AS relid, t.typbasetype AS base
               FROM pg_catalog.pg_type t WHERE t.oid = $1",
            &[&oid],
        )
        .await?;
    let (kind, element, len, relid, base): (String, u32, i16, u32, u32) = (
        row.get("kind"),
        row.get("element"),
        row.get("len"),
        row.get("relid"),
        row.get("base"),
    );
    if kind == "d" {
        return Box::pin(shape_of(client, base, depth + 1)).await;
    }
    if element != 0 && len == -1 {
        let shape = Box::pin(shape_of(client, element, depth + 1)).await?;
        return Ok(Shape::Array {
            element,
            shape: Box::new(shape),
        });
    }
    if kind == "c" {
        let mut fields = Vec::new();
        for r in client
            .query(
                "SELECT atttypid AS oid FROM pg_catalog.pg_attribute
                  WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&relid],
            )
            .await?
        {
            let field: u32 = r.get("oid");
            fields.push((field, Box::pin(shape_of(client, field, depth + 1)).await?));
        }
        return Ok(Shape::Composite(fields));
    }
    Ok(Shape::Scalar)
}

/// The rewriting of one table's COPY data for the destination.
#[derive(Debug, Clone)]
pub struct Relabel {
    /// Per copied column, in COPY order.
    columns: Vec<Shape>,
}

impl Relabel {
    /// What `table`'s `columns` need on a destination of `server_version`: `None` when nothing
    /// (PostgreSQL 14 and later, or no array or composite column).
    pub async fn for_destination(
        client: &Client,
        server_version: i32,
        table: &str,
        columns: &[String],
    ) -> Result<Option<Relabel>, tokio_postgres::Error> {
        if server_version >= 140000 {
            return Ok(None);
        }
        let rows = client
            .query(
                "SELECT a.attname::text AS name, a.atttypid AS oid FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table],
            )
            .await?;
        let mut shapes = Vec::with_capacity(columns.len());
        for c in columns {
            let oid = rows
                .iter()
                .find(|r| r.get::<_, &str>("name") == c)
                .map(|r| r.get::<_, u32>("oid"))
                .unwrap_or(0);
            shapes.push(if oid == 0 {
                Shape::Scalar
            } else {
                shape_of(client, oid, 0).await?
            });
        }
        Ok(shapes
            .iter()
            .any(Shape::has_oids)
            .then_some(Relabel { columns: shapes }))
    }

    /// `data` (whole rows of a binary COPY stream, the header before the first) with the
    /// destination's OIDs; an error names what does not parse.
    pub fn apply(&self, data: Bytes) -> Result<Bytes, String> {
        let mut buf = BytesMut::from(&data[..]);
        let mut at = 0;
        if buf.starts_with(BINARY_SIGNATURE) {
            let ext = read_i32(&buf, BINARY_SIGNATURE.len() + 4)?;
            at = BINARY_SIGNATURE.len() + 8 + usize::try_from(ext).map_err(|_| "header")?;
        }
        while at < buf.len() {
            let fields = read_i16(&buf, at)?;
            at += 2;
            if fields == -1 {
                break;
            }
            for i in 0..usize::try_from(fields).map_err(|_| "field count")? {
                let len = read_i32(&buf, at)?;
                at += 4;
                if len < 0 {
                    continue;
                }
                let len = len as usize;
                let end = at
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or("field length")?;
                if let Some(shape) = self.columns.get(i).filter(|s| s.has_oids()) {
                    patch(&mut buf[at..end], shape, 0)?;
                }
                at = end;
            }
        }
        Ok(buf.freeze())
    }
}

fn read_i16(b: &[u8], at: usize) -> Result<i16, String> {
    b.get(at..at + 2)
        .map(|s| i16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| "a row is cut short".to_string())
}

fn read_i32(b: &[u8], at: usize) -> Result<i32, String> {
    b.get(at..at + 4)
        .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| "a value is cut short".to_string())
}

fn put_oid(b: &mut [u8], at: usize, oid: u32) -> Result<(), String> {
    b.get_mut(at..at + 4)
        .ok_or_else(|| "a value is cut short".to_string())?
        .copy_from_slice(&oid.to_be_bytes());
    Ok(())
}

/// Writes the OIDs of `shape` into one value.
fn patch(v: &mut [u8], shape: &Shape, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    match shape {
        Shape::Scalar => Ok(()),
        Shape::Array { element, shape } => {
            let dims = read_i32(v, 0)?;
            put_oid(v, 8, *element)?;
            let dims = usize::try_from(dims).map_err(|_| "array dimensions")?;
            let mut count: usize = if dims == 0 { 0 } else { 1 };
            for d in 0..dims {
                let n = read_i32(v, 12 + d * 8)?;
                count = count
                    .checked_mul(usize::try_from(n).map_err(|_| "array size")?)
                    .ok_or("array size")?;
            }
            let mut at = 12 + dims * 8;
            for _ in 0..count {
                let len = read_i32(v, at)?;
                at += 4;
                if len < 0 {
                    continue;
                }
                let end = at + len as usize;
                let value = v.get_mut(at..end).ok_or("array element")?;
                patch(value, shape, depth + 1)?;
                at = end;
            }
            Ok(())
        }
        Shape::Composite(fields) => {
            let n = read_i32(v, 0)?;
            let mut at = 4;
            for i in 0..usize::try_from(n).map_err(|_| "field count")? {
                let (oid, shape) = fields.get(i).ok_or("more fields than the type has")?;
                put_oid(v, at, *oid)?;
                let len = read_i32(v, at + 4)?;
                at += 8;
                if len < 0 {
                    continue;
                }
                let end = at + len as usize;
                let value = v.get_mut(at..end).ok_or("composite field")?;
                patch(value, shape, depth + 1)?;
                at = end;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int4(v: i32) -> Vec<u8> {
        let mut out = 4i32.to_be_bytes().to_vec();
        out.extend(v.to_be_bytes());
        out
    }

    /// A one-dimensional array of int4 values with element OID `oid`.
    fn array(oid: u32, values: &[i32]) -> Vec<u8> {
        let mut v = 1i32.to_be_bytes().to_vec();
        v.extend(0i32.to_be_bytes());
        v.extend(oid.to_be_bytes());
        v.extend((values.len() as i32).to_be_bytes());
        v.extend(1i32.to_be_bytes());
        for x in values {
            v.extend(int4(*x));
        }
        v
    }

    #[test]
    fn element_and_field_oids_are_rewritten_and_nothing_else() {
        let arr = array(99_001, &[1, 2]);
        let mut composite = 2i32.to_be_bytes().to_vec();
        composite.extend(99_002u32.to_be_bytes());
        composite.extend((arr.len() as i32).to_be_bytes());
        composite.extend(&arr);
        composite.extend(23u32.to_be_bytes());
        composite.extend(int4(7));
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend(0i32.to_be_bytes());
        data.extend(0i32.to_be_bytes());
        for _ in 0..2 {
            data.extend(3i16.to_be_bytes());
            data.extend(int4(42));
            data.extend((arr.len() as i32).to_be_bytes());
            data.extend(&arr);
            data.extend((composite.len() as i32).to_be_bytes());
            data.extend(&composite);
        }
        data.extend((-1i16).to_be_bytes());
        let array_shape = Shape::Array {
            element: 5_001,
            shape: Box::new(Shape::Scalar),
        };
        let relabel = Relabel {
            columns: vec![
                Shape::Scalar,
                array_shape.clone(),
                Shape::Composite(vec![(5_002, array_shape), (23, Shape::Scalar)]),
            ],
        };
        let out = relabel.apply(Bytes::from(data.clone())).expect("parses");
        let expected = data
            .windows(4)
            .filter(|w| *w == 99_001u32.to_be_bytes())
            .count();
        assert_eq!(expected, 4, "two arrays per row, one inside the composite");
        let after = |oid: u32| out.windows(4).filter(|w| *w == oid.to_be_bytes()).count();
        assert_eq!(after(99_001), 0);
        assert_eq!(after(99_002), 0);
        assert_eq!(after(5_001), 4);
        assert_eq!(after(5_002), 2);
        assert_eq!(out.len(), data.len());
        // A truncated row is an error, not a panic.
        assert!(relabel.apply(Bytes::from(data[..40].to_vec())).is_err());
    }
}
