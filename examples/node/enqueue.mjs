#!/usr/bin/env node
// Enqueue one Kronos forecast job from Node.js with raw Redis commands, then wait for its result.
//
//   KRONOS_BROKER_URL=redis://localhost:6379/0 node examples/node/enqueue.mjs request.json
//
// request.json is a ForecastRequest (`kronos-worker schema request`). No dependencies: the few Redis
// commands needed are spoken in RESP over a TCP (or TLS, for rediss://) socket. Same variables and exit
// status as examples/shell/enqueue.sh, except that the queue and priority default to the request's own
// `model` and `priority`, and its `job_id` is used when it has one. The wire format: docs/PRODUCERS.md.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import net from "node:net";
import tls from "node:tls";

const EXIT_FAILED = 1;
const EXIT_USAGE = 2;
const EXIT_TIMEOUT = 3;
const POLL_MS = 200;
// kombu's Redis transport keeps one list per priority: the queue's own name for 0, `${queue}\x06\x16${p}` else.
const PRIORITY_SEPARATOR = "\x06\x16";

/** A minimal RESP2 client: one connection, commands answered in order. */
class RedisConnection {
  static async open(url) {
    const { protocol, hostname, port, username, password, pathname } = new URL(url);
    const options = { host: hostname, port: Number(port || 6379) };
    const socket = protocol === "rediss:" ? tls.connect({ ...options, servername: hostname }) : net.connect(options);
    await new Promise((resolve, reject) => {
      socket.once(protocol === "rediss:" ? "secureConnect" : "connect", resolve);
      socket.once("error", reject);
    });
    const connection = new RedisConnection(socket);
    if (password) {
      const user = decodeURIComponent(username);
      await connection.command("AUTH", ...(user ? [user] : []), decodeURIComponent(password));
    }
    await connection.command("SELECT", pathname.slice(1) || "0");
    return connection;
  }

  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.waiting = [];
    socket.on("data", (chunk) => this.#receive(chunk));
    socket.on("error", (error) => this.waiting.splice(0).forEach(({ reject }) => reject(error)));
  }

  command(...args) {
    const parts = args.map((arg) => Buffer.from(String(arg)));
    const header = `*${parts.length}\r\n`;
    const encoded = parts.flatMap((part) => [Buffer.from(`$${part.length}\r\n`), part, Buffer.from("\r\n")]);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.socket.write(Buffer.concat([Buffer.from(header), ...encoded]));
    });
  }

  close() {
    this.socket.end();
  }

  #receive(chunk) {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (let reply = parseReply(this.buffer, 0); reply !== null; reply = parseReply(this.buffer, 0)) {
      this.buffer = this.buffer.subarray(reply.end);
      const { resolve, reject } = this.waiting.shift();
      reply.value instanceof Error ? reject(reply.value) : resolve(reply.value);
    }
  }
}

/** The reply starting at `start`, as {value, end}, or null while it has not fully arrived. */
function parseReply(buffer, start) {
  const lineEnd = buffer.indexOf("\r\n", start);
  if (lineEnd < 0) return null;
  const line = buffer.toString("utf8", start + 1, lineEnd);
  const next = lineEnd + 2;
  switch (String.fromCharCode(buffer[start])) {
    case "+":
      return { value: line, end: next };
    case "-":
      return { value: new Error(line), end: next };
    case ":":
      return { value: Number(line), end: next };
    case "$": {
      const length = Number(line);
      if (length < 0) return { value: null, end: next };
      if (buffer.length < next + length + 2) return null;
      return { value: buffer.toString("utf8", next, next + length), end: next + length + 2 };
    }
    case "*": {
      const count = Number(line);
      const items = [];
      let end = next;
      for (let i = 0; i < count; i++) {
        const item = parseReply(buffer, end);
        if (item === null) return null;
        items.push(item.value);
        end = item.end;
      }
      return { value: count < 0 ? null : items, end };
    }
    default:
      throw new Error(`unexpected Redis reply: ${line}`);
  }
}

function withDb(url, db) {
  const parsed = new URL(url);
  parsed.pathname = `/${db}`;
  return parsed.toString();
}

async function main() {
  const [requestFile] = process.argv.slice(2);
  if (!requestFile) {
    console.error("usage: node enqueue.mjs REQUEST.json");
    return EXIT_USAGE;
  }
  const request = JSON.parse(readFileSync(requestFile, "utf8"));
  const env = process.env;
  const brokerUrl = env.KRONOS_BROKER_URL || "redis://localhost:6379/0";
  const resultsUrl = env.KRONOS_RESULT_BACKEND || withDb(brokerUrl, 1);
  const queue = env.KRONOS_QUEUE || `kronos.${request.model || "kronos-small"}`;
  const priority = Number(env.KRONOS_PRIORITY ?? request.priority ?? 5);
  const jobId = env.KRONOS_JOB_ID || request.job_id || randomUUID();
  const sentAt = Date.now() / 1000;

  // Celery protocol 2: the body is [args, kwargs, embed], base64-encoded; the request is the one argument.
  const body = [[request], {}, { callbacks: null, errbacks: null, chain: null, chord: null }];
  const message = {
    body: Buffer.from(JSON.stringify(body)).toString("base64"),
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "py",
      task: "kronos.forecast",
      id: jobId,
      root_id: jobId,
      parent_id: null,
      group: null,
      retries: 0,
      eta: null,
      expires: null,
      timelimit: [null, null],
      kronos_sent_at: sentAt,
    },
    properties: {
      correlation_id: jobId,
      delivery_mode: 2,
      delivery_info: { exchange: "", routing_key: queue },
      priority,
      body_encoding: "base64",
      delivery_tag: randomUUID(),
    },
  };
  const list = priority === 0 ? queue : `${queue}${PRIORITY_SEPARATOR}${priority}`;

  const results = await RedisConnection.open(resultsUrl);
  try {
    // The job record first (SET NX): a resent id becomes a no-op, and "queued" is told from "unknown" later.
    const expires = env.KRONOS_RESULT_EXPIRES || "86400";
    const record = JSON.stringify({ series_id: request.series_id, model: request.model, submitted_at: sentAt });
    if ((await results.command("SET", `kronos:job:${jobId}`, record, "NX", "EX", expires)) === "OK") {
      const broker = await RedisConnection.open(brokerUrl);
      await broker.command("LPUSH", list, JSON.stringify(message));
      broker.close();
      console.error(`job ${jobId} queued on ${queue}, priority ${priority}`);
    } else {
      console.error(`job ${jobId} was submitted before; not sending it again`);
    }

    const deadline = Date.now() + 1000 * Number(env.KRONOS_WAIT_SECONDS || 300);
    while (Date.now() < deadline) {
      const stored = await results.command("GET", `celery-task-meta-${jobId}`);
      const meta = stored === null ? { status: "PENDING" } : JSON.parse(stored);
      if (meta.status === "SUCCESS" || meta.status === "FAILURE" || meta.status === "REVOKED") {
        console.log(stored);
        return meta.status === "SUCCESS" ? 0 : EXIT_FAILED;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    console.error(`job ${jobId}: no result after ${env.KRONOS_WAIT_SECONDS || 300} s`);
    return EXIT_TIMEOUT;
  } finally {
    results.close();
  }
}

process.exitCode = await main();
