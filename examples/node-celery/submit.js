// Submit one forecast with celery-node and print its outcome as one line of JSON (docs/PRODUCERS.md).
//
//   node submit.js request.json [job-id]
//
// KRONOS_BROKER_URL and KRONOS_RESULT_BACKEND name the Redis DBs (as for every Kronos process), KRONOS_QUEUE the
// queue (kronos.<model>, or kronos.<model>.<producer> with producer identities). With KRONOS_PRODUCER set, the
// job id gets the producer's prefix: a job under any other id is refused by the worker and never answered.
const fs = require("fs");
const { randomUUID } = require("crypto");
const celery = require("celery-node");

const broker = process.env.KRONOS_BROKER_URL || "redis://localhost:6379/0";
const backend = process.env.KRONOS_RESULT_BACKEND || "redis://localhost:6379/1";
const queue = process.env.KRONOS_QUEUE || "kronos.kronos-small";
const producer = process.env.KRONOS_PRODUCER;

const request = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const jobId = (producer ? `${producer}:` : "") + (process.argv[3] || randomUUID());

const client = celery.createClient(broker, backend, queue);
// sendTask(name, args, kwargs, taskId): the only celery-node call that sets the task id (the job id).
// No priority: the job is a default job (docs/PRODUCERS.md, priorities).
const result = client.sendTask("kronos.forecast", [request], {}, jobId);
result
  .get(120000)
  .then((forecast) => {
    const status = forecast && forecast.forecast ? "SUCCESS" : "TIMEOUT";
    console.log(JSON.stringify({ job_id: jobId, status, result: forecast }));
  })
  .catch((failure) => {
    // celery-node rejects with the FAILURE's result fields: exc_message[0] is the job's error
    const error = (failure.exc_message || [])[0] || { message: String(failure) };
    console.log(JSON.stringify({ job_id: jobId, status: "FAILURE", error }));
  })
  .finally(() => client.disconnect());
