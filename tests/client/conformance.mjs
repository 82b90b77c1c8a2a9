// Conformance of Tollgate with the official `openai` npm client.
//
// Runs the client against a running gateway and checks what an application
// would rely on: completions with exact usage, streams assembled chunk by
// chunk with the usage chunk present only when asked for, a cut stream
// raising, embeddings, the model list, the client's typed errors built from
// our error bodies, and its retries (the default two, where a check says so:
// none for a status that will not change, Retry-After's wait for a shed).
// Reference numbers come from the simulator itself.
//
// Environment:
//   TG_BASE_URL    gateway API base, e.g. http://127.0.0.1:8080/v1
//   TG_KEY         key of a tenant allowed every model below
//   TG_SMALL_KEY   key of a tenant allowed TG_MODEL only
//   TG_LIMITED_KEY key of a tenant allowed TG_MODEL with requests_per_minute 1
//   TG_BROKE_KEY   key of a tenant whose daily budget is below any request's
//   TG_CAPPED_KEY  key of a tenant with requests_per_minute 1 and a daily
//                  budget one 40-token answer nearly spends
//   TG_SINGLE_KEY  key of a tenant allowed TG_MODEL with concurrent_requests 1
//   TG_OPS_KEY     key of a tenant allowed TG_MODEL, dead-model (no server
//                  answers), busy-model (one slot, the gateway's queue_max 0)
//                  error-event-model (a stream: a token, an error event, [DONE])
//                  and org/slashed-model
//   TG_SIM_URL     the simulator behind the gateway (for reference usage)
//   TG_MODEL, TG_DENIED_MODEL, TG_EMBED_MODEL   model names (defaults below)
//
// Prints one "ok"/"not ok" line per check and a closing "N passed, N failed";
// exits 0 only when every check passed.

import OpenAI from 'openai';

const env = (name, def) => {
  const v = process.env[name] ?? def;
  if (v === undefined) {
    console.error(`conformance: ${name} is not set`);
    process.exit(2);
  }
  return v;
};

const baseURL = env('TG_BASE_URL');
const key = env('TG_KEY');
const smallKey = env('TG_SMALL_KEY');
const limitedKey = env('TG_LIMITED_KEY');
const brokeKey = env('TG_BROKE_KEY');
const cappedKey = env('TG_CAPPED_KEY');
const opsKey = env('TG_OPS_KEY');
const singleKey = env('TG_SINGLE_KEY');
const simURL = env('TG_SIM_URL');
const MODEL = env('TG_MODEL', 'llama-3.1-8b');
const DENIED = env('TG_DENIED_MODEL', 'llama-3.1-70b');
const EMBED = env('TG_EMBED_MODEL', 'nomic-embed-text');

const client = new OpenAI({ apiKey: key, baseURL, maxRetries: 0, timeout: 20000 });
const small = new OpenAI({ apiKey: smallKey, baseURL, maxRetries: 0, timeout: 20000 });
const limited = new OpenAI({ apiKey: limitedKey, baseURL, maxRetries: 0, timeout: 20000 });

const MESSAGES = [{ role: 'user', content: 'Say something about gateways.' }];

class CheckError extends Error {}

function eq(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new CheckError(`${what}: got ${a}, expected ${e}`);
}

function ok(cond, what) {
  if (!cond) throw new CheckError(what);
}

// The simulator's own answer for the same request, for reference numbers.
async function simReference(path, body) {
  const r = await fetch(`${simURL}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  ok(r.status === 200, `simulator reference answered ${r.status}`);
  return r.json();
}

function expectedText(n) {
  return Array.from({ length: n }, (_, i) => `tok${i}`).join(' ');
}

// Asserts that fn() rejects with an instance of cls whose fields come from our
// error body ({"error": {"message", "type", "code"}}).
async function expectError(fn, cls, status, type, code) {
  let err;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  ok(err !== undefined, `expected ${cls.name}, the call succeeded`);
  ok(err instanceof cls, `expected ${cls.name}, got ${err?.constructor?.name}: ${err?.message}`);
  ok(err instanceof OpenAI.APIError, 'not an APIError');
  eq(err.status, status, 'status');
  eq(err.type, type, 'error.type');
  eq(err.code, code, 'error.code');
  ok(typeof err.error?.message === 'string' && err.error.message.length > 0,
    'error.message empty');
  ok(err.message.includes(err.error.message), `client message "${err.message}" lacks ours`);
  ok(typeof err.requestID === 'string' && err.requestID.length > 0, 'no x-request-id');
  return err;
}

// A client that retries as the official one does by default, recording each
// attempt's start time and status: retries are checked as the client makes them.
function retrying(apiKey, maxRetries = 2) {
  const attempts = [];
  const c = new OpenAI({
    apiKey, baseURL, maxRetries, timeout: 20000,
    fetch: async (url, init) => {
      const a = { at: Date.now(), status: null };
      attempts.push(a);
      const r = await fetch(url, init);
      a.status = r.status;
      a.retryAfterMs = r.headers.get('retry-after-ms') ?? undefined;
      if (r.status >= 400)
        a.code = await r.clone().json().then((b) => b?.error?.code, () => undefined);
      return r;
    },
  });
  return { c, attempts };
}

// Runs fn(client) with a fresh retrying client and expects the error after
// exactly one attempt: a status the client must not retry.
async function expectNoRetry(apiKey, fn, cls, status, type, code) {
  const { c, attempts } = retrying(apiKey);
  const err = await expectError(() => fn(c), cls, status, type, code);
  eq(attempts.map((a) => a.status), [status], `attempts for ${status} ${code}`);
  return err;
}

// A header of an APIError (a Headers object, or a plain one in older clients).
function headerOf(headers, name) {
  if (!headers) return undefined;
  if (typeof headers.get === 'function') return headers.get(name) ?? undefined;
  return headers[name] ?? headers[name.toLowerCase()];
}

const checks = [];
const check = (name, fn) => checks.push({ name, fn });

check('chat completion: content and usage', async () => {
  const body = { model: MODEL, messages: MESSAGES, max_tokens: 8 };
  const ref = await simReference('/v1/chat/completions', body);
  const r = await client.chat.completions.create(body);
  eq(r.object, 'chat.completion', 'object');
  eq(r.model, MODEL, 'model');
  eq(r.choices.length, 1, 'choices');
  eq(r.choices[0].message.role, 'assistant', 'role');
  eq(r.choices[0].message.content, expectedText(8), 'content');
  eq(r.choices[0].finish_reason, 'length', 'finish_reason');
  eq(r.usage.completion_tokens, 8, 'usage.completion_tokens');
  eq(r.usage.prompt_tokens, ref.usage.prompt_tokens, 'usage.prompt_tokens');
  eq(r.usage.total_tokens, ref.usage.prompt_tokens + 8, 'usage.total_tokens');
});

check('chat completion: withResponse exposes x-request-id', async () => {
  const { data, response } = await client.chat.completions
    .create({ model: MODEL, messages: MESSAGES, max_tokens: 1 })
    .withResponse();
  eq(data.usage.completion_tokens, 1, 'usage.completion_tokens');
  ok((response.headers.get('x-request-id') ?? '').length > 0, 'no x-request-id header');
});

check('streaming: text assembled, no usage chunk by default', async () => {
  const stream = await client.chat.completions.create({
    model: MODEL, messages: MESSAGES, max_tokens: 10, stream: true,
  });
  let text = '';
  let chunks = 0;
  let withUsage = 0;
  let finish = null;
  let role = null;
  for await (const chunk of stream) {
    chunks += 1;
    eq(chunk.object, 'chat.completion.chunk', 'chunk.object');
    if (chunk.usage) withUsage += 1;
    for (const ch of chunk.choices) {
      text += ch.delta?.content ?? '';
      if (ch.delta?.role) role = ch.delta.role;
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  eq(text, expectedText(10), 'assembled text');
  eq(role, 'assistant', 'the role of the first chunk');
  eq(chunks, 12, 'chunks (the role chunk, 10 tokens and the finish chunk)');
  eq(withUsage, 0, 'chunks carrying usage');
  eq(finish, 'length', 'finish_reason');
});

check('streaming: include_usage gives one final usage chunk', async () => {
  const body = { model: MODEL, messages: MESSAGES, max_tokens: 6 };
  const ref = await simReference('/v1/chat/completions', body);
  const stream = await client.chat.completions.create({
    ...body, stream: true, stream_options: { include_usage: true },
  });
  const all = [];
  for await (const chunk of stream) all.push(chunk);
  const usage = all.filter((c) => c.usage);
  eq(usage.length, 1, 'usage chunks');
  const last = all[all.length - 1];
  ok(last === usage[0], 'usage chunk is not the last one');
  eq(last.choices, [], 'usage chunk choices');
  eq(last.usage.completion_tokens, 6, 'usage.completion_tokens');
  eq(last.usage.prompt_tokens, ref.usage.prompt_tokens, 'usage.prompt_tokens');
  eq(last.usage.total_tokens, ref.usage.total_tokens, 'usage.total_tokens');
  const text = all.map((c) => c.choices[0]?.delta?.content ?? '').join('');
  eq(text, expectedText(6), 'assembled text');
});

check('streaming: abort mid-stream', async () => {
  const stream = await client.chat.completions.create(
    { model: MODEL, messages: MESSAGES, max_tokens: 200, stream: true },
    { headers: { 'x-sim-token-ms': '20' } },
  );
  let n = 0;
  for await (const chunk of stream) {
    n += chunk.choices.length;
    if (n >= 3) break; // leaving the loop aborts the request
  }
  eq(n, 3, 'chunks read before leaving');
  const r = await client.chat.completions.create({ model: MODEL, messages: MESSAGES, max_tokens: 2 });
  eq(r.usage.completion_tokens, 2, 'next request after an abort');
});

check('legacy completions', async () => {
  const r = await client.completions.create({ model: MODEL, prompt: 'Once', max_tokens: 4 });
  eq(r.choices[0].text, expectedText(4), 'text');
  eq(r.usage.completion_tokens, 4, 'usage.completion_tokens');
});

check('embeddings', async () => {
  const body = { model: EMBED, input: ['first text', 'second text'] };
  const ref = await simReference('/v1/embeddings', body);
  const r = await client.embeddings.create({ ...body, encoding_format: 'float' });
  eq(r.object, 'list', 'object');
  eq(r.data.length, 2, 'data.length');
  eq(r.data.map((d) => d.index), [0, 1], 'indexes');
  eq(r.data[0].embedding.length, ref.data[0].embedding.length, 'dimensions');
  eq(r.data[1].embedding, ref.data[1].embedding, 'vector');
  eq(r.usage.prompt_tokens, ref.usage.prompt_tokens, 'usage.prompt_tokens');
});

check('embeddings: client default base64 decoding', async () => {
  // the client asks for base64 unless told otherwise and decodes it itself
  const ref = await simReference('/v1/embeddings', { model: EMBED, input: 'third text' });
  const r = await client.embeddings.create({ model: EMBED, input: 'third text' });
  eq(r.data[0].embedding.length, ref.data[0].embedding.length, 'dimensions');
  const close = r.data[0].embedding.every((v, i) => Math.abs(v - ref.data[0].embedding[i]) < 1e-6);
  ok(close, 'decoded vector differs from the float one');
});

check('models.list: tenant and key scope', async () => {
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  eq(ids.slice().sort(), [DENIED, MODEL, EMBED].sort(), 'models of the full tenant');
  const smallIds = [];
  for await (const m of small.models.list()) smallIds.push(m.id);
  eq(smallIds, [MODEL], 'models of the small tenant');
});

check('models.retrieve: the caller\'s model, a name with a slash, 404 and 403', async () => {
  const m = await client.models.retrieve(MODEL);
  eq([m.id, m.object, m.owned_by], [MODEL, 'model', 'tollgate'], 'the model');
  const ops = new OpenAI({ apiKey: opsKey, baseURL, maxRetries: 0, timeout: 20000 });
  eq((await ops.models.retrieve('org/slashed-model')).id, 'org/slashed-model',
    'a name with a slash');
  await expectNoRetry(key, (c) => c.models.retrieve('no-such-model'),
    OpenAI.NotFoundError, 404, 'invalid_request_error', 'model_not_found');
  await expectNoRetry(smallKey, (c) => c.models.retrieve(DENIED),
    OpenAI.PermissionDeniedError, 403, 'permission_error', 'model_not_allowed');
});

check('401 AuthenticationError', async () => {
  const bad = new OpenAI({ apiKey: 'tg-000000000000-notarealsecret', baseURL, maxRetries: 0 });
  await expectError(() => bad.chat.completions.create({ model: MODEL, messages: MESSAGES }),
    OpenAI.AuthenticationError, 401, 'authentication_error', 'invalid_api_key');
  await expectError(() => bad.models.list(),
    OpenAI.AuthenticationError, 401, 'authentication_error', 'invalid_api_key');
});

check('403 PermissionDeniedError', async () => {
  await expectError(() => small.chat.completions.create({ model: DENIED, messages: MESSAGES }),
    OpenAI.PermissionDeniedError, 403, 'permission_error', 'model_not_allowed');
  await expectError(() => small.chat.completions.create(
    { model: DENIED, messages: MESSAGES, stream: true }),
  OpenAI.PermissionDeniedError, 403, 'permission_error', 'model_not_allowed');
});

check('404 NotFoundError for an unknown model', async () => {
  await expectError(() => client.chat.completions.create({ model: 'no-such-model', messages: MESSAGES }),
    OpenAI.NotFoundError, 404, 'invalid_request_error', 'model_not_found');
});

check("429 RateLimitError: the tenant's own requests_per_minute", async () => {
  // the tenant may send one request a minute: the gateway refuses the second
  const { data, response } = await limited.chat.completions
    .create({ model: MODEL, messages: MESSAGES, max_tokens: 1 })
    .withResponse();
  eq(data.usage.completion_tokens, 1, 'first request admitted');
  eq(response.headers.get('x-ratelimit-limit-requests'), '1', 'x-ratelimit-limit-requests');
  eq(response.headers.get('x-ratelimit-remaining-requests'), '0', 'x-ratelimit-remaining-requests');
  const err = await expectError(
    () => limited.chat.completions.create({ model: MODEL, messages: MESSAGES, max_tokens: 1 }),
    OpenAI.RateLimitError, 429, 'rate_limit_error', 'requests');
  const ra = headerOf(err.headers, 'retry-after');
  ok(/^[0-9]+$/.test(ra ?? '') && Number(ra) >= 1 && Number(ra) <= 60,
    `Retry-After ${ra} is not whole seconds in 1..60`);
  // retry-after-ms, which the client reads first: the limiter's wait to the
  // millisecond, Retry-After that wait rounded up
  const ms = headerOf(err.headers, 'retry-after-ms');
  ok(/^[0-9]+$/.test(ms ?? '') && Math.ceil(Number(ms) / 1000) === Number(ra),
    `retry-after-ms ${ms} is not whole ms rounding up to Retry-After ${ra}`);
  ok(/requests?[ _-]?per[ _-]?minute/i.test(err.error.message),
    `message does not name the limit: ${err.error.message}`);
  // streaming is refused the same way, before any chunk
  await expectError(
    () => limited.chat.completions.create({ model: MODEL, messages: MESSAGES, stream: true }),
    OpenAI.RateLimitError, 429, 'rate_limit_error', 'requests');
});

check('429 RateLimitError relayed from the backend', async () => {
  // a backend's own 429 (x-sim-fault forwarded) reaches the client unchanged
  const err = await expectError(
    () => client.chat.completions.create({ model: MODEL, messages: MESSAGES },
      { headers: { 'x-sim-fault': 'status:429' } }),
    OpenAI.RateLimitError, 429, err429Type(), err429Code());
  ok(err.status === 429, 'status');
});

check('500 InternalServerError relayed', async () => {
  await expectError(
    () => client.chat.completions.create({ model: MODEL, messages: MESSAGES },
      { headers: { 'x-sim-fault': 'status:500' } }),
    OpenAI.InternalServerError, 500, err500Type(), err500Code());
});

check('429 whose wait is a budget window: raised at once, not slept through', async () => {
  // the tenant's second request is refused by its requests_per_minute and by
  // its daily budget: the 429 names the first, its Retry-After waits for the
  // day to end, and the client, which sleeps whatever Retry-After says, must
  // not hang in its retries until then
  const untilMidnight = 86400000 - (Date.now() % 86400000);
  if (untilMidnight < 120000)
    return; // the day's end is as near as a minute's limit: nothing to tell apart
  const capped = new OpenAI({ apiKey: cappedKey, baseURL, maxRetries: 0, timeout: 20000 });
  const first = await capped.chat.completions.create(
    { model: MODEL, messages: MESSAGES, max_tokens: 40 });
  eq(first.usage.completion_tokens, 40, 'first request admitted');
  const { c, attempts } = retrying(cappedKey);
  let timer;
  const err = await Promise.race([
    expectError(() => c.chat.completions.create({ model: MODEL, messages: MESSAGES, max_tokens: 40 }),
      OpenAI.RateLimitError, 429, 'rate_limit_error', 'requests'),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new CheckError(
        `the client is still retrying after 5 s: ${JSON.stringify(attempts)}`)), 5000);
    }),
  ]).finally(() => clearTimeout(timer));
  const ra = headerOf(err.headers, 'retry-after');
  ok(/^[0-9]+$/.test(ra ?? '') && Number(ra) > 60 && Number(ra) <= 86400,
    `Retry-After ${ra} is not the wait until the day ends`);
  eq(headerOf(err.headers, 'x-should-retry'), 'false', 'x-should-retry');
  const ms = headerOf(err.headers, 'retry-after-ms');
  ok(/^[0-9]+$/.test(ms ?? '') && Math.ceil(Number(ms) / 1000) === Number(ra),
    `retry-after-ms ${ms} does not round up to Retry-After ${ra}`);
  eq(attempts.map((a) => a.status), [429], 'attempts');
});

check('400 BadRequestError: invalid_json, missing_model, unsupported_parameter, model_not_supported', async () => {
  await expectNoRetry(key, (c) => c.post('/chat/completions',
    { body: '{"model": "x", ', headers: { 'content-type': 'application/json' } }),
  OpenAI.BadRequestError, 400, 'invalid_request_error', 'invalid_json');
  await expectNoRetry(key, (c) => c.chat.completions.create({ messages: MESSAGES }),
    OpenAI.BadRequestError, 400, 'invalid_request_error', 'missing_model');
  await expectNoRetry(key, (c) => c.chat.completions.create(
    { model: MODEL, messages: MESSAGES, priority: 1 }),
  OpenAI.BadRequestError, 400, 'invalid_request_error', 'unsupported_parameter');
  await expectNoRetry(key, (c) => c.embeddings.create({ model: MODEL, input: 'x' }),
    OpenAI.BadRequestError, 400, 'invalid_request_error', 'model_not_supported');
});

check('401, 403, 404 are not retried', async () => {
  await expectNoRetry('tg-000000000000-notarealsecret',
    (c) => c.chat.completions.create({ model: MODEL, messages: MESSAGES }),
    OpenAI.AuthenticationError, 401, 'authentication_error', 'invalid_api_key');
  await expectNoRetry(smallKey, (c) => c.chat.completions.create({ model: DENIED, messages: MESSAGES }),
    OpenAI.PermissionDeniedError, 403, 'permission_error', 'model_not_allowed');
  await expectNoRetry(key, (c) => c.chat.completions.create({ model: 'no-such-model', messages: MESSAGES }),
    OpenAI.NotFoundError, 404, 'invalid_request_error', 'model_not_found');
  await expectNoRetry(key, (c) => c.get('/no/such/path'),
    OpenAI.NotFoundError, 404, 'invalid_request_error', 'not_found');
});

check('402 budget: APIError insufficient_quota, Retry-After, not retried', async () => {
  const err = await expectNoRetry(brokeKey,
    (c) => c.chat.completions.create({ model: MODEL, messages: MESSAGES, max_tokens: 1 }),
    OpenAI.APIError, 402, 'insufficient_quota', 'daily_budget');
  ok(Object.getPrototypeOf(err) === OpenAI.APIError.prototype,
    `402 became ${err.constructor.name}, a class the client gives another meaning`);
  const ra = headerOf(err.headers, 'retry-after');
  ok(/^[0-9]+$/.test(ra ?? '') && Number(ra) >= 1 && Number(ra) <= 86400,
    `Retry-After ${ra} is not whole seconds until the day ends`);
});

check('405, 413, 431: APIError with our codes, not retried', async () => {
  await expectNoRetry(key, (c) => c.get('/chat/completions'),
    OpenAI.APIError, 405, 'invalid_request_error', 'method_not_allowed');
  await expectNoRetry(key, (c) => c.chat.completions.create(
    { model: MODEL, messages: [{ role: 'user', content: 'x'.repeat(70000) }] }),
  OpenAI.APIError, 413, 'invalid_request_error', 'body_too_large');
  await expectNoRetry(key, (c) => c.chat.completions.create({ model: MODEL, messages: MESSAGES },
    { headers: { 'x-padding': 'y'.repeat(9000) } }),
  OpenAI.APIError, 431, 'invalid_request_error', 'headers_too_large');
});

check('502 bad_upstream_response: InternalServerError, retried', async () => {
  const { c, attempts } = retrying(key, 1);
  await expectError(() => c.chat.completions.create({ model: MODEL, messages: MESSAGES },
    { headers: { 'x-sim-fault': 'garbage' } }),
  OpenAI.InternalServerError, 502, 'server_error', 'bad_upstream_response');
  eq(attempts.map((a) => a.status), [502, 502], 'attempts');
});

check('503 no_healthy_endpoint: InternalServerError', async () => {
  const ops = new OpenAI({ apiKey: opsKey, baseURL, maxRetries: 0, timeout: 20000 });
  await expectError(() => ops.chat.completions.create({ model: 'dead-model', messages: MESSAGES }),
    OpenAI.InternalServerError, 503, 'server_error', 'no_healthy_endpoint');
});

// Holds the one slot apiKey's requests for model may have with a stream whose
// second token comes 1.6 s after its first (no first-byte timeout), and
// meanwhile asks the same with a retrying client: refused with status and
// Retry-After: 1, it must come back one second after each refusal and get
// through once the slot is free. Returns the refusals' error codes.
async function heldThenRetried(apiKey, model, status) {
  const holder = new OpenAI({ apiKey, baseURL, maxRetries: 0, timeout: 20000 });
  const hold = (async () => {
    const s = await holder.chat.completions.create(
      { model, messages: MESSAGES, max_tokens: 2, stream: true },
      { headers: { 'x-sim-token-ms': '1600' } });
    for await (const _ of s); // eslint-disable-line no-unused-vars
  })();
  await new Promise((r) => setTimeout(r, 300));
  const { c, attempts } = retrying(apiKey, 3);
  const { data, response } = await c.chat.completions
    .create({ model, messages: MESSAGES, max_tokens: 1 })
    .withResponse();
  await hold;
  eq(data.usage.completion_tokens, 1, 'the answer after the retries');
  ok(attempts.length >= 2, `the first attempt was not refused: ${JSON.stringify(attempts)}`);
  eq(attempts.map((a) => a.status),
    [...Array(attempts.length - 1).fill(status), 200], 'attempts');
  eq(attempts.slice(0, -1).map((a) => a.retryAfterMs),
    Array(attempts.length - 1).fill('1000'), 'retry-after-ms of the refusals');
  for (let i = 1; i < attempts.length; i++) {
    const gap = attempts[i].at - attempts[i - 1].at;
    ok(gap >= 995 && gap < 1500, `retry ${i} came ${gap} ms after the ${status}, not Retry-After's 1 s`);
  }
  ok((response.headers.get('x-request-id') ?? '').length > 0, 'no x-request-id');
  return attempts.slice(0, -1).map((a) => a.code);
}

check('503 queue_full: the client waits Retry-After: 1, then gets through', async () => {
  const codes = await heldThenRetried(opsKey, 'busy-model', 503);
  ok(codes.every((x) => x === 'queue_full'), `codes ${JSON.stringify(codes)}`);
  // an upstream's own 503 keeps its Retry-After
  const ops = new OpenAI({ apiKey: opsKey, baseURL, maxRetries: 0, timeout: 20000 });
  const err = await expectError(() => ops.chat.completions.create(
    { model: 'busy-model', messages: MESSAGES, max_tokens: 1, stream: true },
    { headers: { 'x-sim-fault': 'status:503' } }),
  OpenAI.InternalServerError, 503, simErrors[503].type, simErrors[503].code);
  eq(headerOf(err.headers, 'retry-after'), '1', 'Retry-After of a relayed 503');
  eq(headerOf(err.headers, 'retry-after-ms'), '1000', 'retry-after-ms of a relayed 503');
});

check('429 concurrency: the client waits Retry-After: 1, then gets through', async () => {
  const codes = await heldThenRetried(singleKey, MODEL, 429);
  ok(codes.every((x) => x === 'concurrency'), `codes ${JSON.stringify(codes)}`);
});

check('504 upstream_timeout: InternalServerError', async () => {
  await expectError(() => client.chat.completions.create({ model: MODEL, messages: MESSAGES },
    { headers: { 'x-sim-fault': 'stall' } }),
  OpenAI.InternalServerError, 504, 'server_error', 'upstream_timeout');
});

// Reads a chat stream to its end: the text of its first choice, and what the
// client's loop threw (undefined when it ended normally).
async function readStream(stream) {
  let text = '';
  try {
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  } catch (err) {
    return { text, err };
  }
  return { text, err: undefined };
}

check('streaming: a stream the upstream cuts raises, not a silent end', async () => {
  const stream = await client.chat.completions.create(
    { model: MODEL, messages: MESSAGES, max_tokens: 10, stream: true },
    { headers: { 'x-sim-fault': 'disconnect-after:3' } });
  const { text, err } = await readStream(stream);
  ok(err !== undefined, `the stream ended without [DONE] and the client raised nothing (text "${text}")`);
  ok(!(err instanceof CheckError), err?.message);
  eq(text, expectedText(3), 'text before the cut');
});

check('streaming: an error event mid-stream raises APIError with its message', async () => {
  const ops = new OpenAI({ apiKey: opsKey, baseURL, maxRetries: 0, timeout: 20000 });
  const stream = await ops.chat.completions.create(
    { model: 'error-event-model', messages: MESSAGES, stream: true });
  const { text, err } = await readStream(stream);
  ok(err instanceof OpenAI.APIError,
    `the upstream's error event did not raise: ${err?.constructor?.name ?? 'nothing'} (text "${text}")`);
  eq(err.error?.message, 'the engine failed mid-generation', "the event's message");
  ok(err.message.includes('the engine failed mid-generation'), `client message "${err.message}"`);
  eq(text, 'tok0', 'text before the error');
});

// The simulator's error bodies for injected statuses; read once at start so
// the checks compare against whatever the backend says.
let simErrors = {};
function err429Type() { return simErrors[429].type; }
function err429Code() { return simErrors[429].code; }
function err500Type() { return simErrors[500].type; }
function err500Code() { return simErrors[500].code; }

async function loadSimErrors() {
  for (const status of [429, 500, 503]) {
    const r = await fetch(`${simURL}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-sim-fault': `status:${status}` },
      body: JSON.stringify({ model: MODEL, messages: MESSAGES }),
    });
    ok(r.status === status, `simulator fault status:${status} answered ${r.status}`);
    simErrors[status] = (await r.json()).error;
  }
}

async function main() {
  await loadSimErrors();
  let passed = 0;
  let failed = 0;
  for (const { name, fn } of checks) {
    try {
      await fn();
      passed += 1;
      console.log(`ok - ${name}`);
    } catch (e) {
      failed += 1;
      console.log(`not ok - ${name}: ${e instanceof CheckError ? e.message : e?.stack ?? e}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}

main().catch((e) => {
  console.error(e?.stack ?? e);
  process.exit(1);
});
