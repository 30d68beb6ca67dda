// A small Agent SDK daemon for reaper's end-to-end tests (tests/tests/e2e.rs): it holds one
// query of the real @anthropic-ai/claude-agent-sdk in one of the shapes real daemons use, and
// says on stdout what happened to it. Runs under node and under bun.
//
//   daemon.mjs --sdk DIR --mode MODE [--exe PATH] [--cwd DIR] [--tool-command CMD]
//
// --sdk   the installed package (…/node_modules/@anthropic-ai/claude-agent-sdk)
// --exe   the CLI to run (pathToClaudeCodeExecutable); by default the SDK's own platform
//         package's native `claude`
// --mode  how the query is held; the prompt is a streaming-input iterable that never ends, so
//         the CLI child lives on after the turn's result unless the daemon closes it:
//   stop-iterating  read messages until the result, then never call next() again
//   for-await       parked in `for await (const m of q)` after the result
//   interrupt       like for-await, and calls q.interrupt() (only) after the result
//   close           like for-await, and calls q.close() after the result
//   chatty          a new user message every second, forever (a live conversation)
//   tool            asks for a Bash tool call running --tool-command (allowedTools: ['Bash'])
//
// stdout, one line each (the tests read these; progress goes to stderr):
//   result                the turn's result message arrived (once per turn)
//   loop-ended-ok         the daemon's message loop ended without an error
//   loop-error <message>  the loop threw (what a daemon without a catch would die of)
//   parent-died <message> an unhandled rejection or exception: printed, then exit 1
// Otherwise the daemon stays alive (a timer) until it is signalled.
import { writeSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

function out(line) {
  writeSync(1, line + '\n');
}
function note(line) {
  writeSync(2, `daemon[${process.pid}]: ${line}\n`);
}
function text(e) {
  return String(e && e.message ? e.message : e).replace(/\s+/g, ' ').trim();
}

process.on('unhandledRejection', (e) => {
  out(`parent-died ${text(e)}`);
  process.exit(1);
});
process.on('uncaughtException', (e) => {
  out(`parent-died ${text(e)}`);
  process.exit(1);
});
// A daemon: alive until signalled, whatever its query does.
setInterval(() => {}, 1 << 30);

const args = { mode: '', sdk: '', exe: '', cwd: process.cwd(), 'tool-command': 'timeout 8 tail -f /dev/null' };
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in args) || argv[i + 1] === undefined) {
      note(`usage: daemon.mjs --sdk DIR --mode MODE [--exe PATH] [--cwd DIR] [--tool-command CMD] (bad ${argv[i]})`);
      process.exit(2);
    }
    args[key] = argv[i + 1];
  }
}
const MODES = ['stop-iterating', 'for-await', 'interrupt', 'close', 'chatty', 'tool'];
if (!MODES.includes(args.mode) || !args.sdk) {
  note(`--mode must be one of ${MODES.join(', ')}, and --sdk is required`);
  process.exit(2);
}

const { query } = await import(pathToFileURL(join(args.sdk, 'sdk.mjs')).href);

// Every built-in tool of CLI 2.1.329: those it offers the API with no disallowedTools, and the
// deferred ones ToolSearch would load. A turn then has none but the one a test allows.
const BUILTIN_TOOLS = [
  'Agent', 'AskUserQuestion', 'Bash', 'BashOutput', 'DeferredToolPlaceholder', 'Edit',
  'EnterPlanMode', 'ExitPlanMode', 'Glob', 'Grep', 'KillShell', 'ListAgents',
  'ListMcpResourcesTool', 'NotebookEdit', 'Read', 'ReadMcpResourceTool', 'ReportFindings',
  'ScheduleWakeup', 'Skill', 'SlashCommand', 'Task', 'TaskOutput', 'TodoWrite', 'ToolSearch',
  'WebFetch', 'WebSearch', 'Workflow', 'Write',
];
const useTool = args.mode === 'tool';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
function user(content) {
  return { type: 'user', message: { role: 'user', content }, parent_tool_use_id: null, session_id: '' };
}
// Streaming input that never ends (as a daemon's session does).
async function* prompt() {
  yield user(useTool ? `RUN_TOOL:${args['tool-command']}` : 'Say hello.');
  if (args.mode === 'chatty') {
    for (let i = 1; ; i++) {
      await sleep(1000);
      yield user(`Chat message ${i}.`);
    }
  }
  await new Promise(() => {});
}

const options = {
  model: 'claude-sonnet-4-5',
  settingSources: [],
  permissionMode: 'default',
  disallowedTools: BUILTIN_TOOLS.filter((t) => !(useTool && t === 'Bash')),
  allowedTools: useTool ? ['Bash'] : [],
  cwd: args.cwd,
  stderr: (data) => note(`claude stderr: ${data.trimEnd()}`),
};
if (args.exe) options.pathToClaudeCodeExecutable = args.exe;

note(`mode ${args.mode}, runtime ${typeof Bun !== 'undefined' ? `bun ${Bun.version}` : `node ${process.version}`}, exe ${args.exe || '(the SDK\'s)'}`);
const q = query({ prompt: prompt(), options });

function trace(m) {
  let what = m.type + (m.subtype ? `/${m.subtype}` : '');
  if (m.type === 'result') what += ` ${JSON.stringify(m.result ?? '').slice(0, 200)}`;
  note(`message ${what}`);
}

function onResult() {
  out('result');
  if (args.mode === 'interrupt') {
    // Not awaited inside the loop: its answer comes through the same stream.
    q.interrupt().then(
      () => note('interrupt() resolved'),
      (e) => note(`interrupt() threw: ${text(e)}`),
    );
  } else if (args.mode === 'close') {
    q.close();
    note('close() called');
  }
}

if (args.mode === 'stop-iterating') {
  // Reads until the result, then stops calling next(): the iterator is neither returned nor
  // drained.
  const it = q[Symbol.asyncIterator]();
  try {
    for (;;) {
      const { value, done } = await it.next();
      if (done) {
        out('loop-ended-ok');
        break;
      }
      trace(value);
      if (value.type === 'result') {
        out('result');
        note('stopped iterating');
        break;
      }
    }
  } catch (e) {
    out(`loop-error ${text(e)}`);
  }
} else {
  try {
    for await (const m of q) {
      trace(m);
      if (m.type === 'result') onResult();
    }
    out('loop-ended-ok');
  } catch (e) {
    out(`loop-error ${text(e)}`);
  }
}
