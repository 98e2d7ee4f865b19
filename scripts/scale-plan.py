#!/usr/bin/env python3
"""The deployment for a target event rate, from what one event measured costs.

Reads the per-event costs `scripts/bench.sh costs` writes (default: the figures kept in
docs/scaling-costs.json, measured flat out) and prints, for each target rate, the Postgres
nodes, RabbitMQ nodes, queues and shards, and service replicas it takes, and which limit
binds first. Every capacity that is not measured here is a flag with its default, so a
reader with other hardware puts in their own:

  scripts/scale-plan.py [--costs FILE] [--quorum-costs FILE] [--rates 1000,10000,100000]
                        [--pg-cores 16] [--wal-mb-s 150] [--mq-cores 8] [--queue-msgs 15000]
                        [--pod-cores 2] [--utilization 0.6]

How each line is reckoned is in docs/scaling.md ("The simulation").
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_COSTS = os.path.join(HERE, "..", "docs", "scaling-costs.json")

# The kinds of message one event sends through RabbitMQ, each to its own queue (per shard):
# deliverEvent, events.invokeDispatcher, and the run hand-off (P.runs).
QUEUES_PER_SHARD = 3


def load(path, key=None):
    with open(path) as f:
        costs = json.load(f)
    return costs[key] if key else costs


def quorum_ms(c, q, a):
    """RabbitMQ CPU ms per event on a quorum cluster: the leader does the measured
    single-node work (quorum costs when measured, else classic), each of two followers
    --follower-share of it."""
    return (q or c)["cpu_ms_per_event"]["rabbitmq"] * (1 + 2 * a.follower_share)


def plan(rate, c, q, a):
    """One target rate: what each part needs, as a dict of figures and the bottleneck."""
    u = a.utilization
    cpu = c["cpu_ms_per_event"]
    # Postgres: CPU and WAL. One primary carries rate up to both limits; above it the
    # tables are distributed by environment (Citus), each worker node a primary of its own
    # taking its environments' share (a coordinator routes, or the service connects to the
    # workers: Citus's query-from-any-node).
    pg_cores = rate * cpu["postgres"] / 1000 / u
    wal_mb_s = rate * c["wal_bytes_per_event"] / 1e6
    pg_nodes_cpu = math.ceil(pg_cores / a.pg_cores)
    pg_nodes_wal = math.ceil(wal_mb_s / (a.wal_mb_s * u))
    pg_nodes = max(1, pg_nodes_cpu, pg_nodes_wal)
    # RabbitMQ: quorum queues (three replicas) on a cluster of at least three nodes.
    mq_cores = rate * quorum_ms(c, q, a) / 1000 / u
    mq_nodes = max(3, math.ceil(mq_cores / a.mq_cores))
    # A queue is one Erlang process: one core at most. Each kind's queue takes one message
    # per event (published and delivered), so the shards per kind are the rate over what
    # one queue carries.
    shards = max(1, math.ceil(rate / (a.queue_msgs * u)))
    # The service: API (serve), relay, worker, each a Deployment of pods of --pod-cores.
    serve = rate * cpu["serve"] / 1000 / u
    worker = rate * cpu["worker"] / 1000 / u
    relay = rate * cpu["relay"] / 1000 / u
    replicas = {
        "serve": max(2, math.ceil(serve / a.pod_cores)),
        "worker": max(2, math.ceil(worker / a.pod_cores)),
        "relay": max(2, math.ceil(relay / a.pod_cores)),
    }
    # The bottleneck at this step: with the deployment above (nodes, shards, replicas),
    # the unit nearest its end, the first to saturate as the rate grows.
    limits = {
        "Postgres CPU": pg_cores / (a.pg_cores * pg_nodes),
        "Postgres WAL": wal_mb_s / (a.wal_mb_s * u * pg_nodes),
        "queue core": rate / (a.queue_msgs * u * shards),
        "RabbitMQ CPU": mq_cores / (a.mq_cores * mq_nodes),
        "worker pods": worker / (a.pod_cores * replicas["worker"]),
        "serve pods": serve / (a.pod_cores * replicas["serve"]),
    }
    bottleneck = max(limits, key=limits.get)
    return {
        "rate": rate,
        "pg_cores": pg_cores,
        "wal_mb_s": wal_mb_s,
        "pg_nodes": pg_nodes,
        "mq_cores": mq_cores,
        "mq_nodes": mq_nodes,
        "shards": shards,
        "queues": shards * QUEUES_PER_SHARD,
        "msgs_s": rate * (c["broker_published_per_event"] + c["broker_delivered_per_event"]),
        "replicas": replicas,
        "bottleneck": bottleneck,
        "load": limits[bottleneck],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--costs", default=DEFAULT_COSTS,
                   help="per-event costs (bench.sh costs' JSON, or docs/scaling-costs.json)")
    p.add_argument("--quorum-costs", default=None,
                   help="the same measured with AMQP_QUEUE_TYPE=quorum (default: the costs "
                        "file's 'quorum' entry when it has one)")
    p.add_argument("--rates", default="1000,10000,100000")
    p.add_argument("--pg-cores", type=float, default=16, help="cores of one Postgres node")
    p.add_argument("--wal-mb-s", type=float, default=150,
                   help="WAL one primary writes and ships to its standby, MB/s (assumed)")
    p.add_argument("--mq-cores", type=float, default=8, help="cores of one RabbitMQ node")
    p.add_argument("--queue-msgs", type=float, default=15000,
                   help="messages/s one queue carries, published and consumed")
    p.add_argument("--follower-share", type=float, default=0.5,
                   help="a quorum follower's CPU per message over its leader's (assumed)")
    p.add_argument("--pod-cores", type=float, default=2, help="cores of one service pod")
    p.add_argument("--utilization", type=float, default=0.6,
                   help="the share of each resource planned busy (headroom for bursts)")
    a = p.parse_args()

    raw = load(a.costs)
    c = raw.get("flat", raw)
    q = load(a.quorum_costs) if a.quorum_costs else raw.get("quorum")
    cpu = c["cpu_ms_per_event"]
    u = a.utilization
    print(f"Per event (measured {c.get('measured_at', '?')}, {c.get('events', '?')} events flat out):")
    print(f"  Postgres {cpu['postgres']} ms CPU, {c['wal_bytes_per_event']} WAL bytes, "
          f"{c['statements_per_event']} statements (+{c.get('nested_statements_per_event', 0)} "
          f"in functions), {c['row_versions_per_event']} row versions")
    mq_line = f"{cpu['rabbitmq']} ms (classic)"
    if q:
        mq_line += f", {q['cpu_ms_per_event']['rabbitmq']} ms (quorum, one node)"
    print(f"  RabbitMQ {c['broker_published_per_event']} messages published, "
          f"{c['broker_delivered_per_event']} delivered, CPU {mq_line}")
    print(f"  service  serve {cpu['serve']} ms, worker {cpu['worker']} ms, relay {cpu['relay']} ms CPU")
    print()
    mq_ms = quorum_ms(c, q, a)
    one_pg = min(a.pg_cores * 1000 / cpu["postgres"], a.wal_mb_s * 1e6 / c["wal_bytes_per_event"]) * u
    print(f"What one unit carries at {u:.0%} busy:")
    print(f"  one Postgres primary ({a.pg_cores:g} cores, {a.wal_mb_s:g} MB/s WAL): "
          f"{one_pg:,.0f} events/s (CPU {a.pg_cores * 1000 / cpu['postgres'] * u:,.0f}, "
          f"WAL {a.wal_mb_s * 1e6 / c['wal_bytes_per_event'] * u:,.0f})")
    print(f"  one RabbitMQ node ({a.mq_cores:g} cores, quorum, 3 replicas): "
          f"{a.mq_cores * 1000 / mq_ms * u:,.0f} events/s; one queue: {a.queue_msgs * u:,.0f} events/s")
    print(f"  one worker core: {1000 / cpu['worker'] * u:,.0f} events/s; "
          f"one serve core: {1000 / cpu['serve'] * u:,.0f} events/s")
    print()
    head = (f"{'events/s':>9} | {'PG cores':>8} {'WAL MB/s':>8} {'PG nodes':>8} | "
            f"{'MQ msgs/s':>9} {'MQ cores':>8} {'MQ nodes':>8} {'shards':>6} {'queues':>6} | "
            f"{'serve':>5} {'worker':>6} {'relay':>5} | bottleneck (its load)")
    print(head)
    print("-" * len(head))
    for rate in (int(r) for r in a.rates.split(",")):
        r = plan(rate, c, q, a)
        rep = r["replicas"]
        print(f"{rate:>9,} | {r['pg_cores']:>8.1f} {r['wal_mb_s']:>8.1f} {r['pg_nodes']:>8} | "
              f"{r['msgs_s']:>9,.0f} {r['mq_cores']:>8.1f} {r['mq_nodes']:>8} {r['shards']:>6} "
              f"{r['queues']:>6} | {rep['serve']:>5} {rep['worker']:>6} {rep['relay']:>5} | "
              f"{r['bottleneck']} ({r['load']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
