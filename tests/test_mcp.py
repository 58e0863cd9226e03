"""MCP servers as tools: stdio and streamable HTTP through the official SDK, a published
server, concurrency on one connection, and no server process outliving its owner."""

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from rlft.mcp import MCPConnectError, MCPServer, MCPToolError
from rlft.tools import FatalToolError

REPO = Path(__file__).resolve().parents[1]
DEMO = str(Path(__file__).resolve().parent / "mcp_servers" / "demo_server.py")
LINUX = sys.platform.startswith("linux")


def demo(**kw) -> MCPServer:
    return MCPServer(command=sys.executable, args=[DEMO], name="demo", **kw)


def run(coro, timeout: float = 30.0):
    """asyncio.run with a ceiling, so a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an unreaped zombie holds nothing)."""
    if LINUX:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def wait_for_file(path: Path, within: float = 15.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written within {within}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, DEMO, "--http", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "the HTTP demo server exited during start-up"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the HTTP demo server did not listen within 20s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- stdio ---------------------------------------------------------------------------------
def test_stdio_server_tools_are_listed_with_their_input_schemas():
    async def main():
        async with demo().connect() as conn:
            return {t.name: t for t in conn.tools}

    tools = run(main())
    assert {"add", "echo", "fail", "slow", "pid", "crash"} <= set(tools)
    add = tools["add"]
    assert add.description == "Add two integers."
    assert add.parameters["type"] == "object"
    assert add.parameters["properties"]["a"]["type"] == "integer"
    assert set(add.parameters["required"]) == {"a", "b"}
    assert add.schema()["function"]["name"] == "add"
    assert add.meta["mcp_server"] == "demo"


def test_stdio_tool_call_returns_the_text_and_errors_raise_with_the_servers_message():
    async def main():
        async with demo().connect() as conn:
            tools = {t.name: t for t in conn.tools}
            total = await tools["add"].fn(a=2, b=40)
            echoed = await tools["echo"].fn(text="héllo\nworld")
            with pytest.raises(MCPToolError, match="the disk is full"):
                await tools["fail"].fn(message="the disk is full")
            with pytest.raises(MCPToolError, match="nope"):
                await conn.call_tool("nope", {})
            after = await conn.call_tool("add", {"a": 1, "b": 1})  # an error does not break the connection
            return total, echoed, after

    assert run(main()) == ("42", "héllo\nworld", "2")


def test_sixteen_concurrent_calls_on_one_connection_each_get_their_own_result():
    async def main():
        async with demo().connect() as conn:
            tools = {t.name: t for t in conn.tools}

            async def one(i: int) -> tuple[str, str]:
                # Slow calls of different lengths make answers come back out of order.
                value = await tools["slow"].fn(seconds=0.05 * (16 - i), value=f"v{i}")
                return value, await tools["add"].fn(a=i, b=1000)

            t0 = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(16)))
            return results, time.monotonic() - t0

    results, elapsed = run(main())
    assert results == [(f"v{i}", str(i + 1000)) for i in range(16)]
    assert elapsed < 0.05 * sum(range(1, 17)) / 2  # the calls overlapped (sequential: 6.8 s)


def test_call_past_the_timeout_raises_timeout_error_and_the_connection_stays_usable():
    async def main():
        async with demo(timeout=0.5).connect() as conn:
            assert all(t.timeout == 0.5 for t in conn.tools)  # the environment applies it too
            with pytest.raises(TimeoutError, match=r"'slow'.*0.5s"):
                await conn.call_tool("slow", {"seconds": 1.0, "value": "late"})
            first = await conn.call_tool("echo", {"text": "still here"})
            await asyncio.sleep(0.7)  # the late answer arrives and is dropped
            return first, await conn.call_tool("echo", {"text": "and here"})

    assert run(main()) == ("still here", "and here")


# -- streamable HTTP and a published server ------------------------------------------------
def test_streamable_http_server_lists_calls_and_reports_errors(http_url):
    async def main():
        async with MCPServer(url=http_url, name="demo-http").connect() as conn:
            names = {t.name for t in conn.tools}
            total = await conn.call_tool("add", {"a": 3, "b": 4})
            with pytest.raises(MCPToolError, match="over http"):
                await conn.call_tool("fail", {"message": "over http"})
            many = await asyncio.gather(*(conn.call_tool("echo", {"text": str(i)}) for i in range(16)))
            return names, total, many

    names, total, many = run(main())
    assert {"add", "echo", "fail"} <= names
    assert total == "7"
    assert many == [str(i) for i in range(16)]


def test_http_connections_are_sessions_on_the_one_server_process(http_url):
    async def main():
        server = MCPServer(url=http_url, isolated=True)
        async with server.connect() as a, server.connect() as b:
            return await a.call_tool("pid"), await b.call_tool("pid")

    pid_a, pid_b = run(main())
    assert pid_a == pid_b  # isolation over HTTP is per session; the process is the server's own


def test_published_calculator_server_evaluates_an_expression():
    script = Path(sys.executable).with_name("mcp-server-calculator")  # its console script
    server = (MCPServer(command=str(script), name="calculator") if script.exists()
              else MCPServer(command=sys.executable, args=["-m", "mcp_server_calculator"], name="calculator"))

    async def main():
        async with server.connect() as conn:
            (calculate,) = [t for t in conn.tools if t.name == "calculate"]
            assert "expression" in calculate.parameters["properties"]
            return await calculate.fn(expression="2 * (3 + 4) ** 2 - sqrt(16)")

    assert float(run(main())) == 94.0


# -- processes: isolation and cleanup ------------------------------------------------------
def test_isolated_connections_are_distinct_server_processes():
    async def main():
        server = demo(isolated=True)
        async with server.connect() as a, server.connect() as b:
            return int(await a.call_tool("pid")), int(await b.call_tool("pid"))

    pid_a, pid_b = run(main())
    assert pid_a != pid_b
    assert wait_gone(pid_a) and wait_gone(pid_b)


def test_server_process_is_gone_after_the_context_exits():
    async def main():
        async with demo().connect() as conn:
            pid = int(await conn.call_tool("pid"))
            assert alive(pid)
        assert conn.closed
        with pytest.raises(FatalToolError):
            await conn.call_tool("add", {"a": 1, "b": 2})
        return pid

    assert wait_gone(run(main()), within=1.0)


def test_server_process_is_gone_after_an_exception_inside_the_context():
    pids = []

    async def main():
        async with demo().connect() as conn:
            pids.append(int(await conn.call_tool("pid")))
            raise KeyError("boom in user code")

    with pytest.raises(KeyError, match="boom in user code"):
        run(main())
    assert wait_gone(pids[0], within=1.0)


def test_server_process_is_gone_after_cancellation_inside_the_context():
    pids = []

    async def main():
        async def body():
            async with demo().connect() as conn:
                pids.append(int(await conn.call_tool("pid")))
                await conn.call_tool("slow", {"seconds": 60})  # cancelled mid-call

        task = asyncio.create_task(body())
        while not pids:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert wait_gone(pids[0], within=5.0)  # a call in flight: the SDK may need its 2 s grace


PARENT = """
import asyncio, sys
from rlft.mcp import MCPServer

async def main():
    server = MCPServer(command=sys.executable, args=[sys.argv[1]], env={"DEMO_LINGER": "120"})
    async with server.connect() as conn:
        print(await conn.call_tool("pid"), flush=True)
        await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_process_dies_with_a_sigkilled_parent(tmp_path):
    # DEMO_LINGER keeps the server alive for 2 minutes after its stdin closes, so only the
    # parent-death signal set by rlft/mcp/launch.py can stop it within the few seconds allowed.
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, str(script), DEMO], stdout=subprocess.PIPE, env=env, text=True)
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 30)
        assert ready, "the parent did not connect within 30s"
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent did not report the server's PID: {line!r}"
        pid = int(line)
        assert alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert wait_gone(pid, within=5.0), f"server {pid} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.skipif(not LINUX, reason="the launcher exists for PR_SET_PDEATHSIG, Linux-only")
def test_launcher_refuses_to_start_a_server_whose_parent_already_died():
    launcher = REPO / "rlft" / "mcp" / "launch.py"
    ok = subprocess.run([sys.executable, "-I", "-S", str(launcher), "--parent", str(os.getpid()), "--", "echo",
                         "started"], capture_output=True, text=True, timeout=10)
    orphan = subprocess.run([sys.executable, "-I", "-S", str(launcher), "--parent", "999999999", "--", "echo",
                             "started"], capture_output=True, text=True, timeout=10)
    assert ok.stdout.strip() == "started"
    assert orphan.stdout == "" and orphan.returncode == 0


# -- a server that dies or never works -----------------------------------------------------
def test_server_that_dies_mid_call_makes_that_call_and_the_next_raise_fatal_tool_error():
    async def main():
        async with demo(restart=False).connect() as conn:  # with restarts, see the restart tests below
            pending = asyncio.ensure_future(conn.call_tool("slow", {"seconds": 30, "value": "never"}))
            await asyncio.sleep(0.1)
            with pytest.raises(FatalToolError, match="demo"):
                await conn.call_tool("crash")
            with pytest.raises(FatalToolError):
                await pending
            t0 = time.monotonic()
            with pytest.raises(FatalToolError):
                await conn.call_tool("add", {"a": 1, "b": 2})
            return time.monotonic() - t0

    assert run(main(), timeout=15) < 1.0


def test_server_killed_from_outside_makes_the_next_call_raise_fatal_tool_error_not_hang():
    async def main():
        async with demo(restart=False).connect() as conn:
            pid = int(await conn.call_tool("pid"))
            os.kill(pid, signal.SIGKILL)  # the OOM killer, say
            t0 = time.monotonic()
            with pytest.raises(FatalToolError, match="gone"):
                await conn.call_tool("add", {"a": 1, "b": 2})
            return time.monotonic() - t0

    assert run(main(), timeout=15) < 5.0


def test_server_that_fails_to_start_raises_with_its_stderr():
    code = "import sys; sys.stderr.write('config error: API_KEY is not set\\n'); sys.exit(1)"
    crashing = MCPServer(command=sys.executable, name="broken", args=["-c", code])
    missing = MCPServer(command="rlft-no-such-mcp-server", name="missing")

    async def main():
        with pytest.raises(MCPConnectError, match=r"(?s)'broken'.*API_KEY is not set"):
            async with crashing.connect():
                pass
        with pytest.raises((MCPConnectError, FileNotFoundError), match="rlft-no-such-mcp-server"):
            async with missing.connect():
                pass

    run(main())


def test_server_that_never_answers_times_out_at_start_and_is_stopped(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    server = MCPServer(command=sys.executable, args=["-c", code], name="mute", timeout=0.5, startup_timeout=0.5)

    async def main():
        with pytest.raises(MCPConnectError, match=r"'mute'.*no answer to the MCP handshake within 0.5s"):
            async with server.connect():
                pass

    run(main())
    assert wait_gone(int(wait_for_file(pid_file)), within=1.0)  # connect() returned only after stopping it


# -- configuration -------------------------------------------------------------------------
def test_tools_filter_exposes_only_the_named_tools_and_rejects_unknown_names():
    async def main():
        async with demo(tools=["echo", "add"]).connect() as conn:
            names = sorted(t.name for t in conn.tools)
        with pytest.raises(MCPConnectError, match="ech0"):
            async with demo(tools=["add", "ech0"]).connect():
                pass
        return names

    assert run(main()) == ["add", "echo"]


def test_from_config_reads_the_mcp_servers_style():
    config = {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
                  "env": {"DEBUG": "1"}, "autoApprove": []},
        "remote": {"type": "http", "url": "https://example.com/mcp", "headers": {"Authorization": "Bearer x"}},
        "db": {"command": "db-server", "isolated": True, "tools": ["query"]},
        "off": {"command": "unused", "disabled": True},
    }}
    files, remote, db = MCPServer.from_config(config, timeout=5.0)
    assert (files.name, files.command, files.args, files.env) == (
        "files", "npx", ("-y", "@modelcontextprotocol/server-filesystem", "/tmp"), {"DEBUG": "1"})
    assert (remote.transport, remote.url) == ("http", "https://example.com/mcp")
    assert remote.headers == {"Authorization": "Bearer x"}
    assert db.isolated and db.tools == ("query",) and not files.isolated
    assert files.timeout == remote.timeout == 5.0
    assert MCPServer.from_config(config["mcpServers"]) == MCPServer.from_config(config, timeout=30.0)
    assert len({files, remote, db}) == 3  # values: hashable despite their env/header dicts

    with pytest.raises(ValueError, match=r"'x'.*'arg'"):
        MCPServer.from_config({"x": {"command": "c", "arg": ["typo"]}})
    with pytest.raises(ValueError, match="sse"):
        MCPServer.from_config({"x": {"type": "sse", "url": "http://h/sse"}})
    with pytest.raises(ValueError, match="exactly one"):
        MCPServer()
    with pytest.raises(TypeError):
        MCPServer(command="c", args="--one-string")


def test_importing_rlft_and_rlft_mcp_does_not_import_the_mcp_sdk():
    code = "import sys, rlft, rlft.mcp; rlft.mcp.MCPServer(command='x'); assert 'mcp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_a_server_that_dies_is_started_again_for_the_next_call_with_bounded_restarts():
    async def main():
        server = MCPServer(command=sys.executable, args=[DEMO], max_restarts=1)
        async with server.connect() as conn:
            first = int(await conn.call_tool("pid"))
            with pytest.raises(FatalToolError):  # the call that killed it is not retried
                await conn.call_tool("crash")
            second = int(await conn.call_tool("pid"))  # a new process answers
            assert second != first and conn.restarts == 1
            with pytest.raises(FatalToolError):
                await conn.call_tool("crash")
            with pytest.raises(FatalToolError, match="gave up after 1 restarts"):
                await conn.call_tool("pid")  # max_restarts used up: it stays down

    asyncio.run(main())


def test_restart_false_fails_fast_once_the_server_is_gone():
    async def main():
        async with MCPServer(command=sys.executable, args=[DEMO], restart=False).connect() as conn:
            with pytest.raises(FatalToolError):
                await conn.call_tool("crash")
            with pytest.raises(FatalToolError, match="is gone"):
                await conn.call_tool("pid")
            assert conn.restarts == 0

    asyncio.run(main())


def test_a_connection_that_breaks_while_its_server_lives_is_restarted_for_the_next_call():
    """Seen in a recipe run under load: the session's stream closed while the server process was
    still alive; every later call failed with "is gone" and no restart was ever tried."""
    async def main():
        server = MCPServer(command=sys.executable, args=[DEMO], max_restarts=2)
        async with server.connect() as conn:
            first = int(await conn.call_tool("pid"))
            await conn._session._write_stream.aclose()  # fault injection: the transport breaks, the process lives
            with pytest.raises(FatalToolError, match="is gone"):
                await conn.call_tool("pid")
            second = int(await conn.call_tool("pid"))  # started again
            assert second != first and conn.restarts == 1

    asyncio.run(main())
