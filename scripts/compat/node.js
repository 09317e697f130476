// Drives stopover's toxiproxy API with toxiproxy's Node client
// (toxiproxy-node-client): `node node.js API_ADDR UPSTREAM_ADDR`.
// Run by scripts/compat.sh (`make compat`).
"use strict";
const net = require("net");
const assert = require("assert");
const { Toxiproxy } = require("toxiproxy-node-client");

const [api, upstream] = process.argv.slice(2);
const toxiproxy = new Toxiproxy(`http://${api}`);

// One upload through `addr` (host:port): 1,000 bytes, our FIN, the server's
// answer line; resolves with the milliseconds it took and the answer.
function roundTrip(addr) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), Number(addr.slice(addr.lastIndexOf(":") + 1))];
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const sock = net.connect({ host, port }, () => sock.end(Buffer.alloc(1000, 120)));
    let answer = "";
    sock.on("data", (d) => (answer += d));
    sock.on("end", () => resolve({ ms: Number(process.hrtime.bigint() - start) / 1e6, answer }));
    sock.on("error", reject);
    sock.setTimeout(10000, () => reject(new Error("timed out")));
  });
}

function check(what, cond) {
  assert.ok(cond, what);
  console.log(`   ok  ${what}`);
}

(async () => {
  const version = await toxiproxy.getVersion();
  check(`getVersion: ${version}`, version.includes("stopover"));

  const proxy = await toxiproxy.createProxy({ name: "node_proxy", listen: "127.0.0.1:0", upstream, enabled: true });
  check(`createProxy: listening on ${proxy.listen}`, !proxy.listen.endsWith(":0"));
  const base = await roundTrip(proxy.listen);
  check(`upload through it: ${base.answer.trim()} in ${base.ms.toFixed(1)} ms`, base.answer.startsWith("OK "));

  const toxic = await proxy.addToxic({
    name: "latency_downstream", type: "latency", stream: "downstream", toxicity: 1,
    attributes: { latency: 100, jitter: 10 },
  });
  check(`addToxic: ${toxic.name} ${JSON.stringify(toxic.attributes)}`, toxic.attributes.latency === 100);
  const slowed = await roundTrip(proxy.listen);
  check(`latency 100 +- 10 ms: the upload took ${slowed.ms.toFixed(1)} ms`, slowed.ms >= 90 && slowed.ms < 400);

  const updated = await toxic.update({ attributes: { latency: 200, jitter: 0 } });
  check(`toxic.update: latency ${updated.attributes.latency}`, updated.attributes.latency === 200);
  const fetched = await proxy.getToxic("latency_downstream");
  check(`getToxic: ${fetched.type} ${fetched.stream} toxicity ${fetched.toxicity}`, fetched.attributes.latency === 200);
  const slower = await roundTrip(proxy.listen);
  check(`latency 200 ms: ${slower.ms.toFixed(1)} ms`, slower.ms >= 200 && slower.ms < 500);
  await toxic.remove();
  const fast = await roundTrip(proxy.listen);
  check(`toxic.remove: ${fast.ms.toFixed(1)} ms again`, fast.ms < 90);

  const down = await proxy.update({ enabled: false });
  check("update enabled: false", down.enabled === false);
  const refused = await roundTrip(proxy.listen).then(() => null, (e) => e.code);
  check(`a disabled proxy refuses: ${refused}`, refused === "ECONNREFUSED");
  const up = await proxy.update({ enabled: true });
  check("update enabled: true", up.enabled === true && (await roundTrip(proxy.listen)).answer.startsWith("OK "));

  const populated = await toxiproxy.populate([
    { name: "node_pop", listen: "127.0.0.1:0", upstream, enabled: true },
  ]);
  check(`populate: ${Object.keys(populated)}`, populated.node_pop && !populated.node_pop.listen.endsWith(":0"));
  const all = await toxiproxy.getAll();
  check(`getAll: ${Object.keys(all).sort()}`, all.node_proxy && all.node_pop && all.stopover);

  await proxy.addToxic({ name: "t", type: "timeout", stream: "upstream", toxicity: 1, attributes: { timeout: 0 } });
  await toxiproxy.reset();
  const afterReset = await toxiproxy.get("node_proxy");
  const gone = await afterReset.getToxic("t").then(() => false, () => true);
  check("reset: the proxy is enabled and its toxic is gone", afterReset.enabled === true && gone);
  check(`reset: uploads pass (${(await roundTrip(proxy.listen)).answer.trim()})`, true);

  await proxy.remove();
  await populated.node_pop.remove();
  const left = await toxiproxy.getAll();
  check(`remove: ${Object.keys(left)} left`, !left.node_proxy && !left.node_pop);
})().catch((e) => {
  console.error(`   FAILED: ${e.stack || e}`);
  process.exit(1);
});
