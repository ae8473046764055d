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


def parse(*argv: str):
    return parse_args(build_parser(), list(argv))


def test_defaults() -> None:
    args = parse()
    assert (args.model, args.host, args.port, args.device, args.dtype) == (None, "127.0.0.1", 8000, "auto", "auto")
    assert args.max_queue_len is None and args.api_key is None and args.enforce_eager is False
    assert args.disable_playground is False and parse("--disable-playground").disable_playground is True


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
                     "--shutdown-timeout", "30", "--disable-playground")
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/").status_code == 404  # --disable-playground
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
            # The listener stays open during the drain: readiness fails and new work gets 503, not a refused
            # connection.
            for _ in range(3):
                assert httpx.get(server.url + "/health", timeout=5).status_code == 503
                r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=auth, timeout=5)
                assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
                time.sleep(0.3)
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=60) == 0
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
        assert httpx.get(server.url + "/").status_code == 200  # the playground page needs no key
        assert httpx.get(server.url + "/v1/models", headers=auth).json()["data"][0]["id"] == "falcon-serve-demo"
        r = httpx.post(server.url + "/v1/chat/completions", headers=auth,
                       json={"model": "falcon-serve-demo", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4})
        assert r.status_code == 200
    finally:
        assert server.stop() == 0
    assert (tmp_path / "cache" / "demo-v2" / "model.safetensors").is_file()
    assert "RANDOM weights" in server.log.read_text() and "random noise" in server.log.read_text()


def test_a_short_grace_period_ends_streams_with_an_error_event(checkpoint: Path, tmp_path: Path) -> None:
    server = Process(tmp_path, str(checkpoint), "--device", "cpu", "--dtype", "float", "--max-model-len", "2048",
                     "--shutdown-timeout", "1")
    try:
        server.wait_ready()
        body = {"prompt": "cut me", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events = [next(lines)]
            server.proc.send_signal(signal.SIGTERM)
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: "):])["error"]
        assert "shutting down" in error["message"]
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_vllm_command_lines(capsys) -> None:
    args = parse("tiiuae/Falcon-H1-7B-Instruct", "--dtype", "half", "--trust-remote-code", "-tp", "1",
                 "--block-size", "32", "--swap-space", "4", "--disable-log-requests", "--uvicorn-log-level", "warning")
    assert args.model == "tiiuae/Falcon-H1-7B-Instruct" and args.dtype == "float16"
    assert args.kv_block_size == 32 and args.log_level == "warning" and args.trust_remote_code
    assert parse("--dtype", "float").dtype == "float32" and parse("-tp", "2").tensor_parallel_size == 2
    assert parse("--load-format", "dummy").load_format == "dummy" and parse("--download-dir", "/d").download_dir == "/d"
    assert parse("--model", "a/b").model == "a/b" and parse("a/b", "--model", "a/b").model == "a/b"
    for argv, message in ((["--max-model", "5"], "unrecognized arguments: --max-model"),  # no abbreviations
                          (["a/b", "--model", "c/d"], "given twice"),
                          (["-tp", "0"], "--tensor-parallel-size must be >= 1"),
                          (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported")):
        with pytest.raises(SystemExit):
            parse(*argv)
        assert message in capsys.readouterr().err


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_start_up_errors_are_one_line_before_loading(tmp_path: Path) -> None:
    missing = run_cli(str(tmp_path / "no-such-model"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("falcon-serve: error: ")
    assert "no-such-model" in missing.stderr and "Traceback" not in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run_cli("--device", "cpu", "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "falcon-serve: error: cannot listen on" in busy.stderr
    assert "Traceback" not in busy.stderr and "demo" not in busy.stderr.lower()  # nothing was loaded
    import torch

    if not torch.cuda.is_available():
        no_gpu = run_cli("--device", "cuda")
        assert no_gpu.returncode == 2 and "no CUDA device is available" in no_gpu.stderr


def test_help_does_not_import_torch() -> None:
    """`falcon-serve --help` stays well under a second: it must not import torch (seconds on its own)."""
    code = ("import sys\nfrom server.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--tensor-parallel-size" in result.stdout and "--trust-request-chat-template" in result.stdout
