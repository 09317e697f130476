//! Toxics and proxies in toxiproxy's JSON shapes: what its HTTP API and
//! its config file (`toxiproxy-server -config`, the `/populate` body) use.
//!
//! ```text
//! toxic: {"name": "latency_downstream", "type": "latency", "stream": "downstream",
//!         "toxicity": 1.0, "attributes": {"latency": 50, "jitter": 10}}
//! proxy: {"name": "db", "listen": "127.0.0.1:5433", "upstream": "127.0.0.1:5432",
//!         "enabled": true, "toxics": [toxic, ...]}
//! ```
//!
//! Defaults are toxiproxy's: `stream` downstream, `toxicity` 1.0, `name`
//! `<type>_<stream>`, every attribute 0, `enabled` true. Unlike
//! toxiproxy's config file, a proxy's `toxics` are honoured.

use serde_json::{json, Map, Value};

use super::{check_toxicity, Kind, Stream, Toxic};

/// A toxic as toxiproxy shows it.
pub fn toxic_to_json(t: &Toxic) -> Value {
    let attributes: Map<String, Value> = t
        .kind
        .attributes()
        .into_iter()
        .map(|(name, v)| (name.to_string(), json!(v)))
        .collect();
    json!({
        "name": t.name,
        "type": t.kind.type_name(),
        "stream": t.stream.name(),
        "toxicity": t.toxicity,
        "attributes": attributes,
    })
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name).filter(|f| !f.is_null())
}

fn string(v: &Value, name: &str) -> Result<Option<String>, String> {
    match field(v, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{name}: expected a string, got {other}")),
    }
}

/// A new toxic from its JSON (a `POST .../toxics` body).
pub fn toxic_from_json(v: &Value) -> Result<Toxic, String> {
    if !v.is_object() {
        return Err("a toxic must be a JSON object".into());
    }
    let type_name = string(v, "type")?.ok_or("missing toxic type")?;
    let kind = Kind::zero(&type_name)?;
    let stream = match string(v, "stream")? {
        None => Stream::Downstream,
        Some(s) => s.parse()?,
    };
    let base = Toxic {
        name: String::new(),
        kind,
        stream,
        toxicity: 1.0,
    };
    let mut t = toxic_update(&base, v)?;
    if t.name.is_empty() {
        t.name = Toxic::default_name(&t.kind, t.stream);
    }
    Ok(t)
}

/// `t` with the fields of `v` applied (a `PATCH` body: `attributes`,
/// `toxicity`, and for a new toxic its `name`). A toxic keeps its type and
/// stream.
pub fn toxic_update(t: &Toxic, v: &Value) -> Result<Toxic, String> {
    let mut t = t.clone();
    if let Some(name) = string(v, "name")? {
        if t.name.is_empty() {
            t.name = name;
        }
    }
    if let Some(x) = field(v, "toxicity") {
        let p = x
            .as_f64()
            .ok_or_else(|| format!("toxicity: expected a number, got {x}"))?;
        t.toxicity = check_toxicity(p)?;
    }
    match field(v, "attributes") {
        None => {}
        Some(Value::Object(attrs)) => {
            for (name, value) in attrs {
                let n = whole(value).ok_or_else(|| {
                    format!("{name}: expected a whole number, at least 0, got {value}")
                })?;
                t.kind.set(name, n)?;
            }
        }
        Some(other) => return Err(format!("attributes: expected an object, got {other}")),
    }
    Ok(t)
}

/// A JSON number as a whole number of units (toxiproxy's are integers;
/// a float is rounded).
fn whole(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f.round() as u64)
    })
}

/// A proxy as the config file and `/populate` describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySpec {
    pub name: String,
    pub listen: String,
    pub upstream: String,
    pub enabled: bool,
    pub toxics: Vec<Toxic>,
}

/// One proxy from its JSON; `listen` and `upstream` are checked by the
/// caller (it resolves them).
pub fn proxy_from_json(v: &Value) -> Result<ProxySpec, String> {
    if !v.is_object() {
        return Err("a proxy must be a JSON object".into());
    }
    let name = string(v, "name")?
        .filter(|n| !n.is_empty())
        .ok_or("missing proxy name")?;
    let listen = string(v, "listen")?.unwrap_or_else(|| "127.0.0.1:0".into());
    let upstream =
        string(v, "upstream")?.ok_or_else(|| format!("proxy {name}: missing upstream"))?;
    let enabled = match field(v, "enabled") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(format!("enabled: expected true or false, got {other}")),
    };
    let mut toxics: Vec<Toxic> = Vec::new();
    if let Some(list) = field(v, "toxics") {
        let list = list.as_array().ok_or("toxics: expected a list")?;
        for t in list {
            let t = toxic_from_json(t).map_err(|e| format!("proxy {name}: {e}"))?;
            if toxics.iter().any(|o| o.name == t.name) {
                return Err(format!("proxy {name}: toxic {} twice", t.name));
            }
            toxics.push(t);
        }
    }
    Ok(ProxySpec {
        name,
        listen,
        upstream,
        enabled,
        toxics,
    })
}

/// A list of proxies (the config file, a `/populate` body); all or
/// nothing, and names unique.
pub fn proxies_from_json(text: &str) -> Result<Vec<ProxySpec>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let list = v.as_array().ok_or("expected a JSON list of proxies")?;
    let mut out: Vec<ProxySpec> = Vec::new();
    for p in list {
        let p = proxy_from_json(p)?;
        if out.iter().any(|o| o.name == p.name) {
            return Err(format!("proxy {} twice", p.name));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toxic_round_trips_with_toxiproxys_defaults() {
        let t =
            toxic_from_json(&json!({"type": "latency", "attributes": {"latency": 50}})).unwrap();
        assert_eq!(t.name, "latency_downstream");
        assert_eq!(t.toxicity, 1.0);
        let v = toxic_to_json(&t);
        assert_eq!(v["attributes"]["jitter"], 0);
        assert_eq!(toxic_from_json(&v).unwrap(), t);
        let p = toxic_update(&t, &json!({"attributes": {"jitter": 5}, "toxicity": 0.5})).unwrap();
        assert_eq!(
            p.kind,
            Kind::Latency {
                latency: 50,
                jitter: 5
            }
        );
        assert!(toxic_from_json(&json!({"type": "nope"})).is_err());
        assert!(toxic_from_json(&json!({"type": "latency", "attributes": {"rate": 1}})).is_err());
        assert!(toxic_from_json(&json!({"type": "latency", "toxicity": 3})).is_err());
    }

    #[test]
    fn proxies_are_all_or_nothing() {
        let ok = r#"[{"name": "a", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9",
                      "toxics": [{"type": "bandwidth", "stream": "upstream", "attributes": {"rate": 10}}]}]"#;
        let list = proxies_from_json(ok).unwrap();
        assert_eq!(list[0].toxics[0].name, "bandwidth_upstream");
        assert!(list[0].enabled);
        assert!(proxies_from_json(
            r#"[{"name": "a", "upstream": "x"}, {"name": "a", "upstream": "y"}]"#
        )
        .is_err());
        assert!(proxies_from_json(r#"[{"name": "a"}]"#).is_err());
        assert!(proxies_from_json("{").is_err());
    }
}
