"""The operator console driven in Chromium, as an operator uses it.

Run by scripts/browser-test.sh, which starts the service with an operator token and gives
BASE_URL, API_KEY (of ENV_PATH), OPERATOR_TOKEN and SCREENSHOTS. Events are sent through
the HTTP API; everything else is done by clicking in the console. A webhook target runs
here, on loopback, failing until the test lets it answer.
"""

import http.server
import json
import os
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

BASE = os.environ["BASE_URL"]
KEY = os.environ["API_KEY"]
TOKEN = os.environ["OPERATOR_TOKEN"]
ENV = os.environ["ENV_PATH"]
SHOTS = os.environ.get("SCREENSHOTS", "target/console-screenshots")
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def api(method, path, body=None):
    req = urllib.request.Request(
        BASE + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def wait_for(what, cond, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Hooks(http.server.BaseHTTPRequestHandler):
    """A webhook target: each path answers its status in `status` (500 until changed)."""

    status = {}
    seen = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        code = Hooks.status.get(self.path, 500)
        Hooks.seen.append((self.path, code))
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900",
    ]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main():
    os.makedirs(SHOTS, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}"
    d = browser()
    d.implicitly_wait(5)
    steps = []

    def step(name):
        steps.append(name)
        print(f"- {name}", flush=True)

    def shot(name):
        # The whole page: the window as tall as the document, then back.
        height = d.execute_script("return document.documentElement.scrollHeight")
        d.set_window_size(1280, max(900, min(height, 4000)))
        d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))
        d.set_window_size(1280, 900)

    def go(path):
        sep = "&" if "?" in path else "?"
        d.get(f"{BASE}{path}{sep}env={ENV}")

    def text(css):
        return d.find_element(By.CSS_SELECTOR, css).text

    def no_alert():
        try:
            d.switch_to.alert
        except NoAlertPresentException:
            return True
        return False

    def navigating(action):
        """Do `action` (a click or a submit that loads a page) and wait for the new page:
        a click returns before the page it asks for has replaced the old one."""
        old = d.find_element(By.TAG_NAME, "html")
        action()
        WebDriverWait(d, 15).until(expected_conditions.staleness_of(old))

    def accept_confirm():
        wait_for("the confirmation", lambda: not no_alert(), 5)
        d.switch_to.alert.accept()

    try:
        step("not signed in: the sign-in page; a tenant's API key is not the token")
        d.get(f"{BASE}/console")
        assert d.current_url.endswith("/console/sign-in"), d.current_url
        shot("sign-in")
        d.find_element(By.NAME, "token").send_keys(KEY)
        navigating(lambda: d.find_element(By.CSS_SELECTOR, "button[type=submit]").click())
        assert "not the operator token" in d.page_source
        assert d.get_cookie("kongflow_console") is None

        step("signed in with the operator token")
        d.find_element(By.NAME, "token").send_keys(TOKEN)
        navigating(lambda: d.find_element(By.CSS_SELECTOR, "button[type=submit]").click())
        assert "Overview" in text("h1"), d.page_source
        cookie = d.get_cookie("kongflow_console")
        assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict", cookie

        step("jobs registered and events sent through the API")
        for slug, trigger in [
            ("on-order", {"event": "order.created"}),
            ("only-big-orders", {"event": "order.created", "payload": {"size": ["big"]}}),
        ]:
            api("PUT", f"/api/v1/jobs/{slug}", {"version": "1.0.0", "trigger": trigger})
        api("POST", "/api/v1/events", {"event": {
            "name": "order.created", "id": "ord-1",
            "payload": {"size": "small", "note": HOSTILE}, "context": {"by": HOSTILE}}})
        runs = wait_for("ord-1's run",
                        lambda: api("GET", "/api/v2/events/ord-1")["runs"])
        later = (datetime.now(timezone.utc) + timedelta(minutes=10)).isoformat()
        api("POST", "/api/v1/events", {"event": {"name": "order.created", "id": "ord-later",
                                                 "payload": {}}, "options": {"deliverAt": later}})

        step("an event found by id: its run, and why the other dispatcher did not take it")
        go("/console/events")
        shot("events")
        d.find_element(By.NAME, "id").send_keys("ord-1")
        navigating(lambda: d.find_element(By.NAME, "id").submit())
        assert "ord-1" in text("h1"), d.page_source
        assert runs[0]["id"] in text("#runs")
        dispatchers = text("#dispatchers")
        assert "reached" in dispatchers and "not reached" in dispatchers, dispatchers
        assert "size" in dispatchers, dispatchers

        step("a hostile payload renders as text")
        payloads = [e.text for e in d.find_elements(By.CSS_SELECTOR, "pre.json")]
        assert any(HOSTILE.replace('"', '\\"') in p for p in payloads), payloads
        assert no_alert(), "a script ran"
        assert not d.find_elements(By.CSS_SELECTOR, "main img"), "markup from the payload"
        shot("event")

        step("a delayed event cancelled from its page")
        go("/console/events/ord-later")
        assert text("#event-state") == "delayed"
        navigating(lambda: (d.find_element(By.ID, "cancel-event").click(), accept_confirm()))
        assert text("#event-state") == "cancelled", d.page_source
        assert "cancelled." in text(".notice")

        step("two webhooks that fail until they are dead-lettered")
        ids = {}
        for name in ["a", "b"]:
            r = api("POST", "/api/v1/event-dispatchers/ephemeral",
                    {"url": f"{hook}/{name}", "name": f"pay.{name}"})
            ids[name] = r["id"]
            api("POST", "/api/v1/events", {"event": {"name": f"pay.{name}", "id": f"pay-{name}",
                                                     "payload": {"n": name}}})
        for name, id in ids.items():
            wait_for(f"webhook {name} to fail",
                     lambda: api("GET", f"/api/v1/event-dispatchers/{id}")["status"]
                     == "failed", 60)
        Hooks.status.update({"/a": 200, "/b": 200})

        step("the dead letters page lists them")
        go("/console/dead-letters")
        wait_for("the two dead letters",
                 lambda: (d.refresh() or True)
                 and text("#dead").count("events.deliverWebhook") == 2, 30)
        shot("dead-letters")

        step("a failed job retried from its page completes")
        go("/console/jobs?kind=events.deliverWebhook&state=discarded")
        shot("jobs")
        links = d.find_elements(By.CSS_SELECTOR, "#jobs tbody a")
        assert len(links) == 2, d.page_source
        navigating(lambda: links[0].click())
        assert text("#job-state") == "discarded"
        errors = text("pre.json:last-of-type")
        assert "500" in errors, errors
        shot("job")
        navigating(lambda: d.find_element(By.ID, "retry").click())
        assert "retried" in text(".notice")
        wait_for("the retried job to complete",
                 lambda: (d.refresh() or True) and text("#job-state") == "completed", 30)

        step("the other replayed from the dead letters")
        go("/console/dead-letters")
        navigating(lambda: (d.find_element(By.ID, "replay").click(), accept_confirm()))
        notice = text(".notice")
        assert "retried 1 job(s)" in notice and "cleared 1" in notice, notice
        wait_for("both webhooks delivered", lambda: all(
            api("GET", f"/api/v1/event-dispatchers/{id}")["status"] == "delivered"
            for id in ids.values()), 30)
        assert ("/a", 200) in Hooks.seen and ("/b", 200) in Hooks.seen

        step("a dispatcher disabled and its webhook's attempts shown")
        go("/console/dispatchers")
        row = [r for r in d.find_elements(By.CSS_SELECTOR, "#dispatcher-list tbody tr")
               if "only-big-orders" in r.text][0]
        navigating(lambda: row.find_element(By.CSS_SELECTOR, "button").click())
        assert "disabled." in text(".notice"), text(".notice")
        row = [r for r in d.find_elements(By.CSS_SELECTOR, "#dispatcher-list tbody tr")
               if "only-big-orders" in r.text][0]
        assert "disabled" in row.text
        navigating(lambda: d.find_element(By.LINK_TEXT, f"{hook}/b").click())
        assert text("#webhook-status") == "delivered"
        assert text("#attempts").count("no answer") + text("#attempts").count("500") >= 5
        shot("dispatchers")

        step("a limit edited; a change without the session's token refused")
        go("/console/environments")
        form = [f for f in d.find_elements(By.CSS_SELECTOR, "form.limits")
                if f.find_element(By.NAME, "path").get_attribute("value") == ENV][0]
        field = form.find_element(By.NAME, "max_jobs_in_flight")
        field.clear()
        field.send_keys("32")
        navigating(lambda: form.find_element(By.CSS_SELECTOR, "button").click())
        assert f"Limits of {ENV} saved." in text(".notice")
        shot("environments")
        navigating(lambda: d.execute_script(
            "const f = [...document.querySelectorAll('form.limits')]"
            ".find(f => f.querySelector('[name=path]').value === arguments[0]);"
            "f.querySelector('[name=csrf]').remove();"
            "f.querySelector('[name=max_jobs_in_flight]').value = '5'; f.submit();", ENV))
        assert "403" in text("h1"), d.page_source
        go("/console/environments")
        form = [f for f in d.find_elements(By.CSS_SELECTOR, "form.limits")
                if f.find_element(By.NAME, "path").get_attribute("value") == ENV][0]
        assert form.find_element(By.NAME, "max_jobs_in_flight").get_attribute("value") == "32"

        step("the overview with its figures, live")
        go("/console")
        assert "deliverEvent" in text("#live")
        time.sleep(6)
        assert "deliverEvent" in text("#live"), "the live part reloaded"
        shot("overview")

        step("signed out")
        navigating(lambda: d.find_element(By.CSS_SELECTOR, "form.signout button").click())
        assert d.current_url.endswith("/console/sign-in")
        d.get(f"{BASE}/console/events")
        assert d.current_url.endswith("/console/sign-in")
    except Exception:
        d.save_screenshot(os.path.join(SHOTS, "failure.png"))
        print(f"failed at: {steps[-1] if steps else 'start'}", file=sys.stderr)
        print(d.current_url, file=sys.stderr)
        raise
    finally:
        d.quit()
        server.shutdown()
    print(f"console in Chromium: {len(steps)} steps passed; screenshots in {SHOTS}")


if __name__ == "__main__":
    main()
