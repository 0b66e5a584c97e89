from pathlib import Path

import pytest

from backends.launcher import SHIM, BackendLauncher, LaunchError, LaunchTarget, build_command, smollm2_model_dir


def test_gpu_hosts_get_a_plain_vllm_serve_command_line():
    target = LaunchTarget("big", "http://127.0.0.1:8001", "llama-70b", "vllm", model="/models/llama", gpu_ids=(0, 1),
                          extra_args=("--tensor-parallel-size", "2"))
    command = build_command(target)
    assert command.argv == [
        "vllm", "serve", "/models/llama", "--served-model-name", "llama-70b", "--host", "127.0.0.1", "--port", "8001",
        "--tensor-parallel-size", "2",
    ]
    assert command.env == {"CUDA_VISIBLE_DEVICES": "0,1"}


def test_gpu_backend_without_a_model_is_an_error():
    with pytest.raises(LaunchError, match="launch_model"):
        build_command(LaunchTarget("big", "http://127.0.0.1:8001", "x", "vllm"))


def test_cpu_backend_runs_the_shim_pinned_to_its_core_in_float32_eager():
    command = build_command(LaunchTarget("small", "http://127.0.0.1:8002", "smol", "vllm-cpu", cpu_core=1))
    assert command.argv[1:5] == [str(SHIM), "serve", str(smollm2_model_dir()), "--served-model-name"]
    assert {"--enforce-eager", "float32"} <= set(command.argv)
    assert command.env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and command.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_a_server_that_exits_at_start_is_reported_with_its_log(tmp_path: Path):
    target = LaunchTarget("broken", "http://127.0.0.1:1", "x", "vllm-cpu", model=str(tmp_path / "no-such-model"))
    launcher = BackendLauncher([target], tmp_path)
    with pytest.raises(LaunchError, match="broken"):
        with launcher:
            pass
    assert (tmp_path / "broken.log").exists()
