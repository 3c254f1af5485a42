// Waiting on real sockets and processes in the tests that use them: bounded, so a
// state that never comes is a failure, not a hang.

export const WAIT = 5000; // ms any single wait may take

/** Resolves when `condition()` holds (checked every 5 ms); rejects after `ms`. */
export async function until(condition, what, ms = WAIT) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
