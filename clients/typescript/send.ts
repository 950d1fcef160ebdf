// Sends one message and reads its job back through a client typed by pgqueue's
// /openapi.json: `openapi-typescript` turns the document into schema.d.ts, and
// `openapi-fetch` makes every path, parameter and body below checked by tsc.
//   node send.js BASE_URL TOKEN PHONE
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type Job = components["schemas"]["Job"];

const [baseUrl, token, phone] = process.argv.slice(2);
const client = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });

// The document refuses fields it does not know, and so does the compiler.
// @ts-expect-error colour is not a field of a message
const notAMessage: components["schemas"]["Message"] = { phoneNumber: phone, colour: "red" };
void notAMessage;

const sent = await client.POST("/api/whatsapp/send", {
  body: { phoneNumber: phone, text: "Your order is ready for pickup", messageType: "notification" },
});
if (sent.error !== undefined) {
  throw new Error(`send refused: ${sent.error.error}: ${sent.error.message}`);
}
// 202: queued. 200: sent at once, when the queue is off (WHATSAPP_SEND_QUEUE_ENABLED=false).
if (!("jobId" in sent.data)) {
  throw new Error(`sent directly instead of queued: ${sent.data.sid}`);
}
const jobId: number = sent.data.jobId;

const read = await client.GET("/api/jobs/{job_id}", { params: { path: { job_id: jobId } } });
if (read.error !== undefined) {
  throw new Error(`job ${jobId} not readable: ${read.error.message}`);
}
const job: Job = read.data;
console.log(JSON.stringify({ jobId, state: job.state, tenantId: job.tenantId, phone: job.phoneNumber }));
