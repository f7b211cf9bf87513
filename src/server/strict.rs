//! Request bodies read as exactly as `docs/openapi.yaml` describes them.
//!
//! serde's derived structs also take their fields as a JSON array in declaration order (`[null, null]` for a
//! token request): no client means that, the document does not allow it, and a fuzzer rightly calls it a bug.
//! This reader walks a parsed [`Value`] like `serde_json`'s own, except that a struct must be an object, at any
//! depth. Errors name the field's path (`events[0].body.kind: unknown variant ...`).

use serde::de::value::{MapDeserializer, SeqDeserializer, StringDeserializer};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};
use serde_json::Value;

/// A body that does not fit its type: where, and what is wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", if path == "." { String::new() } else { format!("{path}: ") })]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(Strict(v)).map_err(|e| FieldError {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

struct Strict(Value);

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl<'de> IntoDeserializer<'de, serde_json::Error> for Strict {
    type Deserializer = Strict;

    fn into_deserializer(self) -> Strict {
        self
    }
}

impl<'de> de::Deserializer<'de> for Strict {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(Strict));
                let v = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(v)
            }
            Value::Object(map) => {
                // Scalars first: an adjacently tagged enum (`{"kind": ..., "data": ...}`) that meets its content
                // before its tag buffers the content, and reads it back with serde's lax reader, out of our
                // hands. `Value` keeps keys sorted, so "data" would always come before "kind".
                let (scalars, nested): (Vec<_>, Vec<_>) = map
                    .into_iter()
                    .partition(|(_, v)| !v.is_object() && !v.is_array());
                let mut m = MapDeserializer::new(
                    scalars
                        .into_iter()
                        .chain(nested)
                        .map(|(k, v)| (k, Strict(v))),
                );
                let v = visitor.visit_map(&mut m)?;
                m.end()?;
                Ok(v)
            }
            scalar => scalar.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        if self.0.is_object() {
            self.deserialize_any(visitor)
        } else {
            Err(de::Error::invalid_type(unexpected(&self.0), &visitor))
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::String(s) => {
                let d: StringDeserializer<serde_json::Error> = s.into_deserializer();
                visitor.visit_enum(d)
            }
            Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
                Some((variant, value)) => visitor.visit_enum(Enum { variant, value }),
                None => Err(de::Error::invalid_length(0, &visitor)),
            },
            other => Err(de::Error::invalid_type(unexpected(&other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    /// Field and variant names are strings. serde's own identifiers also take a variant's index
    /// (`"policy": 0` for the first policy), which the document does not allow.
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0 {
            Value::String(s) => visitor.visit_string(s),
            other => Err(de::Error::invalid_type(unexpected(&other), &visitor)),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit unit_struct
        seq tuple tuple_struct map
    }
}

/// An externally tagged variant: `{"variant": value}`.
struct Enum {
    variant: String,
    value: Value,
}

impl<'de> de::EnumAccess<'de> for Enum {
    type Error = serde_json::Error;
    type Variant = Strict;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Strict), Self::Error> {
        let name: StringDeserializer<serde_json::Error> = self.variant.into_deserializer();
        Ok((seed.deserialize(name)?, Strict(self.value)))
    }
}

impl<'de> de::VariantAccess<'de> for Strict {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        match self.0 {
            Value::Null => Ok(()),
            other => Err(de::Error::invalid_type(
                unexpected(&other),
                &"a variant without a value",
            )),
        }
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, Self::Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: Option<u32>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        inner: Inner,
        list: Vec<Inner>,
        kind: Kind,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Kind {
        Plain,
        With { n: u8 },
    }

    #[test]
    fn structs_must_be_objects_at_any_depth_and_errors_name_the_path() {
        let good: Outer =
            from_value(json!({"inner": {"a": 1}, "list": [{"a": null}], "kind": "plain"})).unwrap();
        assert_eq!(good.list, [Inner { a: None }]);
        let with: Outer =
            from_value(json!({"inner": {"a": 1}, "list": [], "kind": {"with": {"n": 2}}})).unwrap();
        assert_eq!(with.kind, Kind::With { n: 2 });
        // serde_json itself takes all of these.
        for (bad, path) in [
            (json!([{"a": 1}, [], "plain"]), "."),
            (json!({"inner": [1], "list": [], "kind": "plain"}), "inner"),
            (
                json!({"inner": {"a": 1}, "list": [[null]], "kind": "plain"}),
                "list[0]",
            ),
        ] {
            assert!(
                serde_json::from_value::<Outer>(bad.clone()).is_ok(),
                "{bad}"
            );
            let e = from_value::<Outer>(bad).unwrap_err();
            assert_eq!(e.path, path, "{e}");
            assert!(e.message.contains("invalid type: sequence"), "{e}");
        }
        #[derive(Debug, Deserialize)]
        #[serde(tag = "policy", rename_all = "kebab-case")]
        enum Tagged {
            No,
            OnFailure,
        }
        let e = from_value::<Tagged>(json!({"policy": 1})).unwrap_err();
        assert!(e.message.contains("invalid type: integer `1`"), "{e}");
        assert!(matches!(
            from_value::<Tagged>(json!({"policy": "on-failure"})),
            Ok(Tagged::OnFailure)
        ));
        assert!(matches!(
            from_value::<Tagged>(json!({"policy": "no"})),
            Ok(Tagged::No)
        ));
        #[derive(Debug, Deserialize)]
        #[serde(tag = "kind", content = "data", rename_all = "kebab-case")]
        enum Adjacent {
            Update(Tagged),
        }
        assert!(matches!(
            from_value::<Adjacent>(json!({"kind": "update", "data": {"policy": "no"}})),
            Ok(Adjacent::Update(Tagged::No))
        ));
        let e =
            from_value::<Adjacent>(json!({"kind": "update", "data": {"policy": 0}})).unwrap_err();
        assert!(e.message.contains("invalid type: integer `0`"), "{e}");
        let e = from_value::<Outer>(json!({"inner": {"a": "x"}, "list": [], "kind": "plain"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "inner.a: invalid type: string \"x\", expected u32"
        );
    }
}
