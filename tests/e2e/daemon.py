"""A small Agent SDK daemon for reaper's end-to-end tests (tests/tests/e2e.rs), on PyPI's
claude-agent-sdk: a ClaudeSDKClient stays connected after one query and the daemon sits in
``async for m in client.receive_messages()``, the shape that leaks the CLI child (spawned with
pipes for stdin and stdout).

    daemon.py [--cwd DIR] [--cli PATH]

--cli  the CLI to run (cli_path); by default the one the SDK bundles

stdout, one line each (the tests read these; progress goes to stderr):
    result                the turn's result message arrived
    loop-ended-ok         receive_messages() ended without an error
    loop-error <message>  it raised (what a daemon without a handler would die of)
    parent-died <message> anything else escaped: printed, then exit 1
Otherwise the daemon stays alive until it is signalled.
"""

import argparse
import asyncio
import os
import sys

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

# As in daemon.mjs: every built-in tool of the CLI, so the turn uses none.
BUILTIN_TOOLS = [
    "Agent", "AskUserQuestion", "Bash", "BashOutput", "DeferredToolPlaceholder", "Edit",
    "EnterPlanMode", "ExitPlanMode", "Glob", "Grep", "KillShell", "ListAgents",
    "ListMcpResourcesTool", "NotebookEdit", "Read", "ReadMcpResourceTool", "ReportFindings",
    "ScheduleWakeup", "Skill", "SlashCommand", "Task", "TaskOutput", "TodoWrite", "ToolSearch",
    "WebFetch", "WebSearch", "Workflow", "Write",
]


def out(line: str) -> None:
    os.write(1, (line + "\n").encode())


def note(line: str) -> None:
    os.write(2, f"daemon.py[{os.getpid()}]: {line}\n".encode())


def text(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


async def main(args: argparse.Namespace) -> None:
    options = ClaudeAgentOptions(
        model="claude-sonnet-4-5",
        setting_sources=[],
        permission_mode="default",
        disallowed_tools=BUILTIN_TOOLS,
        cwd=args.cwd,
        stderr=lambda data: note(f"claude stderr: {data.rstrip()}"),
    )
    if args.cli:
        options.cli_path = args.cli
    note(f"python {sys.version.split()[0]}, cli {args.cli or '(bundled)'}")
    client = ClaudeSDKClient(options=options)
    await client.connect()
    await client.query("Say hello.")
    try:
        async for m in client.receive_messages():
            note(f"message {type(m).__name__}")
            if isinstance(m, ResultMessage):
                out("result")
        out("loop-ended-ok")
    except Exception as e:  # noqa: BLE001 - the point is to report whatever it raises
        out(f"loop-error {text(e)}")
    # A daemon: alive until signalled, whatever its client does.
    await asyncio.Event().wait()


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cwd", default=os.getcwd())
    parser.add_argument("--cli", default="")
    args = parser.parse_args()
    loop = asyncio.new_event_loop()

    def died(_loop: asyncio.AbstractEventLoop, context: dict) -> None:
        e = context.get("exception")
        out(f"parent-died {text(e) if e else context.get('message', '?')}")
        os._exit(1)

    loop.set_exception_handler(died)
    try:
        loop.run_until_complete(main(args))
    except Exception as e:  # noqa: BLE001
        out(f"parent-died {text(e)}")
        os._exit(1)


if __name__ == "__main__":
    run()
