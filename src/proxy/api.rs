//! A toxiproxy-compatible HTTP API (`--api-addr`), so toxiproxy's own
//! client libraries drive the proxy: its routes are toxiproxy's
//! "proxies", its toxics toxiproxy's toxics.
//!
//! ```text
//! GET  /version                      {"version": "stopover ..."}
//! GET  /proxies                      {name: proxy, ...}
//! POST /proxies                      201 proxy (409 if the name exists)
//! POST /populate                     201 {"proxies": [proxy, ...]}, all or nothing
//! POST /reset                        204: every proxy enabled, every toxic removed
//! GET|POST|PATCH|DELETE /proxies/NAME               (POST and PATCH update)
//! GET|POST /proxies/NAME/toxics                     (a new toxic: 200)
//! GET|POST|PATCH|DELETE /proxies/NAME/toxics/TOXIC
//! ```
//!
//! Errors are `{"error": "...", "status": N}` with 400 (bad input), 404
//! (no such proxy or toxic) or 409 (already exists). Requests are served
//! by the loop itself, over the stats plumbing (`event_loop::stats`):
//! bounded in size, in number and in time like `/metrics`. Every change
//! applies to live connections at once (see `transfer::toxic`).

use serde_json::{json, Value};

use crate::event_loop::stats::ApiRequest;
use crate::event_loop::Context;
use crate::toxics::json::{
    proxies_from_json, proxy_from_json, toxic_from_json, toxic_to_json, toxic_update,
};

use super::routes::{Listener, Refusal};
use super::{Core, Timer};

type Answer = (u16, String);

fn ok(status: u16, v: Value) -> Answer {
    (status, v.to_string())
}

fn error((status, message): Refusal) -> Answer {
    (
        status,
        json!({"error": message, "status": status}).to_string(),
    )
}

fn body(req: &ApiRequest) -> Result<Value, Refusal> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&req.body).map_err(|e| (400, format!("bad JSON: {e}")))
}

impl Core {
    /// Answers one API request.
    pub(super) fn api_request(&mut self, cx: &mut Context<Timer>, req: &ApiRequest) -> Answer {
        let path = req.path.split('?').next().unwrap_or_default();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        log::debug!("proxy: API {} {path}", req.method);
        let answer = match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["version"]) => Ok(ok(
                200,
                json!({"version": concat!("stopover ", env!("CARGO_PKG_VERSION"))}),
            )),
            ("GET", ["proxies"]) => {
                let all: serde_json::Map<String, Value> = self
                    .routes
                    .iter()
                    .map(|(r, route)| (route.name.clone(), self.route_json(cx, r)))
                    .collect();
                Ok(ok(200, Value::Object(all)))
            }
            ("POST", ["proxies"]) => body(req)
                .and_then(|v| proxy_from_json(&v).map_err(|e| (400, e)))
                .and_then(|spec| self.create_route(cx, &spec))
                .map(|r| ok(201, self.route_json(cx, r))),
            ("POST", ["populate"]) => self.populate(cx, req),
            ("POST", ["reset"]) => {
                let keys: Vec<usize> = self.routes.iter().map(|(k, _)| k).collect();
                for r in keys {
                    if let Err(e) = self.set_enabled(cx, r, true) {
                        return error((500, e.to_string()));
                    }
                    self.routes[r].toxics.clear();
                    self.rechain(cx, r);
                }
                Ok((204, String::new()))
            }
            (method, ["proxies", name, rest @ ..]) => match self.route_named(name) {
                None => Err((404, "proxy not found".to_string())),
                Some(r) => self.proxy_request(cx, method, r, rest, req),
            },
            (_, ["version" | "proxies" | "populate" | "reset"]) => {
                Err((405, "method not allowed".to_string()))
            }
            _ => Err((404, "not found".to_string())),
        };
        answer.unwrap_or_else(error)
    }

    /// A request under `/proxies/NAME`.
    fn proxy_request(
        &mut self,
        cx: &mut Context<Timer>,
        method: &str,
        r: usize,
        rest: &[&str],
        req: &ApiRequest,
    ) -> Result<Answer, Refusal> {
        match (method, rest) {
            ("GET", []) => Ok(ok(200, self.route_json(cx, r))),
            ("POST" | "PATCH", []) => {
                let v = body(req)?;
                self.update_route(cx, r, &v)?;
                Ok(ok(200, self.route_json(cx, r)))
            }
            ("DELETE", []) => {
                self.delete_route(cx, r);
                Ok((204, String::new()))
            }
            ("GET", ["toxics"]) => {
                let list: Vec<Value> = self.routes[r].toxics.iter().map(toxic_to_json).collect();
                Ok(ok(200, Value::Array(list)))
            }
            ("POST", ["toxics"]) => {
                let t = toxic_from_json(&body(req)?).map_err(|e| (400, e))?;
                if self.routes[r].toxics.iter().any(|o| o.name == t.name) {
                    return Err((409, "toxic already exists".to_string()));
                }
                let shown = toxic_to_json(&t);
                self.routes[r].toxics.push(t);
                self.rechain(cx, r);
                Ok(ok(200, shown))
            }
            (method, ["toxics", name]) => {
                let toxics = &mut self.routes[r].toxics;
                let Some(i) = toxics.iter().position(|t| t.name == *name) else {
                    return Err((404, "toxic not found".to_string()));
                };
                match method {
                    "GET" => Ok(ok(200, toxic_to_json(&toxics[i]))),
                    "POST" | "PATCH" => {
                        toxics[i] = toxic_update(&toxics[i], &body(req)?).map_err(|e| (400, e))?;
                        let shown = toxic_to_json(&toxics[i]);
                        self.rechain(cx, r);
                        Ok(ok(200, shown))
                    }
                    "DELETE" => {
                        toxics.remove(i);
                        self.rechain(cx, r);
                        Ok((204, String::new()))
                    }
                    _ => Err((405, "method not allowed".to_string())),
                }
            }
            (_, [] | ["toxics"]) => Err((405, "method not allowed".to_string())),
            _ => Err((404, "not found".to_string())),
        }
    }

    /// `POST /proxies/NAME`: `enabled` and `upstream` may change (new
    /// connections go to the new upstream).
    fn update_route(
        &mut self,
        cx: &mut Context<Timer>,
        r: usize,
        v: &Value,
    ) -> Result<(), Refusal> {
        if let Some(up) = v.get("upstream").and_then(Value::as_str) {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(up)
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| (400, format!("upstream {up:?} is not a valid host:port")))?;
            let route = &mut self.routes[r];
            route.upstream = up.to_string();
            route.policy.upstream = addr;
        }
        match v.get("enabled") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Bool(on)) => self
                .set_enabled(cx, r, *on)
                .map_err(|e| (500, format!("enabling: {e}"))),
            Some(other) => Err((400, format!("enabled: expected true or false, got {other}"))),
        }
    }

    /// `POST /populate`: every proxy of the list created, or updated in
    /// place when one of that name exists (its upstream, toxics and
    /// `enabled`); all or nothing.
    fn populate(&mut self, cx: &mut Context<Timer>, req: &ApiRequest) -> Result<Answer, Refusal> {
        let text = std::str::from_utf8(&req.body).map_err(|_| (400, "not UTF-8".to_string()))?;
        let specs = proxies_from_json(text).map_err(|e| (400, e))?;
        let mut created = Vec::new();
        for spec in &specs {
            if self.route_named(&spec.name).is_some() {
                continue;
            }
            match self.create_route(cx, spec) {
                Ok(r) => created.push(r),
                Err(e) => {
                    for r in created {
                        self.delete_route(cx, r);
                    }
                    return Err(e);
                }
            }
        }
        let mut shown = Vec::new();
        for spec in &specs {
            let Some(r) = self.route_named(&spec.name) else {
                continue;
            };
            if !created.contains(&r) {
                let v = json!({"upstream": spec.upstream, "enabled": spec.enabled});
                self.update_route(cx, r, &v)?;
                self.routes[r].toxics = spec.toxics.clone();
                self.rechain(cx, r);
            }
            shown.push(self.route_json(cx, r));
        }
        Ok(ok(201, json!({"proxies": shown})))
    }

    /// A route as toxiproxy shows a proxy.
    fn route_json(&self, cx: &Context<Timer>, r: usize) -> Value {
        let route = &self.routes[r];
        let listen = match route.listener {
            Listener::Main => cx.acceptor.local_addr(),
            Listener::Own(_) => route.listen,
        };
        json!({
            "name": route.name,
            "listen": listen.to_string(),
            "upstream": route.upstream,
            "enabled": route.enabled,
            "toxics": route.toxics.iter().map(toxic_to_json).collect::<Vec<_>>(),
        })
    }
}
