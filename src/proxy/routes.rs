//! The proxy's routes: several listen -> upstream pairs on one loop, as
//! toxiproxy's "proxies".
//!
//! The command-line proxy is route `--name` (default `stopover`), served
//! by the loop's own listener. The API (`--api-addr`, see `api`) adds
//! more: each has its own listener on a reserved token (see
//! [`route_token`]), its own upstream, its own toxics, and records into a
//! subdirectory of the spool directory named after it (`DIR/NAME/`), so
//! one proxy's recordings never mix with another's. A route's transfers
//! are the same transfers, in the same table, with the route's policy.
//!
//! A route disabled (`enabled: false`) closes its listener (new clients
//! are refused, as by a port nobody listens on) and resets its
//! connections; enabled again, it listens on the same address.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use crate::event_loop::{accept, Context};
use crate::store::Store;
use crate::toxics::json::ProxySpec;
use crate::toxics::Toxic;

use super::transfer::Policy;
use super::{Core, Timer};

/// The most routes at once (their tokens are reserved).
pub const MAX_ROUTES: usize = 1024;
/// Route `i`'s listener has token `FIRST_ROUTE_TOKEN - i`: reserved, below
/// the loop's own tokens, out of reach of any transfer's.
const FIRST_ROUTE_TOKEN: usize = usize::MAX - 64;

/// The listener token of route `key`.
pub fn route_token(key: usize) -> Token {
    Token(FIRST_ROUTE_TOKEN - key)
}

/// The route whose listener `token` is, if it is one.
pub fn route_of_token(token: Token) -> Option<usize> {
    let key = FIRST_ROUTE_TOKEN.checked_sub(token.0)?;
    (key < MAX_ROUTES).then_some(key)
}

/// Where a route's clients come from.
#[derive(Debug)]
pub enum Listener {
    /// The loop's own listener (the command-line proxy).
    Main,
    /// Its own (`None` while disabled).
    Own(Option<TcpListener>),
}

/// One listen -> upstream pair.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub listen: SocketAddr,
    /// The upstream as it was given (toxiproxy shows it so).
    pub upstream: String,
    /// The transfer rules, with this route's upstream.
    pub policy: Policy,
    /// Chain order.
    pub toxics: Vec<Toxic>,
    pub enabled: bool,
    pub listener: Listener,
    /// Its recordings (`None`: the spool directory itself).
    pub store: Option<Store>,
}

/// An API error: status and message.
pub type Refusal = (u16, String);

fn resolve(what: &str, addr: &str) -> Result<SocketAddr, Refusal> {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| (400, format!("{what} {addr:?} is not a valid host:port")))
}

/// A route name becomes a directory name: keep it tame.
fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err((
            400,
            format!("proxy name {name:?}: use letters, digits, '_', '-', '.' (at most 64)"),
        ))
    }
}

impl Core {
    /// The route called `name`.
    pub(super) fn route_named(&self, name: &str) -> Option<usize> {
        self.routes
            .iter()
            .find(|(_, r)| r.name == name)
            .map(|(k, _)| k)
    }

    /// Adds a route from its description: binds its listener, opens its
    /// directory. Nothing is left behind if it fails.
    pub(super) fn create_route(
        &mut self,
        cx: &mut Context<Timer>,
        spec: &ProxySpec,
    ) -> Result<usize, Refusal> {
        check_name(&spec.name)?;
        if self.route_named(&spec.name).is_some() {
            return Err((409, "proxy already exists".into()));
        }
        if self.routes.len() >= MAX_ROUTES {
            return Err((409, format!("at most {MAX_ROUTES} proxies")));
        }
        let listen = resolve("listen", &spec.listen)?;
        let upstream = resolve("upstream", &spec.upstream)?;
        let store = Store::open(&self.store.dir().join(&spec.name))
            .map_err(|e| (500, format!("spool directory: {e}")))?;
        let entry = self.routes.vacant_entry();
        let key = entry.key();
        let mut listener =
            accept::bind_listener(listen, "proxy").map_err(|e| (409, e.to_string()))?;
        let local = listener.local_addr().map_err(|e| (500, e.to_string()))?;
        accept::set_options(&listener, None).map_err(|e| (500, e.to_string()))?;
        cx.registry
            .register(&mut listener, route_token(key), Interest::READABLE)
            .map_err(|e| (500, e.to_string()))?;
        log::info!(
            "proxy: {}: listening on {local}, forwarding to {upstream}, spooling to {}",
            spec.name,
            store.dir().display()
        );
        entry.insert(Route {
            name: spec.name.clone(),
            listen: local,
            upstream: spec.upstream.clone(),
            policy: Policy {
                upstream,
                ..self.policy
            },
            toxics: spec.toxics.clone(),
            enabled: true,
            listener: Listener::Own(Some(listener)),
            store: Some(store),
        });
        if !spec.enabled {
            self.set_enabled(cx, key, false)
                .map_err(|e| (500, e.to_string()))?;
        }
        Ok(key)
    }

    /// Enables or disables route `r` (see the module docs).
    pub(super) fn set_enabled(
        &mut self,
        cx: &mut Context<Timer>,
        r: usize,
        on: bool,
    ) -> io::Result<()> {
        let route = &mut self.routes[r];
        if route.enabled == on || (on && cx.acceptor.draining_until().is_some()) {
            return Ok(()); // (a stopping proxy listens no more)
        }
        match &mut route.listener {
            Listener::Main => cx.acceptor.set_listening(on, &cx.registry)?,
            Listener::Own(slot) if on => {
                let mut l = accept::bind_listener(route.listen, "proxy")?;
                accept::set_options(&l, None)?;
                cx.registry
                    .register(&mut l, route_token(r), Interest::READABLE)?;
                *slot = Some(l);
            }
            Listener::Own(slot) => {
                if let Some(mut l) = slot.take() {
                    let _ = cx.registry.deregister(&mut l);
                }
            }
        }
        route.enabled = on;
        if !on {
            self.close_route(cx, r);
        }
        Ok(())
    }

    /// Removes route `r`: its listener and its connections closed.
    pub(super) fn delete_route(&mut self, cx: &mut Context<Timer>, r: usize) {
        let _ = self.set_enabled(cx, r, false);
        self.routes.remove(r);
    }

    /// Resets every connection of route `r` (what it received is kept as
    /// `.incomplete`, as when the proxy stops).
    fn close_route(&mut self, cx: &mut Context<Timer>, r: usize) {
        let keys: Vec<usize> = self
            .transfers
            .iter()
            .filter(|(_, t)| t.route == r)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let t = self.transfers.remove(key);
            for id in t.timers() {
                cx.timers.cancel(id);
            }
            self.stats.aborted += 1;
            t.abandon(&mut cx.disk);
            cx.acceptor.connection_closed();
        }
        self.adopt_closing(cx);
    }

    /// Route `r`'s toxics changed: its live transfers take them on (and
    /// are driven: a toxic removed may free bytes, one added may need its
    /// timer).
    pub(super) fn rechain(&mut self, cx: &mut Context<Timer>, r: usize) {
        let toxics = &self.routes[r].toxics;
        let mut keys = Vec::new();
        for (key, t) in self.transfers.iter_mut().filter(|(_, t)| t.route == r) {
            t.rechain(toxics);
            keys.push(key);
        }
        for key in keys {
            if self.transfers.contains(key) {
                self.drive(cx, key);
            }
        }
        self.adopt_closing(cx);
    }

    /// Route `r`'s listener is readable: accept until it would block
    /// (readiness is edge-triggered: a client left in the queue would get
    /// no second event).
    pub(super) fn accept_route(&mut self, cx: &mut Context<Timer>, r: usize) {
        loop {
            let accepted = match self.routes.get(r).map(|route| &route.listener) {
                Some(Listener::Own(Some(l))) => l.accept(),
                _ => return,
            };
            match accepted {
                Ok((sock, addr)) => {
                    // Its listener has the main one's options: checked the
                    // same way, since `admit` relies on them.
                    cx.acceptor.count_accepted(&sock);
                    self.admit(cx, r, sock, addr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("proxy: {}: accept: {e}", self.routes[r].name);
                    return;
                }
            }
        }
    }

    /// The proxy is stopping: the routes' own listeners are closed (the
    /// loop's own is the acceptor's to close).
    pub(super) fn stop_listening(&mut self, cx: &mut Context<Timer>) {
        for (_, route) in self.routes.iter_mut() {
            if let Listener::Own(slot) = &mut route.listener {
                if let Some(mut l) = slot.take() {
                    let _ = cx.registry.deregister(&mut l);
                }
            }
        }
    }

    /// A client of the loop's own listener: the main route's.
    pub(super) fn main_route(&self) -> Option<usize> {
        self.routes
            .iter()
            .find(|(_, r)| matches!(r.listener, Listener::Main))
            .map(|(k, _)| k)
    }

    /// Drops a client nobody will serve (its route is gone).
    pub(super) fn turn_away(sock: TcpStream, addr: SocketAddr) {
        log::debug!("proxy: {addr}: no route for it: closed");
        drop(sock);
    }
}
