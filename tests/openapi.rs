//! `docs/openapi.yaml` against the server: the same routes both ways, and schemas that match the serde types.
//!
//! The schemas are checked against values, not against a second hand-written list: a sample of each Rust type is
//! serialized and walked through its schema (following `$ref`, `allOf`, and `oneOf` by discriminator or by the one
//! alternative that fits), and at every object the schema's property names must be the serialized keys exactly.
//! Then each property is taken out of the sample, and set to null, and an unknown one added, and the result given
//! back to serde: the property must be in `required` exactly when serde refuses it missing, `nullable` exactly when
//! serde takes null, and `additionalProperties: false` exactly when serde refuses the unknown field. Every schema of
//! the document must be reached by some sample. A renamed field, a new `Option`, a dropped `deny_unknown_fields`
//! or a new route fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use flotilla::app::{
    HealthCheck, Network, Probe, RestartPolicy, RunSettings, SeccompMode, UsernsMode, Volume,
    VolumeSource,
};
use flotilla::fleet::{
    Accepted, AppStatus, Desired, DesiredApp, EnrollRequest, Enrolled, Event, EventBody, Metrics,
    PlatformReport, ReportBatch,
};
use flotilla::server::api::{self, ErrorBody};
use flotilla::server::views::{
    AppRequest, AppView, DeviceApp, DeviceView, Incompatible, ReleaseRequest, ReleaseView,
    RolloutRequest, RolloutView, StateView, TagsRequest, TokenCreated, TokenRequest, TokenView,
    WaveView,
};
use flotilla::update::{FailureCause, Report};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

const DOC: &str = include_str!("../docs/openapi.yaml");

/// A strict reader of the YAML subset the document is written in, into JSON values whose scalars are all strings.
///
/// - Lines: two-space indentation steps, no tabs. Blank lines and whole-line `#` comments are skipped; there are
///   no trailing comments.
/// - A block mapping is `key: value` or `key:` with its value on the following, deeper-indented lines. A block
///   sequence is `- item` lines at one indentation; an item that is `key: ...` opens a mapping whose other keys
///   sit two columns right of the dash.
/// - A value on the key's line is a flow collection (`[a, b]`, `{k: v}`, nested, on that one line), a quoted
///   scalar (`'...'` with `''` for a quote, or `"..."` with `\"` and `\\`), a plain scalar (no `: `, ` #`, and no
///   leading indicator character, as YAML requires), or `>` / `|`: a block scalar, read as the deeper lines after
///   it joined by a space or a newline (only descriptions use them, so chomping and blank lines do not matter).
///
/// Anything else (a duplicate key, a stray indentation, an anchor) panics with the line number, so the document
/// stays in the subset real YAML parsers read the same way.
mod yaml {
    use serde_json::{Map, Value};

    struct Line {
        no: usize,
        indent: usize,
        text: String,
    }

    pub fn parse(src: &str) -> Value {
        let mut lines = Vec::new();
        for (i, raw) in src.lines().enumerate() {
            assert!(!raw.contains('\t'), "line {}: a tab", i + 1);
            let text = raw.trim_end();
            let body = text.trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let indent = text.len() - body.len();
            assert!(indent % 2 == 0, "line {}: odd indentation", i + 1);
            lines.push(Line {
                no: i + 1,
                indent,
                text: body.to_string(),
            });
        }
        let mut at = 0;
        let doc = block(&mut lines, &mut at, 0);
        assert_eq!(
            at,
            lines.len(),
            "line {}: stray indentation",
            lines[at.min(lines.len() - 1)].no
        );
        doc
    }

    fn block(lines: &mut [Line], at: &mut usize, indent: usize) -> Value {
        if lines[*at].text == "-" || lines[*at].text.starts_with("- ") {
            sequence(lines, at, indent)
        } else {
            mapping(lines, at, indent)
        }
    }

    fn sequence(lines: &mut [Line], at: &mut usize, indent: usize) -> Value {
        let mut items = Vec::new();
        while *at < lines.len() && lines[*at].indent == indent {
            let no = lines[*at].no;
            let Some(rest) = lines[*at].text.strip_prefix("- ") else {
                panic!("line {no}: a sequence item must start with `- `");
            };
            let rest = rest.to_string();
            if split_key(&rest, no).is_some() {
                // `- key: value`: a mapping whose first line is the rest of this one, two columns right.
                lines[*at].indent = indent + 2;
                lines[*at].text = rest;
                items.push(mapping(lines, at, indent + 2));
            } else {
                *at += 1;
                items.push(inline(&rest, no));
            }
        }
        end_of_block(lines, *at, indent);
        Value::Array(items)
    }

    fn mapping(lines: &mut [Line], at: &mut usize, indent: usize) -> Value {
        let mut map = Map::new();
        while *at < lines.len() && lines[*at].indent == indent {
            let (no, text) = (lines[*at].no, lines[*at].text.clone());
            let Some((key, rest)) = split_key(&text, no) else {
                panic!("line {no}: expected `key: value`, found {text:?}");
            };
            *at += 1;
            let value = match rest.as_str() {
                "" => {
                    assert!(
                        *at < lines.len() && lines[*at].indent > indent,
                        "line {no}: `{key}:` has no value"
                    );
                    let deeper = lines[*at].indent;
                    block(lines, at, deeper)
                }
                ">" | "|" => {
                    let mut parts = Vec::new();
                    while *at < lines.len() && lines[*at].indent > indent {
                        parts.push(lines[*at].text.clone());
                        *at += 1;
                    }
                    assert!(!parts.is_empty(), "line {no}: an empty block scalar");
                    Value::String(parts.join(if rest == ">" { " " } else { "\n" }))
                }
                _ => inline(&rest, no),
            };
            assert!(
                map.insert(key.clone(), value).is_none(),
                "line {no}: `{key}` twice"
            );
        }
        end_of_block(lines, *at, indent);
        Value::Object(map)
    }

    fn end_of_block(lines: &[Line], at: usize, indent: usize) {
        if let Some(next) = lines.get(at) {
            assert!(next.indent < indent, "line {}: stray indentation", next.no);
        }
    }

    /// `key: rest` or `key:`; `None` when the line is not a mapping entry.
    fn split_key(text: &str, no: usize) -> Option<(String, String)> {
        if text.starts_with(['[', '{']) {
            return None;
        }
        if text.starts_with(['\'', '"']) {
            let mut chars = text.char_indices().peekable();
            let (key, end) = quoted(&mut chars, no);
            let rest = &text[end..];
            return rest
                .strip_prefix(':')
                .filter(|r| r.is_empty() || r.starts_with(' '))
                .map(|r| (key, r.trim().to_string()));
        }
        let (key, rest) = match text.find(": ") {
            Some(i) => (&text[..i], text[i + 2..].trim()),
            None => (text.strip_suffix(':')?, ""),
        };
        Some((plain(key, no), rest.to_string()))
    }

    fn plain(s: &str, no: usize) -> String {
        assert!(
            !s.is_empty()
                && !s.contains(": ")
                && !s.contains(" #")
                && !s.starts_with([
                    '&', '*', '!', '|', '>', '%', '@', '`', '\'', '"', '-', '?', ','
                ]),
            "line {no}: {s:?} needs quotes"
        );
        s.to_string()
    }

    /// A scalar or flow collection filling `text`.
    fn inline(text: &str, no: usize) -> Value {
        let mut chars = text.char_indices().peekable();
        let v = flow(text, &mut chars, no, false);
        skip_spaces(&mut chars);
        assert!(
            chars.next().is_none(),
            "line {no}: trailing text in {text:?}"
        );
        v
    }

    type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

    fn skip_spaces(chars: &mut Chars) {
        while chars.next_if(|(_, c)| *c == ' ').is_some() {}
    }

    /// A value; inside a flow collection (`nested`) a plain scalar ends at `,`, `]`, `}` (and a key at `:`).
    fn flow(text: &str, chars: &mut Chars, no: usize, nested: bool) -> Value {
        skip_spaces(chars);
        match chars.peek().map(|(_, c)| *c) {
            Some('[') => {
                chars.next();
                let mut items = Vec::new();
                skip_spaces(chars);
                if chars.next_if(|(_, c)| *c == ']').is_some() {
                    return Value::Array(items);
                }
                loop {
                    items.push(flow(text, chars, no, true));
                    skip_spaces(chars);
                    match chars.next().map(|(_, c)| c) {
                        Some(',') => {}
                        Some(']') => return Value::Array(items),
                        other => panic!("line {no}: expected `,` or `]`, found {other:?}"),
                    }
                }
            }
            Some('{') => {
                chars.next();
                let mut map = Map::new();
                skip_spaces(chars);
                if chars.next_if(|(_, c)| *c == '}').is_some() {
                    return Value::Object(map);
                }
                loop {
                    skip_spaces(chars);
                    let key = match chars.peek().map(|(_, c)| *c) {
                        Some('\'' | '"') => quoted(chars, no).0,
                        _ => {
                            let start = chars.peek().map(|(i, _)| *i).unwrap_or(text.len());
                            while chars.next_if(|(_, c)| *c != ':').is_some() {}
                            let end = chars.peek().map(|(i, _)| *i).unwrap_or(text.len());
                            plain(text[start..end].trim(), no)
                        }
                    };
                    assert!(
                        chars.next().map(|(_, c)| c) == Some(':')
                            && chars.peek().map(|(_, c)| *c) == Some(' '),
                        "line {no}: expected `: ` after {key:?}"
                    );
                    let value = flow(text, chars, no, true);
                    assert!(
                        map.insert(key.clone(), value).is_none(),
                        "line {no}: `{key}` twice"
                    );
                    skip_spaces(chars);
                    match chars.next().map(|(_, c)| c) {
                        Some(',') => {}
                        Some('}') => return Value::Object(map),
                        other => panic!("line {no}: expected `,` or `}}`, found {other:?}"),
                    }
                }
            }
            Some('\'' | '"') => Value::String(quoted(chars, no).0),
            Some(_) => {
                let start = chars.peek().map(|(i, _)| *i).unwrap();
                while chars
                    .next_if(|(_, c)| !(nested && matches!(c, ',' | ']' | '}')))
                    .is_some()
                {}
                let end = chars.peek().map(|(i, _)| *i).unwrap_or(text.len());
                Value::String(plain(text[start..end].trim_end(), no))
            }
            None => panic!("line {no}: a value is missing"),
        }
    }

    /// A quoted scalar starting at the next character; its text and the index just past it.
    fn quoted(chars: &mut Chars, no: usize) -> (String, usize) {
        let (_, quote) = chars.next().unwrap();
        let mut out = String::new();
        loop {
            match chars.next() {
                None => panic!("line {no}: an unterminated quote"),
                Some((i, c)) if c == quote => {
                    if quote == '\'' && chars.next_if(|(_, c)| *c == '\'').is_some() {
                        out.push('\'');
                    } else {
                        return (out, i + 1);
                    }
                }
                Some((_, '\\')) if quote == '"' => match chars.next().map(|(_, c)| c) {
                    Some(c @ ('"' | '\\')) => out.push(c),
                    other => panic!("line {no}: an escape this reader does not know: {other:?}"),
                },
                Some((_, c)) => out.push(c),
            }
        }
    }
}

fn doc() -> Value {
    yaml::parse(DOC)
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// Every (method, path, operation) of the document.
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (key, op) in item.as_object().expect("a path item") {
            if METHODS.contains(&key.as_str()) {
                out.push((key.to_uppercase(), path.clone(), op));
            } else {
                assert!(
                    matches!(key.as_str(), "parameters" | "summary" | "description"),
                    "{path}: {key} is neither an operation nor a path item field"
                );
            }
        }
    }
    out
}

#[test]
fn the_document_has_exactly_the_routes_the_router_serves() {
    let doc = doc();
    let documented: BTreeSet<String> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| format!("{method} {path}"))
        .collect();
    let served: BTreeSet<String> = api::ROUTES.iter().map(|r| r.to_string()).collect();
    assert_eq!(served.len(), api::ROUTES.len(), "ROUTES repeats a route");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && unserved.is_empty(),
        "served but not documented: {undocumented:?}; documented but not served: {unserved:?}"
    );
}

/// `#/components/<kind>/<name>` → its value.
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("{reference}: not a local reference"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("{reference} does not resolve"))
}

fn follow<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(doc, r),
        None => v,
    }
}

fn walk_refs(doc: &Value, v: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref") {
                resolve(doc, r.as_str().expect("a string $ref"));
            }
            m.values().for_each(|x| walk_refs(doc, x));
        }
        Value::Array(a) => a.iter().for_each(|x| walk_refs(doc, x)),
        _ => {}
    }
}

#[test]
fn operations_say_who_may_call_them_and_how_they_refuse() {
    let doc = doc();
    walk_refs(&doc, &doc);
    let schemes: BTreeSet<&String> = doc["components"]["securitySchemes"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    for scheme in &schemes {
        let s = &doc["components"]["securitySchemes"][scheme.as_str()];
        assert_eq!(
            (&s["type"], &s["scheme"]),
            (&json!("http"), &json!("bearer")),
            "{scheme}"
        );
    }
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let route = format!("{method} {path}");
        assert!(
            ids.insert(op["operationId"].as_str().expect("an operationId")),
            "{route}"
        );
        // Who calls what is the router's rule: the device routes, enrollment, and the operator's routes.
        let expected = if path == "/v1/enroll" {
            "enrollmentToken"
        } else if path.starts_with("/v1/device/") {
            "deviceCredential"
        } else {
            "adminToken"
        };
        assert_eq!(op["security"], json!([{expected: []}]), "{route}");

        // Path parameters: declared exactly for the path's `{...}` segments.
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| follow(&doc, p))
            .filter(|p| p["in"] == "path")
            .map(|p| {
                assert_eq!(p["required"], "true", "{route}");
                p["name"].as_str().unwrap()
            })
            .collect();
        assert_eq!(in_path, declared, "{route}");

        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.contains_key("401"),
            "{route}: every route checks a credential"
        );
        let body = op.get("requestBody").is_some();
        for code in ["413", "415", "422"] {
            assert_eq!(
                responses.contains_key(code),
                body,
                "{route} {code}: only with a JSON body"
            );
        }
        assert!(
            responses.keys().any(|c| c.starts_with('2')),
            "{route}: a success"
        );
        for (code, response) in responses {
            let response = follow(&doc, response);
            assert!(response["description"].is_string(), "{route} {code}");
            if code.starts_with('4') {
                assert_eq!(
                    response["content"]["application/json"]["schema"],
                    json!({"$ref": "#/components/schemas/Error"}),
                    "{route} {code}: refusals are {{\"error\"}}"
                );
            }
        }
        if let Some(b) = op.get("requestBody") {
            assert_eq!(b["required"], "true", "{route}");
            assert!(
                b["content"]["application/json"]["schema"]["$ref"].is_string(),
                "{route}"
            );
        }
    }
    let desired = &doc["paths"]["/v1/device/desired"]["get"]["responses"];
    assert!(desired["200"]["headers"]["ETag"].is_object());
    assert!(desired["304"]["headers"]["ETag"].is_object());
    assert!(desired["304"].get("content").is_none(), "304 has no body");
}

/// Walks one sample through the document; see the module comment.
struct Check<'a> {
    doc: &'a Value,
    /// The whole sample, and serde's verdict on a changed copy of it; `None` for a response built by hand.
    sample: &'a Value,
    accepts: Option<&'a dyn Fn(&Value) -> bool>,
    reached: BTreeSet<String>,
}

/// A JSON pointer's reference token.
fn token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

impl Check<'_> {
    fn value(&mut self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let doc = self.doc;
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("a schema reference");
            self.reached.insert(name.to_string());
            return self.value(resolve(doc, r), v, at);
        }
        if v.is_null() {
            return if schema["nullable"] == "true" {
                Ok(())
            } else {
                Err(format!(
                    "{at}: null where the document has no `nullable: true`"
                ))
            };
        }
        if let Some(all) = schema.get("allOf") {
            for s in all.as_array().unwrap() {
                self.value(s, v, at)?;
            }
            return Ok(());
        }
        if let Some(one) = schema.get("oneOf") {
            let one = one.as_array().unwrap();
            if let Some(d) = schema.get("discriminator") {
                let property = d["propertyName"].as_str().unwrap();
                let tag = v[property]
                    .as_str()
                    .ok_or_else(|| format!("{at}: no `{property}` to pick an alternative by"))?;
                let target = d["mapping"][tag]
                    .as_str()
                    .ok_or_else(|| format!("{at}: `{property}: {tag}` is not in the mapping"))?;
                assert!(
                    one.contains(&json!({"$ref": target})),
                    "{target} is not one of oneOf"
                );
                return self.value(&json!({"$ref": target}), v, at);
            }
            let mut fits = Vec::new();
            for s in one {
                let mut trial = Check {
                    doc,
                    sample: self.sample,
                    accepts: self.accepts,
                    reached: BTreeSet::new(),
                };
                if trial.value(s, v, at).is_ok() {
                    fits.push(trial.reached);
                }
            }
            return match fits.len() {
                1 => {
                    self.reached.extend(fits.pop().unwrap());
                    Ok(())
                }
                n => Err(format!("{at}: {n} alternatives of oneOf fit {v}")),
            };
        }
        let kind = schema["type"]
            .as_str()
            .ok_or_else(|| format!("{at}: a schema without type"))?;
        match kind {
            "object" => self.object(schema, v, at),
            "array" => {
                let items = v
                    .as_array()
                    .ok_or_else(|| format!("{at}: {v} is not an array"))?;
                let bound = |b: &str| schema[b].as_str().map(|n| n.parse::<usize>().unwrap());
                if bound("minItems").is_some_and(|n| items.len() < n)
                    || bound("maxItems").is_some_and(|n| items.len() > n)
                {
                    return Err(format!(
                        "{at}: {} items, out of the schema's bounds",
                        items.len()
                    ));
                }
                for (i, x) in items.iter().enumerate() {
                    self.value(&schema["items"], x, &format!("{at}/{i}"))?;
                }
                Ok(())
            }
            "string" => {
                let s = v
                    .as_str()
                    .ok_or_else(|| format!("{at}: {v} is not a string"))?;
                match schema.get("enum") {
                    Some(e) if !e.as_array().unwrap().contains(&json!(s)) => {
                        Err(format!("{at}: {s:?} is not in {e}"))
                    }
                    _ => Ok(()),
                }
            }
            "integer" if v.is_u64() || v.is_i64() => Ok(()),
            "number" if v.is_number() => Ok(()),
            "boolean" if v.is_boolean() => Ok(()),
            _ => Err(format!("{at}: {v} is not {kind}")),
        }
    }

    fn object(&mut self, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
        let object = v
            .as_object()
            .ok_or_else(|| format!("{at}: {v} is not an object"))?;
        let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
            // A map: every value fits `additionalProperties`, or the value schema of its one `patternProperties`
            // entry (whose pattern the keys match: tag names), with `additionalProperties: false`.
            let values = match schema.get("patternProperties").and_then(Value::as_object) {
                Some(patterns) => {
                    assert_eq!(patterns.len(), 1, "{at}: one key pattern");
                    assert_eq!(schema["additionalProperties"], "false", "{at}");
                    patterns.values().next().unwrap()
                }
                None => &schema["additionalProperties"],
            };
            assert!(
                values.is_object(),
                "{at}: an object schema with neither properties nor value schema"
            );
            for (k, x) in object {
                self.value(values, x, &format!("{at}/{}", token(k)))?;
            }
            return Ok(());
        };
        let documented: BTreeSet<&String> = properties.keys().collect();
        let serialized: BTreeSet<&String> = object.keys().collect();
        if documented != serialized {
            return Err(format!(
                "{at}: the document has {documented:?}, serde writes {serialized:?}"
            ));
        }
        for (k, s) in properties {
            self.value(s, &object[k], &format!("{at}/{}", token(k)))?;
        }
        let Some(accepts) = self.accepts else {
            return Ok(());
        };
        let required: BTreeSet<&str> = schema["required"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r.as_str().unwrap())
            .collect();
        let changed = |f: &dyn Fn(&mut Map<String, Value>)| {
            let mut copy = self.sample.clone();
            f(copy.pointer_mut(at).unwrap().as_object_mut().unwrap());
            accepts(&copy)
        };
        for (k, s) in properties {
            let doc_required = required.contains(k.as_str());
            if changed(&|o| {
                o.remove(k);
            }) == doc_required
            {
                return Err(format!(
                    "{at}/{k}: the document has it {}required, serde {} it missing",
                    if doc_required { "" } else { "not " },
                    if doc_required { "takes" } else { "refuses" },
                ));
            }
            let nullable = s["nullable"] == "true";
            if changed(&|o| {
                o.insert(k.clone(), Value::Null);
            }) != nullable
            {
                return Err(format!(
                    "{at}/{k}: the document has it {}nullable, serde {} null",
                    if nullable { "" } else { "not " },
                    if nullable { "refuses" } else { "takes" },
                ));
            }
        }
        let closed = schema["additionalProperties"] == "false";
        if changed(&|o| {
            o.insert("unknown_field".into(), json!(1));
        }) == closed
        {
            return Err(format!(
                "{at}: the document {} unknown fields, serde {} them",
                if closed { "refuses" } else { "allows" },
                if closed { "takes" } else { "refuses" },
            ));
        }
        Ok(())
    }
}

/// Checks `sample` of `T` against the schema `name`; returns the schemas it reached.
fn check<T: Serialize + DeserializeOwned>(doc: &Value, name: &str, sample: &T) -> BTreeSet<String> {
    let v = serde_json::to_value(sample).unwrap();
    let accepts = |v: &Value| serde_json::from_value::<T>(v.clone()).is_ok();
    assert!(accepts(&v), "{name}: the sample does not read back");
    run(doc, name, &v, Some(&accepts))
}

fn run(
    doc: &Value,
    name: &str,
    v: &Value,
    accepts: Option<&dyn Fn(&Value) -> bool>,
) -> BTreeSet<String> {
    let mut c = Check {
        doc,
        sample: v,
        accepts,
        reached: BTreeSet::new(),
    };
    if let Err(e) = c.value(
        &json!({"$ref": format!("#/components/schemas/{name}")}),
        v,
        "",
    ) {
        panic!("{name}: {e}\nsample: {v}");
    }
    c.reached
}

fn platform() -> PlatformReport {
    PlatformReport {
        candidates: vec!["linux/arm/v6".into()],
        page_size: Some(4096),
        description: "Raspberry Pi Zero W, BCM2835, Linux 6.1, 32-bit userland".into(),
    }
}

fn metrics() -> Metrics {
    Metrics {
        cpu_percent: Some(12.5),
        memory_used: Some(100 << 20),
        memory_total: Some(512 << 20),
        disk_used: Some(1 << 30),
        disk_total: Some(8 << 30),
        uptime: Some(3600),
        load: Some([0.5, 0.25, 0.125]),
        temperature_celsius: Some(48.5),
        dead_letters: Some(1),
        outbox_pending: Some(3),
        outbox_oldest_age_secs: Some(120),
    }
}

fn app_status() -> AppStatus {
    AppStatus {
        app: "sensor".into(),
        release: Some("sensor-2".into()),
        manifest: Some("sha256:ab".into()),
        platform: None,
        state: "running".into(),
        restarts: 1,
        health: Some("healthy".into()),
        wrong_variant: Some("SIGILL at start".into()),
    }
}

/// Three settings between them use every variant and every optional part.
fn settings() -> [RunSettings; 3] {
    let health = |probe| Some(HealthCheck::new(probe));
    [
        RunSettings {
            env: vec!["MODE=edge".into()],
            volumes: vec![
                "data:/var/lib/sensor".parse::<Volume>().unwrap(),
                Volume {
                    source: VolumeSource::Bind(PathBuf::from("/etc/sensor")),
                    target: "/etc/sensor".into(),
                    read_only: true,
                },
            ],
            devices: vec![PathBuf::from("/dev/i2c-1")],
            restart: RestartPolicy::OnFailure {
                max_retries: Some(5),
            },
            health: health(Probe::shell("true").unwrap()),
            read_only: true,
            memory: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(64),
            hostname: Some("sensor".into()),
            network: Network::None,
            user: Some("1000:1000".into()),
            command: vec!["--verbose".into()],
            stop_grace: Duration::from_secs(10),
            allow_emulation: true,
            cap_add: vec!["NET_RAW".into()],
            seccomp: SeccompMode::Unconfined,
            allow_new_privileges: true,
            userns: UsernsMode::Auto,
        },
        RunSettings {
            restart: RestartPolicy::Always,
            health: health(Probe::Http {
                url: "http://127.0.0.1:8080/health".into(),
            }),
            ..RunSettings::new()
        },
        RunSettings {
            restart: RestartPolicy::No,
            health: health(Probe::Tcp {
                address: "127.0.0.1:1883".into(),
            }),
            ..RunSettings::new()
        },
    ]
}

fn reports() -> Vec<Report> {
    let release = || "sensor-2".to_string();
    vec![
        Report::Preparing { release: release() },
        Report::PrepareFailed {
            release: release(),
            reason: "no variant for linux/arm/v6".into(),
            cause: None,
        },
        Report::PrepareFailed {
            release: release(),
            reason: "the device's [policy] devices does not allow the device /dev/mem".into(),
            cause: Some(FailureCause::Policy),
        },
        Report::Probation { release: release() },
        Report::Committed { release: release() },
        Report::RolledBack {
            release: release(),
            to: Some("sensor-1".into()),
            reason: "exit code 132".into(),
            wrong_variant: true,
        },
        Report::Removed { release: release() },
    ]
}

fn rollout_request() -> RolloutRequest {
    RolloutRequest {
        release: "sensor-2".into(),
        select: [("site".to_string(), "north".to_string())].into(),
        waves: vec!["10%".into(), "100%".into()],
        max_failures: "1".into(),
        soak_secs: 600,
        rollback: true,
        device_timeout_secs: 1800,
        skip_timed_out: false,
    }
}

fn rollout_view(status: StateView) -> RolloutView {
    RolloutView {
        id: 3,
        app: "sensor".into(),
        spec: rollout_request(),
        previous: Some("sensor-1".into()),
        status,
        waves_started: 1,
        waves: vec![WaveView {
            devices: vec!["pi-1".into()],
            healthy: 0,
            failed: 1,
            timed_out: 0,
        }],
        incompatible: vec![Incompatible {
            device: "pi-2".into(),
            platforms: vec!["linux/riscv64".into()],
        }],
        late: vec!["pi-3".into()],
        devices: [("pi-1".to_string(), "failed: exit code 132".to_string())].into(),
        created: 1_700_000_000,
    }
}

fn manifests() -> BTreeMap<String, String> {
    [("linux/arm/v6".to_string(), "sha256:ab".to_string())].into()
}

#[test]
fn schemas_match_the_serde_types() {
    let doc = doc();
    let mut reached = BTreeSet::new();
    let tags: BTreeMap<String, String> = [("site".to_string(), "north".to_string())].into();
    reached.extend(check(
        &doc,
        "EnrollRequest",
        &EnrollRequest {
            name: "pi-1".into(),
            tags: tags.clone(),
            agent_version: "0.1.0".into(),
            platform: platform(),
            enrollment_id: Some("Jx7lQmDq3CzYbKp9wTnR2sVfHgAeUo5i8XyZ-_0123".into()),
        },
    ));
    reached.extend(check(
        &doc,
        "Enrolled",
        &Enrolled {
            device_id: "dev".into(),
            credential: "secret".into(),
        },
    ));
    for settings in settings() {
        let desired = Desired {
            apps: vec![DesiredApp {
                name: "sensor".into(),
                release: "sensor-2".into(),
                image: "registry.example/sensor@sha256:cd".into(),
                manifests: manifests(),
                settings: settings.clone(),
                attempt: 2,
            }],
        };
        reached.extend(check(&doc, "Desired", &desired));
        reached.extend(check(
            &doc,
            "AppRequest",
            &AppRequest {
                name: "sensor".into(),
                settings: settings.clone(),
            },
        ));
        reached.extend(check(
            &doc,
            "AppView",
            &AppView {
                name: "sensor".into(),
                settings,
                created: 1_700_000_000,
            },
        ));
    }
    let event = |id: &str, body| Event {
        id: id.into(),
        at: 1_700_000_000,
        seq: Some(1),
        body,
    };
    let mut events = vec![
        event("h", EventBody::Heartbeat(metrics())),
        event("p", EventBody::Platform(platform())),
        event("a", EventBody::App(app_status())),
    ];
    for (i, report) in reports().into_iter().enumerate() {
        events.push(event(
            &format!("u{i}"),
            EventBody::Update {
                app: "sensor".into(),
                report,
            },
        ));
    }
    reached.extend(check(&doc, "ReportBatch", &ReportBatch { events }));
    reached.extend(check(
        &doc,
        "Accepted",
        &Accepted {
            accepted: vec!["h".into()],
        },
    ));
    reached.extend(check(
        &doc,
        "TokenRequest",
        &TokenRequest {
            expires_in: Some(3600),
            uses: Some(10),
            tags: tags.clone(),
            device_tags: true,
        },
    ));
    reached.extend(check(
        &doc,
        "TokenCreated",
        &TokenCreated {
            id: "0123456789ab".into(),
            token: "secret".into(),
            expires: Some(1_700_003_600),
            uses: Some(10),
            tags: tags.clone(),
            device_tags: false,
        },
    ));
    reached.extend(check(
        &doc,
        "TokenView",
        &TokenView {
            id: "0123456789ab".into(),
            created: 1_700_000_000,
            expires: None,
            uses_left: Some(0),
            enrolled: 1,
            tags: tags.clone(),
            device_tags: false,
            revoked: true,
        },
    ));
    reached.extend(check(
        &doc,
        "TagsRequest",
        &TagsRequest {
            set: tags.clone(),
            remove: vec!["ring".into()],
        },
    ));
    reached.extend(check(
        &doc,
        "ReleaseRequest",
        &ReleaseRequest {
            app: "sensor".into(),
            image: "registry.example/sensor:2".into(),
        },
    ));
    reached.extend(check(
        &doc,
        "ReleaseView",
        &ReleaseView {
            id: "sensor-2".into(),
            app: "sensor".into(),
            image: "registry.example/sensor:2".into(),
            pinned: "registry.example/sensor@sha256:cd".into(),
            manifests: manifests(),
            created: 1_700_000_000,
        },
    ));
    reached.extend(check(&doc, "RolloutRequest", &rollout_request()));
    for status in [
        StateView::Running,
        StateView::Paused {
            reason: "1 of 1 failed".into(),
        },
        StateView::Aborted,
        StateView::Done,
        StateView::Superseded,
    ] {
        reached.extend(check(&doc, "RolloutView", &rollout_view(status)));
    }
    for update in reports() {
        reached.extend(check(
            &doc,
            "DeviceView",
            &DeviceView {
                id: "dev".into(),
                name: "pi-1".into(),
                tags: tags.clone(),
                platform: platform(),
                agent_version: "0.1.0".into(),
                enrolled: 1_700_000_000,
                last_seen: 1_700_000_100,
                revoked: false,
                metrics: Some(metrics()),
                apps: vec![DeviceApp {
                    app: "sensor".into(),
                    desired: Some("sensor-2".into()),
                    status: Some(app_status()),
                    update: Some(update),
                }],
            },
        ));
    }
    reached.extend(check(&doc, "Error", &ErrorBody { error: "no".into() }));
    // The revoke handler builds `{"revoked": done}` itself: no type to ask serde about.
    reached.extend(run(&doc, "Revoked", &json!({"revoked": true}), None));

    let all: BTreeSet<String> = doc["components"]["schemas"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let unchecked: Vec<_> = all.difference(&reached).collect();
    assert!(
        unchecked.is_empty(),
        "schemas no sample reaches: {unchecked:?}"
    );
}

#[test]
fn the_reader_takes_the_subset_and_refuses_the_rest() {
    let v = yaml::parse(
        "a:\n  - name: x\n    in: 'it''s'\n  - [1, {b: \"c\\\"\"}]\nd: >\n  folded\n  text\ne: {}\n",
    );
    assert_eq!(
        v,
        json!({"a": [{"name": "x", "in": "it's"}, ["1", {"b": "c\""}]], "d": "folded text", "e": {}})
    );
    for bad in [
        "a: 1\na: 2\n",
        "a:\n\tb: 1\n",
        "a: 1\n  b: 2\n",
        "a: b: c\n",
        "a: `x`\n",
        "a: {b: 1\n",
        "a:\n- b\n",
    ] {
        let result = std::panic::catch_unwind(|| yaml::parse(bad));
        assert!(result.is_err(), "{bad:?} was taken");
    }
}
