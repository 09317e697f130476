"""Drives stopover's toxiproxy API with toxiproxy's Python client
(toxiproxy-python): `python3 python.py API_ADDR UPSTREAM_ADDR`.
Run by scripts/compat.sh (`make compat`)."""

import socket
import sys
import time

from toxiproxy import Toxiproxy

api, upstream = sys.argv[1:3]
host, port = api.rsplit(":", 1)


def round_trip(addr):
    """One upload through addr: 1,000 bytes, our FIN, the answer line."""
    h, p = addr.rsplit(":", 1)
    start = time.monotonic()
    with socket.create_connection((h, int(p)), timeout=10) as s:
        s.sendall(b"x" * 1000)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return (time.monotonic() - start) * 1000, answer.decode()


def check(what, cond):
    assert cond, what
    print("   ok  " + what)


t = Toxiproxy()
t.update_api_consumer(host, int(port))
check("running", t.running())
check("version: %s" % t.version().decode(), b"stopover" in t.version())

p = t.create(upstream=upstream, name="py_proxy", listen="127.0.0.1:0")
check("create: listening on %s" % p.listen, not p.listen.endswith(":0"))
ms, answer = round_trip(p.listen)
check("upload through it: %s in %.1f ms" % (answer.strip(), ms), answer.startswith("OK "))

p.add_toxic(type="latency", attributes={"latency": 100, "jitter": 10})
toxics = p.toxics()
check("add_toxic: %s" % sorted(toxics), "latency_downstream" in toxics)
toxic = p.get_toxic("latency_downstream")
check("get_toxic: %s %s toxicity %s %s" % (toxic.type, toxic.stream, toxic.toxicity, toxic.attributes),
      toxic.attributes["latency"] == 100)
ms, answer = round_trip(p.listen)
check("latency 100 +- 10 ms: the upload took %.1f ms" % ms, 90 <= ms < 400)
p.add_toxic(type="bandwidth", stream="upstream", attributes={"rate": 10}, name="slow_up")
ms, answer = round_trip(p.listen)
check("bandwidth 10 KB/s upstream on 1,000 bytes, plus latency: %.1f ms" % ms, ms >= 180)
check("destroy_toxic", p.destroy_toxic("latency_downstream") and p.destroy_toxic("slow_up"))
ms, answer = round_trip(p.listen)
check("without toxics: %.1f ms" % ms, ms < 90)

with p.down():
    try:
        round_trip(p.listen)
        refused = False
    except ConnectionRefusedError:
        refused = True
    check("down(): a disabled proxy refuses", refused)
ms, answer = round_trip(p.listen)
check("enabled again: %s" % answer.strip(), answer.startswith("OK "))

created = t.populate([{"name": "py_pop", "upstream": upstream, "listen": "127.0.0.1:0"}])
check("populate: %s" % [c.name for c in created], [c.name for c in created] == ["py_pop"])
check("proxies: %s" % sorted(t.proxies()), {"py_proxy", "py_pop", "stopover"} <= set(t.proxies()))

p.add_toxic(type="timeout", attributes={"timeout": 0})
check("reset", t.reset())
check("reset: no toxic left", p.toxics() == {})

check("destroy", p.destroy() and t.get_proxy("py_pop").destroy())
check("proxies left: %s" % sorted(t.proxies()), set(t.proxies()) == {"stopover"})
