"""The CLI: flags and --config presets, and real `python -m server` processes (auth, demo, SIGTERM drain)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[2]
CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down gracefully


def parse(*argv: str):
    return parse_args(build_parser(), list(argv))


def test_defaults() -> None:
    args = parse()
    assert (args.model, args.host, args.port, args.device, args.dtype) == (None, "127.0.0.1", 8000, "auto", "auto")
    assert args.max_queue_len is None and args.api_key is None and args.enforce_eager is False


def test_config_preset_is_overridden_by_flags(tmp_path: Path) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text("model: tiiuae/Falcon-H1-7B-Instruct\nmax_model_len: 32768\nenforce_eager: true\n"
                      "served_model_name: [falcon, falcon-7b]\ngpu_memory_utilization: 0.85\n"
                      "metadata: {gpu: H100, notes: anything}\n")
    args = parse("--config", str(preset), "--max-model-len", "4096", "--no-enforce-eager")
    assert args.model == "tiiuae/Falcon-H1-7B-Instruct" and args.served_model_name == ["falcon", "falcon-7b"]
    assert args.max_model_len == 4096 and args.enforce_eager is False and args.gpu_memory_utilization == 0.85


@pytest.mark.parametrize(("content", "message"), [
    ("max_model_len: 1\nmax_modle_len: 2\n", "unknown option(s) max_modle_len"),
    ("max_model_len: lots\n", "invalid int value"),
    ("enforce_eager: maybe\n", "must be true or false"),
    ("- a list\n", "must hold a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_config_files(tmp_path: Path, capsys, content: str, message: str) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text(content)
    with pytest.raises(SystemExit):
        parse("--config", str(preset))
    assert message in capsys.readouterr().err


def test_missing_config_file(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--config", "/nonexistent/preset.yaml")
    assert "cannot read config file" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """`python -m server ...` in a subprocess, with its output collected in a file."""

    def __init__(self, tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *argv],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.ConnectError:
                pass
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def test_cli_serves_a_checkpoint_and_drains_on_sigterm(checkpoint: Path, tmp_path: Path) -> None:
    server = Process(tmp_path, "--model", str(checkpoint), "--device", "cpu", "--dtype", "float32",
                     "--served-model-name", "cli-model", "--max-model-len", "2048", "--api-key", "k1",
                     "--shutdown-timeout", "30")
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer k1"}
        models = httpx.get(server.url + "/v1/models", headers=auth).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("cli-model", 2048)]

        body = {"model": "cli-model", "prompt": "drain me", "max_tokens": 1200, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
            lines = r.iter_lines()
            events = [next(lines)]
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:  # no new work is admitted while draining
                assert httpx.get(server.url + "/health", timeout=5).status_code == 503
            except httpx.ConnectError:
                pass  # or the listener is already closed
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=60) in CLEAN_EXIT
    finally:
        server.stop()
    assert "shutting down" in server.log.read_text()


def test_cli_without_model_serves_the_demo(tmp_path: Path) -> None:
    server = Process(tmp_path, "--device", "cpu", "--max-model-len", "128",
                     env={"FALCON_SERVE_CACHE": str(tmp_path / "cache"), "FALCON_SERVE_API_KEY": "env-key"})
    try:
        server.wait_ready()
        auth = {"Authorization": "Bearer env-key"}
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["id"] == "falcon-serve-demo"
        r = httpx.post(server.url + "/v1/chat/completions", headers=auth,
                       json={"model": "falcon-serve-demo", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4})
        assert r.status_code == 200
    finally:
        assert server.stop() in CLEAN_EXIT
    assert (tmp_path / "cache" / "demo-v1" / "model.safetensors").is_file()
    assert "RANDOM weights" in server.log.read_text() and "random noise" in server.log.read_text()
