"""Page times of the operator console on a large database (`scripts/bench.sh console`).

Signs in, then asks each page ROUNDS times (after a warm-up) and prints p50, p95 and max
of the time from request to the last byte of the answer, on loopback (so the server's time
and a loopback round trip). BASE_URL, OPERATOR_TOKEN, ENV_PATH, DEEP_CURSOR, DEEP_JOB, JOB,
EVENT, SINCE and UNTIL come from bench.sh, which planted the data.
"""

import http.cookiejar
import os
import re
import statistics
import time
import urllib.parse
import urllib.request

BASE = os.environ["BASE_URL"]
ENV = os.environ["ENV_PATH"]
ROUNDS = int(os.environ.get("ROUNDS", "40"))


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


jar = http.cookiejar.CookieJar()
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)


def request(path, form=None):
    data = None if form is None else urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(BASE + path, data=data, headers={"Origin": BASE})
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main():
    status, _ = request("/console/sign-in", {"token": os.environ["OPERATOR_TOKEN"]})
    assert status == 303, status
    status, page = request("/console?env=" + ENV)
    assert status == 200, (status, page[:500])
    csrf = re.search(r'name="csrf" content="([^"]+)"', page).group(1)
    env = "env=" + urllib.parse.quote(ENV)
    pages = [
        ("overview", f"/console?{env}", None),
        ("overview, live part", f"/console/overview.json?{env}", None),
        ("events, first page", f"/console/events?{env}", None),
        ("events, a page 250,000 deep", f"/console/events?{env}&cursor={os.environ['DEEP_CURSOR']}", None),
        ("events by name and state", f"/console/events?{env}&name=bench.4&state=delivered", None),
        ("events by a name it has none of", f"/console/events?{env}&name=bench.3", None),
        ("events, cancelled (none)", f"/console/events?{env}&state=cancelled", None),
        ("events in a time range", f"/console/events?{env}&since={os.environ['SINCE']}&until={os.environ['UNTIL']}", None),
        ("events, delayed", f"/console/events?{env}&state=delayed", None),
        ("event by id (its page)", f"/console/events/{os.environ['EVENT']}?{env}", None),
        ("jobs, first page", f"/console/jobs?{env}", None),
        ("jobs, discarded", f"/console/jobs?{env}&state=discarded", None),
        ("jobs, cancelled (none)", f"/console/jobs?{env}&state=cancelled", None),
        ("jobs, deep", f"/console/jobs?{env}&kind=deliverEvent&state=completed&after={os.environ['DEEP_JOB']}", None),
        ("a job's page", f"/console/jobs/{os.environ['JOB']}?{env}", None),
        ("retry matching: the count", f"/console/jobs/retry-matching?{env}",
         {"csrf": csrf, "state": "discarded", "kind": ""}),
        ("dead letters", f"/console/dead-letters?{env}", None),
        ("dispatchers", f"/console/dispatchers?{env}", None),
        ("environments", f"/console/environments?{env}", None),
    ]
    print(f"{'page':<34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    worst = 0.0
    for name, path, form in pages:
        for _ in range(3):
            status, body = request(path, form)
            assert status == 200, (name, status, body[:300])
        times = []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            status, _ = request(path, form)
            times.append((time.perf_counter() - t0) * 1000)
            assert status == 200, (name, status)
        times.sort()
        p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
        worst = max(worst, p95)
        print(f"{name:<34} {statistics.median(times):>8.1f} {p95:>8.1f} {times[-1]:>8.1f}")
    print(f"slowest p95: {worst:.1f} ms ({ROUNDS} requests a page)")


if __name__ == "__main__":
    main()
