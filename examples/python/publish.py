#!/usr/bin/env python3
"""Publish one event to kongflow-events over AMQP (the native form) and read it back.

The flow, as a producer would write it:

1. connect with pika and put the channel in confirm mode: a confirmed publish means the
   broker holds the message, and the service will store it unless it rejects it;
2. consume the direct reply-to pseudo-queue (`amq.rabbitmq.reply-to`) on that channel,
   before publishing, so the service's answer comes back to us;
3. publish `{"event": ..., "options": ...}` (the body of `POST /api/v1/events`) to the
   exchange `<prefix>.ingest` with routing key `send`, `mandatory` set (a message no queue
   takes comes back instead of vanishing), persistent, with the event id as `message_id`
   and the environment's API key in the `x-kongflow-api-key` header;
4. wait for the reply: header `x-kongflow-status` is the HTTP status the API would have
   answered (200: stored), the body is the event log or `{"error": ...}`;
5. read the event back over HTTP until a job run exists for it.

Configuration (environment variables):
  KONGFLOW_API_KEY   the environment's API key (required; `kongflow-events env create`)
  AMQP_URL           default amqp://guest:guest@127.0.0.1:5672/%2f
  AMQP_PREFIX        default kongflow (the service's AMQP_PREFIX)
  KONGFLOW_API_URL   default http://127.0.0.1:3030
  EVENT_NAME         default order.paid
  EVENT_ID           default a new UUID
  EVENT_SOURCE       default unset: the service's default source, `trigger.dev`. A job's
                     trigger matches the event's name *and* source; a trigger that names
                     no source (`{"event": "order.paid"}`) matches source `trigger.dev`.

The last line printed is `RESULT <event JSON>`. Any failure exits non-zero with a message.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pika
import pika.exceptions

REPLY_TIMEOUT_SECONDS = 15.0
RUN_TIMEOUT_SECONDS = 30.0
ROUTING_KEY = "send"
API_KEY_HEADER = "x-kongflow-api-key"
VERSION_HEADER = "x-kongflow-version"
STATUS_HEADER = "x-kongflow-status"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class Failure(Exception):
    """What went wrong, in words for the person running the example."""


def config() -> dict:
    key = os.environ.get("KONGFLOW_API_KEY", "").strip()
    if not key:
        raise Failure(
            "KONGFLOW_API_KEY is not set: create a key with "
            "`kongflow-events env create <org>/<project>/<env>` (it prints the key last)"
        )
    return {
        "amqp_url": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        "prefix": os.environ.get("AMQP_PREFIX", "kongflow"),
        "api_url": os.environ.get("KONGFLOW_API_URL", "http://127.0.0.1:3030").rstrip("/"),
        "api_key": key,
        "event_name": os.environ.get("EVENT_NAME", "order.paid"),
        "event_id": os.environ.get("EVENT_ID") or str(uuid.uuid4()),
        "event_source": os.environ.get("EVENT_SOURCE") or None,
    }


def traceparent() -> str:
    """A new W3C trace context; the event's job runs carry the trace on (optional)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def publish_with_reply(
    cfg: dict,
    body: bytes,
    properties: pika.BasicProperties,
) -> tuple[int, dict]:
    """Publish one message to the ingest exchange and wait for the service's reply.

    `properties` gets `reply_to`, `correlation_id` and `delivery_mode` set here.
    Returns (status, reply body).
    """
    exchange = f"{cfg['prefix']}.ingest"
    correlation_id = str(uuid.uuid4())
    properties.reply_to = DIRECT_REPLY_TO
    properties.correlation_id = correlation_id
    properties.delivery_mode = pika.DeliveryMode.Persistent.value  # 2: on disk

    try:
        connection = pika.BlockingConnection(pika.URLParameters(cfg["amqp_url"]))
    except pika.exceptions.AMQPError as e:
        raise Failure(f"cannot connect to RabbitMQ at AMQP_URL: {e!r}") from e
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        replies: list[tuple[pika.BasicProperties, bytes]] = []

        def on_reply(_ch, _method, props: pika.BasicProperties, reply_body: bytes) -> None:
            if props.correlation_id == correlation_id:
                replies.append((props, reply_body))

        # Direct reply-to: consume the pseudo-queue (no ack) on the channel that publishes,
        # before publishing.
        channel.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)
        try:
            channel.basic_publish(
                exchange=exchange,
                routing_key=ROUTING_KEY,
                body=body,
                properties=properties,
                mandatory=True,
            )
        except pika.exceptions.UnroutableError as e:
            raise Failure(
                f"the broker returned the message: no queue is bound to {exchange!r} "
                f"with key {ROUTING_KEY!r}. Is the service running with AMQP_PREFIX="
                f"{cfg['prefix']}?"
            ) from e
        except pika.exceptions.NackError as e:
            raise Failure("the broker refused the message (nack); publish it again") from e
        except pika.exceptions.ChannelClosedByBroker as e:
            raise Failure(
                f"the broker closed the channel: {e.reply_code} {e.reply_text}. Does the "
                f"exchange {exchange!r} exist (is the service running with AMQP_PREFIX="
                f"{cfg['prefix']})?"
            ) from e
        # Confirmed: the broker holds the message. Now the service's answer.
        deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
        while not replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(
                    f"no reply within {REPLY_TIMEOUT_SECONDS:.0f} s: is the service's ingest "
                    f"consuming {exchange!r}? (The message is in the broker; it will be "
                    "stored once a consumer takes it.)"
                )
            connection.process_data_events(time_limit=min(left, 1.0))
    finally:
        if connection.is_open:
            connection.close()

    props, reply_body = replies[0]
    status = int((props.headers or {}).get(STATUS_HEADER, 0))
    try:
        reply = json.loads(reply_body)
    except ValueError as e:
        raise Failure(f"the reply is not JSON: {reply_body[:200]!r}") from e
    print(f"REPLY {status} {json.dumps(reply)}", flush=True)
    if status != 200:
        raise Failure(f"the service did not store the event: {status} {reply.get('error', reply)}")
    return status, reply


def wait_for_run(cfg: dict, event_id: str) -> dict:
    """Read the event back (`GET /api/v2/events/{id}`) until it has a job run."""
    url = f"{cfg['api_url']}/api/v2/events/{urllib.parse.quote(event_id, safe='')}"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {cfg['api_key']}", "Accept": "application/json"}
    )
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    last = None
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                last = json.loads(response.read())
                if last.get("runs"):
                    return last
        except urllib.error.HTTPError as e:
            if e.code != 404:  # 404: not stored yet (or another environment's key)
                raise Failure(f"GET {url}: {e.code} {e.read()[:300]!r}") from e
            last = {"status": 404}
        except urllib.error.URLError as e:
            raise Failure(f"GET {url}: {e.reason} (is KONGFLOW_API_URL right?)") from e
        if time.monotonic() > deadline:
            raise Failure(
                f"event {event_id!r} has no run after {RUN_TIMEOUT_SECONDS:.0f} s (last: "
                f"{json.dumps(last)}). Is a job registered for event "
                f"{cfg['event_name']!r} and this source (PUT /api/v1/jobs/<id>), and a worker "
                "running?"
            )
        time.sleep(0.5)


def main() -> None:
    cfg = config()
    body = {
        "event": {
            "name": cfg["event_name"],
            "payload": {"orderId": "ord_1001", "amount": 4200, "currency": "EUR"},
            "context": {"producer": "examples/python/publish.py"},
        },
        # "options": {"deliverAfter": 60, "accountId": "acct_42"},
    }
    if cfg["event_source"]:
        body["event"]["source"] = cfg["event_source"]
    properties = pika.BasicProperties(
        content_type="application/json",
        # The event id. Publishing the same message again (say after a lost confirm) is
        # the same event: the service stores it once. `event.id` in the body works too
        # (if both are set they must be equal); with neither, the id is derived from the
        # body's SHA-256.
        message_id=cfg["event_id"],
        headers={
            API_KEY_HEADER: cfg["api_key"],
            VERSION_HEADER: 1,
            "traceparent": traceparent(),
        },
    )
    _, reply = publish_with_reply(cfg, json.dumps(body).encode(), properties)
    event = wait_for_run(cfg, reply["id"])
    print(f"RESULT {json.dumps(event)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
