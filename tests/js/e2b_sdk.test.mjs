// The official E2B JS SDK (npm e2b@2.51.0, pinned in scripts/test) against a
// real `stacyvm serve`, with only apiUrl/sandboxUrl pointing at StacyVM
// (docs/e2b.md). Run: E2B_JS_SDK=<dir>/node_modules/e2b STACYVM_BIN=… node --test
//
// Moving the pin: install the new version, run this file, and compare the
// SDK's dist/index.mjs routes and fields with docs/e2b.md, "Wire contract".

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdtempSync, openSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const { Sandbox, CommandExitError, SandboxNotFoundError } = await import(
  process.env.E2B_JS_SDK ?? 'e2b'
)

let server
let url

async function freePort() {
  return new Promise((resolve) => {
    const s = createServer()
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

before(async () => {
  const bin = process.env.STACYVM_BIN
  assert.ok(bin, 'STACYVM_BIN must point at the stacyvm binary')
  const port = await freePort()
  const data = mkdtempSync(join(tmpdir(), 'stacyvm-e2b-js-'))
  const log = openSync(join(data, 'server.log'), 'w')
  server = spawn(bin, ['serve'], {
    cwd: data,
    stdio: ['ignore', log, log],
    env: {
      ...process.env,
      STACYVM_SERVER_HOST: '127.0.0.1',
      STACYVM_SERVER_PORT: String(port),
      STACYVM_SERVER_DATA_DIR: data,
      STACYVM_PROVIDERS_DEFAULT: process.env.STACYVM_TEST_PROVIDER ?? 'native',
      STACYVM_LOGGING_LEVEL: 'warn',
    },
  })
  url = `http://127.0.0.1:${port}`
  const deadline = Date.now() + 30_000
  for (;;) {
    try {
      const r = await fetch(`${url}/api/v1/live`)
      if (r.ok) break
    } catch {}
    assert.ok(Date.now() < deadline, 'stacyvm serve did not become live in 30 s')
    await new Promise((r) => setTimeout(r, 100))
  }
})

after(async () => {
  if (!server) return
  const exited = new Promise((r) => server.once('exit', r))
  server.kill('SIGTERM')
  await exited
})

const opts = () => ({ apiKey: 'e2b_0123456789abcdef', apiUrl: url, sandboxUrl: url })

test('create, info, list, timeout, connect and kill', async () => {
  const sbx = await Sandbox.create({ ...opts(), timeoutMs: 120_000, metadata: { suite: 'e2b-js' } })
  try {
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.deepEqual(info.metadata, { suite: 'e2b-js' })
    assert.equal(info.state, 'running')
    await sbx.setTimeout(30_000)
    const left = (new Date((await sbx.getInfo()).endAt) - Date.now()) / 1000
    assert.ok(Math.abs(left - 30) < 10, `ends in ${left}s`)
    const pager = Sandbox.list({ ...opts(), query: { metadata: { suite: 'e2b-js' } } })
    const items = await pager.nextItems()
    assert.deepEqual(items.map((s) => s.sandboxId), [sbx.sandboxId])
    const again = await Sandbox.connect(sbx.sandboxId, opts())
    assert.equal(again.sandboxId, sbx.sandboxId)
  } finally {
    await sbx.kill()
  }
  assert.equal(await Sandbox.kill(sbx.sandboxId, opts()), false)
  await assert.rejects(Sandbox.connect(sbx.sandboxId, opts()), SandboxNotFoundError)
})

test('network egress rules at create and updateNetwork', async () => {
  const policy = async (id) => {
    const r = await fetch(`${url}/api/v1/sandboxes/${id}/network`)
    assert.equal(r.status, 200)
    return (await r.json()).policy
  }
  const sbx = await Sandbox.create({
    ...opts(),
    timeoutMs: 60_000,
    network: { allowOut: ['*.example.com'], denyOut: ['0.0.0.0/0'] },
  })
  try {
    assert.deepEqual(await policy(sbx.sandboxId), {
      allow_out: ['*.example.com'],
      deny_out: ['0.0.0.0/0'],
    })
    await sbx.updateNetwork({ denyOut: ['10.0.0.0/8'] })
    assert.deepEqual(await policy(sbx.sandboxId), { deny_out: ['10.0.0.0/8'] })
    await assert.rejects(sbx.updateNetwork({ denyOut: ['evil.example'] }))
    assert.deepEqual(await policy(sbx.sandboxId), { deny_out: ['10.0.0.0/8'] })
  } finally {
    await sbx.kill()
  }
})

test('commands, background processes and files', async () => {
  const sbx = await Sandbox.create({ ...opts(), envs: { FROM_CREATE: 'yes' } })
  try {
    const r = await sbx.commands.run('echo hello; echo oops >&2; echo $FROM_CREATE')
    assert.equal(r.exitCode, 0)
    assert.equal(r.stdout, 'hello\nyes\n')
    assert.equal(r.stderr, 'oops\n')
    const seen = []
    await sbx.commands.run('for i in 1 2 3; do echo $i; done', { onStdout: (d) => seen.push(d) })
    assert.equal(seen.join(''), '1\n2\n3\n')
    await assert.rejects(sbx.commands.run('exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3)

    const h = await sbx.commands.run('cat', { background: true, stdin: true, timeoutMs: 0 })
    assert.ok((await sbx.commands.list()).some((p) => p.pid === h.pid))
    await sbx.commands.sendStdin(h.pid, 'from js\n')
    await sbx.commands.closeStdin(h.pid)
    assert.equal((await h.wait()).stdout, 'from js\n')
    const sleeper = await sbx.commands.run('sleep 60', { background: true, timeoutMs: 0 })
    assert.equal(await sbx.commands.kill(sleeper.pid), true)
    await assert.rejects(sleeper.wait(), CommandExitError)

    await sbx.files.write('/tmp/js/a.txt', 'js text')
    assert.equal(await sbx.files.read('/tmp/js/a.txt'), 'js text')
    const big = new Uint8Array(10 * 1024 * 1024).map((_, i) => i % 251)
    await sbx.files.write('/tmp/js/big.bin', big.buffer)
    const back = await sbx.files.read('/tmp/js/big.bin', { format: 'bytes' })
    assert.equal(back.length, big.length)
    assert.ok(Buffer.from(back).equals(Buffer.from(big)))
    assert.deepEqual((await sbx.files.list('/tmp/js')).map((e) => e.name).sort(), ['a.txt', 'big.bin'])
    assert.equal(await sbx.files.exists('/tmp/js/a.txt'), true)
    assert.equal(await sbx.files.exists('/tmp/js/none'), false)
    assert.equal(await sbx.files.makeDir('/tmp/js/d'), true)
    await sbx.files.rename('/tmp/js/a.txt', '/tmp/js/d/b.txt')
    assert.equal(await sbx.files.read('/tmp/js/d/b.txt'), 'js text')
    await sbx.files.remove('/tmp/js/d')
    assert.equal(await sbx.files.exists('/tmp/js/d'), false)

    // watchDir (the WatchDir stream), recursive.
    const events = []
    const w = await sbx.files.watchDir('/tmp/js', (e) => events.push(`${e.type}:${e.name}`), { recursive: true })
    await sbx.commands.run('mkdir /tmp/js/w && sleep 0.3 && echo x > /tmp/js/w/x.txt && rm /tmp/js/big.bin')
    const want = ['create:w', 'create:w/x.txt', 'remove:big.bin']
    const deadline = Date.now() + 10_000
    while (!want.every((e) => events.includes(e))) {
      assert.ok(Date.now() < deadline, `saw ${events}`)
      await new Promise((r) => setTimeout(r, 100))
    }
    await w.stop()
  } finally {
    await sbx.kill()
  }
  assert.equal(await sbx.isRunning(), false)
})
