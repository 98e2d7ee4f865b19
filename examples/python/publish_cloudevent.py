#!/usr/bin/env python3
"""Publish one CloudEvent to kongflow-events over AMQP and read it back.

The event is built with the CloudEvents Python SDK (`cloudevents` 2.x, `cloudevents.core`)
and encoded by one of the SDK's own protocol bindings; the rest of the flow (confirms,
`mandatory`, direct reply-to, the HTTP read-back) is publish.py's.

The SDK has two bindings for this broker, and kongflow-events reads what each writes,
unchanged:

* `cloudevents.core.bindings.rabbitmq` (the knative eventing-rabbitmq binding, for
  AMQP 0-9-1): structured mode (CE_MODE=structured, the default) gives a `content_type`
  of `application/cloudevents+json` and the whole event as the body; binary mode
  (CE_MODE=binary) puts the attributes in `ce-` headers and the data in the body.

* `cloudevents.core.bindings.amqp` (the CloudEvents AMQP binding, written for AMQP 1.0):
  binary mode (CE_MODE=amqp) puts the attributes in `cloudEvents_` application
  properties, sent here as headers, `time` as milliseconds since the epoch, and the
  data's type in a `content-type` property.

Either way the event's `type` is the event name, `source` its source, `id` its id (the
same id twice is one event), `data` its payload; `subject` and the other attributes land
in the event's context.

Configuration: publish.py's variables (KONGFLOW_API_KEY required, AMQP_URL, AMQP_PREFIX,
KONGFLOW_API_URL, EVENT_NAME, EVENT_ID) and
  EVENT_SOURCE   the CloudEvent's source; default `trigger.dev`, the source a job trigger
                 that names none (`{"event": "order.paid"}`) matches. A job triggered by
                 CloudEvents from `/shop/orders` registers `"source": "/shop/orders"`.
  CE_MODE        structured (default), binary or amqp

The last line printed is `RESULT <event JSON>`. Any failure exits non-zero with a message.
"""

from __future__ import annotations

import json
import os
import sys

import pika
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.v1.event import CloudEvent

from publish import (
    API_KEY_HEADER,
    VERSION_HEADER,
    Failure,
    config,
    publish_with_reply,
    traceparent,
    wait_for_run,
)


def structured(event: CloudEvent) -> tuple[bytes, pika.BasicProperties]:
    """The SDK's RabbitMQ binding, structured mode, as it comes."""
    message = ce_rabbitmq.to_structured_event(event)
    properties = pika.BasicProperties(
        content_type=message.content_type,  # application/cloudevents+json
        headers=dict(message.headers),  # none in structured mode
    )
    return message.body, properties


def binary(event: CloudEvent) -> tuple[bytes, pika.BasicProperties]:
    """The SDK's RabbitMQ binding, binary mode: `ce-` headers, the data as the body."""
    message = ce_rabbitmq.to_binary_event(event)
    properties = pika.BasicProperties(
        content_type=message.content_type,  # the datacontenttype
        headers=dict(message.headers),
    )
    return message.body, properties


def amqp_binding(event: CloudEvent) -> tuple[bytes, pika.BasicProperties]:
    """The SDK's AMQP binding, binary mode: its application properties as headers."""
    message = ce_amqp.to_binary_event(event)
    headers = {**message.application_properties, **message.properties}
    return message.application_data, pika.BasicProperties(headers=headers)


MODES = {"structured": structured, "binary": binary, "amqp": amqp_binding}


def main() -> None:
    cfg = config()
    mode = os.environ.get("CE_MODE", "structured")
    if mode not in MODES:
        raise Failure(f"CE_MODE must be one of {', '.join(MODES)}, not {mode!r}")
    event = CloudEvent(
        attributes={
            "id": cfg["event_id"],
            "type": cfg["event_name"],
            "source": cfg["event_source"] or "trigger.dev",
            "subject": "ord_1001",
            "datacontenttype": "application/json",
            # Extensions kongflow-events reads as send options (all optional):
            # "deliverafter": 60, "deliverat": "2030-01-01T00:00:00Z", "accountid": "acct_42",
        },
        data={"orderId": "ord_1001", "amount": 4200, "currency": "EUR"},
    )
    body, properties = MODES[mode](event)
    properties.message_id = cfg["event_id"]  # informative: the CloudEvent's id is the id
    properties.headers = {
        **(properties.headers or {}),
        API_KEY_HEADER: cfg["api_key"],
        VERSION_HEADER: 1,
        "traceparent": traceparent(),
    }
    _, reply = publish_with_reply(cfg, body, properties)
    event_log = wait_for_run(cfg, reply["id"])
    print(f"RESULT {json.dumps(event_log)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
