// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) for the serve
// tests. Reads one JSON command per line on stdin, answers one JSON line each on stdout:
//   {"cmd": "goto", "url": ...}                 {"cmd": "offline", "value": true}
//   {"cmd": "eval", "js": "..."}  -> {"ok": true, "value": <result>}
//   {"cmd": "wait", "js": "...", "timeout": ms}  (until the expression is truthy)
//   {"cmd": "fill", "selector": ..., "value": ...} {"cmd": "click", "selector": ...}
//   {"cmd": "press", "selector": ..., "key": ...} {"cmd": "screenshot", "path": ...}
import { chromium } from 'playwright-core'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import readline from 'node:readline'

const profile = mkdtempSync(join(tmpdir(), 'changefeed-chromium-'))
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
})
const page = context.pages()[0] ?? await context.newPage()
const logs = []
page.on('console', (message) => logs.push(`${message.type()}: ${message.text()}`))
page.on('pageerror', (error) => logs.push(`pageerror: ${error.message}`))

function reply(object) { process.stdout.write(JSON.stringify(object) + '\n') }

const lines = readline.createInterface({ input: process.stdin })
reply({ ok: true, ready: true })
for await (const line of lines) {
  const command = JSON.parse(line)
  try {
    let value = null
    switch (command.cmd) {
      case 'goto': await page.goto(command.url); break
      case 'offline': await context.setOffline(command.value); break
      case 'eval': value = await page.evaluate(command.js); break
      case 'wait':
        await page.waitForFunction(command.js, null, { timeout: command.timeout ?? 30000, polling: 100 })
        break
      case 'fill': await page.fill(command.selector, command.value); break
      case 'click': await page.click(command.selector); break
      case 'press': await page.press(command.selector, command.key); break
      case 'screenshot': await page.screenshot({ path: command.path, fullPage: true }); break
      case 'logs': value = logs.splice(0); break
      case 'close': await context.close(); reply({ ok: true }); process.exit(0)
    }
    reply({ ok: true, value })
  } catch (error) {
    reply({ ok: false, error: String(error.message ?? error).split('\n')[0], logs: logs.slice(-20) })
  }
}
await context.close()
