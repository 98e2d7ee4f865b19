// Publish one event to kongflow-events over AMQP (the native form) and read it back.
//
// 1. a confirm channel: once the broker confirms, it holds the message, and the service
//    will store it unless it rejects it;
// 2. consume the direct reply-to pseudo-queue (`amq.rabbitmq.reply-to`, no ack) on that
//    channel before publishing, so the service's answer comes back here;
// 3. publish `{"event": ..., "options": ...}` (the body of `POST /api/v1/events`) to the
//    exchange `<prefix>.ingest`, routing key `send`, `mandatory` (a message no queue takes
//    comes back instead of vanishing), persistent, the event id as `messageId`, the
//    environment's API key in the `x-kongflow-api-key` header;
// 4. wait for the reply: header `x-kongflow-status` is the HTTP status the API would have
//    answered (200: stored), the body the event log or `{"error": ...}`;
// 5. read the event back over HTTP until a job run exists for it.
//
// Configuration (environment variables):
//   KONGFLOW_API_KEY  the environment's API key (required; `kongflow-events env create`)
//   AMQP_URL          default amqp://guest:guest@127.0.0.1:5672/%2f
//   AMQP_PREFIX       default kongflow (the service's AMQP_PREFIX)
//   KONGFLOW_API_URL  default http://127.0.0.1:3030
//   EVENT_NAME        default order.paid
//   EVENT_ID          default a new UUID
//   EVENT_SOURCE      default unset: the service's default source, `trigger.dev`, which a
//                     job trigger that names no source matches
//
// The last line printed is `RESULT <event JSON>`. Any failure exits non-zero.

import { randomBytes, randomUUID } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import amqp from 'amqplib';

const REPLY_TIMEOUT_MS = 15_000;
const RUN_TIMEOUT_MS = 30_000;
const ROUTING_KEY = 'send';
const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';

class Failure extends Error {}

function config() {
  const apiKey = (process.env.KONGFLOW_API_KEY ?? '').trim();
  if (!apiKey) {
    throw new Failure(
      'KONGFLOW_API_KEY is not set: create a key with ' +
        '`kongflow-events env create <org>/<project>/<env>` (it prints the key last)',
    );
  }
  return {
    amqpUrl: process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f',
    prefix: process.env.AMQP_PREFIX || 'kongflow',
    apiUrl: (process.env.KONGFLOW_API_URL || 'http://127.0.0.1:3030').replace(/\/+$/, ''),
    apiKey,
    eventName: process.env.EVENT_NAME || 'order.paid',
    eventId: process.env.EVENT_ID || randomUUID(),
    eventSource: process.env.EVENT_SOURCE || undefined,
  };
}

/** Publish one message and wait for the service's reply: `{status, reply}`. */
async function publishWithReply(cfg, body, options) {
  const exchange = `${cfg.prefix}.ingest`;
  const correlationId = randomUUID();
  let conn;
  try {
    conn = await amqp.connect(cfg.amqpUrl);
  } catch (e) {
    throw new Failure(`cannot connect to RabbitMQ at AMQP_URL: ${e.message}`);
  }
  try {
    const channel = await conn.createConfirmChannel();
    let channelError;
    channel.on('error', (e) => {
      channelError = e;
    });
    // A `mandatory` message no queue takes comes back (basic.return) before its confirm.
    let returned;
    channel.on('return', (msg) => {
      returned = msg.fields;
    });
    let onReply;
    const reply = new Promise((resolve) => {
      onReply = resolve;
    });
    await channel.consume(
      DIRECT_REPLY_TO,
      (msg) => {
        if (msg && msg.properties.correlationId === correlationId) onReply(msg);
      },
      { noAck: true },
    );
    channel.publish(exchange, ROUTING_KEY, Buffer.from(body), {
      ...options,
      mandatory: true,
      persistent: true,
      replyTo: DIRECT_REPLY_TO,
      correlationId,
    });
    try {
      await channel.waitForConfirms();
    } catch (e) {
      const why = channelError ? channelError.message : e.message;
      throw new Failure(
        `the broker did not take the message: ${why}. Does the exchange ${exchange} ` +
          `exist (is the service running with AMQP_PREFIX=${cfg.prefix})?`,
      );
    }
    if (returned) {
      throw new Failure(
        `the broker returned the message (${returned.replyCode} ${returned.replyText}): no ` +
          `queue is bound to ${exchange} with key ${ROUTING_KEY}. Is the service running ` +
          `with AMQP_PREFIX=${cfg.prefix}?`,
      );
    }
    // Confirmed: the broker holds the message. Now the service's answer.
    let timer;
    const timeout = new Promise((resolve) => {
      timer = setTimeout(resolve, REPLY_TIMEOUT_MS, null);
    });
    const msg = await Promise.race([reply, timeout]);
    clearTimeout(timer);
    if (!msg) {
      throw new Failure(
        `no reply within ${REPLY_TIMEOUT_MS / 1000} s: is the service's ingest consuming ` +
          `${exchange}? (The message is in the broker; it is stored once a consumer takes it.)`,
      );
    }
    const status = Number(msg.properties.headers?.['x-kongflow-status'] ?? 0);
    let parsed;
    try {
      parsed = JSON.parse(msg.content.toString('utf8'));
    } catch {
      throw new Failure(`the reply is not JSON: ${msg.content.toString('utf8').slice(0, 200)}`);
    }
    console.log(`REPLY ${status} ${JSON.stringify(parsed)}`);
    if (status !== 200) {
      throw new Failure(`the service did not store the event: ${status} ${parsed.error ?? ''}`);
    }
    return { status, reply: parsed };
  } finally {
    await conn.close().catch(() => {});
  }
}

/** Read the event back (`GET /api/v2/events/{id}`) until it has a job run. */
async function waitForRun(cfg, eventId) {
  const url = `${cfg.apiUrl}/api/v2/events/${encodeURIComponent(eventId)}`;
  const deadline = Date.now() + RUN_TIMEOUT_MS;
  let last;
  for (;;) {
    let response;
    try {
      response = await fetch(url, {
        headers: { Authorization: `Bearer ${cfg.apiKey}`, Accept: 'application/json' },
      });
    } catch (e) {
      throw new Failure(`GET ${url}: ${e.cause?.message ?? e.message} (is KONGFLOW_API_URL right?)`);
    }
    if (response.ok) {
      last = await response.json();
      if (Array.isArray(last.runs) && last.runs.length > 0) return last;
    } else if (response.status === 404) {
      last = { status: 404 }; // not stored yet (or another environment's key)
    } else {
      throw new Failure(`GET ${url}: ${response.status} ${(await response.text()).slice(0, 300)}`);
    }
    if (Date.now() > deadline) {
      throw new Failure(
        `event ${eventId} has no run after ${RUN_TIMEOUT_MS / 1000} s (last: ` +
          `${JSON.stringify(last)}). Is a job registered for event ${cfg.eventName} and ` +
          'this source (PUT /api/v1/jobs/<id>), and a worker running?',
      );
    }
    await sleep(500);
  }
}

async function main() {
  const cfg = config();
  const body = {
    event: {
      name: cfg.eventName,
      payload: { orderId: 'ord_1001', amount: 4200, currency: 'EUR' },
      context: { producer: 'examples/node/publish.mjs' },
      ...(cfg.eventSource ? { source: cfg.eventSource } : {}),
    },
    // options: { deliverAfter: 60, accountId: 'acct_42' },
  };
  const { reply } = await publishWithReply(cfg, JSON.stringify(body), {
    contentType: 'application/json',
    // The event id: the same message published again (say after a lost confirm) is the
    // same event, stored once. `event.id` in the body works too (both set: equal); with
    // neither, the id is derived from the body's SHA-256.
    messageId: cfg.eventId,
    headers: {
      'x-kongflow-api-key': cfg.apiKey,
      'x-kongflow-version': 1,
      // Optional W3C trace context; the event's job runs carry it on.
      traceparent: `00-${randomBytes(16).toString('hex')}-${randomBytes(8).toString('hex')}-01`,
    },
  });
  const event = await waitForRun(cfg, reply.id);
  console.log(`RESULT ${JSON.stringify(event)}`);
}

try {
  await main();
} catch (e) {
  console.error(`error: ${e instanceof Failure ? e.message : e.stack}`);
  process.exitCode = 1;
}
