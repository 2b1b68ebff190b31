//! The JSON walker every section of the service config is read with: a
//! value and its path, so each error names the field, and the notes about
//! what was read but not applied.

use std::cell::RefCell;
use std::time::Duration;

use serde_json::{Map, Value};
use tonic::Code;

use crate::Error;

pub(crate) fn invalid(path: &str, what: impl std::fmt::Display) -> Error {
    Error::invalid_config(format!("service config: {path} {what}"))
}

/// A JSON value with its path, for errors, and where notes about what
/// is not applied go.
pub(crate) struct Field<'a> {
    pub(crate) path: String,
    pub(crate) value: &'a Value,
    pub(crate) notes: &'a RefCell<Vec<String>>,
}

impl<'a> Field<'a> {
    pub(crate) fn root(value: &'a Value, notes: &'a RefCell<Vec<String>>) -> Self {
        Self {
            path: "the service config".to_owned(),
            value,
            notes,
        }
    }

    pub(crate) fn child(&self, key: &str, value: &'a Value) -> Self {
        let path = if self.path == "the service config" {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        };
        Self {
            path,
            value,
            notes: self.notes,
        }
    }

    /// Notes each key of `object` that is not one of `keys`: ignored, as
    /// gRFC A2 says, but named.
    pub(crate) fn known(&self, object: &Map<String, Value>, keys: &[&str]) {
        for key in object.keys().filter(|k| !keys.contains(&k.as_str())) {
            let path = self.child(key, &Value::Null).path;
            self.note(format!(
                "{path} is not a field healthlb knows, and is ignored (known here: {})",
                keys.join(", ")
            ));
        }
    }

    pub(crate) fn note(&self, note: impl Into<String>) {
        self.notes.borrow_mut().push(note.into());
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        }
    }

    pub(crate) fn wrong(&self, wanted: &str) -> Error {
        invalid(&self.path, format!("must be {wanted}, not {}", self.kind()))
    }

    pub(crate) fn object(&self) -> Result<&'a Map<String, Value>, Error> {
        self.value
            .as_object()
            .ok_or_else(|| self.wrong("an object"))
    }

    pub(crate) fn array(&self) -> Result<Vec<Field<'a>>, Error> {
        let list = self.value.as_array().ok_or_else(|| self.wrong("a list"))?;
        Ok(list
            .iter()
            .enumerate()
            .map(|(i, value)| Field {
                path: format!("{}[{i}]", self.path),
                value,
                notes: self.notes,
            })
            .collect())
    }

    pub(crate) fn string(&self) -> Result<&'a str, Error> {
        self.value.as_str().ok_or_else(|| self.wrong("a string"))
    }

    pub(crate) fn boolean(&self) -> Result<bool, Error> {
        self.value
            .as_bool()
            .ok_or_else(|| self.wrong("true or false"))
    }

    pub(crate) fn number(&self) -> Result<f64, Error> {
        self.value.as_f64().ok_or_else(|| self.wrong("a number"))
    }

    /// A whole number from `min` to `max`.
    pub(crate) fn whole(&self, min: u64, max: u64) -> Result<u64, Error> {
        let n = self.number()?;
        if n.fract() != 0.0 || n < min as f64 || n > max as f64 {
            return Err(invalid(
                &self.path,
                format!("must be a whole number from {min} to {max}, got {n}"),
            ));
        }
        Ok(n as u64)
    }

    /// A whole number from `min` to `u32::MAX`.
    pub(crate) fn count(&self, min: u32) -> Result<u32, Error> {
        self.whole(u64::from(min), u64::from(u32::MAX))
            .map(|n| n as u32)
    }

    pub(crate) fn percent(&self) -> Result<u32, Error> {
        self.whole(0, 100).map(|n| n as u32)
    }

    /// A proto3 JSON duration: `"1.5s"`, at most 9 fractional digits.
    pub(crate) fn duration(&self) -> Result<Duration, Error> {
        let s = self.string()?;
        parse_duration(s).ok_or_else(|| {
            invalid(
                &self.path,
                format!("must be a duration such as \"1.5s\", got {s:?}"),
            )
        })
    }

    pub(crate) fn code(&self) -> Result<Code, Error> {
        match self.value {
            Value::Number(_) => self.whole(0, 16).map(|n| Code::from_i32(n as i32)),
            Value::String(s) => code_named(s).ok_or_else(|| {
                invalid(&self.path, format!("{s:?} is not a gRPC status code name"))
            }),
            _ => Err(self.wrong("a status code name")),
        }
    }

    pub(crate) fn codes(&self) -> Result<Vec<Code>, Error> {
        self.array()?.iter().map(Field::code).collect()
    }

    pub(crate) fn get(&self, object: &'a Map<String, Value>, key: &str) -> Option<Field<'a>> {
        object
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| self.child(key, v))
    }

    pub(crate) fn require(
        &self,
        object: &'a Map<String, Value>,
        key: &str,
    ) -> Result<Field<'a>, Error> {
        self.get(object, key)
            .ok_or_else(|| invalid(&format!("{}.{key}", self.path), "is required"))
    }
}

/// An entry's one key and its value.
pub(crate) fn single<'a>(entry: &Field<'a>) -> Result<(String, Field<'a>), Error> {
    let o = entry.object()?;
    if o.len() != 1 {
        return Err(invalid(
            &entry.path,
            format!("must hold exactly one policy, not {}", o.len()),
        ));
    }
    let (name, value) = o.iter().next().expect("one key");
    Ok((name.clone(), entry.child(name, value)))
}

pub(crate) fn positive(field: &Field<'_>) -> Result<Duration, Error> {
    let d = field.duration()?;
    if d.is_zero() {
        return Err(invalid(&field.path, "must be above zero"));
    }
    Ok(d)
}

pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let number = s.strip_suffix('s')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = whole.parse().ok()?;
    // proto3's Duration: at most 315,576,000,000 s.
    if secs > 315_576_000_000 {
        return None;
    }
    let nanos = format!("{fraction:0<9}").parse::<u32>().ok()?;
    Some(Duration::new(secs, nanos))
}

fn code_named(name: &str) -> Option<Code> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| Code::from_i32(i as i32))
}
