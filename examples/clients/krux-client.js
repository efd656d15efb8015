// A krux-relay subscriber for browsers (and Node >= 22, which has a global WebSocket),
// following docs/protocol.md: resumes with `since` after anything that can heal, stops on
// what cannot, and reports `replay_gap` notices instead of hiding them.
//
//   const c = new KruxClient({
//     url: "ws://127.0.0.1:7701", token: "krx_user_...", // or passphrase: "..."
//     filters: { type: "policy_violation,approval_requested" }, since: 0,
//     onEvent: (e) => console.log(e.seq, e.type),
//     onNotice: (n) => console.warn("gap", n.data),
//     onStatus: (s) => console.log(s),
//   });
//   c.close();
//
// A browser cannot set headers on a WebSocket, so the token goes in `access_token`; it
// cannot read the handshake's `Krux-Seq` either, so a client that has received nothing yet
// reconnects live (pass `since` to start from a known point).
(function (root) {
  "use strict";

  // Close codes after which reconnecting with `since` helps (docs/protocol.md, section 6).
  const RESUME = new Set([1001, 1006, 1011, 1012, 1013, 4001]);
  // Connections in a row that never opened before giving up: a browser sees a refused
  // handshake (401, 403, 400) only as 1006, the same as a network failure.
  const MAX_FAILED_OPENS = 6;

  class KruxClient {
    constructor(opts) {
      this.opts = opts;
      this.since = opts.since ?? null;
      this.seen = 0;
      this.delay = 250;
      this.failedOpens = 0;
      this.closed = false;
      this.connect();
    }

    url() {
      const base = this.opts.url.replace(/\/+$/, "").replace(/\/events$/, "");
      const q = new URLSearchParams();
      if (this.opts.token) q.set("access_token", this.opts.token);
      else if (this.opts.passphrase) q.set("passphrase", this.opts.passphrase);
      for (const [k, v] of Object.entries(this.opts.filters || {})) if (v) q.set(k, v);
      if (this.since !== null) q.set("since", String(this.since));
      return `${base}/events?${q.toString().replace(/%2C/gi, ",")}`;
    }

    status(s) {
      if (this.opts.onStatus) this.opts.onStatus(s);
    }

    connect() {
      this.status("connecting");
      // Browsers offer permessage-deflate on every WebSocket (scripts cannot ask or
      // decline); the relay accepts it and compresses each event once for all.
      const ws = new WebSocket(this.url());
      this.ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.failedOpens = 0;
        this.status("live");
      };
      ws.onmessage = (m) => {
        const e = JSON.parse(m.data);
        if (e.seq === undefined) {
          // A notice (replay_gap): never an event, and the resume point stays.
          if (this.opts.onNotice) this.opts.onNotice(e);
          return;
        }
        this.since = e.seq;
        this.seen += 1;
        this.delay = 250;
        this.opts.onEvent(e);
        if (this.opts.count && this.seen >= this.opts.count) this.close();
      };
      ws.onclose = (c) => {
        if (this.closed) return this.status("done");
        if (!opened) this.failedOpens += 1;
        if (c.code === 1000) return this.status("done");
        if (!RESUME.has(c.code)) return this.status(`stopped: ${c.code} ${c.reason}`);
        if (this.failedOpens >= MAX_FAILED_OPENS) {
          return this.status("stopped: cannot connect (is the token valid?)");
        }
        this.status(`reconnecting in ${this.delay} ms (${c.code} ${c.reason})`);
        setTimeout(() => this.connect(), this.delay);
        this.delay = Math.min(this.delay * 2, 8000);
      };
    }

    close() {
      this.closed = true;
      this.ws.close(1000);
    }
  }

  root.KruxClient = KruxClient;
  if (typeof module !== "undefined") module.exports = { KruxClient };
})(typeof globalThis !== "undefined" ? globalThis : this);
