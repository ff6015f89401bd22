"""Launching the example scripts as 1 or 2 real processes, and checking how many ran.

With accelerate 1.15, `accelerate launch` given `--cpu` and two processes starts ONE process; `--multi_gpu` falls back
to two CPU processes with gloo when the script asks for the CPU (`--cpu`). Every script logs its world size in its first
line (`pole_hf.training.log_run_start`), which `world_size` reads back.
"""

import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
TIMEOUT = 400
"""Seconds a launched script may run: the slowest takes under 45 s on the quiet 2 cores, ~90 s when shared."""


def example(name: str) -> str:
    return os.path.join(ROOT, "examples", name)


def launch_command(script: str, processes: int = 1, launcher: str = "accelerate") -> list[str]:
    """The command that runs `script` on the CPU as `processes` real processes, started by `accelerate launch` or
    by `torchrun --standalone` (a free port: two-process jobs of other tests may run at the same time)."""
    if processes == 1:
        return [sys.executable, script, "--cpu"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                script, "--cpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
            script, "--cpu"]


def world_size(log: str) -> int:
    """The process count a script logged in its first line."""
    found = re.findall(r": (\d+) process\(es\), distributed type", log)
    assert found, f"no world-size line in the log:\n{log[-2000:]}"
    return int(found[0])


def run_script(script: str, args: list[str], processes: int = 1, wait: bool = True, env: dict | None = None,
               launcher: str = "accelerate"):
    """Run and check rc 0 and the world size; `wait=False` returns the Popen (stderr piped)."""
    command = [*launch_command(script, processes, launcher), *args]
    environment = dict(ENV, **(env or {}))
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # its own process group, so that a hang (a worker left waiting in a collective) kills every worker and fails
    # within TIMEOUT with the log, instead of blocking the suite
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{os.path.basename(script)} ({processes} process(es)) still ran after {TIMEOUT} s: "
                             f"killed; its log ends:\n{stderr[-3000:]}") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    assert world_size(result.stderr) == processes
    return result


def kill_when(process: subprocess.Popen, path, timeout: float = 300) -> None:
    """SIGKILL `process` as soon as `path` exists (e.g. its 4th checkpoint), as a killed job; fails if it never does."""
    deadline = time.time() + timeout
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert os.path.exists(path), process.stderr.read().decode()[-2000:] if process.stderr else f"{path} never appeared"


def kill_and_resume(run, args: list[str], folder, checkpoint: str = "checkpoint_4"):
    """Start `run(args)` into `folder`, SIGKILL it once `checkpoint` exists, check it had not finished, then resume
    it from the latest checkpoint; returns the resumed run's result."""
    process = run([*args, "--output_dir", str(folder)], wait=False)
    kill_when(process, os.path.join(folder, checkpoint))
    assert not os.path.exists(os.path.join(folder, "model.safetensors")), "the run finished before it could be killed"
    return run([*args, "--output_dir", str(folder), "--resume_from_checkpoint", "latest"])
