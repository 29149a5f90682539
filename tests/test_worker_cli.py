"""Worker start-up: settings precedence and one-line failures on bad configuration."""

import socket
import subprocess
import sys

import pytest
from procs import ROOT

from clusterkit.config import ConfigError, load_yaml, parse_bytes
from worker.config import build_config, parse_model_spec


def run_worker(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_model_specs_and_sizes():
    assert parse_model_spec("a=/models/x") == ("a", "/models/x")
    assert parse_model_spec("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B")
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2 * 10**9
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_flags_win_over_file_and_file_model_settings_apply():
    data = {"worker": {"port": 9000, "heartbeat_interval": 2, "models": [
        {"name": "small", "source": "/m/small", "max_model_len": 128, "kv_cache_memory": "64MiB"}]},
        "engine_defaults": {"max_num_seqs": 8}}
    cfg = build_config(data, {"port": 9100, "models": "small=/m/small,other=/m/other"}, env={})
    assert cfg.port == 9100 and cfg.heartbeat_interval == 2
    assert [m.name for m in cfg.models] == ["small", "other"]
    e = cfg.engine_config(cfg.models[0], "cpu")
    assert e.max_model_len == 128 and e.kv_cache_memory == 64 * 2**20 and e.max_num_seqs == 8
    assert cfg.engine_config(cfg.models[1], "cpu").max_model_len is None
    cfg = build_config(data, {}, env={"WORKER_TOKEN": "t"})
    assert cfg.worker_token == "t" and cfg.models[0].source == "/m/small"
    with pytest.raises(ConfigError, match="unknown worker setting .prot."):
        build_config({"worker": {"prot": 1, "models": [{"source": "x"}]}}, {}, env={})
    with pytest.raises(ConfigError, match="duplicate"):
        build_config({}, {"models": "a=x,a=y"}, env={})


def test_tool_choice_settings_per_model_over_worker_flags():
    data = {"worker": {"models": [{"name": "q", "source": "/m/q", "tool_call_parser": "hermes"},
                                  {"name": "m", "source": "/m/m", "tool_call_parser": "mistral",
                                   "enable_auto_tool_choice": False}]}}
    cfg = build_config(data, {"enable_auto_tool_choice": True, "tool_call_parser": "llama3_json",
                              "models": "q=/m/q,m=/m/m,l=/m/l"}, env={})
    q, m, l_ = cfg.models
    assert (cfg.auto_tool_choice(q), cfg.tool_parser(q)) == (True, "hermes")
    assert (cfg.auto_tool_choice(m), cfg.tool_parser(m)) == (False, "mistral")
    assert (cfg.auto_tool_choice(l_), cfg.tool_parser(l_)) == (True, "llama3_json")
    with pytest.raises(ConfigError, match="enable_auto_tool_choice needs tool_call_parser"):
        build_config({}, {"enable_auto_tool_choice": True, "models": "a=/m/a"}, env={})
    with pytest.raises(ConfigError, match="tool_call_parser"):
        build_config({"worker": {"tool_call_parser": "pythonic"}}, {"models": "a=/m/a"}, env={})
    r = run_worker("--models", "a=/m/a", "--enable-auto-tool-choice")  # vLLM's flag names
    assert r.returncode != 0 and "enable_auto_tool_choice needs tool_call_parser" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_repo_config_yaml_is_valid_and_states_the_defaults():
    from router.settings import RouterSettings, build_settings

    data = load_yaml(str(ROOT / "config.yaml"))
    cfg = build_config(data, {"models": "x=/m/x"}, env={})
    assert cfg.port == 8100 and cfg.heartbeat_interval == 5
    assert cfg.model_dump(exclude={"models", "engine_defaults"}) == \
        build_config({}, {"models": "x=/m/x"}, env={}).model_dump(exclude={"models", "engine_defaults"})
    manager = dict(data["manager"])
    assert manager.pop("data_dir") == ".llmc-data"
    assert build_settings(manager, {}, env={}) == RouterSettings(port=8000)
    assert build_settings(data["router"], {}, env={}) == RouterSettings()


def test_router_settings_precedence_and_unknown_keys():
    from router.settings import build_settings

    s = build_settings({"policy": "round_robin", "port": 9000, "max_body_bytes": "1MiB"}, {"port": 9001},
                       env={"ROUTER_API_KEYS": "a, b", "WORKER_TOKEN": "t"})
    assert (s.policy, s.port, s.max_body_bytes, s.api_keys, s.worker_token) == \
        ("round_robin", 9001, 2**20, ["a", "b"], "t")
    with pytest.raises(ConfigError, match="unknown router setting 'polcy'"):
        build_settings({"polcy": "x"}, {}, env={})
    with pytest.raises(ConfigError, match="policy"):
        build_settings({"policy": "fastest"}, {}, env={})


def test_unknown_model_path_exits_with_one_line_reason(tmp_path):
    r = run_worker("--models", f"good={tmp_path}/missing-model", "--port", "0")
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("worker: error:")]
    assert len(err) == 1 and "missing-model" in err[0], r.stderr[-2000:]


def test_port_in_use_exits_with_one_line_reason(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_worker("--models", str(model_dir / "tiny-llama"), "--host", "127.0.0.1", "--port", str(port))
    assert r.returncode == 1
    assert "worker: error: cannot listen on 127.0.0.1" in r.stderr
