// Drives kongflow-events with trigger.dev's v2 SDK (@trigger.dev/sdk 2.3.x), unchanged:
// TriggerClient with apiUrl pointed at the service. Every call's result is checked and
// printed as one JSON line; any failure exits non-zero.
//
// KONGFLOW_URL, KONGFLOW_KEY: the service and an API key. The job listening to `sdk.*`
// events is registered by the caller.
import { TriggerClient } from "@trigger.dev/sdk";
import assert from "node:assert/strict";

const client = new TriggerClient({
  id: "kongflow-sdk-test",
  apiKey: process.env.KONGFLOW_KEY,
  apiUrl: process.env.KONGFLOW_URL,
});

const started = Date.now();
const report = (call, result) => console.log(JSON.stringify({ call, ms: Date.now() - started, result }));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitForRuns(id, n) {
  for (let i = 0; i < 200; i++) {
    const event = await client.getEvent(id);
    if (event.runs.length >= n) return event;
    await sleep(50);
  }
  throw new Error(`event ${id} never got ${n} runs`);
}

// sendEvent without an id: one is generated.
const plain = await client.sendEvent({ name: "sdk.plain", payload: { n: 1 } });
assert.equal(plain.name, "sdk.plain");
assert.deepEqual(plain.payload, { n: 1 });
assert.ok(plain.id.length > 0);
assert.ok(plain.timestamp instanceof Date);
report("sendEvent", plain);

// sendEvent with an id; sending it again returns the stored event.
const withId = await client.sendEvent({ id: "sdk-1", name: "sdk.plain", payload: { n: 2 }, context: { c: true } });
assert.equal(withId.id, "sdk-1");
assert.deepEqual(withId.context, { c: true });
const again = await client.sendEvent({ id: "sdk-1", name: "sdk.plain", payload: { n: 3 } });
assert.deepEqual(again.payload, { n: 2 });
report("sendEvent (id, twice)", again);

// getEvent: the event with its run.
const got = await waitForRuns("sdk-1", 1);
assert.equal(got.id, "sdk-1");
assert.equal(got.runs.length, 1);
assert.equal(got.runs[0].status, "QUEUED");
assert.ok(got.createdAt instanceof Date);
report("getEvent", got);

// sendEvent with deliverAfter, then cancelEvent before it is due.
const delayed = await client.sendEvent({ id: "sdk-later", name: "sdk.plain", payload: {} }, { deliverAfter: 60 });
const ahead = delayed.deliverAt.getTime() - Date.now();
assert.ok(ahead > 55_000 && ahead <= 60_000, `deliverAt ${ahead} ms ahead`);
report("sendEvent (deliverAfter)", delayed);
const cancelled = await client.cancelEvent("sdk-later");
assert.ok(cancelled.cancelledAt instanceof Date);
assert.equal(cancelled.deliveredAt ?? null, null);
report("cancelEvent", cancelled);
const cancelledTwice = await client.cancelEvent("sdk-later");
assert.equal(cancelledTwice.cancelledAt.getTime(), cancelled.cancelledAt.getTime());

// sendEvent with deliverAt a little ahead: delivered at its time.
const at = new Date(Date.now() + 1500);
const scheduled = await client.sendEvent({ id: "sdk-at", name: "sdk.plain", payload: {} }, { deliverAt: at });
assert.equal(scheduled.deliverAt.getTime(), at.getTime());
const ran = await waitForRuns("sdk-at", 1);
assert.ok(Date.now() >= at.getTime());
report("sendEvent (deliverAt)", ran);

// sendEvents: all stored, each with its log.
const many = await client.sendEvents([
  { id: "sdk-b1", name: "sdk.bulk", payload: { i: 1 } },
  { id: "sdk-b2", name: "sdk.bulk", payload: { i: 2 } },
  { name: "sdk.bulk", payload: { i: 3 } },
]);
assert.equal(many.length, 3);
assert.deepEqual(many.map((e) => e.payload.i), [1, 2, 3]);
report("sendEvents", many);
const delayedMany = await client.sendEvents(
  [{ id: "sdk-b4", name: "sdk.bulk", payload: {} }],
  { deliverAfter: 30 },
);
assert.ok(delayedMany[0].deliverAt.getTime() - Date.now() > 25_000);
report("sendEvents (deliverAfter)", delayedMany);

// cancelRunsForEvent: the queued run is cancelled.
await waitForRuns("sdk-b1", 1);
const cancelRuns = await client.cancelRunsForEvent("sdk-b1");
assert.equal(cancelRuns.cancelledRunIds.length, 1);
assert.deepEqual(cancelRuns.failedToCancelRunIds, []);
report("cancelRunsForEvent", cancelRuns);
const afterCancel = await client.getEvent("sdk-b1");
assert.equal(afterCancel.runs[0].status, "CANCELED");

// Errors surface with the service's `error` message. (The SDK retries every failed call
// with backoff before it gives up: about 10 s.)
await assert.rejects(client.getEvent("no-such-event"), /event "no-such-event" not found/);
report("errors", "getEvent of an unknown id is rejected with the service's message");
console.log(JSON.stringify({ done: true }));
