#!/usr/bin/env python3
"""A minimal runs service: consume the run hand-off of kongflow-events and start each run once.

The service publishes a message for every run it creates (`run.created`) and for every run
`cancel-runs` cancels (`run.cancelled`) to the exchange `<prefix>.runs`; its durable queue
`<prefix>.runs` keeps them until a runs service takes them. The contract is
`rabbitmq/schemas/run-created.v1.schema.json` and `run-cancelled.v1.schema.json`.

What a runs service must do, and this one does:

1. consume with manual acknowledgements and a bounded prefetch, and acknowledge a message
   only once its effect is recorded (here: in memory; a real service records the run in its
   own database, in the transaction that acknowledges, or keyed by run id);
2. drop a message whose `message_id` it has seen: the hand-off is at-least-once, and a
   repeat always carries the same `message_id` (`<runId>:created`, `<runId>:cancelled`);
3. refuse a contract version it does not know (the AMQP `type`, `run.created.v1`): such a
   message is rejected without requeue (to a dead-letter exchange of the runs service's
   own, in production) rather than guessed at;
4. never start a run it saw cancelled, whichever of the two messages came first.

Configuration (environment variables):
  AMQP_URL       default amqp://guest:guest@127.0.0.1:5672/%2f
  AMQP_PREFIX    default kongflow (the service's AMQP_PREFIX)
  RUNS_QUEUE     default <prefix>.runs
  IDLE_SECONDS   stop after this long without a message (default: run until interrupted)
  VALIDATE       1: check every body against the JSON Schemas (needs jsonschema)

Each run it starts is printed as `STARTED <runId> <jobSlug> <event name>`; when it stops,
the last line is `RESULT {"started": [...], "cancelled": [...], "duplicates": n,
"refused": [...]}`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import pika

KNOWN_TYPES = {"run.created.v1", "run.cancelled.v1"}
SCHEMAS = {
    "run.created.v1": "run-created.v1.schema.json",
    "run.cancelled.v1": "run-cancelled.v1.schema.json",
}


def validators() -> dict:
    """The JSON Schema validator of each known type, if VALIDATE=1."""
    if os.environ.get("VALIDATE") != "1":
        return {}
    import jsonschema

    root = pathlib.Path(__file__).resolve().parents[2] / "rabbitmq" / "schemas"
    found = {}
    for kind, file in SCHEMAS.items():
        schema = json.loads((root / file).read_text())
        found[kind] = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.FormatChecker()
        )
    return found


class RunsService:
    def __init__(self, check: dict) -> None:
        self.check = check
        self.seen: set[str] = set()
        self.started: list[str] = []
        self.cancelled: set[str] = set()
        self.duplicates = 0
        self.refused: list[str] = []

    def handle(self, properties: pika.BasicProperties, body: bytes) -> None:
        """Record one message's effect. Raises ValueError for a message to refuse."""
        kind = properties.type
        if kind not in KNOWN_TYPES:
            raise ValueError(f"unknown message type {kind!r}")
        message_id = properties.message_id
        if not message_id:
            raise ValueError("a hand-off message without message_id")
        if message_id in self.seen:
            self.duplicates += 1
            return
        message = json.loads(body)
        validator = self.check.get(kind)
        if validator is not None:
            errors = sorted(validator.iter_errors(message), key=str)
            if errors:
                raise ValueError(f"{message_id}: {errors[0].message}")
        run_id = message["runId"]
        if kind == "run.cancelled.v1":
            self.cancelled.add(run_id)
        elif run_id in self.cancelled:
            print(f"SKIPPED {run_id} (cancelled)", flush=True)
        else:
            # Here a real service would start the run.
            self.started.append(run_id)
            print(f"STARTED {run_id} {message['jobSlug']} {message['event']['name']}", flush=True)
        self.seen.add(message_id)

    def result(self) -> dict:
        return {
            "started": self.started,
            "cancelled": sorted(self.cancelled),
            "duplicates": self.duplicates,
            "refused": self.refused,
        }


def main() -> int:
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    prefix = os.environ.get("AMQP_PREFIX", "kongflow")
    queue = os.environ.get("RUNS_QUEUE", f"{prefix}.runs")
    idle = float(os.environ["IDLE_SECONDS"]) if os.environ.get("IDLE_SECONDS") else None
    service = RunsService(validators())
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)
    last = time.monotonic()
    try:
        # consume() yields (None, None, None) after inactivity_timeout without a message.
        for method, properties, body in channel.consume(queue, inactivity_timeout=0.5):
            if method is None:
                if idle is not None and time.monotonic() - last >= idle:
                    break
                continue
            last = time.monotonic()
            try:
                service.handle(properties, body)
            except (ValueError, KeyError, json.JSONDecodeError) as e:
                service.refused.append(f"{properties.message_id}: {e}")
                print(f"REFUSED {e}", file=sys.stderr, flush=True)
                channel.basic_reject(method.delivery_tag, requeue=False)
                continue
            channel.basic_ack(method.delivery_tag)
    except KeyboardInterrupt:
        pass
    finally:
        channel.cancel()
        connection.close()
    print("RESULT " + json.dumps(service.result()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
