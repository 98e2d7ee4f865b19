// The reference: trigger.dev v2's eventFilterMatches (@trigger.dev/core 2.3.x). Reads a JSON
// array of {payload?, filter} from stdin (an absent payload is `undefined`) and writes the
// array of results: true, false, or "throw" where the reference throws.
import { createRequire } from "node:module";

const { eventFilterMatches } = createRequire(import.meta.url)("@trigger.dev/core");

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((c) => {
  try {
    return eventFilterMatches("payload" in c ? c.payload : undefined, c.filter);
  } catch {
    return "throw";
  }
});
process.stdout.write(JSON.stringify(results));
