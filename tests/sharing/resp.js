// A minimal Redis client for the test harness: RESP over a TCP socket, with `get`, `set`, `del`
// and `call`, as ioredis and node-redis offer them. Only what the sharing test needs.
'use strict';
const net = require('net');

function encode(args) {
  let out = `*${args.length}\r\n`;
  for (const a of args) {
    const b = Buffer.from(String(a), 'utf8');
    out += `$${b.length}\r\n${b.toString('binary')}\r\n`;
  }
  return Buffer.from(out, 'binary');
}

// Parses one reply from `buf` at `pos`; returns [value, next position] or null if incomplete.
function parse(buf, pos) {
  if (pos >= buf.length) return null;
  const end = buf.indexOf('\r\n', pos);
  if (end < 0) return null;
  const type = String.fromCharCode(buf[pos]);
  const line = buf.toString('utf8', pos + 1, end);
  const next = end + 2;
  switch (type) {
    case '+': return [line, next];
    case '-': return [new Error(line), next];
    case ':': return [Number(line), next];
    case '$': {
      const len = Number(line);
      if (len < 0) return [null, next];
      if (buf.length < next + len + 2) return null;
      return [buf.toString('utf8', next, next + len), next + len + 2];
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return [null, next];
      const items = [];
      let p = next;
      for (let i = 0; i < n; i++) {
        const r = parse(buf, p);
        if (!r) return null;
        items.push(r[0]);
        p = r[1];
      }
      return [items, p];
    }
    default: throw new Error(`unexpected reply type ${type}`);
  }
}

function connect(port) {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ host: '127.0.0.1', port }, () => resolve(client));
    socket.on('error', reject);
    let buf = Buffer.alloc(0);
    const waiting = [];
    socket.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        const r = parse(buf, 0);
        if (!r) break;
        buf = buf.subarray(r[1]);
        const { ok, fail } = waiting.shift();
        if (r[0] instanceof Error) fail(r[0]); else ok(r[0]);
      }
    });
    const call = (...args) => new Promise((ok, fail) => {
      waiting.push({ ok, fail });
      socket.write(encode(args));
    });
    const client = {
      call,
      get: (key) => call('GET', key),
      set: (key, value) => call('SET', key, value),
      del: (key) => call('DEL', key),
      quit: () => { socket.end(); },
    };
  });
}

module.exports = { connect };
